"""Tests for the optimization-state tools (fqjax.explain.curvature, fqjax.explain.lanczos).

Reference values come from dense Hessians (jax.hessian on a few hundred params),
numpy.linalg.eigvalsh, per-group loops of jax.grad, quant.fake_quant and scipy.
"""
import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.stats
from jax.flatten_util import ravel_pytree

from fqjax.quantization import layers, quant
from fqjax.explain import curvature
from fqjax.explain import (dequantized_params, group_gradient_norms, group_mean_sample_gradient_norms,
                           group_top_eigenvalues, hutchinson_trace, lanczos_top_eigenvalues, make_hvp,
                           power_iteration)
from fqjax.quantization.layers import BitSpec, QuantRule
from fqjax.analysis.metrics import spearman
from fqjax.models import MLP, SmallCNN

GROUPS = np.array([0] * 21 + [1] * 9 + [2] * 1 + [0] * 4 + [1] * 5)  # uneven, interleaved, one singleton


def _key(i):
  return jax.random.PRNGKey(i)


def _with_random_stats(variables, key, zero_gamma=False):
  """BatchNorm running stats (and gammas) away from identity, so inference mode matters."""
  def perturb(path, leaf):
    name = str(getattr(path[-1], "key", path[-1]))
    k = jax.random.fold_in(key, zlib.crc32(jax.tree_util.keystr(path).encode()) % 1000)
    if name == "mean":
      return 0.3 * jax.random.normal(k, leaf.shape)
    if name == "var":
      return jax.random.uniform(k, leaf.shape, minval=0.5, maxval=2.0)
    return leaf
  out = dict(variables)
  out["batch_stats"] = jax.tree_util.tree_map_with_path(perturb, variables["batch_stats"])
  if zero_gamma:
    params = jax.tree_util.tree_map(lambda a: a, variables["params"])
    params["conv2"] = {**params["conv2"], "scale": params["conv2"]["scale"].at[1].set(0.0)}
    out["params"] = params
  return out


@functools.lru_cache(maxsize=None)
def _cnn(fold_bn=False, zero_gamma=False):
  """SmallCNN width 2 (433 params, BatchNorm in inference mode) on 40 8x8 inputs, 3 classes."""
  model = SmallCNN(num_classes=3, width=2, fold_bn=fold_bn)
  x = jax.random.normal(_key(1), (40, 8, 8, 1), jnp.float32)
  y = jax.random.randint(_key(2), (40,), 0, 3, jnp.int32)
  variables = _with_random_stats(jax.jit(model.init)(_key(0), x), _key(3), zero_gamma)
  return model, variables, x, y


@functools.lru_cache(maxsize=None)
def _mlp():
  """MLP 6 -> 8 -> 3 (83 params) on 40 inputs."""
  model = MLP(num_classes=3, hidden=(8,))
  x = jax.random.normal(_key(4), (40, 6), jnp.float32)
  y = jax.random.randint(_key(5), (40,), 0, 3, jnp.int32)
  return model, jax.jit(model.init)(_key(0), x), x, y


def _mean_loss(model, variables, x, y):
  def loss(params):
    logits = model.apply({"params": params, "batch_stats": variables.get("batch_stats", {})}, x, train=False)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return loss


@functools.lru_cache(maxsize=None)
def _programs(model):
  """Independent references, jitted once per model: dense Hessian and the masked group-mean gradient."""
  def hessian(variables, x, y):
    flat, unravel = ravel_pytree(variables["params"])
    return jax.hessian(lambda f: _mean_loss(model, variables, x, y)(unravel(f)))(flat)

  def masked_grad(variables, params, x, y, m):
    def loss(p):
      logits = model.apply({"params": p, "batch_stats": variables["batch_stats"]}, x, train=False)
      return jnp.sum(m * optax.softmax_cross_entropy_with_integer_labels(logits, y)) / jnp.sum(m)
    return jax.value_and_grad(loss)(params)

  return jax.jit(hessian), jax.jit(masked_grad)


