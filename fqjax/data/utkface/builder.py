"""UTKFace as a TFDS dataset (array_record, no TensorFlow needed), from a manual download.

Placement: put ``UTKFace.tar.gz`` (or ``crop_part1.tar.gz``, or the extracted
``UTKFace/`` / ``crop_part1/`` folder, or loose JPEGs) in a manual dir, then
``prepare(data_dir, manual_dir, image_size)`` or
``python -m fqjax.data.utkface --manual_dir M --data_dir D --image_size 64``.
Archives are extracted with the path checks of ``files.safe_extract`` under
``<data_dir>/downloads/extracted``; file names are parsed by
``files.parse_file_name`` and malformed ones are skipped and counted. The counts
are stored in the prepared dataset's metadata (``prepared_stats``) and returned
by ``prepare``.

Images are center-cropped to a square and resized to ``image_size`` (the
builder config: ``utkface/32``, ``utkface/64``, ...; any positive size works)
and stored as ``tfds.features.Tensor`` uint8, which TFDS encodes without
TensorFlow (``tfds.features.Image`` cannot). ``DatasetInfo`` is built directly,
so no metadata files ship with the builder.

tensorflow_datasets is imported only inside the functions that need it, so
``import fqjax.data.utkface`` stays cheap and TFDS-free.
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import numbers
import os
from typing import Dict, Optional, Sequence

import numpy as np

from fqjax.data.utkface.files import (GENDER_NAMES, MANUAL_DOWNLOAD_INSTRUCTIONS, MAX_LISTED, NAME,
                                      RACE_NAMES, load_image, scan_manual_dir)

log = logging.getLogger("fqjax.data.utkface")

VERSION = "1.0.0"
PREDEFINED_SIZES = (32, 64, 128, 200)  # 200: UTKFace's native aligned-and-cropped size


def default_data_dir() -> str:
  """TFDS's default data dir without importing TFDS: $TFDS_DATA_DIR or ~/tensorflow_datasets."""
  return os.path.expanduser(os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets"))


# ----------------------------------------------------------------------------
# The TFDS builder (defined on first use: it needs tensorflow_datasets)
# ----------------------------------------------------------------------------

def _check_size(image_size) -> int:
  if isinstance(image_size, bool) or not isinstance(image_size, numbers.Integral) or image_size < 1:
    raise ValueError(
        f"image_size must be an int >= 1, got {image_size!r}; e.g. 32, 64, or 200 (UTKFace's native size).")
  return int(image_size)


@functools.lru_cache(maxsize=None)
def builder_class():
  """The ``Utkface`` GeneratorBasedBuilder class, registered with TFDS as 'utkface'.

  Defined on first call (importing tensorflow_datasets); after that
  ``tfds.builder('utkface/64')`` and ``tfds.data_source('utkface/64', ...)`` work.
  """
  import dataclasses  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  @dataclasses.dataclass
  class UtkfaceConfig(tfds.core.BuilderConfig):
    """image_size: side of the stored square images."""
    image_size: int = 64

  class Utkface(tfds.core.GeneratorBasedBuilder):
    """UTKFace faces with age, gender and race, from a manual download."""

    VERSION = tfds.core.Version(VERSION)
    BUILDER_CONFIGS = [UtkfaceConfig(name=str(s), image_size=s,
                                     description=f"{s}x{s} RGB, center-cropped and resized")
                       for s in PREDEFINED_SIZES]
    DEFAULT_CONFIG_NAME = "64"
    MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS

    # TFDS 4.9.10 derives code_path via `import importlib_resources`, a backport it declares
    # only for Python < 3.9, so on 3.11 without it any builder defined in a package fails.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
      from etils import epath  # pylint: disable=g-import-not-at-top
      return epath.Path(__file__)

    def _info(self):
      s = self.builder_config.image_size
      return tfds.core.DatasetInfo(
          builder=self,
          description=("UTKFace: faces with age, gender and race labels parsed from the file "
                       f"names, {s}x{s} RGB uint8. Skipped malformed names are counted in the "
                       "metadata (skipped_malformed)."),
          features=tfds.features.FeaturesDict({
              "image": tfds.features.Tensor(shape=(s, s, 3), dtype=np.uint8),
              "race": tfds.features.ClassLabel(names=list(RACE_NAMES)),
              "gender": tfds.features.ClassLabel(names=list(GENDER_NAMES)),
              "age": tfds.features.Tensor(shape=(), dtype=np.int32),
              "file_name": tfds.features.Text(),
          }),
          supervised_keys=("image", "race"),
          homepage="https://susanqq.github.io/UTKFace/",
          citation=("@inproceedings{zhifei2017cvpr, title={Age Progression/Regression by "
                    "Conditional Adversarial Autoencoder}, author={Zhang, Zhifei and Song, Yang "
                    "and Qi, Hairong}, booktitle={CVPR}, year={2017}}"),
          metadata=tfds.core.MetadataDict(),
      )

    def _split_generators(self, dl_manager):
      extract_root = os.path.join(os.fspath(dl_manager.download_dir), "extracted")
      scan = scan_manual_dir(os.fspath(dl_manager.manual_dir), extract_root)
      self.info.metadata.update(scan.stats)
      return {"train": self._generate_examples(scan.examples)}

    def _generate_examples(self, examples):
      size = self.builder_config.image_size
      unreadable = []
      for path, attributes in examples:
        try:
          image = load_image(path, size)
        except (OSError, ValueError) as error:  # PIL raises these for truncated / non-JPEG data
          log.warning("UTKFace: skipping unreadable image %s (%s)", path, error)
          unreadable.append(os.path.basename(path))
          continue
        yield os.path.basename(path), {
            "image": image, "race": attributes.race, "gender": attributes.gender,
            "age": attributes.age, "file_name": os.path.basename(path)}
      # Runs once the writer has consumed every example, before the metadata is written.
      self.info.metadata["skipped_unreadable"] = len(unreadable)
      self.info.metadata["skipped_unreadable_names"] = unreadable[:MAX_LISTED]
      self.info.metadata["num_examples"] = len(examples) - len(unreadable)

  Utkface.UtkfaceConfig = UtkfaceConfig
  return Utkface


def _builder(data_dir: str, image_size: int):
  cls = builder_class()
  size = _check_size(image_size)
  names = {c.name for c in cls.BUILDER_CONFIGS}
  config = str(size) if str(size) in names else cls.UtkfaceConfig(
      name=str(size), image_size=size, description=f"{size}x{size} RGB")
  return cls(config=config, data_dir=os.path.expanduser(os.fspath(data_dir)), file_format="array_record")


def _not_prepared(data_dir: str, image_size: int, where: str) -> FileNotFoundError:
  return FileNotFoundError(
      f"UTKFace at image_size={image_size} is not prepared: no dataset_info.json in {where}.\n"
      "Prepare it once (needs the manual download, about a minute):\n"
      "  1. Download UTKFace.tar.gz (\"Aligned&Cropped Faces\") from https://susanqq.github.io/UTKFace/\n"
      "  2. Put it (or its extracted UTKFace/ folder) in a manual dir, e.g. "
      f"{os.path.join(data_dir, 'downloads', 'manual')}\n"
      f"  3. python -m fqjax.data.utkface --manual_dir {os.path.join(data_dir, 'downloads', 'manual')} "
      f"--data_dir {data_dir} --image_size {image_size}\n"
      "     or in Python: import fqjax.data.utkface; "
      f"fqjax.data.utkface.prepare({data_dir!r}, {os.path.join(data_dir, 'downloads', 'manual')!r}, {image_size})")


# ----------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------

def prepare(data_dir: str, manual_dir: Optional[str] = None, image_size: int = 64, *,
            overwrite: bool = False) -> Dict[str, object]:
  """Builds utkface/<image_size> in ``data_dir`` from the download in ``manual_dir``.

  Does nothing (and returns the stored stats) if it is already prepared, unless
  ``overwrite``.

  Args:
    data_dir: TFDS data dir (e.g. ~/tensorflow_datasets).
    manual_dir: folder with UTKFace.tar.gz / crop_part1.tar.gz / UTKFace/ / crop_part1/ / JPEGs;
      None means TFDS's default, <data_dir>/downloads/manual.
    image_size: side of the stored square images.
    overwrite: rebuild even if prepared.

  Returns:
    Stats: num_examples, skipped_malformed (+ up to 20 skipped_malformed_names
    with the reason), skipped_unreadable (+ names), duplicates, ignored_files,
    sources, and dataset_dir.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  data_dir = os.path.expanduser(os.fspath(data_dir))
  if manual_dir is None:
    manual_dir = os.path.join(data_dir, "downloads", "manual")
  manual_dir = os.path.expanduser(os.fspath(manual_dir))
  if not os.path.isdir(manual_dir) or not os.listdir(manual_dir):
    raise FileNotFoundError(
        f"UTKFace manual dir {manual_dir!r} is missing or empty.\n{MANUAL_DOWNLOAD_INSTRUCTIONS}")
  builder = _builder(data_dir, image_size)
  mode = (tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if overwrite
          else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=manual_dir, download_mode=mode, try_download_gcs=False))
  stats = _stats(builder)
  log.info("UTKFace prepared in %s: %s", builder.data_dir, json.dumps(stats))
  return stats


def _stats(builder) -> Dict[str, object]:
  stats = dict(builder.info.metadata or {})
  stats["dataset_dir"] = os.fspath(builder.data_dir)
  return stats


def prepared_stats(data_dir: str, image_size: int) -> Dict[str, object]:
  """The stats that prepare() stored (skipped names and counts) for a prepared dataset."""
  builder = _builder(data_dir, image_size)
  if not builder.is_prepared():
    raise _not_prepared(os.fspath(data_dir), image_size, os.fspath(builder.data_dir))
  return _stats(builder)


def read_prepared(data_dir: str, image_size: int) -> Dict[str, np.ndarray]:
  """Reads the whole prepared UTKFace 'train' split into memory.

  Args:
    data_dir: the TFDS data dir given to prepare().
    image_size: which config to read (utkface/<image_size>).

  Returns:
    {'image': [N, S, S, 3] uint8, 'race': [N] int32 (0..4, RACE_NAMES),
     'gender': [N] int32 (0 Male, 1 Female), 'age': [N] int32 years,
     'file_name': [N] str}, in the stored (TFDS-shuffled, fixed) order.

  Raises:
    FileNotFoundError: if utkface/<image_size> is not prepared in data_dir; the
      message says where it looked and the command that prepares it.
  """
  size = _check_size(image_size)
  data_dir = os.path.expanduser(os.fspath(data_dir))
  if not os.path.isdir(data_dir):
    raise _not_prepared(data_dir, size, os.path.join(data_dir, NAME, str(size), VERSION))
  builder = _builder(data_dir, size)
  if not builder.is_prepared():
    raise _not_prepared(data_dir, size, os.fspath(builder.data_dir))
  source = builder.as_data_source(split="train")
  n = len(source)
  out = {"image": np.empty((n, size, size, 3), np.uint8), "race": np.empty(n, np.int32),
         "gender": np.empty(n, np.int32), "age": np.empty(n, np.int32)}
  names = []
  chunk = 1024  # batched reads: one array_record call per chunk, not per record
  for start in range(0, n, chunk):
    rows = list(range(start, min(start + chunk, n)))
    for i, record in zip(rows, source.__getitems__(rows)):
      for key in ("image", "race", "gender", "age"):
        out[key][i] = record[key]
      name = record["file_name"]
      names.append(name.decode() if isinstance(name, bytes) else str(name))
  out["file_name"] = np.asarray(names, dtype=str)
  return out


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
  """CLI: python -m fqjax.data.utkface --manual_dir M --data_dir D --image_size 64."""
  parser = argparse.ArgumentParser(
      prog="python -m fqjax.data.utkface",
      description="Prepare the UTKFace TFDS dataset (utkface/<image_size>) from a manual download.",
      epilog=MANUAL_DOWNLOAD_INSTRUCTIONS, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--manual_dir", default=None,
                      help="folder holding UTKFace.tar.gz, crop_part1.tar.gz, or the UTKFace/ / crop_part1/ "
                           "folder (default: <data_dir>/downloads/manual)")
  parser.add_argument("--data_dir", default=default_data_dir(),
                      help="TFDS data dir to write to (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)")
  parser.add_argument("--image_size", type=int, default=64, help="side of the square images (default 64)")
  parser.add_argument("--overwrite", action="store_true", help="rebuild even if already prepared")
  args = parser.parse_args(argv)
  if args.image_size < 1:
    parser.error(f"--image_size must be >= 1, got {args.image_size}")
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
  stats = prepare(args.data_dir, args.manual_dir, args.image_size, overwrite=args.overwrite)
  print(json.dumps(stats, indent=2))
  return stats
