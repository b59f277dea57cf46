"""Model zoo: every model is built from fqjax.layers and reads its bits from a BitSpec's bits tree.

All models share one call signature: ``model.apply(variables, x, train=False)``.
"""
from functools import partial
from typing import Any, Callable

import flax.linen as nn

from fqjax import layers
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
  """Builds a model by name (one of MODEL_NAMES).

  kwargs go to the module (e.g. stem, width, fold_bn, dtype, quant); the QuantRule's field
  names (per_channel, narrow_range, ste, lsq) are folded into its ``quant`` rule, so a config's
  ``model.kwargs.per_channel=False`` works.
  """
  if not isinstance(num_classes, int) or num_classes < 2:
    raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}.")
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; allowed: {MODEL_NAMES}.")
  rule = {k: kwargs.pop(k) for k in layers.RULE_OPTIONS if k in kwargs}
  return layers.configured(MODELS[name](num_classes=num_classes, **kwargs), **rule)


__all__ = ["MLP", "SmallCNN", "ResNet", "VGG", "resnet", "vgg", "get_model", "MODELS", "MODEL_NAMES"]
