"""The stages of a study as pure functions: model, variables, splits and config sections in, JSON-ready dicts out.

Nothing here reads or writes the workdir: the runner (fqjax.study.runner) decides what to compute,
loads and saves, and hands the training stages the checkpoint folder they resume from. So
each stage can be called, and tested, without a workdir:

  record, variables = train_seed(model, splits, config.train, config.eval, seed, ckpt_dir)
  by_bits = ptq_seed(model, variables, splits, config.ptq, config.eval, layer_names, seed)
  entry = explain_entry(model, variables, splits, config.explain, config.ptq, config.eval,
                        layer_names, bits, seed, variant)   (forward chain, curvature, theory)
  (the mitigate stage's entry is fqjax.study.mitigate.run_entry)

`quantization_start` is the one place that turns trained variables into what a quantized
model starts from (calibrated activation ranges); `ptq_model` applies config.ptq's options.
"""
from __future__ import annotations

import time
from typing import Mapping, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util

from fqjax.quantization import layers, quant
from fqjax.analysis import metrics, stats
from fqjax.study import ptq
from fqjax.training import train
from fqjax.explain import curvature as curvature_lib
from fqjax.explain import density as density_lib
from fqjax.explain import forward as forward_lib
from fqjax.explain import theory as theory_lib
from fqjax.models import get_model

Variables = Mapping[str, Mapping]


def resolved_model_name(config, info) -> str:
  """config.model.name (a zoo name or "package.module:factory", as given), or for "auto" the MLP for
  [N, D] inputs and small_cnn for images."""
  if config.model.name != "auto":
    return config.model.name
  return "mlp" if len(info.input_shape) == 1 else "small_cnn"


def build_model(config, info) -> nn.Module:
  """The model of config.model for the data described by ``info`` (classes, input shape): a zoo model, or
  the Linen model of a "package.module:factory" name (plain nn.Dense / nn.Conv layers quantized by
  interception, fqjax.quantization.intercept), built with model.kwargs (and dtype=bfloat16 for compute_dtype "bfloat16")."""
  kwargs = dict(config.model.kwargs.to_dict()) if hasattr(config.model.kwargs, "to_dict") else dict(
      config.model.kwargs or {})
  if config.model.get("compute_dtype", "float32") == "bfloat16":
    kwargs["dtype"] = jax.numpy.bfloat16
  return get_model(resolved_model_name(config, info), info.num_classes, **kwargs)


def num_params(model, sample) -> int:
  """Parameter count of ``model`` on inputs shaped like ``sample`` (traced only, nothing computed)."""
  shapes = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), sample)
  return int(sum(np.prod(a.shape) for a in jax.tree_util.tree_leaves(shapes["params"])))


def ptq_model(model: nn.Module, pcfg, variant: Optional[str] = None) -> nn.Module:
  """The trained model with config.ptq's options (per_channel, fold_bn) and the weight scale rule of
  ``variant`` (default: the primary variant, ``pcfg.variants[0]``)."""
  scale, _ = ptq.parse_variant(variant or pcfg.variants[0])
  return layers.configured(model, per_channel=pcfg.per_channel, fold_bn=pcfg.fold_bn, scale=scale)


def recalibrated(qmodel: nn.Module, qvars: Variables, bits_tree, train_x: np.ndarray, pcfg, seed: int,
                 variant: Optional[str] = None) -> dict:
  """``qvars`` with BatchNorm statistics re-estimated for the model quantized by ``bits_tree`` when the
  variant's BatchNorm mode is "recalibrate" (on ``pcfg.bn_batches`` training batches drawn from ``seed``);
  unchanged for "keep" and at full precision."""
  _, bn = ptq.parse_variant(variant or pcfg.variants[0])
  if bn == "keep" or is_full_precision(bits_tree):
    return dict(qvars)  # at full precision every variant is the model as trained
  batches = ptq.calibration_batches(train_x, pcfg.calibration_batch_size, pcfg.bn_batches, seed + 1)
  return {**qvars, "batch_stats": ptq.recalibrate_batch_stats(qmodel, qvars, bits_tree, batches)}


