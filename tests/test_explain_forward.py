"""Tests for the forward chain (fqjax.explain.forward)."""
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fqjax.quantization import layers, quant
from fqjax.explain import forward
from fqjax.quantization.layers import BitSpec
from fqjax.models import SmallCNN


def test_induced_and_total_sparsity_hand_made():
  fp = np.array([0.0, 0.1, -0.02, 0.5, 0.0, 0.03])
  q = np.array([0.0, 0.0, 0.0, 0.5, 0.0, 0.0])
  s = forward.weight_stats(fp, q)
  # Non-zero in FP: 0.1, -0.02, 0.5, 0.03 (4); of those 0.1, -0.02, 0.03 became 0 -> 3/4.
  assert s["induced_sparsity"] == pytest.approx(0.75)
  assert s["total_sparsity"] == pytest.approx(5 / 6)
  assert s["mean_abs_diff"] == pytest.approx((0.1 + 0.02 + 0.03) / 6)
  assert s["rel_l2"] == pytest.approx(np.sqrt(0.01 + 0.0004 + 0.0009) / np.sqrt(0.01 + 0.0004 + 0.25 + 0.0009))


def test_logit_variance_and_softmax_margin_hand_computed():
  logits = jnp.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
  np.testing.assert_allclose(forward.logit_variance(logits), [2.0 / 3.0, 0.0], rtol=1e-6)
  labels = jnp.array([0, 1])
  s = forward.softmax_stats(logits, labels)
  e = np.exp([1.0, 2.0, 3.0])
  p = e / e.sum()
  np.testing.assert_allclose(s["true_prob"], [p[0], 1 / 3], rtol=1e-6)
  np.testing.assert_allclose(s["top_prob"], [p[2], 1 / 3], rtol=1e-6)
  np.testing.assert_allclose(s["margin"], [p[0] - p[2], 0.0], rtol=1e-6, atol=1e-7)
  jitted = jax.jit(forward.softmax_stats)(logits, labels)
  np.testing.assert_allclose(jitted["margin"], s["margin"], rtol=1e-6, atol=1e-7)


@pytest.fixture(scope="module")
def tiny():
  model = SmallCNN(num_classes=4, width=4)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(30, 8, 8, 1)).astype(np.float32)
  y = rng.integers(0, 4, 30).astype(np.int32)
  group = (np.arange(30) % 3).astype(np.int32)
  variables = model.init(jax.random.PRNGKey(0), x[:2])
  assert set(variables) == {"params", "batch_stats"}  # no captures leak out of init
  names = layers.quant_layer_names(model, x[:2])
  return model, variables, x, y, group, names


def test_full_precision_chain_has_no_shift(tiny):
  model, variables, x, y, group, names = tiny
  out = forward.forward_chain(model, variables, BitSpec.uniform(None).bits_tree(names), x, y, group, 3, names,
                              batch_size=16)
  assert out["weights"]["model"]["rel_l2"] == 0.0
  for name in names:
    np.testing.assert_allclose(out["activations"][name], 0.0, atol=1e-6)
  np.testing.assert_allclose(out["logits"]["abs_shift"], 0.0, atol=1e-6)
  np.testing.assert_allclose(out["softmax"]["margin_shift"], 0.0, atol=1e-6)
  for name, d in out["logits"]["definitions"].items():
    np.testing.assert_allclose(d["change"], 0.0, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(d["relative_change"], 0.0, atol=1e-6, err_msg=name)


def test_quantized_chain_matches_direct_computation(tiny):
  model, variables, x, y, group, names = tiny
  bits_tree = BitSpec.uniform(2).bits_tree(names)
  out = forward.forward_chain(model, variables, bits_tree, x, y, group, 3, names, batch_size=16)
  # Kernel statistics equal those of fake_quant applied per output channel.
  k = variables["params"]["conv2"]["kernel"]
  expected = forward.weight_stats(k, quant.fake_quant(k, 2, axis=-1))
  assert out["weights"]["per_layer"]["conv2"] == pytest.approx(expected)
  # Logit statistics per group equal a direct computation.
  z_fp = np.asarray(model.apply(variables, x))
  z_q = np.asarray(model.apply({**variables, "bits": bits_tree}, x))
  for g in range(3):
    m = group == g
    assert out["logits"]["abs_shift"][g] == pytest.approx(np.abs(z_q[m] - z_fp[m]).mean(), rel=1e-4)
    assert out["logits"]["variance_change"][g] == pytest.approx(
        (z_q[m].var(axis=1) - z_fp[m].var(axis=1)).mean(), rel=1e-3, abs=1e-6)
    assert out["accuracy"][g] == pytest.approx(np.mean(z_q[m].argmax(1) == y[m]))
  assert out["weights"]["model"]["induced_sparsity"] > 0.3  # 2 bits zero many weights
  assert all(np.all(np.asarray(out["activations"][n]) > 0) for n in names)


def test_effective_kernels_include_bn_folding(tiny):
  model, variables, x, y, group, names = tiny
  folded_model = layers.configured(model, fold_bn=True)
  k = forward.effective_kernels(folded_model, variables, None, x[:1], names)
  p, s = variables["params"]["conv1"], variables["batch_stats"]["conv1"]
  expected, _ = layers.fold_bn(p["kernel"], None, p["scale"], p["bias"], s["mean"], s["var"], 1e-5)
  np.testing.assert_allclose(k["conv1"], expected, rtol=1e-5)


# Two samples in group 0, one in group 1, none in group 2 (hand-computed values below).
_Z_FP = np.array([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0], [0.0, 0.0, 0.0]])
_Z_Q = np.array([[2.0, 2.0, 2.0], [1.0, 2.0, 3.0], [0.0, 1.0, 0.0]])
_Y = np.array([0, 1, 1])
_GROUP = np.array([0, 0, 1])
_NAN = float("nan")


