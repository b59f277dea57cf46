"""The optimization state per group: gradient norms and Hessian curvature of each group's loss.

For G groups with n_g samples and per-sample cross-entropy l_i(theta) of the model in
inference mode (BatchNorm on its running statistics):

  L_g(theta) = (1 / n_g) sum_{i in g} l_i(theta)                  (each group's mean loss)
  grad norm_g = ||grad L_g(theta)||_2 over all parameters (and per layer)
  mean sample grad norm_g = (1 / n_g) sum_{i in g} ||grad l_i(theta)||_2  (>= grad norm_g by
    the triangle inequality; their ratio measures how much per-sample gradients cancel)
  top-k eigenvalues of the Hessian H_g = d^2 L_g / d theta^2, by Lanczos on
  Hessian-vector products H_g v = d/de grad L_g(theta + e v) (forward-over-reverse).

theta is either the full-precision params or, with ``bits_tree``, a quantized model's
dequantized params (``dequantized_params``): the plain network evaluated at the
quantized weights, so no straight-through estimator enters any derivative. Only
weights are substituted; activation quantization is not a change of params, so
bits trees with activation bits are refused (or ignored on request).
"""
from __future__ import annotations

import functools
from typing import Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.flatten_util import ravel_pytree

from fqjax.quantization import layers, quant
from fqjax.data.pipeline import padded_batches
from fqjax.explain import lanczos
from fqjax.explain.hvp import group_hvp, model_per_sample_loss, weighted_hvp

ACTIVATION_MODES = ("error", "ignore")


# ----------------------------------------------------------------------------
# Dequantized params: the quantized network as a plain parameter substitution
# ----------------------------------------------------------------------------

def _fp_variables(variables: Mapping) -> dict:
  return {k: v for k, v in variables.items() if k not in (layers.BITS, layers.QUANT_STATS)}


def check_weight_only(bits_tree: Optional[Mapping], activations: str = "error") -> None:
  """Raises ValueError if a concrete activation bit-width < 32 is in ``bits_tree`` (unless "ignore")."""
  if activations not in ACTIVATION_MODES:
    raise ValueError(f"activations must be one of {ACTIVATION_MODES}, got {activations!r}.")
  if bits_tree is None or activations == "ignore":
    return
  for key, leaf in traverse_util.flatten_dict(bits_tree).items():
    if key[-1] == "a" and not isinstance(leaf, jax.core.Tracer) and \
        np.any(np.asarray(leaf) < quant.FULL_PRECISION_BITS):
      raise ValueError(
          f"bits tree quantizes activations ({'/'.join(key)} = {np.asarray(leaf)}), which is not a change of "
          "params, so the dequantized network cannot represent it. Use a weights-only spec "
          "(BitSpec(w_bits=..., a_bits=None)) or pass activations='ignore'.")


def dequantized_params(model: nn.Module, variables: Mapping, bits_tree: Mapping, sample_x, *,
                       activations: str = "error") -> dict:
  """The params at which the plain model computes what the weight-quantized model computes.

  Each quantized layer's kernel W is replaced by the kernel the layer itself multiplies by
  at its "w" bits in ``bits_tree`` (the "quantized_kernels" it sows: its QuantRule's grid,
  per-channel scales, LSQ step sizes); layers without "w" bits keep W. For QuantConvBN with
  ``fold_bn``, inference multiplies by Q(W g) with g = gamma / sqrt(var + eps) [C] (sown as
  "fold_scale"); substituting W' = Q(W g) / g makes the plain folded model multiply by
  W' g = Q(W g) (channels with g = 0 keep W: their output does not depend on it). Gradients
  are then with respect to the model's own (unfolded) params at that point.

  Args:
    variables: {"params", "batch_stats", ...}; a "bits" collection in it is ignored.
    bits_tree: the "bits" collection (may be traced: usable under jit and vmap).
    sample_x: an input batch [batch, ...] or its ``jax.ShapeDtypeStruct`` (shapes only: one
      forward pass at batch 1 makes the layers sow their kernels; under jit XLA drops the
      rest of that pass).
    activations: "error" refuses activation bits < 32, "ignore" drops them.
  Returns:
    a params pytree like variables["params"], kernels replaced (and gradient-stopped).
  """
  check_weight_only(bits_tree, activations)
  flat_bits = traverse_util.flatten_dict(bits_tree)
  w_bits = traverse_util.unflatten_dict({k: v for k, v in flat_bits.items() if k[-1] == "w"})
  x = jnp.zeros((1,) + tuple(sample_x.shape[1:]), sample_x.dtype)
  _, state = model.apply({**_fp_variables(variables), layers.BITS: w_bits}, x, train=False,
                         mutable=[layers.KERNELS])
  sown = traverse_util.flatten_dict(state[layers.KERNELS])  # {(*path, "kernel" | "fold_scale"): (value, ...)}
  params = traverse_util.flatten_dict(variables["params"])
  for (*path, leaf), (kernel, *_) in sown.items():
    if leaf != "kernel" or (*path, "w") not in flat_bits:
      continue
    if (*path, "fold_scale") in sown:
      g, w = sown[(*path, "fold_scale")][0], params[(*path, "kernel")]
      kernel = jnp.where(g == 0, w, kernel / jnp.where(g == 0, 1.0, g))
    params[(*path, "kernel")] = jax.lax.stop_gradient(kernel)
  return traverse_util.unflatten_dict(params)


