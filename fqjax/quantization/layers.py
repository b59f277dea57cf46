"""Quantized Flax linen layers and the rule that says how they quantize their weights.

Bit-widths are data, not module attributes: every quantized layer reads its
weight and activation bits from the ``"bits"`` variable collection, so

    model.apply({"params": p, "batch_stats": s, "bits": bits_tree}, x)

quantizes with whatever ``bits_tree`` holds, traced or not (``jax.vmap`` over a
stacked ``bits_tree`` is a bit-width sweep with one compilation). Without a
``"bits"`` collection a layer is full precision with no quantizer in the graph.
How a layer quantizes (grid, per channel, STE, LSQ) is static: one frozen
``QuantRule`` per layer, the ``quant`` field. Which bits each layer gets is a
``BitSpec`` (fqjax.quantization.bitspec, re-exported here as ``layers.BitSpec``).

Collections used here:
  "bits":        {layer path...: {"w": [] float32, "a": [] float32}}; >= 32 = full precision.
  "quant_stats": {layer path...: {"lo": [] float32, "hi": [] float32}}: calibrated input ranges.
                 Absent: activations are quantized with the batch's own min/max.
  "act_inputs":  sown layer inputs {"x"}, only when made mutable (calibration).
  "quantized_kernels": sown, only when mutable: {"kernel"} the kernel the layer multiplies by
                 (after folding and quantization), and for a folded QuantConvBN {"fold_scale"}:
                 g = gamma / sqrt(var + eps) [C], so kernel = Q(W g).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from fqjax.quantization import calibration, quant
# Re-exported: layers.BitSpec and friends are how callers reach them.
from fqjax.quantization.bitspec import (BitSpec, LayerBits, bits_tree_from, is_full_precision_tree,
                                        stack_bits_trees, weight_bits_by_layer)  # noqa: F401

BITS = "bits"
QUANT_STATS = "quant_stats"
ACT_INPUTS = "act_inputs"
KERNELS = "quantized_kernels"
BN_BATCH_STATS = "bn_batch_stats"  # sown batch mean / var of each QuantConvBN in training mode (recalibration)
Padding = Union[str, int, Sequence[tuple[int, int]]]


# ----------------------------------------------------------------------------
# The rule: how a layer quantizes its weights
# ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class QuantRule:
  """How a layer quantizes its weights (the bit-widths come from the "bits" collection, not from here).

  per_channel: one scale per output channel (the kernel's last axis), else one per tensor.
  narrow_range: symmetric grid without -2^(b-1), q in [-(2^(b-1) - 1), 2^(b-1) - 1].
  ste: straight-through estimator of weights and inputs, "clipped" (zero gradient outside the
    grid's range) or "identity" (quant.STE_MODES).
  lsq: learned step size (LSQ): a "w_scale" param [C] (per channel) or [] replaces max|W| / qmax,
    on the full grid with LSQ's own gradients (narrow_range and ste then apply to inputs only).
  scale: how the weight scale follows from the weights (quant.WEIGHT_SCALE_RULES): "max"
    (max|W| / qmax), "half_step" (max|W| / (qmax + 1/2)) or "mse" (the clipping ratio with the
    least quantization error); see quant.weight_scale. Ignored with lsq.
  Frozen and hashable, so modules carrying it stay usable as jit / lru_cache keys.
  """
  per_channel: bool = True
  narrow_range: bool = False
  ste: str = "clipped"
  lsq: bool = False
  scale: str = "max"

  def __post_init__(self):
    for name in ("per_channel", "narrow_range", "lsq"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"QuantRule.{name} must be True or False, got {getattr(self, name)!r}.")
    if self.ste not in quant.STE_MODES:
      raise ValueError(f"QuantRule.ste must be one of {quant.STE_MODES}, got {self.ste!r}.")
    if self.scale not in quant.WEIGHT_SCALE_RULES:
      raise ValueError(f"QuantRule.scale must be one of {quant.WEIGHT_SCALE_RULES}, got {self.scale!r}.")


RULE_OPTIONS = tuple(f.name for f in dataclasses.fields(QuantRule))
OPTIONS = RULE_OPTIONS + ("fold_bn", "dtype")  # what ``configured`` sets


def quantize_weights(kernel: jax.Array, bits, rule: QuantRule, w_scale: Optional[jax.Array] = None) -> jax.Array:
  """Fake-quantizes ``kernel`` [..., C] (output channels last) at ``bits`` as ``rule`` says.

  Symmetric grid per output channel or per tensor, scale by ``rule.scale``
  (``quant.weight_scale``; "max" is fake_quant's own min/max scale), or with ``rule.lsq`` the
  learned step size ``w_scale`` ([C] or []; ``quant.lsq_fake_quant``). Same shape and dtype as ``kernel``.
  """
  axis = kernel.ndim - 1 if rule.per_channel else None
  if rule.lsq:
    return quant.lsq_fake_quant(kernel, w_scale, bits, axis=axis)
  scale = None if rule.scale == "max" else quant.weight_scale(kernel, bits, rule.scale,
                                                              narrow_range=rule.narrow_range, axis=axis)
  return quant.fake_quant(kernel, bits, symmetric=True, narrow_range=rule.narrow_range, axis=axis, scale=scale,
                          ste=rule.ste)


def configured(model: nn.Module, **options: Any) -> nn.Module:
  """A clone of a model or layer with quantization options applied.

  Names in RULE_OPTIONS (per_channel, narrow_range, ste, lsq) update its ``quant``
  rule; "fold_bn" and "dtype" set those fields. ``configured(m, per_channel=False)``
  equals ``m.clone(quant=dataclasses.replace(m.quant, per_channel=False))``.
  """
  unknown = sorted(set(options) - set(OPTIONS))
  if unknown:
    raise ValueError(f"unknown quantization option(s) {unknown}; allowed: {list(OPTIONS)}.")
  fields = {f.name for f in dataclasses.fields(model)}
  if "quant" not in fields:
    raise ValueError(f"{type(model).__name__} has no `quant` rule; configured() takes fqjax models and layers.")
  missing = sorted(k for k in options if k not in RULE_OPTIONS and k not in fields)
  if missing:
    raise ValueError(f"{type(model).__name__} has no option(s) {missing} (it has {sorted(fields & set(OPTIONS))}).")
  rule = {k: v for k, v in options.items() if k in RULE_OPTIONS}
  rest = {k: v for k, v in options.items() if k not in RULE_OPTIONS}
  return model.clone(quant=dataclasses.replace(model.quant, **rule), **rest)


# ----------------------------------------------------------------------------
# Reading bits and quantizing inputs and weights inside a layer
# ----------------------------------------------------------------------------

def read_bits(module: nn.Module) -> tuple[Optional[jax.Array], Optional[jax.Array]]:
  """(w_bits, a_bits) from the "bits" collection, or (None, None) when absent."""
  w = module.get_variable(BITS, "w") if module.has_variable(BITS, "w") else None
  a = module.get_variable(BITS, "a") if module.has_variable(BITS, "a") else None
  return w, a


def _sow(module: nn.Module, collection: str, name: str, value: jax.Array) -> None:
  # Not at init: model.init makes every collection mutable, and captures would leak into the variables.
  if not module.is_initializing() and module.is_mutable_collection(collection):
    module.sow(collection, name, value)


def quantize_input(x: jax.Array, a_bits, ste: str, lo: Optional[jax.Array] = None,
                   hi: Optional[jax.Array] = None) -> jax.Array:
  """Asymmetric per-tensor fake quantization of a layer input at ``a_bits`` (Linen and NNX layers).

  x: any shape -> same shape and dtype. With a calibrated range [lo, hi] (f32[] each) the scale and
  zero point come from it (``quant.scale_zero_point_from_range``), else from min / max of ``x``.
  """
  if lo is None:
    return quant.fake_quant(x, a_bits, symmetric=False, ste=ste)
  scale, zp = quant.scale_zero_point_from_range(lo, hi, a_bits, symmetric=False)
  return quant.fake_quant(x, a_bits, symmetric=False, scale=scale, zero_point=zp, ste=ste)


def quantize_module_input(module: nn.Module, x: jax.Array, a_bits) -> jax.Array:
  """``quantize_input`` of a Linen layer's input, on its calibrated "quant_stats" range when there is one."""
  _sow(module, ACT_INPUTS, "x", x)
  if a_bits is None:
    return x
  if module.has_variable(QUANT_STATS, "lo"):
    return quantize_input(x, a_bits, module.quant.ste, module.get_variable(QUANT_STATS, "lo"),
                          module.get_variable(QUANT_STATS, "hi"))
  return quantize_input(x, a_bits, module.quant.ste)


def quantize_module_kernel(module: nn.Module, kernel: jax.Array, w_bits) -> jax.Array:
  """The kernel the layer multiplies by: ``quantize_weights`` at ``w_bits`` (None: unchanged), sown."""
  rule: QuantRule = module.quant
  w_scale = None
  if rule.lsq:  # the param exists at every bit-width, so QAT and full-precision variables match
    shape = (kernel.shape[-1],) if rule.per_channel else ()
    w_scale = module.param("w_scale", nn.initializers.ones_init(), shape, jnp.float32)
  if w_bits is not None:
    kernel = quantize_weights(kernel, w_bits, rule, w_scale)
  _sow(module, KERNELS, "kernel", kernel)
  return kernel


def compute_cast(dtype, x: jax.Array, kernel: jax.Array):
  """Casts the matmul/conv operands to the compute dtype, after quantization (done in float32)."""
  if dtype is None:
    return x, kernel
  return x.astype(dtype), kernel.astype(dtype)


def _conv_padding(padding: Padding, ndim: int):
  if isinstance(padding, str):
    return padding.upper()
  if isinstance(padding, int):
    return [(padding, padding)] * ndim
  return [tuple(p) for p in padding]


def conv_general(x, kernel, strides, padding):
  ndim = kernel.ndim - 2
  strides = (strides,) * ndim if isinstance(strides, int) else tuple(strides)
  dn = jax.lax.conv_dimension_numbers(x.shape, kernel.shape, ("NHWC", "HWIO", "NHWC"))
  return jax.lax.conv_general_dilated(x, kernel, strides, _conv_padding(padding, ndim),
                                      dimension_numbers=dn)


# ----------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------

def _quantized_operands(module: nn.Module, x: jax.Array, kernel_shape) -> tuple[jax.Array, jax.Array]:
  """The (input, kernel) a QuantDense / QuantConv multiplies: both quantized at the layer's bits
  (in float32), then cast to its compute dtype."""
  kernel = module.param("kernel", module.kernel_init, kernel_shape, jnp.float32)
  w_bits, a_bits = read_bits(module)
  x = quantize_module_input(module, x, a_bits)
  return compute_cast(module.dtype, x, quantize_module_kernel(module, kernel, w_bits))


def _add_bias(module: nn.Module, y: jax.Array) -> jax.Array:
  if not module.use_bias:
    return y
  bias = module.param("bias", module.bias_init, (module.features,), jnp.float32)
  return y + bias.reshape((1,) * (y.ndim - 1) + (-1,)).astype(y.dtype)


def _kw(default: Any) -> Any:
  # Keyword-only, so each layer keeps its own positional fields (features, kernel_size, strides).
  return dataclasses.field(default=default, kw_only=True)


class _QuantLayer(nn.Module):
  """The fields every quantized layer has, declared once.

  quant: how it quantizes its weights (QuantRule).
  dtype: compute dtype of the matmul / conv (e.g. jnp.bfloat16); params, quantizers and
    BatchNorm statistics stay float32.
  """
  quant: QuantRule = _kw(QuantRule())
  dtype: Optional[Any] = _kw(None)
  kernel_init: Callable = _kw(nn.initializers.lecun_normal())


class _BiasedQuantLayer(_QuantLayer):
  use_bias: bool = _kw(True)
  bias_init: Callable = _kw(nn.initializers.zeros_init())


class QuantDense(_BiasedQuantLayer):
  """Dense layer with fake-quantized weights and inputs; nn.Dense at full precision.

  x: [..., in] float -> [..., features]. Weights as ``quant`` says; inputs asymmetric per tensor.
  """
  features: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x, kernel = _quantized_operands(self, x, (jnp.shape(x)[-1], self.features))
    return _add_bias(self, jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ()))))


