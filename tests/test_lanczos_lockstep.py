"""Lock-step Lanczos (fqjax.explain.lanczos.*_many) and what the explain stage builds on it: the same numbers as
separate runs, one host sync per round, a basis that grows, waves under a memory cap, and group gradient norms
taken over the Lanczos products' batches."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fqjax.explain import curvature, density, lanczos
from fqjax.explain import group_gradient_norms, group_top_eigenvalues
from fqjax.models import SmallCNN


def _sym(eigs, seed):
  q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(len(eigs), len(eigs))))
  return jnp.asarray((q * np.asarray(eigs)) @ q.T, jnp.float32)


def _operators():
  """Three 80 x 80 symmetric operators with different spectra (so their runs stop at different rounds)."""
  rng = np.random.default_rng(0)
  specs = [np.concatenate([[9.0, 8.5, 8.0], rng.uniform(-1, 1, 77)]),   # clustered top: many products
           np.concatenate([[50.0, 10.0, 5.0], rng.uniform(-1, 1, 77)]),  # well separated: few products
           np.linspace(-3, 3, 80)]                                       # uniform: slow
  return [jax.jit(lambda v, a=_sym(s, i): a @ v) for i, s in enumerate(specs)], specs


def _count_syncs(monkeypatch) -> list:
  calls = []
  real = jax.device_get
  monkeypatch.setattr(lanczos.jax, "device_get", lambda x: calls.append(1) or real(x))
  return calls


def test_many_equals_separate_runs_with_one_sync_per_round(monkeypatch):
  mvs, specs = _operators()
  kw = dict(k=3, tol=1e-5, max_iters=60, seed=4)
  alone = [lanczos.lanczos_top_eigenvalues(mv, 80, **kw) for mv in mvs]
  syncs = _count_syncs(monkeypatch)
  many = lanczos.lanczos_top_eigenvalues_many(mvs, 80, **kw)
  assert len({r["num_hvps"] for r in many}) > 1  # the runs stopped at different rounds
  assert len(syncs) == max(r["num_hvps"] for r in many)  # one transfer per round, not one per product
  for a, m, spec in zip(alone, many, specs):
    assert a["num_hvps"] == m["num_hvps"] and a["converged"] == m["converged"]
    np.testing.assert_allclose(m["eigenvalues"], a["eigenvalues"], rtol=1e-6)
    np.testing.assert_allclose(m["history"], a["history"], rtol=1e-5)
    if m["converged"]:
      np.testing.assert_allclose(m["eigenvalues"], np.sort(spec)[::-1][:3], rtol=1e-3)


def test_basis_growth_and_waves_do_not_change_the_numbers(monkeypatch):
  mvs, _ = _operators()
  kw = dict(k=3, tol=1e-30, max_iters=70, seed=1)  # (nearly) never converges: the basis grows twice
  monkeypatch.setattr(lanczos, "_FIRST_ROWS", 1000)  # one basis of max_iters + 1 rows from the start
  fixed = lanczos.lanczos_top_eigenvalues_many(mvs, 80, **kw)
  monkeypatch.undo()
  grown = lanczos.lanczos_top_eigenvalues_many(mvs, 80, **kw)
  assert max(r["num_hvps"] for r in grown) == 70  # the uniform spectrum's run: past 32 and 64 rows
  monkeypatch.setattr(lanczos, "_MAX_BASIS_FLOATS", 71 * 80)  # room for one basis: one run at a time
  syncs = _count_syncs(monkeypatch)
  waves = lanczos.lanczos_top_eigenvalues_many(mvs, 80, **kw)
  assert len(syncs) == sum(r["num_hvps"] for r in waves)  # waves of one: a sync per product again
  for f, g, w in zip(fixed, grown, waves):
    assert f["num_hvps"] == g["num_hvps"] == w["num_hvps"]
    np.testing.assert_allclose(g["history"], f["history"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(w["eigenvalues"], g["eigenvalues"], rtol=1e-6)


def test_tridiagonal_many_equals_separate_runs_and_slq_many_matches_slq():
  mvs, _ = _operators()
  alone = [lanczos.lanczos_tridiagonal(mv, 80, 25, seed=s) for mv, s in zip(mvs, (0, 1, 2))]
  many = lanczos.lanczos_tridiagonal_many(list(zip(mvs, (0, 1, 2))), 80, 25)
  for a, m in zip(alone, many):
    assert a["num_hvps"] == m["num_hvps"] == 25 and len(m["betas"]) == 24
    np.testing.assert_allclose(m["alphas"], a["alphas"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(m["betas"], a["betas"], rtol=1e-6)
  one = density.slq_nodes(mvs[1], 80, num_iters=12, num_starts=3, seed=5)
  both = density.slq_nodes_many(mvs[:2], 80, num_iters=12, num_starts=3, seed=5)
  np.testing.assert_allclose(both[1]["nodes"], one["nodes"], rtol=1e-5)
  np.testing.assert_allclose(both[1]["weights"], one["weights"], rtol=1e-4, atol=1e-7)
  # A rank-2 operator: every start stops at its invariant subspace, as a lone run does.
  low = jax.jit(lambda v: jnp.diag(jnp.array([2.0, 1.0] + [0.0] * 8)) @ v)
  full = jax.jit(lambda v, a=_sym(np.arange(1.0, 11.0), 3): a @ v)
  runs = lanczos.lanczos_tridiagonal_many([(low, 0), (full, 0)], 10, 10)
  assert runs[0]["num_hvps"] <= 3 and runs[1]["num_hvps"] == 10


def test_group_gradient_norms_and_loss_come_with_the_lanczos_runs():
  model = SmallCNN(num_classes=3, width=2)
  x = jax.random.normal(jax.random.PRNGKey(1), (70, 8, 8, 1))
  y = jax.random.randint(jax.random.PRNGKey(2), (70,), 0, 3)
  group = np.array([0] * 40 + [1] * 21 + [2] * 9)  # batch shapes 32 (two batches), 32 and 16 at batch_size 32
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), x[:2])
  eig = group_top_eigenvalues(model, variables, x, y, group, 3, k=2, batch_size=32, tol=1e-3)
  ref = group_gradient_norms(model, variables, x, y, group, 3, batch_size=32)
  np.testing.assert_allclose(eig["grad_norm"], ref["norms"], rtol=1e-5)
  np.testing.assert_allclose(eig["loss"], ref["loss"], rtol=1e-5)
  hvp = curvature.group_hvp(model, variables["params"], variables["batch_stats"], np.asarray(x[:40]),
                            np.asarray(y[:40]), 32)
  assert len(hvp.batches) == 2  # 40 rows in batches of 32, the second padded at weight 0
  grad, value = hvp.gradient_and_value()
  assert float(jnp.linalg.norm(grad)) == pytest.approx(eig["grad_norm"][0], rel=1e-6)
  assert float(value) == pytest.approx(eig["loss"][0], rel=1e-6)


@pytest.mark.parametrize("bad", [0, -1])
def test_many_rejects_bad_options(bad):
  mvs, _ = _operators()
  with pytest.raises(ValueError, match="max_iters"):
    lanczos.lanczos_top_eigenvalues_many(mvs, 80, 2, max_iters=bad)
  with pytest.raises(ValueError, match="num_iters"):
    lanczos.lanczos_tridiagonal_many([(mvs[0], 0)], 80, bad)


def test_bases_are_allocated_per_wave_and_a_large_one_is_presized(monkeypatch):
  mvs, _ = _operators()
  shapes = []
  real_step = lanczos._lanczos_step
  monkeypatch.setattr(lanczos, "_lanczos_step", lambda basis, *a: shapes.append(basis.shape[0]) or real_step(basis, *a))
  run = lanczos._Krylov(mvs[0], 80, jnp.float32, 0, 71)
  assert run.basis is None and run.q is None  # a run waiting for its wave holds no device memory
  lanczos.lanczos_top_eigenvalues_many(mvs, 80, k=3, tol=1e-30, max_iters=70)
  assert shapes[0] == 32 and max(shapes) == 71  # grown: 32, 64, then the 71 rows max_iters + 1 needs
  shapes.clear()
  monkeypatch.setattr(lanczos, "_MAX_BASIS_FLOATS", 71 * 80)  # one 71-row basis is over half the budget
  lanczos.lanczos_top_eigenvalues_many(mvs, 80, k=3, tol=1e-30, max_iters=70)
  assert set(shapes) == {71}  # allocated at its final size: growth would hold two bases at once