def _dense_hessian(model, variables, x, y):
  return np.asarray(_programs(model)[0](variables, x, y), np.float64), ravel_pytree(variables["params"])[0]


def _to64(tree):
  return jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating)
                                else a, tree)


# ----------------------------------------------------------------------------
# Dequantized params
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("per_channel", [True, False])
def test_dequantized_params_are_the_layers_fake_quantized_kernels(per_channel):
  _, variables, x, _ = _cnn()  # same params for either setting
  model = SmallCNN(num_classes=3, width=2, quant=QuantRule(per_channel=per_channel))
  spec = BitSpec(w_bits=3, layers={"conv2": (None, None), "head": (5, None)})
  deq = dequantized_params(model, variables, spec.bits_tree(layers.quant_layer_names(model, x)), x)
  for name, bits in [("conv1", 3), ("conv2", None), ("conv3", 3), ("head", 5)]:
    k = variables["params"][name]["kernel"]
    want = quant.fake_quant(k, bits, axis=k.ndim - 1 if per_channel else None)
    np.testing.assert_array_equal(deq[name]["kernel"], want)
    assert bits is None or not np.array_equal(want, k)
  np.testing.assert_array_equal(deq["conv1"]["scale"], variables["params"]["conv1"]["scale"])
  np.testing.assert_array_equal(deq["head"]["bias"], variables["params"]["head"]["bias"])


@pytest.mark.parametrize("fold_bn", [False, True])
def test_dequantized_network_computes_the_quantized_model(fold_bn):
  model, variables, x, _ = _cnn(fold_bn, fold_bn)
  bits_tree = BitSpec.uniform(3).bits_tree(layers.quant_layer_names(model, x))
  quantized = model.apply({**variables, "bits": bits_tree}, x, train=False)
  deq = dequantized_params(model, variables, bits_tree, x)
  plain = model.apply({**variables, "params": deq}, x, train=False)
  fp = model.apply(variables, x, train=False)
  np.testing.assert_allclose(plain, quantized, rtol=1e-5, atol=1e-5)
  assert np.max(np.abs(quantized - fp)) > 1e-2  # 3 bits really changed the network


def _sown_kernels(model, variables, bits_tree, x):
  _, state = model.apply({**variables, "bits": bits_tree}, x, train=False, mutable=[layers.KERNELS])
  return state[layers.KERNELS]


