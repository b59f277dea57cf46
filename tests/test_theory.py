"""Tests for the second-order test of the theory (fqjax.explain.theory).

References: dense gradients and Hessians (jax.hessian on a tiny MLP in float64), direct
evaluations at the dequantized params, and a per-group loop of jax.grad / jax.jvp on a SmallCNN.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from fqjax.quantization import layers
from fqjax.analysis import metrics
from fqjax.explain import curvature, theory
from fqjax.quantization.layers import BitSpec
from fqjax.models import MLP, SmallCNN

GROUPS = np.array([0] * 21 + [1] * 9 + [2] * 1 + [0] * 4 + [1] * 5)  # uneven, interleaved, one singleton


def _key(i):
  return jax.random.PRNGKey(i)


def _to64(tree):
  return jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating)
                                else a, tree)


def _init(model, x, seed):
  """Random variables from NumPy at the shapes of ``model.init`` (eval_shape: no compile, unlike model.init).

  Kernels ~ N(0, 1 / fan_in), biases and BatchNorm shifts ~ N(0, 0.1^2), BatchNorm scales ~ 1 + N(0, 0.1^2);
  running statistics away from identity (means ~ N(0, 0.3^2), variances ~ U(0.5, 2)) so inference mode matters.
  """
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = str(getattr(path[-1], "key", path[-1]))
    if name == "kernel":
      return rng.normal(0.0, 1.0 / np.sqrt(np.prod(leaf.shape[:-1])), leaf.shape).astype(np.float32)
    if name == "var":
      return rng.uniform(0.5, 2.0, leaf.shape).astype(np.float32)
    base, sd = (1.0, 0.1) if name == "scale" else (0.0, 0.3 if name == "mean" else 0.1)
    return (base + sd * rng.normal(size=leaf.shape)).astype(np.float32)

  shapes = jax.eval_shape(model.init, _key(0), x[:1])
  return jax.tree_util.tree_map(jnp.asarray, jax.tree_util.tree_map_with_path(draw, shapes))


@functools.lru_cache(maxsize=None)
def _mlp():
  """MLP 6 -> 8 -> 3 (83 params) on 40 inputs (float32; tests cast to float64 under x64)."""
  model = MLP(num_classes=3, hidden=(8,))
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(size=(40, 6)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, 40), jnp.int32)
  return model, _init(model, x, 0), x, y


@functools.lru_cache(maxsize=None)
def _cnn():
  """SmallCNN width 2 (BatchNorm in inference mode) on 40 8x8 inputs, 3 classes."""
  model = SmallCNN(num_classes=3, width=2)
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(40, 8, 8, 1)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, 40), jnp.int32)
  return model, _init(model, x, 0), x, y


def _bits(model, x, w_bits, a_bits=None):
  return BitSpec.uniform(w_bits, a_bits).bits_tree(layers.quant_layer_names(model, x))


def _deq(model, variables, x, bits_tree):
  """curvature's jitted dequantized params (eager ``dequantized_params`` is slow; tested in test_curvature)."""
  return curvature.derivative_point(model, variables, x, bits_tree, "error")[0]


@functools.lru_cache(maxsize=None)
def _masked_programs(model):
  """Per-group references on the masked group mean loss (one compile for every group)."""
  def loss(params, batch_stats, x, y, m):
    logits = model.apply({"params": params, "batch_stats": batch_stats}, x, train=False)
    return jnp.sum(m * optax.softmax_cross_entropy_with_integer_labels(logits, y)) / jnp.sum(m)

  def dense(params, batch_stats, x, y, m):  # (L, g [P], H [P, P]) of the raveled group loss
    flat, unravel = ravel_pytree(params)
    f = lambda v: loss(unravel(v), batch_stats, x, y, m)
    return f(flat), jax.grad(f)(flat), jax.hessian(f)(flat)

  def jvp_terms(params, params_q, batch_stats, x, y, m):  # (L(theta), L(theta_q), g, g . d, H d)
    d = jax.tree_util.tree_map(jnp.subtract, params_q, params)
    f = lambda p: loss(p, batch_stats, x, y, m)
    (value, g), (gd, hd) = jax.jvp(jax.value_and_grad(f), (params,), (d,))  # one program: compiles once
    return value, f(params_q), g, gd, hd

  return jax.jit(dense), jax.jit(jvp_terms)


