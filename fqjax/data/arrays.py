"""The user's own data: NumPy arrays in Python or an .npz file.

Arrays per split: x [N, H, W, C] images or [N, D] features (uint8 images are
scaled by 1/255, other dtypes used as given, then normalized as configured),
y [N] int labels >= 0, group [N] int group ids >= 0 (optional: group = label).
An .npz (config.data.path) holds either x, y[, group] (train / val / test are
carved, stratified by group) or x_train, y_train[, group_train] with x_test, ...
and optionally x_val, ... (used as given; val is carved from train if absent),
plus optional class_names / group_names string arrays.
"""
from __future__ import annotations

import copy
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from fqjax.data.assemble import assemble
from fqjax.data.config import data_section, default_data_config, validate_data_config
from fqjax.data.splits import Splits

Triple = Tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]
_SPLIT_KEYS = ("x", "y", "group")
NPZ_KEYS = (("x", "y", "group", "class_names", "group_names")
            + tuple(f"{k}_{s}" for s in ("train", "val", "test") for k in _SPLIT_KEYS))


def _check_x(x, name: str) -> np.ndarray:
  x = np.asarray(x)
  if x.dtype == object or not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
    raise ValueError(f"{name} has dtype {x.dtype}; it must be numeric. Convert it with "
                     f"{name}.astype(np.float32).")
  if x.ndim == 3:
    raise ValueError(f"{name} has shape {x.shape} (3 axes); images must be NHWC. Add the "
                     f"channel axis: {name}[..., None].")
  if x.ndim not in (2, 4):
    raise ValueError(f"{name} has shape {x.shape}; expected [N, D] features or [N, H, W, C] "
                     f"images (for one feature use {name}.reshape(-1, 1)).")
  if len(x) == 0:
    raise ValueError(f"{name} is empty; every given split needs at least one example.")
  if np.issubdtype(x.dtype, np.floating):
    bad = ~np.isfinite(x)
    if bad.any():
      row = int(np.argwhere(bad)[0][0])
      raise ValueError(f"{name} has {int(bad.sum())} NaN/inf values (first in row {row}); "
                       "drop or impute those rows before loading.")
  return x


def _check_ints(values, name: str, n: int, limit: Optional[int], limit_source: str) -> np.ndarray:
  values = np.asarray(values)
  if values.ndim != 1:
    raise ValueError(f"{name} has shape {values.shape}; it must be 1-D [N] (one int per "
                     f"example; for one-hot use {name}.argmax(-1)).")
  if len(values) != n:
    raise ValueError(f"{name} has {len(values)} entries but x has {n} rows; they must match.")
  if values.dtype == bool:
    values = values.astype(np.int32)
  if not np.issubdtype(values.dtype, np.integer):
    raise ValueError(f"{name} has dtype {values.dtype}; it must hold integers. If the values "
                     f"are whole numbers, convert with {name}.astype(np.int64).")
  if values.min() < 0:
    raise ValueError(f"{name} has negative values (min {values.min()}); ids must be "
                     f"0..K-1. Remap with np.unique({name}, return_inverse=True)[1].")
  if limit is not None and values.max() >= limit:
    raise ValueError(f"{name} has value {values.max()} but {limit_source} has only {limit} "
                     f"entries (ids 0..{limit - 1}); add names or remap the ids.")
  return values.astype(np.int32)


def _names(names, name: str) -> Optional[Tuple[str, ...]]:
  if names is None:
    return None
  names = tuple(str(v) for v in np.asarray(names).reshape(-1))
  if not names:
    raise ValueError(f"{name} is empty; give one name per id or leave it out.")
  return names


