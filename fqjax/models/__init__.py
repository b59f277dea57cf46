"""Model zoo: every model is built from fqjax.quantization.layers and reads its bits from a BitSpec's bits tree.

All models share one call signature: ``model.apply(variables, x, train=False)``.

Besides the zoo names (MODEL_NAMES), ``get_model`` takes "package.module:factory": any Linen model
``factory(num_classes=..., **kwargs)`` returns. A model with a ``quant`` rule (built from fqjax.quantization.layers)
is used as it is; any other (plain nn.Dense / nn.Conv) is made quantizable by interception
(fqjax.quantization.intercept.quantize_module, params unchanged). Its ``__call__`` should take ``train=`` like the
zoo models (BatchNorm / dropout follow it); one without it works too: the wrapper drops ``train``.
"""
import dataclasses
import importlib
from functools import partial
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import numpy as np

from fqjax.quantization import intercept, layers
from fqjax.errors import InputError
from fqjax.models.cnn import SmallCNN
from fqjax.models.mlp import MLP
from fqjax.models.resnet import ResNet, resnet
from fqjax.models.vgg import VGG, vgg

# name -> constructor(num_classes=..., **kwargs)
MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "small_cnn": SmallCNN,
    "resnet18": partial(resnet, 18),
    "resnet34": partial(resnet, 34),
    "resnet50": partial(resnet, 50),
    "vgg11": partial(vgg, 11),
    "vgg16": partial(vgg, 16),
}
MODEL_NAMES = tuple(MODELS)


def get_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
  """Builds a model by name: one of MODEL_NAMES, or "package.module:factory" (see the module docstring).

  kwargs go to the module (e.g. stem, width, fold_bn, dtype, quant) or to the factory; the QuantRule's
  field names (per_channel, narrow_range, ste, lsq, scale) are folded into its ``quant`` rule, so a
  config's ``model.kwargs.per_channel=False`` works.
  """
  if not isinstance(num_classes, int) or num_classes < 2:
    raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}.")
  rule = {k: kwargs.pop(k) for k in layers.RULE_OPTIONS if k in kwargs}
  if isinstance(name, str) and ":" in name:
    model = _from_factory(name, num_classes, kwargs)
    if "quant" not in {f.name for f in dataclasses.fields(model)}:
      model = intercept.quantize_module(model)  # plain layers: quantized by interception
    return layers.configured(model, **rule)
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; allowed: {MODEL_NAMES} or 'package.module:factory'.")
  return layers.configured(MODELS[name](num_classes=num_classes, **kwargs), **rule)


def _from_factory(name: str, num_classes: int, kwargs: dict) -> nn.Module:
  """The unbound Linen module that the factory "package.module:factory" builds; InputError saying how to fix
  a module that does not import, a missing factory, a factory that fails or one that returns no Module."""
  module_name, _, attr = name.partition(":")
  if not module_name or not attr or ":" in attr:
    raise InputError(f"model {name!r}: a custom model is named 'package.module:factory' (one ':'), e.g. "
                     "'mypkg.models:make_model'.")
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise InputError(f"model {name!r}: cannot import module {module_name!r} ({type(e).__name__}: {e}). Make it "
                     "importable (install its package, or run from the folder that holds it / add that folder "
                     "to PYTHONPATH).") from e
  factory = getattr(module, attr, None)
  if not callable(factory):
    found = "is not callable" if hasattr(module, attr) else "does not exist"
    public = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
    raise InputError(f"model {name!r}: {module_name}.{attr} {found}; the part after ':' must name a function "
                     f"or class of {module_name} (callables there: {public}).")
  try:
    model = factory(num_classes=num_classes, **kwargs)
  except Exception as e:  # noqa: BLE001 (any failure of user code becomes one actionable message)
    raise InputError(f"model {name!r}: {attr}(num_classes={num_classes}, **{kwargs}) failed "
                     f"({type(e).__name__}: {e}). The factory must take num_classes and the config's "
                     "model.kwargs as keyword arguments.") from e
  if not isinstance(model, nn.Module):
    raise InputError(f"model {name!r}: {attr}(...) returned {type(model).__name__}, not a flax.linen.Module; "
                     "return the unbound module (e.g. MyNet(num_classes=num_classes)), not its variables.")
  if model.scope is not None:
    raise InputError(f"model {name!r}: {attr}(...) returned a bound module; return it unbound (no .bind()).")
  return model