# ----------------------------------------------------------------------------
# Per-group gradient norms: group-homogeneous batches, each sample once
# ----------------------------------------------------------------------------

def check_group_data(x, y, group, num_groups: int) -> np.ndarray:
  """Validates shapes and groups; returns counts [G] (ValueError on an empty group)."""
  if not isinstance(num_groups, (int, np.integer)) or num_groups < 1:
    raise ValueError(f"num_groups must be an int >= 1, got {num_groups!r}.")
  n = np.shape(x)[0] if np.ndim(x) else 0
  y, group = np.asarray(y), np.asarray(group)
  if n == 0 or y.shape != (n,) or group.shape != (n,):
    raise ValueError(f"x must be [N >= 1, ...] with y and group [N]; got x {np.shape(x)}, y {y.shape}, "
                     f"group {group.shape}.")
  if group.min() < 0 or group.max() >= num_groups:
    raise ValueError(f"group ids must be in [0, {num_groups}), got range [{group.min()}, {group.max()}].")
  counts = np.bincount(group, minlength=num_groups)
  if np.any(counts == 0):
    raise ValueError(f"group(s) {np.flatnonzero(counts == 0).tolist()} have no samples; a group's mean loss "
                     "is undefined. Pass only groups present in the data (renumber) or more data.")
  return counts


def group_batch_plan(group: np.ndarray, counts: np.ndarray, batch_size: int) -> list:
  """Group-homogeneous batches: full batches of b, then the remainder in binary pieces.

  Sizes are b and the powers of two below it down to 8 (b = 256: 256, 128, ..., 8). Each
  group's rows fill as many batches of each size as fit, largest first; what is left
  (< 8 rows) is one padded batch of 8. So every sample appears once, a group takes at most
  n_g // b + log2(b / 8) + 1 steps, and at most 7 padded rows per group are computed.
  Returns per group a list of (idx [s] int32, w [s] float32) with w = 1/n_g for real rows
  and 0 for padding (padding repeats a row of the same group).
  """
  sizes = [batch_size] + [1 << k for k in range(int(np.log2(max(batch_size, 1))), 2, -1)
                          if (1 << k) < batch_size]
  plan = []
  for g, n_g in enumerate(counts):
    rows, pos, batches = np.flatnonzero(group == g), 0, []
    for li, s in enumerate(sizes):
      while len(rows) - pos >= s or (li == len(sizes) - 1 and pos < len(rows)):
        chunk = rows[pos:pos + s]
        pos += len(chunk)
        pad = s - len(chunk)
        batches.append((np.concatenate([chunk, np.full(pad, chunk[0])]).astype(np.int32),
                        np.concatenate([np.full(len(chunk), 1.0 / n_g), np.zeros(pad)]).astype(np.float32)))
    plan.append(batches)
  return plan


@functools.lru_cache(maxsize=16)
def _grad_step(model: nn.Module):
  """jitted (acc, params, batch_stats, x [N, ...], y [N], idx [s], w [s]) -> acc + (grad, value)
  of sum_i w_i l_i over rows idx; ``acc`` = (params-shaped pytree, [] loss) is donated."""

  def step(acc, params, batch_stats, x, y, idx, w):
    loss_fn = lambda p: jnp.sum(w * model_per_sample_loss(model, p, batch_stats, x[idx], y[idx]))
    loss, grads = jax.value_and_grad(loss_fn)(params)
    return jax.tree_util.tree_map(jnp.add, acc, (grads, loss))

  return jax.jit(step, donate_argnums=(0,))


@jax.jit
def _zeros_acc(params):
  return jax.tree_util.tree_map(jnp.zeros_like, params), jnp.zeros((), jnp.float32)