def _definitions_no_warnings(*args):
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # empty groups and zero references must stay silent
    return forward.logit_definitions(*args)


@pytest.mark.parametrize("name, expected", [
    # Var_c per sample: fp 2/3, 2/3 | 0; q 0, 2/3 | Var(0, 1, 0) = 2/9.
    ("variance_over_classes", {"fp": [2 / 3, 0, _NAN], "quantized": [1 / 3, 2 / 9, _NAN],
                               "change": [-1 / 3, 2 / 9, _NAN], "relative_change": [-0.5, _NAN, _NAN]}),
    # Per class over group 0's samples: fp Var(1,3), Var(2,2), Var(3,1) = 1, 0, 1; q 1/4, 0, 1/4.
    ("variance_over_samples", {"fp": [2 / 3, 0, _NAN], "quantized": [1 / 6, 0, _NAN],
                               "change": [-0.5, 0, _NAN], "relative_change": [-0.75, _NAN, _NAN]}),
    # True-class logits: fp (1, 2) | 0; q (2, 2) | 1.
    ("true_class_variance", {"fp": [0.25, 0, _NAN], "quantized": [0, 0, _NAN],
                             "change": [-0.25, 0, _NAN], "relative_change": [-1, _NAN, _NAN]}),
    # mean_c |dz|: 2/3, 4/3 | 1/3; mean_c |z_fp|: 2, 2 | 0.
    ("abs_shift", {"change": [1, 1 / 3, _NAN], "relative_change": [0.5, _NAN, _NAN]}),
    # dz_y: 1, 0 | 1; |z_fp_y|: 1, 2 | 0.
    ("true_class_shift", {"change": [0.5, 1, _NAN], "relative_change": [1 / 3, _NAN, _NAN]}),
    # m_fp = 1-3, 2-3 | 0; m_q = 2-2, 2-3 | 1-0.
    ("margin_shift", {"change": [1, 1, _NAN], "relative_change": [2 / 3, _NAN, _NAN]}),
])
def test_logit_definitions_hand_computed(name, expected):
  d = _definitions_no_warnings(_Z_FP, _Z_Q, _Y, _GROUP, 3)[name]
  assert set(d) == set(expected)
  for key, value in expected.items():
    assert isinstance(d[key], list)
    np.testing.assert_allclose(d[key], value, rtol=1e-12, atol=1e-12, err_msg=f"{name}.{key}")


def test_logit_definitions_zero_reference_is_nan_and_empty_groups_silent():
  z_fp = np.zeros((4, 3))
  z_q = np.arange(12.0).reshape(4, 3)
  d = _definitions_no_warnings(z_fp, z_q, np.array([0, 1, 2, 0]), np.array([0, 0, 1, 1]), 5)
  for name, v in d.items():
    assert np.all(np.isfinite(v["change"][:2])), name
    assert np.all(np.isnan(v["change"][2:])), name  # groups 2..4 have no samples
    assert np.all(np.isnan(v["relative_change"])), name  # every fp reference is 0 or missing


def test_forward_chain_definitions_match_direct_logits(tiny):
  model, variables, x, y, group, names = tiny
  bits_tree = BitSpec.uniform(2).bits_tree(names)
  with warnings.catch_warnings():
    warnings.simplefilter("error", RuntimeWarning)
    out = forward.forward_chain(model, variables, bits_tree, x, y, group, 4, names, batch_size=16)
  z_fp = np.asarray(model.apply(variables, x))
  z_q = np.asarray(model.apply({**variables, "bits": bits_tree}, x))
  expected = forward.logit_definitions(z_fp, z_q, y, group, 4)
  got = out["logits"]["definitions"]
  assert set(got) == set(expected)
  for name, d in expected.items():
    for key, value in d.items():
      assert np.isnan(got[name][key][3]), (name, key)  # group 3 is empty
      np.testing.assert_allclose(got[name][key], value, rtol=1e-3, atol=1e-5, err_msg=f"{name}.{key}")
  # The legacy keys are the same numbers as their definitions.
  np.testing.assert_array_equal(out["logits"]["abs_shift"], got["abs_shift"]["change"])
  for legacy, key in (("variance", "quantized"), ("variance_fp", "fp"), ("variance_change", "change")):
    np.testing.assert_array_equal(out["logits"][legacy], got["variance_over_classes"][key])
