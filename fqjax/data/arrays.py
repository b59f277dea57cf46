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
import logging
import os
import zipfile
import zlib
from typing import Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

from fqjax.data.assemble import assemble
from fqjax.data.options import data_section, default_data_config, validate_data_config
from fqjax.data.splits import Splits
from fqjax.errors import CorruptFileError, InputError, MissingFileError

log = logging.getLogger("fqjax")

Triple = Tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]
_SPLIT_KEYS = ("x", "y", "group")
NPZ_KEYS = (("x", "y", "group", "class_names", "group_names")
            + tuple(f"{k}_{s}" for s in ("train", "val", "test") for k in _SPLIT_KEYS))


def _check_x(x, name: str) -> np.ndarray:
  x = np.asarray(x)
  if x.dtype == object or not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
    raise InputError(f"{name} has dtype {x.dtype}; it must be numeric. Convert it with "
                     f"{name}.astype(np.float32).")
  if np.issubdtype(x.dtype, np.complexfloating):
    raise InputError(f"{name} has complex dtype {x.dtype}; fqjax needs real inputs (casting would drop the "
                     f"imaginary part). Use np.abs({name}), or stack {name}.real and {name}.imag as features or "
                     "channels.")
  if x.ndim == 3:
    raise InputError(f"{name} has shape {x.shape} (3 axes); images must be NHWC. Add the "
                     f"channel axis: {name}[..., None].")
  if x.ndim not in (2, 4):
    raise InputError(f"{name} has shape {x.shape}; expected [N, D] features or [N, H, W, C] "
                     f"images (for one feature use {name}.reshape(-1, 1)).")
  if len(x) == 0:
    raise InputError(f"{name} is empty; every given split needs at least one example.")
  if np.issubdtype(x.dtype, np.floating):
    bad = ~np.isfinite(x)
    if bad.any():
      row = int(np.argwhere(bad)[0][0])
      raise InputError(f"{name} has {int(bad.sum())} NaN/inf values (first in row {row}); "
                       "drop or impute those rows before loading.")
  return x


def _check_ints(values, name: str, n: int, limit: Optional[int], limit_source: str) -> np.ndarray:
  values = np.asarray(values)
  if values.ndim != 1:
    raise InputError(f"{name} has shape {values.shape}; it must be 1-D [N] (one int per "
                     f"example; for one-hot use {name}.argmax(-1)).")
  if len(values) != n:
    raise InputError(f"{name} has {len(values)} entries but x has {n} rows; they must match.")
  if values.dtype == bool:
    values = values.astype(np.int64)
  if not np.issubdtype(values.dtype, np.integer):
    raise InputError(f"{name} has dtype {values.dtype}; it must hold integers. If the values "
                     f"are whole numbers, convert with {name}.astype(np.int64).")
  if values.min() < 0:
    raise InputError(f"{name} has negative values (min {values.min()}); ids must be "
                     f"0..K-1. Remap with np.unique({name}, return_inverse=True)[1].")
  if values.max() > np.iinfo(np.int64).max:  # uint64 beyond int64: never cast it (it would wrap)
    raise InputError(f"{name} has value {values.max()}, beyond int64; ids must be 0..K-1. Remap with "
                     f"np.unique({name}, return_inverse=True)[1].")
  if limit is not None and values.max() >= limit:
    raise InputError(f"{name} has value {values.max()} but {limit_source} has only {limit} "
                     f"entries (ids 0..{limit - 1}); add names or remap the ids.")
  # int64 until the ids are checked to be 0..K-1 (or remapped): an early int32 cast would wrap 2^32 + 1 to 1.
  return values.astype(np.int64)


def _names(names, name: str) -> Optional[Tuple[str, ...]]:
  if names is None:
    return None
  names = tuple(str(v) for v in np.asarray(names).reshape(-1))
  if not names:
    raise InputError(f"{name} is empty; give one name per id or leave it out.")
  return names


def _distinct(checked, column: int) -> np.ndarray:
  return np.unique(np.concatenate([t[column] for t in checked.values()]))


