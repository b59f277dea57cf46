"""Pure quantizer functions: fake quantization with straight-through gradients,
learned step sizes and storage size (activation calibration: fqjax.quantization.calibration).

No Flax and no state here. Every function that takes ``bits`` accepts a Python
number or a traced JAX scalar, so a bit-width sweep is a ``jax.vmap`` (or a
loop over one compiled function) and never a recompile.

Conventions (b = bits, s = scale, z = zero point):
  symmetric:            q in [-2^(b-1), 2^(b-1) - 1], z = 0, s = max|x| / (2^(b-1) - 1)
  symmetric, narrow:    q in [-(2^(b-1) - 1), 2^(b-1) - 1]
  asymmetric:           q in [0, 2^b - 1], s = (max - min) / (2^b - 1), z = -round(min / s)
                        (the range is widened to include 0 so that 0 is exact)
  q = clip(round_half_to_even(x / s) + z, qmin, qmax),   x_hat = (q - z) * s
  one bit, symmetric:   x_hat = s * (+1 if x >= 0 else -1), s = max|x|
  b >= 32 or None:      x_hat = x, bit for bit.
All quantizer arithmetic is float32 whatever the input dtype, so the grid is exact.
"""
from __future__ import annotations

import numbers
from typing import Any, Callable, Mapping, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Bits = Union[int, float, Array, None]

FULL_PRECISION_BITS = 32
STE_MODES = ("clipped", "identity")


# ----------------------------------------------------------------------------
# Validation helpers
# ----------------------------------------------------------------------------

def _is_concrete(value) -> bool:
  return not isinstance(value, jax.core.Tracer)


def check_bits(bits: Bits, *, name: str = "bits") -> None:
  """Raises ValueError if a concrete bit-width is not an integer >= 1.

  Traced values are not checked (they cannot be without a host sync).
  """
  if bits is None or not _is_concrete(bits):
    return
  arr = np.asarray(bits)
  if arr.ndim != 0:
    raise ValueError(
        f"{name} must be a scalar, got an array of shape {arr.shape}; "
        "to sweep bit-widths, jax.vmap over a 1-D array of them.")
  if arr.dtype == bool or not np.issubdtype(arr.dtype, np.number):
    raise ValueError(f"{name} must be an integer >= 1 (or None / >= 32 for full precision), got {bits!r}.")
  value = float(arr)
  if not np.isfinite(value) or value != np.floor(value) or value < 1:
    raise ValueError(
        f"{name} must be an integer >= 1 (or None / >= 32 for full precision), got {bits!r}. "
        "Allowed: 1, 2, ..., 32.")


def _check_ste(ste: str) -> None:
  if ste not in STE_MODES:
    raise ValueError(f"ste must be one of {STE_MODES}, got {ste!r}.")


def normalize_axis(axis: Optional[int], ndim: int) -> Optional[int]:
  if axis is None:
    return None
  if not isinstance(axis, numbers.Integral) or isinstance(axis, bool):
    raise ValueError(f"axis must be an int or None, got {axis!r}.")
  if not -ndim <= axis < ndim:
    raise ValueError(
        f"axis {axis} is out of range for a tensor of rank {ndim}; allowed: {-ndim}..{ndim - 1} or None.")
  return axis % ndim


def is_full_precision(bits: Bits) -> bool:
  """True when ``bits`` is statically known to mean full precision (None or >= 32)."""
  if bits is None:
    return True
  if _is_concrete(bits) and np.ndim(bits) == 0:
    return float(np.asarray(bits)) >= FULL_PRECISION_BITS
  return False


# ----------------------------------------------------------------------------
# Integer ranges, scales and zero points
# ----------------------------------------------------------------------------

