"""Quantizing a plain Flax model without rewriting it: method interception, as Qwix does.

``quantize_module(model)`` wraps a Linen model made of ``nn.Dense`` / ``nn.Conv`` layers (any
other modules pass through unchanged) so that it behaves like an fqjax zoo model:

    qmodel = quantize_module(PlainNet(num_classes=10))
    qmodel.apply({"params": plain_params, "bits": bits_tree}, x, train=False)

* Params are identical to the plain model's (the wrapper shares its scope with the model): a
  trained Flax model's params load as they are. Only ``QuantRule(lsq=True)`` adds a "w_scale"
  param per layer, as the fqjax layers do.
* Each intercepted layer reads {"w", "a"} from the "bits" collection at its own path (the same
  layout and names as the fqjax layers, e.g. "Conv_0", "block/Dense_1"), quantizes its input and
  kernel with the fqjax layers' own quantizers (``layers.quantize_weights`` on the rule,
  ``quant.fake_quant`` for inputs), sows "act_inputs" / "quantized_kernels", and then runs the
  layer's own code with the quantized kernel, so every nn.Dense / nn.Conv option (dilation,
  groups, precision, dtypes) is kept. Without "bits" (or at >= 32) the output is the plain one, bit for bit.
* ``layers.quant_layer_names``, calibration, PTQ and explain (``dequantized_params``, the forward
  chain) find the intercepted layers: each is run as a ``_DenseTap`` / ``_ConvTap``, subclasses of
  QuantDense / QuantConv bound to the plain layer's own scope (so ``isinstance(m,
  layers.QUANT_LAYER_TYPES)`` holds at the plain layer's path, and no fqjax module needs a change).
* ``train=`` is forwarded when the model's ``__call__`` takes it (or **kwargs); otherwise it is
  dropped, so a model without a train flag (no BatchNorm / dropout) works too.
"""
from __future__ import annotations

import contextvars
import dataclasses
import inspect
from typing import Any, Optional

import flax.linen as nn
import jax

from fqjax.quantization import layers

INTERCEPTED_TYPES = (nn.Dense, nn.Conv)
# Set while a tap runs the plain layer's own code: that inner call must not be intercepted again.
_RUNNING_PLAIN = contextvars.ContextVar("fqjax_intercept_running_plain", default=False)


def _quantized_call(tap: nn.Module, x, *args, **kwargs):
  """What both taps do: quantize input and kernel as an fqjax layer does, then run the plain layer's code."""
  params = dict(tap.variables.get("params", {}))
  w_bits, a_bits = layers.read_bits(tap)
  x = layers.quantize_module_input(tap, x, a_bits)
  params["kernel"] = layers.quantize_module_kernel(tap, params["kernel"], w_bits)
  params.pop("w_scale", None)  # LSQ's step size belongs to the quantizer, not to the plain layer
  token = _RUNNING_PLAIN.set(True)
  try:  # the plain layer's own code, a pure function of its params, on the quantized kernel
    return tap.layer.apply({"params": params}, x, *args, **kwargs)
  finally:
    _RUNNING_PLAIN.reset(token)


class _DenseTap(layers.QuantDense):
  """An intercepted nn.Dense, seen by fqjax as the QuantDense it behaves as."""
  layer: Optional[nn.Module] = dataclasses.field(default=None, kw_only=True)

  @nn.compact
  def __call__(self, x, *args, **kwargs):
    return _quantized_call(self, x, *args, **kwargs)


class _ConvTap(layers.QuantConv):
  """An intercepted nn.Conv, seen by fqjax as the QuantConv it behaves as."""
  layer: Optional[nn.Module] = dataclasses.field(default=None, kw_only=True)

  @nn.compact
  def __call__(self, x, *args, **kwargs):
    return _quantized_call(self, x, *args, **kwargs)


def _tap_for(module: nn.Module, rule: layers.QuantRule) -> nn.Module:
  """The tap of a bound nn.Dense / nn.Conv, bound to that layer's own scope (same path, same variables)."""
  plain = module.clone(parent=None, name=None)
  common = dict(quant=rule, use_bias=module.use_bias, layer=plain, parent=module.scope)
  if isinstance(module, nn.Dense):
    return _DenseTap(features=module.features, **common)
  strides = 1 if module.strides is None else module.strides
  return _ConvTap(features=module.features, kernel_size=tuple(module.kernel_size), strides=strides,
                  padding=module.padding, **common)


def _interceptor(wrapper: "QuantizedModule"):
  """The method interceptor of ``wrapper``: every nn.Dense / nn.Conv call runs as its tap."""

  def intercept(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__" or _RUNNING_PLAIN.get():
      return next_fun(*args, **kwargs)
    if wrapper.fold_bn and isinstance(module, nn.BatchNorm):
      raise ValueError(f"fold_bn=True: the intercepted model's nn.BatchNorm {'/'.join(module.scope.path)!r} "
                       "cannot be folded into its conv by interception; use fold_bn=False (BatchNorm then "
                       "stays a separate full-precision op) or build the model from fqjax.quantization.layers.QuantConvBN.")
    if not isinstance(module, INTERCEPTED_TYPES):
      return next_fun(*args, **kwargs)
    if module.is_initializing():
      next_fun(*args, **kwargs)  # the plain layer creates its params with its own initializers
    return _tap_for(module, wrapper.quant)(*args, **kwargs)

  return intercept


def _takes_train(module: nn.Module) -> bool:
  """Whether ``module.__call__`` accepts a ``train`` keyword (named, or through **kwargs)."""
  params = inspect.signature(type(module).__call__).parameters.values()
  return any(p.name == "train" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


class QuantizedModule(nn.Module):
  """A plain Linen model whose nn.Dense / nn.Conv layers quantize at the "bits" collection's widths.

  model: the plain model (shares this module's scope: params identical to ``model``'s own).
  quant: how the intercepted layers quantize their weights (layers.QuantRule; ``layers.configured``
    changes it like a zoo model's).
  fold_bn: accepted so ``layers.configured(m, fold_bn=...)`` works; True fails on a model with
    nn.BatchNorm (interception cannot fold it) and is a no-op without one.
  Call: ``apply(variables, x, train=False, **kwargs)``; ``train`` goes to the model only if its
  ``__call__`` takes it.
  """
  model: nn.Module
  quant: layers.QuantRule = layers.QuantRule()
  fold_bn: bool = False

  def setup(self):
    nn.share_scope(self, self.model)  # no "model" level in the params: the plain model's tree as is

  def __call__(self, x: jax.Array, train: bool = False, **kwargs: Any) -> jax.Array:
    if _takes_train(self.model):
      kwargs["train"] = train
    with nn.intercept_methods(_interceptor(self)):
      return self.model(x, **kwargs)


def quantize_module(module: nn.Module, rule: Optional[layers.QuantRule] = None) -> QuantizedModule:
  """``module`` (a plain, unbound Linen model) made quantizable by interception; see the module docstring.

  rule: the QuantRule of every intercepted layer (default: QuantRule(), per channel, max scale).
  An already wrapped module gets the new rule (when given) instead of a second wrapper.
  """
  if not isinstance(module, nn.Module):
    raise TypeError(f"quantize_module takes a flax.linen.Module, got {type(module).__name__}.")
  if isinstance(module, QuantizedModule):
    return module if rule is None else module.clone(quant=rule)
  return QuantizedModule(model=module, quant=rule or layers.QuantRule())
