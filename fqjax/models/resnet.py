"""ResNet 18/34/50 (He et al., 2016) built from quantized layers.

stem="cifar": 3x3 conv, stride 1, no max-pool (32x32 inputs).
stem="imagenet": 7x7 conv, stride 2, then 3x3 max-pool stride 2.
"""
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fqjax.quantization.layers import QuantConvBN, QuantDense
from fqjax.models.common import QuantModel

STEMS = ("cifar", "imagenet")


class _Block(QuantModel):
  """A residual block: ``features`` channels (x ``expansion`` at its output), downsampling by ``strides``."""
  features: int
  strides: int = 1


class BasicBlock(_Block):
  """Two 3x3 convs with an identity (or 1x1 projection) shortcut. Expansion 1."""
  expansion = 1

  @nn.compact
  def __call__(self, x, train: bool):
    kw = self.quant_kwargs()
    y = nn.relu(QuantConvBN(self.features, (3, 3), self.strides, name="conv1", **kw)(x, train))
    y = QuantConvBN(self.features, (3, 3), 1, name="conv2", **kw)(y, train)
    if x.shape != y.shape:
      x = QuantConvBN(self.features, (1, 1), self.strides, name="shortcut", **kw)(x, train)
    return nn.relu(x + y)


class Bottleneck(_Block):
  """1x1 reduce, 3x3, 1x1 expand (x4), with projection shortcut when shapes differ."""
  expansion = 4

  @nn.compact
  def __call__(self, x, train: bool):
    kw = self.quant_kwargs()
    y = nn.relu(QuantConvBN(self.features, (1, 1), 1, name="conv1", **kw)(x, train))
    y = nn.relu(QuantConvBN(self.features, (3, 3), self.strides, name="conv2", **kw)(y, train))
    y = QuantConvBN(self.features * 4, (1, 1), 1, name="conv3", **kw)(y, train)
    if x.shape != y.shape:
      x = QuantConvBN(self.features * 4, (1, 1), self.strides, name="shortcut", **kw)(x, train)
    return nn.relu(x + y)


class ResNet(QuantModel):
  """x: [batch, height, width, channels] float32 -> logits [batch, num_classes]."""
  num_classes: int
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  block: str = "basic"
  stem: str = "cifar"
  width: int = 64

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    if self.stem not in STEMS:
      raise ValueError(f"ResNet stem must be one of {STEMS}, got {self.stem!r}.")
    kw = self.quant_kwargs()
    block_cls = {"basic": BasicBlock, "bottleneck": Bottleneck}[self.block]
    if self.stem == "cifar":
      x = nn.relu(QuantConvBN(self.width, (3, 3), 1, name="stem", **kw)(x, train))
    else:
      x = nn.relu(QuantConvBN(self.width, (7, 7), 2, padding=[(3, 3), (3, 3)], name="stem", **kw)(x, train))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
    for stage, num_blocks in enumerate(self.stage_sizes):
      for b in range(num_blocks):
        strides = 2 if stage > 0 and b == 0 else 1
        x = block_cls(self.width * 2**stage, strides, name=f"stage{stage + 1}_block{b + 1}", **kw)(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return QuantDense(self.num_classes, name="head", **self.quant_kwargs(bn=False))(x)


RESNET_DEPTHS = {18: ((2, 2, 2, 2), "basic"), 34: ((3, 4, 6, 3), "basic"), 50: ((3, 4, 6, 3), "bottleneck")}


def resnet(depth: int, num_classes: int, **kwargs) -> ResNet:
  if depth not in RESNET_DEPTHS:
    raise ValueError(f"ResNet depth must be one of {sorted(RESNET_DEPTHS)}, got {depth!r}.")
  stages, block = RESNET_DEPTHS[depth]
  return ResNet(num_classes=num_classes, stage_sizes=stages, block=block, **kwargs)
