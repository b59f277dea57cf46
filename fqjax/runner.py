"""The study runner: stages that talk only through the workdir.

workdir/
  config.json          the config of the latest run
  results.json         see fqjax.results (written atomically after every stage)
  results.csv          one row per variant, bit-width, seed, split and group
  fqjax.log            the log
  checkpoints/seed_<s>/train/   orbax CheckpointManager of each training run

A stage whose outputs are in the workdir and were made from the same config
sections (a fingerprint) is skipped unless forced; a stale one is rerun.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fqjax import config as config_lib
from fqjax import data as data_lib
from fqjax import claims, layers, metrics, mitigate, parallel, ptq, quant, report, results, train
from fqjax.errors import FqjaxError, InputError, MissingFileError, WorkdirError
from fqjax.explain import curvature as curvature_lib
from fqjax.explain import forward as forward_lib
from fqjax.models import get_model

log = logging.getLogger("fqjax")

TRAIN_SECTIONS = ("data", "model", "train")
PTQ_SECTIONS = ("data", "model", "train", "ptq", "eval")
MITIGATE_SECTIONS = ("data", "model", "train", "ptq", "mitigate", "eval")
EXPLAIN_SECTIONS = ("data", "model", "train", "ptq", "explain", "eval")


class Study:
  """One study: config, workdir, loaded data, model and the results dict, shared by the stages."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, *, progress: bool = True):
    self.config = config
    self.workdir = workdir
    self.progress = progress
    self.seeds = config_lib.seeds_of(config)
    self.is_writer = jax.process_index() == 0
    t0 = time.perf_counter()
    self.splits = data_lib.load(config)
    self.data_s = time.perf_counter() - t0
    self.info = self.splits.info
    self.model = build_model(config, self.info)
    self.mesh = parallel.data_mesh(config.parallel.num_devices) if config.parallel.data_parallel else None
    sample = self.splits.train.x[:2]
    self.layer_names = layers.quant_layer_names(self.model, sample)
    self.changed = False  # whether a stage of this invocation did work (the report is redrawn only then)
    self.retrained: set = set()  # seeds whose training ran in this invocation: downstream entries are stale
    path = os.path.join(workdir, "results.json")
    self.results = results.read_results_file(path) if os.path.exists(path) else results.new_results()
    self.results.update({"config": config.to_dict(), "seeds": self.seeds,
                         "dataset": self.splits.to_dict(),
                         "model": {"name": resolved_model_name(config, self.info),
                                   "num_params": _num_params(self.model, sample),
                                   "layer_names": self.layer_names}})

  def ckpt_dir(self, seed: int, stage: str = "train") -> str:
    return os.path.abspath(os.path.join(self.workdir, "checkpoints", f"seed_{seed}", stage))

  def save(self) -> None:
    if not self.is_writer:
      return  # multi-host: only process 0 writes results
    self.results["updated"] = results.now()
    self.results["claims"] = claims.check_claims(self.results)  # always from the results as they stand
    results.validate(self.results)
    # config.json is written with the results, so it always describes what the workdir holds.
    results.atomic_write_text(os.path.join(self.workdir, "config.json"),
                              self.config.to_json_best_effort(indent=1) + "\n")
    results.write_json(os.path.join(self.workdir, "results.json"), self.results)
    results.write_csv(os.path.join(self.workdir, "results.csv"), results.csv_rows(self.results))


def resolved_model_name(config, info) -> str:
  if config.model.name != "auto":
    return config.model.name
  return "mlp" if len(info.input_shape) == 1 else "small_cnn"


def build_model(config, info):
  kwargs = dict(config.model.kwargs.to_dict()) if hasattr(config.model.kwargs, "to_dict") else dict(
      config.model.kwargs or {})
  if config.model.get("compute_dtype", "float32") == "bfloat16":
    kwargs["dtype"] = jnp.bfloat16
  return get_model(resolved_model_name(config, info), info.num_classes, **kwargs)


def _num_params(model, sample) -> int:
  shapes = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), sample)
  return int(sum(np.prod(a.shape) for a in jax.tree_util.tree_leaves(shapes["params"])))


# ----------------------------------------------------------------------------
# Stages
# ----------------------------------------------------------------------------