def is_full_precision(bits_tree) -> bool:
  """Whether no leaf of a "bits" tree is below 32 (nothing is quantized)."""
  return all(np.all(np.asarray(leaf) >= quant.FULL_PRECISION_BITS) for leaf in jax.tree_util.tree_leaves(bits_tree))


def quantization_start(model: nn.Module, variables: Variables, train_x: np.ndarray, pcfg, seed: int, *,
                       calibrate: bool) -> dict:
  """The variables a quantized ``model`` starts from: the trained ``variables`` without stale
  "bits" / "quant_stats", plus, with ``calibrate``, activation ranges ("quant_stats") calibrated by
  ``model`` on ``pcfg.calibration_batches`` random training batches of ``train_x`` [N, ...] drawn from ``seed``.
  """
  calib = ptq.calibration_batches(train_x, pcfg.calibration_batch_size, pcfg.calibration_batches,
                                  seed) if calibrate else None
  return ptq.prepare_variables(model, variables, calib, pcfg.calibration)


def train_seed(model: nn.Module, splits, tcfg, ecfg, seed: int, ckpt_dir: str, *, mesh=None,
               progress: bool = True) -> tuple[dict, dict]:
  """Full-precision training of one seed (resuming from ``ckpt_dir``) and its val / test metrics.

  Returns (record, variables): record = {"history", "val", "test", "wall_s", "epochs_run",
  "resumed_from", "sample_counts", "variables_digest"} (JSON-ready; the digest is
  fqjax.training.train.tree_digest of the final variables, the identity later stages are keyed on).
  """
  out = train.fit(model, splits, tcfg, seed, ckpt_dir, mesh=mesh, progress=progress)
  info = splits.info
  kw = dict(group_is_label=info.group_is_label, batch_size=ecfg.batch_size, mesh=mesh)
  val = train.evaluate(model, out["variables"], splits.val, info.num_groups, **kw)
  test = train.evaluate(model, out["variables"], splits.test, info.num_groups, **kw)
  record = {"history": out["history"], "val": val, "test": test, "wall_s": out["wall_s"],
            "epochs_run": out["epochs_run"], "resumed_from": out["resumed_from"],
            "sample_counts": out["sample_counts"], "variables_digest": train.tree_digest(out["variables"])}
  return record, out["variables"]


