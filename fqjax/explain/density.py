"""Per-group Hessian spectral density by stochastic Lanczos quadrature (SLQ).

For a symmetric H [P, P] with eigenpairs (lambda_k, u_k), the spectral density is
phi(t) = (1/P) sum_k delta(t - lambda_k). For a random unit vector v, the measure
mu_v = sum_k (v . u_k)^2 delta(t - lambda_k) has E[mu_v] = phi (E (v . u_k)^2 = 1/P), and
m Lanczos steps from v give its Gauss quadrature: with T = S diag(theta) S^T [m, m],

  mu_v ~ sum_i w_i delta(t - theta_i),   w_i = S_{0i}^2   (sum_i w_i = 1),

exact for polynomials of degree <= 2m - 1 (so sum_i w_i theta_i = v . H v, whose mean is tr H / P).
Averaging R starts and smoothing each node with a Gaussian of width sigma gives

  phi(t) ~ (1/R) sum_r sum_i w_ri N(t; theta_ri, sigma^2)

(Ghorbani, Krishnan & Xiao 2019; PyHessian's ``density``). PyHessian draws it for the whole
model; ``group_densities`` draws it for each group's mean loss L_g on one common grid.

sigma: ``default_grid`` takes sigma = 0.01 (max - min node) on a 200-point grid padded by
0.1 of the spread on each side (10 sigma, so the density integrates to ~1 on the grid).
PyHessian uses sigma^2 = 1e-5 max(1, spread) on a 10^4-point grid: sigma ~ 0.003 sqrt(spread),
narrower than a 200-point grid resolves, and not scale-free. Ours is relative to the spread,
so densities of differently scaled Hessians look alike at equal shape; pass ``sigma`` to
``density_on_grid`` for any other choice.
"""
from __future__ import annotations

from typing import Mapping, Optional

import flax.linen as nn
import numpy as np
from jax.flatten_util import ravel_pytree

from fqjax.explain import curvature, hvp, lanczos

SIGMA_FRACTION = 0.01  # default sigma / (max - min node)


