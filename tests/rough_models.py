"""Model factories a user could write by mistake, for tests/test_rough_inputs.py
(``--config.model.name=tests.rough_models:<factory>``)."""
import flax.linen as nn
import jax


class Head(nn.Module):
  """A dense head with ``outputs`` logits, whatever num_classes says."""
  outputs: int

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    return nn.Dense(self.outputs)(x.reshape((x.shape[0], -1)))


class NoLayers(nn.Module):
  """Logits from a parameter-free projection: nothing to quantize."""
  num_classes: int

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    scale = self.param("scale", nn.initializers.ones, (1,))
    return x.reshape((x.shape[0], -1))[:, :self.num_classes] * scale


class WithDropout(nn.Module):
  num_classes: int

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = nn.Dropout(0.5, deterministic=not train)(nn.relu(nn.Dense(8)(x.reshape((x.shape[0], -1)))))
    return nn.Dense(self.num_classes)(x)


def six_logits(num_classes: int) -> nn.Module:
  return Head(outputs=6)


def too_few_logits(num_classes: int) -> nn.Module:
  return Head(outputs=num_classes - 1)


def no_layers(num_classes: int) -> nn.Module:
  return NoLayers(num_classes=num_classes)


def with_dropout(num_classes: int) -> nn.Module:
  return WithDropout(num_classes=num_classes)