def ptq_seed(model: nn.Module, variables: Variables, splits, pcfg, ecfg, layer_names: Sequence[str], seed: int, *,
             mesh=None) -> dict:
  """The PTQ sweep of one trained seed on the test split, for every variant of ``pcfg.variants``.

  Returns {"by_bits": {bits: group metrics + size_bytes [+ fairness_violation_ci]} of the primary
  variant, "variants": {other variant: its by_bits}, "sweep_s": seconds of all sweeps, "sweep_mode"}.
  Reference for accuracy drops: the model as trained (no folding, no quantizer in the graph), evaluated
  once; groups.paired_counts [G, 4] (fqjax.analysis.stats.CELLS) pair each test example's reference and quantized
  outcome, the sufficient statistic of the paired bootstrap; flip_rate (overall and per group) is the fraction
  of test rows whose predicted class differs from the reference's (Hooker et al. 2020). Activation ranges
  are calibrated once (at full precision, so the weight rule does not matter).
  With BatchNorm recalibration each bit-width has its own statistics, so that sweep runs one
  bit-width at a time through the same compiled function (K = 1).
  """
  bit_widths = [int(b) for b in pcfg.bit_widths]
  specs = ptq.sweep_specs(bit_widths, pcfg.a_bits)
  trees = [s.bits_tree(layer_names) for s in specs]
  qvars = quantization_start(ptq_model(model, pcfg), variables, splits.train.x, pcfg, seed,
                             calibrate=any(s.a_bits is not None for s in specs))
  num_params = sum(int(np.prod(np.shape(a))) for a in jax.tree_util.tree_leaves(variables["params"]))
  mode = ptq.resolve_mode(pcfg.sweep_mode, num_params)
  test, info = splits.test, splits.info
  ref_logits = train.predict(model, {k: variables[k] for k in ("params", "batch_stats")}, test.x, ecfg.batch_size,
                             mesh)
  ref = metrics.group_metrics(ref_logits, test.y, test.group, info.num_groups, group_is_label=info.group_is_label)
  ref_correct = ref_logits.argmax(-1) == test.y
  t0 = time.perf_counter()
  logits = {v: _variant_logits(ptq_model(model, pcfg, v), qvars, trees, splits, pcfg, ecfg, seed, v, mode, mesh)
            for v in pcfg.variants}
  sweep_s = time.perf_counter() - t0
  by_variant = {}
  for v, variant_logits in logits.items():
    by_variant[v] = {}
    for i, (bits, spec) in enumerate(zip(bit_widths, specs)):
      m = metrics.group_metrics(variant_logits[i], test.y, test.group, info.num_groups,
                                group_is_label=info.group_is_label, reference=ref)
      m["groups"]["paired_counts"] = stats.paired_counts(ref_correct, variant_logits[i].argmax(-1) == test.y,
                                                         test.group, info.num_groups).tolist()
      flips = metrics.flip_rates(ref_logits.argmax(-1), variant_logits[i].argmax(-1), test.group, info.num_groups)
      m["flip_rate"], m["groups"]["flip_rate"] = flips["overall"], flips["groups"]
      m["size_bytes"] = quant.storage_size(qvars["params"], layers.weight_bits_by_layer(spec, layer_names),
                                           per_channel=pcfg.per_channel)["bytes"]
      if ecfg.bootstrap_resamples:
        m["fairness_violation_ci"] = metrics.bootstrap_fairness_violation(
            variant_logits[i].argmax(-1) == test.y, test.group, info.num_groups,
            num_resamples=ecfg.bootstrap_resamples, seed=seed)
      by_variant[v][str(bits)] = m
  primary = pcfg.variants[0]
  return {"by_bits": by_variant.pop(primary), "variants": by_variant, "sweep_s": sweep_s, "sweep_mode": mode}


def _variant_logits(qmodel, qvars, trees, splits, pcfg, ecfg, seed, variant, mode, mesh) -> np.ndarray:
  """Test logits [K, N, C] of one PTQ variant at every bits tree."""
  test = splits.test
  if ptq.parse_variant(variant)[1] == "keep":
    return ptq.sweep_logits(qmodel, qvars, test.x, trees, batch_size=ecfg.batch_size, mode=mode, mesh=mesh)
  return np.concatenate([
      ptq.sweep_logits(qmodel, recalibrated(qmodel, qvars, tree, splits.train.x, pcfg, seed, variant), test.x,
                       [tree], batch_size=ecfg.batch_size, mode=mode, mesh=mesh) for tree in trees])


