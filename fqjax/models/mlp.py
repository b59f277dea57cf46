"""Multi-layer perceptron for tabular features (or flattened images)."""
from typing import Any, Sequence

import flax.linen as nn
import jax

from fqjax.models.common import quant_kwargs
from fqjax.layers import QuantDense


class MLP(nn.Module):
  """x: [batch, ...] float32 (flattened) -> logits [batch, num_classes].

  Hidden layers are QuantDense + ReLU; ``train`` is accepted for a uniform model API.
  """
  num_classes: int
  hidden: Sequence[int] = (256, 128)
  per_channel: bool = True
  ste: str = "clipped"
  lsq: bool = False
  dtype: Any = None  # compute dtype, e.g. jnp.bfloat16; params stay float32
  fold_bn: bool = False  # no BatchNorm here; accepted for a uniform model API

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = x.reshape((x.shape[0], -1))
    kw = quant_kwargs(self, bn=False)
    dense = lambda f, name: QuantDense(f, name=name, **kw)
    for i, width in enumerate(self.hidden):
      x = nn.relu(dense(width, f"dense{i}")(x))
    return dense(self.num_classes, "head")(x)