class QuantConv(_BiasedQuantLayer):
  """2-D convolution (NHWC, HWIO kernel) with fake-quantized weights and inputs; nn.Conv at full precision.

  x: [batch, height, width, in] float -> [batch, height', width', features].
  """
  features: int
  kernel_size: Sequence[int] = (3, 3)
  strides: Union[int, Sequence[int]] = 1
  padding: Padding = "SAME"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x, kernel = _quantized_operands(self, x, tuple(self.kernel_size) + (jnp.shape(x)[-1], self.features))
    return _add_bias(self, conv_general(x, kernel, self.strides, self.padding))


def bn_fold_scale(gamma: jax.Array, var: jax.Array, eps: float) -> jax.Array:
  """g = gamma / sqrt(var + eps): the per-channel factor BatchNorm folding multiplies a kernel by. [C]."""
  return gamma * jax.lax.rsqrt(var + eps)


def fold_bn(kernel: jax.Array, bias: Optional[jax.Array], gamma: jax.Array, beta: jax.Array,
            mean: jax.Array, var: jax.Array, eps: float) -> tuple[jax.Array, jax.Array]:
  """Folds inference BatchNorm into the preceding conv/dense.

  kernel: [..., C] (output channels last); gamma, beta, mean, var, bias: [C].
  BN(conv(x, W) + b) = conv(x, W * g) + (beta + (b - mean) * g), g = gamma / sqrt(var + eps).
  """
  g = bn_fold_scale(gamma, var, eps)
  b = jnp.zeros_like(mean) if bias is None else bias
  return kernel * g, beta + (b - mean) * g