def int_range(bits: Bits, *, symmetric: bool = True, narrow_range: bool = False) -> tuple[Array, Array]:
  """Returns (qmin, qmax) as float32 scalars for a (possibly traced) bit-width.

  For one symmetric bit the pair is (-1, 1): the binary grid {-1, +1}.
  """
  b = jnp.asarray(bits, jnp.float32)
  if symmetric:
    qmax = jnp.exp2(b - 1.0) - 1.0
    qmin = -qmax if narrow_range else -jnp.exp2(b - 1.0)
    one_bit = b <= 1.0
    return jnp.where(one_bit, -1.0, qmin), jnp.where(one_bit, 1.0, qmax)
  return jnp.zeros((), jnp.float32), jnp.exp2(b) - 1.0


def _reduce_axes(ndim: int, axis: Optional[int]) -> tuple[int, ...]:
  return tuple(i for i in range(ndim) if i != axis)


def _broadcast_param(param: Array, ndim: int, axis: Optional[int]) -> Array:
  """Reshapes a per-channel parameter [C] so it broadcasts against a tensor along ``axis``."""
  param = jnp.asarray(param, jnp.float32)
  if axis is None or param.ndim == 0:
    return param
  if param.ndim == ndim:
    return param
  shape = [1] * ndim
  shape[axis] = -1
  return param.reshape(shape)


def scale_zero_point_from_range(lo: Array, hi: Array, bits: Bits, *, symmetric: bool = True,
                                narrow_range: bool = False) -> tuple[Array, Array]:
  """Scale and zero point from a value range [lo, hi] (any matching shapes).

  Returns float32 (scale, zero_point), zero_point already rounded and clipped to
  [qmin, qmax]. A degenerate range (all zeros) gets scale 1, so 0 maps to 0.
  """
  lo = jnp.asarray(lo, jnp.float32)
  hi = jnp.asarray(hi, jnp.float32)
  qmin, qmax = int_range(bits, symmetric=symmetric, narrow_range=narrow_range)
  if symmetric:
    absmax = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
    # max|x| maps to qmax; for one bit qmax is 1, so x_hat = +-max|x|.
    scale = absmax / qmax
    zero_point = jnp.zeros_like(scale)
  else:
    lo = jnp.minimum(lo, 0.0)
    hi = jnp.maximum(hi, 0.0)
    scale = (hi - lo) / (qmax - qmin)
    safe = jnp.where(scale > 0, scale, 1.0)
    zero_point = jnp.clip(qmin - jnp.round(lo / safe), qmin, qmax)
  scale = jnp.where(scale > 0, scale, 1.0)
  return scale, zero_point


def tensor_range(x: Array, axis: Optional[int] = None) -> tuple[Array, Array]:
  """(min, max) of ``x`` over all axes except ``axis`` (shape [] or [C]), float32."""
  x = jnp.asarray(x, jnp.float32)
  axis = normalize_axis(axis, x.ndim)
  axes = _reduce_axes(x.ndim, axis)
  return jnp.min(x, axis=axes), jnp.max(x, axis=axes)


WEIGHT_SCALE_RULES = ("max", "half_step", "mse")  # = fqjax.choices.WEIGHT_SCALE_RULES (tested)
# Clipping ratios r the "mse" rule searches: scale = r * max|w| / qmax (fixed here, never fitted to a study).
MSE_RATIOS = tuple(float(r) for r in np.linspace(0.02, 1.0, 50))


