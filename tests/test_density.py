"""Tests for stochastic Lanczos quadrature densities (fqjax.explain.density, lanczos.lanczos_tridiagonal).

References are dense Hessians (jax.hessian of the raveled loss of an 83-param MLP in float64)
and numpy.linalg.eigvalsh.
"""
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree
from scipy.integrate import cumulative_trapezoid

from fqjax.explain import curvature, density, lanczos
from fqjax.models import MLP

GROUPS = np.array([0, 1] * 20)  # two groups of 20 rows: one dense-Hessian compilation serves both


@functools.lru_cache(maxsize=None)
def _mlp64():
  """MLP 6 -> 8 -> 3 (83 params) in float64 on 40 inputs; dense Hessians of each group's mean loss."""
  model = MLP(num_classes=3, hidden=(8,))
  with jax.enable_x64(True):
    x = jax.random.normal(jax.random.PRNGKey(4), (40, 6), jnp.float64)
    y = jax.random.randint(jax.random.PRNGKey(5), (40,), 0, 3, jnp.int32)
    variables = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), jax.jit(model.init)(jax.random.PRNGKey(0), x))

    @jax.jit
    def hessian(xg, yg):
      flat, unravel = ravel_pytree(variables["params"])
      loss = lambda f: optax.softmax_cross_entropy_with_integer_labels(
          model.apply({"params": unravel(f)}, xg, train=False), yg).mean()
      return jax.hessian(loss)(flat)

    dense = [np.asarray(hessian(x[GROUPS == g], y[GROUPS == g]), np.float64) for g in range(2)]
  return model, variables, x, y, dense  # equal group sizes: the whole data's Hessian is their mean


def _hvp_all():
  model, variables, x, y, dense = _mlp64()
  hvp, flat = curvature.make_hvp(model, variables, x, y)
  return hvp, flat, (dense[0] + dense[1]) / 2


def _sym(eigs, seed=0):
  q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(len(eigs), len(eigs))))
  return (q * np.asarray(eigs)) @ q.T


def test_full_dimension_nodes_are_the_exact_eigenvalues():
  eigs = np.concatenate([[9.0, -4.0], np.linspace(-1, 2, 38)])  # distinct: the Krylov space is all of R^40
  with jax.enable_x64(True):
    a = jnp.asarray(_sym(eigs))
    out = density.slq_nodes(lambda v: a @ v, jnp.zeros(40), num_iters=40, num_starts=1)
    tri = lanczos.lanczos_tridiagonal(lambda v: a @ v, jnp.zeros(40), 40, seed=0)
    hvp, flat, dense = _hvp_all()
    net = density.slq_nodes(hvp, flat, num_iters=len(flat), num_starts=1, seed=3)
  assert out["nodes"].shape == (1, 40) and out["num_hvps"] == 40
  assert tri["alphas"].shape == (40,) and tri["betas"].shape == (39,) and tri["num_hvps"] == 40
  np.testing.assert_allclose(out["nodes"][0], np.sort(eigs), atol=1e-10)
  np.testing.assert_allclose(out["weights"].sum(), 1.0, rtol=1e-12)
  # The network's Hessian has a degenerate null space (logit shifts), so Lanczos stops early on an
  # invariant subspace; its nodes are still exactly the distinct eigenvalues.
  ev, nodes = np.linalg.eigvalsh(dense), net["nodes"][0]
  real = np.isfinite(nodes)
  assert net["num_hvps"] == real.sum() < len(flat) and np.all(net["weights"][0][~real] == 0)
  gap = np.abs(nodes[real][:, None] - ev[None, :])
  assert gap.min(axis=1).max() < 1e-10 * ev.max() and gap.min(axis=0).max() < 1e-10 * ev.max()
  np.testing.assert_allclose(net["weights"].sum(), 1.0, rtol=1e-12)


def test_slq_density_matches_the_dense_eigenvalue_histogram():
  with jax.enable_x64(True):
    hvp, flat, dense = _hvp_all()
    out = density.slq_nodes(hvp, flat, num_iters=20, num_starts=8)  # 20 << P = 83
  ev, num = np.linalg.eigvalsh(dense), len(flat)
  assert out["nodes"].shape == (8, 20) and out["num_hvps"] == 160
  grid, sigma = density.default_grid(np.concatenate([out["nodes"].ravel(), ev]), num=400)
  slq = density.density_on_grid(out["nodes"], out["weights"], grid, sigma)
  want = density.density_on_grid(ev, np.full(num, 1.0 / num), grid, sigma)
  cdf, cdf_want = (cumulative_trapezoid(d, grid, initial=0.0) for d in (slq, want))
  assert np.abs(cdf - cdf_want).max() < 0.1
  # sum_i w_i theta_i = v . H v for a unit v: mean tr H / P, variance 2/(P+2) Var(eigenvalues) per start.
  means = np.nansum(out["nodes"] * out["weights"], axis=1)
  std = np.sqrt(2.0 / (num + 2) * ev.var() / len(means))
  assert abs(means.mean() - np.trace(dense) / num) < 4 * std


