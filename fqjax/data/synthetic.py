"""Synthetic Gaussian class clusters with per-group noise and shift.

For tests and benchmarks only, never the default. Group g has group_sizes[g]
examples with labels balanced over num_classes. Class c has mean m_c; the means
are orthogonal with |m_a - m_b| = separation. Group g draws
  x = m_y + shift_g * v_g + noise_g * eps,   eps ~ N(0, I),
with v_g a random unit vector per group. Within one group the Bayes error for two
classes is Phi(-separation / (2 noise_g)): more noise makes a group harder, and a
shift moves it away from where a model fit to the other groups puts its boundary.
x has `shape` per example: (8, 8, 1) gives images, (D,) tabular features.
"""
from __future__ import annotations

from typing import Sequence, Tuple, Union

import numpy as np

from fqjax.data.assemble import assemble
from fqjax.data.splits import Splits
from fqjax.errors import InputError

PerGroup = Union[float, Sequence[float]]


def _per_group(value: PerGroup, num_groups: int, field: str) -> np.ndarray:
  arr = np.broadcast_to(np.asarray(value, np.float64), (num_groups,)) if np.ndim(value) == 0 \
      else np.asarray(value, np.float64)
  if arr.shape != (num_groups,):
    raise InputError(
        f"config.data.synthetic.{field} has {arr.size} values but there are {num_groups} "
        "groups (len(group_sizes)); give one value per group or a single number.")
  return arr


def make_synthetic(group_sizes: Sequence[int], num_classes: int = 2,
                   shape: Sequence[int] = (8, 8, 1), separation: float = 3.0,
                   noise: PerGroup = 1.0, shift: PerGroup = 0.0,
                   seed: int = 0) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Draws the data (see module doc).

  Returns:
    x: [N, *shape] float32, y: [N] int32 in [0, num_classes), group: [N] int32,
    with N = sum(group_sizes), rows ordered by group.
  """
  sizes = [int(n) for n in group_sizes]
  if not sizes or min(sizes) < 1:
    raise InputError(f"config.data.synthetic.group_sizes={tuple(group_sizes)} must be positive ints.")
  dim = int(np.prod(shape))
  if not 2 <= num_classes <= dim:
    raise InputError(
        f"config.data.synthetic.num_classes={num_classes} must be in [2, {dim}] "
        f"(the feature count of shape {tuple(shape)}).")
  noise_g = _per_group(noise, len(sizes), "noise")
  shift_g = _per_group(shift, len(sizes), "shift")
  if np.any(noise_g <= 0):
    raise InputError(f"config.data.synthetic.noise={noise} must be > 0 for every group.")
  rng = np.random.default_rng(seed)
  # Orthonormal rows scaled by separation / sqrt(2) are pairwise `separation` apart.
  q, _ = np.linalg.qr(rng.standard_normal((dim, num_classes)))
  means = q.T * (separation / np.sqrt(2.0))
  xs, ys, gs = [], [], []
  for g, n in enumerate(sizes):
    direction = rng.standard_normal(dim)
    direction /= np.linalg.norm(direction)
    y = rng.permutation(np.arange(n) % num_classes)
    x = means[y] + shift_g[g] * direction + noise_g[g] * rng.standard_normal((n, dim))
    xs.append(x)
    ys.append(y)
    gs.append(np.full(n, g))
  x = np.concatenate(xs).astype(np.float32).reshape((-1,) + tuple(int(d) for d in shape))
  return x, np.concatenate(ys).astype(np.int32), np.concatenate(gs).astype(np.int32)


def load_synthetic(cfg) -> Splits:
  """Synthetic Splits from a validated data config (config.data.synthetic, seed)."""
  s = cfg.synthetic
  x, y, group = make_synthetic(s.group_sizes, s.num_classes, s.shape, s.separation, s.noise,
                               s.shift, seed=cfg.seed)
  class_names = tuple(f"class {c}" for c in range(s.num_classes))
  group_attribute = cfg.get("group_attribute") or "group"
  if group_attribute == "label":
    group, group_names = y, class_names
  else:
    group_names = tuple(f"group {g}" for g in range(len(s.group_sizes)))
  index = np.arange(len(y), dtype=np.int64)
  return assemble(name="synthetic", pools={"all": (x, y, group, index)}, cfg=cfg, scale=1.0,
                  class_names=class_names, group_names=group_names, label_attribute="label",
                  group_attribute=group_attribute)
