"""Matrix-free eigenvalue and trace estimates of a symmetric operator given only its products.

The operator is any ``matvec(v: [P]) -> [P]`` (for fqjax a Hessian-vector product of a
loss, see ``fqjax.explain.curvature.make_hvp``). Every routine counts the products it
used, since on networks they are the whole cost.

  Lanczos (full reorthogonalization): after m products the Krylov basis Q [m, P]
    (orthonormal rows) and the tridiagonal T = Q H Q^T [m, m] (diagonal alpha, off-diagonal
    beta) give Ritz values theta_i = eig(T) with residual bounds r_i = |beta_m s_{m,i}|
    (s_i the Ritz vector of T): some eigenvalue of H lies within r_i of theta_i.
    ``lanczos_tridiagonal`` returns T itself after a fixed number of products (for SLQ densities).
  Power iteration (PyHessian's rule): lambda_t = v_t . H v_t, v_{t+1} = H v_t / ||H v_t||,
    stop when |lambda_t - lambda_{t-1}| / (|lambda_{t-1}| + 1e-6) < tol.
  Hutchinson: tr(H) ~ mean_j z_j . H z_j over Rademacher probes z_j in {-1, +1}^P.

Why our own Lanczos rather than matfree (checked: matfree 0.6.3 installs from PyPI):
matfree's ``decomp.tridiag_sym`` runs a fixed number of products chosen up front (a
fori_loop, with custom VJPs we do not need), whereas the explain stage needs to stop
as soon as the top-k Ritz values have converged and to report how many products that
took. Growing matfree's decomposition would redo earlier products, so ~100 lines here
avoid both the dependency and the wasted products.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

Matvec = Callable[[jax.Array], jax.Array]
WHICH = ("largest", "magnitude")
STOP_RULES = ("residual", "ritz_change")


def _dim_dtype(dim_or_params: Union[int, Any]) -> tuple[int, Any]:
  """(P, dtype) from an int (float32) or from a params pytree / flat vector (its size and dtype)."""
  if isinstance(dim_or_params, (int, np.integer)) and not isinstance(dim_or_params, bool):
    dim, dtype = int(dim_or_params), jnp.float32
  else:
    leaves = jax.tree_util.tree_leaves(dim_or_params)
    if not leaves:
      raise ValueError("dim_or_params must be a positive int or a non-empty params pytree / vector.")
    dim = sum(int(np.prod(np.shape(a))) for a in leaves)
    dtype = jnp.result_type(*leaves)
  if dim < 1:
    raise ValueError(f"the operator dimension must be >= 1, got {dim}.")
  return dim, dtype


def check_positive(name: str, value, integer: bool = True) -> None:
  ok = (isinstance(value, (int, np.integer)) and not isinstance(value, bool)) if integer else \
      isinstance(value, (int, float, np.number))
  if not ok or not value > 0:
    raise ValueError(f"{name} must be a positive {'int' if integer else 'number'}, got {value!r}.")


def _start_vector(seed: int, dim: int, dtype) -> jax.Array:
  v = jax.random.normal(jax.random.PRNGKey(seed), (dim,), dtype)
  return v / jnp.linalg.norm(v)


@functools.partial(jax.jit, donate_argnums=(0,))
def _lanczos_step(basis, w, j, beta_prev):
  """One Lanczos step on the product w = H q_j; basis [c, P] (c > j + 1) with rows > j still zero.

  alpha_j = q_j . w;  w <- w - alpha_j q_j - beta_{j-1} q_{j-1}, then twice
  w <- w - Q^T (Q w) (full reorthogonalization; zero rows drop out);  beta_j = ||w||,
  q_{j+1} = w / beta_j written into row j + 1 and returned, so the next product needs no slice.
  Returns (basis, q_{j+1} [P], alpha_j [], beta_j []), all on device.
  """
  q = basis[j]
  q_prev = jnp.where(j > 0, basis[jnp.maximum(j - 1, 0)], jnp.zeros_like(q))
  alpha = jnp.vdot(q, w)
  w = w - alpha * q - beta_prev * q_prev
  for _ in range(2):
    w = w - basis.T @ (basis @ w)
  beta = jnp.linalg.norm(w)
  q_next = w / jnp.where(beta > 0, beta, 1.0)
  return basis.at[j + 1].set(q_next), q_next, alpha, beta


@functools.partial(jax.jit, static_argnums=(1,))
def _grow(basis, rows: int):
  """The basis with zero rows appended up to ``rows``."""
  return jnp.pad(basis, ((0, rows - basis.shape[0]), (0, 0)))


# Bases held at once in lock-step runs: rows x P floats each (2**28 floats: 1 GiB in float32, 2 GiB in float64).
# A run is counted at twice its final rows (growth briefly holds the old and the new basis), and a basis whose
# final size alone is over half the budget is allocated at that size from the start (no growth, so no doubled
# peak); such a model runs one operator at a time, as a plain loop would.
_MAX_BASIS_FLOATS = 2 ** 28
_FIRST_ROWS = 32  # a basis starts with this many rows and doubles when full: cheap steps while j is small


class _Krylov:
  """One Lanczos run's state: its operator, basis (device, allocated on the first product, so runs waiting for
  their wave hold no memory), current vector and the host tridiagonal."""

  def __init__(self, matvec: Matvec, dim: int, dtype, seed: int, rows: int):
    self.matvec, self.dim, self.dtype, self.seed, self.rows = matvec, dim, dtype, seed, rows
    self.basis = self.q = self.beta_dev = None
    self.alphas: list[float] = []
    self.betas: list[float] = []
    self.done = False
    self.info: dict = {}  # what the caller's stopping rule keeps between steps

  def dispatch(self):
    """Queues one product and step (no host sync); returns the device scalars (alpha_j, beta_j)."""
    j = len(self.alphas)
    if j == 0:
      first = self.rows if 2 * self.rows * self.dim > _MAX_BASIS_FLOATS else min(self.rows, _FIRST_ROWS)
      self.q = _start_vector(self.seed, self.dim, self.dtype)
      self.basis = jnp.zeros((first, self.dim), self.dtype).at[0].set(self.q)
      self.beta_dev = jnp.zeros((), self.dtype)
    elif j + 1 >= self.basis.shape[0]:
      self.basis = _grow(self.basis, min(2 * self.basis.shape[0], self.rows))
    self.basis, self.q, alpha, self.beta_dev = _lanczos_step(self.basis, self.matvec(self.q), j, self.beta_dev)
    return alpha, self.beta_dev


def _lock_step(runs: list, dim: int, on_step: Callable[[_Krylov, float, float], None]) -> None:
  """Advances every run until it is done, all unfinished runs by one product per round and one host sync
  per round for all of them (not one per product), at most as many runs at once as _MAX_BASIS_FLOATS allows
  (each counted at twice its final basis); ``on_step(run, alpha, beta)`` appends the scalars and sets ``run.done``."""
  wave = max(1, _MAX_BASIS_FLOATS // max(2 * runs[0].rows * dim, 1)) if runs else 1
  for first in range(0, len(runs), wave):
    live = runs[first:first + wave]
    while live:
      scalars = jax.device_get([run.dispatch() for run in live])
      for run, (alpha, beta) in zip(live, scalars):
        on_step(run, float(alpha), float(beta))
        if run.done:
          run.basis = run.q = None  # free the device memory as soon as a run ends
      live = [run for run in live if not run.done]


def _check_top_options(dim: int, k, max_iters, tol, which: str, stop: str) -> None:
  check_positive("k", k)
  check_positive("max_iters", max_iters)
  check_positive("tol", tol, integer=False)
  if k > dim:
    raise ValueError(f"k={k} eigenvalues requested but the operator has dimension {dim}.")
  if which not in WHICH:
    raise ValueError(f"which must be one of {WHICH}, got {which!r}.")
  if stop not in STOP_RULES:
    raise ValueError(f"stop must be one of {STOP_RULES}, got {stop!r}.")


def _ritz(alphas, betas):
  """Ritz values [m] and the last components of the Ritz vectors [m] of T (float64)."""
  t = np.diag(alphas) + np.diag(betas[:-1], 1) + np.diag(betas[:-1], -1)
  theta, s = np.linalg.eigh(t)
  return theta, s[-1]


def _select(theta, k: int, which: str) -> np.ndarray:
  order = np.argsort(-np.abs(theta) if which == "magnitude" else -theta, kind="stable")
  return order[:k]


def lanczos_top_eigenvalues(matvec: Matvec, dim_or_params, k: int = 5, *, max_iters: int = 100,
                            tol: float = 1e-4, seed: int = 0, which: str = "largest",
                            stop: str = "residual") -> dict:
  """Top-k eigenvalues of a symmetric operator by Lanczos with full reorthogonalization.

  Args:
    matvec: v [P] -> H v [P] (jitted, e.g. a Hessian-vector product).
    dim_or_params: P, or a params pytree / flat vector whose size and dtype the basis takes.
    k: how many eigenvalues (>= 1, <= P).
    max_iters: at most this many products; the basis holds up to (max_iters + 1) x P values
      (it starts at 32 rows and doubles when full).
    tol: relative tolerance. stop="residual": every top-k Ritz value has
      r_i <= tol * max(|theta_i|, 1e-3 max_j |theta_j|) (a guaranteed bound; the floor lets
      eigenvalues near 0 converge). stop="ritz_change": the top-k Ritz values moved by
      <= tol relative since the previous product (cheaper, no guarantee).
    seed: the random start vector.
    which: "largest" (algebraic, what the Hessian's top eigenvalues mean) or "magnitude".

  Returns:
    {"eigenvalues": [k] float64 ordered by ``which`` (NaN where the Krylov space had fewer
     than k dimensions), "residuals": [k], "iterations", "num_hvps" (= iterations),
     "converged": bool, "history": [iterations] list of the top-k Ritz values after each product}.
  One host sync per product (the two scalars alpha, beta) for the convergence test; see
  ``lanczos_top_eigenvalues_many`` for several operators with one sync per round.
  """
  return lanczos_top_eigenvalues_many([matvec], dim_or_params, k, max_iters=max_iters, tol=tol, seed=seed,
                                      which=which, stop=stop)[0]


def lanczos_top_eigenvalues_many(matvecs: Sequence[Matvec], dim_or_params, k: int = 5, *, max_iters: int = 100,
                                 tol: float = 1e-4, seed: int = 0, which: str = "largest",
                                 stop: str = "residual") -> list:
  """``lanczos_top_eigenvalues`` of each operator in ``matvecs`` (same P, dtype and start vector), in lock step.

  Every unfinished run does one product per round, and one host transfer per round brings all
  their alpha_j, beta_j: the device never waits on the host between operators, and the numbers
  are those of separate calls. Returns one result dict per operator, in order.
  """
  dim, dtype = _dim_dtype(dim_or_params)
  _check_top_options(dim, k, max_iters, tol, which, stop)
  rows = min(max_iters, dim) + 1
  runs = [_Krylov(mv, dim, dtype, seed, rows) for mv in matvecs]
  eps = float(jnp.finfo(dtype).eps)
  for run in runs:
    run.info.update(eigenvalues=np.full(k, np.nan), residuals=np.full(k, np.nan), converged=False, history=[],
                    prev=None)

  def on_step(run: _Krylov, alpha: float, beta: float) -> None:
    run.alphas.append(alpha)
    run.betas.append(beta)
    out = run.info
    theta, last = _ritz(np.array(run.alphas), np.array(run.betas))
    idx = _select(theta, k, which)
    top, res = np.full(k, np.nan), np.full(k, np.nan)
    top[:len(idx)], res[:len(idx)] = theta[idx], np.abs(beta * last[idx])
    out.update(eigenvalues=top, residuals=res)
    out["history"].append(top.copy())
    scale = np.max(np.abs(theta))
    breakdown = beta <= 10 * eps * max(scale, np.finfo(np.float64).tiny)  # invariant subspace: exact
    converged = False
    if len(idx) == k:
      if stop == "residual":
        converged = bool(np.all(res <= tol * np.maximum(np.abs(top), 1e-3 * scale)))
      elif out["prev"] is not None:
        converged = bool(np.all(np.abs(top - out["prev"]) <= tol * np.abs(top)))
      out["prev"] = top
    out["converged"] = converged or (breakdown and len(idx) == k)
    run.done = converged or breakdown or len(run.alphas) == rows - 1

  _lock_step(runs, dim, on_step)
  results = []
  for run in runs:
    out = {key: run.info[key] for key in ("eigenvalues", "residuals", "converged", "history")}
    results.append({**out, "iterations": len(run.alphas), "num_hvps": len(run.alphas)})
  return results


def lanczos_tridiagonal(matvec: Matvec, dim_or_params, num_iters: int, seed: int = 0) -> dict:
  """The Lanczos tridiagonal T [m, m] after m = min(num_iters, P) products (full reorthogonalization).

  Runs exactly m steps of ``_lanczos_step`` from the unit start vector of ``seed`` (the same
  one ``lanczos_top_eigenvalues`` uses), stopping early only on an invariant subspace
  (beta_j <= 10 eps max(|alpha|, beta) so far: the Krylov space is exhausted and T is exact on it).
  T = diag(alphas) + diag(betas, +-1) is what stochastic Lanczos quadrature needs: with
  T = S diag(theta) S^T, the nodes theta_i and weights S_{0i}^2 are the Gauss quadrature of
  the start vector's spectral measure (see ``fqjax.explain.density``).

  Returns {"alphas": [m] float64, "betas": [m - 1] float64 (the last beta, coupling to the
  unused next vector, is dropped), "num_hvps": m}. The basis holds up to (m + 1) x P values.
  """
  return lanczos_tridiagonal_many([(matvec, seed)], dim_or_params, num_iters)[0]


def lanczos_tridiagonal_many(runs: Sequence[tuple], dim_or_params, num_iters: int) -> list:
  """``lanczos_tridiagonal`` of each (matvec, seed) in ``runs``, in lock step (one host sync per round)."""
  dim, dtype = _dim_dtype(dim_or_params)
  check_positive("num_iters", num_iters)
  m = min(num_iters, dim)
  krylov = [_Krylov(mv, dim, dtype, seed, m + 1) for mv, seed in runs]
  eps, tiny = float(jnp.finfo(dtype).eps), np.finfo(np.float64).tiny

  def on_step(run: _Krylov, alpha: float, beta: float) -> None:
    run.alphas.append(alpha)
    scale = run.info["scale"] = max(run.info.get("scale", 0.0), abs(alpha), beta)  # |T_ij| <= ||T||: no eig(T)
    run.done = len(run.alphas) == m or beta <= 10 * eps * max(scale, tiny)
    if not run.done:
      run.betas.append(beta)

  _lock_step(krylov, dim, on_step)
  return [{"alphas": np.array(r.alphas, np.float64), "betas": np.array(r.betas, np.float64),
           "num_hvps": len(r.alphas)} for r in krylov]


def power_iteration(matvec: Matvec, dim_or_params, *, tol: float = 1e-3, max_iters: int = 100,
                    seed: int = 0) -> dict:
  """The eigenvalue of largest magnitude by power iteration with PyHessian's stopping rule.

  lambda_t = v_t . H v_t, v_{t+1} = H v_t / ||H v_t||; stops after product t when
  |lambda_t - lambda_{t-1}| / (|lambda_{t-1}| + 1e-6) < tol (PyHessian's ``eigenvalues``).
  Returns {"eigenvalue": float, "num_hvps", "converged", "history": [num_hvps] estimates}.
  One host sync per product, as in PyHessian.
  """
  dim, dtype = _dim_dtype(dim_or_params)
  check_positive("max_iters", max_iters)
  check_positive("tol", tol, integer=False)
  v = _start_vector(seed, dim, dtype)
  history: list[float] = []
  converged = False
  for _ in range(max_iters):
    hv = matvec(v)
    lam = float(jnp.vdot(v, hv))
    v = hv / jnp.linalg.norm(hv)
    if history and abs(lam - history[-1]) / (abs(history[-1]) + 1e-6) < tol:
      converged = True
    history.append(lam)
    if converged:
      break
  return {"eigenvalue": history[-1], "num_hvps": len(history), "converged": converged, "history": history}


@functools.partial(jax.jit, static_argnums=(1, 2))
def _rademacher(key, dim, dtype):
  return jax.random.rademacher(key, (dim,), jnp.int8).astype(dtype)


def hutchinson_trace(matvec: Matvec, dim_or_params, *, num_probes: int = 100, seed: int = 0) -> dict:
  """Hutchinson's estimate of tr(H) = E[z . H z] over Rademacher z in {-1, +1}^P.

  Returns {"trace": mean of the probes' z . H z, "std": its standard error
  (sample std / sqrt(num_probes); NaN for one probe), "num_hvps": num_probes}.
  The probes stay on device; one host transfer at the end.
  """
  dim, dtype = _dim_dtype(dim_or_params)
  check_positive("num_probes", num_probes)
  key = jax.random.PRNGKey(seed)
  values = []
  for i in range(num_probes):
    z = _rademacher(jax.random.fold_in(key, i), dim, jnp.dtype(dtype))
    values.append(jnp.vdot(z, matvec(z)))
  values = np.asarray(jax.device_get(jnp.stack(values)), np.float64)
  std = float(values.std(ddof=1) / np.sqrt(num_probes)) if num_probes > 1 else float("nan")
  return {"trace": float(values.mean()), "std": std, "num_hvps": num_probes}