def test_density_is_nonnegative_and_integrates_to_one():
  rng = np.random.default_rng(0)
  nodes = np.sort(rng.normal(size=(3, 6)), axis=1)
  nodes[2, 4:] = np.nan  # a start that stopped early
  weights = rng.dirichlet(np.ones(6), size=3)
  weights[2] = np.concatenate([rng.dirichlet(np.ones(4)), [0.0, 0.0]])
  grid, sigma = density.default_grid(nodes)
  assert grid.shape == (200,) and sigma == pytest.approx(0.01 * (np.nanmax(nodes) - np.nanmin(nodes)))
  assert grid[0] < np.nanmin(nodes) - 9 * sigma and grid[-1] > np.nanmax(nodes) + 9 * sigma
  phi = density.density_on_grid(nodes, weights, grid, sigma)
  assert phi.shape == (200,) and np.all(phi >= 0)
  assert np.trapezoid(phi, grid) == pytest.approx(1.0, abs=1e-6)
  one, s1 = density.default_grid([2.0, 2.0])  # a single distinct node still gets a positive width
  assert s1 > 0 and np.trapezoid(density.density_on_grid([2.0], [1.0], one, s1), one) == pytest.approx(1.0, abs=1e-6)
  with pytest.raises(ValueError, match="sigma"):
    density.density_on_grid(nodes, weights, grid, 0.0)
  with pytest.raises(ValueError, match="equal"):
    density.density_on_grid(nodes, weights[:2], grid, sigma)
  with pytest.raises(ValueError, match="NaN"):
    density.density_on_grid(nodes, np.ones_like(weights), grid, sigma)
  with pytest.raises(ValueError, match="num >= 2"):
    density.default_grid(nodes, num=1)
  with pytest.raises(ValueError, match="finite node"):
    density.default_grid([np.nan])


def test_group_densities_share_a_grid_and_find_each_groups_top_eigenvalue():
  model, variables, x, y, dense = _mlp64()
  with jax.enable_x64(True):
    out = density.group_densities(model, variables, x, y, GROUPS, 2, num_iters=50, num_starts=2, num_grid=150)
  json.dumps(out, allow_nan=False)  # JSON-ready: lists, padding as None
  assert len(out["grid"]) == 150 and len(out["density"]) == 2 and all(len(d) == 150 for d in out["density"])
  assert out["counts"] == [20, 20] and np.array(out["nodes"], float).shape == (2, 2, 50)
  grid = np.array(out["grid"])
  for g in range(2):
    nodes = np.array(out["nodes"][g], float)
    assert out["num_hvps"][g] == np.isfinite(nodes).sum() <= 100
    assert np.nanmax(nodes) == pytest.approx(np.linalg.eigvalsh(dense[g])[-1], rel=1e-3)
    assert np.trapezoid(out["density"][g], grid) == pytest.approx(1.0, abs=1e-3)
  assert not np.allclose(out["density"][0], out["density"][1])  # the groups' spectra differ


def test_bad_input_raises_value_errors():
  model, variables, x, y, _ = _mlp64()
  with pytest.raises(ValueError, match=r"group\(s\) \[1\] have no samples"):
    density.group_densities(model, variables, x, y, np.where(GROUPS == 1, 2, GROUPS), 3)
  with pytest.raises(ValueError, match=r"group ids must be in \[0, 1\)"):
    density.group_densities(model, variables, x, y, GROUPS, 1)
  with pytest.raises(ValueError, match="y and group"):
    density.group_densities(model, variables, x, y[:-1], GROUPS, 2)
  for kwargs, match in (({"num_iters": 0}, "num_iters"), ({"num_starts": 0}, "num_starts"),
                        ({"num_grid": 1}, "num_grid"), ({"batch_size": 0}, "batch_size"),
                        ({"activations": "maybe"}, "activations must be one of")):
    with pytest.raises(ValueError, match=match):
      density.group_densities(model, variables, x, y, GROUPS, 2, **kwargs)
  with pytest.raises(ValueError, match="num_iters"):
    lanczos.lanczos_tridiagonal(lambda v: v, 5, 0)
  with pytest.raises(ValueError, match="num_starts"):
    density.slq_nodes(lambda v: v, 5, num_starts=-1)
