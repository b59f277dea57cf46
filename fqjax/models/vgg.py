"""VGG 11/16 with BatchNorm (Simonyan and Zisserman, 2015), CIFAR-style classifier."""
from typing import Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from fqjax.quantization.layers import QuantConvBN, QuantDense
from fqjax.models.common import QuantModel

VGG_CONFIGS = {
    11: (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    16: (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
}


class VGG(QuantModel):
  """x: [batch, height, width, channels] -> logits [batch, num_classes].

  Max-pools are skipped once the feature map is 1x1, and a global average
  pool feeds one dense head, so any input of at least 1x1 works.
  """
  num_classes: int
  layout: Sequence[Union[int, str]] = VGG_CONFIGS[16]

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    i = 0
    for item in self.layout:
      if item == "M":
        if x.shape[1] > 1:
          x = nn.max_pool(x, (2, 2), strides=(2, 2))
        continue
      i += 1
      x = nn.relu(QuantConvBN(int(item), (3, 3), name=f"conv{i}", **self.quant_kwargs())(x, train))
    x = jnp.mean(x, axis=(1, 2))
    return QuantDense(self.num_classes, name="head", **self.quant_kwargs(bn=False))(x)


def vgg(depth: int, num_classes: int, **kwargs) -> VGG:
  if depth not in VGG_CONFIGS:
    raise ValueError(f"VGG depth must be one of {sorted(VGG_CONFIGS)}, got {depth!r}.")
  return VGG(num_classes=num_classes, layout=VGG_CONFIGS[depth], **kwargs)