@jax.jit
def _leaf_sq_norms(acc):
  """[num leaves + 1]: each leaf's squared norm (tree_leaves order), then the loss."""
  sq = [jnp.sum(jnp.square(a)).astype(jnp.float32) for a in jax.tree_util.tree_leaves(acc[0])]
  return jnp.stack(sq + [acc[1].astype(jnp.float32)])


def group_gradient_norms(model: nn.Module, variables: Mapping, x, y, group, num_groups: int, *,
                         bits_tree: Optional[Mapping] = None, batch_size: int = 256,
                         activations: str = "error") -> dict:
  """||grad L_g|| for every group g, with every sample's forward and backward pass done once.

  The data are cut into group-homogeneous batches (``group_batch_plan``: b, then powers of two
  down to 8); one compiled step (per batch size, so at most log2(b / 8) + 2 compilations
  for all groups and all bit-widths) adds a batch's gradient of sum_i w_i l_i, with
  w_i = 1/n_g, to its group's accumulator; after a group's batches its per-leaf squared
  norms are taken, so memory holds one params-sized accumulator, not G. The loop over
  batches only dispatches (no host sync until the end). Why not one ``lax.scan``: on XLA:CPU
  convolutions inside a loop body run far slower than the same step jitted alone
  (jax-ml/jax#12868).

  Args:
    model, variables: a Flax model of fqjax layers and its {"params", "batch_stats"}.
    x: [N, ...] float32 inputs; y: [N] int labels; group: [N] int ids in [0, G).
    bits_tree: None (full precision) or a weights-only bits tree: gradients are then taken at
      ``dequantized_params`` (a traced argument: a bit-width sweep does not recompile).
    batch_size: the largest batch.
  Returns (host NumPy):
    {"norms": [G] float64, "per_layer": {layer path: [G]} (norm over that layer's params),
     "counts": [G] int, "loss": [G] mean cross-entropy per group}.
  Raises ValueError on bad shapes, group ids outside [0, G), empty groups or bad options.
  """
  counts = check_group_data(x, y, group, num_groups)
  lanczos.check_positive("batch_size", batch_size)
  params, batch_stats = derivative_point(model, variables, x, bits_tree, activations)
  step = _grad_step(model)
  xd, yd = jnp.asarray(x), jnp.asarray(y, jnp.int32)
  results = []
  for batches in group_batch_plan(np.asarray(group), counts, batch_size):
    acc = _zeros_acc(params)
    for idx, w in batches:
      acc = step(acc, params, batch_stats, xd, yd, idx, w)
    results.append(_leaf_sq_norms(acc))
  results = np.asarray(jax.device_get(jnp.stack(results)), np.float64)  # [G, leaves + 1], one transfer
  per_layer: dict = {}
  for i, (path, _) in enumerate(jax.tree_util.tree_leaves_with_path(params)):  # _leaf_sq_norms' order
    name = jax.tree_util.keystr(path[:-1], simple=True, separator="/")
    per_layer[name] = per_layer.get(name, 0.0) + results[:, i]
  return {"norms": np.sqrt(results[:, :-1].sum(axis=1)),
          "per_layer": {name: np.sqrt(v) for name, v in per_layer.items()},
          "counts": counts, "loss": results[:, -1]}


# Per-sample gradients held at once: B x P floats (2**26 float32 = 256 MiB); ResNet-18's
# ~11M params get B = 5-6 rows, a 433-param test CNN the full batch.
_MAX_GRAD_FLOATS = 2 ** 26


@functools.lru_cache(maxsize=16)
def _sample_norm_step(model: nn.Module):
  """jitted (acc [G], params, batch_stats, x [N, ...], y [N], group [N], idx [B], mask [B])
  -> acc + segment sum over groups of mask_i ||grad l_i||_2; ``acc`` is donated."""

  def step(acc, params, batch_stats, x, y, group, idx, mask):
    def loss(p, xi, yi):  # one sample: BatchNorm in inference mode, so rows are independent
      return model_per_sample_loss(model, p, batch_stats, xi[None], yi[None])[0]
    grads = jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))(params, x[idx], y[idx])  # leaves [B, ...]
    sq = sum(jnp.sum(jnp.square(g).reshape(len(idx), -1), axis=1) for g in jax.tree_util.tree_leaves(grads))
    norms = jnp.sqrt(sq).astype(acc.dtype) * mask  # [B]; padding rows weigh 0
    return acc + jax.ops.segment_sum(norms, group[idx], num_segments=acc.shape[0])

  return jax.jit(step, donate_argnums=(0,))