class QuantConvBN(_QuantLayer):
  """Conv (no bias) followed by BatchNorm, as one quantizable layer.

  In training mode BatchNorm uses batch statistics and updates the running
  ones ("batch_stats": mean, var). In inference mode it uses the running ones;
  with ``fold_bn`` they are folded into the kernel and a bias before weight
  quantization, as deployed integer models do (Jacob et al., 2018).
  x: [batch, height, width, in] -> [batch, height', width', features].
  """
  features: int
  kernel_size: Sequence[int] = (3, 3)
  strides: Union[int, Sequence[int]] = 1
  padding: Padding = "SAME"
  fold_bn: bool = False
  momentum: float = 0.9
  epsilon: float = 1e-5
  scale_init: Callable = nn.initializers.ones_init()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    shape = tuple(self.kernel_size) + (jnp.shape(x)[-1], self.features)
    kernel = self.param("kernel", self.kernel_init, shape, jnp.float32)
    gamma = self.param("scale", self.scale_init, (self.features,), jnp.float32)
    beta = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((self.features,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((self.features,), jnp.float32))
    w_bits, a_bits = read_bits(self)
    x = quantize_module_input(self, x, a_bits)
    if not train and self.fold_bn:
      return self._folded(x, kernel, gamma, beta, ra_mean.value, ra_var.value, w_bits)

    y = conv_general(*compute_cast(self.dtype, x, quantize_module_kernel(self, kernel, w_bits)), self.strides, self.padding)
    out_dtype = y.dtype
    y = y.astype(jnp.float32)
    if train:
      axes = tuple(range(y.ndim - 1))
      mean = jnp.mean(y, axis=axes)
      var = jnp.mean(jnp.square(y - mean), axis=axes)
      _sow(self, BN_BATCH_STATS, "mean", mean)
      _sow(self, BN_BATCH_STATS, "var", var)
      if not self.is_initializing():
        ra_mean.value = self.momentum * ra_mean.value + (1.0 - self.momentum) * mean
        ra_var.value = self.momentum * ra_var.value + (1.0 - self.momentum) * var
    else:
      mean, var = ra_mean.value, ra_var.value
    return ((y - mean) * (gamma * jax.lax.rsqrt(var + self.epsilon)) + beta).astype(out_dtype)

  def _folded(self, x, kernel, gamma, beta, mean, var, w_bits):
    """Inference with BatchNorm folded: conv(x, Q(W g)) + beta - mean g, g sown as "fold_scale"."""
    if self.quant.lsq:
      raise ValueError(f"layer {'/'.join(self.scope.path)}: LSQ learned scales are not supported with "
                       "fold_bn=True (the folded kernel's range differs); use fold_bn=False with LSQ.")
    folded, bias = fold_bn(kernel, None, gamma, beta, mean, var, self.epsilon)
    _sow(self, KERNELS, "fold_scale", bn_fold_scale(gamma, var, self.epsilon))
    y = conv_general(*compute_cast(self.dtype, x, quantize_module_kernel(self, folded, w_bits)), self.strides, self.padding)
    return y + bias.astype(y.dtype)


QUANT_LAYER_TYPES = (QuantDense, QuantConv, QuantConvBN)


def init_lsq_scales(params: Mapping, layer_bits: Mapping[str, tuple]) -> dict:
  """Params with every layer's "w_scale" set to LSQ's init 2 mean|W| / sqrt(qmax) at its weight bits.

  layer_bits: BitSpec.resolve output {layer: (w_bits, a_bits)}; layers at full precision keep
  their scale. Per channel or per tensor follows the existing "w_scale" ([C] or []).
  """
  flat = traverse_util.flatten_dict(params, sep="/")
  for name, (w_bits, _) in layer_bits.items():
    key = f"{name}/w_scale"
    if key not in flat:
      raise ValueError(f"layer {name!r} has no 'w_scale' param; build the model with lsq=True for LSQ.")
    if w_bits is not None and w_bits < quant.FULL_PRECISION_BITS:
      flat[key] = quant.lsq_init_scale(flat[f"{name}/kernel"], w_bits, axis=-1 if flat[key].ndim else None)
  return traverse_util.unflatten_dict(flat, sep="/")


# ----------------------------------------------------------------------------
# Layer names in forward order
# ----------------------------------------------------------------------------

def quant_layer_names(model: nn.Module, sample_input: Any, **apply_kwargs) -> list[str]:
  """Paths ("block1/conv2") of the model's quantizable layers in forward-call order.

  Traces one abstract forward pass (no FLOPs): ``sample_input`` may be an array
  or a ``jax.ShapeDtypeStruct`` of shape [batch, ...].
  """
  names: list[str] = []

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name == "__call__" and isinstance(module, QUANT_LAYER_TYPES):
      name = "/".join(module.scope.path)
      if name not in names:
        names.append(name)
    return next_fun(*args, **kwargs)

  def forward(x):
    variables = model.init(jax.random.PRNGKey(0), x, **apply_kwargs)
    with nn.intercept_methods(interceptor):
      return model.apply(variables, x, **apply_kwargs)

  jax.eval_shape(forward, sample_input)
  return names


# ----------------------------------------------------------------------------
# Activation calibration
# ----------------------------------------------------------------------------

def calibrate_activations(model: nn.Module, variables: Mapping, batches: Iterable[jax.Array],
                          method: str = "minmax", **calib_kwargs) -> dict:
  """Input ranges of every quantized layer over calibration batches.

  Runs the full-precision model in inference mode on each batch [batch, ...],
  and reduces each layer's inputs with ``calibration.calibrate`` (minmax, ema or
  percentile). Returns the "quant_stats" collection {path: {"lo", "hi"}}, each [] float32.
  """
  fp_vars = {k: v for k, v in variables.items() if k not in (BITS, QUANT_STATS)}

  @jax.jit
  def capture(x):
    _, state = model.apply(fp_vars, x, train=False, mutable=[ACT_INPUTS])
    return state[ACT_INPUTS]

  inputs: dict[str, list] = {}  # {layer path: its inputs, batch after batch}
  for batch in batches:
    for key, sown in traverse_util.flatten_dict(capture(batch), sep="/").items():
      inputs.setdefault(key.rpartition("/")[0], []).extend(sown)  # key "path/x"; sown: one per call
  return calibration.ranges_tree(inputs, method, **calib_kwargs)