def _quadrature(alphas: np.ndarray, betas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Nodes theta [m] (ascending) and weights S_{0i}^2 [m] of T = tridiag(betas, alphas, betas)."""
  t = np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1)
  theta, s = np.linalg.eigh(t)
  return theta, np.square(s[0])


def slq_nodes(matvec: lanczos.Matvec, dim_or_params, *, num_iters: int = 30, num_starts: int = 4,
              seed: int = 0) -> dict:
  """Gauss quadrature nodes and weights of the spectral measure from ``num_starts`` random starts.

  Start r uses the unit Gaussian vector of seed + r and ``lanczos.lanczos_tridiagonal``
  (m = min(num_iters, P) products, fewer on an invariant subspace).
  Args:
    matvec: v [P] -> H v [P] (symmetric), e.g. ``curvature.make_hvp``.
    dim_or_params: P, or a params pytree / flat vector (size and dtype of the basis).
  Returns:
    {"nodes": [R, m] float64 eigenvalues of each T, ascending (NaN pads a start that stopped
     early), "weights": [R, m] float64 squared first components of T's eigenvectors (0 on
     padding; each row sums to 1), "iterations": [R] int products per start,
     "num_hvps": their sum}.
  """
  return slq_nodes_many([matvec], dim_or_params, num_iters=num_iters, num_starts=num_starts, seed=seed)[0]


def slq_nodes_many(matvecs, dim_or_params, *, num_iters: int = 30, num_starts: int = 4, seed: int = 0) -> list:
  """``slq_nodes`` of each operator in ``matvecs`` (same P and starts), all runs in lock step (one host
  sync per Lanczos round for every operator and start). Returns one dict per operator, in order."""
  dim, _ = lanczos._dim_dtype(dim_or_params)
  lanczos.check_positive("num_iters", num_iters)
  lanczos.check_positive("num_starts", num_starts)
  m = min(num_iters, dim)
  tris = lanczos.lanczos_tridiagonal_many([(mv, seed + r) for mv in matvecs for r in range(num_starts)],
                                          dim_or_params, num_iters)
  out = []
  for i in range(len(matvecs)):
    nodes, weights = np.full((num_starts, m), np.nan), np.zeros((num_starts, m))
    iterations = np.zeros(num_starts, np.int64)
    for r, tri in enumerate(tris[i * num_starts:(i + 1) * num_starts]):
      theta, w = _quadrature(tri["alphas"], tri["betas"])
      nodes[r, :len(theta)], weights[r, :len(theta)] = theta, w
      iterations[r] = tri["num_hvps"]
    out.append({"nodes": nodes, "weights": weights, "iterations": iterations, "num_hvps": int(iterations.sum())})
  return out


def density_on_grid(nodes, weights, grid, sigma: float) -> np.ndarray:
  """phi(t) = (1/R) sum_r sum_i w_ri N(t; lambda_ri, sigma^2) at every t in ``grid``.

  Args:
    nodes, weights: [R, m] (or [m]: R = 1) as from ``slq_nodes``; NaN nodes must weigh 0.
      A dense spectrum is nodes = eigvalsh(H), weights = 1/P.
    grid: [T] points; sigma: the Gaussian's standard deviation (> 0).
  Returns: [T] float64, >= 0; integrates to ~ the mean row sum of weights (1) over a grid
  that extends a few sigma beyond the nodes.
  """
  nodes, weights = np.atleast_2d(np.asarray(nodes, np.float64)), np.atleast_2d(np.asarray(weights, np.float64))
  grid = np.asarray(grid, np.float64)
  if nodes.shape != weights.shape or nodes.size == 0 or grid.ndim != 1:
    raise ValueError(f"nodes and weights must be equal [R, m] (or [m]) and grid [T]; got {nodes.shape}, "
                     f"{weights.shape} and {grid.shape}.")
  if not (np.isfinite(sigma) and sigma > 0):
    raise ValueError(f"sigma must be a positive number, got {sigma!r}.")
  real = np.isfinite(nodes)
  if np.any(weights[~real] != 0) or np.any(weights < 0):
    raise ValueError("weights must be >= 0, and 0 wherever a node is NaN (padding).")
  lam, w = nodes[real], weights[real]  # [K]
  z = (grid[:, None] - lam[None, :]) / sigma  # [T, K]
  return np.exp(-0.5 * z * z) @ w / (sigma * np.sqrt(2 * np.pi) * nodes.shape[0])


def default_grid(nodes, num: int = 200, pad: float = 0.1) -> tuple[np.ndarray, float]:
  """(grid [num] float64, sigma): min..max of the finite nodes padded by ``pad`` x spread each side.

  sigma = SIGMA_FRACTION x spread (0.01; see the module docstring). A zero spread (one
  distinct node) takes spread = 1e-3 max(|node|) (or 1 for a zero node), so the grid and
  sigma stay positive.
  """
  lanczos.check_positive("num", num)
  if num < 2 or not (np.isfinite(pad) and pad >= 0):
    raise ValueError(f"default_grid needs num >= 2 and pad >= 0, got num={num!r}, pad={pad!r}.")
  real = np.asarray(nodes, np.float64)
  real = real[np.isfinite(real)]
  if real.size == 0:
    raise ValueError("default_grid needs at least one finite node.")
  lo, hi = float(real.min()), float(real.max())
  spread = hi - lo
  if spread <= 0:
    spread = 1e-3 * max(abs(lo), abs(hi)) or 1.0
  return np.linspace(lo - pad * spread, hi + pad * spread, num), SIGMA_FRACTION * spread


def _json(a: np.ndarray) -> list:
  """Nested lists of floats, NaN as None (strict JSON has no NaN)."""
  a = np.asarray(a, np.float64)
  return np.where(np.isnan(a), None, a).tolist()


def group_densities(model: nn.Module, variables: Mapping, x, y, group, num_groups: int, *,
                    bits_tree: Optional[Mapping] = None, batch_size: int = 256, num_iters: int = 30,
                    num_starts: int = 4, seed: int = 0, num_grid: int = 200,
                    activations: str = "error") -> dict:
  """SLQ spectral density of each group's mean-loss Hessian H_g, all on one common grid.

  theta is the full-precision params or, with ``bits_tree`` (weights only), the dequantized
  params, as in ``curvature.group_top_eigenvalues``; each group's HVP runs in batches of
  min(batch_size, next power of two >= n_g, >= 8) rows (a few shapes, a few compilations).
  Every group uses the same seeds (seed .. seed + num_starts - 1), so start vectors are shared.
  The grid and sigma come from ``default_grid`` over all groups' nodes, so densities compare.

  Returns (JSON-ready lists): {"grid": [T], "sigma": float, "density": [G][T],
    "nodes": [G][R][m] (None pads a start that stopped early), "weights": [G][R][m],
    "num_hvps": [G] int, "counts": [G] int}. G * R * m products in all.
  Raises ValueError on bad shapes, group ids outside [0, G), empty groups or bad options.
  """
  counts = curvature.check_group_data(x, y, group, num_groups)
  for name, value in (("batch_size", batch_size), ("num_iters", num_iters), ("num_starts", num_starts)):
    lanczos.check_positive(name, value)
  if not isinstance(num_grid, (int, np.integer)) or num_grid < 2:
    raise ValueError(f"num_grid must be an int >= 2, got {num_grid!r}.")
  params, batch_stats = curvature.derivative_point(model, variables, x, bits_tree, activations)
  flat = ravel_pytree(params)[0]
  x, y, group = np.asarray(x), np.asarray(y), np.asarray(group)
  hvps = []
  for g in range(num_groups):
    rows = np.flatnonzero(group == g)
    hvps.append(hvp.group_hvp(model, params, batch_stats, x[rows], y[rows], batch_size))
  runs = slq_nodes_many(hvps, flat, num_iters=num_iters, num_starts=num_starts, seed=seed)
  grid, sigma = default_grid(np.concatenate([r["nodes"].ravel() for r in runs]), num_grid)
  return {"grid": grid.tolist(), "sigma": float(sigma),
          "density": [density_on_grid(r["nodes"], r["weights"], grid, sigma).tolist() for r in runs],
          "nodes": [_json(r["nodes"]) for r in runs], "weights": [_json(r["weights"]) for r in runs],
          "num_hvps": [r["num_hvps"] for r in runs], "counts": counts.tolist()}