def test_mlp_terms_match_dense_gradient_and_hessian_in_float64():
  model, variables, x, y = _mlp()
  with jax.enable_x64(True):
    variables, x = _to64(variables), _to64(x)
    bits_tree = _bits(model, x, 4, 8)  # activation bits are ignored
    out = theory.second_order_terms(model, variables, bits_tree, x, y, GROUPS, 3, batch_size=16)
    deq = _deq(model, variables, x, _bits(model, x, 4))
    flat, _ = ravel_pytree(variables["params"])
    d = np.asarray(ravel_pytree(deq)[0] - flat)
    assert flat.dtype == jnp.float64 and out["d_norm"] == pytest.approx(np.linalg.norm(d), rel=1e-12)
    for g in range(3):
      m = jnp.asarray(GROUPS == g, jnp.float64)
      loss, grad, hess = (np.asarray(a) for a in _masked_programs(model)[0](variables["params"], {}, x, y, m))
      loss_q = np.asarray(_masked_programs(model)[0](deq, {}, x, y, m)[0])
      np.testing.assert_allclose(out["first_order"][g], grad @ d, rtol=1e-6)
      np.testing.assert_allclose(out["curvature_term"][g], d @ hess @ d, rtol=1e-6)
      np.testing.assert_allclose(out["grad_norm"][g], np.linalg.norm(grad), rtol=1e-6)
      np.testing.assert_allclose(out["loss_fp"][g], loss, rtol=1e-6)
      np.testing.assert_allclose(out["loss_quantized"][g], loss_q, rtol=1e-6)
    np.testing.assert_allclose(out["excess_loss"], out["loss_quantized"] - out["loss_fp"], rtol=1e-12)
    np.testing.assert_allclose(out["second_order"], out["first_order"] + 0.5 * out["curvature_term"], rtol=1e-12)
    np.testing.assert_array_equal(out["counts"], [25, 14, 1])
    assert np.all(out["curvature_term"] > 0) and np.ptp(out["excess_loss"]) > 0  # groups really differ
  assert jnp.zeros(1).dtype == jnp.float32  # x64 did not leak


def test_second_order_estimate_is_exact_to_third_order_in_d():
  model, variables, x, y = _mlp()
  with jax.enable_x64(True):
    variables, x = _to64(variables), _to64(x)
    params = variables["params"]
    deq = _deq(model, variables, x, _bits(model, x, 4))
    errors = []
    for t in (1e-1, 1e-2):  # theta + t d: second-order error O(t^3), first-order O(t^2)
      q = jax.tree_util.tree_map(lambda p, v: p + t * (v - p), params, deq)
      out = theory._group_terms(model, params, q, {}, x, y, GROUPS, 3, 256)
      errors.append((np.abs(out["second_order"] - out["excess_loss"]),
                     np.abs(out["first_order"] - out["excess_loss"])))
      assert np.all(errors[-1][0] < 0.1 * errors[-1][1])  # the curvature term explains the rest
    ratio2, ratio1 = errors[0][0] / errors[1][0], errors[0][1] / errors[1][1]
    assert np.all(ratio2 > 300) and np.all((ratio1 > 50) & (ratio1 < 200)), (ratio2, ratio1)


