"""Mitigation: quantization-aware training (QAT), LSQ, mixed precision and FairQAT, and the ablation table.

Every QAT variant fine-tunes the trained full-precision model (same start for
all methods, so differences come from the method) with fake-quantized weights
(and activations when ``mitigate.a_bits`` is set) and straight-through
gradients, through the same ``fqjax.training.train.fit`` loop as full-precision training.

Methods (``config.mitigate.methods``):
  ptq            post-training quantization, no training (the baseline), with ``mitigate.ptq_variant``
                 (default max/recalibrate: QAT's grid, BatchNorm re-estimated as QAT does in its first epoch)
  qat            QAT, uniform bit-width
  lsq_qat        QAT with learned step sizes (LSQ, Esser et al. 2020)
  mp_qat         QAT, mixed precision: first and last layer at ``edge_bits``
  qat_equal_size uniform QAT at the smallest bit-width whose model is at least as large as mp_qat's at the
                 target bit-width (mixed precision compared at equal size; "w_bits" records it)
  sampling_qat   QAT on group-resampled data (``mitigate.sampling``)
  weighted_qat   QAT with group-weighted cross-entropy (``mitigate.loss_weights``)
  fairqat        sampling + weighted cross-entropy + mixed-precision QAT
  fair_ft        full-precision fine-tuning with fairqat's sampling and weights, no quantization (the control
                 that tells "rebalancing helps any model" from "repairing quantization"); the same model at
                 every target bit-width, trained once per seed
  fair_alloc     PTQ with per-layer bits chosen by fqjax.study.allocate from per-group second-order sensitivities
                 (minimize the worst group's predicted excess loss) within ``mitigate.alloc_budget`` bytes
  blind_alloc    the same allocation on the whole training loss (group-blind, as HAWQ allocates)
  *_alloc_qat    the same allocations, then QAT (with fairqat's sampling and weights if ``alloc_rebalance``)

Budgets: with ``mitigate.budget`` "steps" every training method runs plain QAT's optimizer steps (each
epoch is cut or padded to the training split's rows, whatever the sampler draws); entries record "steps"
and "size_bytes". Selection: every setting of ``mitigate.grid`` is trained and the one with the best
validation worst-group accuracy (ties: validation accuracy, then grid order) is kept; only it is evaluated
on test, and "selection" records the grid, each setting's validation numbers and the choice.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import time
from typing import Mapping, Optional, Sequence

import jax
import ml_collections
import numpy as np

from fqjax import choices
from fqjax.quantization import layers, quant
from fqjax.training import losses, train
from fqjax.analysis import metrics
from fqjax.study import ptq
from fqjax.study.schemes import METHOD_PARTS, Method, PTQScheme, quantization_for  # noqa: F401
from fqjax.study.seed import TrainedSeed
from fqjax.quantization.layers import BitSpec

METHODS, BN_MODES = choices.MITIGATE_METHODS, choices.BN_MODES


def method_spec(method: str, bits: int, m: ml_collections.ConfigDict, params: Optional[Mapping] = None,
                layer_names: Sequence[str] = ()) -> BitSpec:
  """The bit layout ``method`` trains and evaluates at target ``bits``. qat_equal_size needs ``params`` and
  ``layer_names`` (the sizes it matches); fair_ft is full precision."""
  parts = METHOD_PARTS[method]
  a = m.a_bits if m.a_bits is None or m.a_bits < quant.FULL_PRECISION_BITS else None
  if not parts.quantized:
    return BitSpec.uniform(None, None)
  if parts.mixed_precision:
    return BitSpec.first_last(bits, edge_bits=m.edge_bits, a_bits=a)
  if method == "qat_equal_size":
    return BitSpec.uniform(equal_size_bits(bits, m, params, layer_names), a)
  return BitSpec.uniform(bits, a)


def equal_size_bits(bits: int, m: ml_collections.ConfigDict, params: Mapping, layer_names: Sequence[str]) -> int:
  """The smallest uniform weight bit-width b' >= bits whose model is at least as large as the mixed-precision
  one at ``bits`` (first and last layer at m.edge_bits); 32 when none below is."""
  size = lambda spec: quant.storage_size(params, layers.weight_bits_by_layer(spec, layer_names))["bytes"]
  target = size(BitSpec.first_last(bits, edge_bits=m.edge_bits))
  return next((b for b in range(bits, quant.FULL_PRECISION_BITS) if size(BitSpec.uniform(b)) >= target),
              quant.FULL_PRECISION_BITS)


def checkpoint_name(method: str, bits: int) -> str:
  """The checkpoint folder of a (method, bit-width) entry; fair_ft trains one model for every bit-width."""
  return method if not METHOD_PARTS[method].quantized else f"{method}_w{bits}"


def grid_settings(m: ml_collections.ConfigDict) -> list[dict]:
  """Every setting of ``m.grid`` ({field: values}) as {field: value} dicts, in grid order; [{}] without a grid."""
  grid = m.grid.to_dict() if hasattr(m.grid, "to_dict") else dict(m.grid or {})
  settings = [{}]
  for field, values in grid.items():
    settings = [{**s, field: v} for s in settings for v in values]
  return settings


def setting_label(setting: Mapping) -> str:
  """'epochs=5,learning_rate=0.01' (a checkpoint subfolder name; fields in the grid's sorted order); 'default'
  without a grid."""
  return ",".join(f"{k}={v}" for k, v in setting.items()) or "default"


def qat_train_config(method: str, m: ml_collections.ConfigDict, base_train: ml_collections.ConfigDict,
                     setting: Optional[Mapping] = None, num_train_rows: Optional[int] = None):
  """config.train for fine-tuning with ``method``: QAT hyperparameters (with a grid ``setting`` applied) plus its
  sampling / weighting; with the "steps" budget, rows_per_epoch = ``num_train_rows`` (plain QAT's epoch)."""
  parts = METHOD_PARTS[method]
  if parts.allocation and m.get("alloc_rebalance", False):
    parts = dataclasses.replace(parts, sampling=True, weighting=True)
  t = ml_collections.ConfigDict(base_train.to_dict())
  for key in ("epochs", "batch_size", "optimizer", "learning_rate", "momentum", "weight_decay", "warmup_epochs",
              "weight_target", "effective_beta", "hardness_power", "hardness_floor", "hardness_source",
              "hardness_cap", "hardness_ema"):
    t[key] = m[key]
  for key, value in (setting or {}).items():
    t[key] = type(t[key])(value) if isinstance(t[key], (int, float)) and not isinstance(t[key], bool) else value
  t.rows_per_epoch = num_train_rows if m.budget == "steps" else None
  t.sampling = m.sampling if parts.sampling else "none"
  t.sampling_target = m.sampling_target if parts.sampling else None
  t.loss_weights = m.loss_weights if parts.weighting else "uniform"
  return t


def run_entry(trained: TrainedSeed, config, method: str, bits: int, ckpt_dir: str, *, fp_test: Mapping,
              shared: Optional[dict] = None) -> dict:
  """One (method, bit-width, seed) entry of the ablation: fine-tune (unless PTQ) and evaluate on test.

  trained: the seed's trained model and variables; config: the study's config (mitigate, ptq for activation
  calibration, eval and train sections); fp_test: the trained model's test metrics (reference for accuracy
  drops); ckpt_dir: where the fine-tuning resumes from (one subfolder per grid setting); shared: a per-seed
  dict in which the allocation methods keep their sensitivity tables (computed once per seed). Returns group
  metrics + "size_bytes", "w_bits" (uniform methods' weight bits), "steps", "train_s", for trained methods
  "selection", and for allocation methods "allocation" (per-layer bits, budget, predicted excess losses).
  """
  mcfg, fp_variables, layer_names, splits = config.mitigate, trained.variables, trained.layer_names, trained.splits
  allocation = None
  if METHOD_PARTS[method].allocation:
    spec, allocation = _allocated_spec(trained, config, method, bits, {} if shared is None else shared)
  else:
    spec = method_spec(method, bits, mcfg, fp_variables["params"], layer_names)
  resolved = spec.resolve(layer_names)
  bits_tree = layers.bits_tree_from(resolved)
  quantization = quantization_for(config, method=method)
  qmodel = quantization.apply(trained.model)
  start = _start_variables(trained, qmodel, config, method, resolved)
  t0 = time.perf_counter()
  if METHOD_PARTS[method].trains:
    variables, steps, selection = _select(trained, qmodel, start, bits_tree, config, method, ckpt_dir)
  else:
    variables = ptq.deployed_variables(qmodel, start, bits_tree, quantization, splits.train.x, config.ptq,
                                       trained.seed)
    steps, selection = 0, None
  train_s = time.perf_counter() - t0
  test, info = splits.test, splits.info
  logits = train.predict(qmodel, {**variables, layers.BITS: bits_tree}, test.x, config.eval.batch_size, trained.mesh)
  result = metrics.group_metrics(logits, test.y, test.group, info.num_groups,
                                 group_is_label=info.group_is_label, reference=fp_test)
  result["size_bytes"] = quant.storage_size(fp_variables["params"],
                                            {n: w for n, (w, _) in resolved.items()})["bytes"]
  result.update(train_s=train_s, steps=steps, w_bits=None if spec.layers else spec.w_bits)
  if selection is not None:
    result["selection"] = selection
  if allocation is not None:
    result["allocation"] = allocation
  return result


def _allocated_spec(trained: TrainedSeed, config, method: str, bits: int, shared: dict) -> tuple[BitSpec, dict]:
  """The per-layer bits of an allocation method at target ``bits``: fqjax.study.allocate on the sensitivity table of
  ``mcfg.alloc_split`` (per group for "fair", one group of every row for "blind"; the table, and the allocation
  per bit-width, cached in ``shared``) within
  the byte budget of ``mcfg.alloc_budget``; with the additivity check of the chosen allocation (the predicted
  per-group sum against the measured excess loss of all layers quantized together, on the same split)."""
  from fqjax.study import allocate# scipy's MILP; only the allocation methods need it
  mcfg, fp_variables, layer_names, splits = config.mitigate, trained.variables, trained.layer_names, trained.splits
  kind = METHOD_PARTS[method].allocation
  if (kind, bits) in shared:  # the PTQ and QAT methods of one kind share the allocation and its check
    spec, allocation = shared[(kind, bits)]
    return spec, copy.deepcopy(allocation)
  split, info = splits[mcfg.alloc_split], splits.info
  group, num_groups = (split.group, info.num_groups) if kind == "fair" else (np.zeros_like(split.group), 1)
  # Sensitivities of the PTQ variant's grid (also for *_alloc_qat, which then fine-tune the allocation).
  qmodel = quantization_for(config, method=method, scheme=PTQScheme.parse(mcfg.ptq_variant)).apply(trained.model)
  if kind not in shared:
    shared[kind] = allocate.sensitivity(qmodel, fp_variables, split.x, split.y, group, num_groups, layer_names,
                                        tuple(int(b) for b in mcfg.alloc_bits))
  size = lambda spec: quant.storage_size(fp_variables["params"],
                                         layers.weight_bits_by_layer(spec, layer_names))["bytes"]
  budget = size(BitSpec.first_last(bits, edge_bits=mcfg.edge_bits) if mcfg.alloc_budget == "mixed_precision"
                else BitSpec.uniform(bits))
  chosen = allocate.allocate(shared[kind], budget, objective=mcfg.alloc_objective)
  a = mcfg.a_bits if mcfg.a_bits is None or mcfg.a_bits < quant.FULL_PRECISION_BITS else None
  spec = BitSpec(w_bits=None, a_bits=a, layers={name: (int(b), a) for name, b in chosen["bits"].items()})
  # Additivity: the per-layer sum against the measured excess loss of all layers quantized together.
  check = allocate.additivity(qmodel, fp_variables, split.x, split.y, group, num_groups, shared[kind],
                              [chosen["bits"]])[0]
  allocation = {"layer_bits": {k: int(v) for k, v in chosen["bits"].items()}, "budget_bytes": int(budget),
                "predicted_excess_loss": np.asarray(chosen["predicted"], np.float64).tolist(), "kind": kind,
                "measured_excess_loss": np.asarray(check["measured"], np.float64).tolist(),
                "additivity_max_abs_error": float(check["vs_measured"]["max_abs"])}
  shared[(kind, bits)] = (spec, allocation)
  return spec, copy.deepcopy(allocation)


def _start_variables(trained: TrainedSeed, qmodel, config, method: str, resolved) -> dict:
  """What every method starts from: the trained params and statistics (plus LSQ scales), activation ranges."""
  fp, x = trained.variables, trained.splits.train.x
  variables = {"params": fp["params"], "batch_stats": fp["batch_stats"]}
  if METHOD_PARTS[method].lsq:
    init = jax.eval_shape(lambda v: qmodel.init(jax.random.PRNGKey(trained.seed), v), x[:2])
    ones = jax.tree_util.tree_map(lambda a: jax.numpy.ones(a.shape, a.dtype), init["params"])
    variables["params"] = layers.init_lsq_scales(_merge(ones, variables["params"]), resolved)
  return ptq.quantization_start(trained.model, variables, x, config.ptq, trained.seed,
                                calibrate=config.mitigate.a_bits is not None)


def _select(trained: TrainedSeed, qmodel, start, bits_tree, config, method: str, ckpt_dir: str) -> tuple[dict, int, dict]:
  """Fine-tunes every grid setting (each in its own checkpoint subfolder) and keeps the one with the best
  validation worst-group accuracy (ties: validation accuracy, then grid order)."""
  mcfg, base_train, splits, mesh = config.mitigate, config.train, trained.splits, trained.mesh
  tried, best = [], None
  # The start's hardness depends on no grid field (losses.hardness_signal reads source and cap): one predict.
  hardness = _start_hardness(qmodel, start, bits_tree, splits, qat_train_config(method, mcfg, base_train), config.eval,
                              mesh)
  for setting in grid_settings(mcfg):
    tcfg = qat_train_config(method, mcfg, base_train, setting, len(splits.train))
    folder = os.path.join(ckpt_dir, setting_label(setting))
    tuning = train.FineTuning(init_variables=start, bits_tree=bits_tree,
                              extra_variables={k: v for k, v in start.items() if k == layers.QUANT_STATS},
                              bn_train_epochs=None if mcfg.bn == "train" else mcfg.bn_train_epochs,
                              init_group_losses=hardness)
    out = train.fit(qmodel, splits, tcfg, trained.seed, folder, tuning, mesh=mesh, progress=False)
    last = out["history"][-1]
    row = {"setting": dict(setting), "val_worst_group_accuracy": last["val_worst_group_accuracy"],
           "val_accuracy": last["val_accuracy"], "steps": out["steps"]}
    tried.append(row)
    score = (_finite_or(row["val_worst_group_accuracy"]), _finite_or(row["val_accuracy"]))
    if best is None or score > best[0]:
      best = (score, {**start, **out["variables"]}, row)
  _, variables, chosen = best
  selection = {"metric": "val_worst_group_accuracy", "grid": tried, "chosen": chosen["setting"]}
  return variables, chosen["steps"], selection


def _finite_or(x, default: float = -np.inf) -> float:
  return float(x) if x is not None and np.isfinite(x) else default


def _start_hardness(model, variables: Mapping, bits_tree, splits, tcfg, ecfg, mesh) -> Optional[list]:
  """The quantized starting point's validation hardness signal (losses.hardness_signal), for the first epoch's
  weights; None unless the method weights by hardness."""
  if tcfg.loss_weights != "hardness":
    return None
  val, info = splits.val, splits.info
  logits = train.predict(model, {**variables, layers.BITS: bits_tree}, val.x, ecfg.batch_size, mesh)
  ids, n = (val.group, info.num_groups) if tcfg.weight_target == "group" else (val.y, info.num_classes)
  return losses.hardness_signal(logits, val.y, ids, n, tcfg).tolist()


def _merge(init: Mapping, trained: Mapping) -> dict:
  """Trained values where they exist, init values (new LSQ scales) elsewhere."""
  return {k: _merge(v, trained[k]) if isinstance(v, Mapping) and k in trained else trained.get(k, v)
          for k, v in init.items()}
