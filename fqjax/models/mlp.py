"""Multi-layer perceptron for tabular features (or flattened images)."""
from typing import Sequence

import flax.linen as nn
import jax

from fqjax.quantization.layers import QuantDense
from fqjax.models.common import QuantModel


class MLP(QuantModel):
  """x: [batch, ...] float32 (flattened) -> logits [batch, num_classes].

  Hidden layers are QuantDense + ReLU; ``train`` and ``fold_bn`` (no BatchNorm here) are
  accepted for a uniform model API.
  """
  num_classes: int
  hidden: Sequence[int] = (256, 128)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = x.reshape((x.shape[0], -1))
    kw = self.quant_kwargs(bn=False)
    dense = lambda f, name: QuantDense(f, name=name, **kw)
    for i, width in enumerate(self.hidden):
      x = nn.relu(dense(width, f"dense{i}")(x))
    return dense(self.num_classes, "head")(x)
