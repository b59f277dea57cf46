"""A user's own plain Flax model (tests/own_model_fixture.py) through fqjax: built from a
"package.module:factory" name, quantized by method interception (fqjax.quantization.intercept) with its own params,
and run through train, PTQ and explain."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from fqjax.study import config as config_lib
from fqjax.quantization import intercept, layers, quant
from fqjax.study import runner
from fqjax.errors import InputError
from fqjax.explain.curvature import dequantized_params
from fqjax.models import MODEL_NAMES, get_model
from tests import own_model_fixture as fixture

NAME = "tests.own_model_fixture:make_model"
LAYERS = ["conv", "hidden", "head"]


def _x(n=3):
  return jax.random.normal(jax.random.PRNGKey(1), (n, 8, 8, 1))


def _plain_vars():
  """Params of the plain model, initialized by the plain model itself (as a trained checkpoint would be)."""
  return fixture.make_model(10).init(jax.random.PRNGKey(0), _x())


def _bits(w, a=32):
  return {name: {"w": jnp.float32(w), "a": jnp.float32(a)} for name in LAYERS}


def _manual_quantized_params(params, bits):
  """Every kernel fake-quantized per output channel (its last axis) by fqjax.quantization.quant, biases as they are."""
  flat = traverse_util.flatten_dict(params)
  for key, value in flat.items():
    if key[-1] == "kernel":
      flat[key] = quant.fake_quant(value, bits, symmetric=True, axis=value.ndim - 1)
  return traverse_util.unflatten_dict(flat)


# ----------------------------------------------------------------------------
# (a) building from a name
# ----------------------------------------------------------------------------

def test_factory_name_builds_the_wrapped_plain_model():
  model = get_model(NAME, 10)
  assert isinstance(model, intercept.QuantizedModule) and isinstance(model.model, fixture.PlainCNN)
  assert model.model.num_classes == 10 and "tests.own_model_fixture:make_model" not in MODEL_NAMES
  assert get_model(NAME, 10, width=6).model.width == 6  # model.kwargs reach the factory
  assert get_model(NAME, 10, per_channel=False).quant.per_channel is False  # rule options reach the wrapper
  assert layers.quant_layer_names(model, _x()) == LAYERS


@pytest.mark.parametrize("name,match", [
    ("tests.no_such_module:make_model", "cannot import module 'tests.no_such_module'.*PYTHONPATH"),
    ("tests.own_model_fixture:no_such_factory", "does not exist.*make_model"),
    ("tests.own_model_fixture:NOT_CALLABLE", "is not callable"),
    ("tests.own_model_fixture:make_failing", "make_failing.*failed.*RuntimeError.*cannot build"),
    ("tests.own_model_fixture:make_not_module", "returned dict, not a flax.linen.Module"),
    ("tests.own_model_fixture:", "'package.module:factory'"),
])
def test_bad_factory_names_say_what_to_fix(name, match):
  with pytest.raises(InputError, match=match):
    get_model(name, 10)


def test_config_accepts_factory_names_and_rejects_bad_ones(tiny_config, tmp_path):
  """Validation (no JAX) checks the name's form; the runner builds the model before it makes the workdir."""
  from fqjax.study import runner
  c = tiny_config()
  c.model.name = NAME
  config_lib.validate_config(c)  # width=4 from the tiny config goes to the factory
  c.model.name = "tests.own_model_fixture:no_such_factory"
  config_lib.validate_config(c)
  with pytest.raises(InputError, match="config.model.name is invalid.*no_such_factory"):
    runner.run(c, str(tmp_path / "wd"), ["train"], progress=False)
  assert not (tmp_path / "wd").exists()
  c.model.name = "not_a_zoo_model"
  with pytest.raises(InputError, match="config.model.name"):
    config_lib.validate_config(c)


def test_model_without_train_argument_is_adapted():
  model = get_model("tests.own_model_fixture:make_no_train", 4)
  v = model.init(jax.random.PRNGKey(0), _x())
  plain = fixture.make_no_train(4)
  np.testing.assert_array_equal(model.apply(v, _x(), train=True), plain.apply(v, _x()))


# ----------------------------------------------------------------------------
# (b) + (c) quantization by interception, on the plain model's own params
# ----------------------------------------------------------------------------

def test_params_are_the_plain_models_own():
  plain_vars = _plain_vars()
  wrapped = intercept.quantize_module(fixture.make_model(10)).init(jax.random.PRNGKey(0), _x())
  assert jax.tree_util.tree_structure(wrapped) == jax.tree_util.tree_structure(plain_vars)
  jax.tree_util.tree_map(np.testing.assert_array_equal, wrapped, plain_vars)


def test_full_precision_equals_plain_model_exactly():
  plain, v = fixture.make_model(10), _plain_vars()
  qmodel = intercept.quantize_module(plain)
  expected = plain.apply(v, _x())
  np.testing.assert_array_equal(qmodel.apply(v, _x()), expected)  # no "bits": no quantizer
  np.testing.assert_array_equal(qmodel.apply({**v, "bits": _bits(32)}, _x()), expected)