def _check_ids(checked, column: int, names, what: str, option: str) -> None:
  """Ids must be 0..K-1 with none unused, so every class (output unit) or group has examples."""
  values = _distinct(checked, column)  # sorted, distinct, in [0, count)
  count = len(names) if names else int(values.max()) + 1
  if values.size < count:  # some id unused; found from the gaps, never by listing 0..count-1 (count may be 10^9)
    unused = _first_unused(values, 10)
    shown = ", ".join(str(v) for v in values[:20]) + (", ..." if values.size > 20 else "")
    key = "y" if what == "label" else "group"
    more = count - values.size - len(unused)
    raise InputError(
        f"{key} holds {values.size} distinct {what}s ({shown}), but {what}s must be ids 0..K-1 with every id "
        f"used: K would be {count} and ids {_few(unused)}{f' and {more} more' if more > 0 else ''} have no "
        f"example. Remap them with "
        f"np.unique({key}, return_inverse=True)[1], or set config.data.{option}=True "
        f"(--config.data.{option}=True) to map the sorted distinct values to 0..K-1.")


def _first_unused(values: np.ndarray, limit: int) -> list[int]:
  """The first ``limit`` ids in 0..max(values) missing from the sorted distinct ``values``."""
  out, expected = [], 0
  for v in values.tolist():
    while expected < v and len(out) < limit:
      out.append(expected)
      expected += 1
    if len(out) >= limit:
      break
    expected = v + 1
  return out


def _remap_ids(checked, column: int, names):
  """Maps the sorted distinct ids of `column` to 0..K-1; names become the original values (or their names)."""
  values = _distinct(checked, column)
  new_names = tuple(names[v] if names else str(v) for v in values)
  out = {}
  for split, triple in checked.items():
    triple = list(triple)
    triple[column] = np.searchsorted(values, triple[column]).astype(np.int32)
    out[split] = tuple(triple)
  return out, new_names


def _few(ids) -> str:
  ids = [int(i) for i in ids]
  return ", ".join(map(str, ids[:10])) + (f" and {len(ids) - 10} more" if len(ids) > 10 else "")


def _check_split(split: str, triple, suffix: Mapping[str, str], class_names, group_names,
                 group_from_label: bool) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """One split's (x, y, group), each checked (group = y when the label is the group)."""
  if len(triple) != 3:
    raise InputError(f"{split} must be an (x, y, group) triple; group may be None.")
  sx, sy, sg = triple
  xs = _check_x(sx, "x" + suffix[split])
  ys = _check_ints(sy, "y" + suffix[split], len(xs), len(class_names) if class_names else None, "class_names")
  if group_from_label:
    return xs, ys, ys
  if sg is None:
    raise InputError(f"group{suffix[split]} is missing but group{suffix['train']} was given; "
                     "give a group array for every split.")
  gs = _check_ints(sg, "group" + suffix[split], len(xs), len(group_names) if group_names else None, "group_names")
  return xs, ys, gs


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
    raise InputError("A val split was given without a test split; pass test=(x, y, group) "
                     "too, or leave val out to carve it from the training arrays.")
  class_names, group_names = _names(class_names, "class_names"), _names(group_names, "group_names")
  group_from_label = group is None or cfg.get("group_attribute") == "label"
  if group is None and cfg.get("group_attribute") != "label":
    log.warning("%s: no group array given, so each example's group is its label (group_attribute='label'); "
                "give group=... (an .npz key 'group') to study other groups.", name)
  raw = {"train": (x, y, group), "val": val, "test": test}
  suffix = {"train": "" if test is None else "_train", "val": "_val", "test": "_test"}
  checked = {split: _check_split(split, triple, suffix, class_names, group_names, group_from_label)
             for split, triple in raw.items() if triple is not None}
  first = checked["train"][0]
  for split, (xs, _, _) in checked.items():
    if xs.shape[1:] != first.shape[1:] or (xs.dtype == np.uint8) != (first.dtype == np.uint8):
      raise InputError(f"x{suffix[split]} has shape {xs.shape} and dtype {xs.dtype}, but the "
                       f"training x has {first.shape} / {first.dtype}; per-example shapes and "
                       "uint8-ness must match across splits.")
  if cfg.get("remap_labels", False):
    checked, class_names = _remap_ids(checked, 1, class_names)
  else:
    _check_ids(checked, 1, class_names, "label", "remap_labels")
  if group_from_label:
    checked = {split: (xs, ys, ys) for split, (xs, ys, _) in checked.items()}
  elif cfg.get("remap_groups", False):
    checked, group_names = _remap_ids(checked, 2, group_names)
  else:
    _check_ids(checked, 2, group_names, "group", "remap_groups")
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