def test_dequantized_params_fold_the_sown_kernels_back():
  model, variables, x, _ = _cnn(fold_bn=True, zero_gamma=True)
  bits_tree = BitSpec(w_bits=3, layers={"conv3": (None, None)}).bits_tree(layers.quant_layer_names(model, x))
  sown = _sown_kernels(model, variables, bits_tree, x)
  deq = dequantized_params(model, variables, bits_tree, x)
  for name in ("conv1", "conv2"):
    p, s = variables["params"][name], variables["batch_stats"][name]
    g = p["scale"] / np.sqrt(s["var"] + 1e-5)
    np.testing.assert_allclose(sown[name]["fold_scale"][0], g, rtol=1e-6)
    live = g != 0  # W' g = Q(W g), the kernel the folded layer multiplies by; dead channels keep W
    np.testing.assert_allclose((deq[name]["kernel"] * g)[..., live], sown[name]["kernel"][0][..., live],
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(deq[name]["kernel"][..., ~live], p["kernel"][..., ~live])
  assert not np.all(variables["params"]["conv2"]["scale"] != 0)  # the g = 0 branch is exercised
  # 32 bits: (W g) / g, W up to rounding.
  np.testing.assert_allclose(deq["conv3"]["kernel"], variables["params"]["conv3"]["kernel"], rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(deq["head"]["kernel"], sown["head"]["kernel"][0])  # a dense layer: no fold


def test_dequantized_params_follow_the_rule_lsq_and_narrow_range():
  _, variables, x, _ = _cnn()
  names = layers.quant_layer_names(_cnn()[0], x)
  bits_tree = BitSpec.uniform(3).bits_tree(names)
  narrow = SmallCNN(num_classes=3, width=2, quant=QuantRule(narrow_range=True))
  k = variables["params"]["conv2"]["kernel"]
  np.testing.assert_array_equal(dequantized_params(narrow, variables, bits_tree, x)["conv2"]["kernel"],
                                quant.fake_quant(k, 3, narrow_range=True, axis=-1))
  lsq = SmallCNN(num_classes=3, width=2, quant=QuantRule(lsq=True))
  lsq_vars = {**variables, "params": layers.init_lsq_scales(
      jax.jit(lsq.init)(_key(0), x)["params"], BitSpec.uniform(3).resolve(names))}
  w_scale = lsq_vars["params"]["conv2"]["w_scale"]
  np.testing.assert_array_equal(dequantized_params(lsq, lsq_vars, bits_tree, x)["conv2"]["kernel"],
                                quant.lsq_fake_quant(lsq_vars["params"]["conv2"]["kernel"], w_scale, 3, axis=-1))


def test_dequantized_params_under_jit_and_vmap_with_traced_bits():
  model, variables, x, _ = _cnn()
  names = layers.quant_layer_names(model, x)
  trees = [BitSpec.uniform(b).bits_tree(names) for b in (2, 32)]
  fn = jax.jit(lambda v, b: dequantized_params(model, v, b, x))
  stacked = jax.vmap(lambda b: dequantized_params(model, variables, b, x))(layers.stack_bits_trees(trees))
  for i, tree in enumerate(trees):
    eager = dequantized_params(model, variables, tree, x)
    jax.tree_util.tree_map(np.testing.assert_array_equal, fn(variables, tree), eager)
    jax.tree_util.tree_map(lambda s, e: np.testing.assert_array_equal(s[i], e), stacked, eager)
  jax.tree_util.tree_map(np.testing.assert_array_equal, dequantized_params(model, variables, trees[1], x),
                         variables["params"])


def test_dequantized_params_refuse_activation_bits_unless_ignored():
  model, variables, x, _ = _cnn()
  bits_tree = BitSpec.uniform(4, 8).bits_tree(layers.quant_layer_names(model, x))
  with pytest.raises(ValueError, match="activations"):
    dequantized_params(model, variables, bits_tree, x)
  with pytest.raises(ValueError, match="activations must be one of"):
    dequantized_params(model, variables, bits_tree, x, activations="quantize")
  ignored = dequantized_params(model, variables, bits_tree, x, activations="ignore")
  weights_only = dequantized_params(model, variables, BitSpec.uniform(4).bits_tree(layers.quant_layer_names(
      model, x)), x)
  jax.tree_util.tree_map(np.testing.assert_array_equal, ignored, weights_only)


# ----------------------------------------------------------------------------
# Per-group gradient norms
# ----------------------------------------------------------------------------

def _loop_norms(model, variables, params, x, y, group, num_groups):
  """Per group: gradient of that group's mean loss alone (a masked mean), its norms and loss."""
  norms, per_layer, group_loss = [], [], []
  for g in range(num_groups):
    loss, grads = _programs(model)[1](variables, params, x, y, jnp.asarray(group == g, jnp.float32))
    norms.append(float(optax.tree.norm(grads)))
    per_layer.append({k: float(optax.tree.norm(v)) for k, v in grads.items()})
    group_loss.append(float(loss))
  return np.array(norms), per_layer, np.array(group_loss)


@pytest.mark.parametrize("quantized,batch_size", [(False, 8), (True, 256)])
def test_group_gradient_norms_equal_a_per_group_loop(quantized, batch_size):
  model, variables, x, y = _cnn()
  bits_tree = BitSpec.uniform(3).bits_tree(layers.quant_layer_names(model, x)) if quantized else None
  params = dequantized_params(model, variables, bits_tree, x) if quantized else variables["params"]
  out = group_gradient_norms(model, variables, x, y, GROUPS, 3, bits_tree=bits_tree, batch_size=batch_size)
  want, want_layers, want_loss = _loop_norms(model, variables, params, x, y, GROUPS, 3)
  np.testing.assert_allclose(out["norms"], want, rtol=1e-4)
  for name in ("conv1", "conv2", "conv3", "head"):
    np.testing.assert_allclose(out["per_layer"][name], [d[name] for d in want_layers], rtol=1e-4)
  np.testing.assert_array_equal(out["counts"], [25, 14, 1])
  np.testing.assert_allclose(out["loss"], want_loss, rtol=1e-5)
  assert np.ptp(out["norms"]) > 0.05 * out["norms"].max()  # groups really differ


def test_group_plan_is_homogeneous_and_covers_every_sample_once():
  group = np.random.default_rng(0).permutation(np.repeat(np.arange(4), [300, 41, 7, 1]))
  counts = np.bincount(group)
  plan = curvature.group_batch_plan(group, counts, 256)
  # 300 = 256 + 32 + 8 + 4 (+4 padding); 41 = 32 + 8 + 1 (+7); 7 (+1); 1 (+7)
  assert [[len(i) for i, _ in batches] for batches in plan] == [[256, 32, 8, 8], [32, 8, 8], [8], [8]]
  seen = np.concatenate([i[w > 0] for batches in plan for i, w in batches])
  np.testing.assert_array_equal(np.sort(seen), np.arange(len(group)))
  for g, batches in enumerate(plan):
    assert all(np.all(group[i] == g) for i, _ in batches)  # padding repeats a row of the same group
    np.testing.assert_allclose(sum(w.sum() for _, w in batches), 1.0, rtol=1e-6)  # weights 1/n_g
  padded = sum(int((w == 0).sum()) for batches in plan for _, w in batches)
  assert padded == 4 + 7 + 1 + 7


def _loop_sample_norms(model, variables, params, x, y, group, num_groups):
  """Per group: the mean over its samples of ||grad l_i|| (a one-hot masked gradient per sample)."""
  onehot = jnp.eye(len(y), dtype=jnp.float32)
  norms = np.array([float(optax.tree.norm(_programs(model)[1](variables, params, x, y, onehot[i])[1]))
                    for i in range(len(y))])
  return np.array([norms[group == g].mean() for g in range(num_groups)])


# 256: one batch of all 40 rows; 16 (< group 0's 25 rows): 16 + 16 + 8 real + 8 padding rows.
@pytest.mark.parametrize("quantized,batch_size", [(False, 256), (True, 16)])
def test_group_mean_sample_gradient_norms_equal_a_per_sample_loop(quantized, batch_size):
  model, variables, x, y = _cnn()
  bits_tree = BitSpec.uniform(3).bits_tree(layers.quant_layer_names(model, x)) if quantized else None
  params = dequantized_params(model, variables, bits_tree, x) if quantized else variables["params"]
  out = group_mean_sample_gradient_norms(model, variables, x, y, GROUPS, 3, bits_tree=bits_tree,
                                         batch_size=batch_size)
  want = _loop_sample_norms(model, variables, params, x, y, GROUPS, 3)
  np.testing.assert_allclose(out["mean_norms"], want, rtol=1e-5)
  assert out["mean_norms"].dtype == np.float64
  np.testing.assert_array_equal(out["counts"], [25, 14, 1])


def test_mean_sample_gradient_norms_bound_the_group_gradient_norm(monkeypatch):
  model, variables, x, y = _cnn()
  norms = group_gradient_norms(model, variables, x, y, GROUPS, 3)["norms"]
  mean = group_mean_sample_gradient_norms(model, variables, x, y, GROUPS, 3)["mean_norms"]
  assert np.all(mean[:2] > 1.01 * norms[:2])  # triangle inequality, strict: per-sample gradients cancel
  np.testing.assert_allclose(mean[2], norms[2], rtol=1e-5)  # a singleton group: the same gradient
  # The memory cap B x P <= _MAX_GRAD_FLOATS sets the batch (16 rows, padded); a bit-width sweep reuses one program.
  monkeypatch.setattr(curvature, "_MAX_GRAD_FLOATS", 16 * ravel_pytree(variables["params"])[0].size + 15)
  names = layers.quant_layer_names(model, x)
  capped = [group_mean_sample_gradient_norms(model, variables, x, y, GROUPS, 3,
                                             bits_tree=BitSpec.uniform(bits).bits_tree(names))["mean_norms"]
            for bits in (32, 4)]
  sizes = curvature._sample_norm_step(model)._cache_size()
  group_mean_sample_gradient_norms(model, variables, x, y, GROUPS, 3, bits_tree=BitSpec.uniform(2).bits_tree(names))
  assert curvature._sample_norm_step(model)._cache_size() == sizes
  np.testing.assert_allclose(capped[0], mean, rtol=1e-5)  # 32 bits: full precision, up to rounding
  assert not np.allclose(capped[1], mean, rtol=1e-3)


def test_group_mean_sample_gradient_norms_reject_bad_input():
  model, variables, x, y = _cnn()
  with pytest.raises(ValueError, match=r"group\(s\) \[1\] have no samples"):
    group_mean_sample_gradient_norms(model, variables, x, y, np.where(GROUPS == 1, 2, GROUPS), 3)
  with pytest.raises(ValueError, match=r"group ids must be in \[0, 2\)"):
    group_mean_sample_gradient_norms(model, variables, x, y, GROUPS, 2)
  with pytest.raises(ValueError, match="num_groups"):
    group_mean_sample_gradient_norms(model, variables, x, y, GROUPS, 0)
  with pytest.raises(ValueError, match="y and group"):
    group_mean_sample_gradient_norms(model, variables, x, y, GROUPS[:-1], 3)
  with pytest.raises(ValueError, match="batch_size"):
    group_mean_sample_gradient_norms(model, variables, x, y, GROUPS, 3, batch_size=0)
  with pytest.raises(ValueError, match="activations must be one of"):
    group_mean_sample_gradient_norms(model, variables, x, y, GROUPS, 3, activations="maybe")
  bits_tree = BitSpec.uniform(4, 8).bits_tree(layers.quant_layer_names(model, x))
  with pytest.raises(ValueError, match="quantizes activations"):
    group_mean_sample_gradient_norms(model, variables, x, y, GROUPS, 3, bits_tree=bits_tree)


# ----------------------------------------------------------------------------
# Hessian-vector products, Lanczos, power iteration, Hutchinson
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("build", [_mlp, _cnn])
def test_hvp_equals_dense_hessian_times_v(build):
  model, variables, x, y = build()
  dense, flat = _dense_hessian(model, variables, x, y)
  hvp, flat2 = make_hvp(model, variables, x, y, batch_size=16)  # 3 batches, the last one padded
  np.testing.assert_array_equal(flat, flat2)
  v = jax.random.normal(_key(7), flat.shape)
  want = dense @ np.asarray(v, np.float64)
  np.testing.assert_allclose(hvp(v), want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
  np.testing.assert_allclose(jax.jit(hvp)(v), hvp(v), rtol=1e-5, atol=1e-6)


def test_lanczos_top5_match_dense_eigvalsh_in_float64():
  model, variables, x, y = _cnn()  # conv + BatchNorm (inference) + dense, 433 params
  with jax.enable_x64(True):
    variables, x = _to64(variables), _to64(x)
    dense, flat = _dense_hessian(model, variables, x, y)
    hvp, flat = make_hvp(model, variables, x, y)
    assert flat.dtype == jnp.float64
    res = lanczos_top_eigenvalues(hvp, flat, k=5, tol=1e-6, max_iters=200)
    want = np.linalg.eigvalsh(dense)[::-1][:5]
    assert res["converged"] and res["num_hvps"] == res["iterations"] < len(flat)
    np.testing.assert_allclose(res["eigenvalues"], want, rtol=1e-4)
  assert jnp.zeros(1).dtype == jnp.float32  # x64 did not leak


def _sym(eigs, seed=0):
  q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(len(eigs), len(eigs))))
  return jnp.asarray((q * np.asarray(eigs)) @ q.T, jnp.float32)


def test_lanczos_on_a_known_spectrum_which_and_stop_rules():
  eigs = np.concatenate([[10.0, 7.0, -12.0, 5.0, 4.0], np.linspace(-1, 1, 95)])
  a = _sym(eigs)
  mv = jax.jit(lambda v: a @ v)
  top = lanczos_top_eigenvalues(mv, 100, k=3, tol=1e-5)
  np.testing.assert_allclose(top["eigenvalues"], [10.0, 7.0, 5.0], rtol=1e-4)
  assert top["converged"] and len(top["history"]) == top["num_hvps"]
  mag = lanczos_top_eigenvalues(mv, 100, k=2, which="magnitude", tol=1e-5)
  np.testing.assert_allclose(mag["eigenvalues"], [-12.0, 10.0], rtol=1e-4)
  change = lanczos_top_eigenvalues(mv, 100, k=1, stop="ritz_change", tol=1e-6)
  assert change["converged"] and change["eigenvalues"][0] == pytest.approx(10.0, rel=1e-4)
  capped = lanczos_top_eigenvalues(mv, 100, k=5, max_iters=3)
  assert not capped["converged"] and capped["num_hvps"] == 3 and np.isnan(capped["eigenvalues"][3:]).all()


def test_lanczos_stops_on_an_invariant_subspace():
  a = jnp.diag(jnp.array([3.0, 2.0, 1.0, 0.0, 0.0, 0.0]))  # rank 3: Krylov space has dimension <= 4
  res = lanczos_top_eigenvalues(lambda v: a @ v, 6, k=3, tol=1e-12)
  assert res["converged"] and res["num_hvps"] <= 4
  np.testing.assert_allclose(res["eigenvalues"], [3.0, 2.0, 1.0], rtol=1e-5)


def test_power_iteration_uses_pyhessians_rule_and_counts_products():
  a = _sym(np.concatenate([[10.0, 6.0], np.linspace(0, 1, 48)]), seed=1)
  res = power_iteration(lambda v: a @ v, 50, tol=1e-3, max_iters=200)
  h = res["history"]
  assert res["converged"] and res["num_hvps"] == len(h) > 2
  rel = lambda i: abs(h[i] - h[i - 1]) / (abs(h[i - 1]) + 1e-6)
  assert rel(len(h) - 1) < 1e-3 and all(rel(i) >= 1e-3 for i in range(1, len(h) - 1))
  assert res["eigenvalue"] == pytest.approx(10.0, rel=1e-2)
  assert power_iteration(lambda v: a @ v, 50, tol=1e-12, max_iters=5)["num_hvps"] == 5


def test_hutchinson_exact_on_diagonal_and_close_on_a_network():
  d = jnp.arange(1.0, 21.0)
  res = hutchinson_trace(lambda v: d * v, 20, num_probes=3)
  assert res["trace"] == pytest.approx(210.0) and res["std"] == pytest.approx(0.0, abs=1e-6)
  model, variables, x, y = _mlp()
  dense, _ = _dense_hessian(model, variables, x, y)
  hvp, flat = make_hvp(model, variables, x, y)
  res = hutchinson_trace(hvp, flat, num_probes=1000, seed=3)
  assert res["num_hvps"] == 1000 and 0 < res["std"] < 0.1 * abs(np.trace(dense))
  assert abs(res["trace"] - np.trace(dense)) < 4 * res["std"]


def test_group_top_eigenvalues_match_each_groups_dense_hessian():
  model, variables, x, y = _cnn()
  x, y, group = x[:32], y[:32], np.array([0, 1] * 16)  # 16 each: one batch shape (as in the HVP test)
  out = group_top_eigenvalues(model, variables, x, y, group, 2, k=2, tol=1e-5, trace_probes=300)
  np.testing.assert_array_equal(out["counts"], [16, 16])
  for g in range(2):
    dense, _ = _dense_hessian(model, variables, x[group == g], y[group == g])
    np.testing.assert_allclose(out["eigenvalues"][g], np.linalg.eigvalsh(dense)[::-1][:2], rtol=1e-3)
    assert out["converged"][g] and out["num_hvps"][g] > 1
    assert abs(out["trace"][g] - np.trace(dense)) < 4 * out["trace_std"][g]


# ----------------------------------------------------------------------------
# Spearman and bad input
# ----------------------------------------------------------------------------

def test_spearman_hand_cases_with_ties():
  # ranks a: [1, 2.5, 2.5, 4], b: [1, 3, 2, 4] -> 4.5 / sqrt(4.5 * 5)
  assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / np.sqrt(22.5))
  assert spearman([10, 20, 30], [0.3, 0.2, 0.1]) == pytest.approx(-1.0)
  assert spearman([1, 5, 9, 100], [2, 3, 4, 1000]) == pytest.approx(1.0)  # ranks, not values
  assert np.isnan(spearman([1, 1, 1], [1, 2, 3]))
  assert spearman([1, 2, np.nan, 3], [3, 2, 5, 1]) == pytest.approx(-1.0)  # non-finite pair left out
  rng = np.random.default_rng(0)
  a, b = rng.integers(0, 5, 30), rng.integers(0, 5, 30)
  assert spearman(a, b) == pytest.approx(scipy.stats.spearmanr(a, b).statistic)
  with pytest.raises(ValueError, match="equal length"):
    spearman([1, 2, 3], [1, 2])


