"""Hessian-vector products and gradients of one group's weighted loss, over fixed batches.

For per-sample cross-entropy l_i (inference mode: BatchNorm on its running statistics) and weights w_i,
f(theta) = sum_i w_i l_i. ``BatchedHvp`` maps v [P] -> H v [P] (forward-over-reverse, summed over batches of
one shape) and gives grad f [P] and f [] over the same batches; ``group_hvp`` picks a group's batch shape
(min(batch_size, next power of two >= n, >= 8)) so groups of every size share a few compiled programs. The
curvature, density and theory tools (and the explain stage) all build on these two programs.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from fqjax.data.pipeline import padded_batches


def model_per_sample_loss(model, params, batch_stats, x, y):
  """l_i: [b] cross-entropy of the model in inference mode on x [b, ...], y [b]."""
  logits = model.apply({"params": params, "batch_stats": batch_stats}, x, train=False)
  return optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), y)  # float64 stays float64 (tests)


@functools.lru_cache(maxsize=16)
def _hvp_program(model: nn.Module):
  """jitted (params, batch_stats, v [P], x [b, ...], y [b], w [b]) -> H v [P] of f = sum_i w_i l_i.

  Only the tangent is returned, so XLA drops the primal weight gradients (asking for them too, as
  ``jvp(value_and_grad(f))`` does, made every product 10-29% slower on CPU for SmallCNN: see
  benchmarks/README.md); the gradient has its own program, ``_grad_program``."""

  def hvp(params, batch_stats, v, x, y, w):
    _, unravel = ravel_pytree(params)
    grad = jax.grad(lambda p: jnp.sum(w * model_per_sample_loss(model, p, batch_stats, x, y)))
    return ravel_pytree(jax.jvp(grad, (params,), (unravel(v),))[1])[0]

  return jax.jit(hvp)


@functools.lru_cache(maxsize=16)
def _grad_program(model: nn.Module):
  """jitted (params, batch_stats, x [b, ...], y [b], w [b]) -> (grad [P], value []) of f = sum_i w_i l_i."""

  def grad(params, batch_stats, x, y, w):
    flat, _ = ravel_pytree(params)
    value, g = jax.value_and_grad(lambda p: jnp.sum(w * model_per_sample_loss(model, p, batch_stats, x, y)))(params)
    return ravel_pytree(g)[0], value.astype(flat.dtype)

  return jax.jit(grad)


class BatchedHvp:
  """v [P] -> H v [P] of f = sum_i w_i l_i over fixed batches (one program per batch shape; the loop only
  dispatches, no host sync). ``gradient_and_value()`` gives f's gradient [P] and value [] at theta over the
  same batches (device arrays), so a group's gradient norm and its Hessian share their batch shapes."""

  def __init__(self, model: nn.Module, params, batch_stats, batches):
    self.params, self.batch_stats, self.batches = params, batch_stats, batches
    self.hvp_program, self.grad_program = _hvp_program(model), _grad_program(model)  # jitted, compiled on use

  def __call__(self, v: jax.Array) -> jax.Array:
    out = None
    for xb, yb, wb in self.batches:
      hv = self.hvp_program(self.params, self.batch_stats, v, xb, yb, wb)
      out = hv if out is None else out + hv
    return out

  def gradient_and_value(self) -> tuple:
    grad = value = None
    for xb, yb, wb in self.batches:
      g, f = self.grad_program(self.params, self.batch_stats, xb, yb, wb)
      grad, value = (g, f) if grad is None else (grad + g, value + f)
    return grad, value


def weighted_hvp(model: nn.Module, params, batch_stats, x: np.ndarray, y: np.ndarray, w: np.ndarray,
                  b: int) -> BatchedHvp:
  """H v of sum_i w_i l_i over x [n, ...], y [n], w [n], in batches of b rows (padding weight 0)."""
  dtype = np.dtype(jnp.result_type(*jax.tree_util.tree_leaves(params)))  # float64 params: float64 weights
  x, y, n = np.asarray(x), np.asarray(y, np.int32), len(x)
  w = np.concatenate([w, np.zeros(max(b - n, 0))])  # n < b: still one batch of b, so groups share shapes
  batches = []
  for pos, real in padded_batches(np.arange(len(w)), b):
    rows = pos % n  # padding repeats real rows, at weight 0
    batches.append((x[rows], y[rows], np.where(np.arange(b) < real, w[pos], 0.0).astype(dtype)))
  # Cast on the host and moved in one transfer: no conversion op queued behind the device's work.
  return BatchedHvp(model, params, batch_stats, jax.device_put(batches))


def group_hvp(model: nn.Module, params, batch_stats, x: np.ndarray, y: np.ndarray, batch_size: int) -> BatchedHvp:
  """The HVP of one group's mean loss (1/n) sum_i l_i over its own rows x [n, ...], y [n], in batches of
  min(batch_size, next power of two >= n, >= 8) rows: groups of every size share a few batch shapes, so all
  of curvature, density and theory compile a few programs."""
  n = len(x)
  b = min(batch_size, max(8, 1 << int(np.ceil(np.log2(n)))))
  return weighted_hvp(model, params, batch_stats, x, y, np.full(n, 1.0 / n), b)
