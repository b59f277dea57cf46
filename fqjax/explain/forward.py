"""The forward chain of quantization's effect, per group: weights -> activations -> logits -> softmax.

For a trained model and a bits tree (one bit assignment), against the same model at full precision:

  weights (per layer and whole model; W = full-precision kernel, Q = its quantized value):
    mean_abs_diff = mean |Q - W|,   rel_l2 = ||Q - W|| / ||W||,
    induced_sparsity = #{W != 0 and Q == 0} / #{W != 0},   total_sparsity = #{Q == 0} / #Q
  activations (per quantized layer, per sample i, then averaged per group):
    rel_err_i = ||a_q(x_i) - a_fp(x_i)|| / (||a_fp(x_i)|| + eps)    (a = the layer's output)
  logits z [C] per sample i, label y_i, margin m_i = z_{i,y_i} - max_{c != y_i} z_ic; over a group's
  samples S_g (all variances population, ddof=0), each definition as fp, quantized, their change and
  relative change = change / fp (NaN where the reference is 0 or the group is empty):
    variance_over_classes = mean_{i in S_g} Var_c z_ic       (legacy logits.variance*)
    variance_over_samples = mean_c Var_{i in S_g} z_ic        (0 for a one-sample group)
    true_class_variance   = Var_{i in S_g} z_{i,y_i}
  and shifts, relative to the mean magnitude of the full-precision quantity:
    abs_shift        = mean_{i in S_g} mean_c |z_q - z_fp|,  relative: / mean_i mean_c |z_fp|
    true_class_shift = mean_{i in S_g} (z_q - z_fp)_{i,y_i},  relative: / mean_i |z_fp_{i,y_i}|
    margin_shift     = mean_{i in S_g} (m_q - m_fp)_i,        relative: / mean_i |m_fp_i|
  softmax p per sample with label y:
    true_prob = p_y,  top_prob = max_c p_c,  margin = p_y - max_{c != y} p_c  (< 0: misclassified)
Per-group values are means over the group's samples; shifts are (quantized - full precision).
"""
from __future__ import annotations

import functools
from typing import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from fqjax.quantization import layers
from fqjax.analysis import metrics
from fqjax.data.pipeline import padded_batches

_EPS = 1e-12


# ----------------------------------------------------------------------------
# Per-sample quantities (pure, jit-friendly)
# ----------------------------------------------------------------------------

def logit_variance(logits: jax.Array) -> jax.Array:
  """Var over classes of each sample's logits: [N, C] -> [N] (population variance)."""
  return jnp.var(logits, axis=-1)


def softmax_stats(logits: jax.Array, labels: jax.Array) -> dict:
  """true_prob, top_prob and margin (p_y - max_{c != y} p_c) per sample: [N, C], [N] -> each [N]."""
  p = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  true_prob = jnp.take_along_axis(p, labels[:, None], axis=-1)[:, 0]
  others = jnp.where(jax.nn.one_hot(labels, p.shape[-1], dtype=bool), -jnp.inf, p)
  return {"true_prob": true_prob, "top_prob": jnp.max(p, axis=-1), "margin": true_prob - jnp.max(others, axis=-1)}


def weight_stats(fp: jax.Array, q: jax.Array) -> dict:
  """Error and sparsity of a quantized tensor ``q`` against its full-precision ``fp`` (same shape)."""
  fp = np.asarray(fp, np.float64)
  q = np.asarray(q, np.float64)
  nonzero = fp != 0
  return {"mean_abs_diff": float(np.mean(np.abs(q - fp))),
          "rel_l2": float(np.linalg.norm(q - fp) / max(np.linalg.norm(fp), _EPS)),
          "induced_sparsity": float(np.sum(nonzero & (q == 0)) / max(np.sum(nonzero), 1)),
          "total_sparsity": float(np.mean(q == 0)),
          "size": int(fp.size)}