def group_mean_sample_gradient_norms(model: nn.Module, variables: Mapping, x, y, group, num_groups: int, *,
                                     bits_tree: Optional[Mapping] = None, batch_size: int = 256,
                                     activations: str = "error") -> dict:
  """(1/n_g) sum_{i in g} ||grad l_i(theta)||_2 for every group g: the mean per-sample gradient norm.

  Next to ``group_gradient_norms`` (||grad L_g||, the norm of the mean gradient) this is the
  mean of the norms; by the triangle inequality mean_norms_g >= norms_g, with equality for a
  single sample or aligned gradients, so norms_g / mean_norms_g in (0, 1] says how little
  the group's per-sample gradients cancel.

  Per-sample gradients come from ``jax.vmap(jax.grad(l_i))`` over fixed batches of B rows
  (``padded_batches``: the last one repeats a row at weight 0), B = min(batch_size, N,
  2**26 // P) so the B x P gradients held at once stay <= 256 MiB of float32 (P = number
  of params). Each batch is reduced on device to [B] norms and segment-summed into a [G]
  accumulator: one compiled program per batch shape (theta and bits are traced, so a
  bit-width sweep does not recompile), only dispatches in the loop, one transfer at the end.

  Args:
    model, variables: a Flax model of fqjax layers and its {"params", "batch_stats"}.
    x: [N, ...] float inputs; y: [N] int labels; group: [N] int ids in [0, G).
    bits_tree: None (full precision) or a weights-only bits tree (theta = ``dequantized_params``).
    batch_size: the most rows per batch (the memory cap above may lower it).
    activations: "error" refuses activation bits < 32 in ``bits_tree``, "ignore" drops them.
  Returns (host NumPy): {"mean_norms": [G] float64, "counts": [G] int}.
  Raises ValueError on bad shapes, group ids outside [0, G), empty groups or bad options.
  """
  counts = check_group_data(x, y, group, num_groups)
  lanczos.check_positive("batch_size", batch_size)
  params, batch_stats = derivative_point(model, variables, x, bits_tree, activations)
  num_params = sum(int(np.prod(np.shape(a))) for a in jax.tree_util.tree_leaves(params))
  b = max(1, min(batch_size, _MAX_GRAD_FLOATS // max(num_params, 1)))
  dtype = jnp.result_type(*jax.tree_util.tree_leaves(params))  # float64 params accumulate in float64
  xd, yd, gd = jnp.asarray(x), jnp.asarray(y, jnp.int32), jnp.asarray(group, jnp.int32)
  step = _sample_norm_step(model)
  acc = jnp.zeros((num_groups,), dtype)
  for idx, real in padded_batches(np.arange(yd.shape[0], dtype=np.int32), b):  # B = min(b, N)
    mask = (np.arange(len(idx)) < real).astype(dtype)
    acc = step(acc, params, batch_stats, xd, yd, gd, idx, mask)
  sums = np.asarray(jax.device_get(acc), np.float64)
  return {"mean_norms": sums / counts, "counts": counts}


# ----------------------------------------------------------------------------
# Hessian-vector products and per-group curvature
# ----------------------------------------------------------------------------

def derivative_point(model, variables, x, bits_tree, activations):
  """(params, batch_stats): full precision, or the dequantized params at ``bits_tree``."""
  check_weight_only(bits_tree, activations)
  variables = _fp_variables(variables)
  params = variables["params"]
  if bits_tree is not None:
    sample = jax.ShapeDtypeStruct((1,) + tuple(np.shape(x)[1:]), jnp.asarray(x[:1]).dtype)
    params = _dequantize_program(model, sample)(variables, bits_tree)
  return params, variables.get("batch_stats", {})


def quantized_params(model: nn.Module, variables: Mapping, bits_tree: Mapping, x) -> dict:
  """``dequantized_params`` at ``bits_tree`` (activation bits ignored) through one jitted program per model.

  Callers that then evaluate several quantities at these params can pass them, with bits_tree None, to
  any clone of the model that differs only in its weight rule (at full precision they compute the same
  function), so the compiled gradient / HVP programs are shared across PTQ variants.
  """
  return derivative_point(model, variables, x, bits_tree, "ignore")[0]


@functools.lru_cache(maxsize=16)
def _dequantize_program(model: nn.Module, sample: jax.ShapeDtypeStruct):
  """jitted (variables, bits_tree) -> dequantized params; bits traced, so one compile per model."""
  return jax.jit(lambda v, bits_tree: dequantized_params(model, v, bits_tree, sample, activations="ignore"))


def make_hvp(model: nn.Module, variables: Mapping, x, y, *, bits_tree: Optional[Mapping] = None,
             batch_size: int = 256, activations: str = "error"):
  """Hessian-vector product of the mean cross-entropy over (x, y), in inference mode.

  H v = sum over batches of jvp(grad(sum_i w_i l_i), (theta,), (v,)) with w_i = 1/N for
  real rows and 0 for padding: one jitted program per batch shape, so the loop over
  batches only dispatches (no host sync); ``jax.jit(hvp)`` also works.
  Args: x [N, ...], y [N]; bits_tree: optional weights-only bits tree (theta = dequantized params).
  Returns (hvp, flat_params): hvp maps v [P] -> H v [P] (dtype of the params);
    flat_params [P] is theta raveled (``jax.flatten_util.ravel_pytree`` order).
  """
  n = np.shape(x)[0] if np.ndim(x) else 0
  if n == 0 or np.shape(y) != (n,):
    raise ValueError(f"make_hvp needs x [N >= 1, ...] and y [N]; got {np.shape(x)} and {np.shape(y)}.")
  lanczos.check_positive("batch_size", batch_size)
  params, batch_stats = derivative_point(model, variables, x, bits_tree, activations)
  hvp = weighted_hvp(model, params, batch_stats, np.asarray(x), np.asarray(y), np.full(n, 1.0 / n),
                      min(batch_size, n))
  return hvp, ravel_pytree(params)[0]


def group_top_eigenvalues(model: nn.Module, variables: Mapping, x, y, group, num_groups: int, *,
                          k: int = 5, bits_tree: Optional[Mapping] = None, batch_size: int = 256,
                          max_iters: int = 100, tol: float = 1e-4, seed: int = 0,
                          trace_probes: int = 0, activations: str = "error") -> dict:
  """Top-k Hessian eigenvalues of each group's mean loss L_g by Lanczos, with ||grad L_g|| and L_g (and
  optionally tr H_g) from the same products.

  Each group's HVP runs over its own samples in batches of min(batch_size, next power of two
  >= n_g, >= 8) rows (a few batch shapes, so a few compilations for all groups); all groups'
  Lanczos runs (``lanczos.lanczos_top_eigenvalues_many``: stop="residual", the same seed) advance in
  lock step with one host sync per round. grad L_g and L_g come from one gradient pass over the
  same batches (``BatchedHvp.gradient_and_value``: the same batch shapes, so no extra shapes to
  compile beyond one gradient program each; equal to ``group_gradient_norms``' up to float
  summation order).
  ``trace_probes`` > 0 adds Hutchinson trace estimates of H_g.
  Returns (host NumPy): {"eigenvalues": [G, k] descending, "residuals": [G, k],
    "num_hvps": [G], "converged": [G] bool, "counts": [G], "grad_norm": [G] float64,
    "loss": [G] float64, and with trace_probes: "trace": [G], "trace_std": [G] (standard errors)}.
  """
  counts = check_group_data(x, y, group, num_groups)
  lanczos.check_positive("k", k)
  lanczos.check_positive("batch_size", batch_size)
  if not isinstance(trace_probes, (int, np.integer)) or trace_probes < 0:
    raise ValueError(f"trace_probes must be an int >= 0, got {trace_probes!r}.")
  params, batch_stats = derivative_point(model, variables, x, bits_tree, activations)
  flat = ravel_pytree(params)[0]
  x, y, group = np.asarray(x), np.asarray(y), np.asarray(group)
  hvps = []
  for g in range(num_groups):
    rows = np.flatnonzero(group == g)
    hvps.append(group_hvp(model, params, batch_stats, x[rows], y[rows], batch_size))
  norms, losses = [], []
  for h in hvps:  # dispatched now, fetched after the Lanczos runs; each gradient [P] is dropped once reduced
    grad, value = h.gradient_and_value()
    norms.append(jnp.linalg.norm(grad))
    losses.append(value)
  grad_norm, loss = jnp.stack(norms), jnp.stack(losses)
  runs = lanczos.lanczos_top_eigenvalues_many(hvps, flat, k, max_iters=max_iters, tol=tol, seed=seed)
  out = {key: np.array([r[key] for r in runs]) for key in ("eigenvalues", "residuals", "num_hvps", "converged")}
  grad_norm, loss = jax.device_get((grad_norm, loss))
  out.update(counts=counts, grad_norm=np.asarray(grad_norm, np.float64), loss=np.asarray(loss, np.float64))
  if trace_probes:
    traces = [lanczos.hutchinson_trace(h, flat, num_probes=trace_probes, seed=seed) for h in hvps]
    out["trace"], out["trace_std"] = np.array([t["trace"] for t in traces]), np.array([t["std"] for t in traces])
  return out
