"""TFDS image datasets read through `tfds.data_source` (array_record, random access).

No TensorFlow is imported to read; tensorflow_datasets itself is imported inside
functions so that digits / arrays / synthetic never import it. Preparing the
official datasets from their downloads does need TensorFlow, once:
  pip install tensorflow
  tfds build cifar10 --data_dir=DIR --file_format=array_record

Splits: the dataset's own train and test; val is carved from train, stratified
by group. celeb_a's own validation split is not used, so every source is split
the same way. Each source split is read in full (or a seeded random subset of
config.data.max_examples rows) into uint8 arrays, resized if config.data.image_size
is set (center crop to a square, then a box / nearest resize with PIL), and
finally scaled to [0, 1] and normalized (fqjax.data.assemble).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from fqjax.data.assemble import assemble, check_memory
from fqjax.data.options import TFDS_CLASSIFICATION, resolve_attributes
from fqjax.data.splits import Splits, random_subset
from fqjax.errors import FqjaxError

_RESAMPLE = {"area": Image.Resampling.BOX, "nearest": Image.Resampling.NEAREST}


class DatasetNotPreparedError(FqjaxError, FileNotFoundError):
  """A TFDS dataset is not prepared (in array_record format) where we looked."""


def prepare_command(name: str, data_dir: str) -> str:
  """The shell command that prepares `name` for random access in `data_dir`."""
  return (f"pip install tensorflow && tfds build {name} --data_dir={data_dir} "
          "--file_format=array_record")


def open_source(name: str, split: str, data_dir: Optional[str]):
  """`tfds.data_source(name, split)`, or DatasetNotPreparedError saying how to prepare it."""
  import tensorflow_datasets as tfds  # lazy: only TFDS sources need it
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except Exception as error:  # TFDS raises several types here; translate the known causes
    builder = tfds.builder(name, data_dir=data_dir)
    root = str(builder.data_dir_root)
    if not builder.is_prepared():
      raise DatasetNotPreparedError(
          f"TFDS dataset {name!r} is not prepared: looked in {builder.data_dir} "
          f"(config.data.data_dir={data_dir!r}). Prepare it once (preparing official image "
          f"datasets needs TensorFlow) with:\n  {prepare_command(name, root)}") from error
    file_format = getattr(builder.info.file_format, "value", builder.info.file_format)
    if file_format not in ("array_record", "parquet"):
      raise DatasetNotPreparedError(
          f"TFDS dataset {name!r} is prepared in {builder.data_dir} as {file_format}, which "
          "has no random access. Delete that folder and prepare it as array_record with:\n  "
          f"{prepare_command(name, root)}") from error
    raise


def resize_image(image: np.ndarray, size: Optional[int], method: str) -> np.ndarray:
  """[H, W, C] uint8 -> [size, size, C] uint8 (center-cropped to a square first)."""
  if size is None:
    return image
  h, w = image.shape[:2]
  side = min(h, w)
  top, left = (h - side) // 2, (w - side) // 2
  image = image[top:top + side, left:left + side]
  if side == size:
    return image
  channels = image.shape[2]
  pil = Image.fromarray(image[..., 0] if channels == 1 else image)
  out = np.asarray(pil.resize((size, size), resample=_RESAMPLE[method]), dtype=np.uint8)
  return out.reshape(size, size, channels)


def target_shape(native: Sequence[int], size: Optional[int]) -> Tuple[int, int, int]:
  """The stored image shape (H, W, C): the native one, or (size, size, C) when resizing."""
  return tuple(native) if size is None else (size, size, int(native[-1]))


def read_rows(source, rows: np.ndarray, extract: Callable, shape: Tuple[int, ...],
              size: Optional[int], method: str):
  """Reads `rows` of a data source: (images [n, *shape] uint8, y [n] int32, group [n] int32)."""
  images = np.empty((len(rows),) + tuple(shape), np.uint8)
  y = np.empty(len(rows), np.int32)
  group = np.empty(len(rows), np.int32)
  for i, row in enumerate(rows):
    # One record at a time: tfds.testing.mock_data's __getitems__ is broken in 4.9.10.
    example = source[int(row)]
    image = np.asarray(example["image"], dtype=np.uint8)
    images[i] = resize_image(image, size, method)
    y[i], group[i] = extract(example)
  return images, y, group


def _binary_names(attribute: str) -> Tuple[str, str]:
  return (f"not {attribute}", attribute)


def _classification_fields(features, label_attr: str, group_attr: str):
  """y = group = the class label (mnist, fashion_mnist, cifar10, svhn_cropped)."""
  def extract(example):
    label = int(example["label"])
    return label, label
  class_names = tuple(features["label"].names)
  return extract, class_names, class_names


def _celeb_a_fields(features, label_attr: str, group_attr: str):
  """y and group are two of the 40 binary attributes."""
  def extract(example):
    attributes = example["attributes"]
    return int(attributes[label_attr]), int(attributes[group_attr])
  return extract, _binary_names(label_attr), _binary_names(group_attr)


# dataset -> fields(features, label attribute, group attribute) ->
#   (extract(example) -> (y, group) ints, class names, group names)
_FIELDS = {"celeb_a": _celeb_a_fields, **{name: _classification_fields for name in TFDS_CLASSIFICATION}}


def load_tfds(cfg) -> Splits:
  """Splits of a TFDS image dataset (config.data.name in fqjax.data.options.TFDS_NAMES) from a validated config.

  x is [N, H, W, C] float32 (H = W = config.data.image_size when set, else the native shape).
  """
  name = cfg.name
  label_attr, group_attr = resolve_attributes(cfg)
  sources = {split: open_source(name, split, cfg.data_dir) for split in ("train", "test")}
  features = sources["train"].dataset_info.features
  extract, class_names, group_names = _FIELDS[name](features, label_attr, group_attr)
  shape = target_shape(features["image"].shape, cfg.image_size)
  rows = {split: random_subset(len(src), cfg.max_examples, seed=cfg.seed + 2 + i)
          for i, (split, src) in enumerate(sources.items())}
  check_memory(sum(len(r) for r in rows.values()), shape, cfg.get("max_gib", 8.0), name)
  pools = {}
  for split, src in sources.items():
    images, y, group = read_rows(src, rows[split], extract, shape, cfg.image_size,
                                 cfg.resize_method)
    pools[split] = (images, y, group, rows[split])
  return assemble(name=name, pools=pools, cfg=cfg, scale=255.0, class_names=class_names,
                  group_names=group_names, label_attribute=label_attr, group_attribute=group_attr)
