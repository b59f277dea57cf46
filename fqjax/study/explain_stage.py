"""The explain stage's per-seed entry: the forward chain, per-group curvature and the second-order test of one
PTQ scheme at one bit-width, on the model that scheme deploys.

  entry = explain_entry(trained, config, bits, scheme)

Pure: trained variables and splits in, a JSON-ready dict out (fqjax.study.runner stores it).
The computing lives in fqjax.explain (forward, curvature, density, theory); this module picks the rows, builds
the quantized model of the scheme (fqjax.study.schemes) and turns arrays into lists.
"""
from __future__ import annotations

import time
from typing import Mapping, Optional, Sequence

import flax.linen as nn
import numpy as np
from flax import traverse_util

from fqjax.analysis import metrics
from fqjax.explain import curvature as curvature_lib
from fqjax.explain import density as density_lib
from fqjax.explain import forward as forward_lib
from fqjax.explain import theory as theory_lib
from fqjax.quantization import layers, quant
from fqjax.study import ptq
from fqjax.study.schemes import PTQScheme, ptq_schemes, quantization_for
from fqjax.study.seed import TrainedSeed

Variables = Mapping[str, Mapping]


def explain_entry(trained: TrainedSeed, config, bits: int, scheme: Optional[PTQScheme] = None) -> dict:
  """Forward chain (on config.explain.forward_split), per-group curvature and the second-order test (on
  config.explain.curvature_split) of one PTQ ``scheme`` (default: the primary one) at ``bits``.

  ``variables`` are the trained ones; the quantized start is built here (ptq.quantization_start), with the
  scheme's weight grid and BatchNorm mode. Returns forward_lib.forward_chain's dict plus "curvature"
  (when config.explain.curvature; with "density", fqjax.explain.density.group_densities, at
  config.explain.density_bits for the primary scheme), "theory" (quantized bit-widths; see ``theory``) and "wall_s".
  """
  t0 = time.perf_counter()
  xcfg, pcfg = config.explain, config.ptq
  model, variables, splits, layer_names, seed = (trained.model, trained.variables, trained.splits,
                                                 trained.layer_names, trained.seed)
  primary = ptq_schemes(config)[0]
  scheme = scheme or primary
  quantization = quantization_for(config, scheme=scheme)
  spec = ptq.sweep_specs([bits], pcfg.a_bits)[0]
  qmodel = quantization.apply(model)
  qvars = ptq.quantization_start(qmodel, variables, splits.train.x, pcfg, seed, calibrate=spec.a_bits is not None)
  bits_tree = spec.bits_tree(layer_names)
  qvars_bn = ptq.deployed_variables(qmodel, qvars, bits_tree, quantization, splits.train.x, pcfg, seed)
  fwd, info = splits[xcfg.forward_split], splits.info
  entry = forward_lib.forward_chain(qmodel, qvars_bn, bits_tree, fwd.x, fwd.y, fwd.group, info.num_groups,
                                    layer_names, batch_size=config.eval.batch_size)
  rng = np.random.default_rng(seed)
  rows = subsample_groups(splits[xcfg.curvature_split], info.num_groups, xcfg.max_examples_per_group, rng)
  # Derivatives are taken of the plain network at the scheme's dequantized weights: one model clone for every
  # scheme (at full precision the weight rule computes nothing), so the compiled programs are shared.
  plain = quantization_for(config).apply(model)
  params_q = curvature_lib.quantized_params(qmodel, qvars_bn, bits_tree, rows.x[:1])
  if xcfg.curvature:
    entry["curvature"] = curvature(plain, {**qvars_bn, "params": params_q}, None, rows, info.num_groups,
                                   info.counts["train"], xcfg, seed, rng)
    entry["curvature"]["activation_bits_ignored"] = spec.a_bits is not None  # taken at the dequantized weights
    if bits in xcfg.density_bits and scheme == primary:
      entry["curvature"]["density"] = density_lib.group_densities(
          plain, {**qvars_bn, "params": params_q}, rows.x, rows.y, rows.group, info.num_groups,
          batch_size=xcfg.batch_size, num_iters=xcfg.density_iters, num_starts=xcfg.density_starts, seed=seed)
  if not layers.is_full_precision_tree(bits_tree):
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
    runs = [_curvature_of(model, variables, bits_tree, subsample_groups(split, num_groups, m, rng), num_groups,
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


def subsample_groups(split, num_groups: int, limit: Optional[int], rng: np.random.Generator):
  """``split`` with each group cut to at most ``limit`` rows (a random subset, in the split's order)."""
  if not limit:
    return split
  keep = []
  for g in range(num_groups):
    rows = np.flatnonzero(split.group == g)
    keep.append(rows if len(rows) <= limit else rng.choice(rows, size=limit, replace=False))
  return split.take(np.sort(np.concatenate(keep)))
