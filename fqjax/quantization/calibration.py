"""Activation calibration: pure functions from calibration batches to a value range (lo, hi).

Ranges feed quant.scale_zero_point_from_range (asymmetric, per tensor) for activations; the
layers call `calibrate` (via fqjax.quantization.layers.calibrate_activations) on the inputs they sow.
Methods (CALIBRATORS): "minmax" (running min / max), "ema" (exponential moving average of each
batch's min / max) and "percentile" (the lower / upper percentiles of all values seen).
"""
from __future__ import annotations

from typing import Callable, Iterable, Mapping, NamedTuple, Optional, Sequence

import jax.numpy as jnp
from flax import traverse_util

from fqjax.quantization.quant import Array, normalize_axis, tensor_range


class RangeState(NamedTuple):
  """A running activation range. lo, hi: [] or [C] float32; count: [] int32 (batches seen)."""
  lo: Array
  hi: Array
  count: Array


def init_range(shape: Sequence[int] = ()) -> RangeState:
  """An empty range: lo=+inf, hi=-inf, count=0."""
  return RangeState(jnp.full(shape, jnp.inf, jnp.float32), jnp.full(shape, -jnp.inf, jnp.float32),
                    jnp.zeros((), jnp.int32))


def update_minmax(state: RangeState, x: Array, axis: Optional[int] = None) -> RangeState:
  """Running min/max: lo = min(lo, min x), hi = max(hi, max x)."""
  lo, hi = tensor_range(x, axis)
  return RangeState(jnp.minimum(state.lo, lo), jnp.maximum(state.hi, hi), state.count + 1)


def update_ema(state: RangeState, x: Array, decay: float = 0.9, axis: Optional[int] = None) -> RangeState:
  """Exponential moving average of per-batch min/max: r <- decay * r + (1 - decay) * r_batch.

  The first batch initializes the average directly (no bias toward the empty range).
  """
  if not 0.0 <= decay < 1.0:
    raise ValueError(f"decay must be in [0, 1), got {decay!r}.")
  lo, hi = tensor_range(x, axis)
  first = state.count == 0
  new_lo = jnp.where(first, lo, decay * state.lo + (1.0 - decay) * lo)
  new_hi = jnp.where(first, hi, decay * state.hi + (1.0 - decay) * hi)
  return RangeState(new_lo, new_hi, state.count + 1)


def percentile_range(x: Array, lower: float = 0.01, upper: float = 99.99,
                     axis: Optional[int] = None) -> RangeState:
  """Percentile clipping range of the concatenated calibration values ``x``.

  ``lower``/``upper`` are percentiles in [0, 100]; per channel along ``axis``.
  """
  if not 0.0 <= lower < upper <= 100.0:
    raise ValueError(f"need 0 <= lower < upper <= 100, got lower={lower!r}, upper={upper!r}.")
  x = jnp.asarray(x, jnp.float32)
  axis = normalize_axis(axis, x.ndim)
  if axis is None:
    flat = x.reshape(-1)
    lo, hi = jnp.percentile(flat, lower), jnp.percentile(flat, upper)
  else:
    moved = jnp.moveaxis(x, axis, -1).reshape(-1, x.shape[axis])
    lo, hi = jnp.percentile(moved, lower, axis=0), jnp.percentile(moved, upper, axis=0)
  return RangeState(lo, hi, jnp.ones((), jnp.int32))


def _running_range(update: Callable[[RangeState, Array], RangeState], batches: Sequence[Array],
                   axis: Optional[int]) -> RangeState:
  state = init_range(tensor_range(batches[0], axis)[0].shape)
  for b in batches:
    state = update(state, b)
  return state


def _minmax(batches, axis, **_) -> RangeState:
  return _running_range(lambda state, b: update_minmax(state, b, axis), batches, axis)


def _ema(batches, axis, *, decay, **_) -> RangeState:
  return _running_range(lambda state, b: update_ema(state, b, decay, axis), batches, axis)


def _percentile(batches, axis, *, lower, upper, **_) -> RangeState:
  return percentile_range(jnp.concatenate([jnp.asarray(b) for b in batches], axis=0), lower, upper, axis)


# name -> f(batches, axis, *, decay, lower, upper) -> RangeState
CALIBRATORS: dict[str, Callable[..., RangeState]] = {"minmax": _minmax, "ema": _ema, "percentile": _percentile}
CALIBRATION_METHODS = tuple(CALIBRATORS)


def calibrate(batches: Iterable[Array], method: str = "minmax", *, axis: Optional[int] = None,
              decay: float = 0.9, lower: float = 0.01, upper: float = 99.99) -> RangeState:
  """Range of activations over calibration batches ([batch, ...] each) by one of CALIBRATION_METHODS.

  minmax: running min/max; ema: moving average of per-batch min/max with ``decay``;
  percentile: the [lower, upper] percentiles of all batches concatenated.
  """
  if method not in CALIBRATORS:
    raise ValueError(f"calibration method must be one of {CALIBRATION_METHODS}, got {method!r}.")
  batches = list(batches)
  if not batches:
    raise ValueError("calibrate() got no batches; pass at least one calibration batch.")
  return CALIBRATORS[method](batches, axis, decay=decay, lower=lower, upper=upper)


def ranges_tree(inputs: Mapping[str, list], method: str = "minmax", **kwargs) -> dict:
  """{layer path: its inputs, batch after batch} -> the nested "quant_stats" tree {path...: {"lo", "hi"}}, each
  layer's range from ``calibrate``. ValueError when there are no inputs (no batches, or no quantized layer)."""
  if not inputs:
    raise ValueError("calibrate_activations got no batches (or the model has no quantized layers).")
  flat = {}
  for path, values in inputs.items():
    rng = calibrate(values, method, **kwargs)
    flat[f"{path}/lo"], flat[f"{path}/hi"] = rng.lo, rng.hi
  return traverse_util.unflatten_dict(flat, sep="/")
