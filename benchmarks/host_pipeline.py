"""A host-side input pipeline, measured by benchmarks/input_pipeline.py against fqjax's on-device gather.

fqjax keeps its datasets on the device (fqjax.data.pipeline.DeviceArrays). For random-access host
sources too large for memory (a ``tfds.data_source``, a grain source) the alternative is to read
each batch record by record on the host (:func:`source_batches`) and to overlap that reading with
the training step in a background thread (:func:`prefetch`). fqjax does not use this path; it
lives here so that the benchmark can show what it would cost.

Usage (self-check, a few seconds): python benchmarks/host_pipeline.py
"""
import os
import queue
import sys
import threading
import time
from typing import Any, Callable, Dict, Iterable, Iterator, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from fqjax.data.pipeline import EpochBatches, epoch_batches


def source_batches(source: Sequence[Dict[str, Any]], plan: EpochBatches,
                   keys: Optional[Sequence[str]] = None) -> Iterator[Dict[str, np.ndarray]]:
  """Reads an epoch plan from a random-access host source, batch by batch.

  Args:
    source: indexable by row, each record a dict of arrays or scalars (a ``tfds.data_source``
      split, a grain source, a list of dicts). A ``__getitems__`` method (batched read) is used
      when present.
    plan: from fqjax.data.pipeline.epoch_batches: idx [num_batches, B] int32, mask [num_batches, B]
      float32.
    keys: which fields to stack; default all fields of the first record.

  Yields:
    {key: [B, ...] np.ndarray stacked from the records, 'mask': [B] float32}.
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
    size: how many items to hold ready (an int >= 1).
    transform: optional function applied in the thread, e.g. ``jax.device_put`` so that the
      host-to-device copy also overlaps the step.

  Iterating yields the items in order. An exception raised by the iterator or by ``transform`` is
  re-raised at that position. ``close()`` (also on leaving a ``with`` block or on garbage
  collection) stops the thread.
  """

  def __init__(self, iterator: Iterable, size: int = 2,
               transform: Optional[Callable[[Any], Any]] = None):
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
      raise ValueError(f"size must be an int >= 1, got {size!r}.")
    self._buffer: queue.Queue = queue.Queue(maxsize=size)
    self._stop = threading.Event()
    self._finished = False
    # The thread gets the queue and the event, not self, so that a dropped Prefetcher
    # can be garbage-collected and its __del__ stops the thread.
    self._thread = threading.Thread(
        target=_produce, args=(iter(iterator), transform, self._buffer, self._stop),
        name="benchmark-prefetch", daemon=True)
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


def self_check() -> None:
  """Asserts the reader and the prefetch thread behave (order, batched reads, errors, shutdown)."""
  records = [{"image": np.full((2, 2), i, np.uint8), "label": i % 4} for i in range(7)]
  plan = epoch_batches(7, 3, seed=0)
  batches = list(source_batches(records, plan))
  assert len(batches) == 3
  for batch, idx, mask in zip(batches, plan.idx, plan.mask):
    np.testing.assert_array_equal(batch["image"][:, 0, 0], idx)
    np.testing.assert_array_equal(batch["label"], idx % 4)
    np.testing.assert_array_equal(batch["mask"], mask)

  calls = []

  class Batched:
    def __getitems__(self, rows):
      calls.append(list(rows))
      return [{"v": r} for r in rows]

  (batch,) = source_batches(Batched(), epoch_batches(5, 5, shuffle=False))
  assert calls == [[0, 1, 2, 3, 4]]
  np.testing.assert_array_equal(batch["v"], np.arange(5))

  assert list(prefetch(iter(range(20)), size=3, transform=lambda v: v * 2)) == [2 * v for v in range(20)]

  produced = []

  def slow_source():
    for i in range(4):
      produced.append(i)
      yield i

  it = prefetch(slow_source(), size=2)
  deadline = time.time() + 5
  while len(produced) < 3 and time.time() < deadline:  # 2 in the queue + 1 waiting to be put
    time.sleep(0.01)
  assert produced == [0, 1, 2], produced
  assert list(it) == [0, 1, 2, 3]

  def broken():
    yield 1
    raise KeyError("record 7 is corrupt")

  it = prefetch(broken())
  assert next(it) == 1
  try:
    next(it)
    raise AssertionError("the producer's error was not re-raised")
  except KeyError as error:
    assert "record 7 is corrupt" in str(error)

  with prefetch(iter(range(10**9)), size=1) as it:
    assert next(it) == 0
    thread = it._thread
  assert not thread.is_alive()

  try:
    prefetch(iter([]), size=0)
    raise AssertionError("size=0 was accepted")
  except ValueError as error:
    assert "size must be an int >= 1" in str(error)

  it = prefetch(iter(range(10**9)), size=1)
  thread = it._thread
  del it  # a dropped Prefetcher stops its thread
  thread.join(timeout=5)
  assert not thread.is_alive()


if __name__ == "__main__":
  self_check()
  print("host_pipeline: source_batches and prefetch behave as documented")
