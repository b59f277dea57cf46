"""Tests for fqjax.quantization.layers: equivalence with Flax at full precision, QuantRule and configured, BitSpec,
BN folding, LSQ init, calibration."""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fqjax.quantization import layers, quant
from fqjax.quantization.layers import BitSpec, QuantConv, QuantConvBN, QuantDense, QuantRule
from fqjax.models import SmallCNN


def _key(i=0):
  return jax.random.PRNGKey(i)


def test_quant_dense_equals_flax_dense_at_32_bits():
  x = jax.random.normal(_key(1), (4, 12))
  ref = nn.Dense(7)
  params = ref.init(_key(), x)
  ours = QuantDense(7)
  np.testing.assert_array_equal(ours.apply(params, x), ref.apply(params, x))
  bits_vars = {"bits": {"w": jnp.float32(32), "a": jnp.float32(32)}}
  np.testing.assert_array_equal(ours.apply({**params, **bits_vars}, x), ref.apply(params, x))


@pytest.mark.parametrize("padding,strides", [("SAME", 1), ("VALID", 2), (1, 1)])
def test_quant_conv_equals_flax_conv_at_32_bits(padding, strides):
  x = jax.random.normal(_key(1), (2, 9, 9, 3))
  ref = nn.Conv(5, (3, 3), strides=strides, padding=padding)
  params = ref.init(_key(), x)
  ours = QuantConv(5, (3, 3), strides=strides, padding=padding)
  np.testing.assert_array_equal(ours.apply(params, x), ref.apply(params, x))


def test_quant_dense_quantizes_weights_per_channel():
  x = jax.random.normal(_key(1), (4, 12))
  layer = QuantDense(6)
  params = layer.init(_key(), x)
  bits_vars = {"bits": {"w": jnp.float32(3), "a": jnp.float32(32)}}
  y = layer.apply({**params, **bits_vars}, x)
  kq = quant.fake_quant(params["params"]["kernel"], 3, axis=1)
  np.testing.assert_allclose(y, x @ kq + params["params"]["bias"], rtol=1e-5, atol=1e-6)


def test_per_tensor_rule_equals_per_tensor_fake_quant():
  """quant=QuantRule(per_channel=False): one scale max|W| / qmax for the whole kernel, as before the rule."""
  x = jax.random.normal(_key(1), (4, 12))
  params = QuantDense(6).init(_key(), x)
  bits_vars = {"bits": {"w": jnp.float32(3), "a": jnp.float32(32)}}
  y = QuantDense(6, quant=QuantRule(per_channel=False)).apply({**params, **bits_vars}, x)
  kq = quant.fake_quant(params["params"]["kernel"], 3, axis=None)
  np.testing.assert_allclose(y, x @ kq + params["params"]["bias"], rtol=1e-5, atol=1e-6)
  assert not np.allclose(kq, quant.fake_quant(params["params"]["kernel"], 3, axis=1))  # the rule matters
  xc = jax.random.normal(_key(2), (2, 6, 6, 3))
  conv = QuantConvBN(4, quant=QuantRule(per_channel=False, narrow_range=True))
  v = conv.init(_key(), xc)
  _, state = conv.apply({**v, **bits_vars}, xc, mutable=[layers.KERNELS])
  np.testing.assert_array_equal(state[layers.KERNELS]["kernel"][0],
                                quant.fake_quant(v["params"]["kernel"], 3, narrow_range=True, axis=None))


def test_quant_rule_validation():
  assert QuantRule() == QuantRule(per_channel=True, narrow_range=False, ste="clipped", lsq=False)
  assert hash(QuantRule()) == hash(QuantRule())  # modules carrying it stay hashable (lru_cache keys)
  with pytest.raises(ValueError, match="QuantRule.ste must be one of"):
    QuantRule(ste="round")
  with pytest.raises(ValueError, match="QuantRule.per_channel must be True or False"):
    QuantRule(per_channel=1)
  with pytest.raises(ValueError, match="QuantRule.lsq"):
    QuantRule(lsq="yes")