def weight_scale(w: Array, bits: Bits, rule: str = "max", *, narrow_range: bool = False,
                 axis: Optional[int] = None) -> Array:
  """The symmetric scale of weights ``w`` at ``bits``: [] (per tensor) or [C] (per slice along ``axis``), float32.

  With m = max|w| over the slice and qmax = 2^(b-1) - 1:
    "max":       s = m / qmax. The top level is m; with the full grid the level -2^(b-1) is never
                 used, so 2-bit weights are ternary {-s, 0, s}.
    "half_step": s = m / (qmax + 1/2) (PyTorch's symmetric observer, Qwix): +-m lie within half a step
                 of the grid's ends, so every level, -2^(b-1) included, can be used.
    "mse":       s = r* m / qmax with r* = argmin_r sum (w - Q_r(w))^2 over MSE_RATIOS, per slice:
                 the clipping that minimizes the weight's own quantization error.
  At one bit (grid {-s, +s}) every rule is "max". An all-zero slice gets s = 1. ``bits`` may be traced.
  """
  if rule not in WEIGHT_SCALE_RULES:
    raise ValueError(f"weight scale rule must be one of {WEIGHT_SCALE_RULES}, got {rule!r}.")
  w = jnp.asarray(w, jnp.float32)
  axis = normalize_axis(axis, w.ndim)
  lo, hi = tensor_range(w, axis)
  absmax = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
  qmin, qmax = int_range(bits, symmetric=True, narrow_range=narrow_range)
  base = absmax / qmax
  if rule == "half_step":
    base = jnp.where(jnp.asarray(bits, jnp.float32) <= 1.0, base, absmax / (qmax + 0.5))
  elif rule == "mse":
    axes = _reduce_axes(w.ndim, axis)

    def error(r):  # [] or [C]: squared error of the grid clipped at r * max|w|
      s = _broadcast_param(jnp.where(base > 0, r * base, 1.0), w.ndim, axis)
      return jnp.sum(jnp.square(w - jnp.clip(jnp.round(w / s), qmin, qmax) * s), axis=axes)

    ratios = jnp.asarray(MSE_RATIOS, jnp.float32)
    best = ratios[jnp.argmin(jax.lax.map(error, ratios), axis=0)]
    base = jnp.where(jnp.asarray(bits, jnp.float32) <= 1.0, base, best * base)
  return jnp.where(base > 0, base, 1.0)


def compute_scale_zero_point(x: Array, bits: Bits, *, symmetric: bool = True, narrow_range: bool = False,
                             axis: Optional[int] = None) -> tuple[Array, Array]:
  """Min/max calibration of one tensor. Returns (scale, zero_point), each [] or [C] float32."""
  lo, hi = tensor_range(x, axis)
  return scale_zero_point_from_range(lo, hi, bits, symmetric=symmetric, narrow_range=narrow_range)


# ----------------------------------------------------------------------------
# Fake quantization with a straight-through estimator
# ----------------------------------------------------------------------------

def _prepare_params(x, bits, symmetric, narrow_range, axis, scale, zero_point):
  axis = normalize_axis(axis, x.ndim)
  if scale is None or (zero_point is None and not symmetric):
    auto_scale, auto_zp = compute_scale_zero_point(
        x, bits, symmetric=symmetric, narrow_range=narrow_range, axis=axis)
    scale = auto_scale if scale is None else scale
    zero_point = auto_zp if zero_point is None else zero_point
  if zero_point is None:
    zero_point = jnp.zeros((), jnp.float32)
  if axis is not None:
    for pname, p in (("scale", scale), ("zero_point", zero_point)):
      p_ndim = np.ndim(p)
      if p_ndim not in (0, 1, x.ndim):
        raise ValueError(f"{pname} must be a scalar, a [C] vector or broadcastable to x; got shape {np.shape(p)}.")
      if p_ndim == 1 and np.shape(p)[0] not in (1, x.shape[axis]):
        raise ValueError(
            f"{pname} has {np.shape(p)[0]} entries but x has {x.shape[axis]} channels along axis {axis}.")
  return axis, _broadcast_param(scale, x.ndim, axis), _broadcast_param(zero_point, x.ndim, axis)


def _quantize_float(xf, bits, symmetric, narrow_range, scale, zero_point):
  """Integer grid values (float32) and the dequantized values, no gradients attached."""
  qmin, qmax = int_range(bits, symmetric=symmetric, narrow_range=narrow_range)
  q = jnp.clip(jnp.round(xf / scale) + zero_point, qmin, qmax)
  if symmetric:
    one_bit = jnp.asarray(bits, jnp.float32) <= 1.0
    q = jnp.where(one_bit, jnp.where(xf >= 0, 1.0, -1.0), q)
  return q, (q - zero_point) * scale, qmin, qmax


