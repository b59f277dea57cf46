"""Input pipeline: epoch index plans, a jitted on-device gather, and a prefetcher.

For datasets that fit in memory (digits, CIFAR-10, UTKFace at 32 or 64 px) the
arrays go to the device once (:class:`DeviceArrays`) and each step gathers its
batch there with one jitted ``take``; only the [B] int32 batch indices cross
from the host. The indices are a jit *argument*, never a closed-over constant
(XLA would constant-fold a captured array into every compile).

For random-access host sources too large for memory (a ``tfds.data_source``, a
grain source) :func:`source_batches` reads the same index plan record by record
and :func:`prefetch` overlaps that reading with the training step in a
background thread.

An epoch plan from :func:`epoch_batches` covers every sample exactly once; the
last uneven batch is padded and its padding carries mask 0, so losses and
metrics divide by the number of real samples (see
``fqjax.losses.weighted_cross_entropy(..., mask=...)``) and no sample is dropped.
"""
from __future__ import annotations

import numbers
import queue
import threading
from typing import Any, Callable, Dict, Iterable, Iterator, NamedTuple, Optional, Sequence, Union

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
      ``fqjax.sampling.sample_indices(...).indices`` (repeats allowed).
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


def padded_batches(x: np.ndarray, batch_size: int, multiple: int = 1):
  """Yields (chunk [B, ...], real) over ``x`` [N, ...] with B fixed: the last chunk is padded by repeating
  its first row (the ``B - real`` padded rows are dropped by the caller), so one compilation serves all.
  B is min(batch_size, N) rounded up to ``multiple`` (the data-parallel device count)."""
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
      y: [N] int labels.
      group: [N] int group ids, or None.
      sharding: optional ``jax.sharding.Sharding`` or device for ``jax.device_put``
        (fqjax.parallel decides it); None means the default device.
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

  @classmethod
  def from_split(cls, split, *, sharding: Any = None) -> "DeviceArrays":
    """From any object with x, y, group attributes (e.g. fqjax.data.splits.Split)."""
    return cls(split.x, split.y, split.group, sharding=sharding)

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

  def batches(self, plan: EpochBatches) -> Iterator[Dict[str, jax.Array]]:
    """Yields ``gather(idx, mask)`` for each batch of an epoch plan."""
    for idx, mask in zip(plan.idx, plan.mask):
      yield self.gather(idx, mask)


def source_batches(source: Sequence[Dict[str, Any]], plan: EpochBatches,
                   keys: Optional[Sequence[str]] = None) -> Iterator[Dict[str, np.ndarray]]:
  """Reads an epoch plan from a random-access host source, batch by batch.

  Args:
    source: indexable by row, each record a dict of arrays or scalars (a
      ``tfds.data_source`` split, a grain source, a list of dicts). A
      ``__getitems__`` method (batched read) is used when present.
    plan: from epoch_batches.
    keys: which fields to stack; default all fields of the first record.

  Yields:
    {key: [B, ...] np.ndarray stacked from the records, 'mask': [B] float32}.
    Wrap in prefetch() so the reads overlap the training step.
  """
  batched = getattr(source, "__getitems__", None)
  for idx, mask in zip(plan.idx, plan.mask):
    rows = idx.tolist()
    records = batched(rows) if batched is not None else [source[i] for i in rows]
    fields = keys if keys is not None else list(records[0])
    batch = {k: np.stack([np.asarray(r[k]) for r in records]) for k in fields}
    batch["mask"] = mask
    yield batch


_DONE = object()


class _Raised:
  def __init__(self, error: BaseException):
    self.error = error


def _put(buffer: queue.Queue, stop: threading.Event, item) -> bool:
  # Time-out so that a consumer that stopped early never leaves the thread blocked forever.
  while not stop.is_set():
    try:
      buffer.put(item, timeout=0.05)
      return True
    except queue.Full:
      continue
  return False


def _produce(iterator, transform, buffer: queue.Queue, stop: threading.Event) -> None:
  try:
    for item in iterator:
      if stop.is_set():
        return
      if transform is not None:
        item = transform(item)
      if not _put(buffer, stop, item):
        return
  except BaseException as error:  # handed to the consumer and re-raised there
    _put(buffer, stop, _Raised(error))
    return
  _put(buffer, stop, _DONE)


class Prefetcher:
  """Runs ``iterator`` (and ``transform``) in a background thread, ``size`` items ahead.

  The thread starts at once, so the first batches load while the first step compiles.

  Args:
    iterator: any iterable of batches (e.g. source_batches(...)).
    size: how many items to hold ready (>= 1).
    transform: optional function applied in the thread, e.g. ``jax.device_put``
      so that the host-to-device copy also overlaps the step.

  Iterating yields the items in order. An exception raised by the iterator or
  by ``transform`` is re-raised at that position. ``close()`` (also on leaving a
  ``with`` block or on garbage collection) stops the thread.
  """

  def __init__(self, iterator: Iterable, size: int = 2,
               transform: Optional[Callable[[Any], Any]] = None):
    size = _positive_int(size, "size")
    self._buffer: queue.Queue = queue.Queue(maxsize=size)
    self._stop = threading.Event()
    self._finished = False
    # The thread gets the queue and the event, not self, so that a dropped Prefetcher
    # can be garbage-collected and its __del__ stops the thread.
    self._thread = threading.Thread(
        target=_produce, args=(iter(iterator), transform, self._buffer, self._stop),
        name="fqjax-prefetch", daemon=True)
    self._thread.start()

  def __iter__(self):
    return self

  def __next__(self):
    if self._finished:
      raise StopIteration
    item = self._buffer.get()
    if item is _DONE:
      self.close()
      raise StopIteration
    if isinstance(item, _Raised):
      self.close()
      raise item.error
    return item

  def close(self) -> None:
    """Stops the background thread; later next() calls raise StopIteration."""
    self._finished = True
    self._stop.set()
    if self._thread is not threading.current_thread():
      self._thread.join(timeout=1.0)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def __del__(self):
    stop = getattr(self, "_stop", None)  # absent if __init__ raised
    if stop is not None:
      stop.set()


def prefetch(iterator: Iterable, size: int = 2,
             transform: Optional[Callable[[Any], Any]] = None) -> Prefetcher:
  """Iterates ``iterator`` ``size`` items ahead in a background thread (see Prefetcher).

  Example:
    for batch in prefetch(source_batches(source, plan), size=2, transform=jax.device_put):
      state, metrics = train_step(state, batch)
  """
  return Prefetcher(iterator, size=size, transform=transform)
