"""Model zoo: every model is built from fqjax.layers and reads its bits from a BitSpec's bits tree.

All models share one call signature: ``model.apply(variables, x, train=False)``.
"""
from typing import Any

import flax.linen as nn

from fqjax.models.cnn import SmallCNN
from fqjax.models.mlp import MLP
from fqjax.models.resnet import ResNet, resnet
from fqjax.models.vgg import VGG, vgg

MODEL_NAMES = ("mlp", "small_cnn", "resnet18", "resnet34", "resnet50", "vgg11", "vgg16")


def get_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
  """Builds a model by name (one of MODEL_NAMES); kwargs go to the module (e.g. stem, width, fold_bn)."""
  if not isinstance(num_classes, int) or num_classes < 2:
    raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}.")
  if name == "mlp":
    return MLP(num_classes=num_classes, **kwargs)
  if name == "small_cnn":
    return SmallCNN(num_classes=num_classes, **kwargs)
  if name.startswith("resnet") and name in MODEL_NAMES:
    return resnet(int(name[6:]), num_classes, **kwargs)
  if name.startswith("vgg") and name in MODEL_NAMES:
    return vgg(int(name[3:]), num_classes, **kwargs)
  raise ValueError(f"unknown model {name!r}; allowed: {MODEL_NAMES}.")


__all__ = ["MLP", "SmallCNN", "ResNet", "VGG", "resnet", "vgg", "get_model", "MODEL_NAMES"]
