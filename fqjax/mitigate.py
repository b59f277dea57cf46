"""Mitigation: quantization-aware training (QAT), LSQ, mixed precision and FairQAT, and the ablation table.

Every QAT variant fine-tunes the trained full-precision model (same start for
all methods, so differences come from the method) with fake-quantized weights
(and activations when ``mitigate.a_bits`` is set) and straight-through
gradients, through the same ``fqjax.train.fit`` loop as full-precision training.

Methods (``config.mitigate.methods``):
  ptq            post-training quantization, no training (the baseline)
  qat            QAT, uniform bit-width
  lsq_qat        QAT with learned step sizes (LSQ, Esser et al. 2020)
  mp_qat         QAT, mixed precision: first and last layer at ``edge_bits``
  sampling_qat   QAT on group-resampled data (``mitigate.sampling``)
  weighted_qat   QAT with group-weighted cross-entropy (``mitigate.loss_weights``)
  fairqat        sampling + weighted cross-entropy + mixed-precision QAT
"""
from __future__ import annotations

import dataclasses
import time
from typing import Mapping, Optional, Sequence

import jax
import ml_collections
import numpy as np

from fqjax import choices, layers, metrics, quant, stages, train
from fqjax.layers import BitSpec

METHODS, BN_MODES = choices.MITIGATE_METHODS, choices.BN_MODES


@dataclasses.dataclass(frozen=True)
class Method:
  """What a method changes: precision layout, data sampling, loss weights, learned scales, training."""
  mixed_precision: bool = False
  sampling: bool = False
  weighting: bool = False
  lsq: bool = False
  trains: bool = True


METHOD_PARTS = {
    "ptq": Method(trains=False),
    "qat": Method(),
    "lsq_qat": Method(lsq=True),
    "mp_qat": Method(mixed_precision=True),
    "sampling_qat": Method(sampling=True),
    "weighted_qat": Method(weighting=True),
    "fairqat": Method(mixed_precision=True, sampling=True, weighting=True),
}


def method_spec(method: str, bits: int, m: ml_collections.ConfigDict) -> BitSpec:
  parts = METHOD_PARTS[method]
  a = m.a_bits if m.a_bits is None or m.a_bits < quant.FULL_PRECISION_BITS else None
  if parts.mixed_precision:
    return BitSpec.first_last(bits, edge_bits=m.edge_bits, a_bits=a)
  return BitSpec.uniform(bits, a)


def qat_train_config(method: str, m: ml_collections.ConfigDict, base_train: ml_collections.ConfigDict):
  """config.train for fine-tuning with ``method``: QAT hyperparameters plus its sampling / weighting."""
  parts = METHOD_PARTS[method]
  t = ml_collections.ConfigDict(base_train.to_dict())
  for key in ("epochs", "batch_size", "optimizer", "learning_rate", "momentum", "weight_decay", "warmup_epochs",
              "weight_target", "effective_beta", "hardness_power", "hardness_floor"):
    t[key] = m[key]
  t.sampling = m.sampling if parts.sampling else "none"
  t.sampling_target = m.sampling_target if parts.sampling else None
  t.loss_weights = m.loss_weights if parts.weighting else "uniform"
  return t


def qat_model(model, method: str, m: ml_collections.ConfigDict):
  """The model clone a method trains and evaluates: LSQ scales, BN folding per ``mitigate.bn``."""
  return layers.configured(model, lsq=METHOD_PARTS[method].lsq, fold_bn=(m.bn == "fold"))


