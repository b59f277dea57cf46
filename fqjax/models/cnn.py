"""SmallCNN: a compact conv net for 8x8 (digits) and 28x28 (MNIST) inputs."""
import flax.linen as nn
import jax
import jax.numpy as jnp

from fqjax.quantization.layers import QuantConvBN, QuantDense
from fqjax.models.common import QuantModel


class SmallCNN(QuantModel):
  """x: [batch, height, width, channels] float32 -> logits [batch, num_classes].

  conv(w) -> conv(2w) -> maxpool 2 -> conv(4w) -> [maxpool 2 if still >= 8 wide]
  -> global average pool -> dense. Every conv is QuantConvBN + ReLU.
  """
  num_classes: int
  width: int = 32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    conv = lambda f, name: QuantConvBN(f, (3, 3), name=name, **self.quant_kwargs())
    x = nn.relu(conv(self.width, "conv1")(x, train))
    x = nn.relu(conv(2 * self.width, "conv2")(x, train))
    x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = nn.relu(conv(4 * self.width, "conv3")(x, train))
    if x.shape[1] >= 8:
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = jnp.mean(x, axis=(1, 2))
    return QuantDense(self.num_classes, name="head", **self.quant_kwargs(bn=False))(x)