def test_configured_sets_rule_and_layer_options():
  model = SmallCNN(num_classes=3, width=4)
  new = layers.configured(model, per_channel=False, ste="identity", fold_bn=True, dtype=jnp.bfloat16)
  assert new.quant == QuantRule(per_channel=False, ste="identity")
  assert new.fold_bn and new.dtype == jnp.bfloat16 and new.width == 4
  assert model.quant == QuantRule() and not model.fold_bn  # the original is unchanged
  assert layers.configured(model, lsq=True).quant == QuantRule(lsq=True)
  assert layers.configured(QuantDense(3), narrow_range=True).quant.narrow_range
  with pytest.raises(ValueError, match=r"unknown quantization option\(s\) \['per_chanel'\]; allowed: .*fold_bn"):
    layers.configured(model, per_chanel=False)
  with pytest.raises(ValueError, match="QuantDense has no option"):
    layers.configured(QuantDense(3), fold_bn=True)
  with pytest.raises(ValueError, match="no `quant` rule"):
    layers.configured(nn.Dense(3), per_channel=False)
  with pytest.raises(ValueError, match="QuantRule.ste"):
    layers.configured(model, ste="round")


def test_init_lsq_scales_follow_the_scale_shape():
  x = jax.random.normal(_key(1), (2, 8, 8, 1))
  for per_channel in (True, False):
    model = SmallCNN(num_classes=3, width=4, quant=QuantRule(lsq=True, per_channel=per_channel))
    params = model.init(_key(), x)["params"]
    resolved = BitSpec(w_bits=4, layers={"head": (None, None)}).resolve(layers.quant_layer_names(model, x))
    out = layers.init_lsq_scales(params, resolved)
    k = params["conv2"]["kernel"]
    np.testing.assert_allclose(out["conv2"]["w_scale"],
                               quant.lsq_init_scale(k, 4, axis=-1 if per_channel else None), rtol=1e-6)
    np.testing.assert_array_equal(out["head"]["w_scale"], params["head"]["w_scale"])  # full precision: kept
    np.testing.assert_array_equal(out["conv2"]["kernel"], k)
    assert params["conv2"]["w_scale"].shape == ((8,) if per_channel else ())
    np.testing.assert_array_equal(params["conv2"]["w_scale"], 1.0)  # the input is not modified


def test_activation_quantization_uses_calibrated_range():
  x = jnp.linspace(-1.0, 3.0, 24).reshape(2, 12)
  layer = QuantDense(4)
  params = layer.init(_key(), x)
  stats = {"quant_stats": {"lo": jnp.float32(0.0), "hi": jnp.float32(1.0)}}
  bits_vars = {"bits": {"w": jnp.float32(32), "a": jnp.float32(2)}}
  y = layer.apply({**params, **bits_vars, **stats}, x)
  s, z = quant.scale_zero_point_from_range(0.0, 1.0, 2, symmetric=False)
  xq = quant.fake_quant(x, 2, symmetric=False, scale=s, zero_point=z)
  np.testing.assert_allclose(y, xq @ params["params"]["kernel"], rtol=1e-5, atol=1e-6)
  assert float(jnp.max(xq)) == pytest.approx(1.0)  # values above the calibrated range are clipped


def test_bitspec_mixed_quantizes_exactly_named_layers():
  model = SmallCNN(num_classes=10, width=4)
  x = jax.random.normal(_key(1), (3, 8, 8, 1))
  variables = model.init(_key(), x)
  names = layers.quant_layer_names(model, x)
  assert names == ["conv1", "conv2", "conv3", "head"]
  spec = BitSpec(w_bits=None, layers={"conv2": (2, None)})
  resolved = spec.resolve(names)
  assert resolved == {"conv1": (None, None), "conv2": (2, None), "conv3": (None, None), "head": (None, None)}

  # Capture every layer's effective kernel by interception: only conv2's differs from FP.
  seen = {}

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == "__call__" and isinstance(context.module, layers.QUANT_LAYER_TYPES):
      seen[context.module.name] = out
    return out

  with nn.intercept_methods(interceptor):
    model.apply({**variables, "bits": spec.bits_tree(names)}, x)
  fp_seen = dict(seen)
  with nn.intercept_methods(interceptor):
    model.apply(variables, x)
  assert not np.allclose(fp_seen["conv2"], seen["conv2"])
  np.testing.assert_array_equal(fp_seen["conv1"], seen["conv1"])