def _merge_weight_stats(per_layer: Mapping[str, dict], fp: Mapping, q: Mapping) -> dict:
  """Whole-model weight statistics from the concatenated kernels."""
  names = list(per_layer)
  flat_fp = np.concatenate([np.asarray(fp[n]).reshape(-1) for n in names])
  flat_q = np.concatenate([np.asarray(q[n]).reshape(-1) for n in names])
  return weight_stats(flat_fp, flat_q)


# ----------------------------------------------------------------------------
# Group-wise logit definitions (host, float64)
# ----------------------------------------------------------------------------

def _group_var(values: np.ndarray, group: np.ndarray, num_groups: int) -> np.ndarray:
  """Population variance over each group's samples: values [N, K] -> [G, K] float64, NaN for empty groups.

  Two passes (mean, then mean squared deviation) so a one-sample group is exactly 0, with no cancellation.
  """
  values = np.asarray(values, np.float64)
  count = np.bincount(group, minlength=num_groups).astype(np.float64)[:, None]
  total = np.zeros((num_groups, values.shape[1]))
  np.add.at(total, group, values)
  mean = np.full_like(total, np.nan)
  np.divide(total, count, out=mean, where=count > 0)
  sq = np.zeros_like(total)
  np.add.at(sq, group, (values - mean[group]) ** 2)
  var = np.full_like(total, np.nan)
  np.divide(sq, count, out=var, where=count > 0)
  return var


def _relative(change: np.ndarray, ref: np.ndarray) -> np.ndarray:
  """change / ref elementwise ([G] float64); NaN where ref is 0 or not finite, without warnings."""
  out = np.full(np.shape(ref), np.nan)
  np.divide(change, ref, out=out, where=np.isfinite(ref) & (ref != 0))
  return out


def _true_and_margin(z: np.ndarray, y: np.ndarray) -> tuple:
  """(z_{i,y_i}, z_{i,y_i} - max_{c != y_i} z_ic): [N, C], [N] -> ([N], [N]) float64."""
  z_y = np.take_along_axis(z, y[:, None], axis=1)[:, 0]
  others = np.where(np.arange(z.shape[1])[None, :] == y[:, None], -np.inf, z)
  return z_y, z_y - others.max(axis=1)


def logit_definitions(z_fp: np.ndarray, z_q: np.ndarray, y: np.ndarray, group: np.ndarray,
                      num_groups: int) -> dict:
  """Every per-group definition of the logit links (module docstring), quantized vs full precision.

  Args:
    z_fp, z_q: [N, C] per-sample logits at full precision and quantized; y, group: [N] int.

  Returns:
    {"variance_over_classes" | "variance_over_samples" | "true_class_variance":
       {"fp", "quantized", "change" = quantized - fp, "relative_change" = change / fp},
     "abs_shift" | "true_class_shift" | "margin_shift": {"change", "relative_change"}},
    each a list of G floats (float64 math; NaN for an empty group or a zero reference).
  """
  z_fp, z_q = np.asarray(z_fp, np.float64), np.asarray(z_q, np.float64)
  y, group = np.asarray(y, np.int64), np.asarray(group, np.int64)
  gm = lambda v: metrics.group_mean(v, group, num_groups)
  t_fp, m_fp = _true_and_margin(z_fp, y)
  t_q, m_q = _true_and_margin(z_q, y)
  variances = {  # name -> (fp [G], quantized [G])
      "variance_over_classes": (gm(z_fp.var(axis=1)), gm(z_q.var(axis=1))),
      "variance_over_samples": (_group_var(z_fp, group, num_groups).mean(axis=1),
                                _group_var(z_q, group, num_groups).mean(axis=1)),
      "true_class_variance": (_group_var(t_fp[:, None], group, num_groups)[:, 0],
                              _group_var(t_q[:, None], group, num_groups)[:, 0])}
  shifts = {  # name -> (mean change [G], mean magnitude of the fp reference [G])
      "abs_shift": (gm(np.abs(z_q - z_fp).mean(axis=1)), gm(np.abs(z_fp).mean(axis=1))),
      "true_class_shift": (gm(t_q - t_fp), gm(np.abs(t_fp))),
      "margin_shift": (gm(m_q - m_fp), gm(np.abs(m_fp)))}
  out = {}
  for name, (fp, q) in variances.items():
    out[name] = {"fp": fp.tolist(), "quantized": q.tolist(), "change": (q - fp).tolist(),
                 "relative_change": _relative(q - fp, fp).tolist()}
  for name, (change, ref) in shifts.items():
    out[name] = {"change": change.tolist(), "relative_change": _relative(change, ref).tolist()}
  return out


