"""Tests for fqjax.training.losses: weighted cross-entropy and weight tables against hand-computed values."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fqjax.training import losses

JIT = pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])


def _maybe_jit(fn, jit):
  return jax.jit(fn) if jit else fn


def _train_mean(table, counts):
  counts = np.asarray(counts, np.float64)
  return float(np.sum(counts * np.asarray(table)) / counts.sum())


@JIT
def test_all_ones_weights_equal_optax_mean(jit):
  logits = jax.random.normal(jax.random.key(0), (16, 5))
  labels = jax.random.randint(jax.random.key(1), (16,), 0, 5)
  expected = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  fn = _maybe_jit(losses.weighted_cross_entropy, jit)
  np.testing.assert_allclose(fn(logits, labels, jnp.ones(16)), expected, rtol=1e-6)
  np.testing.assert_allclose(fn(logits, labels), expected, rtol=1e-6)


@JIT
def test_weighted_and_masked_hand_computed(jit):
  # Zero logits over 2 classes: every ce_i = log 2.
  logits = jnp.zeros((3, 2))
  labels = jnp.array([0, 1, 0])
  w = jnp.array([1.0, 3.0, 5.0])
  fn = _maybe_jit(losses.weighted_cross_entropy, jit)
  np.testing.assert_allclose(fn(logits, labels, w), 9 * math.log(2) / 3, rtol=1e-6)
  mask = jnp.array([1.0, 1.0, 0.0])
  np.testing.assert_allclose(fn(logits, labels, w, mask), 4 * math.log(2) / 2, rtol=1e-6)
  np.testing.assert_allclose(fn(logits, labels, w, jnp.zeros(3)), 0.0)


def test_masked_row_with_nan_weight_is_ignored():
  logits = jnp.zeros((2, 2))
  out = losses.weighted_cross_entropy(logits, jnp.array([0, 1]), jnp.array([1.0, jnp.nan]),
                                      jnp.array([1.0, 0.0]))
  np.testing.assert_allclose(out, math.log(2), rtol=1e-6)


def test_weighted_ce_gradient_scales_with_weight():
  logits = jnp.array([[0.3, -0.2], [0.1, 0.4]])
  labels = jnp.array([0, 1])
  g1 = jax.grad(losses.weighted_cross_entropy)(logits, labels, jnp.array([1.0, 1.0]))
  g2 = jax.grad(losses.weighted_cross_entropy)(logits, labels, jnp.array([2.0, 0.0]))
  np.testing.assert_allclose(g2[0], 2 * g1[0], rtol=1e-6)
  np.testing.assert_allclose(g2[1], 0.0)


def test_weighted_ce_shape_errors():
  with pytest.raises(AssertionError):
    losses.weighted_cross_entropy(jnp.zeros((3, 2)), jnp.zeros(4, jnp.int32))
  with pytest.raises(AssertionError):
    losses.weighted_cross_entropy(jnp.zeros((3, 2)), jnp.zeros(3, jnp.int32), jnp.ones(2))
  with pytest.raises(ValueError, match="integer class ids"):
    losses.weighted_cross_entropy(jnp.zeros((3, 2)), jnp.zeros(3))


def test_inverse_frequency_hand_computed():
  # raw = [1, 1/3]; sum n*raw = 2, N = 4 -> w = raw * 4 / 2.
  np.testing.assert_allclose(losses.inverse_frequency_weights(jnp.array([1, 3])), [2.0, 2 / 3], rtol=1e-6)


def test_inverse_frequency_empty_group_gets_zero():
  w = losses.inverse_frequency_weights(jnp.array([2, 0, 2]))
  np.testing.assert_allclose(w, [1.0, 0.0, 1.0], rtol=1e-6)


def test_effective_number_hand_computed():
  # beta = 0.5: effective numbers E_1 = 1, E_2 = 1.5; raw = [1, 2/3];
  # sum n*raw = 7/3, N = 3 -> w = raw * 9/7.
  w = losses.effective_number_weights(jnp.array([1, 2]), beta=0.5)
  np.testing.assert_allclose(w, [9 / 7, 6 / 7], rtol=1e-6)


def test_effective_number_limits():
  counts = jnp.array([5, 50, 500])
  np.testing.assert_allclose(losses.effective_number_weights(counts, beta=0.0), 1.0, rtol=1e-6)
  # beta -> 1 approaches inverse frequency (the expm1 form stays accurate there).
  np.testing.assert_allclose(losses.effective_number_weights(counts, beta=1 - 1e-7),
                             losses.inverse_frequency_weights(counts), rtol=1e-3)


def test_hardness_hand_computed():
  counts = jnp.array([1, 1])
  np.testing.assert_allclose(losses.hardness_weights(counts, jnp.array([1.0, 3.0]), floor=0.0),
                             [0.5, 1.5], rtol=1e-6)
  np.testing.assert_allclose(losses.hardness_weights(counts, jnp.array([1.0, 3.0]), floor=0.5),
                             [0.75, 1.25], rtol=1e-6)
  np.testing.assert_allclose(losses.hardness_weights(counts, jnp.array([1.0, 3.0]), power=2.0, floor=0.0),
                             [0.2, 1.8], rtol=1e-6)
  np.testing.assert_allclose(losses.hardness_weights(counts, jnp.array([1.0, 3.0]), power=0.0), [1.0, 1.0])


def test_hardness_floor_and_zero_losses():
  counts = jnp.array([10, 10, 10])
  w = losses.hardness_weights(counts, jnp.array([0.0, 1.0, 2.0]), floor=0.2)
  np.testing.assert_allclose(w[0], 0.2, rtol=1e-6)
  np.testing.assert_allclose(losses.hardness_weights(counts, jnp.zeros(3)), 1.0)


@JIT
def test_hardness_responds_to_losses(jit):
  counts = jnp.array([100, 30, 10])
  fn = _maybe_jit(losses.hardness_weights, jit)
  before = fn(counts, jnp.array([0.5, 0.5, 0.5]))
  after = fn(counts, jnp.array([0.5, 0.5, 2.0]))
  np.testing.assert_allclose(before, 1.0, rtol=1e-6)
  assert after[2] > before[2] and after[0] < before[0] and after[1] < before[1]
  assert after[2] > after[0]


@pytest.mark.parametrize("scheme", losses.WEIGHT_SCHEMES)
@JIT
def test_every_table_has_training_mean_one(scheme, jit):
  counts = jnp.array([500, 40, 7, 0, 120])
  kw = {"group_losses": jnp.array([0.2, 0.9, 1.7, 0.4, 0.3])} if scheme == "hardness" else {}
  table = _maybe_jit(lambda c: losses.weight_table(scheme, c, **kw), jit)(counts)
  assert table.shape == (5,) and table.dtype == jnp.float32
  np.testing.assert_allclose(_train_mean(table, counts), 1.0, rtol=1e-5)
  if scheme in ("inverse_frequency", "effective_number"):
    assert table[2] > table[1] > table[4] > table[0]


def test_normalize_weights_all_zero_falls_back_to_uniform():
  np.testing.assert_allclose(losses.normalize_weights(jnp.zeros(3), jnp.array([1, 2, 3])), 1.0)


@JIT
def test_gather_weights(jit):
  table = jnp.array([0.5, 2.0, 1.0])
  fn = _maybe_jit(losses.gather_weights, jit)
  np.testing.assert_allclose(fn(table, jnp.array([2, 0, 1, 1])), [1.0, 0.5, 2.0, 2.0])


def test_gather_then_weighted_ce_matches_manual_sum():
  table = losses.inverse_frequency_weights(jnp.array([3, 1]))
  group = jnp.array([0, 0, 0, 1])
  logits = jax.random.normal(jax.random.key(2), (4, 3))
  labels = jnp.array([0, 1, 2, 0])
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  loss = jax.jit(lambda l, y, g: losses.weighted_cross_entropy(l, y, losses.gather_weights(table, g)))(
      logits, labels, group)
  np.testing.assert_allclose(loss, jnp.sum(table[group] * ce) / 4, rtol=1e-6)


def test_every_scheme_has_a_table():
  assert tuple(losses._WEIGHT_TABLES) == losses.WEIGHT_SCHEMES


def test_weight_table_passes_each_scheme_its_options():
  counts = jnp.array([10, 30, 60])
  np.testing.assert_allclose(losses.weight_table("effective_number", counts, beta=0.9),
                             losses.effective_number_weights(counts, beta=0.9), rtol=1e-6)
  np.testing.assert_allclose(
      losses.weight_table("hardness", counts, group_losses=jnp.array([1.0, 2.0, 0.5]), power=2.0, floor=0.3),
      losses.hardness_weights(counts, jnp.array([1.0, 2.0, 0.5]), power=2.0, floor=0.3), rtol=1e-6)
  # Options a scheme does not take are ignored, as before the table.
  np.testing.assert_allclose(losses.weight_table("inverse_frequency", counts, beta=0.5, power=3.0),
                             losses.inverse_frequency_weights(counts), rtol=1e-6)


@pytest.mark.parametrize("call,match", [
    (lambda: losses.weight_table("focal", jnp.array([1, 2])), "Unknown weighting scheme 'focal'"),
    (lambda: losses.weight_table("hardness", jnp.array([1, 2])), "needs group_losses"),
    (lambda: losses.weight_table("uniform", jnp.array([1, 2]), group_losses=jnp.ones(2)), "only used by"),
    (lambda: losses.inverse_frequency_weights(jnp.array([1, -2])), "counts must be >= 0"),
    (lambda: losses.inverse_frequency_weights(jnp.array([0, 0])), "positive total"),
    (lambda: losses.inverse_frequency_weights(jnp.ones((2, 2))), "1-D"),
    (lambda: losses.effective_number_weights(jnp.array([1, 2]), beta=1.0), r"beta must be in \[0, 1\)"),
    (lambda: losses.hardness_weights(jnp.array([1, 2]), jnp.array([1.0, -1.0])), "finite and >= 0"),
    (lambda: losses.hardness_weights(jnp.array([1, 2]), jnp.array([1.0])), "one entry per group"),
    (lambda: losses.hardness_weights(jnp.array([1, 2]), jnp.ones(2), floor=1.5), r"floor must be in \[0, 1\]"),
    (lambda: losses.hardness_weights(jnp.array([1, 2]), jnp.ones(2), power=-1.0), "power must be >= 0"),
    (lambda: losses.gather_weights(jnp.ones(2), jnp.array([0, 2])), r"ids must be in \[0, 2\)"),
])
def test_errors(call, match):
  with pytest.raises(ValueError, match=match):
    call()