def stage_train(study: Study, force: bool) -> bool:
  cfg = study.config
  fp = config_lib.fingerprint(cfg, TRAIN_SECTIONS)
  section = study.results.get("train")
  if section is not None and section.get("fingerprint") != fp:
    if not force:
      raise InputError(
          f"{study.workdir} holds a training run made with a different data/model/train config. "
          "Use a new --workdir, or --force to delete those checkpoints and retrain.")
    section = None
  if section is None or force:
    section = {"fingerprint": fp, "per_seed": {}}
  ran = False
  for seed in study.seeds:
    key = str(seed)
    if force and key not in section["per_seed"]:
      shutil.rmtree(study.ckpt_dir(seed), ignore_errors=True)
    if key in section["per_seed"] and not force:
      if train.finished_epochs(study.ckpt_dir(seed)) == cfg.train.epochs - 1:
        log.info("train seed %d: done already, skipped", seed)
        continue
      log.warning("train seed %d: results.json has it but its finished checkpoint in %s is missing; retraining "
                  "this seed (resuming from an earlier epoch's checkpoint if one is left)", seed, study.ckpt_dir(seed))
    log.info("train seed %d: %d epochs of %s on %s", seed, cfg.train.epochs, study.results["model"]["name"],
             study.info.name)
    ran = True
    study.retrained.add(seed)
    out = train.fit(study.model, study.splits, cfg.train, seed, study.ckpt_dir(seed), mesh=study.mesh,
                    progress=study.progress)
    kw = dict(group_is_label=study.info.group_is_label, batch_size=cfg.eval.batch_size, mesh=study.mesh)
    val = train.evaluate(study.model, out["variables"], study.splits.val, study.info.num_groups, **kw)
    test = train.evaluate(study.model, out["variables"], study.splits.test, study.info.num_groups, **kw)
    section["per_seed"][key] = {"history": out["history"], "val": val, "test": test, "wall_s": out["wall_s"],
                                "epochs_run": out["epochs_run"], "resumed_from": out["resumed_from"],
                                "sample_counts": out["sample_counts"]}
    log.info("train seed %d: test accuracy %.4f, worst group %.4f, fairness violation %.4f", seed,
             test["accuracy"], test["worst_group_accuracy"], test["fairness_violation"])
    study.results["train"] = section
    study.save()  # after each seed, so a killed multi-seed run keeps finished seeds
  section["summary"] = metrics.summarize_over_seeds([section["per_seed"][str(s)]["test"] for s in study.seeds])
  study.results["train"] = section
  return ran


def load_trained_variables(study: Study, seed: int) -> dict:
  loaded = train.load_trained(study.model, study.splits, study.config.train, seed, study.ckpt_dir(seed))
  if loaded is None:
    raise MissingFileError(
        f"no finished training checkpoint for seed {seed} in {study.ckpt_dir(seed)}. Rerun with the train "
        "stage included (no --stages, or e.g. --stages=train,ptq): it trains exactly the seeds whose "
        "checkpoints are missing and reuses the others.")
  return loaded["variables"]


