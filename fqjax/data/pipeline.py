"""Input pipeline: epoch index plans, a jitted on-device gather, fixed-shape evaluation batches.

The datasets fqjax studies fit in memory (digits, CIFAR-10, UTKFace at 32 or 64
px): the arrays go to the device once (:class:`DeviceArrays`) and each step
gathers its batch there with one jitted ``take``; only the [B] int32 batch
indices cross from the host. The indices are a jit *argument*, never a
closed-over constant (XLA would constant-fold a captured array into every
compile). ``benchmarks/host_pipeline.py`` holds the host-side reader and
prefetch thread that ``benchmarks/input_pipeline.py`` measures against this path.

An epoch plan from :func:`epoch_batches` covers every sample exactly once; the
last uneven batch is padded and its padding carries mask 0, so losses and
metrics divide by the number of real samples (see
``fqjax.training.losses.weighted_cross_entropy(..., mask=...)``) and no sample is dropped.
:func:`padded_batches` cuts an array into fixed-shape chunks for evaluation, so
one compilation serves them all; it is the package's one padded-batch helper.
"""
from __future__ import annotations

import numbers
from typing import Any, Dict, Iterator, NamedTuple, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

Seed = Union[int, np.random.Generator, None]


class EpochBatches(NamedTuple):
  """The batches of one epoch.

  Attributes:
    idx: [num_batches, batch_size] int32 rows of the arrays, batch by batch.
    mask: [num_batches, batch_size] float32, 1 for real samples, 0 for padding
      (padding appears only in the last batch).
  """
  idx: np.ndarray
  mask: np.ndarray


def _positive_int(value, name: str) -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
    raise ValueError(f"{name} must be an int >= 1, got {value!r}.")
  return int(value)


