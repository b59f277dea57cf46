"""Tests for fqjax.data.pipeline: epoch plans, the on-device gather and fixed-shape evaluation batches.

The host reader and prefetch thread live in benchmarks/host_pipeline.py (self-check: run that file).
"""
import jax.numpy as jnp
import numpy as np
import pytest

from fqjax.data import pipeline


@pytest.mark.parametrize("n,batch_size", [(10, 4), (12, 4), (3, 8), (1, 1)])
def test_every_sample_exactly_once_and_mask(n, batch_size):
  plan = pipeline.epoch_batches(n, batch_size, seed=0)
  num_batches = -(-n // batch_size)
  assert plan.idx.shape == plan.mask.shape == (num_batches, batch_size)
  assert plan.idx.dtype == np.int32 and plan.mask.dtype == np.float32
  real = plan.idx[plan.mask == 1]
  np.testing.assert_array_equal(np.sort(real), np.arange(n))
  # Padding only at the end of the last batch, and it points at valid rows.
  flat_mask = plan.mask.reshape(-1)
  np.testing.assert_array_equal(flat_mask, np.r_[np.ones(n), np.zeros(num_batches * batch_size - n)])
  assert ((plan.idx >= 0) & (plan.idx < n)).all()


def test_given_indices_with_repeats_are_all_kept():
  rows = np.array([7, 7, 3, 9, 3, 0, 1])
  plan = pipeline.epoch_batches(rows, 3, seed=1)
  np.testing.assert_array_equal(np.sort(plan.idx[plan.mask == 1]), np.sort(rows))


def test_deterministic_and_seed_dependent():
  a = pipeline.epoch_batches(100, 16, seed=5)
  b = pipeline.epoch_batches(100, 16, seed=5)
  c = pipeline.epoch_batches(100, 16, seed=6)
  np.testing.assert_array_equal(a.idx, b.idx)
  assert not np.array_equal(a.idx, c.idx)
  g = pipeline.epoch_batches(100, 16, seed=np.random.default_rng(5))
  np.testing.assert_array_equal(a.idx, g.idx)


def test_no_shuffle_keeps_order():
  plan = pipeline.epoch_batches(np.array([5, 2, 8, 1, 0]), 2, shuffle=False)
  np.testing.assert_array_equal(plan.idx[plan.mask == 1], [5, 2, 8, 1, 0])
  assert not np.array_equal(pipeline.epoch_batches(50, 50, seed=0).idx[0], np.arange(50))


def test_drop_remainder():
  plan = pipeline.epoch_batches(10, 4, seed=0, drop_remainder=True)
  assert plan.idx.shape == (2, 4) and plan.mask.all()
  assert len(np.unique(plan.idx)) == 8


@pytest.mark.parametrize("call,match", [
    (lambda: pipeline.epoch_batches(10, 0, seed=0), "batch_size must be an int >= 1"),
    (lambda: pipeline.epoch_batches(10, 4), "shuffle=True needs a seed"),
    (lambda: pipeline.epoch_batches(np.array([1.0, 2.0]), 4, seed=0), "1-D int array"),
    (lambda: pipeline.epoch_batches(np.array([], np.int64), 4, seed=0), "empty"),
    (lambda: pipeline.epoch_batches(np.array([0, -1]), 4, seed=0), "rows must be in"),
    (lambda: pipeline.epoch_batches(3, 4, seed=0, drop_remainder=True), "leaves no batch"),
])
def test_epoch_batches_errors(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def _arrays(n=10):
  x = np.arange(n * 2 * 2 * 3, dtype=np.float32).reshape(n, 2, 2, 3)
  return x, np.arange(n, dtype=np.int32) % 3, np.arange(n, dtype=np.int32) % 2


def test_device_arrays_gather_matches_numpy():
  x, y, g = _arrays()
  data = pipeline.DeviceArrays(x, y, g, weight=np.linspace(0, 1, 10, dtype=np.float32))
  assert len(data) == 10
  plan = pipeline.epoch_batches(10, 4, seed=0)
  for idx, mask in zip(plan.idx, plan.mask):
    batch = data.gather(idx, mask)
    assert set(batch) == {"x", "y", "group", "weight", "mask"}
    np.testing.assert_array_equal(batch["x"], x[idx])
    np.testing.assert_array_equal(batch["y"], y[idx])
    np.testing.assert_array_equal(batch["group"], g[idx])
    np.testing.assert_array_equal(batch["mask"], mask)
  assert "mask" not in data.gather(plan.idx[0])


def test_gather_compiles_once_for_a_fixed_batch_shape():
  x, y, g = _arrays()
  data = pipeline.DeviceArrays(x, y, g)
  plan = pipeline.epoch_batches(10, 2, seed=0)
  data.gather(plan.idx[0], plan.mask[0])
  before = pipeline._gather._cache_size()
  for idx, mask in zip(plan.idx, plan.mask):
    data.gather(idx, mask)
  # The indices are an argument, not a constant: new batches reuse the compiled gather.
  assert pipeline._gather._cache_size() == before


def test_device_arrays_errors():
  x, y, g = _arrays()
  with pytest.raises(ValueError, match="same number of rows as x"):
    pipeline.DeviceArrays(x, y[:5], g)
  with pytest.raises(ValueError, match="0 rows"):
    pipeline.DeviceArrays(x[:0], y[:0], g[:0])
  data = pipeline.DeviceArrays(x, y, g)
  with pytest.raises(ValueError, match=r"idx must be in \[0, 10\)"):
    data.gather(np.array([0, 10]))
  with pytest.raises(ValueError, match="integer rows"):
    data.gather(np.array([0.0, 1.0]))


@pytest.mark.parametrize("n,batch_size,multiple,expected_b", [
    (10, 4, 1, 4), (10, 16, 1, 10), (10, 3, 2, 4), (1, 8, 4, 4), (8, 8, 1, 8)])
def test_padded_batches_fixed_shape_and_real_rows(n, batch_size, multiple, expected_b):
  x = np.arange(n * 2, dtype=np.float32).reshape(n, 2)
  chunks = list(pipeline.padded_batches(x, batch_size, multiple))
  assert {c.shape for c, _ in chunks} == {(expected_b, 2)}
  assert all(c.dtype == np.float32 for c, _ in chunks)
  assert [r for _, r in chunks] == [min(expected_b, n - s) for s in range(0, n, expected_b)]
  np.testing.assert_array_equal(np.concatenate([c[:r] for c, r in chunks]), x)
  last, real = chunks[-1]
  np.testing.assert_array_equal(last[real:], np.repeat(last[:1], expected_b - real, axis=0))


def test_padded_batches_of_nothing_is_empty():
  assert list(pipeline.padded_batches(np.zeros((0, 3), np.float32), 4)) == []


def test_masked_loss_over_padded_epoch_equals_full_mean():
  # End to end: padded batches + mask give exactly the mean over the real samples.
  from fqjax.training import losses
  x, y, g = _arrays(10)
  logits_all = jnp.asarray(np.random.default_rng(0).normal(size=(10, 3)), jnp.float32)
  data = pipeline.DeviceArrays(logits_all, y, g)
  plan = pipeline.epoch_batches(10, 4, seed=0)
  total = 0.0
  for idx, mask in zip(plan.idx, plan.mask):
    b = data.gather(idx, mask)
    total += float(losses.weighted_cross_entropy(b["x"], b["y"], mask=b["mask"])) * float(mask.sum())
  expected = float(losses.weighted_cross_entropy(logits_all, jnp.asarray(y)))
  np.testing.assert_allclose(total / 10, expected, rtol=1e-5)
