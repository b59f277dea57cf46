"""Datasets as `Splits`: train / val / test arrays of x, y, group plus metadata.

`load(config)` reads config.data (see fqjax.data.options for every field) and
returns a `Splits`. Sources: digits (offline default), the TFDS image datasets
(mnist, fashion_mnist, cifar10, svhn_cropped, celeb_a), utkface, the user's
arrays (.npz or `from_arrays`) and synthetic clusters (tests and benchmarks).
Sources are imported on demand, so loading digits never imports TFDS.
"""
from __future__ import annotations

import copy
import importlib

from fqjax.data.arrays import from_arrays
from fqjax.data.options import (DATASET_NAMES, TFDS_NAMES, default_data_config, seeds_of,
                                validate_data_config)
from fqjax.data.imbalance import apply_imbalance
from fqjax.data.splits import DatasetInfo, Split, Splits, stratified_split

__all__ = ["load", "load_for_seed", "split_seed", "from_arrays", "default_data_config", "validate_data_config",
           "apply_imbalance", "stratified_split", "Split", "Splits", "DatasetInfo",
           "DATASET_NAMES"]

# config.data.name -> (module, function taking the validated data config and returning Splits).
# Imported on first use, so that loading digits never imports TFDS (or PIL).
LOADERS = {
    "digits": ("fqjax.data.digits", "load_digits"),
    "synthetic": ("fqjax.data.synthetic", "load_synthetic"),
    "arrays": ("fqjax.data.arrays", "load_npz"),
    "utkface": ("fqjax.data.utkface_source", "load_utkface"),
    **{name: ("fqjax.data.tfds_sources", "load_tfds") for name in TFDS_NAMES},
}


def load(config) -> Splits:
  """Loads the dataset named by config.data.name (or config.name for a data config).

  Args:
    config: a study config (its ``data`` section is used) or a data config; validated first.

  Returns:
    Splits; per split x [N, ...] float32 normalized ([N, H, W, C] images or [N, D] features),
    y / group [N] int32 and index [N] int64, deterministic given config.data.seed.
  """
  cfg = validate_data_config(config)
  module, function = LOADERS[cfg.name]  # validated: one of DATASET_NAMES
  return getattr(importlib.import_module(module), function)(cfg)


def split_seed(config, seed: int) -> int:
  """The data seed training seed ``seed`` uses: data.seed + seed when config.data.resplit_per_seed and the
  study has several seeds, else data.seed. ``config`` is a whole study config."""
  data = config.data
  if data.get("resplit_per_seed", True) and len(seeds_of(config)) > 1:
    return int(data.seed) + int(seed)
  return int(data.seed)


def load_for_seed(config, seed: int) -> Splits:
  """``load`` with config.data.seed replaced by ``split_seed(config, seed)``: each training seed's own split."""
  data = copy.deepcopy(config.data)
  with data.unlocked():
    data.seed = split_seed(config, seed)
  return load(data)
