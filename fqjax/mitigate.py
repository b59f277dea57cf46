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
from typing import Mapping, Optional

import jax
import ml_collections
import numpy as np

from fqjax import layers, metrics, ptq, quant, train
from fqjax.errors import InputError
from fqjax.layers import BitSpec

METHODS = ("ptq", "qat", "lsq_qat", "mp_qat", "sampling_qat", "weighted_qat", "fairqat")
BN_MODES = ("train", "freeze", "fold")


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


def default_mitigate_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "bit_widths": (8, 4, 3, 2),
      "methods": ("ptq", "qat", "mp_qat", "sampling_qat", "weighted_qat", "fairqat"),
      "a_bits": ml_collections.FieldReference(None, field_type=object),
      "edge_bits": 8,
      "epochs": 5,
      "batch_size": 64,
      "optimizer": "sgd",
      "learning_rate": 0.01,
      "momentum": 0.9,
      "weight_decay": 5e-4,
      "warmup_epochs": 0.0,
      "bn": "freeze",          # "train": batch statistics throughout; "freeze"/"fold" after bn_train_epochs
      "bn_train_epochs": 1,
      "sampling": "fairqat",
      "sampling_target": ml_collections.FieldReference("median", field_type=object),
      "loss_weights": "hardness",
      "weight_target": "group",
      "effective_beta": 0.999,
      "hardness_power": 1.0,
      "hardness_floor": 0.1,
  })


def validate_mitigate_config(m: ml_collections.ConfigDict) -> None:
  def fail(field, given, allowed):
    raise InputError(f"config.mitigate.{field} is invalid: got {given!r}; allowed: {allowed}.")

  if not m.methods or any(x not in METHODS for x in m.methods):
    fail("methods", m.methods, f"a non-empty subset of {METHODS}")
  if not m.bit_widths or any(not isinstance(b, int) or not 1 <= b <= 31 for b in m.bit_widths):
    fail("bit_widths", m.bit_widths, "a non-empty list of ints in 1..31 (quantized targets)")
  if m.bn not in BN_MODES:
    fail("bn", m.bn, str(BN_MODES))
  if not isinstance(m.edge_bits, int) or not 1 <= m.edge_bits <= 32:
    fail("edge_bits", m.edge_bits, "an int in 1..32")
  if not isinstance(m.epochs, int) or m.epochs < 1:
    fail("epochs", m.epochs, "an int >= 1")
  if m.a_bits is not None and not (isinstance(m.a_bits, int) and 1 <= m.a_bits <= 32):
    fail("a_bits", m.a_bits, "None or an int in 1..32")


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
  return model.clone(lsq=METHOD_PARTS[method].lsq, fold_bn=(m.bn == "fold"))


def run_method(study, method: str, bits: int, seed: int, fp_variables: Mapping, fp_test: Mapping,
               ckpt_dir: str) -> dict:
  """Trains (unless PTQ) and evaluates one (method, bit-width, seed) entry of the ablation table."""
  cfg = study.config
  m = cfg.mitigate
  spec = method_spec(method, bits, m)
  resolved = spec.resolve(study.layer_names)
  bits_tree = layers.bits_tree_from(resolved)
  model = qat_model(study.model, method, m)
  variables = {"params": fp_variables["params"], "batch_stats": fp_variables["batch_stats"]}
  if METHOD_PARTS[method].lsq:
    init = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(seed), x), study.splits.train.x[:2])
    ones = jax.tree_util.tree_map(lambda a: jax.numpy.ones(a.shape, a.dtype), init["params"])
    variables["params"] = layers.init_lsq_scales(_merge(ones, variables["params"]), resolved)
  if m.a_bits is not None:
    calib = ptq.calibration_batches(study.splits.train.x, cfg.ptq.calibration_batch_size,
                                    cfg.ptq.calibration_batches, seed)
    variables = ptq.prepare_variables(study.model, variables, calib, cfg.ptq.calibration)
  t0 = time.perf_counter()
  if METHOD_PARTS[method].trains:
    tcfg = qat_train_config(method, m, cfg.train)
    out = train.fit(model, study.splits, tcfg, seed, ckpt_dir, bits=bits_tree, init_variables=variables,
                    bn_train_epochs=None if m.bn == "train" else m.bn_train_epochs, progress=False,
                    extra_variables={k: v for k, v in variables.items() if k == layers.QUANT_STATS},
                    init_group_losses=_start_losses(study, model, variables, bits_tree, tcfg), mesh=study.mesh)
    variables = {**variables, **out["variables"]}
  train_s = time.perf_counter() - t0
  eval_vars = {**variables, layers.BITS: bits_tree}
  test = study.splits.test
  logits = train.predict(model, eval_vars, test.x, cfg.eval.batch_size, study.mesh)
  result = metrics.group_metrics(logits, test.y, test.group, study.info.num_groups,
                                 group_is_label=study.info.group_is_label, reference=fp_test)
  result["size_bytes"] = quant.storage_size(fp_variables["params"],
                                            {n: w for n, (w, _) in resolved.items()})["bytes"]
  result["train_s"] = train_s
  return result


def _start_losses(study, model, variables: Mapping, bits_tree, tcfg) -> Optional[list]:
  """Validation loss per group (or class) of the quantized starting point, for the first epoch's hardness weights."""
  if tcfg.loss_weights != "hardness":
    return None
  val = study.splits.val
  logits = train.predict(model, {**variables, layers.BITS: bits_tree}, val.x, study.config.eval.batch_size,
                         study.mesh)
  ids, n = (val.group, study.info.num_groups) if tcfg.weight_target == "group" else (val.y, study.info.num_classes)
  loss = metrics.per_sample_loss(logits, val.y)
  count = np.maximum(np.bincount(ids, minlength=n), 1)
  return (np.bincount(ids, weights=loss, minlength=n) / count).tolist()


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


def format_ablation(section: Mapping) -> str:
  """Plain-text ablation table: mean±std per method and bit-width; * marks the best per column.

  A cell with no data (mean null / NaN, n = 0: no test rows behind it) prints as ``empty``.
  """
  def value(x):
    try:
      x = float(x)
    except (TypeError, ValueError):
      return None
    return x if np.isfinite(x) else None

  lines = []
  header = f"{'bits':>4} {'method':<13} {'accuracy':>14} {'worst group':>14} {'fairness viol.':>15} " \
           f"{'size KB':>8} {'train s':>8}"
  lines.append(header)
  for b in section["bit_widths"]:
    best = section["best"][str(b)]
    for method in section["methods"]:
      s = section["summary"][method][str(b)]

      def cell(col, fmt="{:.3f}"):
        mean, std = value((s.get(col) or {}).get("mean")), value((s.get(col) or {}).get("std"))
        if mean is None:
          return "empty "
        mark = "*" if best.get(col) == method else " "
        return f"{fmt.format(mean)}±{fmt.format(std)}{mark}" if std is not None else f"{fmt.format(mean)}{mark}"

      def plain(col, scale=1.0):
        mean = value((s.get(col) or {}).get("mean"))
        return "empty" if mean is None else f"{mean * scale:.1f}"

      lines.append(f"{b:>4} {method:<13} {cell('accuracy'):>14} {cell('worst_group_accuracy'):>14} "
                   f"{cell('fairness_violation'):>15} {plain('size_bytes', 1 / 1024):>8} "
                   f"{plain('train_s'):>8}")
  return "\n".join(lines)
