"""UTKFace from its prepared TFDS builder (fqjax.data.utkface.read_prepared).

UTKFace has one split; train / val / test are carved from it, stratified by
group. Attributes: race (White, Black, Asian, Indian, Others), gender (Male,
Female) and age_bin (ages binned at config.data.age_bins). Default: y = race,
group = race.
"""
from __future__ import annotations

from typing import Mapping, Sequence, Tuple

import numpy as np

from fqjax.data import utkface  # imports no TFDS; its read_prepared does
from fqjax.data.assemble import assemble
from fqjax.data.options import resolve_attributes
from fqjax.data.splits import Splits, random_subset
from fqjax.data.utkface import GENDER_NAMES, RACE_NAMES, default_data_dir
from fqjax.errors import InputError

NATIVE_SIZE = 200  # UTKFace's aligned and cropped faces are 200 x 200
REQUIRED_KEYS = ("image", "race", "gender", "age")
_NAMES = {"race": RACE_NAMES, "gender": GENDER_NAMES}  # the categorical attributes' value names


def age_bin_names(edges: Sequence[int]) -> Tuple[str, ...]:
  """Names of the bins [0, e0), [e0, e1), ..., [e_last, inf), e.g. ('<20', '20-39', '60+')."""
  edges = [int(e) for e in edges]
  names = [f"<{edges[0]}"] + [f"{a}-{b - 1}" for a, b in zip(edges, edges[1:])]
  return tuple(names + [f"{edges[-1]}+"])


def attribute(data: Mapping[str, np.ndarray], name: str,
              edges: Sequence[int]) -> Tuple[np.ndarray, Tuple[str, ...]]:
  """(values [N] int32, names) of one UTKFace attribute: race, gender or age_bin.

  data: read_prepared's arrays ('race', 'gender', 'age': [N] int); edges: age_bin edges (increasing ints).
  """
  if name == "age_bin":
    return np.digitize(data["age"], edges).astype(np.int32), age_bin_names(edges)
  names = _NAMES[name]
  values = np.asarray(data[name]).astype(np.int32)
  if values.size and (values.min() < 0 or values.max() >= len(names)):
    raise InputError(f"UTKFace {name} values must be in 0..{len(names) - 1} ({names}); got "
                     f"{values.min()}..{values.max()}. The prepared dataset looks corrupt: "
                     "rebuild it with the fqjax utkface builder.")
  return values, names


def _check_prepared(data: Mapping[str, np.ndarray], size: int) -> None:
  missing = [k for k in REQUIRED_KEYS if k not in data]
  if missing:
    raise InputError(f"utkface.read_prepared returned no {missing}; expected keys {REQUIRED_KEYS}.")
  image = np.asarray(data["image"])
  if image.dtype != np.uint8 or image.ndim != 4 or image.shape[1:] != (size, size, 3):
    raise InputError(f"utkface.read_prepared returned images {image.shape} {image.dtype}; "
                     f"expected [N, {size}, {size}, 3] uint8.")
  for key in REQUIRED_KEYS[1:]:
    if np.shape(data[key]) != (len(image),):
      raise InputError(f"utkface.read_prepared returned {key} of shape {np.shape(data[key])}; "
                       f"expected [{len(image)}] (one per image).")


def load_utkface(cfg) -> Splits:
  """UTKFace Splits from a validated data config (label / group among race, gender, age_bin)."""
  size = cfg.image_size or NATIVE_SIZE
  data = utkface.read_prepared(cfg.data_dir or default_data_dir(), size)
  _check_prepared(data, size)
  label_attr, group_attr = resolve_attributes(cfg)
  edges = list(cfg.age_bins)
  y, class_names = attribute(data, label_attr, edges)
  group, group_names = attribute(data, group_attr, edges)
  rows = random_subset(len(y), cfg.max_examples, seed=cfg.seed + 2)
  pool = (np.asarray(data["image"])[rows], y[rows], group[rows], rows)
  return assemble(name="utkface", pools={"all": pool}, cfg=cfg, scale=255.0,
                  class_names=class_names, group_names=group_names, label_attribute=label_attr,
                  group_attribute=group_attr)