# ----------------------------------------------------------------------------
# Capturing what the layers compute
# ----------------------------------------------------------------------------

def _is_quant_layer(module: nn.Module, method_name: str) -> bool:
  return method_name == "__call__" and isinstance(module, layers.QUANT_LAYER_TYPES)


def _per_layer(tree: Mapping, layer_names: Sequence[str], leaf: str) -> dict:
  """{layer path: the first sown value ``tree[path...][leaf][0]``} for every layer."""
  flat = traverse_util.flatten_dict(tree, sep="/")
  return {name: flat[f"{name}/{leaf}"][0] for name in layer_names}


def effective_kernels(model: nn.Module, variables: Mapping, bits_tree, sample_x, layer_names) -> dict:
  """{layer: the kernel the layer multiplies by} at ``bits_tree`` (None: full precision).

  Captured from the layers themselves (the "quantized_kernels" collection), so
  per-channel scales and BatchNorm folding are exactly what inference uses.
  """
  v = {k: val for k, val in variables.items() if k != layers.BITS}
  if bits_tree is not None:
    v[layers.BITS] = bits_tree
  state = _kernels_program(model)(v, sample_x)
  return {k: np.asarray(v) for k, v in _per_layer(state[layers.KERNELS], layer_names, "kernel").items()}


@functools.lru_cache(maxsize=16)
def _kernels_program(model: nn.Module):
  """jitted (variables, x) -> the sown collections: one compilation per model and variables structure (bits
  are traced), not one per call."""
  return jax.jit(lambda v, x: model.apply(v, x, train=False, mutable=[layers.KERNELS])[1])


@functools.lru_cache(maxsize=16)
def _chain_fn(model: nn.Module, layer_names: tuple):
  """jitted (variables, bits_tree, x [B, ...], y [B]) -> per-sample chain quantities for FP and quantized
  (logits_fp, logits_q [B, C]; softmax stats [B] each), and per-layer relative activation errors {layer: [B]}."""

  def run(variables, bits_tree, x):
    v = dict(variables)
    if bits_tree is not None:
      v[layers.BITS] = bits_tree
    logits, state = model.apply(v, x, train=False, capture_intermediates=_is_quant_layer)
    return logits, _per_layer(state["intermediates"], layer_names, "__call__")

  @jax.jit
  def chain(variables, bits_tree, x, y):
    z_fp, a_fp = run(variables, None, x)
    z_q, a_q = run(variables, bits_tree, x)
    act_err = {}
    for name in layer_names:
      diff = (a_q[name] - a_fp[name]).reshape(x.shape[0], -1)
      ref = a_fp[name].reshape(x.shape[0], -1)
      act_err[name] = jnp.linalg.norm(diff, axis=1) / (jnp.linalg.norm(ref, axis=1) + _EPS)
    s_fp, s_q = softmax_stats(z_fp, y), softmax_stats(z_q, y)
    out = {"logits_fp": z_fp, "logits_q": z_q}  # logit definitions need whole groups: done on the host
    out.update({f"{k}_fp": v for k, v in s_fp.items()})
    out.update(s_q)
    return out, act_err

  return chain