def fake_quant(x: Array, bits: Bits, *, symmetric: bool = True, narrow_range: bool = False,
               axis: Optional[int] = None, scale: Optional[Array] = None,
               zero_point: Optional[Array] = None, ste: str = "clipped") -> Array:
  """Quantize-dequantize ``x`` at ``bits`` with a straight-through gradient.

  Args:
    x: any shape, floating dtype. The output has the same shape and dtype.
    bits: Python number, traced scalar or None. None or >= 32 returns ``x`` unchanged.
    symmetric: signed grid around 0 (weights) or asymmetric unsigned grid (activations).
    narrow_range: symmetric only; drop -2^(b-1) so the grid is symmetric.
    axis: None for one scale per tensor, an int for one scale per slice along ``axis``.
    scale, zero_point: given ([] or [C]), or None to take them from min/max of ``x``.
    ste: "clipped": d x_hat / d x = 1 where (qmin - z) s <= x <= (qmax - z) s, else 0.
      "identity": d x_hat / d x = 1 everywhere. Scale and zero point get no gradient.
  """
  _check_ste(ste)
  check_bits(bits)
  if is_full_precision(bits):
    normalize_axis(axis, jnp.ndim(x))
    return x
  x = jnp.asarray(x)
  axis, scale, zero_point = _prepare_params(x, bits, symmetric, narrow_range, axis, scale, zero_point)
  scale = jax.lax.stop_gradient(scale)
  zero_point = jax.lax.stop_gradient(zero_point)
  xf = x.astype(jnp.float32)
  _, x_hat, qmin, qmax = _quantize_float(jax.lax.stop_gradient(xf), bits, symmetric, narrow_range, scale,
                                         zero_point)
  if ste == "clipped":
    lo, hi = (qmin - zero_point) * scale, (qmax - zero_point) * scale
    mask = jax.lax.stop_gradient(((xf >= lo) & (xf <= hi)).astype(jnp.float32))
  else:
    mask = 1.0
  # Forward: x_hat exactly (xf - stop_gradient(xf) == 0). Backward: mask.
  out = x_hat + mask * (xf - jax.lax.stop_gradient(xf))
  out = out.astype(x.dtype)
  if _is_concrete(bits):
    return out
  return jnp.where(jnp.asarray(bits) >= FULL_PRECISION_BITS, x, out)


# ----------------------------------------------------------------------------
# Storage size of a params pytree
# ----------------------------------------------------------------------------

def storage_size(params: Any, weight_bits: Union[Mapping[str, Optional[int]], Callable[[str], Optional[int]]],
                 *, default_bits: Optional[int] = FULL_PRECISION_BITS, per_channel: bool = True,
                 quantized_leaf: str = "kernel", scale_bits: int = 32) -> dict:
  """Storage size of a params pytree under a per-layer weight bit assignment.

  A leaf named ``quantized_leaf`` ("kernel") inside layer ``a/b`` is stored at
  ``weight_bits["a/b"]`` bits per element plus one ``scale_bits`` scale per output
  channel (last axis) or per tensor; every other leaf (biases, BatchNorm) stays
  at 32 bits, as deployed integer models keep them.

  Args:
    params: pytree of arrays (e.g. ``variables["params"]``).
    weight_bits: mapping layer name -> bits (None / >= 32 means float32), or a callable.
    default_bits: bits for layers the mapping does not name.

  Returns:
    {"bits": int, "bytes": float, "float32_bytes": float, "compression": float,
     "per_layer": {layer: {"params": int, "bits": int, "weight_bits": int|None}}}
  """
  lookup = weight_bits if callable(weight_bits) else (lambda name: weight_bits.get(name, default_bits))
  per_layer: dict[str, dict] = {}
  total_bits = 0
  total_params = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    layer = jax.tree_util.keystr(path[:-1], simple=True, separator="/")
    leaf_name = jax.tree_util.keystr(path[-1:], simple=True)
    n = int(np.prod(np.shape(leaf)))
    total_params += n
    entry = per_layer.setdefault(layer, {"params": 0, "bits": 0, "weight_bits": None})
    entry["params"] += n
    bits = lookup(layer) if leaf_name == quantized_leaf else None
    if bits is not None:
      check_bits(bits, name=f"bits for layer {layer!r}")
    if bits is None or bits >= FULL_PRECISION_BITS:
      leaf_bits = 32 * n
    else:
      n_scales = np.shape(leaf)[-1] if (per_channel and np.ndim(leaf) >= 1) else 1
      leaf_bits = int(bits) * n + scale_bits * n_scales
      entry["weight_bits"] = int(bits)
    entry["bits"] += leaf_bits
    total_bits += leaf_bits
  fp_bytes = total_params * 4.0
  return {"bits": total_bits, "bytes": total_bits / 8.0, "float32_bytes": fp_bytes,
          "compression": fp_bytes / max(total_bits / 8.0, 1e-12), "per_layer": per_layer}