def stage_ptq(study: Study, force: bool) -> bool:
  cfg = study.config
  p = cfg.ptq
  fp = config_lib.fingerprint(cfg, PTQ_SECTIONS)
  section = study.results.get("ptq")
  done = section is not None and section.get("fingerprint") == fp and not study.retrained and all(
      str(s) in section["per_seed"] for s in study.seeds)
  if done and not force:
    log.info("ptq: done already for this config, skipped")
    return False
  bit_widths = [int(b) for b in p.bit_widths]
  specs = ptq.sweep_specs(bit_widths, p.a_bits)
  bits_trees = [s.bits_tree(study.layer_names) for s in specs]
  model = study.model.clone(per_channel=p.per_channel, fold_bn=p.fold_bn)
  num_params = study.results["model"]["num_params"]
  mode = ptq.resolve_mode(p.sweep_mode, num_params)
  test = study.splits.test
  section = {"fingerprint": fp, "bit_widths": bit_widths, "a_bits": p.a_bits, "per_channel": p.per_channel,
             "fold_bn": p.fold_bn, "sweep_mode": mode, "per_seed": {}}
  for seed in study.seeds:
    variables = load_trained_variables(study, seed)
    needs_calibration = any(s.a_bits is not None for s in specs)
    calib = ptq.calibration_batches(study.splits.train.x, p.calibration_batch_size, p.calibration_batches,
                                    seed) if needs_calibration else None
    variables = ptq.prepare_variables(model, variables, calib, p.calibration)
    t0 = time.perf_counter()
    logits = ptq.sweep_logits(model, variables, test.x, bits_trees, batch_size=cfg.eval.batch_size, mode=mode,
                              mesh=study.mesh)
    sweep_s = time.perf_counter() - t0
    # Reference: the trained model as it was trained (no folding, no quantizer in the graph).
    ref_logits = train.predict(study.model, {k: variables[k] for k in ("params", "batch_stats")}, test.x,
                               cfg.eval.batch_size, study.mesh)
    ref = metrics.group_metrics(ref_logits, test.y, test.group, study.info.num_groups,
                                group_is_label=study.info.group_is_label)
    by_bits = {}
    for i, (b, spec) in enumerate(zip(bit_widths, specs)):
      m = metrics.group_metrics(logits[i], test.y, test.group, study.info.num_groups,
                                group_is_label=study.info.group_is_label, reference=ref)
      size = quant.storage_size(variables["params"], layers.weight_bits_by_layer(spec, study.layer_names),
                                per_channel=p.per_channel)
      m["size_bytes"] = size["bytes"]
      if cfg.eval.bootstrap_resamples:
        correct = logits[i].argmax(-1) == test.y
        m["fairness_violation_ci"] = metrics.bootstrap_fairness_violation(
            correct, test.group, study.info.num_groups, num_resamples=cfg.eval.bootstrap_resamples, seed=seed)
      by_bits[str(b)] = m
    section["per_seed"][str(seed)] = by_bits
    section.setdefault("sweep_s", {})[str(seed)] = sweep_s
    log.info("ptq seed %d: %s", seed, ", ".join(
        f"{b}b acc {by_bits[str(b)]['accuracy']:.3f} fv {by_bits[str(b)]['fairness_violation']:.3f}"
        for b in bit_widths))
  section["summary"] = {str(b): metrics.summarize_over_seeds([section["per_seed"][str(s)][str(b)]
                                                              for s in study.seeds]) for b in bit_widths}
  study.results["ptq"] = section
  return True


def stage_explain(study: Study, force: bool) -> bool:
  """Forward chain (test split) and curvature (train split) per group, seed and bit-width."""
  cfg = study.config
  e, p = cfg.explain, cfg.ptq
  fp = config_lib.fingerprint(cfg, EXPLAIN_SECTIONS)
  section = study.results.get("explain")
  bit_widths = [int(b) for b in (e.bit_widths or p.bit_widths)]
  if section is None or section.get("fingerprint") != fp or force:
    section = {"fingerprint": fp, "bit_widths": bit_widths, "curvature_split": e.curvature_split,
               "forward_split": e.forward_split, "per_seed": {},
               "group_sizes": study.info.counts["train"]}
  specs = ptq.sweep_specs(bit_widths, p.a_bits)
  model = study.model.clone(per_channel=p.per_channel, fold_bn=p.fold_bn)
  fwd, curv = study.splits[e.forward_split], study.splits[e.curvature_split]
  ran = False
  for seed in study.seeds:
    if seed in study.retrained:
      section["per_seed"].pop(str(seed), None)
    entries = section["per_seed"].setdefault(str(seed), {})
    todo = [(b, s) for b, s in zip(bit_widths, specs) if str(b) not in entries]
    if not todo:
      continue
    ran = True
    variables = load_trained_variables(study, seed)
    calib = None
    if any(s.a_bits is not None for _, s in todo):
      calib = ptq.calibration_batches(study.splits.train.x, p.calibration_batch_size, p.calibration_batches, seed)
    variables = ptq.prepare_variables(model, variables, calib, p.calibration)
    for bits, spec in todo:
      t0 = time.perf_counter()
      tree = spec.bits_tree(study.layer_names)
      entry = forward_lib.forward_chain(model, variables, tree, fwd.x, fwd.y, fwd.group, study.info.num_groups,
                                    study.layer_names, batch_size=cfg.eval.batch_size)
      if e.curvature:
        entry["curvature"] = _curvature(model, variables, tree, curv, study, e, seed)
      entry["wall_s"] = time.perf_counter() - t0
      entries[str(bits)] = entry
      log.info("explain seed %d %d-bit: %.1f s", seed, bits, entry["wall_s"])
      study.results["explain"] = section
      study.save()
  study.results["explain"] = section
  return ran


