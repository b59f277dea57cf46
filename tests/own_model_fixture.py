"""A user's own Flax model, written with plain nn.Conv / nn.Dense (no fqjax layers), for test_own_model.

``--config.model.name=tests.own_model_fixture:make_model`` builds it (the factory returns the plain
model; fqjax.models.get_model makes it quantizable by interception). The other factories are the
broken or train-less cases the tests check.
"""
import flax.linen as nn
import jax


class PlainCNN(nn.Module):
  """conv 3x3 -> relu -> 2x2 average pool -> dense -> relu -> dense head. x: [N, H, W, C] -> [N, classes]."""
  num_classes: int
  width: int = 4
  hidden: int = 16

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    del train  # no BatchNorm or dropout here; taken for the zoo's call signature
    x = nn.relu(nn.Conv(self.width, (3, 3), name="conv")(x))
    x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(self.hidden, name="hidden")(x))
    return nn.Dense(self.num_classes, name="head")(x)


class NoTrainMLP(nn.Module):
  """A model whose __call__ takes no ``train``: the wrapper drops it."""
  num_classes: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return nn.Dense(self.num_classes)(x.reshape((x.shape[0], -1)))


def make_model(num_classes: int, width: int = 4) -> nn.Module:
  """The plain model (the route the config uses)."""
  return PlainCNN(num_classes=num_classes, width=width)


def make_no_train(num_classes: int) -> nn.Module:
  return NoTrainMLP(num_classes=num_classes)


def make_failing(num_classes: int) -> nn.Module:
  raise RuntimeError(f"cannot build for {num_classes} classes")


def make_not_module(num_classes: int) -> dict:
  return {"num_classes": num_classes}


NOT_CALLABLE = 3
