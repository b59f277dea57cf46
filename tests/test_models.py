"""Every model builds, runs forward at full and low precision, and has the expected size."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from fqjax.quantization import layers, quant
from fqjax.quantization.layers import BitSpec, QuantRule
from fqjax.models import MODEL_NAMES, MODELS, get_model

# (model, input shape, expected parameter count range)
CASES = [
    ("mlp", (2, 8, 8, 1), (3e4, 1e5)),
    ("small_cnn", (2, 8, 8, 1), (5e4, 2e5)),
    ("small_cnn", (2, 28, 28, 1), (5e4, 2e5)),
    ("resnet18", (2, 32, 32, 3), (11.0e6, 11.3e6)),  # ResNet-18 CIFAR: 11.17M
    ("resnet34", (2, 32, 32, 3), (21.0e6, 21.5e6)),
    ("resnet50", (2, 32, 32, 3), (23.0e6, 24.0e6)),
    ("vgg11", (2, 32, 32, 3), (9.0e6, 9.5e6)),
    ("vgg16", (2, 32, 32, 3), (14.5e6, 15.0e6)),
]


def _count(tree):
  return sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(tree))


@pytest.mark.parametrize("name,shape,bounds", CASES)
def test_parameter_count(name, shape, bounds):
  model = get_model(name, 10)
  variables = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), jnp.zeros(shape))
  n = _count(variables["params"])
  assert bounds[0] <= n <= bounds[1], f"{name}: {n} parameters"


@pytest.mark.parametrize("name,shape", [("mlp", (2, 8, 8, 1)), ("small_cnn", (2, 28, 28, 1)),
                                        ("resnet18", (2, 16, 16, 3)), ("vgg11", (2, 16, 16, 3))])
def test_forward_full_and_quantized(name, shape):
  model = get_model(name, 10, **({"width": 8} if name.startswith("resnet") else {}))
  x = jax.random.normal(jax.random.PRNGKey(1), shape)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), x)
  names = layers.quant_layer_names(model, x)
  apply = jax.jit(model.apply)
  y_fp = apply(variables, x)
  y_q = apply({**variables, "bits": BitSpec.first_last(2, a_bits=8).bits_tree(names)}, x)
  assert y_fp.shape == (shape[0], 10) and y_q.shape == (shape[0], 10)
  assert np.all(np.isfinite(y_q))
  assert not np.allclose(y_fp, y_q)


def test_resnet_imagenet_stem_and_size_helper():
  model = get_model("resnet18", 7, stem="imagenet", width=8)
  x = jnp.zeros((1, 32, 32, 3))
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), x)
  assert jax.jit(model.apply)(variables, x).shape == (1, 7)
  names = layers.quant_layer_names(model, x)
  assert names[0] == "stem" and names[-1] == "head"
  spec = BitSpec.first_last(4)
  size = quant.storage_size(variables["params"], layers.weight_bits_by_layer(spec, names))
  fp = quant.storage_size(variables["params"], {})
  assert 4.0 < fp["bytes"] / size["bytes"] < 8.0


def test_unknown_model_and_depth():
  with pytest.raises(ValueError, match="unknown model"):
    get_model("resnet19", 10)
  with pytest.raises(ValueError, match="num_classes"):
    get_model("mlp", 1)
  assert "resnet18" in MODEL_NAMES


def test_get_model_folds_rule_kwargs_into_the_rule():
  model = get_model("small_cnn", 3, width=4, per_channel=False, lsq=True, fold_bn=True)
  assert model.quant == QuantRule(per_channel=False, lsq=True) and model.fold_bn and model.width == 4
  assert get_model("mlp", 3).quant == QuantRule()
  given = get_model("resnet18", 3, quant=QuantRule(narrow_range=True), ste="identity")
  assert given.quant == QuantRule(narrow_range=True, ste="identity") and given.stage_sizes == (2, 2, 2, 2)
  assert MODEL_NAMES == tuple(MODELS) and get_model("vgg11", 3).layout[0] == 64
  with pytest.raises(ValueError, match="QuantRule.ste"):
    get_model("mlp", 3, ste="round")


def test_rule_reaches_every_layer():
  """per_channel=False from get_model is what the layers do: their sown kernels are per-tensor quantized."""
  model = get_model("resnet18", 3, width=4, per_channel=False)
  x = jnp.zeros((1, 8, 8, 3)).at[0, 0, 0, 0].set(1.0)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), x)
  names = layers.quant_layer_names(model, x)
  sown = jax.jit(lambda v, b: model.apply({**v, "bits": b}, x, mutable=[layers.KERNELS])[1])
  state = sown(variables, BitSpec.uniform(2).bits_tree(names))
  params = traverse_util.flatten_dict(variables["params"], sep="/")
  sown = traverse_util.flatten_dict(state[layers.KERNELS], sep="/")
  assert sorted(sown) == sorted(f"{name}/kernel" for name in names)
  per_tensor = jax.jit(lambda k: quant.fake_quant(k, 2, axis=None))
  for name in names:
    np.testing.assert_array_equal(sown[f"{name}/kernel"][0], per_tensor(params[f"{name}/kernel"]))