def _curvature(model, variables, bits_tree, split, study, e, seed) -> dict:
  """Per-group gradient norms and Lanczos top-k Hessian eigenvalues at the (dequantized) weights."""
  num_groups = study.info.num_groups
  # Activation bits are not a change of params: curvature is taken at the dequantized weights only.
  kw = dict(bits=bits_tree, batch_size=e.batch_size, activations="ignore")
  grads = curvature_lib.group_gradient_norms(model, variables, split.x, split.y, split.group, num_groups, **kw)
  eig = curvature_lib.group_top_eigenvalues(model, variables, split.x, split.y, split.group, num_groups, k=e.top_k,
                                      max_iters=e.lanczos_max_iters, tol=e.lanczos_tol, seed=seed,
                                      trace_probes=e.trace_probes, **kw)
  sizes = study.info.counts["train"]
  out = {"grad_norm": grads["norms"].tolist(), "loss": grads["loss"].tolist(),
         "top_eigenvalue": eig["eigenvalues"][:, 0].tolist(), "top_k_eigenvalues": eig["eigenvalues"].tolist(),
         "num_hvps": eig["num_hvps"].tolist(), "converged": eig["converged"].tolist(),
         "spearman_size_grad_norm": curvature_lib.spearman(sizes, grads["norms"]),
         "spearman_size_top_eigenvalue": curvature_lib.spearman(sizes, eig["eigenvalues"][:, 0])}
  if e.trace_probes:
    out["trace"], out["trace_std"] = eig["trace"].tolist(), eig["trace_std"].tolist()
  return out


def stage_mitigate(study: Study, force: bool) -> bool:
  cfg = study.config
  m = cfg.mitigate
  fp = config_lib.fingerprint(cfg, MITIGATE_SECTIONS)
  section = study.results.get("mitigate")
  if section is None or section.get("fingerprint") != fp or force:
    if section is not None or force:
      log.info("mitigate: config changed or --force; earlier QAT checkpoints are deleted")
      for seed in study.seeds:
        shutil.rmtree(study.ckpt_dir(seed, "mitigate"), ignore_errors=True)
    section = {"fingerprint": fp, "bit_widths": list(m.bit_widths), "methods": list(m.methods), "per_seed": {}}
  ran = False
  t0 = time.perf_counter()
  for seed in study.seeds:
    fp_vars = None
    if seed in study.retrained and str(seed) in section["per_seed"]:
      section["per_seed"].pop(str(seed))
      shutil.rmtree(study.ckpt_dir(seed, "mitigate"), ignore_errors=True)
    entries = section["per_seed"].setdefault(str(seed), {})
    for method in m.methods:
      for bits in m.bit_widths:
        if str(bits) in entries.get(method, {}):
          continue
        ran = True
        if fp_vars is None:
          fp_vars = load_trained_variables(study, seed)
          fp_test = train.evaluate(study.model, fp_vars, study.splits.test, study.info.num_groups,
                                   group_is_label=study.info.group_is_label, batch_size=cfg.eval.batch_size,
                                   mesh=study.mesh)
        ckpt = os.path.join(study.ckpt_dir(seed, "mitigate"), f"{method}_w{bits}")
        r = mitigate.run_method(study, method, int(bits), seed, fp_vars, fp_test, ckpt)
        entries.setdefault(method, {})[str(bits)] = r
        log.info("mitigate seed %d %s %d-bit: acc %.3f worst %.3f fv %.3f (%.1f s)", seed, method, bits,
                 r["accuracy"], r["worst_group_accuracy"], r["fairness_violation"], r["train_s"])
        study.results["mitigate"] = section
        study.save()  # after every entry: a killed run keeps what it finished
  section.update(mitigate.summarize(section["per_seed"], m.methods, m.bit_widths, study.seeds))
  if ran:
    section["wall_s"] = time.perf_counter() - t0
  study.results["mitigate"] = section
  return ran


def stage_report(study: Study, force: bool) -> bool:
  if not (study.changed or force) and os.path.exists(os.path.join(study.workdir, "report.html")):
    log.info("report: no stage changed the results, skipped")
    return False
  if study.is_writer:  # multi-host: only process 0 writes
    out = report.write_report(study.workdir, study.results)
    log.info("report: %s", out["html"])
  return True