def explain_entry(model: nn.Module, variables: Variables, splits, xcfg, pcfg, ecfg, layer_names: Sequence[str],
                  bits: int, seed: int, variant: Optional[str] = None) -> dict:
  """Forward chain (on ``xcfg.forward_split``), per-group curvature and the second-order test (on
  ``xcfg.curvature_split``) of one PTQ ``variant`` (default: the primary one) at ``bits``.

  ``variables`` are the trained ones; the quantized start is built here (quantization_start), with the
  variant's weight grid and BatchNorm mode. Returns forward_lib.forward_chain's dict plus "curvature"
  (when ``xcfg.curvature``; with "density", fqjax.explain.density.group_densities, at ``xcfg.density_bits`` for
  the primary variant), "theory" (quantized bit-widths; see ``theory``) and "wall_s".
  """
  t0 = time.perf_counter()
  spec = ptq.sweep_specs([bits], pcfg.a_bits)[0]
  qmodel = ptq_model(model, pcfg, variant)
  qvars = quantization_start(qmodel, variables, splits.train.x, pcfg, seed, calibrate=spec.a_bits is not None)
  bits_tree = spec.bits_tree(layer_names)
  qvars_bn = recalibrated(qmodel, qvars, bits_tree, splits.train.x, pcfg, seed, variant)
  fwd, info = splits[xcfg.forward_split], splits.info
  entry = forward_lib.forward_chain(qmodel, qvars_bn, bits_tree, fwd.x, fwd.y, fwd.group, info.num_groups,
                                    layer_names, batch_size=ecfg.batch_size)
  rng = np.random.default_rng(seed)
  rows = _subsample_groups(splits[xcfg.curvature_split], info.num_groups, xcfg.max_examples_per_group, rng)
  # Derivatives are taken of the plain network at the variant's dequantized weights: one model clone for every
  # variant (at full precision the weight rule computes nothing), so the compiled programs are shared.
  plain = ptq_model(model, pcfg)
  params_q = curvature_lib.quantized_params(qmodel, qvars_bn, bits_tree, rows.x[:1])
  if xcfg.curvature:
    entry["curvature"] = curvature(plain, {**qvars_bn, "params": params_q}, None, rows, info.num_groups,
                                   info.counts["train"], xcfg, seed, rng)
    entry["curvature"]["activation_bits_ignored"] = spec.a_bits is not None  # taken at the dequantized weights
    if bits in xcfg.density_bits and (variant or pcfg.variants[0]) == pcfg.variants[0]:
      entry["curvature"]["density"] = density_lib.group_densities(
          plain, {**qvars_bn, "params": params_q}, rows.x, rows.y, rows.group, info.num_groups,
          batch_size=xcfg.batch_size, num_iters=xcfg.density_iters, num_starts=xcfg.density_starts, seed=seed)
  if not is_full_precision(bits_tree):
    if qvars_bn.get("batch_stats") is not qvars.get("batch_stats"):  # folded BN: the grid follows the statistics
      params_q = curvature_lib.quantized_params(qmodel, qvars, bits_tree, rows.x[:1])
    entry["theory"] = theory(plain, qvars, params_q, bits_tree, rows, fwd, info.num_groups, xcfg,
                             {"curvature": xcfg.curvature_split, "forward": xcfg.forward_split})
  entry["wall_s"] = time.perf_counter() - t0
  return entry


def theory(model: nn.Module, qvars: Variables, params_q, bits_tree, rows, fwd, num_groups: int, xcfg,
           split_names: Mapping[str, str]) -> dict:
  """The second-order test of the theory (fqjax.explain.theory) at the dequantized weights ``params_q`` of one
  bits tree, weights only (``model``: a clone of the quantized model; its weight rule is not used).

  On the curvature rows: per group [G] the observed excess loss, g.d, d.H.d, the second-order estimate
  and ||g|| (one HVP and one gradient per group), and ||d||; on the forward split the observed
  excess loss. BatchNorm statistics are the trained ones (``qvars`` before recalibration), so d, the
  change of the weights, is the only change. Keys: the theory_lib names, "observed_excess_loss":
  {split name: [G]}, "batchnorm": "trained statistics", "activation_bits_ignored".
  """
  terms = theory_lib.second_order_terms(model, qvars, None, rows.x, rows.y, rows.group, num_groups,
                                        batch_size=xcfg.batch_size, params_q=params_q)
  out = {k: (v.tolist() if isinstance(v, np.ndarray) else float(v)) for k, v in terms.items()}
  out["observed_excess_loss"] = {split_names["curvature"]: out["excess_loss"]}
  if split_names["forward"] != split_names["curvature"]:
    held_out = theory_lib.excess_loss(model, qvars, None, fwd.x, fwd.y, fwd.group, num_groups,
                                      batch_size=xcfg.batch_size, params_q=params_q)
    out["observed_excess_loss"][split_names["forward"]] = np.asarray(held_out["excess_loss"]).tolist()
  out["batchnorm"] = "trained statistics"
  out["activation_bits_ignored"] = any(np.any(np.asarray(leaf) < quant.FULL_PRECISION_BITS)
                                       for path, leaf in traverse_util.flatten_dict(bits_tree).items()
                                       if path[-1] == "a")
  return out