def test_bad_input_raises_value_errors_naming_the_problem():
  model, variables, x, y = _cnn()
  hvp, flat = make_hvp(model, variables, x, y)
  with pytest.raises(ValueError, match="k must be"):
    lanczos_top_eigenvalues(hvp, flat, k=0)
  with pytest.raises(ValueError, match="k=500"):
    lanczos_top_eigenvalues(hvp, flat, k=500)
  with pytest.raises(ValueError, match="which must be one of"):
    lanczos_top_eigenvalues(hvp, flat, which="smallest")
  with pytest.raises(ValueError, match="stop must be one of"):
    lanczos_top_eigenvalues(hvp, flat, stop="never")
  with pytest.raises(ValueError, match="tol must be"):
    power_iteration(hvp, flat, tol=0.0)
  with pytest.raises(ValueError, match="num_probes"):
    hutchinson_trace(hvp, flat, num_probes=0)
  with pytest.raises(ValueError, match=r"group\(s\) \[1\] have no samples"):
    group_gradient_norms(model, variables, x, y, np.where(GROUPS == 1, 2, GROUPS), 3)
  with pytest.raises(ValueError, match=r"group ids must be in \[0, 2\)"):
    group_gradient_norms(model, variables, x, y, GROUPS, 2)
  with pytest.raises(ValueError, match="batch_size"):
    group_gradient_norms(model, variables, x, y, GROUPS, 3, batch_size=0)
  with pytest.raises(ValueError, match="y and group"):
    group_gradient_norms(model, variables, x, y[:-1], GROUPS, 3)
  with pytest.raises(ValueError, match="k must be"):
    group_top_eigenvalues(model, variables, x, y, GROUPS, 3, k=0)
  with pytest.raises(ValueError, match="trace_probes"):
    group_top_eigenvalues(model, variables, x, y, GROUPS, 3, trace_probes=-1)
  with pytest.raises(ValueError, match="activations must be one of"):
    make_hvp(model, variables, x, y, activations="maybe")
