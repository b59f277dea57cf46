"""results.json and results.csv: schema, atomic writes, validation and the flat table.

results.json (schema_version 1), top level:
  schema_version: 1
  fqjax_version, created, updated: strings (ISO 8601 times, UTC)
  config:   the study config as a dict
  dataset:  fqjax.data DatasetInfo.to_dict() plus split sizes and "identity" (sha256 of the loaded splits)
  model:    {"name", "num_params", "layer_names": [forward order]}
  seeds:    [int]
  Each stage section has "keys": {seed: cache key of that seed's entries} (see fqjax.study.runner) and, once
  the stage has finished, "missing_seeds": [configured seeds without a complete entry]; its "summary"
  (and mitigate's "best") exists only when missing_seeds is empty: over exactly the configured seeds.
  train:    {"keys", "per_seed": {seed: TrainRecord}, "summary": Summary}
  ptq:      {"keys", "bit_widths", "a_bits", "per_channel", "fold_bn", "sweep_mode", "sweep_s": {seed: s},
             "variant": the primary PTQ variant ("<scale>/<bn>", fqjax.study.ptq.parse_variant),
             "per_seed": {seed: {bits: Metrics}}, "summary": {bits: Summary}, "intervals": {bits: Intervals},
             "variants": {other variant: {"per_seed", "summary", "intervals" as above}}}
  explain:  {"keys", "bit_widths", "forward_split", "curvature_split", "group_sizes": [G], "variant",
             "per_seed": {seed: {bits: Explain}}, "theory": {quantized bits: Theory},
             "variants": {other variant: {"per_seed", "theory" as above}}} (at 32 bits every variant's
             entry is the trained model's, computed once)
  mitigate: {"keys", "bit_widths", "methods", "per_seed": {seed: {method: {bits: Metrics + train_s}}},
             "summary": {method: {bits: Summary}}, "best": {bits: {column: method}}, "wall_s"}
  claims:   {claim name: {"verdict": holds | partly | does not hold | inconclusive | not applicable | depends |
            not tested, "judgements": {"<variant> | <definition>": {"verdict", "variant", "definition",
            "statistic", "per_bits", "collapsed_bits", ...}}, "by_verdict" (depends)}, "rules": str
            (fqjax.analysis.claims.rules_text(): GENERAL_RULES, then "claim: rule" per RULES entry)}
  timings:  {stage: seconds of its last run}
  last_run: only in the dict fqjax.study.runner.run returns, never in the file: {"stages": {stage: seconds
            or "skipped"}, "total_s"} of that invocation.
where
  Metrics = fqjax.analysis.metrics.group_metrics output (accuracy, loss, worst_group_accuracy,
            fairness_violation, accuracy_ratio, ece, fairlearn aliases accuracy_score_{difference,
            group_min, group_max, ratio}, groups{count, accuracy, loss, ece, accuracy_drop}, ...)
            plus "size_bytes" and, for test metrics, "fairness_violation_ci" {low, high}; PTQ entries also
            groups.paired_counts [G][4] (fqjax.analysis.stats.CELLS: each test example's full-precision and
            quantized outcome).
  Intervals = fqjax.analysis.stats.intervals output: group_accuracy, group_accuracy_drop {mean, low, high: [G]},
            worst_group_accuracy and drop_difference (minority minus majority drop) {mean, low, high}.
  Theory = fqjax.analysis.summaries.theory_table row: first_order, second_order, curvature_term, grad_norm, bound
            [G], d_norm, observed_excess_loss {split: [G]}, correlations {split: {spearman, pearson}}.
  TrainRecord = {"history": [epoch dicts], "val": Metrics, "test": Metrics, "wall_s", "epochs_run",
                 "resumed_from", "sample_counts", "variables_digest" (fqjax.training.train.tree_digest)}
  Summary = fqjax.analysis.metrics.summarize_over_seeds output ({"accuracy": {"mean", "std", "n"}, ...}), plus
            size_bytes and fairness_violation_ci {low, high: mean_std} when every seed has them.
  Explain = fqjax.explain.forward.forward_chain output (weights, activations, logits, softmax,
            accuracy, loss per group) plus "curvature": {"grad_norm", "top_eigenvalue", "loss": [G],
            "top_k_eigenvalues": [G][k], "num_hvps", "converged": [G], "spearman_size_grad_norm",
            "spearman_size_top_eigenvalue", "activation_bits_ignored"[, "trace", "trace_std"][, "size_matched":
            {"size", "repeats", "grad_norm": {"mean", "std"}, "top_eigenvalue": {"mean", "std"}, "converged"}
            ([G] each)], "mean_per_sample_grad_norm": [G]}, "theory" (quantized bits: fqjax.study.stages.theory) and
            "wall_s"; logits.definitions {name: {change, relative_change[, fp, quantized]}} (forward_chain).
Seeds and bit-widths are JSON object keys, so they are strings ("0", "32").
"""
from __future__ import annotations