def curvature(model: nn.Module, variables: Variables, bits_tree, split, num_groups: int, group_sizes: Sequence[int],
              xcfg, seed: int, rng: Optional[np.random.Generator] = None) -> dict:
  """Per-group gradient norms (of the mean gradient and mean per-sample) and Lanczos top-k Hessian eigenvalues
  at the (dequantized) weights, on ``split`` (already cut to ``xcfg.max_examples_per_group``).

  Activation bits are not a change of the parameters: curvature is taken at the dequantized
  weights only. group_sizes: [G] training-set sizes, for Spearman(size, value). With
  ``xcfg.size_matched_repeats`` = R > 0, "size_matched" adds the same gradient norm and
  top eigenvalue with every group subsampled (by ``rng``) to the smallest group's size m, R times: their
  mean and std [G] over the repeats, and "converged" [G] (every repeat's Lanczos run converged), so a size
  effect is not mistaken for a group effect.
  """
  rng = np.random.default_rng(seed) if rng is None else rng
  out = _curvature_of(model, variables, bits_tree, split, num_groups, xcfg, seed, k=xcfg.top_k,
                      trace_probes=xcfg.trace_probes)
  out["mean_per_sample_grad_norm"] = curvature_lib.group_mean_sample_gradient_norms(
      model, variables, split.x, split.y, split.group, num_groups, bits_tree=bits_tree, batch_size=xcfg.batch_size,
      activations="ignore")["mean_norms"].tolist()
  out.update(spearman_size_grad_norm=metrics.spearman(group_sizes, out["grad_norm"]),
             spearman_size_top_eigenvalue=metrics.spearman(group_sizes, out["top_eigenvalue"]))
  if xcfg.size_matched_repeats:
    counts = np.bincount(split.group, minlength=num_groups)
    m = int(counts[counts > 0].min())
    runs = [_curvature_of(model, variables, bits_tree, _subsample_groups(split, num_groups, m, rng), num_groups,
                          xcfg, seed, k=1, trace_probes=0) for _ in range(xcfg.size_matched_repeats)]
    out["size_matched"] = {"size": m, "repeats": xcfg.size_matched_repeats, **{
        key: {"mean": np.mean([r[key] for r in runs], axis=0).tolist(),
              "std": np.std([r[key] for r in runs], axis=0, ddof=1 if len(runs) > 1 else 0).tolist()}
        for key in ("grad_norm", "top_eigenvalue")},
        "converged": np.all([r["converged"] for r in runs], axis=0).tolist()}
  return out


def _curvature_of(model, variables, bits_tree, split, num_groups: int, xcfg, seed: int, *, k: int,
                  trace_probes: int) -> dict:
  eig = curvature_lib.group_top_eigenvalues(model, variables, split.x, split.y, split.group, num_groups,
                                            k=k, max_iters=xcfg.lanczos_max_iters, tol=xcfg.lanczos_tol,
                                            seed=seed, trace_probes=trace_probes, bits_tree=bits_tree,
                                            batch_size=xcfg.batch_size, activations="ignore")
  out = {"grad_norm": eig["grad_norm"].tolist(), "loss": eig["loss"].tolist(),
         "top_eigenvalue": eig["eigenvalues"][:, 0].tolist(), "top_k_eigenvalues": eig["eigenvalues"].tolist(),
         "num_hvps": eig["num_hvps"].tolist(), "converged": eig["converged"].tolist()}
  if trace_probes:
    out["trace"], out["trace_std"] = eig["trace"].tolist(), eig["trace_std"].tolist()
  return out


def _subsample_groups(split, num_groups: int, limit: Optional[int], rng: np.random.Generator):
  """``split`` with each group cut to at most ``limit`` rows (a random subset, in the split's order)."""
  if not limit:
    return split
  keep = []
  for g in range(num_groups):
    rows = np.flatnonzero(split.group == g)
    keep.append(rows if len(rows) <= limit else rng.choice(rows, size=limit, replace=False))
  return split.take(np.sort(np.concatenate(keep)))