# ----------------------------------------------------------------------------
# Learned step size quantization (LSQ, Esser et al., ICLR 2020)
# ----------------------------------------------------------------------------

def round_ste(x: Array) -> Array:
  """round_half_to_even(x) forward, identity gradient backward."""
  return x + jax.lax.stop_gradient(jnp.round(x) - x)


def scale_gradient(x: Array, g) -> Array:
  """x forward; gradient multiplied by g backward."""
  return jax.lax.stop_gradient(x - x * g) + x * g


def lsq_init_scale(w: Array, bits: Bits, axis: Optional[int] = None) -> Array:
  """LSQ's initial step size s = 2 mean|w| / sqrt(qmax), per tensor ([]) or per slice along ``axis`` ([C])."""
  w = jnp.asarray(w, jnp.float32)
  axis = normalize_axis(axis, w.ndim)
  _, qmax = int_range(bits, symmetric=True)
  mean_abs = jnp.mean(jnp.abs(w), axis=_reduce_axes(w.ndim, axis))
  return jnp.maximum(2.0 * mean_abs / jnp.sqrt(jnp.maximum(qmax, 1.0)), 1e-8)


def lsq_fake_quant(x: Array, scale: Array, bits: Bits, *, axis: Optional[int] = None) -> Array:
  """Symmetric fake quantization with a learned step size ``scale`` ([] or [C] along ``axis``).

  x_hat = clip(round(x / s), qmin, qmax) * s, with a straight-through round, so
  d x_hat / d x = 1 inside the range and 0 outside, and d x_hat / d s is LSQ's
  (round(x/s) - x/s inside, qmin or qmax outside). The step size's gradient is
  scaled by g = 1 / sqrt(n * qmax), n = elements per scale, as LSQ prescribes.
  One bit: x_hat = s * sign(x). bits None / >= 32: x unchanged.
  """
  check_bits(bits)
  if is_full_precision(bits):
    return x
  xf = jnp.asarray(x).astype(jnp.float32)
  axis = normalize_axis(axis, xf.ndim)
  qmin, qmax = int_range(bits, symmetric=True)
  n_per_scale = xf.size // max(int(np.size(scale)), 1)
  s = scale_gradient(jnp.asarray(scale, jnp.float32), jax.lax.rsqrt(n_per_scale * jnp.maximum(qmax, 1.0)))
  s = _broadcast_param(s, xf.ndim, axis)
  v = xf / s
  multi = jnp.clip(round_ste(v), qmin, qmax)
  v_in = jnp.clip(v, -1.0, 1.0)  # one bit: straight-through inside [-s, s]
  binary = jnp.where(v >= 0, 1.0, -1.0) + (v_in - jax.lax.stop_gradient(v_in))
  q = jnp.where(jnp.asarray(bits, jnp.float32) <= 1.0, binary, multi)
  out = (q * s).astype(jnp.asarray(x).dtype)
  if _is_concrete(bits):
    return out
  return jnp.where(jnp.asarray(bits) >= FULL_PRECISION_BITS, x, out)