def run_entry(model, fp_variables: Mapping, fp_test: Mapping, splits, mcfg, pcfg, ecfg, base_train,
              layer_names: Sequence[str], method: str, bits: int, seed: int, ckpt_dir: str, *, mesh=None) -> dict:
  """One (method, bit-width, seed) entry of the ablation: fine-tune (unless PTQ) and evaluate on test.

  model: the trained architecture; fp_variables: its trained variables; fp_test: its test
  metrics (reference for accuracy drops); mcfg / pcfg / ecfg / base_train: config.mitigate,
  config.ptq (activation calibration), config.eval and config.train; ckpt_dir: where the
  fine-tuning resumes from. Returns group metrics + "size_bytes" and "train_s".
  """
  spec = method_spec(method, bits, mcfg)
  resolved = spec.resolve(layer_names)
  bits_tree = layers.bits_tree_from(resolved)
  qmodel = qat_model(model, method, mcfg)
  variables = {"params": fp_variables["params"], "batch_stats": fp_variables["batch_stats"]}
  if METHOD_PARTS[method].lsq:
    init = jax.eval_shape(lambda x: qmodel.init(jax.random.PRNGKey(seed), x), splits.train.x[:2])
    ones = jax.tree_util.tree_map(lambda a: jax.numpy.ones(a.shape, a.dtype), init["params"])
    variables["params"] = layers.init_lsq_scales(_merge(ones, variables["params"]), resolved)
  variables = stages.quantization_start(model, variables, splits.train.x, pcfg, seed, calibrate=mcfg.a_bits is not None)
  t0 = time.perf_counter()
  if METHOD_PARTS[method].trains:
    tcfg = qat_train_config(method, mcfg, base_train)
    out = train.fit(qmodel, splits, tcfg, seed, ckpt_dir, bits_tree=bits_tree, init_variables=variables,
                    bn_train_epochs=None if mcfg.bn == "train" else mcfg.bn_train_epochs, progress=False,
                    extra_variables={k: v for k, v in variables.items() if k == layers.QUANT_STATS},
                    init_group_losses=_start_losses(qmodel, variables, bits_tree, splits, tcfg, ecfg, mesh),
                    mesh=mesh)
    variables = {**variables, **out["variables"]}
  train_s = time.perf_counter() - t0
  test, info = splits.test, splits.info
  logits = train.predict(qmodel, {**variables, layers.BITS: bits_tree}, test.x, ecfg.batch_size, mesh)
  result = metrics.group_metrics(logits, test.y, test.group, info.num_groups,
                                 group_is_label=info.group_is_label, reference=fp_test)
  result["size_bytes"] = quant.storage_size(fp_variables["params"],
                                            {n: w for n, (w, _) in resolved.items()})["bytes"]
  result["train_s"] = train_s
  return result


def _start_losses(model, variables: Mapping, bits_tree, splits, tcfg, ecfg, mesh) -> Optional[list]:
  """Validation loss per group (or class) of the quantized starting point, for the first epoch's hardness weights.

  An id with no validation rows gets 0 (as fqjax.train does with NaN losses).
  """
  if tcfg.loss_weights != "hardness":
    return None
  val, info = splits.val, splits.info
  logits = train.predict(model, {**variables, layers.BITS: bits_tree}, val.x, ecfg.batch_size, mesh)
  ids, n = (val.group, info.num_groups) if tcfg.weight_target == "group" else (val.y, info.num_classes)
  return np.nan_to_num(metrics.group_mean(metrics.per_sample_loss(logits, val.y), ids, n), nan=0.0).tolist()


def _merge(init: Mapping, trained: Mapping) -> dict:
  """Trained values where they exist, init values (new LSQ scales) elsewhere."""
  return {k: _merge(v, trained[k]) if isinstance(v, Mapping) and k in trained else trained.get(k, v)
          for k, v in init.items()}


TABLE_COLUMNS = (("accuracy", "max"), ("worst_group_accuracy", "max"), ("fairness_violation", "min"),
                 ("size_bytes", "min"), ("train_s", "min"))


def summarize(per_seed: Mapping, methods, bit_widths, seeds) -> dict:
  """{method: {bits: summary over seeds}} plus the best method per column and bit-width.

  Methods whose value is missing (NaN: no test rows behind it) are not candidates for "best";
  a column with no value for any method has best None.
  """
  summary: dict = {}
  for method in methods:
    summary[method] = {}
    for b in bit_widths:
      runs = [per_seed[str(s)][method][str(b)] for s in seeds]
      s = metrics.summarize_over_seeds(runs)
      s["size_bytes"] = metrics.mean_std([r["size_bytes"] for r in runs])
      s["train_s"] = metrics.mean_std([r["train_s"] for r in runs])
      summary[method][str(b)] = s
  best = {}
  for b in bit_widths:
    best[str(b)] = {}
    for column, direction in TABLE_COLUMNS:
      values = {mth: summary[mth][str(b)][column]["mean"] for mth in methods}
      values = {k: v for k, v in values.items() if v is not None and np.isfinite(v)}  # no data: not a candidate
      pick = max if direction == "max" else min
      best[str(b)][column] = pick(values, key=lambda k: values[k]) if values else None
  return {"summary": summary, "best": best}
