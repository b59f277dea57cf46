"""The study runner: the only code that reads and writes a workdir.

workdir/
  config.json     the config of the latest run (written with the results)
  results.json    see fqjax.outputs.results; results.csv: one row per variant, bits, seed, split and group
  fqjax.log       the log of every run; .fqjax.lock: the workdir lock (pid and start of its holder)
  checkpoints/seed_<s>/train/                     the training run (orbax), with KEY: its cache key
  checkpoints/seed_<s>/mitigate/<method>_w<bits>/<grid setting>/ fine-tuning runs (fair_ft: mitigate/fair_ft/), KEY
  report.md, report.html, figures/, tensorboard/ (scalars, with config.tensorboard)

One cache rule for every stage, per seed: an entry is reused only when its key (fqjax.study.cache:
config sections, data identity, the upstream training entry) matches. Entries of
seeds that are no longer configured, and entries whose key no longer matches, are dropped when
the workdir is opened; summaries over seeds are computed from exactly the configured seeds, and
only when every configured seed has its entry. ``--force`` recomputes the selected stages.
A second process on the same workdir is refused (an OS file lock, released on exit or crash).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from typing import Callable, Optional, Sequence

import jax
import ml_collections

from fqjax import data as data_lib
from fqjax import models, report
from fqjax.analysis import claims, summaries
from fqjax.errors import FqjaxError, InputError, MissingFileError
from fqjax.outputs import results
from fqjax.study import config as config_lib
from fqjax.study import explain_stage, mitigate, ptq
from fqjax.outputs import workdir as workdir_lib
from fqjax.study.cache import check_trained_model, data_identity, stage_key, train_key, train_key_parts
from fqjax.study.schemes import ptq_schemes
from fqjax.study.seed import TrainedSeed
from fqjax.training import checkpoints, parallel, train

log = logging.getLogger("fqjax")


# ----------------------------------------------------------------------------
# One run
# ----------------------------------------------------------------------------

@dataclasses.dataclass
class _Run:
  """What the runner holds during one run; stages never see it (they get explicit arguments)."""
  config: ml_collections.ConfigDict
  workdir: str
  splits: data_lib.Splits  # the first seed's: the model, layer names and dataset description come from it
  model: object
  layer_names: list
  mesh: object
  data_id: str
  progress: bool
  force: bool
  results: dict = dataclasses.field(default_factory=dict)
  by_seed: dict = dataclasses.field(default_factory=dict)  # seed -> (its Splits, their data identity)
  trained: dict = dataclasses.field(default_factory=dict)  # seed -> trained variables (loaded once)
  changed: bool = False  # whether results changed in this run (the report is redrawn only then)
  loaded: Optional[str] = None  # results.json as read (_comparable), to tell whether anything changed
  finalized: bool = False  # summaries and claims are up to date with the entries (computed once per change)

  @property
  def seeds(self) -> list[int]:
    return config_lib.seeds_of(self.config)

  def splits_of(self, seed: int) -> data_lib.Splits:
    """The splits training seed ``seed`` uses (its own with config.data.resplit_per_seed, else the shared ones)."""
    return self.by_seed[seed][0]

  @property
  def writer(self) -> bool:
    return jax.process_index() == 0  # multi-host: only process 0 writes results

  def ckpt_dir(self, seed: int, *parts: str) -> str:
    return os.path.abspath(os.path.join(self.workdir, "checkpoints", f"seed_{seed}", *(parts or ("train",))))

  def section(self, stage: str) -> results.Section:
    return results.Section.of(self.results, stage)

  def train_entry(self, seed: int) -> tuple[Optional[dict], Optional[str]]:
    if "train" not in self.results:
      return None, None
    train_section = self.section("train")
    return train_section.entry(seed), train_section.key(seed)

  def key(self, stage: str, seed: int) -> Optional[str]:
    if stage == "train":
      return train_key(self.config, self.by_seed[seed][1], seed)
    return stage_key(self.config, stage, *self.train_entry(seed))

  def trained_variables(self, seed: int) -> dict:
    """The seed's trained variables from its checkpoint, which must have been trained with the current data,
    model, train config and seed (its KEY), or StaleModelError naming what changed."""
    if seed not in self.trained:
      check_trained_model(self.ckpt_dir(seed), self.config, self.by_seed[seed][1], seed)
      loaded = train.load_trained(self.model, self.splits_of(seed), self.config.train, seed, self.ckpt_dir(seed))
      if loaded is None:
        raise MissingFileError(
            f"no finished training checkpoint for seed {seed} in {self.ckpt_dir(seed)}. Rerun with the train "
            "stage included (no --stages, or e.g. --stages=train,ptq): it trains exactly the seeds whose "
            "checkpoints are missing and reuses the others.")
      self.trained[seed] = loaded["variables"]
    return self.trained[seed]

  def trained_seed(self, seed: int) -> TrainedSeed:
    """The seed's trained model as the stages after training receive it."""
    return TrainedSeed(model=self.model, variables=self.trained_variables(seed), splits=self.splits_of(seed),
                       layer_names=tuple(self.layer_names), seed=seed, mesh=self.mesh)

  def load_trained(self, seeds: Sequence[int]) -> None:
    """Loads (and checks) the trained variables of ``seeds`` before a stage computes anything, so an
    unreadable checkpoint stops the stage before it has written a single entry."""
    for seed in seeds:
      self.trained_variables(seed)

  def save_progress(self, stage: str) -> None:
    """results.json after one entry (a killed run keeps it); summaries and claims wait for the stage's end."""
    self.finalized = False
    if self.writer:
      results.drop_derived(self.results.get(stage, {}))
      self.results.pop("claims", None)
      self.results["updated"] = results.now()
      results.write_results_file(os.path.join(self.workdir, "results.json"), self.results)