def _read_npz(path: str) -> Dict[str, np.ndarray]:
  """All arrays of the .npz at `path`; a missing, non-.npz or damaged file raises an fqjax error naming it."""
  if not os.path.exists(path):
    raise MissingFileError(f"config.data.path={path!r} does not exist; save your arrays with "
                           "np.savez(path, x=..., y=..., group=...).")
  if os.path.isdir(path):
    raise InputError(f"config.data.path={path!r} is a folder; give the path of an .npz file.")
  if not os.path.isfile(path):  # a device, FIFO or socket: reading it could block forever
    raise InputError(f"config.data.path={path!r} is not a regular file; give the path of an .npz file.")
  recovery = "Write it again with np.savez(path, x=..., y=..., group=...) (no object arrays)."
  if not zipfile.is_zipfile(path):
    with open(path, "rb") as f:
      head = f.read(8)
    if head.startswith(b"PK"):
      what = "a truncated or damaged .npz (zip) archive"
    elif head.startswith(b"\x93NUMPY"):
      what = "a single-array .npy file, not an .npz archive"
    else:
      what = "not an .npz (zip) archive" if head else "empty"
    raise CorruptFileError(path, f"config.data.path is {what} (it starts with {head!r})", recovery)
  try:
    with np.load(path, allow_pickle=False) as npz:
      return {k: npz[k] for k in npz.files}
  except ValueError as e:
    if "allow_pickle" in str(e):  # numpy would advise loading it unsafely: never do that
      raise CorruptFileError(path, "an array in it holds Python objects (pickled data), which fqjax does not "
                             "load", "Save plain numeric arrays, e.g. x.astype(np.float32).") from e
    raise CorruptFileError(path, f"an array in it is damaged ({e})", recovery) from e
  except (zipfile.BadZipFile, zlib.error, EOFError, OSError, KeyError) as e:
    raise CorruptFileError(path, "the archive is truncated or damaged", recovery) from e


def load_npz(cfg) -> Splits:
  """Splits from the .npz file at config.data.path (keys in NPZ_KEYS)."""
  path = cfg.path
  data = _read_npz(path)
  unknown = sorted(set(data) - set(NPZ_KEYS))
  if unknown:
    raise InputError(f"{path} has unknown keys {unknown}; allowed keys: {', '.join(NPZ_KEYS)}.")
  names = dict(class_names=data.get("class_names"), group_names=data.get("group_names"))
  if "x_train" in data or "x_test" in data:
    for key in ("x_train", "y_train", "x_test", "y_test"):
      if key not in data:
        raise InputError(f"{path} has predefined splits but no {key!r}; give x_train, y_train, "
                         "x_test, y_test (and group_*), or plain x, y, group.")
    split = lambda s: (data[f"x_{s}"], data[f"y_{s}"], data.get(f"group_{s}"))
    val = split("val") if "x_val" in data else None
    return from_arrays(*split("train"), val=val, test=split("test"), config=cfg, **names)
  for key in ("x", "y"):
    if key not in data:
      raise InputError(f"{path} has no {key!r} array; it needs x and y (and group), or "
                       "x_train / y_train / x_test / y_test.")
  return from_arrays(data["x"], data["y"], data.get("group"), config=cfg, **names)