def forward_chain(model: nn.Module, variables: Mapping, bits_tree, x: np.ndarray, y: np.ndarray,
                  group: np.ndarray, num_groups: int, layer_names: Sequence[str], *,
                  batch_size: int = 512) -> dict:
  """Every link of the forward chain for one bit assignment, per group.

  Args:
    variables: trained {"params", "batch_stats"[, "quant_stats"]}; bits_tree: a "bits" collection.
    x: [N, ...] float32; y, group: [N] int. layer_names: quantizable layers in forward order.

  Returns:
    {"weights": {"per_layer": {layer: weight_stats}, "model": weight_stats},
     "activations": {layer: [G] mean relative error},
     "logits": {"abs_shift", "variance", "variance_fp", "variance_change": [G],
                "definitions": logit_definitions(...)},
       where abs_shift = mean_i mean_c |z_q - z_fp|, variance(_fp) = mean_i Var_c z_q (z_fp) and
       variance_change = their difference (the same numbers as definitions["abs_shift"]["change"] and
       definitions["variance_over_classes"]); definitions holds, per group g over its samples S_g,
         variance_over_classes = mean_{i in S_g} Var_c z_ic,  variance_over_samples = mean_c Var_{i in S_g} z_ic,
         true_class_variance = Var_{i in S_g} z_{i,y_i}: each {"fp", "quantized", "change", "relative_change"};
         abs_shift, true_class_shift = mean (z_q - z_fp)_{i,y_i}, margin_shift = mean (m_q - m_fp)_i with
         m = z_y - max_{c != y} z_c: each {"change", "relative_change" = change / mean |fp quantity|}.
     "softmax": {"true_prob", "top_prob", "margin", and *_fp, *_shift: [G]},
     "accuracy": [G], "loss": [G]}
  """
  layer_names = tuple(layer_names)
  fp_k = effective_kernels(model, variables, None, x[:1], layer_names)
  q_k = effective_kernels(model, variables, bits_tree, x[:1], layer_names)
  per_layer = {n: weight_stats(fp_k[n], q_k[n]) for n in layer_names}
  chain = _chain_fn(model, layer_names)
  parts, act_parts = [], []
  for rows, real in padded_batches(np.arange(len(x)), batch_size):  # fixed batch shape: one compilation
    out, act = jax.device_get(chain(variables, bits_tree, np.asarray(x[rows]), np.asarray(y[rows])))
    parts.append({k: v[:real] for k, v in out.items()})
    act_parts.append({k: v[:real] for k, v in act.items()})
  cat = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  act = {k: np.concatenate([p[k] for p in act_parts]) for k in act_parts[0]}
  gm = lambda v: metrics.group_mean(v, group, num_groups).tolist()
  defs = logit_definitions(cat["logits_fp"], cat["logits_q"], y, group, num_groups)
  over_classes = defs["variance_over_classes"]
  logits = {"abs_shift": list(defs["abs_shift"]["change"]), "variance": list(over_classes["quantized"]),
            "variance_fp": list(over_classes["fp"]), "variance_change": list(over_classes["change"]),
            "definitions": defs}  # copies: no list shared between the legacy keys and the definitions
  softmax = {}
  for key in ("true_prob", "top_prob", "margin"):
    softmax[key] = gm(cat[key])
    softmax[f"{key}_fp"] = gm(cat[f"{key}_fp"])
    softmax[f"{key}_shift"] = gm(cat[key] - cat[f"{key}_fp"])
  gmetrics = metrics.group_metrics(cat["logits_q"], y, group, num_groups)
  return {"weights": {"per_layer": per_layer, "model": _merge_weight_stats(per_layer, fp_k, q_k)},
          "activations": {name: gm(v) for name, v in act.items()},
          "logits": logits, "softmax": softmax,
          "accuracy": gmetrics["groups"]["accuracy"], "loss": gmetrics["groups"]["loss"]}
