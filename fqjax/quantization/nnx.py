"""Quantized Flax NNX layers: the NNX twins of fqjax.quantization.layers' QuantDense, QuantConv and QuantConvBN.

Same quantizers, same rule: weights go through ``layers.quantize_weights`` with the layer's
``layers.QuantRule`` (per channel or tensor, narrow range, STE, LSQ, scale rule "max" / "half_step" /
"mse"); inputs through ``quant.fake_quant`` (asymmetric, per tensor) on the calibrated range when the
layer has one (``act_lo`` / ``act_hi``), else on the batch's own min / max, as the Linen layers do.

Bit-widths are state, not attributes: every layer holds two ``Bits`` variables, ``w_bits`` and
``a_bits`` (f32[]; 32 = full precision, the default), so they split off the graph like any state and a
sweep over bit-widths is a ``jax.vmap`` over a stacked bits state, compiled once:

    graphdef, _, rest = nnx.split(model, Bits, ...)        # rest: params, BatchNorm statistics, ranges
    stacked = stack_bits(model, [BitSpec.uniform(8, 8), BitSpec.uniform(4, 8), BitSpec.uniform(2, 8)])

    @jax.jit                     # traced once: the bit-widths are data, shapes never change
    def sweep(stacked, rest, x):
      one = lambda b: nnx.merge(graphdef, b, rest)(x)
      return jax.vmap(one)(stacked)   # [3, batch, ...]; jax.lax.map(one, stacked) to save memory

    logits = sweep(stacked, rest, x)  # any other [3] stack of bits reuses the same compilation

``set_bits`` / ``bits_state`` set and read bits eagerly; Python-number bits take the same concrete path
as Linen's (checked, and no quantizer at all at 32 bits). Inside the sweep BatchNorm runs in the mode
the model is in (``model.eval()``, the default, for a PTQ sweep).

State names follow Linen's, so a model whose attributes are named like the Linen model's submodules
takes Linen variables as they are (``load_linen_variables``): params "kernel", "bias", "scale",
"w_scale"; BatchNorm statistics (nnx.BatchStat) "mean", "var"; bits {"w", "a"} <-> ``w_bits`` /
``a_bits``; "quant_stats" {"lo", "hi"} <-> ``act_lo`` / ``act_hi`` (``ActRange``).
Not carried over from Linen: the sown collections ("quantized_kernels", "bn_batch_stats").
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from fqjax.quantization import calibration, layers, quant
from fqjax.quantization.bitspec import BitSpec
from fqjax.quantization.layers import QuantRule, bn_fold_scale, fold_bn, quantize_input, quantize_weights

Padding = layers.Padding
BitsValue = Union[int, float, jax.Array, None]


class Bits(nnx.Variable):
  """A layer's weight or activation bit-width: f32[], an integer in 1..32; 32 = full precision."""


class ActRange(nnx.Variable):
  """One bound (lo or hi) of a layer's calibrated input range: f32[] (Linen's "quant_stats")."""


def _checked_bits(value: BitsValue, name: str) -> jax.Array:
  """``value`` as f32[]; None -> 32. An integer in 1..32 or a ValueError (stricter than Linen,
  which reads anything >= 32 as full precision: here 33 is a typo, not a bit-width)."""
  if value is None:
    value = quant.FULL_PRECISION_BITS
  quant.check_bits(value, name=name)
  if isinstance(value, jax.core.Tracer):
    return jnp.asarray(value, jnp.float32)
  if float(np.asarray(value)) > quant.FULL_PRECISION_BITS:
    raise ValueError(f"{name} must be an integer in 1..32 (32 or None = full precision), got {value!r}.")
  return jnp.asarray(value, jnp.float32)


# Forward-call recorders (``quant_layer_names``, ``calibrate_activations``): each gets (layer, input).
_RECORDERS: list[Callable[[Any, jax.Array], None]] = []


