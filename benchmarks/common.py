"""Shared helpers for benchmark scripts: median timing and a device description."""
import json
import os
import statistics
import tempfile
import time
from typing import Any, Callable

import jax


def block(tree: Any) -> Any:
  return jax.block_until_ready(tree)


def median_time(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> float:
  """Median wall time in seconds of ``fn()`` (results blocked on), after ``warmup`` calls."""
  for _ in range(warmup):
    block(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    block(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def device_description() -> str:
  dev = jax.devices()[0]
  return f"{jax.default_backend()} ({dev.device_kind}, {jax.device_count()} device(s))"


def write_json_atomic(path: str, payload: dict) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
  with os.fdopen(fd, "w") as f:
    json.dump(payload, f, indent=2)
  os.replace(tmp, path)


def median_times_interleaved(fns: dict, repeats: int = 5, warmup: int = 1) -> dict:
  """Median seconds per named callable, timing them round-robin so machine noise hits all alike."""
  for fn in fns.values():
    for _ in range(warmup):
      block(fn())
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      block(fn())
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(ts) for name, ts in times.items()}
