"""The tail every source shares: carve splits, imbalance train, normalize, describe.

A source hands `assemble` one or more pools of raw examples:
  {'all': pool}               -> train / val / test carved by group (val_fraction,
                                 test_fraction of the whole);
  {'train': p, 'test': p}     -> val carved from train (val_fraction of train);
  {'train', 'val', 'test'}    -> used as given.
Each pool is (x_raw, y, group, index): x_raw [N, ...] uint8 or float, y / group
[N] int, index [N] int row in the source split.
"""
from __future__ import annotations

from typing import Dict, Mapping, Sequence, Tuple

import numpy as np

from fqjax.data.imbalance import apply_imbalance
from fqjax.data.splits import DatasetInfo, Split, Splits, group_count_dict, stratified_split
from fqjax.errors import InputError

Pool = Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
_STD_FLOOR = 1e-6


def check_memory(num_rows: int, example_shape: Sequence[int], max_gib: float, name: str) -> None:
  """Raises MemoryError-style ValueError if float32 arrays would exceed max_gib."""
  gib = num_rows * int(np.prod(example_shape)) * 4 / 2**30
  if gib > max_gib:
    raise InputError(
        f"{name}: {num_rows} examples of shape {tuple(example_shape)} need {gib:.1f} GiB as "
        f"float32, over config.data.max_gib={max_gib}. Set config.data.image_size (e.g. 64) "
        "and/or config.data.max_examples to bound memory, or raise config.data.max_gib.")


def _carve(pools: Mapping[str, Pool], cfg) -> Dict[str, Split]:
  def split_of(pool: Pool, rows=None) -> Split:
    x, y, g, index = pool
    if rows is None:
      rows = np.arange(len(y))
    return Split(x=x[rows], y=np.asarray(y, np.int32)[rows], group=np.asarray(g, np.int32)[rows],
                 index=np.asarray(index, np.int64)[rows])

  if set(pools) == {"all"}:
    pool = pools["all"]
    train, val, test = stratified_split(
        pool[2], pool[1], (cfg.val_fraction, cfg.test_fraction), cfg.seed)
    return {"train": split_of(pool, train), "val": split_of(pool, val),
            "test": split_of(pool, test)}
  if set(pools) == {"train", "test"}:
    pool = pools["train"]
    train, val = stratified_split(pool[2], pool[1], (cfg.val_fraction,), cfg.seed)
    return {"train": split_of(pool, train), "val": split_of(pool, val),
            "test": split_of(pools["test"])}
  if set(pools) == {"train", "val", "test"}:
    return {name: split_of(pools[name]) for name in ("train", "val", "test")}
  raise InputError(f"Pools must be all | train+test | train+val+test, got {sorted(pools)}.")


def check_split_sizes(splits: Mapping[str, Split], class_names: Sequence[str],
                      group_names: Sequence[str]) -> None:
  """Refuses splits a study cannot use, before any training.

  Needed: every split (train, val, test) holds at least one row, and every group and
  every class at least one training row. A group may have no val or test rows; its
  metrics are then reported as empty (count 0).
  """
  num_classes, num_groups = len(class_names), len(group_names)
  counts = {name: np.bincount(split.group, minlength=num_groups) for name, split in splits.items()}
  problems = [f"{name} has 0 rows" for name in ("train", "val", "test") if len(splits[name]) == 0]
  no_train = [group_names[g] for g in range(num_groups) if counts["train"][g] == 0]
  if no_train:
    problems.append(f"group(s) {', '.join(map(repr, no_train[:10]))} have no training rows")
  class_counts = np.bincount(splits["train"].y, minlength=num_classes)
  missing = [class_names[c] for c in range(num_classes) if class_counts[c] == 0]
  if missing:
    problems.append(f"class(es) {', '.join(map(repr, missing[:10]))} have no training rows")
  if not problems:
    return
  table = "; ".join(f"{group_names[g]!r} {counts['train'][g]}/{counts['val'][g]}/{counts['test'][g]}"
                    for g in range(min(num_groups, 20)))
  raise InputError(
      f"The data are too small to split into train / val / test: {'; '.join(problems)}. Rows per group "
      f"(train/val/test): {table}{'; ...' if num_groups > 20 else ''}. Needed: at least 1 row in each split "
      "and at least 1 training row for every group and every class. Give more rows per group, or change "
      "config.data.val_fraction / test_fraction (or config.data.imbalance, which removes training rows).")


def normalize_splits(splits: Mapping[str, Split], kind: str,
                     scale: float) -> Tuple[Dict[str, Split], dict]:
  """Scales x to float32 x / scale, then (kind='standardize') standardizes with train stats.

  Images ([N, H, W, C]) get one mean / std per channel, tabular data ([N, D]) one
  per feature; a std below 1e-6 (a constant channel) is replaced by 1.
  """
  scaled = {name: s.x.astype(np.float32) / np.float32(scale) for name, s in splits.items()}
  meta = {"kind": kind, "scale": float(scale)}
  if kind == "standardize":
    x = scaled["train"]
    axes = tuple(range(x.ndim - 1)) if x.ndim == 4 else (0,)
    mean = x.mean(axis=axes, dtype=np.float64)
    std = x.std(axis=axes, dtype=np.float64)
    std = np.where(std < _STD_FLOOR, 1.0, std)
    scaled = {name: ((v - mean) / std).astype(np.float32) for name, v in scaled.items()}
    meta.update(mean=mean.tolist(), std=std.tolist())
  elif kind != "unit":
    raise InputError(f"config.data.normalize={kind!r}; allowed: 'standardize', 'unit'.")
  out = {name: Split(x=scaled[name], y=s.y, group=s.group, index=s.index)
         for name, s in splits.items()}
  return out, meta


def assemble(*, name: str, pools: Mapping[str, Pool], cfg, scale: float,
             class_names: Sequence[str], group_names: Sequence[str], label_attribute: str,
             group_attribute: str) -> Splits:
  """Builds `Splits` from raw pools (see module doc) and the data config `cfg`."""
  num_classes, num_groups = len(class_names), len(group_names)
  splits = _carve(pools, cfg)
  train, imbalance_meta = apply_imbalance(
      splits["train"], cfg.get("imbalance"), group_names, seed=cfg.seed + 1)
  splits["train"] = train
  check_split_sizes(splits, class_names, group_names)
  if num_classes < 2:
    raise InputError(f"{name}: the labels hold {num_classes} class ({', '.join(map(str, class_names))}); a "
                     "classifier needs at least two. Check the label array (or config.data's label attribute).")
  shape = splits["train"].x.shape[1:]
  check_memory(sum(len(s) for s in splits.values()), shape, cfg.get("max_gib", 8.0), name)
  splits, norm_meta = normalize_splits(splits, cfg.normalize, scale)
  if pools.keys() == {"all"}:
    sources = {k: "all" for k in splits}
  else:
    sources = {"train": "train", "val": "val" if "val" in pools else "train", "test": "test"}
  info = DatasetInfo(
      name=name, num_classes=num_classes, class_names=tuple(str(c) for c in class_names),
      num_groups=num_groups, group_names=tuple(str(g) for g in group_names),
      group_attribute=group_attribute, label_attribute=label_attribute,
      group_is_label=group_attribute == label_attribute, input_shape=tuple(int(d) for d in shape),
      counts=group_count_dict(splits, num_groups), normalization=norm_meta,
      imbalance=imbalance_meta, source_splits=sources)
  return Splits(train=splits["train"], val=splits["val"], test=splits["test"], info=info)