def test_cnn_with_batchnorm_equals_a_per_group_grad_jvp_loop():
  model, variables, x, y = _cnn()
  bits_tree = _bits(model, x, 3)
  out = theory.second_order_terms(model, {**variables, "bits": bits_tree}, bits_tree, x, y, GROUPS, 3,
                                  batch_size=8)  # a "bits" collection in variables is dropped for theta
  deq = _deq(model, variables, x, bits_tree)
  for g in range(3):
    m = jnp.asarray(GROUPS == g, jnp.float32)
    loss, loss_q, grad, gd, hd = _masked_programs(model)[1](variables["params"], deq, variables["batch_stats"],
                                                             x, y, m)
    d = jax.tree_util.tree_map(jnp.subtract, deq, variables["params"])
    dhd = sum(float(jnp.vdot(a, b)) for a, b in zip(jax.tree_util.tree_leaves(d), jax.tree_util.tree_leaves(hd)))
    np.testing.assert_allclose(out["loss_fp"][g], loss, rtol=1e-5)
    np.testing.assert_allclose(out["loss_quantized"][g], loss_q, rtol=1e-5)
    np.testing.assert_allclose(out["first_order"][g], gd, rtol=1e-4)
    np.testing.assert_allclose(out["curvature_term"][g], dhd, rtol=1e-4)
    np.testing.assert_allclose(out["grad_norm"][g], float(optax.tree.norm(grad)), rtol=1e-4)
  np.testing.assert_allclose(out["d_norm"], float(optax.tree.norm(d)), rtol=1e-5)
  assert out["d_norm"] > 0 and np.all(out["excess_loss"] != 0)
  # The forward-only version gives the same losses; other data order and batches (a padded batch of 16).
  fwd = theory.excess_loss(model, variables, bits_tree, x, y, GROUPS, 3, batch_size=16)
  for k in ("loss_fp", "loss_quantized", "excess_loss"):
    np.testing.assert_allclose(fwd[k], out[k], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(fwd["counts"], [25, 14, 1])


def test_full_precision_bits_give_zero_change():
  model, variables, x, y = _cnn()
  out = theory.second_order_terms(model, variables, _bits(model, x, None), x, y, GROUPS, 3, batch_size=8)
  assert out["d_norm"] == 0.0
  for k in ("excess_loss", "first_order", "curvature_term", "second_order"):
    np.testing.assert_array_equal(out[k], 0.0)
  assert np.all(out["grad_norm"] > 0)


def test_bound_by_hand_and_nan_propagates():
  got = metrics.bound([1.0, 2.0, np.nan], 0.5, [4.0, -2.0, 1.0])
  np.testing.assert_allclose(got[:2], [1.0 * 0.5 + 0.5 * 4.0 * 0.25, 2.0 * 0.5 - 0.5 * 2.0 * 0.25])
  assert np.isnan(got[2]) and got.dtype == np.float64 and got.shape == (3,)
  assert np.isnan(metrics.bound([1.0], 0.5, [np.nan])[0])


def test_correlations_hand_cases(recwarn):
  # ranks agree exactly, values not linearly: pearson of [1, 2, 3, 4] vs [1, 4, 9, 100]
  a, b = np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.0, 4.0, 9.0, 100.0])
  got = metrics.correlations(a, b)
  assert got["spearman"] == pytest.approx(1.0)
  assert got["pearson"] == pytest.approx(np.corrcoef(a, b)[0, 1]) and got["pearson"] < 0.9
  left_out = metrics.correlations([1.0, np.nan, 2.0, 3.0], [3.0, 0.0, 2.0, np.inf])  # 2 finite pairs
  assert left_out["spearman"] == pytest.approx(-1.0) and left_out["pearson"] == pytest.approx(-1.0)
  for p, o in [([1.0, np.nan], [2.0, 3.0]), ([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]), ([], [])]:
    got = metrics.correlations(p, o)
    assert np.isnan(got["spearman"]) and np.isnan(got["pearson"])
  assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]
  with pytest.raises(ValueError, match="equal length"):
    metrics.correlations([1.0, 2.0], [1.0])


def test_bad_input_raises_value_errors():
  model, variables, x, y = _cnn()
  bits_tree = _bits(model, x, 4)
  with pytest.raises(ValueError, match=r"group\(s\) \[1\] have no samples"):
    theory.second_order_terms(model, variables, bits_tree, x, y, np.where(GROUPS == 1, 2, GROUPS), 3)
  with pytest.raises(ValueError, match="batch_size"):
    theory.second_order_terms(model, variables, bits_tree, x, y, GROUPS, 3, batch_size=0)
  with pytest.raises(ValueError, match=r"group ids must be in \[0, 2\)"):
    theory.excess_loss(model, variables, bits_tree, x, y, GROUPS, 2)