def resolved_model_name(config, info) -> str:
  """config.model.name (a zoo name or "package.module:factory", as given), or for "auto" the MLP for
  [N, D] inputs and small_cnn for images (``info``: the dataset's fqjax.data.DatasetInfo)."""
  if config.model.name != "auto":
    return config.model.name
  return "mlp" if len(info.input_shape) == 1 else "small_cnn"


def build_model(config, info) -> nn.Module:
  """The model of config.model for the data described by ``info`` (classes, input shape): a zoo model, or
  the Linen model of a "package.module:factory" name, built with model.kwargs (and dtype=bfloat16 for
  compute_dtype "bfloat16"). A kwarg the model does not take is an InputError naming config.model.kwargs."""
  kwargs = dict(config.model.kwargs.to_dict()) if hasattr(config.model.kwargs, "to_dict") else dict(
      config.model.kwargs or {})
  if config.model.get("compute_dtype", "float32") == "bfloat16":
    kwargs["dtype"] = jax.numpy.bfloat16
  # A config read back from config.json has lists where tuples were; Flax module fields must be hashable.
  kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
  name = resolved_model_name(config, info)
  try:
    return get_model(name, info.num_classes, **kwargs)
  except InputError as e:  # a custom factory's own message says what to fix
    raise InputError(f"config.model.name is invalid: {e}") from e
  except (TypeError, ValueError) as e:
    raise InputError(f"config.model.kwargs is invalid: got {kwargs!r}; allowed: fields of the {name} module ({e}). "
                     "Fix it in the experiment file or with --config.model.kwargs.<field>=...") from e


def check_model(model: nn.Module, sample, num_classes: int, name: str) -> list[str]:
  """Checks, by abstract evaluation only, that the model fits a study before any training: its logits are
  [batch, num_classes], it trains without an RNG stream fqjax does not give (dropout), and it has layers to
  quantize. Returns their names (fqjax.quantization.layers.quant_layer_names); InputError naming the model
  otherwise. ``sample``: [batch, ...] inputs (or their ShapeDtypeStruct)."""
  where = f"config.model.name={name!r}"
  try:
    variables = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), sample)
    logits = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, sample)
    jax.eval_shape(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]), variables, sample)
  except flax.errors.InvalidRngError as e:
    raise InputError(f"{where}: the model needs an RNG stream in training ({e}); fqjax trains without one. "
                     "Remove dropout (or other stochastic layers), or make them deterministic.") from e
  if not hasattr(logits, "shape") or tuple(logits.shape) != (sample.shape[0], num_classes):
    got = getattr(logits, "shape", type(logits).__name__)
    raise InputError(f"{where}: the model's output is {got} for a batch of {sample.shape[0]}, not logits "
                     f"[{sample.shape[0]}, {num_classes}] for the data's {num_classes} classes; make its last layer "
                     f"output num_classes={num_classes} (the factory is called with num_classes).")
  names = layers.quant_layer_names(model, sample)
  if not names:
    raise InputError(f"{where}: the model has no Dense or Conv layer to quantize (fqjax quantizes flax.linen "
                     "Dense / Conv and its own Quant* layers); build it from those.")
  return names


def num_params(model: nn.Module, sample) -> int:
  """Parameter count of ``model`` on inputs shaped like ``sample`` (traced only, nothing computed)."""
  shapes = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), sample)
  return int(sum(np.prod(a.shape) for a in jax.tree_util.tree_leaves(shapes["params"])))


__all__ = ["MLP", "SmallCNN", "ResNet", "VGG", "resnet", "vgg", "get_model", "build_model", "check_model", "num_params",
           "resolved_model_name", "MODELS", "MODEL_NAMES"]
