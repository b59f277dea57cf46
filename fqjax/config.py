"""Study configs: shared defaults for experiments/*.py and validation before any work starts.

A study config has these sections (each experiment file overrides a few fields):
  name:   study name (free text, shown in reports).
  seeds:  training seeds; each gives one trained model (init + data order). The
          data split stays fixed by data.seed, so the spread over seeds is the
          spread of training, not of the split.
  data:   fqjax.data.config.default_data_config() fields.
  model:  name (fqjax.models.MODEL_NAMES or "auto": MLP for [N, D] inputs,
          small_cnn for images) and kwargs for the module.
  train:  optimizer and the fair-base-model options (sampling, loss weights).
  ptq:    the post-training quantization sweep.
  explain: the forward chain and per-group curvature (fqjax.explain).
  mitigate: QAT / mixed precision / FairQAT ablation (fqjax.mitigate).
  eval:   batch size and bootstrap settings.
  distributed: jax.distributed settings for multi-host runs.
"""
from __future__ import annotations

import hashlib
import json
from typing import Iterable, Sequence

import ml_collections

from fqjax import losses, mitigate, ptq, quant, sampling
from fqjax.data.config import default_data_config, validate_data_config
from fqjax.errors import InputError
from fqjax.models import MODEL_NAMES, get_model
from fqjax.train import OPTIMIZERS, WEIGHT_TARGETS

STAGES = ("train", "ptq", "explain", "mitigate", "report")
COMPUTE_DTYPES = ("float32", "bfloat16")
CALIBRATIONS = quant.CALIBRATION_METHODS


def base_config() -> ml_collections.ConfigDict:
  """Defaults shared by every study; experiments/*.py start from this."""
  c = ml_collections.ConfigDict()
  c.name = "study"
  c.seeds = (0,)
  c.data = default_data_config()
  # compute_dtype "bfloat16": matmuls/convs in bf16 (GPU/TPU speed); params, BatchNorm statistics and
  # the quantizers stay float32, so the quantization grid is exact.
  c.model = ml_collections.ConfigDict({"name": "auto", "kwargs": ml_collections.ConfigDict(),
                                       "compute_dtype": "float32"})
  c.train = ml_collections.ConfigDict({
      "epochs": 10,
      "batch_size": 128,
      "optimizer": "sgd",
      "learning_rate": 0.1,
      "momentum": 0.9,
      "weight_decay": 5e-4,
      "warmup_epochs": 1.0,
      # Fair base model: group resampling and weighted cross-entropy (fqjax.sampling, fqjax.losses).
      "sampling": "none",
      "sampling_target": ml_collections.FieldReference(None, field_type=object),
      "loss_weights": "uniform",
      "weight_target": "group",
      "effective_beta": 0.999,
      "hardness_power": 1.0,
      "hardness_floor": 0.1,
      "eval_batch_size": 512,
  })
  c.ptq = ml_collections.ConfigDict({
      "bit_widths": (32, 8, 6, 5, 4, 3, 2),
      "a_bits": ml_collections.FieldReference(None, field_type=object),  # None, an int, or "same"
      "per_channel": True,
      "fold_bn": False,
      "calibration": "minmax",
      "calibration_batches": 8,
      "calibration_batch_size": 128,
      "sweep_mode": "auto",
  })
  c.explain = ml_collections.ConfigDict({
      "bit_widths": ml_collections.FieldReference(None, field_type=object),  # None: ptq.bit_widths
      "forward_split": "test",     # where the forward chain (weights -> softmax) is measured
      "curvature_split": "train",  # where the group losses' gradients and Hessians are taken
      "curvature": True,
      "batch_size": 256,
      "top_k": 5,
      "lanczos_max_iters": 100,
      "lanczos_tol": 1e-4,
      "trace_probes": 0,           # > 0: Hutchinson estimates of each group's Hessian trace
  })
  c.mitigate = mitigate.default_mitigate_config()
  c.eval = ml_collections.ConfigDict({"batch_size": 512, "bootstrap_resamples": 1000})
  # Data parallelism over all visible devices (all hosts): batches split, parameters replicated.
  c.parallel = ml_collections.ConfigDict({
      "data_parallel": False,
      "num_devices": ml_collections.FieldReference(None, field_type=int),  # None: every device
  })
  c.distributed = ml_collections.ConfigDict({
      "initialize": False,
      "coordinator_address": ml_collections.FieldReference(None, field_type=str),
      "num_processes": ml_collections.FieldReference(None, field_type=int),
      "process_id": ml_collections.FieldReference(None, field_type=int),
  })
  return c


def _fail(field: str, given, allowed: str) -> None:
  raise InputError(f"config.{field} is invalid: got {given!r}; allowed: {allowed}. "
                   f"Fix it in the experiment file or with --config.{field}=...")


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def check_stages(stages: Iterable[str]) -> list[str]:
  stages = list(stages)
  unknown = [s for s in stages if s not in STAGES]
  if unknown or not stages:
    raise InputError(f"--stages got {stages}; allowed: a comma-separated subset of {list(STAGES)}.")
  return [s for s in STAGES if s in stages]  # always in pipeline order