def _open(config, workdir: str, progress: bool, force: bool) -> _Run:
  """Loads each seed's data and builds the model (before the workdir exists: bad data leaves nothing behind)."""
  t0 = time.perf_counter()
  by_seed, loaded = {}, {}
  for seed in config_lib.seeds_of(config):
    split_seed = data_lib.split_seed(config, seed)
    if split_seed not in loaded:
      splits = data_lib.load_for_seed(config, seed)
      loaded[split_seed] = (splits, data_identity(splits))
    by_seed[seed] = loaded[split_seed]
  data_s = time.perf_counter() - t0
  splits, data_id = next(iter(by_seed.values()))
  _check_same_counts(config, by_seed)
  model = models.build_model(config, splits.info)
  mesh = parallel.data_mesh(config.parallel.num_devices) if config.parallel.data_parallel else None
  sample = splits.train.x[:2]
  layer_names = models.check_model(model, sample, splits.info.num_classes,
                                   models.resolved_model_name(config, splits.info))
  r = _Run(config=config, workdir=workdir, splits=splits, model=model, layer_names=layer_names, mesh=mesh, data_id=data_id, progress=progress,
           force=force, by_seed=by_seed)
  r.results = {"timings": {"data": data_s}, "model": {"num_params": models.num_params(model, sample)}}
  return r


def _check_same_counts(config, by_seed: dict) -> None:
  """Per-seed splits must have the same rows per group and split (stratified splits do), or the minority
  groups and the summaries over seeds would mix different designs."""
  first_seed, (first, _) = next(iter(by_seed.items()))
  for seed, (splits, _) in by_seed.items():
    if splits.info.counts != first.info.counts:
      raise InputError(
          f"with config.data.resplit_per_seed, seed {seed}'s split has rows per group {splits.info.counts}, seed "
          f"{first_seed}'s {first.info.counts}; the seeds' splits must have the same sizes. Set "
          "--config.data.resplit_per_seed=False to share one split, or use a dataset with a stratified split.")


def _read_results(r: _Run) -> None:
  """results.json of the workdir (or new ones) with this run's metadata and stale entries dropped."""
  path = os.path.join(r.workdir, "results.json")
  existing = results.read_results_file(path) if os.path.exists(path) else None
  r.loaded = _comparable(existing)
  fresh, r.results = r.results, existing or results.new_results()
  r.results["timings"]["data"] = fresh["timings"]["data"]
  r.results.update({"config": r.config.to_dict(), "seeds": r.seeds, "dataset": {**r.splits.to_dict(),
                    "identity": r.data_id, "split_identities": {str(s): r.by_seed[s][1] for s in r.seeds},
                    "split_seeds": {str(s): data_lib.split_seed(r.config, s) for s in r.seeds}},
                    "model": {"name": models.resolved_model_name(r.config, r.splits.info),
                              "num_params": fresh["model"]["num_params"], "layer_names": r.layer_names}})
  _drop_stale(r)


def _comparable(res: Optional[dict]) -> Optional[str]:
  """The results as JSON text without the times of day and the wall times: equal when nothing else changed."""
  if res is None:
    return None
  return json.dumps({k: v for k, v in res.items() if k not in ("timings", "updated", "last_run", results.DIGEST_KEY)},
                    sort_keys=True, default=str)