import csv
import datetime
import hashlib
import io
import json
import math
import os
import tempfile
from typing import Any, Iterable, Mapping

SCHEMA_VERSION = 1
CSV_COLUMNS = ("variant", "bits", "seed", "split", "group", "group_name", "count", "accuracy", "loss",
               "accuracy_drop", "fairness_violation", "worst_group_accuracy", "ece", "flip_rate",
               # fairlearn's MetricFrame names (accuracy_score): "all" rows only; empty for older results
               "accuracy_score_difference", "accuracy_score_group_min", "accuracy_score_group_max",
               "accuracy_score_ratio",
               # explain rows: the forward chain and curvature per group
               "logit_abs_shift", "logit_variance", "logit_variance_change", "true_prob", "true_prob_shift",
               "margin", "margin_shift", "mean_activation_rel_err", "grad_norm", "top_eigenvalue")


def now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _clean(value: Any) -> Any:
  """JSON-safe copy: NaN/inf become None (JSON has no NaN), tuples become lists."""
  if isinstance(value, Mapping):
    return {str(k): _clean(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_clean(v) for v in value]
  if isinstance(value, float) and not math.isfinite(value):
    return None
  if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
    return _clean(value.item())
  return value


def atomic_write_text(path: str, text: str) -> None:
  """Writes to a temporary file in the same folder, then renames: readers never see half a file."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_", suffix=os.path.basename(path))
  try:
    with os.fdopen(fd, "w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be shared
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_json(path: str, payload: Mapping) -> None:
  atomic_write_text(path, json.dumps(_clean(payload), indent=1, allow_nan=False) + "\n")


def read_json(path: str) -> dict:
  with open(path) as f:
    return json.load(f)


DIGEST_KEY = "digest"


def content_digest(payload: Mapping) -> str:
  """sha256 of the results' content (every key but the digest itself, canonical JSON): what fqjax wrote."""
  body = {k: v for k, v in _clean(payload).items() if k != DIGEST_KEY}
  return hashlib.sha256(json.dumps(body, sort_keys=True, allow_nan=False).encode()).hexdigest()


def write_results_file(path: str, payload: dict) -> None:
  """results.json, atomically, with "digest": the content's sha256, so a later run can tell a file changed
  outside fqjax (reformatting keeps it; a changed number does not)."""
  payload[DIGEST_KEY] = content_digest(payload)
  write_json(path, payload)


RESULTS_RECOVERY = ("Nothing was changed. Move it away (e.g. mv results.json results.json.bad) and rerun launch.py "
                    "with the same --config and --workdir and no --stages (every stage): finished training "
                    "checkpoints are reused, and the other stages are recomputed from them.")


def read_results_file(path: str) -> dict:
  """results.json at ``path``, validated; raises CorruptFileError naming the file and how to recover."""
  from fqjax.errors import CorruptFileError
  try:
    results = read_json(path)
  except json.JSONDecodeError as e:
    raise CorruptFileError(path, f"not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})",
                           RESULTS_RECOVERY) from e
  except (UnicodeDecodeError, OSError) as e:
    raise CorruptFileError(path, f"cannot be read as text ({type(e).__name__})", RESULTS_RECOVERY) from e
  if not isinstance(results, dict):
    raise CorruptFileError(path, f"holds a JSON {type(results).__name__}, not an object", RESULTS_RECOVERY)
  if DIGEST_KEY in results and results[DIGEST_KEY] != content_digest(results):
    raise CorruptFileError(path, "was changed outside fqjax after fqjax wrote it (its content no longer matches "
                           "its \"digest\"), so its numbers cannot be trusted", RESULTS_RECOVERY)
  try:
    validate(results)
  except (ValueError, KeyError, TypeError, AttributeError) as e:
    problem = str(e) if isinstance(e, ValueError) else f"it breaks the results schema ({type(e).__name__}: {e})"
    raise CorruptFileError(path, problem.rstrip("."), RESULTS_RECOVERY) from e
  return results


def new_results() -> dict:
  from fqjax import __version__
  t = now()
  return {"schema_version": SCHEMA_VERSION, "fqjax_version": __version__, "created": t, "updated": t,
          "timings": {}}


# ----------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------

def _require(cond: bool, where: str, what: str) -> None:
  if not cond:
    raise ValueError(f"results.json is invalid at {where}: {what}")


def _check_metrics(m: Any, where: str, num_groups: int) -> None:
  _require(isinstance(m, Mapping), where, "expected an object of metrics")
  for key in ("accuracy", "loss", "worst_group_accuracy", "fairness_violation"):
    _require(key in m, where, f"missing {key!r}")
    _require(m[key] is None or isinstance(m[key], (int, float)), f"{where}.{key}", "expected a number")
  groups = m.get("groups")
  _require(isinstance(groups, Mapping), f"{where}.groups", "missing per-group metrics")
  for key in ("count", "accuracy", "loss"):
    _require(isinstance(groups.get(key), list) and len(groups[key]) == num_groups, f"{where}.groups.{key}",
             f"expected a list of {num_groups} values")


def validate(results: Mapping) -> None:
  """Raises ValueError naming the first place where ``results`` breaks the schema above."""
  _require(results.get("schema_version") == SCHEMA_VERSION, "schema_version", f"expected {SCHEMA_VERSION}")
  for key in ("fqjax_version", "created", "updated", "config", "dataset", "model", "seeds", "timings"):
    _require(key in results, key, "missing")
  num_groups = results["dataset"].get("num_groups")
  _require(isinstance(num_groups, int) and num_groups >= 1, "dataset.num_groups", "expected an int >= 1")
  _require(isinstance(results["seeds"], list) and results["seeds"], "seeds", "expected a non-empty list")
  _require(isinstance(results["model"].get("layer_names"), list), "model.layer_names", "expected a list")
  if "train" in results:
    for seed, rec in results["train"]["per_seed"].items():
      for key in ("history", "val", "test", "wall_s"):
        _require(key in rec, f"train.per_seed.{seed}", f"missing {key!r}")
      _check_metrics(rec["test"], f"train.per_seed.{seed}.test", num_groups)
  if "ptq" in results:
    p = results["ptq"]
    for key in ("bit_widths", "per_seed"):
      _require(key in p, "ptq", f"missing {key!r}")
    if p.get("missing_seeds") == []:
      _require("summary" in p, "ptq", "missing 'summary' (every configured seed has its entry)")
    for seed, by_bits in p["per_seed"].items():
      _require(sorted(by_bits) == sorted(str(b) for b in p["bit_widths"]), f"ptq.per_seed.{seed}",
               "expected one entry per bit-width")
      for bits, m in by_bits.items():
        _check_metrics(m, f"ptq.per_seed.{seed}.{bits}", num_groups)
        _require(isinstance(m.get("size_bytes"), (int, float)), f"ptq.per_seed.{seed}.{bits}.size_bytes",
                 "expected a number")
  if "explain" in results:
    for seed, by_bits in results["explain"]["per_seed"].items():
      for bits, e in by_bits.items():
        where = f"explain.per_seed.{seed}.{bits}"
        for key in ("weights", "activations", "logits", "softmax", "accuracy", "loss"):
          _require(key in e, where, f"missing {key!r}")
        for key in ("variance", "variance_change", "abs_shift"):
          _require(len(e["logits"].get(key, [])) == num_groups, f"{where}.logits.{key}",
                   f"expected a list of {num_groups} values")
        if "curvature" in e:
          for key in ("grad_norm", "top_eigenvalue"):
            _require(len(e["curvature"].get(key, [])) == num_groups, f"{where}.curvature.{key}",
                     f"expected a list of {num_groups} values")
  if "mitigate" in results:
    for seed, by_method in results["mitigate"]["per_seed"].items():
      for method, by_bits in by_method.items():
        for bits, m in by_bits.items():
          _check_metrics(m, f"mitigate.per_seed.{seed}.{method}.{bits}", num_groups)


# ----------------------------------------------------------------------------
# The flat table
# ----------------------------------------------------------------------------

def metric_rows(variant: str, bits: Any, seed: Any, split: str, m: Mapping,
                group_names: Iterable[str]) -> list[dict]:
  """One row for the whole model (group "all") and one per group.

  Keys a results.json from before they were recorded lacks (ece, the fairlearn aliases) stay empty.
  """
  rows = [{"variant": variant, "bits": bits, "seed": seed, "split": split, "group": "all", "group_name": "all",
           "count": m.get("n"), "accuracy": m["accuracy"], "loss": m["loss"],
           "accuracy_drop": m.get("accuracy_drop"), "fairness_violation": m["fairness_violation"],
           "worst_group_accuracy": m["worst_group_accuracy"], "ece": m.get("ece"), "flip_rate": m.get("flip_rate"),
           **{k: m.get(k) for k in CSV_COLUMNS if k.startswith("accuracy_score_")}}]
  g = m["groups"]
  drops = g.get("accuracy_drop", [None] * len(g["count"]))
  eces = g.get("ece", [None] * len(g["count"]))
  flips = g.get("flip_rate", [None] * len(g["count"]))
  for i, name in enumerate(group_names):
    rows.append({"variant": variant, "bits": bits, "seed": seed, "split": split, "group": i, "group_name": name,
                 "count": g["count"][i], "accuracy": g["accuracy"][i], "loss": g["loss"][i],
                 "accuracy_drop": drops[i], "fairness_violation": None, "worst_group_accuracy": None,
                 "ece": eces[i], "flip_rate": flips[i]})
  return rows


def csv_rows(results: Mapping) -> list[dict]:
  names = results["dataset"]["group_names"]
  rows: list[dict] = []
  for seed, rec in results.get("train", {}).get("per_seed", {}).items():
    for split in ("val", "test"):
      rows += metric_rows("fp", 32, seed, split, rec[split], names)
  ptq = results.get("ptq", {})
  for label, holder in [("ptq", ptq), *((f"ptq/{v}", h) for v, h in ptq.get("variants", {}).items())]:
    for seed, by_bits in holder.get("per_seed", {}).items():
      for bits, m in by_bits.items():
        rows += metric_rows(label, bits, seed, "test", m, names)
  for seed, by_method in results.get("mitigate", {}).get("per_seed", {}).items():
    for method, by_bits in by_method.items():
      for bits, m in by_bits.items():
        rows += metric_rows(f"mitigate/{method}", bits, seed, "test", m, names)
  explain = results.get("explain", {})
  for label, holder in [("explain", explain), *((f"explain/{v}", h) for v, h in explain.get("variants", {}).items())]:
    for seed, by_bits in holder.get("per_seed", {}).items():
      for bits, e in by_bits.items():
        rows += explain_rows(bits, seed, explain.get("forward_split", "test"), e, names, label)
  return rows


def explain_rows(bits: Any, seed: Any, split: str, e: Mapping, group_names: Iterable[str],
                 label: str = "explain") -> list[dict]:
  """One row per group with the forward chain and (when computed) curvature; ``label``: the variant column
  ("explain" for the primary PTQ variant, "explain/<variant>" for the others)."""
  rows = []
  acts = list(e.get("activations", {}).values())
  curv = e.get("curvature", {})
  for i, name in enumerate(group_names):
    act = [a[i] for a in acts if a[i] is not None]
    rows.append({"variant": label, "bits": bits, "seed": seed, "split": split, "group": i, "group_name": name,
                 "accuracy": e["accuracy"][i], "loss": e["loss"][i],
                 "logit_abs_shift": e["logits"]["abs_shift"][i], "logit_variance": e["logits"]["variance"][i],
                 "logit_variance_change": e["logits"]["variance_change"][i],
                 "true_prob": e["softmax"]["true_prob"][i], "true_prob_shift": e["softmax"]["true_prob_shift"][i],
                 "margin": e["softmax"]["margin"][i], "margin_shift": e["softmax"]["margin_shift"][i],
                 "mean_activation_rel_err": sum(act) / len(act) if act else None,
                 "grad_norm": curv.get("grad_norm", [None] * (i + 1))[i],
                 "top_eigenvalue": curv.get("top_eigenvalue", [None] * (i + 1))[i]})
  return rows


def write_csv(path: str, rows: Iterable[Mapping]) -> None:
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore")
  writer.writeheader()
  for row in rows:
    writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in CSV_COLUMNS})
  atomic_write_text(path, buf.getvalue())