def validate_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks every field the runner uses; raises ValueError naming the field."""
  seeds = config.seeds
  if isinstance(seeds, int) and not isinstance(seeds, bool):
    seeds = (seeds,)
  if not isinstance(seeds, (list, tuple)) or not seeds or not all(_is_int(s) and s >= 0 for s in seeds):
    _fail("seeds", config.seeds, "a non-empty list of ints >= 0, e.g. (0, 1, 2)")
  if len(set(seeds)) != len(seeds):
    _fail("seeds", config.seeds, "distinct seeds")
  validate_data_config(config)
  if config.model.name not in MODEL_NAMES + ("auto",):
    _fail("model.name", config.model.name, f"one of {MODEL_NAMES + ('auto',)}")
  kwargs = config.model.kwargs.to_dict() if hasattr(config.model.kwargs, "to_dict") else dict(config.model.kwargs)
  if config.model.name != "auto":  # "auto" picks the model from the data, so its kwargs are checked then
    try:
      get_model(config.model.name, 2, **kwargs)
    except TypeError as e:
      _fail("model.kwargs", kwargs, f"fields of the {config.model.name} module ({e})")
  if config.model.compute_dtype not in COMPUTE_DTYPES:
    _fail("model.compute_dtype", config.model.compute_dtype, str(COMPUTE_DTYPES))
  t = config.train
  if not _is_int(t.epochs) or t.epochs < 1:
    _fail("train.epochs", t.epochs, "an int >= 1")
  for section, field in (("train", "batch_size"), ("train", "eval_batch_size"), ("eval", "batch_size"),
                         ("ptq", "calibration_batch_size")):
    if not _is_int(config[section][field]) or config[section][field] < 1:
      _fail(f"{section}.{field}", config[section][field], "an int >= 1")
  if t.optimizer not in OPTIMIZERS:
    _fail("train.optimizer", t.optimizer, f"one of {OPTIMIZERS}")
  if not float(t.learning_rate) > 0:
    _fail("train.learning_rate", t.learning_rate, "a number > 0")
  if t.sampling not in sampling.METHODS:
    _fail("train.sampling", t.sampling, f"one of {sampling.METHODS}")
  if t.loss_weights not in losses.WEIGHT_SCHEMES:
    _fail("train.loss_weights", t.loss_weights, f"one of {losses.WEIGHT_SCHEMES}")
  if t.weight_target not in WEIGHT_TARGETS:
    _fail("train.weight_target", t.weight_target, f"one of {WEIGHT_TARGETS}")
  p = config.ptq
  bits = p.bit_widths
  if not isinstance(bits, (list, tuple)) or not bits:
    _fail("ptq.bit_widths", bits, "a non-empty list of ints in 1..32, e.g. (32, 8, 4, 2)")
  for b in bits:
    if not _is_int(b) or not 1 <= b <= 32:
      _fail("ptq.bit_widths", bits, "ints in 1..32 (32 = full precision)")
  if len(set(bits)) != len(bits):
    _fail("ptq.bit_widths", bits, "distinct bit-widths")
  if p.a_bits is not None and p.a_bits != "same" and not (_is_int(p.a_bits) and 1 <= p.a_bits <= 32):
    _fail("ptq.a_bits", p.a_bits, "None, 'same' or an int in 1..32")
  if p.calibration not in CALIBRATIONS:
    _fail("ptq.calibration", p.calibration, f"one of {CALIBRATIONS}")
  if p.sweep_mode not in ptq.SWEEP_MODES:
    _fail("ptq.sweep_mode", p.sweep_mode, f"one of {ptq.SWEEP_MODES}")
  if not _is_int(p.calibration_batches) or p.calibration_batches < 1:
    _fail("ptq.calibration_batches", p.calibration_batches, "an int >= 1")
  e = config.explain
  if e.bit_widths is not None and (not isinstance(e.bit_widths, (list, tuple)) or not e.bit_widths or any(
      not _is_int(b) or not 1 <= b <= 32 for b in e.bit_widths)):
    _fail("explain.bit_widths", e.bit_widths, "None (= ptq.bit_widths) or a non-empty list of ints in 1..32")
  for field in ("forward_split", "curvature_split"):
    if e[field] not in ("train", "val", "test"):
      _fail(f"explain.{field}", e[field], "'train', 'val' or 'test'")
  for field in ("batch_size", "top_k", "lanczos_max_iters"):
    if not _is_int(e[field]) or e[field] < 1:
      _fail(f"explain.{field}", e[field], "an int >= 1")
  if not _is_int(e.trace_probes) or e.trace_probes < 0:
    _fail("explain.trace_probes", e.trace_probes, "an int >= 0")
  if not float(e.lanczos_tol) > 0:
    _fail("explain.lanczos_tol", e.lanczos_tol, "a number > 0")
  mitigate.validate_mitigate_config(config.mitigate)
  if not _is_int(config.eval.bootstrap_resamples) or config.eval.bootstrap_resamples < 0:
    _fail("eval.bootstrap_resamples", config.eval.bootstrap_resamples, "an int >= 0 (0 = no interval)")
  return config


def seeds_of(config) -> list[int]:
  return [config.seeds] if isinstance(config.seeds, int) else list(config.seeds)


def fingerprint(config: ml_collections.ConfigDict, sections: Sequence[str]) -> str:
  """A short hash of the named config sections: a stage's inputs, to detect stale outputs."""
  payload = {s: config[s].to_dict() if isinstance(config[s], ml_collections.ConfigDict) else config[s]
             for s in sections}
  text = json.dumps(payload, sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]