def _drop_stale(r: _Run) -> None:
  """Drops entries of seeds no longer configured and entries whose key no longer matches."""
  for stage in results.STAGE_SECTIONS:
    section = r.results.get(stage)
    if section is None:
      continue
    section.pop("fingerprint", None)  # written by fqjax before the cache rule; never matches a key
    keys = section.setdefault("keys", {})
    for seed in list(section.get("per_seed", {})):
      expected = r.key(stage, int(seed)) if int(seed) in r.seeds else None
      if expected is None or keys.get(seed) != expected:
        why = "not configured" if int(seed) not in r.seeds else "its inputs changed"
        log.info("%s seed %s: dropped from the results (%s)", stage, seed, why)
        results.drop_seed(section, seed)
        r.changed = True
    for seed in list(keys):
      if seed not in section.get("per_seed", {}):
        keys.pop(seed)


# ----------------------------------------------------------------------------
# Stages: what to compute (each stage's entry point computes it)
# ----------------------------------------------------------------------------

def _train(r: _Run) -> bool:
  cfg = r.config
  section = r.section("train")
  ran = False
  for seed in r.seeds:
    key, folder = r.key("train", seed), r.ckpt_dir(seed)
    entry = section.entry(seed)
    finished = checkpoints.finished_epochs(folder) == cfg.train.epochs - 1 and workdir_lib.checkpoint_key(folder) == key
    if entry is not None and finished and not r.force:
      log.info("train seed %d: done already, skipped", seed)
      continue
    if entry is not None and not r.force:
      log.warning("train seed %d: results.json has it but its finished checkpoint in %s is missing; retraining "
                  "this seed (resuming from an earlier epoch's checkpoint if one is left)", seed, folder)
    if r.writer:  # multi-host: one process claims (maybe deletes) the shared folder, the others wait
      workdir_lib.claim_checkpoints(folder, key, fresh=r.force)
      workdir_lib.write_key_parts(folder, train_key_parts(cfg, r.by_seed[seed][1], seed))
    parallel.sync_processes(f"claim {folder}")
    log.info("train seed %d: %d epochs of %s on %s", seed, cfg.train.epochs, r.results["model"]["name"],
             r.splits.info.name)
    record, r.trained[seed] = train.train_seed(r.model, r.splits_of(seed), cfg, seed, folder, mesh=r.mesh,
                                               progress=r.progress)
    section.set_entry(seed, record)
    section.set_key(seed, key)
    test = record["test"]
    log.info("train seed %d: test accuracy %.4f, worst group %.4f, fairness violation %.4f", seed,
             test["accuracy"], test["worst_group_accuracy"], test["fairness_violation"])
    ran = True
    _drop_stale(r)  # a retrained seed with new variables makes its later entries stale
    r.save_progress("train")
  return ran


def _ptq(r: _Run) -> bool:
  p = r.config.ptq
  section = r.section("ptq")
  section.data.update(bit_widths=[int(b) for b in p.bit_widths], a_bits=p.a_bits, per_channel=p.per_channel,
                      fold_bn=p.fold_bn, variant=p.variants[0])
  section.data.setdefault("sweep_s", {})
  section.keep_variants(p.variants[1:])  # the primary variant's entries are per_seed itself; the key covers all
  todo = [s for s in r.seeds if section.entry(s) is None or r.force or section.key(s) != r.key("ptq", s)]
  for seed in sorted(set(r.seeds) - set(todo)):
    log.info("ptq seed %d: done already, skipped", seed)
  r.load_trained(todo)
  for seed in todo:
    out = ptq.ptq_seed(r.trained_seed(seed), r.config)
    for variant in p.variants[1:]:
      section.set_entry(seed, out["variants"][variant], variant)
    section.set_entry(seed, out["by_bits"])
    section.set_key(seed, r.key("ptq", seed))
    section.data["sweep_s"][str(seed)], section.data["sweep_mode"] = out["sweep_s"], out["sweep_mode"]
    log.info("ptq seed %d: %s", seed, ", ".join(f"{b}b acc {m['accuracy']:.3f} fv {m['fairness_violation']:.3f}"
                                               for b, m in out["by_bits"].items()))
    r.save_progress("ptq")
  return bool(todo)


