"""The second-order test of the theory (Tran et al., NeurIPS 2022, Theorem 1), per group.

For group a with n_a samples, per-sample cross-entropy l_i of the model in inference mode
and mean loss L_a(theta) = (1 / n_a) sum_{i in a} l_i(theta):

  theta  full-precision params; theta_q = dequantized params at a weights-only bits tree
         (``curvature.dequantized_params``: the plain network evaluated at the quantized kernels)
  d      = theta_q - theta, the only change: BatchNorm running statistics are held at the
         trained ones for both, and activation quantization is no change of params, so its
         bits are ignored (it is not part of d)
  E_a    = L_a(theta + d) - L_a(theta)                  observed excess loss
  g_a    = grad L_a(theta), H_a = Hessian of L_a at theta
  first order   g_a . d
  second order  g_a . d + 1/2 d . H_a d                 (equals E_a up to O(||d||^3))
  bound         ||g_a|| ||d|| + 1/2 lambda_max(H_a) ||d||^2

Theorem 1 says the group with the larger gradient norm and curvature (at a given ||d||) loses
more; ``correlations`` tests whether the bound or the estimate ranks the groups as E_a does.
Costs: per group one Hessian-vector product at v = d and one gradient, by the same compiled programs
as the group's Lanczos run and gradient norm (``hvp.group_hvp``, f = sum_i w_i l_i with
w_i = 1/n_a); plus forward passes at theta and theta + d for the losses (``excess_loss``).
"""
from __future__ import annotations

import functools
from typing import Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from fqjax.data.pipeline import padded_batches
from fqjax.explain import lanczos
from fqjax.explain.curvature import check_group_data, derivative_point
from fqjax.explain.hvp import group_hvp, model_per_sample_loss
from fqjax.analysis.metrics import group_mean, pearson, spearman


@jax.jit
def _reduce_terms(grad, hd, d):
  """[3] = [g . d, d . H d, ||g||^2] from one group's HVP at v = d (flat [P] vectors)."""
  return jnp.stack([jnp.vdot(grad, d), jnp.vdot(d, hd), jnp.vdot(grad, grad)])


def _group_terms(model: nn.Module, params, params_q, batch_stats, x, y, group, num_groups: int,
                 batch_size: int) -> dict:
  """``second_order_terms`` at given theta (params) and theta + d (params_q) pytrees."""
  counts = check_group_data(x, y, group, num_groups)
  lanczos.check_positive("batch_size", batch_size)
  flat = ravel_pytree(params)[0]
  d = ravel_pytree(params_q)[0] - flat
  x, y, group = np.asarray(x), np.asarray(y), np.asarray(group)
  rows = []
  for g in range(num_groups):  # one product per group, by the programs the curvature's Lanczos runs compiled
    hvp = group_hvp(model, params, batch_stats, x[group == g], y[group == g], batch_size)
    rows.append(_reduce_terms(hvp.gradient_and_value()[0], hvp(d), d))
  host, d_sq = jax.device_get((jnp.stack(rows), jnp.vdot(d, d)))  # [G, 3] and [], one transfer
  host = np.asarray(host, np.float64)
  losses = excess_loss(model, {"params": params, "batch_stats": batch_stats}, None, x, y, group, num_groups,
                       batch_size=batch_size, params_q=params_q)
  out = {key: losses[key] for key in ("loss_fp", "loss_quantized", "excess_loss")}
  out.update(first_order=host[:, 0], curvature_term=host[:, 1], grad_norm=np.sqrt(host[:, 2]),
             d_norm=float(np.sqrt(np.float64(d_sq))))
  out["second_order"] = out["first_order"] + 0.5 * out["curvature_term"]
  out["counts"] = counts
  return out


