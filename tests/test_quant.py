"""Tests for fqjax.quantization.quant: grids, STE gradients, traced bits, storage size, calibration."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from fqjax.quantization import calibration, quant


def _x(shape=(6, 7), seed=0):
  return jax.random.normal(jax.random.PRNGKey(seed), shape) * 2.0


class FakeQuantTest(chex.TestCase):

  @parameterized.product(bits=[1, 2, 3, 4, 8], symmetric=[True, False], narrow=[False, True],
                         axis=[None, 1])
  def test_levels_at_most_2_pow_b_and_idempotent(self, bits, symmetric, narrow, axis):
    x = _x((64, 5))
    y = quant.fake_quant(x, bits, symmetric=symmetric, narrow_range=narrow, axis=axis)
    cols = [y[:, j] for j in range(5)] if axis is not None else [y]
    for c in cols:
      self.assertLessEqual(len(np.unique(np.asarray(c))), 2**bits)
    # Idempotence: quantizing the quantized tensor again changes nothing.
    y2 = quant.fake_quant(y, bits, symmetric=symmetric, narrow_range=narrow, axis=axis)
    np.testing.assert_allclose(y2, y, rtol=1e-6, atol=1e-6)

  def test_many_levels_are_actually_used(self):
    # 4-bit symmetric with max|x| -> qmax: the 15 levels -7..7 are used; -8 only with a given scale.
    x = jnp.linspace(-1.0, 1.0, 1001)
    self.assertEqual(len(np.unique(np.asarray(quant.fake_quant(x, 4)))), 15)
    self.assertEqual(len(np.unique(np.asarray(quant.fake_quant(x, 4, scale=1.0 / 8)))), 16)
    self.assertEqual(len(np.unique(np.asarray(quant.fake_quant(x, 4, narrow_range=True)))), 15)
    x01 = jnp.linspace(0.0, 1.0, 1001)  # asymmetric on [0, 1]: z = 0, all 8 levels of 3 bits
    self.assertEqual(len(np.unique(np.asarray(quant.fake_quant(x01, 3, symmetric=False)))), 8)

  def test_values_on_grid_unchanged(self):
    scale = 0.25
    grid = jnp.arange(-8, 8, dtype=jnp.float32) * scale  # 4-bit signed grid
    y = quant.fake_quant(grid, 4, scale=scale)
    np.testing.assert_array_equal(y, grid)

  def test_hand_computed_symmetric(self):
    x = jnp.array([-1.0, -0.4, 0.0, 0.26, 0.5, 0.9])
    # 3 bits symmetric: qmax = 3, s = 1.0 / 3; q = clip(round(x/s), -4, 3).
    s = 1.0 / 3.0
    expected = np.clip(np.round(np.asarray(x) / s), -4, 3) * s
    np.testing.assert_allclose(quant.fake_quant(x, 3), expected, rtol=1e-6)

  def test_hand_computed_asymmetric(self):
    x = jnp.array([-0.5, 0.0, 0.7, 1.5])
    # 2 bits asymmetric: range [-0.5, 1.5], s = 2/3, z = round(0.5 / s) = 1 (0.75 rounds to 1).
    s = 2.0 / 3.0
    z = 1.0
    q = np.clip(np.round(np.asarray(x) / s) + z, 0, 3)
    np.testing.assert_allclose(quant.fake_quant(x, 2, symmetric=False), (q - z) * s, rtol=1e-6)

  def test_round_half_to_even(self):
    x = jnp.array([0.5, 1.5, 2.5, -0.5, -2.5])
    y = quant.fake_quant(x, 8, scale=1.0)
    np.testing.assert_array_equal(y, [0.0, 2.0, 2.0, -0.0, -2.0])

  def test_one_bit_binary(self):
    x = jnp.array([-3.0, -0.1, 0.0, 0.2, 1.0])
    np.testing.assert_array_equal(quant.fake_quant(x, 1), [-3.0, -3.0, 3.0, 3.0, 3.0])
    # Asymmetric one bit on [0, 2]: s = 2, z = 0, threshold at s / 2 = 1.
    y = quant.fake_quant(jnp.array([0.0, 0.2, 0.9, 1.1, 2.0]), 1, symmetric=False)
    np.testing.assert_allclose(y, [0.0, 0.0, 0.0, 2.0, 2.0])

  @parameterized.parameters(32, 33, None, 64)
  def test_full_precision_is_identity_bit_for_bit(self, bits):
    x = _x()
    y = quant.fake_quant(x, bits)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x))
    yj = jax.jit(quant.fake_quant)(x, 32.0)
    np.testing.assert_array_equal(np.asarray(yj), np.asarray(x))

  def test_per_channel_scale_shape(self):
    x = _x((3, 3, 4, 16))
    s, z = quant.compute_scale_zero_point(x, 4, axis=-1)
    chex.assert_shape(s, (16,))
    chex.assert_shape(z, (16,))
    np.testing.assert_allclose(s, np.abs(np.asarray(x)).max(axis=(0, 1, 2)) / 7, rtol=1e-6)
    s, z = quant.compute_scale_zero_point(x, 4, axis=2)
    chex.assert_shape(s, (4,))

  def test_per_channel_uses_each_channel_range(self):
    x = jnp.stack([jnp.linspace(-1, 1, 50), jnp.linspace(-100, 100, 50)], axis=1)
    y = quant.fake_quant(x, 4, axis=1)
    # Channel 0 is quantized with its own small scale: error far below the shared scale.
    self.assertLess(float(jnp.max(jnp.abs(y[:, 0] - x[:, 0]))), 1.0 / 7 / 2 + 1e-6)
    y_tensor = quant.fake_quant(x, 4)
    self.assertGreater(float(jnp.max(jnp.abs(y_tensor[:, 0] - x[:, 0]))), 0.5)

  @parameterized.parameters(("clipped",), ("identity",))
  def test_ste_gradient(self, ste):
    x = jnp.array([-3.0, -1.0, -0.2, 0.0, 0.3, 0.9, 2.0])
    # 2 bits, scale 0.5: grid [-2, 1] * 0.5 = [-1.0, 0.5]; clipped STE passes inside it.
    g = jax.grad(lambda v: jnp.sum(quant.fake_quant(v, 2, scale=0.5, ste=ste)))(x)
    expected = ((x >= -1.0) & (x <= 0.5)).astype(jnp.float32) if ste == "clipped" else jnp.ones_like(x)
    np.testing.assert_array_equal(g, expected)

  def test_ste_gradient_traced_full_precision_is_one(self):
    x = jnp.array([-3.0, 0.1, 5.0])
    g = jax.grad(lambda v, b: jnp.sum(quant.fake_quant(v, b, scale=0.5)))(x, jnp.float32(32))
    np.testing.assert_array_equal(g, jnp.ones_like(x))

  def test_vmap_over_bits_equals_loop(self):
    x = _x((8, 5))
    bits = jnp.array([1.0, 2.0, 3.0, 4.0, 8.0, 32.0])
    swept = jax.vmap(lambda b: quant.fake_quant(x, b, axis=1))(bits)
    for i, b in enumerate([1, 2, 3, 4, 8, 32]):
      np.testing.assert_allclose(swept[i], quant.fake_quant(x, b, axis=1), rtol=1e-6, atol=1e-7)

  def test_jit_with_traced_bits_compiles_once(self):
    traces = []

    @jax.jit
    def f(x, b):
      traces.append(1)
      return quant.fake_quant(x, b)

    x = _x()
    for b in (2.0, 3.0, 4.0, 8.0):
      f(x, jnp.float32(b))
    self.assertEqual(len(traces), 1)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(bits=[2, 4, 8], symmetric=[True, False])
  def test_jit_equals_eager(self, bits, symmetric):
    x = _x((5, 4))
    f = self.variant(lambda v, b: quant.fake_quant(v, b, symmetric=symmetric, axis=0))
    np.testing.assert_allclose(f(x, float(bits)), quant.fake_quant(x, bits, symmetric=symmetric, axis=0),
                               rtol=1e-6, atol=1e-7)

  def test_bfloat16_input_keeps_dtype_and_float32_grid(self):
    x = _x().astype(jnp.bfloat16)
    y = quant.fake_quant(x, 4)
    self.assertEqual(y.dtype, jnp.bfloat16)
    self.assertLessEqual(len(np.unique(np.asarray(y, np.float32))), 16)

  def test_all_zero_tensor(self):
    np.testing.assert_array_equal(quant.fake_quant(jnp.zeros(4), 4), jnp.zeros(4))
    np.testing.assert_array_equal(quant.fake_quant(jnp.zeros(4), 4, symmetric=False), jnp.zeros(4))


class StorageSizeTest(chex.TestCase):

  def test_storage_size(self):
    params = {"conv": {"kernel": jnp.zeros((3, 3, 2, 4)), "bias": jnp.zeros(4)},
              "head": {"kernel": jnp.zeros((4, 10)), "bias": jnp.zeros(10)}}
    size = quant.storage_size(params, {"conv": 4, "head": 8})
    # conv: 72 * 4 + 4 scales * 32 + bias 4 * 32; head: 40 * 8 + 10 * 32 + bias 10 * 32.
    expected = 72 * 4 + 4 * 32 + 4 * 32 + 40 * 8 + 10 * 32 + 10 * 32
    self.assertEqual(size["bits"], expected)
    self.assertAlmostEqual(size["bytes"], expected / 8)
    self.assertEqual(size["per_layer"]["conv"]["weight_bits"], 4)
    full = quant.storage_size(params, {})
    self.assertEqual(full["bits"], 32 * (72 + 4 + 40 + 10))
    self.assertAlmostEqual(full["compression"], 1.0)

  def test_storage_size_names_nested_layers_by_path(self):
    params = {"block": {"conv": {"kernel": jnp.zeros((2, 4)), "bias": jnp.zeros(4)}}, "head": [jnp.zeros(3)]}
    size = quant.storage_size(params, {"block/conv": 2}, per_channel=False)
    self.assertEqual(size["per_layer"]["block/conv"], {"params": 12, "bits": 8 * 2 + 32 + 4 * 32, "weight_bits": 2})
    self.assertEqual(size["per_layer"]["head"]["bits"], 3 * 32)  # a list leaf: path "head/0", layer "head"


class CalibrationTest(chex.TestCase):

  def test_minmax(self):
    batches = [jnp.array([[-1.0, 2.0]]), jnp.array([[0.5, 3.0]]), jnp.array([[-2.0, 0.0]])]
    r = calibration.calibrate(batches, "minmax")
    self.assertEqual(float(r.lo), -2.0)
    self.assertEqual(float(r.hi), 3.0)
    self.assertEqual(int(r.count), 3)
    r = calibration.calibrate(batches, "minmax", axis=1)
    np.testing.assert_array_equal(r.lo, [-2.0, 0.0])
    np.testing.assert_array_equal(r.hi, [0.5, 3.0])

  def test_ema(self):
    batches = [jnp.array([0.0, 1.0]), jnp.array([0.0, 3.0])]
    r = calibration.calibrate(batches, "ema", decay=0.5)
    self.assertAlmostEqual(float(r.hi), 0.5 * 1.0 + 0.5 * 3.0)
    self.assertAlmostEqual(float(r.lo), 0.0)

  def test_percentile_clips_outliers(self):
    x = jnp.concatenate([jnp.linspace(-1, 1, 10000), jnp.array([100.0])])
    r = calibration.calibrate([x], "percentile", lower=1.0, upper=99.0)
    self.assertLess(float(r.hi), 1.0)
    self.assertGreater(float(r.lo), -1.0)
    np.testing.assert_allclose(r.hi, np.percentile(np.asarray(x), 99.0), rtol=1e-5)

  def test_scale_from_range_matches_tensor(self):
    x = _x()
    lo, hi = quant.tensor_range(x)
    s1, z1 = quant.scale_zero_point_from_range(lo, hi, 4, symmetric=False)
    s2, z2 = quant.compute_scale_zero_point(x, 4, symmetric=False)
    np.testing.assert_allclose(s1, s2)
    np.testing.assert_allclose(z1, z2)


class BadInputTest(chex.TestCase):

  @parameterized.parameters(0, -1, 2.5, "4", float("nan"))
  def test_bad_bits(self, bits):
    with self.assertRaisesRegex(ValueError, "bits"):
      quant.fake_quant(_x(), bits)

  def test_bad_ste(self):
    with self.assertRaisesRegex(ValueError, "ste must be one of"):
      quant.fake_quant(_x(), 4, ste="round")

  @parameterized.parameters(2, -3, 1.0)
  def test_bad_axis(self, axis):
    with self.assertRaisesRegex(ValueError, "axis"):
      quant.fake_quant(_x((3, 4)), 4, axis=axis)

  def test_bad_scale_shape(self):
    with self.assertRaisesRegex(ValueError, "channels"):
      quant.fake_quant(_x((3, 4)), 4, axis=1, scale=jnp.ones(3))

  def test_bad_calibration_method(self):
    with self.assertRaisesRegex(ValueError, "calibration method"):
      calibration.calibrate([_x()], "kl")
    self.assertEqual(calibration.CALIBRATION_METHODS, tuple(calibration.CALIBRATORS))
    with self.assertRaisesRegex(ValueError, "no batches"):
      calibration.calibrate([], "ema")


class LSQTest(chex.TestCase):

  def test_forward_matches_grid_and_full_precision_identity(self):
    x = jnp.array([-1.0, -0.26, 0.1, 0.4, 2.0])
    y = quant.lsq_fake_quant(x, jnp.float32(0.25), 3)
    np.testing.assert_allclose(y, np.clip(np.round(np.asarray(x) / 0.25), -4, 3) * 0.25)
    np.testing.assert_array_equal(quant.lsq_fake_quant(x, 0.25, 32), x)
    np.testing.assert_array_equal(jax.jit(quant.lsq_fake_quant)(x, 0.25, 32.0), x)

  def test_gradients_follow_lsq(self):
    x = jnp.array([-2.0, -0.3, 0.1, 0.4, 0.9])
    s, bits = 0.25, 3  # grid [-4, 3] * s = [-1.0, 0.75]
    gx, gs = jax.grad(lambda v, sc: jnp.sum(quant.lsq_fake_quant(v, sc, bits)), argnums=(0, 1))(x, s)
    np.testing.assert_array_equal(gx, [0.0, 1.0, 1.0, 1.0, 0.0])
    v = np.asarray(x) / s
    inside = (v >= -4) & (v <= 3)
    per_elem = np.where(inside, np.round(v) - v, np.clip(v, -4, 3))
    g = 1.0 / np.sqrt(x.size * 3)  # LSQ gradient scale for n elements, qmax = 3
    np.testing.assert_allclose(gs, per_elem.sum() * g, rtol=1e-5)

  def test_per_channel_init_scale(self):
    w = jnp.array([[1.0, -4.0], [-3.0, 0.0]])
    s = quant.lsq_init_scale(w, 4, axis=1)
    np.testing.assert_allclose(s, [2 * 2.0 / np.sqrt(7), 2 * 2.0 / np.sqrt(7)], rtol=1e-6)


# ----------------------------------------------------------------------------
# Weight scale rules (issue 12): max, half_step, mse
# ----------------------------------------------------------------------------

W2 = np.array([[0.9, -0.3, 0.1, -1.0], [0.2, 0.25, -0.05, 0.5]], np.float32).T  # [4, 2]: two output channels


def test_weight_scale_rules_by_hand_at_two_bits():
  # 2 bits: qmin = -2, qmax = 1. Channel 0 has max|w| = 1, channel 1 has 0.5.
  np.testing.assert_allclose(quant.weight_scale(W2, 2, "max", axis=1), [1.0, 0.5])
  np.testing.assert_allclose(quant.weight_scale(W2, 2, "half_step", axis=1), [1 / 1.5, 0.5 / 1.5], rtol=1e-6)
  # half_step reaches the level -2^(b-1): -1.0 / (1 / 1.5) = -1.5 rounds (to even) to -2.
  q = quant.fake_quant(W2, 2, axis=1, scale=quant.weight_scale(W2, 2, "half_step", axis=1))
  np.testing.assert_allclose(np.asarray(q)[:, 0], [1 / 1.5, 0.0, 0.0, -2 / 1.5], rtol=1e-6)
  assert np.asarray(quant.fake_quant(W2, 2, axis=1))[:, 0].min() == -1.0  # max: -2 is never used


def test_mse_scale_is_the_grid_ratio_with_the_least_error():
  s = np.asarray(quant.weight_scale(W2, 2, "mse", axis=1))
  for c in range(2):
    w = W2[:, c]
    base = np.abs(w).max()  # / qmax = 1

    def err(scale):
      return float(np.sum((w - np.clip(np.round(w / scale), -2, 1) * scale) ** 2))

    errors = [err(r * base) for r in quant.MSE_RATIOS]
    assert s[c] == pytest.approx(quant.MSE_RATIOS[int(np.argmin(errors))] * base, rel=1e-6)
    assert err(s[c]) <= err(base) + 1e-12  # never worse than the max rule


def test_weight_scale_with_traced_bits_equals_python_bits():
  for rule in quant.WEIGHT_SCALE_RULES:
    traced = jax.jit(lambda b: quant.weight_scale(W2, b, rule, axis=1))(jnp.float32(3))
    np.testing.assert_allclose(traced, quant.weight_scale(W2, 3, rule, axis=1), rtol=1e-6)
    # one bit: every rule is max; an all-zero slice gets scale 1
    np.testing.assert_allclose(quant.weight_scale(W2, 1, rule, axis=1), [1.0, 0.5])
    np.testing.assert_allclose(quant.weight_scale(np.zeros((3, 2)), 4, rule, axis=1), [1.0, 1.0])
  with pytest.raises(ValueError, match="weight scale rule"):
    quant.weight_scale(W2, 4, "minmax")
