"""Study configs: shared defaults for experiments/*.py and validation before any work starts.

A study config has these sections (each experiment file overrides a few fields):
  name:   study name (free text, shown in reports).
  seeds:  training seeds; each gives one trained model (init + data order). The
          data split stays fixed by data.seed, so the spread over seeds is the
          spread of training, not of the split.
  data:   fqjax.data.options.default_data_config() fields.
  model:  name (fqjax.models.MODEL_NAMES or "auto": MLP for [N, D] inputs,
          small_cnn for images) and kwargs for the module.
  train:  optimizer and the fair-base-model options (sampling, loss weights).
  ptq:    the post-training quantization sweep.
  explain: the forward chain and per-group curvature (fqjax.explain).
  mitigate: QAT / mixed precision / FairQAT ablation (fqjax.study.mitigate).
  eval:   batch size and bootstrap settings.
  claims: the collapse level and the practical-equivalence margin of the verdicts (fqjax.analysis.claims).
  tensorboard: write TensorBoard scalars under workdir/tensorboard.
  distributed: jax.distributed settings for multi-host runs.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import ml_collections
from ml_collections.config_dict import placeholder

from fqjax import choices
from fqjax.choices import STAGES
from fqjax.data.options import default_data_config, seeds_of, validate_data_config  # noqa: F401 (seeds_of: public here too)
from fqjax.errors import InputError
from fqjax.study.schemes import PTQScheme


def base_config() -> ml_collections.ConfigDict:
  """Defaults shared by every study (all of them: no other module holds config defaults);
  experiments/*.py start from this."""
  c = ml_collections.ConfigDict()
  c.name = "study"
  c.seeds = (0,)
  c.data = default_data_config()
  # compute_dtype "bfloat16": matmuls/convs in bf16 (GPU/TPU speed); params, BatchNorm statistics and
  # the quantizers stay float32, so the quantization grid is exact.
  c.model = ml_collections.ConfigDict({"name": "auto", "kwargs": ml_collections.ConfigDict(),
                                       "compute_dtype": "float32"})
  c.train = _train_defaults()
  c.ptq = ml_collections.ConfigDict({
      "bit_widths": (32, 8, 6, 5, 4, 3, 2),
      "a_bits": placeholder(object),  # None, an int, or "same"
      "per_channel": True,
      "fold_bn": False,
      "calibration": "minmax",
      "calibration_batches": 8,
      "calibration_batch_size": 128,
      "sweep_mode": "auto",
      # "<weight scale rule>/<BatchNorm mode>" (fqjax.study.ptq.parse_variant); the first is the primary one, whose
      # results are ptq.per_seed / ptq.summary and whose grid explain uses; the others go to ptq.variants.
      "variants": ("max/keep",),
      "bn_batches": 8,  # training batches (of calibration_batch_size) that BatchNorm recalibration averages
  })
  c.explain = ml_collections.ConfigDict({
      "bit_widths": placeholder(object),  # None: ptq.bit_widths
      "forward_split": "test",     # where the forward chain (weights -> softmax) is measured
      "curvature_split": "train",  # where the group losses' gradients and Hessians are taken
      "curvature": True,
      "batch_size": 256,
      "top_k": 5,
      "lanczos_max_iters": 100,
      "lanczos_tol": 1e-4,
      "trace_probes": 0,           # > 0: Hutchinson estimates of each group's Hessian trace
      "max_examples_per_group": placeholder(int),  # None: every example of the curvature split
      "size_matched_repeats": 3,   # > 0: curvature also with every group subsampled to the smallest one's size
      # Per-group Hessian spectral density (stochastic Lanczos quadrature) at these bit-widths, primary PTQ variant
      # only (empty: none): density_starts random starts of density_iters Lanczos steps per group.
      "density_bits": (32, 3),
      "density_iters": 20,
      "density_starts": 3,
  })
  c.mitigate = _mitigate_defaults()
  c.eval = ml_collections.ConfigDict({"batch_size": 512, "bootstrap_resamples": 1000})
  c.tensorboard = True  # scalars under workdir/tensorboard (fqjax.outputs.tensorboard; needs tensorboardX)
  # How verdicts treat noise and collapse (fqjax.analysis.claims.GENERAL_RULES); they change no computed entry.
  c.claims = ml_collections.ConfigDict({
      "collapse_fraction": 0.5,  # collapsed: accuracy below chance + fraction * (full precision - chance)
      "equivalence_margin": placeholder(float),  # None: 1 / median test-group size (one example)
  })
  # Data parallelism over all visible devices (all hosts): batches split, parameters replicated.
  c.parallel = ml_collections.ConfigDict({"data_parallel": False, "num_devices": placeholder(int)})  # None: all
  c.distributed = ml_collections.ConfigDict({
      "initialize": False,
      "coordinator_address": placeholder(str),
      "num_processes": placeholder(int),
      "process_id": placeholder(int),
  })
  return c


def _train_defaults() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "epochs": 10,
      "batch_size": 128,
      "optimizer": "sgd",
      "learning_rate": 0.1,
      "momentum": 0.9,
      "weight_decay": 5e-4,
      "warmup_epochs": 1.0,
      # Fair base model: group resampling and weighted cross-entropy (fqjax.training.sampling, fqjax.training.losses).
      "sampling": "none",
      "sampling_target": placeholder(object),
      "loss_weights": "uniform",
      "weight_target": "group",
      **_hardness_defaults(),
      "rows_per_epoch": placeholder(int),  # None: every row (or the sampler's draw); set by mitigate's step budget
      "eval_batch_size": 512,
  })


def _hardness_defaults() -> dict:
  """The loss-weight fields config.train and config.mitigate share. Hardness weights follow the validation loss
  capped at hardness_cap ("capped_loss"), the validation error rate ("error_rate") or the raw loss ("loss"),
  smoothed across epochs by an EMA (hardness_ema: the weight of the new value)."""
  return {"effective_beta": 0.999, "hardness_power": 1.0, "hardness_floor": 0.1, "hardness_source": "capped_loss",
          "hardness_cap": 3.0, "hardness_ema": 0.5}


def _mitigate_defaults() -> ml_collections.ConfigDict:
  """QAT fine-tuning of the trained model (fqjax.study.mitigate): methods, their bit-widths and settings."""
  return ml_collections.ConfigDict({
      "bit_widths": (8, 4, 3, 2),
      "methods": ("ptq", "qat", "mp_qat", "qat_equal_size", "sampling_qat", "weighted_qat", "fairqat", "fair_ft",
                  "blind_alloc", "fair_alloc", "blind_alloc_qat", "fair_alloc_qat"),
      "a_bits": placeholder(object),
      "edge_bits": 8,
      # The PTQ baseline's variant (fqjax.study.ptq.parse_variant): QAT's grid, with BatchNorm re-estimated as every QAT
      # method does in its first epoch.
      "ptq_variant": "max/recalibrate",
      "epochs": 5,
      # "steps": every method runs plain QAT's number of optimizer steps (resampled epochs are cut to it);
      # "epochs": every method runs `epochs` passes over its own (possibly longer) resampled data.
      "budget": "steps",
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
      **_hardness_defaults(),
      # Per-layer bit allocation (fqjax.study.allocate; methods *_alloc*): candidate bits per layer, the objective over the
      # groups' predicted excess losses, the byte budget at each target bit-width ("mixed_precision": the size of
      # the first/last-at-edge_bits model, i.e. equal size with mp_qat and fairqat; "uniform": the uniform model's),
      # the split the sensitivities are measured on, and whether the *_alloc_qat methods use fairqat's sampling and
      # weights.
      "alloc_bits": (2, 3, 4, 8),
      "alloc_objective": "worst_group",
      "alloc_budget": "mixed_precision",
      "alloc_split": "train",
      "alloc_rebalance": False,
      # Settings tried per (method, bit-width, seed); the one with the best validation worst-group accuracy is
      # kept, and only it is evaluated on test. {field of this section: values}; empty: no selection.
      "grid": ml_collections.ConfigDict({"learning_rate": (0.01, 0.03)}),
  })


def _fail(field: str, given, allowed: str) -> None:
  raise InputError(f"config.{field} is invalid: got {given!r}; allowed: {allowed}. "
                   f"Fix it in the experiment file or with --config.{field}=...{_quoting_hint(field, given)}")


def _quoting_hint(field: str, given) -> str:
  """How to quote a tuple of strings on the command line, when the value looks like an unquoted one: a shell
  turns --config.x=(a,b) into the one string '(a,b)'."""
  items = given if isinstance(given, (list, tuple)) else (given,)
  text = next((x for x in items if isinstance(x, str) and (x[:1] in "([" or "," in x)), None)
  if text is None:
    return ""
  names = [n.strip(" '\"") for n in text.strip("()[]").split(",") if n.strip(" '\"")]
  quoted = ",".join(f"'{n}'" for n in names) + ("," if len(names) == 1 else "")
  return f" Strings in a tuple need quotes, and the tuple needs shell quotes: --config.{field}=\"({quoted})\""


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_stages(stages: Iterable[str]) -> list[str]:
  stages = list(stages)
  unknown = [s for s in stages if s not in STAGES]
  if unknown or not stages:
    raise InputError(f"--stages got {stages}; allowed: a comma-separated subset of {list(STAGES)}.")
  return [s for s in STAGES if s in stages]  # always in pipeline order


def validate_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks every field the runner uses; raises InputError (a ValueError) naming the field."""
  name = config.get("name")
  # The default workdir is runs/<name>: a name is one folder name, never a path out of runs/.
  if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
    _fail("name", name, "a non-empty folder name without path separators, e.g. 'digits' (the default workdir "
          "is runs/<name>; give --workdir=PATH to write elsewhere)")
  seeds = config.seeds
  if isinstance(seeds, int) and not isinstance(seeds, bool):
    seeds = (seeds,)
  if not isinstance(seeds, (list, tuple)) or not seeds or not all(_is_int(s) and s >= 0 for s in seeds):
    _fail("seeds", config.seeds, "a non-empty list of ints >= 0, e.g. (0, 1, 2)")
  if len(set(seeds)) != len(seeds):
    _fail("seeds", config.seeds, "distinct seeds")
  validate_data_config(config)
  _validate_model(config.model)
  for section, field in (("train", "batch_size"), ("train", "eval_batch_size"), ("eval", "batch_size"),
                         ("ptq", "calibration_batch_size"), ("ptq", "calibration_batches"), ("train", "epochs"),
                         ("explain", "batch_size"), ("explain", "top_k"), ("explain", "lanczos_max_iters"),
                         ("mitigate", "epochs")):
    if not _is_int(config[section][field]) or config[section][field] < 1:
      _fail(f"{section}.{field}", config[section][field], "an int >= 1")
  for section in ("train", "mitigate"):
    _validate_training(section, config[section])
  _validate_ptq(config.ptq)
  _validate_explain(config.explain)
  _validate_mitigate(config.mitigate)
  if not _is_int(config.eval.bootstrap_resamples) or config.eval.bootstrap_resamples < 0:
    _fail("eval.bootstrap_resamples", config.eval.bootstrap_resamples, "an int >= 0 (0 = no interval)")
  _validate_claims(config.claims)
  if not isinstance(config.get("tensorboard", True), bool):
    _fail("tensorboard", config.tensorboard, "True or False")
  return config


def _one_of(field: str, value, allowed: Sequence) -> None:
  if value not in allowed:
    _fail(field, value, f"one of {tuple(allowed)}")


def _validate_model(m) -> None:
  """A zoo name, "auto", or "package.module:factory" (a custom Linen model). Its kwargs are checked when the
  runner builds the model (fqjax.models.build_model), after the data are read and before any work: building
  needs JAX, which validation does not load."""
  custom = isinstance(m.name, str) and ":" in m.name
  if not custom:
    _one_of("model.name", m.name, choices.MODEL_NAMES + ("auto",))
  _one_of("model.compute_dtype", m.compute_dtype, choices.COMPUTE_DTYPES)


def _validate_training(section: str, t) -> None:
  """The optimizer and fair-training fields that config.train and config.mitigate share."""
  _one_of(f"{section}.optimizer", t.optimizer, choices.OPTIMIZERS)
  if not _is_number(t.learning_rate) or not 0 < float(t.learning_rate) < float("inf"):
    _fail(f"{section}.learning_rate", t.learning_rate, "a finite number > 0")
  _one_of(f"{section}.sampling", t.sampling, choices.SAMPLING_METHODS)
  _one_of(f"{section}.loss_weights", t.loss_weights, choices.WEIGHT_SCHEMES)
  _one_of(f"{section}.weight_target", t.weight_target, choices.WEIGHT_TARGETS)
  _one_of(f"{section}.hardness_source", t.hardness_source, choices.HARDNESS_SOURCES)
  if not _is_number(t.hardness_cap) or not t.hardness_cap > 0:
    _fail(f"{section}.hardness_cap", t.hardness_cap, "a number > 0 (the largest validation loss a weight sees)")
  if not _is_number(t.hardness_ema) or not 0 < t.hardness_ema <= 1:
    _fail(f"{section}.hardness_ema", t.hardness_ema, "a number in (0, 1] (1: no smoothing across epochs)")


def _bit_list(field: str, bits, lo: int, hi: int, example: str) -> None:
  if not isinstance(bits, (list, tuple)) or not bits or any(not _is_int(b) or not lo <= b <= hi for b in bits):
    _fail(field, bits, f"a non-empty list of ints in {lo}..{hi}, e.g. {example}")
  if len(set(bits)) != len(bits):
    _fail(field, bits, "distinct bit-widths")


def _validate_ptq(p) -> None:
  _bit_list("ptq.bit_widths", p.bit_widths, 1, 32, "(32, 8, 4, 2) (32 = full precision)")
  variants = p.variants
  if not isinstance(variants, (list, tuple)) or not variants or len(set(variants)) != len(variants):
    _fail("ptq.variants", variants, "a non-empty list of distinct '<scale>/<bn>' names, e.g. ('max/keep', "
          "'mse/recalibrate')")
  for v in variants:
    _scheme("ptq.variants", v, given=variants)
  if not _is_int(p.bn_batches) or p.bn_batches < 1:
    _fail("ptq.bn_batches", p.bn_batches, "an int >= 1")
  if p.a_bits is not None and p.a_bits != "same" and not (_is_int(p.a_bits) and 1 <= p.a_bits <= 32):
    _fail("ptq.a_bits", p.a_bits, "None, 'same' or an int in 1..32")
  _one_of("ptq.calibration", p.calibration, choices.CALIBRATIONS)
  _one_of("ptq.sweep_mode", p.sweep_mode, choices.SWEEP_MODES)


def _scheme(field: str, text, given=None) -> PTQScheme:
  """The PTQScheme a config string names, or InputError naming ``field``."""
  try:
    return PTQScheme.parse(text)
  except ValueError:
    _fail(field, text if given is None else given, f"'<scale>/<bn>' with scale in {choices.WEIGHT_SCALE_RULES} and "
          f"bn in {choices.PTQ_BN_MODES}")


def _validate_explain(e) -> None:
  if e.bit_widths is not None:
    _bit_list("explain.bit_widths", e.bit_widths, 1, 32, "(32, 4, 2), or None (= ptq.bit_widths)")
  for field in ("forward_split", "curvature_split"):
    _one_of(f"explain.{field}", e[field], choices.SPLITS)
  for field in ("trace_probes", "size_matched_repeats"):
    if not _is_int(e[field]) or e[field] < 0:
      _fail(f"explain.{field}", e[field], "an int >= 0")
  for field in ("density_iters", "density_starts"):
    if not _is_int(e[field]) or e[field] < 1:
      _fail(f"explain.{field}", e[field], "an int >= 1")
  if not isinstance(e.density_bits, (list, tuple)) or any(not _is_int(b) or not 1 <= b <= 32 for b in e.density_bits):
    _fail("explain.density_bits", e.density_bits, "a list of bit-widths in 1..32 (empty: no density), e.g. (32, 3)")
  if e.max_examples_per_group is not None and (not _is_int(e.max_examples_per_group) or e.max_examples_per_group < 1):
    _fail("explain.max_examples_per_group", e.max_examples_per_group, "None or an int >= 1")
  if not float(e.lanczos_tol) > 0:
    _fail("explain.lanczos_tol", e.lanczos_tol, "a number > 0")


def _validate_claims(c) -> None:
  if not _is_number(c.collapse_fraction) or not 0 < c.collapse_fraction < 1:
    _fail("claims.collapse_fraction", c.collapse_fraction, "a number strictly between 0 and 1 (0.5: the midpoint "
          "between chance and full-precision accuracy)")
  margin = c.equivalence_margin
  if margin is not None and (not _is_number(margin) or not margin >= 0):
    _fail("claims.equivalence_margin", margin, "None (one test example of the median group) or a number >= 0")


def _validate_mitigate(m) -> None:
  if not m.methods or any(x not in choices.MITIGATE_METHODS for x in m.methods):
    _fail("mitigate.methods", m.methods, f"a non-empty subset of {choices.MITIGATE_METHODS}")
  _bit_list("mitigate.bit_widths", m.bit_widths, 1, 31, "(4, 2) (quantized targets)")
  _one_of("mitigate.bn", m.bn, choices.BN_MODES)
  if not _is_int(m.edge_bits) or not 1 <= m.edge_bits <= 32:
    _fail("mitigate.edge_bits", m.edge_bits, "an int in 1..32")
  if m.a_bits is not None and not (_is_int(m.a_bits) and 1 <= m.a_bits <= 32):
    _fail("mitigate.a_bits", m.a_bits, "None or an int in 1..32")
  _one_of("mitigate.budget", m.budget, choices.BUDGETS)
  _bit_list("mitigate.alloc_bits", m.alloc_bits, *choices.ALLOC_BITS_RANGE, "(2, 3, 4, 8)")
  _one_of("mitigate.alloc_objective", m.alloc_objective, choices.ALLOC_OBJECTIVES)
  _one_of("mitigate.alloc_budget", m.alloc_budget, choices.ALLOC_BUDGETS)
  _one_of("mitigate.alloc_split", m.alloc_split, ("train", "val"))
  _scheme("mitigate.ptq_variant", m.ptq_variant)
  grid = m.grid.to_dict() if hasattr(m.grid, "to_dict") else dict(m.grid or {})
  for field, values in grid.items():
    if field not in choices.GRID_FIELDS:
      _fail(f"mitigate.grid.{field}", values, f"a field of {choices.GRID_FIELDS}")
    if not isinstance(values, (list, tuple)) or not values or not all(_is_number(v) for v in values):
      _fail(f"mitigate.grid.{field}", values, "a non-empty list of numbers, e.g. (0.01, 0.03)")