def test_bitspec_first_last():
  names = ["stem", "b/conv1", "b/conv2", "head"]
  resolved = BitSpec.first_last(4, edge_bits=8, a_bits=8).resolve(names)
  assert resolved["stem"] == (8, 8) and resolved["head"] == (8, 8)
  assert resolved["b/conv1"] == (4, 8) and resolved["b/conv2"] == (4, 8)
  tree = BitSpec.first_last(4).bits_tree(names)
  assert float(tree["b"]["conv1"]["w"]) == 4.0 and float(tree["b"]["conv1"]["a"]) == 32.0


def test_bitspec_errors():
  with pytest.raises(ValueError, match="does not have.*'nope'"):
    BitSpec(layers={"nope": (4, None)}).resolve(["conv1", "head"])
  with pytest.raises(ValueError, match="w_bits"):
    BitSpec(w_bits=0)
  with pytest.raises(ValueError, match="pair"):
    BitSpec(layers={"conv1": 4})


def test_bn_folding_preserves_fp_output():
  x = jax.random.normal(_key(1), (8, 6, 6, 3))
  layer = QuantConvBN(5)
  variables = layer.init(_key(), x)
  # Make running stats non-trivial by a few training-mode calls.
  for i in range(3):
    _, upd = layer.apply(variables, x * (1 + i), train=True, mutable=["batch_stats"])
    variables = {**variables, **upd}
  variables["params"] = {**variables["params"], "scale": jnp.linspace(0.5, 2.0, 5),
                         "bias": jnp.linspace(-1.0, 1.0, 5)}
  unfolded = layer.apply(variables, x, train=False)
  folded = QuantConvBN(5, fold_bn=True).apply(variables, x, train=False)
  np.testing.assert_allclose(folded, unfolded, rtol=1e-4, atol=1e-5)


def test_fold_bn_function_matches_formula():
  k = jnp.ones((1, 1, 1, 2))
  kf, bf = layers.fold_bn(k, jnp.array([1.0, 0.0]), gamma=jnp.array([2.0, 1.0]), beta=jnp.array([0.5, 0.0]),
                          mean=jnp.array([1.0, 2.0]), var=jnp.array([3.0, 0.0]), eps=1.0)
  np.testing.assert_allclose(kf.reshape(-1), [1.0, 1.0])
  np.testing.assert_allclose(bf, [0.5 + (1.0 - 1.0) * 1.0, 0.0 + (0.0 - 2.0) * 1.0])


def test_batchnorm_train_uses_batch_stats_and_updates_running():
  x = jax.random.normal(_key(1), (16, 4, 4, 2)) * 3.0 + 1.0
  layer = QuantConvBN(3)
  variables = layer.init(_key(), x)
  y, upd = layer.apply(variables, x, train=True, mutable=["batch_stats"])
  chex.assert_trees_all_close(jnp.mean(y, axis=(0, 1, 2)), jnp.zeros(3), atol=1e-4)
  assert not np.allclose(upd["batch_stats"]["mean"], 0.0)


def test_calibrate_activations_ranges():
  model = SmallCNN(num_classes=10, width=4)
  x = jax.random.normal(_key(1), (5, 8, 8, 1))
  variables = model.init(_key(), x)
  stats = layers.calibrate_activations(model, variables, [x[:2], x[2:]], method="minmax")
  assert set(stats) == {"conv1", "conv2", "conv3", "head"}
  assert float(stats["conv1"]["lo"]) == pytest.approx(float(x.min()))
  assert float(stats["conv1"]["hi"]) == pytest.approx(float(x.max()))
  assert float(stats["conv2"]["lo"]) >= 0.0  # after ReLU