def test_four_bits_equals_manual_fake_quant_through_plain_model():
  plain, v = fixture.make_model(10), _plain_vars()
  qmodel = intercept.quantize_module(plain)
  q_params = _manual_quantized_params(v["params"], 4)
  expected = plain.apply({"params": q_params}, _x())
  out, state = qmodel.apply({**v, "bits": _bits(4)}, _x(), mutable=[layers.KERNELS])
  np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
  assert not np.allclose(out, plain.apply(v, _x()), atol=1e-4)  # 4 bits does change the output
  sown = traverse_util.flatten_dict(state[layers.KERNELS], sep="/")
  for name in LAYERS:
    np.testing.assert_array_equal(sown[f"{name}/kernel"][0], q_params[name]["kernel"])
  # explain's dequantized params are the plain model's params with those kernels
  deq = dequantized_params(qmodel, v, {n: {"w": jnp.float32(4)} for n in LAYERS}, _x())
  jax.tree_util.tree_map(np.testing.assert_array_equal, deq, q_params)


def test_per_tensor_rule_and_traced_bits():
  plain, v = fixture.make_model(10), _plain_vars()
  qmodel = intercept.quantize_module(plain, layers.QuantRule(per_channel=False))
  flat = traverse_util.flatten_dict(v["params"])
  q = {k: quant.fake_quant(a, 3, symmetric=True) if k[-1] == "kernel" else a for k, a in flat.items()}
  expected = plain.apply({"params": traverse_util.unflatten_dict(q)}, _x())
  traced = jax.jit(lambda b: qmodel.apply({**v, "bits": b}, _x()))(_bits(3))
  np.testing.assert_allclose(traced, expected, rtol=1e-6, atol=1e-6)


def test_gradients_flow_straight_through():
  plain, v = fixture.make_model(10), _plain_vars()
  qmodel = intercept.quantize_module(plain)
  loss = lambda model, variables: jnp.sum(model.apply(variables, _x()) ** 2)
  g_q = jax.grad(lambda p: loss(qmodel, {"params": p, "bits": _bits(4)}))(v["params"])
  # STE with the max scale: every weight is on the grid's range, so d loss / d W = the plain gradient at Q(W)
  g_ref = jax.grad(lambda p: loss(plain, {"params": p}))(_manual_quantized_params(v["params"], 4))
  for name in LAYERS:
    assert float(jnp.abs(g_q[name]["kernel"]).sum()) > 0
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g_q, g_ref)


def test_activation_calibration_finds_the_intercepted_layers():
  qmodel, v = intercept.quantize_module(fixture.make_model(10)), _plain_vars()
  stats = layers.calibrate_activations(qmodel, v, [_x()])
  assert sorted(stats) == sorted(LAYERS)
  out = qmodel.apply({**v, "quant_stats": stats, "bits": _bits(32, 4)}, _x())
  assert out.shape == (3, 10) and not np.allclose(out, qmodel.apply(v, _x()), atol=1e-4)


def test_lsq_adds_only_its_step_sizes_and_bn_folding_is_refused():
  qmodel = intercept.quantize_module(fixture.make_model(10), layers.QuantRule(lsq=True))
  v = qmodel.init(jax.random.PRNGKey(0), _x())
  assert {k for layer in v["params"].values() for k in layer} == {"kernel", "bias", "w_scale"}
  v = {**v, "params": layers.init_lsq_scales(v["params"], {n: (4, None) for n in LAYERS})}
  assert qmodel.apply({**v, "bits": _bits(4)}, _x()).shape == (3, 10)

  class WithBN(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      return nn.BatchNorm(use_running_average=not train)(nn.Dense(3)(x))

  folded = intercept.quantize_module(WithBN()).clone(fold_bn=True)
  with pytest.raises(ValueError, match="cannot be folded"):
    folded.init(jax.random.PRNGKey(0), jnp.ones((2, 4)))


# ----------------------------------------------------------------------------
# (d) the whole pipeline on the tiny synthetic study
# ----------------------------------------------------------------------------

def test_pipeline_runs_on_own_model(tiny_config, tmp_path):
  c = tiny_config()
  c.seeds = (0,)
  c.model.name = NAME  # the factory returns the plain model; get_model wraps it (model.kwargs.width=4 goes to it)
  c.ptq.bit_widths = (32, 4)
  c.explain.bit_widths = (32, 2)
  c.explain.size_matched_repeats = 0
  c.explain.density_bits = ()
  c.explain.update(top_k=1, trace_probes=0, lanczos_max_iters=8, max_examples_per_group=32)  # fast, not exact
  res = runner.run(c, str(tmp_path / "own"), ["train", "ptq", "explain"], progress=False)
  assert res["model"]["name"] == NAME and res["model"]["layer_names"] == LAYERS
  by_bits = res["ptq"]["per_seed"]["0"]
  assert sorted(by_bits) == ["32", "4"] and len(by_bits["4"]["groups"]["accuracy"]) == 3
  for bits in ("32", "2"):
    curv = res["explain"]["per_seed"]["0"][bits]["curvature"]
    assert len(curv["grad_norm"]) == 3 and all(g > 0 for g in curv["grad_norm"])
    assert len(curv["top_eigenvalue"]) == 3