def _current_entries(r: _Run, section: results.Section, stage: str, seed: int, names: Sequence[str],
                     variants: Sequence = (None,)) -> None:
  """Keeps, of the seed's entries of every variant, those still valid: none when the key changed (or with
  --force), else only the configured ``names``; the seed's key becomes the current one."""
  key = r.key(stage, seed)
  stale = section.key(seed) != key or r.force
  section.set_key(seed, key)
  for variant in variants:
    old = {} if stale else (section.entry(seed, variant) or {})
    section.set_entry(seed, {k: v for k, v in old.items() if k in names}, variant)


def _explain(r: _Run) -> bool:
  """Every (seed, bit-width) entry of every PTQ variant; the primary variant's in per_seed, the others in
  variants[v].per_seed. At full precision all variants are the model as trained, so they share one entry."""
  xcfg, pcfg = r.config.explain, r.config.ptq
  bit_widths = [int(b) for b in (xcfg.bit_widths or pcfg.bit_widths)]
  section = r.section("explain")
  section.data.update(bit_widths=bit_widths, curvature_split=xcfg.curvature_split,
                      forward_split=xcfg.forward_split, group_sizes=r.splits.info.counts["train"],
                      variant=pcfg.variants[0])
  section.keep_variants(pcfg.variants[1:])
  schemes = ptq_schemes(r.config)
  variant_of = lambda scheme: None if scheme == schemes[0] else scheme.name  # the primary one is per_seed itself
  for seed in r.seeds:  # drops the seed's entries whose key no longer matches
    _current_entries(r, section, "explain", seed, [str(b) for b in bit_widths], [variant_of(s) for s in schemes])
  todo = lambda seed: [(scheme, b) for b in bit_widths for scheme in schemes
                       if str(b) not in section.entry(seed, variant_of(scheme))]
  r.load_trained([s for s in r.seeds if todo(s)])
  ran = False
  for seed in r.seeds:
    for scheme, bits in todo(seed):
      primary = section.entry(seed)
      if bits >= 32 and scheme != schemes[0] and str(bits) in primary:
        entry = primary[str(bits)]  # the model as trained: the same for every variant
      else:
        entry = explain_stage.explain_entry(r.trained_seed(seed), r.config, bits, scheme)
        log.info("explain seed %d %s %d-bit: %.1f s", seed, scheme.name, bits, entry["wall_s"])
      section.entry(seed, variant_of(scheme))[str(bits)] = entry
      ran = True
      r.save_progress("explain")
  return ran


def _mitigate(r: _Run) -> bool:
  cfg, m = r.config, r.config.mitigate
  section = r.section("mitigate")
  section.data.update(bit_widths=list(m.bit_widths), methods=list(m.methods))
  ran, t0 = False, time.perf_counter()
  for seed in r.seeds:
    _current_entries(r, section, "mitigate", seed, list(m.methods))
  missing = lambda seed: [(method, int(bits)) for method in m.methods for bits in m.bit_widths
                          if str(bits) not in section.entry(seed).get(method, {})]
  r.load_trained([s for s in r.seeds if missing(s)])
  for seed in r.seeds:
    entries, fp_test, shared = section.entry(seed), None, {}  # shared: the seed's allocation sensitivity tables
    for method, bits in missing(seed):
      if fp_test is None:
        fp_test = train.evaluate(r.model, r.trained_variables(seed), r.splits_of(seed).test, r.splits.info.num_groups,
                                 group_is_label=r.splits.info.group_is_label, batch_size=cfg.eval.batch_size,
                                 mesh=r.mesh)
      folder = r.ckpt_dir(seed, "mitigate", mitigate.checkpoint_name(method, bits))
      if r.writer:
        workdir_lib.claim_checkpoints(folder, r.key("mitigate", seed), fresh=r.force)
      parallel.sync_processes(f"claim {folder}")
      out = mitigate.run_entry(r.trained_seed(seed), cfg, method, bits, folder, fp_test=fp_test, shared=shared)
      entries.setdefault(method, {})[str(bits)] = out
      log.info("mitigate seed %d %s %d-bit: acc %.3f worst %.3f fv %.3f (%.1f s)", seed, method, bits,
               out["accuracy"], out["worst_group_accuracy"], out["fairness_violation"], out["train_s"])
      ran = True
      r.save_progress("mitigate")
    for method in list(entries):  # bit-widths no longer configured
      entries[method] = {b: v for b, v in entries[method].items() if int(b) in m.bit_widths}
  if ran:
    section.data["wall_s"] = time.perf_counter() - t0
  return ran