class _QuantLayer(nnx.Module):
  """State and quantization every NNX quantized layer shares.

  quant: the layer's ``QuantRule``. dtype: compute dtype of the matmul / conv (params, quantizers
  and BatchNorm statistics stay float32). w_bits, a_bits: initial bit-widths (None / 32 = full precision).
  """

  def __init__(self, kernel_shape: tuple, *, quant: QuantRule, dtype: Optional[Any], kernel_init: Callable,
               w_bits: BitsValue, a_bits: BitsValue, rngs: nnx.Rngs):
    if not isinstance(quant, QuantRule):
      raise ValueError(f"{type(self).__name__}: quant must be a layers.QuantRule, got {quant!r}.")
    self.w_bits = Bits(_checked_bits(w_bits, f"{type(self).__name__} w_bits"))
    self.a_bits = Bits(_checked_bits(a_bits, f"{type(self).__name__} a_bits"))
    self.quant = quant
    self.dtype = dtype
    self.kernel = nnx.Param(kernel_init(rngs.params(), kernel_shape, jnp.float32))
    if quant.lsq:  # present at every bit-width, as in Linen, so QAT and full-precision states match
      self.w_scale = nnx.Param(jnp.ones((kernel_shape[-1],) if quant.per_channel else (), jnp.float32))
    # No range: dynamic (batch min / max). nnx.data: set_act_range may later put an ActRange here.
    self.act_lo = nnx.data(None)
    self.act_hi = nnx.data(None)

  def set_act_range(self, lo: Optional[jax.Array], hi: Optional[jax.Array] = None) -> None:
    """Calibrated input range [lo, hi] (f32[] each), or None: the batch's own min / max.
    Changes the graph (variables appear / go): call before ``nnx.split``."""
    if lo is None:
      self.act_lo, self.act_hi = None, None
      return
    if hi is None:
      raise ValueError(f"{type(self).__name__}.set_act_range: give both lo and hi (or None for dynamic ranges).")
    self.act_lo = ActRange(jnp.asarray(lo, jnp.float32).reshape(()))
    self.act_hi = ActRange(jnp.asarray(hi, jnp.float32).reshape(()))

  def _bits(self) -> tuple[jax.Array, jax.Array]:
    w, a = self.w_bits[...], self.a_bits[...]
    quant.check_bits(w, name=f"{type(self).__name__}.w_bits")  # concrete values only, as in Linen
    quant.check_bits(a, name=f"{type(self).__name__}.a_bits")
    return w, a

  def _input(self, x: jax.Array, a_bits) -> jax.Array:
    for record in _RECORDERS:
      record(self, x)
    lo = None if self.act_lo is None else self.act_lo[...]
    hi = None if self.act_hi is None else self.act_hi[...]
    return quantize_input(x, a_bits, self.quant.ste, lo, hi)

  def _quant_kernel(self, kernel: jax.Array, w_bits) -> jax.Array:
    w_scale = self.w_scale[...] if self.quant.lsq else None
    return quantize_weights(kernel, w_bits, self.quant, w_scale)

  def _operands(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(input, kernel), both quantized in float32, then cast to the compute dtype."""
    w_bits, a_bits = self._bits()
    x = self._input(x, a_bits)
    return layers.compute_cast(self.dtype, x, self._quant_kernel(self.kernel[...], w_bits))


def _add_bias(bias: Optional[nnx.Param], y: jax.Array) -> jax.Array:
  if bias is None:
    return y
  return y + bias[...].reshape((1,) * (y.ndim - 1) + (-1,)).astype(y.dtype)


def _bias_param(use_bias: bool, bias_init: Callable, features: int, rngs: nnx.Rngs):
  return nnx.Param(bias_init(rngs.params(), (features,), jnp.float32)) if use_bias else None


class QuantLinear(_QuantLayer):
  """Dense layer with fake-quantized weights and inputs (Linen's QuantDense); nnx.Linear at 32 bits.

  x: [..., in_features] float -> [..., out_features]. kernel [in, out], bias [out] float32.
  """

  def __init__(self, in_features: int, out_features: int, *, quant: QuantRule = QuantRule(),
               use_bias: bool = True, dtype: Optional[Any] = None,
               kernel_init: Callable = nnx.initializers.lecun_normal(),
               bias_init: Callable = nnx.initializers.zeros_init(), w_bits: BitsValue = None,
               a_bits: BitsValue = None, rngs: nnx.Rngs):
    super().__init__((in_features, out_features), quant=quant, dtype=dtype, kernel_init=kernel_init,
                     w_bits=w_bits, a_bits=a_bits, rngs=rngs)
    self.bias = _bias_param(use_bias, bias_init, out_features, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x, kernel = self._operands(x)
    return _add_bias(self.bias, jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ()))))


class QuantConv(_QuantLayer):
  """2-D convolution (NHWC, HWIO kernel) with fake-quantized weights and inputs (Linen's QuantConv).

  x: [batch, height, width, in_features] -> [batch, height', width', out_features].
  """

  def __init__(self, in_features: int, out_features: int, kernel_size: Sequence[int] = (3, 3),
               strides: Union[int, Sequence[int]] = 1, padding: Padding = "SAME", *,
               quant: QuantRule = QuantRule(), use_bias: bool = True, dtype: Optional[Any] = None,
               kernel_init: Callable = nnx.initializers.lecun_normal(),
               bias_init: Callable = nnx.initializers.zeros_init(), w_bits: BitsValue = None,
               a_bits: BitsValue = None, rngs: nnx.Rngs):
    super().__init__(tuple(kernel_size) + (in_features, out_features), quant=quant, dtype=dtype,
                     kernel_init=kernel_init, w_bits=w_bits, a_bits=a_bits, rngs=rngs)
    self.strides, self.padding = strides, padding
    self.bias = _bias_param(use_bias, bias_init, out_features, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return _add_bias(self.bias, layers.conv_general(*self._operands(x), self.strides, self.padding))


class QuantConvBN(_QuantLayer):
  """Conv (no bias) then BatchNorm as one quantizable layer (Linen's QuantConvBN, same math).

  Training (``train=True``, or ``use_running_average=False`` via ``model.train()``): batch statistics,
  running ones updated in place: r <- momentum r + (1 - momentum) batch. Inference (the default, as
  Linen's ``train=False``): running statistics; with ``fold_bn`` they are folded into the kernel before
  weight quantization: conv(x, Q(W g)) + beta - mean g, g = scale / sqrt(var + eps) [C].
  x: [batch, height, width, in_features] -> [batch, height', width', out_features].
  """

  def __init__(self, in_features: int, out_features: int, kernel_size: Sequence[int] = (3, 3),
               strides: Union[int, Sequence[int]] = 1, padding: Padding = "SAME", *,
               fold_bn: bool = False, momentum: float = 0.9, epsilon: float = 1e-5,
               use_running_average: bool = True, quant: QuantRule = QuantRule(),
               dtype: Optional[Any] = None, kernel_init: Callable = nnx.initializers.lecun_normal(),
               scale_init: Callable = nnx.initializers.ones_init(), w_bits: BitsValue = None,
               a_bits: BitsValue = None, rngs: nnx.Rngs):
    if fold_bn and getattr(quant, "lsq", False):  # Linen raises at call time; known here at once
      raise ValueError("QuantConvBN: LSQ learned scales are not supported with fold_bn=True (the folded "
                       "kernel's range differs); use fold_bn=False with LSQ.")
    super().__init__(tuple(kernel_size) + (in_features, out_features), quant=quant, dtype=dtype,
                     kernel_init=kernel_init, w_bits=w_bits, a_bits=a_bits, rngs=rngs)
    self.strides, self.padding = strides, padding
    self.fold_bn, self.momentum, self.epsilon = fold_bn, momentum, epsilon
    self.use_running_average = use_running_average
    self.scale = nnx.Param(scale_init(rngs.params(), (out_features,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((out_features,), jnp.float32))
    self.mean = nnx.BatchStat(jnp.zeros((out_features,), jnp.float32))
    self.var = nnx.BatchStat(jnp.ones((out_features,), jnp.float32))

  def __call__(self, x: jax.Array, train: Optional[bool] = None) -> jax.Array:
    train = not self.use_running_average if train is None else train
    w_bits, a_bits = self._bits()
    x = self._input(x, a_bits)
    gamma, beta = self.scale[...], self.bias[...]
    if not train and self.fold_bn:
      folded, bias = fold_bn(self.kernel[...], None, gamma, beta, self.mean[...], self.var[...], self.epsilon)
      y = layers.conv_general(*layers.compute_cast(self.dtype, x, self._quant_kernel(folded, w_bits)),
                       self.strides, self.padding)
      return y + bias.astype(y.dtype)
    kernel = self._quant_kernel(self.kernel[...], w_bits)
    y = layers.conv_general(*layers.compute_cast(self.dtype, x, kernel), self.strides, self.padding)
    out_dtype, y = y.dtype, y.astype(jnp.float32)
    if train:
      axes = tuple(range(y.ndim - 1))
      mean = jnp.mean(y, axis=axes)
      var = jnp.mean(jnp.square(y - mean), axis=axes)
      self.mean[...] = self.momentum * self.mean[...] + (1.0 - self.momentum) * mean
      self.var[...] = self.momentum * self.var[...] + (1.0 - self.momentum) * var
    else:
      mean, var = self.mean[...], self.var[...]
    return ((y - mean) * bn_fold_scale(gamma, var, self.epsilon) + beta).astype(out_dtype)


QUANT_LAYER_TYPES = (QuantLinear, QuantConv, QuantConvBN)


# ----------------------------------------------------------------------------
# Finding layers, reading and setting their bits
# ----------------------------------------------------------------------------

def quant_layers(model: nnx.Module) -> dict[str, _QuantLayer]:
  """{path "block/conv": layer} of every quantized layer, in nnx.iter_modules order (sorted by
  attribute name, not forward order: see ``quant_layer_names``)."""
  return {"/".join(map(str, path)): m for path, m in nnx.iter_modules(model) if isinstance(m, QUANT_LAYER_TYPES)}


def quant_layer_names(model: nnx.Module, sample_input: Any, **call_kwargs) -> list[str]:
  """Paths of the quantized layers in forward-call order (what BitSpec's "first" / "last" mean).

  One abstract forward pass (``jax.eval_shape``, no FLOPs, the model is not changed); ``sample_input``
  may be an array or a ``jax.ShapeDtypeStruct`` [batch, ...].
  """
  graphdef, state = nnx.split(model)
  names: list[str] = []

  def forward(state, x):
    copy = nnx.merge(graphdef, state)
    paths = {id(m): p for p, m in quant_layers(copy).items()}
    record = lambda m, _: names.append(paths[id(m)]) if paths[id(m)] not in names else None  # noqa: E731
    _RECORDERS.append(record)
    try:
      copy(x, **call_kwargs)
    finally:
      _RECORDERS.remove(record)

  jax.eval_shape(forward, state, sample_input)
  return names


def _flat_bits(bits: Mapping, prefix: str = "") -> dict[str, dict]:
  """{path: {"w"?, "a"?}} from {path: (w, a) | {"w", "a"}} or a nested Linen "bits" tree."""
  out = {}
  for key, value in bits.items():
    path = f"{prefix}{key}"
    if isinstance(value, (tuple, list)):
      if len(value) != 2:
        raise ValueError(f"bits for layer {path!r} must be a (w_bits, a_bits) pair, got {value!r}.")
      out[path] = {"w": value[0], "a": value[1]}
    elif isinstance(value, Mapping) and value and set(value) <= {"w", "a"}:
      out[path] = dict(value)
    elif isinstance(value, Mapping):
      out.update(_flat_bits(value, f"{path}/"))
    else:
      raise ValueError(f"bits for layer {path!r} must be a (w_bits, a_bits) pair or {{'w': .., 'a': ..}}, "
                       f"got {value!r}.")
  return out


def set_bits(model: nnx.Module, bits: Union[BitSpec, Mapping], *,
             layer_names: Optional[Sequence[str]] = None) -> None:
  """Sets layers' bit-widths in place; layers not named keep theirs.

  bits: a BitSpec (every layer; "first" / "last" need ``layer_names=quant_layer_names(model, x)``),
    {path: (w_bits, a_bits)}, {path: {"w": .., "a": ..}} (either key may be missing) or a nested Linen
    "bits" tree. None means 32 (full precision); anything but an integer in 1..32 is a ValueError.
  """
  found = quant_layers(model)
  if isinstance(bits, BitSpec):
    if layer_names is None and {"first", "last"} & set(bits.layers):
      raise ValueError("BitSpec 'first' / 'last' need the forward order: pass "
                       "layer_names=quant_layer_names(model, sample_input).")
    resolved = bits.resolve(list(found) if layer_names is None else layer_names)
    bits = {name: {"w": w, "a": a} for name, (w, a) in resolved.items()}
  elif isinstance(bits, Mapping):  # {"w", "a"} alone: a root layer's Linen bits
    bits = _flat_bits({"": bits} if bits and set(bits) <= {"w", "a"} else bits)
  else:
    raise ValueError(f"set_bits takes a BitSpec or a mapping of layer paths to bits, got {type(bits).__name__}.")
  unknown = sorted(set(bits) - set(found))
  if unknown:
    raise ValueError(f"set_bits names layers the model does not have: {unknown}; its layers: {list(found)}.")
  checked = {path: {k: _checked_bits(v, f"bits[{path!r}][{k!r}]") for k, v in pair.items()}
             for path, pair in bits.items()}  # all checked before any is set
  for path, pair in checked.items():
    for key, value in pair.items():
      getattr(found[path], f"{key}_bits").set_value(value)


def bits_state(model: nnx.Module) -> nnx.State:
  """A copy of the model's bits: nnx.State {path...: {"w_bits", "a_bits": Bits f32[]}}, the state
  ``nnx.split(model, Bits, ...)`` gives (the split one aliases the model's variables; this one doesn't)."""
  return jax.tree.map(jnp.asarray, nnx.state(model, Bits))


def stack_bits(model: nnx.Module, settings: Sequence[Union[BitSpec, Mapping]], *,
               layer_names: Optional[Sequence[str]] = None) -> nnx.State:
  """Bits states for K settings (each as ``set_bits`` takes it, applied to the model's current bits)
  stacked on a leading axis: Bits f32[K], for ``jax.vmap`` / ``jax.lax.map``. The model is unchanged."""
  if not settings:
    raise ValueError("stack_bits needs at least one bits setting.")
  saved, states = bits_state(model), []
  try:
    for setting in settings:
      set_bits(model, setting, layer_names=layer_names)
      states.append(bits_state(model))
  finally:
    nnx.update(model, saved)
  return jax.tree.map(lambda *xs: jnp.stack(xs), *states)


# ----------------------------------------------------------------------------
# Activation ranges and Linen variables
# ----------------------------------------------------------------------------

def set_act_ranges(model: nnx.Module, quant_stats: Optional[Mapping]) -> None:
  """Sets calibrated input ranges from a Linen-style "quant_stats" tree {path...: {"lo", "hi"}}
  (e.g. ``layers.calibrate_activations`` or ``calibrate_activations`` below); layers not named keep
  theirs. None clears every layer's range (dynamic min / max). Changes the graph: call before split."""
  found = quant_layers(model)
  if quant_stats is None:
    for layer in found.values():
      layer.set_act_range(None)
    return
  flat = traverse_util.flatten_dict(dict(quant_stats), sep="/")
  ranges: dict[str, dict] = {}
  for key, value in flat.items():
    path, _, leaf = key.rpartition("/")
    if leaf not in ("lo", "hi"):
      raise ValueError(f"quant_stats leaf {key!r}: expected '<layer path>/lo' or '<layer path>/hi'.")
    ranges.setdefault(path, {})[leaf] = value
  unknown = sorted(set(ranges) - set(found))
  incomplete = sorted(p for p, r in ranges.items() if len(r) != 2)
  if unknown or incomplete:
    raise ValueError(f"quant_stats: unknown layers {unknown}, layers without both lo and hi {incomplete}; "
                     f"the model's layers: {list(found)}.")
  for path, r in ranges.items():
    found[path].set_act_range(r["lo"], r["hi"])


def calibrate_activations(model: nnx.Module, batches: Iterable[jax.Array], method: str = "minmax",
                          **calib_kwargs) -> dict:
  """Input ranges of every quantized layer over calibration batches, as Linen's ``calibrate_activations``.

  Runs a full-precision, inference-mode copy of the model (jitted once) on each batch [batch, ...] and
  reduces each layer's inputs with ``calibration.calibrate``. Returns the "quant_stats" tree
  {path...: {"lo", "hi"}} (f32[] each) for ``set_act_ranges``; the model itself is unchanged.
  """
  graphdef, state = nnx.split(model)
  order: list[str] = []  # the layer path of each captured input, filled while tracing

  @jax.jit
  def capture(state, x):
    copy = nnx.merge(graphdef, state)
    copy.eval()
    found = quant_layers(copy)
    paths = {id(m): p for p, m in found.items()}
    for layer in found.values():  # a numpy 32 stays concrete in the trace: no quantizer in the graph
      layer.w_bits.set_value(np.float32(quant.FULL_PRECISION_BITS))
      layer.a_bits.set_value(np.float32(quant.FULL_PRECISION_BITS))
    seen: list[jax.Array] = []
    record = lambda m, x: (order.append(paths[id(m)]), seen.append(x))  # noqa: E731
    order.clear()
    _RECORDERS.append(record)
    try:
      copy(x)
    finally:
      _RECORDERS.remove(record)
    return seen

  inputs: dict[str, list] = {}
  for batch in batches:
    xs = capture(state, batch)  # fills ``order`` when it traces
    for path, x in zip(order, xs):
      inputs.setdefault(path, []).append(x)
  return calibration.ranges_tree(inputs, method, **calib_kwargs)


def load_linen_variables(model: nnx.Module, variables: Mapping) -> None:
  """Copies Linen variables into a model whose attribute paths match the Linen module names.

  "params" and "batch_stats" replace the same-named NNX state (nnx.Param / nnx.BatchStat: every leaf
  named must exist, shapes as in Linen); "bits" goes through ``set_bits``, "quant_stats" through
  ``set_act_ranges``. Other collections are a ValueError.
  """
  extra = sorted(set(variables) - {"params", "batch_stats", layers.BITS, layers.QUANT_STATS})
  if extra:
    raise ValueError(f"load_linen_variables: unsupported collection(s) {extra}.")
  for collection, var_type in (("params", nnx.Param), ("batch_stats", nnx.BatchStat)):
    if collection in variables:
      state = nnx.state(model, var_type)
      nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, dict(variables[collection])))
      nnx.update(model, state)
  if layers.BITS in variables:
    set_bits(model, variables[layers.BITS])
  if layers.QUANT_STATS in variables:
    set_act_ranges(model, variables[layers.QUANT_STATS])
