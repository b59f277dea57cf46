"""Quantized Flax linen layers and the BitSpec that assigns their bit-widths.

Bit-widths are data, not module attributes: every quantized layer reads its
weight and activation bits from the ``"bits"`` variable collection, so

    model.apply({"params": p, "batch_stats": s, "bits": bits_tree}, x)

quantizes with whatever ``bits_tree`` holds, traced or not (``jax.vmap`` over a
stacked ``bits_tree`` is a bit-width sweep with one compilation). Without a
``"bits"`` collection a layer is full precision with no quantizer in the graph.

Collections used here:
  "bits":        {layer path...: {"w": [] float32, "a": [] float32}}; >= 32 = full precision.
  "quant_stats": {layer path...: {"lo": [] float32, "hi": [] float32}}: calibrated input ranges.
                 Absent: activations are quantized with the batch's own min/max.
  "act_inputs":  sown layer inputs, only when made mutable (calibration).
  "quantized_kernels": sown effective kernels (after folding and quantization), only when mutable.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fqjax import quant

BITS = "bits"
QUANT_STATS = "quant_stats"
ACT_INPUTS = "act_inputs"
KERNELS = "quantized_kernels"
Padding = Union[str, int, Sequence[tuple[int, int]]]


# ----------------------------------------------------------------------------
# Reading bits and quantizing inputs and weights inside a layer
# ----------------------------------------------------------------------------

def _read_bits(module: nn.Module) -> tuple[Optional[jax.Array], Optional[jax.Array]]:
  """(w_bits, a_bits) from the "bits" collection, or (None, None) when absent."""
  w = module.get_variable(BITS, "w") if module.has_variable(BITS, "w") else None
  a = module.get_variable(BITS, "a") if module.has_variable(BITS, "a") else None
  return w, a


def _sow(module: nn.Module, collection: str, name: str, value: jax.Array) -> None:
  # Not at init: model.init makes every collection mutable, and captures would leak into the variables.
  if not module.is_initializing() and module.is_mutable_collection(collection):
    module.sow(collection, name, value)


def _quantize_input(module: nn.Module, x: jax.Array, a_bits, ste: str) -> jax.Array:
  _sow(module, ACT_INPUTS, "x", x)
  if a_bits is None:
    return x
  if module.has_variable(QUANT_STATS, "lo"):
    scale, zp = quant.scale_zero_point_from_range(
        module.get_variable(QUANT_STATS, "lo"), module.get_variable(QUANT_STATS, "hi"), a_bits,
        symmetric=False)
    return quant.fake_quant(x, a_bits, symmetric=False, scale=scale, zero_point=zp, ste=ste)
  return quant.fake_quant(x, a_bits, symmetric=False, ste=ste)


def _quantize_kernel(module: nn.Module, kernel: jax.Array, w_bits, per_channel: bool, narrow_range: bool,
                     ste: str) -> jax.Array:
  axis = kernel.ndim - 1 if per_channel else None
  if getattr(module, "lsq", False):
    # Learned step size: one "w_scale" param per output channel (or per tensor); see quant.lsq_fake_quant.
    shape = (kernel.shape[-1],) if per_channel else ()
    w_scale = module.param("w_scale", nn.initializers.ones_init(), shape, jnp.float32)
    if w_bits is not None:
      kernel = quant.lsq_fake_quant(kernel, w_scale, w_bits, axis=axis)
  elif w_bits is not None:
    kernel = quant.fake_quant(kernel, w_bits, symmetric=True, narrow_range=narrow_range, axis=axis, ste=ste)
  _sow(module, KERNELS, "kernel", kernel)
  return kernel


def _compute_cast(dtype, x: jax.Array, kernel: jax.Array):
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


def _conv(x, kernel, strides, padding):
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
  w_bits, a_bits = _read_bits(module)
  x = _quantize_input(module, x, a_bits, module.ste)
  kernel = _quantize_kernel(module, kernel, w_bits, module.per_channel, module.narrow_range, module.ste)
  return _compute_cast(module.dtype, x, kernel)


def _add_bias(module: nn.Module, y: jax.Array) -> jax.Array:
  if not module.use_bias:
    return y
  bias = module.param("bias", module.bias_init, (module.features,), jnp.float32)
  return y + bias.reshape((1,) * (y.ndim - 1) + (-1,)).astype(y.dtype)


class QuantDense(nn.Module):
  """Dense layer with fake-quantized weights and inputs; nn.Dense at full precision.

  x: [..., in] float -> [..., features]. Weights per output channel (last axis)
  when ``per_channel``; inputs asymmetric per tensor.
  """
  features: int
  use_bias: bool = True
  per_channel: bool = True
  narrow_range: bool = False
  ste: str = "clipped"
  lsq: bool = False
  dtype: Optional[Any] = None  # compute dtype (e.g. jnp.bfloat16); params and quantizers stay float32
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x, kernel = _quantized_operands(self, x, (jnp.shape(x)[-1], self.features))
    return _add_bias(self, jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ()))))


class QuantConv(nn.Module):
  """2-D convolution (NHWC, HWIO kernel) with fake-quantized weights and inputs; nn.Conv at full precision.

  x: [batch, height, width, in] float -> [batch, height', width', features].
  """
  features: int
  kernel_size: Sequence[int] = (3, 3)
  strides: Union[int, Sequence[int]] = 1
  padding: Padding = "SAME"
  use_bias: bool = True
  per_channel: bool = True
  narrow_range: bool = False
  ste: str = "clipped"
  lsq: bool = False
  dtype: Optional[Any] = None  # compute dtype (e.g. jnp.bfloat16); params and quantizers stay float32
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x, kernel = _quantized_operands(self, x, tuple(self.kernel_size) + (jnp.shape(x)[-1], self.features))
    return _add_bias(self, _conv(x, kernel, self.strides, self.padding))


def fold_bn(kernel: jax.Array, bias: Optional[jax.Array], gamma: jax.Array, beta: jax.Array,
            mean: jax.Array, var: jax.Array, eps: float) -> tuple[jax.Array, jax.Array]:
  """Folds inference BatchNorm into the preceding conv/dense.

  kernel: [..., C] (output channels last); gamma, beta, mean, var, bias: [C].
  BN(conv(x, W) + b) = conv(x, W * g) + (beta + (b - mean) * g), g = gamma / sqrt(var + eps).
  """
  g = gamma * jax.lax.rsqrt(var + eps)
  b = jnp.zeros_like(mean) if bias is None else bias
  return kernel * g, beta + (b - mean) * g


class QuantConvBN(nn.Module):
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
  per_channel: bool = True
  narrow_range: bool = False
  ste: str = "clipped"
  lsq: bool = False
  dtype: Optional[Any] = None  # compute dtype of the conv; BatchNorm statistics stay float32
  momentum: float = 0.9
  epsilon: float = 1e-5
  kernel_init: Callable = nn.initializers.lecun_normal()
  scale_init: Callable = nn.initializers.ones_init()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    shape = tuple(self.kernel_size) + (jnp.shape(x)[-1], self.features)
    kernel = self.param("kernel", self.kernel_init, shape, jnp.float32)
    gamma = self.param("scale", self.scale_init, (self.features,), jnp.float32)
    beta = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((self.features,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((self.features,), jnp.float32))
    w_bits, a_bits = _read_bits(self)
    x = _quantize_input(self, x, a_bits, self.ste)

    if not train and self.fold_bn:
      if self.lsq:
        raise ValueError(f"layer {'/'.join(self.scope.path)}: LSQ learned scales are not supported with "
                         "fold_bn=True (the folded kernel's range differs); use fold_bn=False with LSQ.")
      folded, bias = fold_bn(kernel, None, gamma, beta, ra_mean.value, ra_var.value, self.epsilon)
      folded = _quantize_kernel(self, folded, w_bits, self.per_channel, self.narrow_range, self.ste)
      y = _conv(*_compute_cast(self.dtype, x, folded), self.strides, self.padding)
      return y + bias.astype(y.dtype)

    kernel = _quantize_kernel(self, kernel, w_bits, self.per_channel, self.narrow_range, self.ste)
    y = _conv(*_compute_cast(self.dtype, x, kernel), self.strides, self.padding)
    out_dtype = y.dtype
    y = y.astype(jnp.float32)
    if train:
      axes = tuple(range(y.ndim - 1))
      mean = jnp.mean(y, axis=axes)
      var = jnp.mean(jnp.square(y - mean), axis=axes)
      if not self.is_initializing():
        ra_mean.value = self.momentum * ra_mean.value + (1.0 - self.momentum) * mean
        ra_var.value = self.momentum * ra_var.value + (1.0 - self.momentum) * var
    else:
      mean, var = ra_mean.value, ra_var.value
    return ((y - mean) * (gamma * jax.lax.rsqrt(var + self.epsilon)) + beta).astype(out_dtype)


QUANT_LAYER_TYPES = (QuantDense, QuantConv, QuantConvBN)


def init_lsq_scales(params: Mapping, layer_bits: Mapping[str, tuple], per_channel: bool = True) -> dict:
  """Params with every layer's "w_scale" set to LSQ's init 2 mean|w| / sqrt(qmax) at its weight bits.

  layer_bits: BitSpec.resolve output {layer: (w_bits, a_bits)}; layers at full precision keep 1.
  """
  params = jax.tree_util.tree_map(lambda a: a, dict(params))  # shallow copies of the nested dicts

  def node_of(tree, name):
    for part in name.split("/"):
      tree[part] = dict(tree[part])
      tree = tree[part]
    return tree

  for name, (w_bits, _) in layer_bits.items():
    node = node_of(params, name)
    if "w_scale" not in node:
      raise ValueError(f"layer {name!r} has no 'w_scale' param; build the model with lsq=True for LSQ.")
    if w_bits is not None and w_bits < quant.FULL_PRECISION_BITS:
      node["w_scale"] = quant.lsq_init_scale(node["kernel"], w_bits, axis=-1 if per_channel else None)
  return params


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
# BitSpec: mixed precision as data
# ----------------------------------------------------------------------------

LayerBits = tuple[Optional[int], Optional[int]]


@dataclasses.dataclass(frozen=True)
class BitSpec:
  """Weight/activation bits per layer: a default plus per-layer overrides.

  w_bits, a_bits: defaults; None means full precision.
  layers: {layer name: (w_bits, a_bits)}; a name is a layer path from
    ``quant_layer_names`` or the alias "first" / "last" (first / last layer in
    forward order). Later entries win; exact names win over aliases.
  """
  w_bits: Optional[int] = None
  a_bits: Optional[int] = None
  layers: Mapping[str, LayerBits] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    quant.check_bits(self.w_bits, name="BitSpec.w_bits")
    quant.check_bits(self.a_bits, name="BitSpec.a_bits")
    for name, pair in self.layers.items():
      if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise ValueError(f"BitSpec.layers[{name!r}] must be a (w_bits, a_bits) pair, got {pair!r}.")
      quant.check_bits(pair[0], name=f"BitSpec.layers[{name!r}] w_bits")
      quant.check_bits(pair[1], name=f"BitSpec.layers[{name!r}] a_bits")

  @classmethod
  def uniform(cls, w_bits: Optional[int], a_bits: Optional[int] = None) -> "BitSpec":
    return cls(w_bits=w_bits, a_bits=a_bits)

  @classmethod
  def first_last(cls, w_bits: Optional[int], edge_bits: int = 8, a_bits: Optional[int] = None,
                 edge_a_bits: Optional[int] = None) -> "BitSpec":
    """Mixed precision: first and last layer at ``edge_bits``, every other layer at ``w_bits``."""
    edge_a = a_bits if edge_a_bits is None else edge_a_bits
    return cls(w_bits=w_bits, a_bits=a_bits,
               layers={"first": (edge_bits, edge_a), "last": (edge_bits, edge_a)})

  def resolve(self, layer_names: Sequence[str]) -> dict[str, LayerBits]:
    """{layer name: (w_bits, a_bits)} for every layer; unknown names are a ValueError."""
    layer_names = list(layer_names)
    if not layer_names:
      raise ValueError("BitSpec.resolve got no layer names; the model has no quantizable layers.")
    unknown = [n for n in self.layers if n not in layer_names and n not in ("first", "last")]
    if unknown:
      raise ValueError(f"BitSpec names layers the model does not have: {unknown}. "
                       f"Allowed: 'first', 'last' or one of {layer_names}.")
    out = {n: (self.w_bits, self.a_bits) for n in layer_names}
    aliases = {"first": layer_names[0], "last": layer_names[-1]}
    for alias, target in aliases.items():
      if alias in self.layers:
        out[target] = tuple(self.layers[alias])
    for name, pair in self.layers.items():
      if name not in aliases:
        out[name] = tuple(pair)
    return out

  def bits_tree(self, layer_names: Sequence[str]) -> dict:
    """The "bits" variable collection: nested {path: {"w": f32[], "a": f32[]}}; None -> 32."""
    return bits_tree_from(self.resolve(layer_names))


def _as_bits(b) -> jax.Array:
  return jnp.asarray(quant.FULL_PRECISION_BITS if b is None else b, jnp.float32)


def bits_tree_from(resolved: Mapping[str, LayerBits]) -> dict:
  """Nested "bits" collection from {layer path: (w_bits, a_bits)}."""
  tree: dict = {}
  for name, (w, a) in resolved.items():
    node = tree
    for part in name.split("/"):
      node = node.setdefault(part, {})
    node["w"], node["a"] = _as_bits(w), _as_bits(a)
  return tree


def stack_bits_trees(trees: Sequence[dict]) -> dict:
  """Stacks bits trees on a new leading axis, for ``jax.vmap`` over bit-widths."""
  if not trees:
    raise ValueError("stack_bits_trees needs at least one bits tree.")
  return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)


def weight_bits_by_layer(spec: BitSpec, layer_names: Sequence[str]) -> dict[str, Optional[int]]:
  """{layer: w_bits} for ``quant.storage_size``."""
  return {name: w for name, (w, _) in spec.resolve(layer_names).items()}


# ----------------------------------------------------------------------------
# Activation calibration
# ----------------------------------------------------------------------------

def calibrate_activations(model: nn.Module, variables: Mapping, batches: Iterable[jax.Array],
                          method: str = "minmax", **calib_kwargs) -> dict:
  """Input ranges of every quantized layer over calibration batches.

  Runs the full-precision model in inference mode on each batch [batch, ...],
  and reduces each layer's inputs with ``quant.calibrate`` (minmax, ema or
  percentile). Returns the "quant_stats" collection {path: {"lo", "hi"}}.
  """
  fp_vars = {k: v for k, v in variables.items() if k not in (BITS, QUANT_STATS)}

  @jax.jit
  def capture(x):
    _, state = model.apply(fp_vars, x, train=False, mutable=[ACT_INPUTS])
    return state[ACT_INPUTS]

  per_layer: dict[tuple, list] = {}
  for batch in batches:
    for path, leaf in jax.tree_util.tree_leaves_with_path(capture(batch)):
      key = tuple(str(getattr(k, "key", k)) for k in path[:-2])  # drop "x" and the sow tuple index
      per_layer.setdefault(key, []).append(leaf)
  if not per_layer:
    raise ValueError("calibrate_activations got no batches (or the model has no quantized layers).")
  stats: dict = {}
  for key, values in per_layer.items():
    rng = quant.calibrate(values, method, **calib_kwargs)
    node = stats
    for part in key:
      node = node.setdefault(part, {})
    node["lo"], node["hi"] = rng.lo, rng.hi
  return stats