def _report(r: _Run) -> bool:
  if not (r.changed or r.force) and os.path.exists(os.path.join(r.workdir, "report.html")):
    log.info("report: no stage changed the results, skipped")
    return False
  if r.writer:
    out = report.write_report(r.workdir, r.results)
    log.info("report: %s", out["html"])
  return True


STAGE_FUNCTIONS: dict[str, Callable[[_Run], bool]] = {
    "train": _train, "ptq": _ptq, "explain": _explain, "mitigate": _mitigate, "report": _report}


def available_stages() -> list[str]:
  return [s for s in config_lib.STAGES if s in STAGE_FUNCTIONS]


# ----------------------------------------------------------------------------
# Summaries, claims and the result files
# ----------------------------------------------------------------------------

def _derive(r: _Run) -> None:
  """Summaries over exactly the configured seeds and the claims, once per change of the entries."""
  if not r.finalized:
    summaries.summarize_sections(r.results, r.seeds, r.config.eval.bootstrap_resamples)
    r.results["claims"] = claims.check_claims(r.results)
    r.finalized = True


def _write(r: _Run) -> None:
  """Validation, then results.json, results.csv and config.json (atomically) and TensorBoard scalars."""
  _derive(r)
  if not r.writer:
    return
  r.results["updated"] = results.now()
  results.validate(r.results)
  # config.json is written with the results, so it always describes what the workdir holds.
  results.atomic_write_text(os.path.join(r.workdir, "config.json"), r.config.to_json_best_effort(indent=1) + "\n")
  results.write_results_file(os.path.join(r.workdir, "results.json"), r.results)
  results.write_csv(os.path.join(r.workdir, "results.csv"), results.csv_rows(r.results))
  if r.config.get("tensorboard", True):  # scalars for TensorBoard under workdir/tensorboard (fqjax.outputs.tensorboard)
    from fqjax.outputs import tensorboard
    tensorboard.write_scalars(r.workdir, r.results)


def _restore_config_json(r: _Run) -> None:
  """Rewrites config.json when it is missing or is not the config of the results (deleted or damaged by
  hand); the CLIs that read a workdir (allocate, report) need it."""
  if not r.writer:
    return
  path = os.path.join(r.workdir, "config.json")
  text = r.config.to_json_best_effort(indent=1) + "\n"
  try:
    with open(path) as f:
      if f.read() == text:
        return
  except (OSError, UnicodeDecodeError):
    pass
  log.warning("config.json in %s was missing or changed outside fqjax; rewritten from this run's config", r.workdir)
  results.atomic_write_text(path, text)


def run(config: ml_collections.ConfigDict, workdir: str, stages: Optional[Sequence[str]] = None, *,
        force: bool = False, progress: bool = True) -> dict:
  """Runs the selected stages (default: every available stage) and returns the results dict.

  The returned dict also holds "last_run": {"stages": {stage: seconds or "skipped"}, "total_s"}
  for this call (not written to results.json). A run with nothing to do changes no file.
  """
  t_start = time.perf_counter()
  config_lib.validate_config(config)
  stages = available_stages() if stages is None else config_lib.check_stages(stages)
  workdir_lib.check_workdir(workdir)
  r = _open(config, workdir, progress, force)  # data errors stop here, before the workdir is made
  workdir_lib.make_workdir(workdir)
  lock = workdir_lib.workdir_lock(workdir) if r.writer else contextlib.nullcontext()
  with lock, workdir_lib.log_file(workdir):
    _read_results(r)
    last_run = {"data": r.results["timings"]["data"]}
    for stage in stages:
      t0 = time.perf_counter()
      try:
        if stage == "report":
          r.changed = r.changed or _comparable(r.results) != r.loaded
          if r.changed:
            _write(r)  # the report reads the finished summaries and claims
        ran = STAGE_FUNCTIONS[stage](r)
      except FqjaxError as e:
        log.error("stage %s: %s", stage, e)
        raise
      if ran:
        r.changed = True
        last_run[stage] = r.results["timings"][stage] = time.perf_counter() - t0
        log.info("stage %s finished in %.1f s", stage, last_run[stage])
      else:
        last_run[stage] = "skipped"
    if r.changed or _comparable(r.results) != r.loaded:
      _write(r)  # again after the report stage only for its timing: summaries and claims are not recomputed
    else:
      _derive(r)  # same as on disk: nothing is written
      _restore_config_json(r)
  r.results["last_run"] = {"stages": last_run, "total_s": time.perf_counter() - t_start}
  return r.results