# Each stage returns whether it did any work (False: skipped, outputs already in the workdir).
STAGE_FUNCTIONS: dict[str, Callable[[Study, bool], bool]] = {
    "train": stage_train, "ptq": stage_ptq, "explain": stage_explain, "mitigate": stage_mitigate,
    "report": stage_report}


def available_stages() -> list[str]:
  return [s for s in config_lib.STAGES if s in STAGE_FUNCTIONS]


def run(config: ml_collections.ConfigDict, workdir: str, stages: Optional[Sequence[str]] = None, *,
        force: bool = False, progress: bool = True) -> dict:
  """Runs the selected stages (default: every available stage) and returns the results dict."""
  t_start = time.perf_counter()
  config_lib.validate_config(config)
  if stages is None:
    stages = available_stages()
  else:
    stages = config_lib.check_stages(stages)
  _check_workdir(workdir)
  study = Study(config, workdir, progress=progress)  # data errors stop here, before the workdir is made
  _make_workdir(workdir)
  _attach_log_file(workdir)
  study.results["timings"]["data"] = study.data_s
  last_run = {"data": study.data_s}  # this invocation's wall times; "skipped" for stages with nothing to do
  for stage in stages:
    t0 = time.perf_counter()
    try:
      ran = STAGE_FUNCTIONS[stage](study, force)
    except FqjaxError as e:
      log.error("stage %s: %s", stage, e)
      raise
    if ran:
      study.changed = True
      last_run[stage] = study.results["timings"][stage] = time.perf_counter() - t0
      log.info("stage %s finished in %.1f s", stage, last_run[stage])
      study.save()  # only after work: a run with nothing to do (or that fails) leaves the workdir as it was
    else:
      last_run[stage] = "skipped"
  study.results["last_run"] = {"stages": last_run, "total_s": time.perf_counter() - t_start}
  return study.results


def _check_workdir(workdir: str) -> None:
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise WorkdirError(f"--workdir {workdir} is a file, not a folder; choose another --workdir (or move the "
                       "file away).")


def _make_workdir(workdir: str) -> None:
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise WorkdirError(f"--workdir {workdir} cannot be created ({e.strerror}); choose a folder you can write "
                       "to.") from e


def _attach_log_file(workdir: str) -> None:
  path = os.path.abspath(os.path.join(workdir, "fqjax.log"))
  log.setLevel(logging.INFO)
  if not any(isinstance(h, logging.FileHandler) and h.baseFilename == path for h in log.handlers):
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)


def format_claims(res: dict) -> str:
  if "claims" not in res:
    return ""
  return "\n".join(f"  {name}: {c['verdict']}" + (f" ({c['why']})" if c.get("why") else "")
                   for name, c in res["claims"].items() if isinstance(c, dict))


def format_table(res: dict) -> str:
  """A plain-text table of the PTQ sweep: accuracy, worst group, fairness violation (mean +- std).

  A value with no data (a group with no test rows: mean null / NaN, n = 0) prints as ``empty``.
  """
  if "ptq" not in res:
    return "(no ptq results)"

  def value(x):
    try:
      x = float(x)
    except (TypeError, ValueError):
      return None
    return x if np.isfinite(x) else None

  def cell(ms):
    mean, std = value((ms or {}).get("mean")), value((ms or {}).get("std"))
    if mean is None:
      return "empty"
    return f"{mean:.3f}±{std:.3f}" if std is not None else f"{mean:.3f}"

  names = res["dataset"]["group_names"]
  lines = [f"{'bits':>4} {'size KB':>8} {'accuracy':>14} {'worst group':>14} {'fairness viol.':>15}  "
           + " ".join(f"{n[:8]:>8}" for n in names)]
  first_seed = str(res["seeds"][0])
  for b in res["ptq"]["bit_widths"]:
    s = res["ptq"]["summary"][str(b)]
    size = res["ptq"]["per_seed"][first_seed][str(b)]["size_bytes"] / 1024
    cell_k = lambda k: cell(s.get(k))
    groups = " ".join(f"{cell({'mean': g.get('mean')}):>8}" for g in s["groups"]["accuracy"])
    lines.append(f"{b:>4} {size:>8.1f} {cell_k('accuracy'):>14} {cell_k('worst_group_accuracy'):>14} "
                 f"{cell_k('fairness_violation'):>15}  {groups}")
  return "\n".join(lines)