def from_arrays(x, y, group=None, *, val: Optional[Triple] = None,
                test: Optional[Triple] = None, class_names: Optional[Sequence[str]] = None,
                group_names: Optional[Sequence[str]] = None, config=None,
                name: str = "arrays") -> Splits:
  """Splits from in-memory arrays (see module doc for shapes and dtypes).

  Args:
    x, y, group: the training pool, or the whole dataset when `test` is None.
      group None means group = y.
    val, test: optional predefined splits as (x, y, group) triples; val needs test.
    class_names, group_names: optional names; else ids 0..max are used.
    config: data config (fields seed, val_fraction, test_fraction, normalize,
      imbalance, group_attribute, max_gib); None = default_data_config().
  Returns:
    Splits whose `index` rows point into the given arrays of each split.
  """
  cfg = copy.deepcopy(data_section(config)) if config is not None else default_data_config()
  cfg.name = "arrays"
  validate_data_config(cfg, check_path=False)
  if val is not None and test is None:
    raise ValueError("A val split was given without a test split; pass test=(x, y, group) "
                     "too, or leave val out to carve it from the training arrays.")
  class_names, group_names = _names(class_names, "class_names"), _names(group_names, "group_names")
  group_from_label = group is None or cfg.get("group_attribute") == "label"
  raw = {"train": (x, y, group), "val": val, "test": test}
  suffix = {"train": "" if test is None else "_train", "val": "_val", "test": "_test"}
  checked: Dict[str, Tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
  for split, triple in raw.items():
    if triple is None:
      continue
    if len(triple) != 3:
      raise ValueError(f"{split} must be an (x, y, group) triple; group may be None.")
    sx, sy, sg = triple
    xs = _check_x(sx, "x" + suffix[split])
    ys = _check_ints(sy, "y" + suffix[split], len(xs),
                     len(class_names) if class_names else None, "class_names")
    if group_from_label:
      gs = ys
    elif sg is None:
      raise ValueError(f"group{suffix[split]} is missing but group{suffix['train']} was given; "
                       "give a group array for every split.")
    else:
      gs = _check_ints(sg, "group" + suffix[split], len(xs),
                       len(group_names) if group_names else None, "group_names")
    checked[split] = (xs, ys, gs)
  first = checked["train"][0]
  for split, (xs, _, _) in checked.items():
    if xs.shape[1:] != first.shape[1:] or (xs.dtype == np.uint8) != (first.dtype == np.uint8):
      raise ValueError(f"x{suffix[split]} has shape {xs.shape} and dtype {xs.dtype}, but the "
                       f"training x has {first.shape} / {first.dtype}; per-example shapes and "
                       "uint8-ness must match across splits.")
  num_classes = len(class_names) if class_names else 1 + max(int(t[1].max()) for t in checked.values())
  class_names = class_names or tuple(str(c) for c in range(num_classes))
  if group_from_label:
    group_names = class_names
  else:
    num_groups = len(group_names) if group_names else 1 + max(int(t[2].max()) for t in checked.values())
    group_names = group_names or tuple(str(g) for g in range(num_groups))
  pools = {"all" if test is None else split: (xs, ys, gs, np.arange(len(ys), dtype=np.int64))
           for split, (xs, ys, gs) in checked.items()}
  return assemble(name=name, pools=pools, cfg=cfg, scale=255.0 if first.dtype == np.uint8 else 1.0,
                  class_names=class_names, group_names=group_names, label_attribute="label",
                  group_attribute="label" if group_from_label else "group")


def load_npz(cfg) -> Splits:
  """Splits from the .npz file at config.data.path (keys in NPZ_KEYS)."""
  path = cfg.path
  try:
    npz = np.load(path, allow_pickle=False)
  except FileNotFoundError:
    raise FileNotFoundError(f"config.data.path={path!r} does not exist; save your arrays with "
                            "np.savez(path, x=..., y=..., group=...).") from None
  with npz:
    data = {k: npz[k] for k in npz.files}
  unknown = sorted(set(data) - set(NPZ_KEYS))
  if unknown:
    raise ValueError(f"{path} has unknown keys {unknown}; allowed keys: {', '.join(NPZ_KEYS)}.")
  names = dict(class_names=data.get("class_names"), group_names=data.get("group_names"))
  if "x_train" in data or "x_test" in data:
    for key in ("x_train", "y_train", "x_test", "y_test"):
      if key not in data:
        raise ValueError(f"{path} has predefined splits but no {key!r}; give x_train, y_train, "
                         "x_test, y_test (and group_*), or plain x, y, group.")
    split = lambda s: (data[f"x_{s}"], data[f"y_{s}"], data.get(f"group_{s}"))
    val = split("val") if "x_val" in data else None
    return from_arrays(*split("train"), val=val, test=split("test"), config=cfg, **names)
  for key in ("x", "y"):
    if key not in data:
      raise ValueError(f"{path} has no {key!r} array; it needs x and y (and group), or "
                       "x_train / y_train / x_test / y_test.")
  return from_arrays(data["x"], data["y"], data.get("group"), config=cfg, **names)