def second_order_terms(model: nn.Module, variables: Mapping, bits_tree: Optional[Mapping], x, y, group,
                       num_groups: int, *, batch_size: int = 256, params_q: Optional[Mapping] = None) -> dict:
  """Per group: observed excess loss, its first- and second-order Taylor estimates, ||g_a|| and ||d||.

  theta = variables' params (any "bits" collection dropped), theta + d = dequantized params at
  the weights of ``bits_tree`` (its activation bits are ignored; None: d = 0). Per group one
  Hessian-vector product of f = sum_{i in a} w_i l_i, w_i = 1/n_a, at v = d and one gradient
  (``hvp.group_hvp``: the programs the curvature stage uses) give H_a d and g_a, reduced on device to
  g . d, d . H d, ||g||^2 and ||d||^2; the losses at theta and theta + d come from ``excess_loss``
  (forward passes); one host transfer each. theta is traced, so another bit-width does not recompile.

  Args:
    model, variables: a Flax model of fqjax layers and its {"params", "batch_stats", ...}.
    bits_tree: a "bits" collection (weights-only in effect).
    x: [N, ...] inputs; y: [N] int labels; group: [N] int ids in [0, G); batch_size: largest batch.
    params_q: theta + d given directly (e.g. ``curvature.quantized_params`` of another clone of the model);
      ``bits_tree`` is then not used.
  Returns (host NumPy, float64): [G] arrays "loss_fp" L_a(theta), "loss_quantized" L_a(theta + d),
    "excess_loss" E_a, "first_order" g_a . d, "curvature_term" d . H_a d, "second_order"
    g_a . d + d . H_a d / 2, "grad_norm" ||g_a||, "counts" [G] int; "d_norm" ||d|| (float).
  Raises ValueError on bad shapes, group ids outside [0, G), empty groups or batch_size < 1.
  """
  check_group_data(x, y, group, num_groups)
  params, batch_stats = derivative_point(model, variables, x, None, "ignore")
  if params_q is None:
    params_q, _ = derivative_point(model, variables, x, bits_tree, "ignore")
  return _group_terms(model, params, params_q, batch_stats, x, y, group, num_groups, batch_size)


@functools.lru_cache(maxsize=16)
def _loss_program(model: nn.Module):
  """jitted (params, params_q, batch_stats, x [N, ...], y [N], idx [b]) -> [2, b] per-sample losses."""

  def losses(params, params_q, batch_stats, x, y, idx):
    return jnp.stack([model_per_sample_loss(model, p, batch_stats, x[idx], y[idx]) for p in (params, params_q)])

  return jax.jit(losses)


def excess_loss(model: nn.Module, variables: Mapping, bits_tree: Optional[Mapping], x, y, group,
                num_groups: int, *, batch_size: int = 256, params_q: Optional[Mapping] = None) -> dict:
  """Observed excess loss E_a = L_a(theta + d) - L_a(theta) per group, by forward passes only.

  For a split where derivatives are not needed (the test split). Same theta and d as
  ``second_order_terms``; batches of min(batch_size, N) rows in data order (one compiled
  shape), per-sample losses averaged per group on the host in float64.
  Args: as ``second_order_terms``.
  Returns (host NumPy): "loss_fp", "loss_quantized", "excess_loss" [G] float64, "counts" [G] int.
  """
  counts = check_group_data(x, y, group, num_groups)
  lanczos.check_positive("batch_size", batch_size)
  params, batch_stats = derivative_point(model, variables, x, None, "ignore")
  if params_q is None:
    params_q, _ = derivative_point(model, variables, x, bits_tree, "ignore")
  program = _loss_program(model)
  xd, yd = jnp.asarray(x), jnp.asarray(y, jnp.int32)
  chunks = [program(params, params_q, batch_stats, xd, yd, jnp.asarray(idx, jnp.int32))[:, :real]
            for idx, real in padded_batches(np.arange(len(yd)), batch_size)]
  per_sample = np.asarray(jax.device_get(jnp.concatenate(chunks, axis=1)), np.float64)  # [2, N]
  group = np.asarray(group)
  loss_fp, loss_q = (group_mean(v, group, num_groups) for v in per_sample)
  return {"loss_fp": loss_fp, "loss_quantized": loss_q, "excess_loss": loss_q - loss_fp, "counts": counts}