# ----------------------------------------------------------------------------
# Stage sections: {"keys": {seed: cache key}, "per_seed": {seed: entry}, "variants": {name: {"per_seed": ...}},
# plus keys derived from the entries (summaries over seeds), which are recomputed, never merged.
# ----------------------------------------------------------------------------

STAGE_SECTIONS = ("train", "ptq", "explain", "mitigate")
DERIVED_KEYS = ("summary", "best", "intervals", "theory", "missing_seeds")


def holders(section: Mapping) -> list:
  """The dicts of a stage section that hold "per_seed" entries: the section (the primary PTQ variant) and each
  of its other variants."""
  return [section, *(section.get("variants") or {}).values()]


def drop_derived(section: dict) -> None:
  """Removes the summaries over seeds from a section and its variants (they are stale once an entry changes)."""
  for holder in holders(section):
    for key in DERIVED_KEYS:
      holder.pop(key, None)


def drop_seed(section: dict, seed) -> None:
  """Removes one seed's entries (every variant's), its cache key and its timing from a section."""
  seed = str(seed)
  for holder in holders(section):
    holder.get("per_seed", {}).pop(seed, None)
  section.get("keys", {}).pop(seed, None)
  section.get("sweep_s", {}).pop(seed, None)


class Section:
  """One stage section of results.json addressed by int seeds (and bit-widths), whatever the JSON keys are.

  data: the section dict itself (changed in place). The primary PTQ variant's entries are data["per_seed"];
  another variant ``v``'s are data["variants"][v]["per_seed"] (``variant=v`` in the methods below).
  """

  def __init__(self, data: dict):
    self.data = data
    data.setdefault("keys", {})
    data.setdefault("per_seed", {})

  @classmethod
  def of(cls, results: dict, stage: str) -> "Section":
    """The section of ``stage``, made empty when absent."""
    return cls(results.setdefault(stage, {"keys": {}, "per_seed": {}}))

  def holder(self, variant: Any = None) -> dict:
    """The dict whose "per_seed" holds ``variant``'s entries (None: the primary one), made when absent."""
    if variant is None:
      return self.data
    return self.data.setdefault("variants", {}).setdefault(variant, {"per_seed": {}})

  def keep_variants(self, names) -> None:
    """Keeps the other variants named (in that order), dropping the rest and making the missing ones."""
    old = self.data.get("variants") or {}
    self.data["variants"] = {v: old.get(v, {"per_seed": {}}) for v in names}

  def entry(self, seed: int, variant: Any = None) -> Any:
    """The seed's entry (None when absent)."""
    return self.holder(variant).setdefault("per_seed", {}).get(str(seed))

  def set_entry(self, seed: int, value: Any, variant: Any = None) -> None:
    self.holder(variant).setdefault("per_seed", {})[str(seed)] = value

  def key(self, seed: int) -> Any:
    """The cache key the seed's entries were computed under (None when absent)."""
    return self.data["keys"].get(str(seed))

  def set_key(self, seed: int, key: Any) -> None:
    self.data["keys"][str(seed)] = key

  def seeds(self) -> list[int]:
    """The seeds with an entry of the primary variant."""
    return sorted(int(s) for s in self.data["per_seed"])

  def drop_seed(self, seed: int) -> None:
    drop_seed(self.data, seed)

  def drop_derived(self) -> None:
    drop_derived(self.data)
