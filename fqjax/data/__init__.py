"""Datasets as `Splits`: train / val / test arrays of x, y, group plus metadata.

`load(config)` reads config.data (see fqjax.data.config for every field) and
returns a `Splits`. Sources: digits (offline default), the TFDS image datasets
(mnist, fashion_mnist, cifar10, svhn_cropped, celeb_a), utkface, the user's
arrays (.npz or `from_arrays`) and synthetic clusters (tests and benchmarks).
Sources are imported on demand, so loading digits never imports TFDS.
"""
from __future__ import annotations

from fqjax.data.arrays import from_arrays
from fqjax.data.config import DATASET_NAMES, default_data_config, validate_data_config
from fqjax.data.imbalance import apply_imbalance
from fqjax.data.splits import DatasetInfo, Split, Splits, stratified_split

__all__ = ["load", "from_arrays", "default_data_config", "validate_data_config",
           "apply_imbalance", "stratified_split", "Split", "Splits", "DatasetInfo",
           "DATASET_NAMES"]


def load(config) -> Splits:
  """Loads the dataset named by config.data.name (or config.name for a data config).

  Returns Splits with x [N, ...] float32 normalized, y / group [N] int32 and
  index [N] int64 per split, deterministic given config.data.seed.
  """
  cfg = validate_data_config(config)
  if cfg.name == "digits":
    from fqjax.data.digits import load_digits
    return load_digits(cfg)
  if cfg.name == "synthetic":
    from fqjax.data.synthetic import load_synthetic
    return load_synthetic(cfg)
  if cfg.name == "arrays":
    from fqjax.data.arrays import load_npz
    return load_npz(cfg)
  if cfg.name == "utkface":
    from fqjax.data.utkface_source import load_utkface
    return load_utkface(cfg)
  from fqjax.data.tfds_sources import load_tfds  # validated: one of TFDS_NAMES
  return load_tfds(cfg)