def test_vmap_over_bits_tree_equals_loop():
  model = SmallCNN(num_classes=10, width=4)
  x = jax.random.normal(_key(1), (3, 8, 8, 1))
  variables = model.init(_key(), x)
  names = layers.quant_layer_names(model, x)
  specs = [BitSpec.uniform(b, 8) for b in (2, 4, 8)] + [BitSpec.uniform(None)]
  stacked = layers.stack_bits_trees([s.bits_tree(names) for s in specs])
  fn = jax.jit(lambda bits: model.apply({**variables, "bits": bits}, x))
  swept = jax.vmap(fn)(stacked)
  for i, s in enumerate(specs):
    np.testing.assert_allclose(swept[i], fn(s.bits_tree(names)), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(swept[-1], model.apply(variables, x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("rule", ["half_step", "mse"])
def test_scale_rule_reaches_the_layer_kernel(rule):
  """QuantRule(scale=...) is what the layer multiplies by, and configured()/get_model pass it through."""
  from fqjax.models import get_model
  model = get_model("mlp", 3, hidden=(8,), scale=rule)
  assert model.quant.scale == rule and layers.configured(model, scale="max").quant.scale == "max"
  x = np.random.default_rng(0).normal(size=(4, 5)).astype(np.float32)
  variables = model.init(jax.random.PRNGKey(0), x)
  names = layers.quant_layer_names(model, x)
  _, state = model.apply({**variables, "bits": BitSpec.uniform(2).bits_tree(names)}, x, mutable=[layers.KERNELS])
  w = variables["params"]["dense0"]["kernel"]
  expected = quant.fake_quant(w, 2, axis=1, scale=quant.weight_scale(w, 2, rule, axis=1))
  np.testing.assert_allclose(state[layers.KERNELS]["dense0"]["kernel"][0], expected, rtol=1e-6)
  with pytest.raises(ValueError, match="QuantRule.scale"):
    layers.QuantRule(scale="percentile")


def test_batchnorm_recalibration_averages_the_quantized_networks_batch_statistics():
  """ptq.recalibrate_batch_stats: each BN layer's mean/var = the average over batches of the batch statistics
  of the quantized network at that layer (checked for the first BN layer by hand)."""
  from fqjax.study import ptq
  model = SmallCNN(num_classes=3, width=4)
  rng = np.random.default_rng(0)
  batches = [rng.normal(size=(6, 8, 8, 1)).astype(np.float32) for _ in range(3)]
  variables = model.init(jax.random.PRNGKey(0), batches[0])
  names = layers.quant_layer_names(model, batches[0])
  bits = BitSpec.uniform(3).bits_tree(names)
  new = ptq.recalibrate_batch_stats(model, variables, bits, batches)
  assert jax.tree_util.tree_structure(new) == jax.tree_util.tree_structure(variables["batch_stats"])
  # conv1's output in training mode: the 3-bit kernel on the (unquantized) input, no bias.
  kernel = quant.fake_quant(variables["params"]["conv1"]["kernel"], 3, axis=-1)
  outs = [jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
          for x in batches]
  np.testing.assert_allclose(new["conv1"]["mean"], np.mean([o.mean(axis=(0, 1, 2)) for o in outs], axis=0),
                             rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(new["conv1"]["var"], np.mean([o.var(axis=(0, 1, 2)) for o in outs], axis=0),
                             rtol=1e-4, atol=1e-6)
  assert not np.allclose(new["conv1"]["mean"], variables["batch_stats"]["conv1"]["mean"])
  from fqjax.models import MLP
  plain = MLP(num_classes=2, hidden=(4,))  # no BatchNorm: its (empty) statistics come back unchanged
  pv = plain.init(jax.random.PRNGKey(0), np.zeros((2, 5), np.float32))
  assert ptq.recalibrate_batch_stats(plain, pv, {}, [np.zeros((2, 5), np.float32)]) == dict(pv.get("batch_stats", {}))