def epoch_batches(indices_or_n, batch_size: int, seed: Seed = None, *, shuffle: bool = True,
                  drop_remainder: bool = False) -> EpochBatches:
  """Plans one epoch: shuffled rows cut into batches of ``batch_size``.

  Args:
    indices_or_n: an int N (rows 0..N-1) or a 1-D int array of rows, e.g.
      ``fqjax.training.sampling.sample_indices(...).indices`` (repeats allowed).
    batch_size: B.
    seed: int or np.random.Generator; required when ``shuffle``. Pass a
      different seed each epoch (e.g. ``config.seed * 1000 + epoch``) for a new order.
    shuffle: permute the rows; False keeps the given order (evaluation).
    drop_remainder: drop the last uneven batch instead of padding it. Only for
      callers that explicitly accept losing up to B - 1 samples per epoch.

  Returns:
    EpochBatches(idx [ceil(M / B), B] int32, mask [ceil(M / B), B] float32) for
    M rows (floor(M / B) batches with ``drop_remainder``). Padding slots repeat
    rows from the start of the epoch's order, so a batch is always made of real
    rows (sane BatchNorm statistics), but they carry mask 0.
  """
  batch_size = _positive_int(batch_size, "batch_size")
  if isinstance(indices_or_n, numbers.Integral) and not isinstance(indices_or_n, bool):
    rows = np.arange(_positive_int(indices_or_n, "the number of samples"), dtype=np.int64)
  else:
    rows = np.asarray(indices_or_n)
    if rows.ndim != 1 or not np.issubdtype(rows.dtype, np.integer):
      raise ValueError(
          f"indices_or_n must be an int or a 1-D int array of rows, got {rows.dtype} array of shape {rows.shape}.")
    if rows.size == 0:
      raise ValueError("indices_or_n is empty: an epoch needs at least one row.")
    if rows.min() < 0 or rows.max() > np.iinfo(np.int32).max:
      raise ValueError(f"rows must be in [0, 2^31), got min {rows.min()} and max {rows.max()}.")
  if shuffle:
    if seed is None:
      raise ValueError("shuffle=True needs a seed (an int or np.random.Generator); "
                       "pass one from the config, or shuffle=False for a fixed order.")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    rows = rows[rng.permutation(rows.size)]
  m = rows.size
  if drop_remainder:
    num_batches = m // batch_size
    if num_batches == 0:
      raise ValueError(
          f"drop_remainder=True with {m} rows and batch_size={batch_size} leaves no batch; "
          "use drop_remainder=False (the last batch is padded and masked) or a smaller batch_size.")
    idx = rows[:num_batches * batch_size]
    mask = np.ones(idx.size, np.float32)
  else:
    num_batches = -(-m // batch_size)
    pad = num_batches * batch_size - m
    idx = np.concatenate([rows, np.resize(rows, pad)])
    mask = np.concatenate([np.ones(m, np.float32), np.zeros(pad, np.float32)])
  return EpochBatches(idx=idx.astype(np.int32).reshape(num_batches, batch_size),
                      mask=mask.reshape(num_batches, batch_size))


def padded_batches(x: np.ndarray, batch_size: int, multiple: int = 1) -> Iterator[Tuple[np.ndarray, int]]:
  """Fixed-shape chunks of ``x`` for evaluation: one compilation serves every chunk.

  Args:
    x: [N, ...] array of any dtype (e.g. [N, H, W, C] float32 images); N = 0 yields nothing.
    batch_size: the wanted chunk size.
    multiple: B is rounded up to a multiple of this (the data-parallel device count).

  Yields:
    (chunk [B, ...] with x's dtype, real: int), B = min(batch_size, N) rounded up to ``multiple``.
    The first ``real`` rows are x's; the last chunk is padded by repeating its first row, and the
    caller drops the ``B - real`` padded rows of the output.
  """
  n = len(x)
  if n == 0:
    return
  batch_size = -(-min(batch_size, n) // multiple) * multiple
  for start in range(0, n, batch_size):
    chunk = np.asarray(x[start:start + batch_size])
    real = len(chunk)
    if real < batch_size:
      chunk = np.concatenate([chunk, np.repeat(chunk[:1], batch_size - real, axis=0)])
    yield chunk, real


@jax.jit
def _gather(arrays: Dict[str, jax.Array], idx: jax.Array, passthrough: Dict[str, jax.Array]):
  # passthrough (the mask) rides along so that a batch costs one dispatch and one transfer.
  batch = {name: jnp.take(a, idx, axis=0) for name, a in arrays.items()}
  batch.update(passthrough)
  return batch


class DeviceArrays:
  """Aligned arrays put on the device once, gathered into batches by a jitted take.

  Example:
    data = DeviceArrays(train.x, train.y, train.group)
    plan = epoch_batches(len(data), 128, seed=epoch)
    for idx, mask in zip(*plan):
      batch = data.gather(idx, mask)   # {'x': [B, ...], 'y': [B], 'group': [B], 'mask': [B]}
  """

  def __init__(self, x, y, group=None, *, sharding: Any = None, **extra):
    """Puts the arrays on the device.

    Args:
      x: [N, ...] inputs (e.g. [N, H, W, C] float32).
      y: [N] int32 labels.
      group: [N] int32 group ids, or None.
      sharding: optional ``jax.sharding.Sharding`` or device for ``jax.device_put``
        (fqjax.training.parallel decides it); None means the default device.
      **extra: more [N, ...] arrays to carry along (e.g. per-sample weights).
    """
    arrays = {"x": x, "y": y}
    if group is not None:
      arrays["group"] = group
    arrays.update(extra)
    n = len(x)
    if n == 0:
      raise ValueError("DeviceArrays got x with 0 rows; the split is empty.")
    for name, a in arrays.items():
      if np.ndim(a) == 0 or len(a) != n:
        raise ValueError(
            f"all arrays must have the same number of rows as x ({n}); {name!r} has shape {np.shape(a)}.")
    self.num_rows = n
    self.arrays = {name: jax.device_put(a, sharding) for name, a in arrays.items()}

  def __len__(self) -> int:
    return self.num_rows

  def gather(self, idx, mask=None) -> Dict[str, jax.Array]:
    """The rows ``idx`` of every array, gathered on the device.

    Args:
      idx: [B] (or any shape) int rows in [0, N); a NumPy array from
        epoch_batches is checked against N on the host.
      mask: optional [B] float32, passed through as batch['mask'].

    Returns:
      {name: [B, ...]} with keys x, y, (group), extras, (mask).
    """
    if isinstance(idx, np.ndarray) and idx.size:
      if not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"idx must hold integer rows, got dtype {idx.dtype}.")
      lo, hi = idx.min(), idx.max()
      if lo < 0 or hi >= self.num_rows:
        raise ValueError(f"idx must be in [0, {self.num_rows}), got min {lo} and max {hi}.")
    passthrough = {} if mask is None else {"mask": jnp.asarray(mask, jnp.float32)}
    return _gather(self.arrays, idx, passthrough)
