"""The report's sections, each reading its stage from results.json into a Doc (tables, figures, notes)."""
from __future__ import annotations

import json
import os
from typing import Mapping, Optional

import numpy as np
from matplotlib.figure import Figure

from fqjax.analysis import claims as claims_lib
from fqjax.report.common import (ABLATION_COLUMNS, EMPTY, FIGURES_DIR, FULL, bits_label, summary_cell, Ctx, dig,
                                 explain_bits, explain_ms, mean_std_at, finite_mean, num, pm, ptq_summary, rel,
                                 sorted_bits)
from fqjax.report import verdicts
from fqjax.report.document import Doc
from fqjax.analysis.tables import ptq_size_bytes
from fqjax.report.figures import (save_png, figure_explain_curvature, figure_explain_logits,
                                  figure_explain_weights, figure_mitigate_ablation, figure_mitigate_pareto,
                                  figure_ptq_fairness, figure_ptq_group_accuracy, figure_ptq_variants,
                                  ptq_variant_summaries)


_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _rerun_hint(ctx: Ctx, stage: str) -> str:
  name = str(dig(ctx.results, "config", "name") or "")
  exp = f"experiments/{name}.py" if name and os.path.exists(os.path.join(_REPO, "experiments", f"{name}.py")) \
      else "<this study's experiment file>"
  return (f"run `python launch.py --config {exp} --stages={stage} --workdir {ctx.workdir}` "
          "(with the same --config overrides as this run), then rerun the report")


class Report:
  def __init__(self, ctx: Ctx, fig_dir: str):
    self.ctx, self.fig_dir = ctx, fig_dir
    self.doc = Doc()
    self.figures: dict[str, str] = {}
    self.sections: dict[str, str] = {}

  def fig(self, name: str, fig: Optional[Figure], caption: str) -> None:
    if fig is None:
      return
    path = os.path.join(self.fig_dir, name + ".png")
    save_png(fig, path)
    self.figures[name] = path
    self.doc.figure(f"{FIGURES_DIR}/{name}.png", caption)

  def open_section(self, title: str, stage: str) -> Optional[Mapping]:
    """The heading, then results[stage]; None (said as missing, with the command that adds it) without one."""
    self.doc.h(2, title)
    section = self.ctx.results.get(stage)
    if not section:
      self.absent(stage, f"the {stage} stage is not in this workdir; " + _rerun_hint(self.ctx, stage))
    return section

  def absent(self, section: str, why: str) -> None:
    self.sections[section] = "missing: " + why
    self.doc.missing(why)

  def overview(self) -> None:
    ctx, r = self.ctx, self.ctx.results
    ds, model = r.get("dataset", {}), r.get("model", {})
    self.doc.h(1, f"fqjax report: {dig(r, 'config', 'name') or 'study'}")
    self.doc.p(f"Dataset **{ds.get('name', '?')}** ({ctx.num_groups} groups by `{ds.get('group_attribute', '?')}`, "
               f"{ds.get('num_classes', '?')} classes), model **{model.get('name', '?')}** "
               f"({model.get('num_params', '?')} parameters, {len(model.get('layer_names', []))} quantizable "
               f"layers), seeds {r.get('seeds', [])}. Results created {r.get('created', '?')}, updated "
               f"{r.get('updated', '?')} (fqjax {r.get('fqjax_version', '?')}, schema "
               f"{r.get('schema_version', '?')}). Means ± std are over seeds.")
    counts = ds.get("counts", {})
    count = lambda split, g: (str(counts[split][g]) if isinstance(counts.get(split), list)
                              and g < len(counts[split]) else "–")
    rows = [[ctx.names[g]] + [count(split, g) for split in ("train", "val", "test")]
            + ["yes" if ctx.is_minority(g) else ""] for g in range(ctx.num_groups)]
    self.doc.table(["group", "train", "val", "test", "minority"], rows)
    self.doc.p(_minority_sentence(ctx))

  def train(self) -> None:
    ctx, t = self.ctx, self.open_section("Full-precision training", "train")
    if not t:
      return
    self.sections["train"] = "ok"
    rows = []
    for s in ctx.seeds:
      rec = t.get("per_seed", {}).get(s)
      if rec:
        test = rec.get("test", {})
        rows.append([s, str(rec.get("epochs_run", "–")), num(test.get("accuracy")),
                     num(test.get("worst_group_accuracy")), num(test.get("fairness_violation")),
                     num(dig(rec, "val", "accuracy")), num(rec.get("wall_s"), "{:.1f}")])
    self.doc.table(["seed", "epochs", "test accuracy", "worst group", "fairness violation", "val accuracy",
                    "wall s"], rows)

  def ptq(self) -> None:
    ctx, p = self.ctx, self.open_section("PTQ sweep", "ptq")
    if not p:
      return
    finished = isinstance(p.get("summary"), Mapping)
    self.sections["ptq"] = "ok" if finished else "incomplete"
    if not finished:
      return self.doc.missing(f"the ptq stage has not finished (no entry yet for seeds {_seeds_without(ctx, p)}), "
                              "so results.json has no summary over seeds; rerun the ptq stage to complete it.")
    self.doc.p(f"Weights quantized after training (activation bits {p.get('a_bits')}, per-channel "
               f"{p.get('per_channel')}, BN folded {p.get('fold_bn')}); test split.")
    self.fig("ptq_group_accuracy", figure_ptq_group_accuracy(ctx),
             "Per-group test accuracy against bit-width (mean over seeds); minority groups dashed with open markers.")
    self.fig("ptq_fairness", figure_ptq_fairness(ctx),
             "Left: fairness violation (mean ± std over seeds; band: bootstrap CI). Right: overall and worst-group "
             "accuracy.")
    bits = sorted_bits(p.get("bit_widths", []))
    self.doc.p("**PTQ sweep summary** (test split, mean ± std over seeds as stored in `ptq.summary`):")
    self.doc.table(["bits", "size KB", "accuracy", "worst group", "fairness violation", "FV bootstrap CI",
                    "accuracy drop"], [_ptq_row(ctx, b) for b in bits])
    groups = {b: dig(ptq_summary(ctx, b), "groups", "accuracy") for b in bits}

    def group_cell(b, g):
      if not isinstance(groups[b], list) or g >= len(groups[b]):
        return "–"
      low, high = (dig(p, "intervals", b, "group_accuracy", side) or [None] * (g + 1) for side in ("low", "high"))
      cell = summary_cell(groups[b][g])
      interval = f" [{num(low[g])}, {num(high[g])}]" if g < len(low) and low[g] is not None else ""
      return cell if cell == EMPTY else cell + interval

    rows = [[ctx.group_label(g)] + [group_cell(b, g) for b in bits] for g in ctx.size_order()]
    self.doc.p("**Per-group accuracy** (mean ± std over seeds [95% hierarchical paired bootstrap interval]; groups "
               f"by train count, smallest first; {EMPTY}: the group has no test rows):")
    self.doc.table(["group"] + [f"{bits_label(b)} bits" for b in bits], rows)
    self.ptq_variants(bits)
    self.ptq_intervals()

  def ptq_variants(self, bits: list) -> None:
    """The PTQ variants compared in this study (config.ptq.variants), when there are two or more."""
    summaries = ptq_variant_summaries(self.ctx)
    if len(summaries) < 2:
      return
    self.fig("ptq_variants", figure_ptq_variants(self.ctx),
             "PTQ variants (weight scale rule / BatchNorm statistics): fairness violation and worst-group accuracy.")
    rows = [[name, bits_label(b)] + [summary_cell(dig(s, str(b), key)) for key in
                                       ("accuracy", "worst_group_accuracy", "fairness_violation")]
            for name, s in summaries.items() for b in bits]
    self.doc.p(f"**PTQ variants** (the first, `{next(iter(summaries))}`, is the primary one the other sections use; "
               "mean ± std over seeds):")
    self.doc.table(["variant", "bits", "accuracy", "worst group", "fairness violation"], rows)

  def ptq_intervals(self) -> None:
    """Per-group accuracy by variant with 95% intervals, and the intervals behind the accuracy claim."""
    rows = verdicts.interval_rows(self.ctx)
    if not rows:
      return
    self.fig("ptq_variant_groups", verdicts.figure_variant_groups(self.ctx),
             "Per-group test accuracy by PTQ variant and bit-width (mean over seeds; band: 95% hierarchical paired "
             "bootstrap interval); minority groups dashed.")
    self.doc.p("**95% intervals** (hierarchical paired bootstrap: seeds, then each group's test examples with their "
               "full-precision and quantized outcomes kept together). D = minority mean − majority mean accuracy "
               "drop; status: the accuracy claim's rule at that bit-width.")
    self.doc.table(["variant", "bits", "worst-group accuracy", "D (minority − majority drop)", "status"], rows)

  def explain(self) -> None:
    ctx, e = self.ctx, self.ctx.results.get("explain")
    self.doc.h(2, "Explain: forward chain")
    if not e:
      self.absent("explain", "Explain: not in this workdir; " + _rerun_hint(ctx, "explain"))
      self.doc.h(2, "Explain: curvature")
      return self.absent("curvature", "Explain: not in this workdir; " + _rerun_hint(ctx, "explain"))
    self.sections["explain"] = "ok"
    self.fig("explain_weights", figure_explain_weights(ctx),
             "Weights per layer against bit-width (mean over seeds): induced sparsity (weights rounded to zero) "
             "and relative L2 error; dashed black: whole model.")
    self.fig("explain_logits_softmax", figure_explain_logits(ctx),
             "Per-group logit variance, true-class probability and margin at full precision and each bit-width "
             "(mean over seeds); shaded: minority groups.")
    bits = [b for b in explain_bits(ctx) if b < FULL]
    rows = []
    for b in bits:
      w = lambda key: explain_ms(ctx, b, "weights", "model", key)[0]
      acts = [explain_ms(ctx, b, "activations", name)[0] for name in
              (dig(e, "per_seed", ctx.seeds[0] if ctx.seeds else "", b, "activations") or {})]
      act = finite_mean(np.stack(acts), axis=0) if acts and all(np.shape(a) == (ctx.num_groups,) for a in acts) \
          else None
      rows.append([str(b), num(w("rel_l2")), num(w("induced_sparsity")), num(w("total_sparsity")),
                   rel(ctx.minority, act), rel(ctx.minority, explain_ms(ctx, b, "logits", "abs_shift")[0]),
                   rel(ctx.minority, explain_ms(ctx, b, "logits", "variance_change")[0]),
                   rel(ctx.minority, explain_ms(ctx, b, "softmax", "true_prob_shift")[0]),
                   rel(ctx.minority, explain_ms(ctx, b, "softmax", "margin_shift")[0])])
    self.doc.p("**Forward chain** (whole-model weight error and sparsity; per-group quantities as "
               "minority / majority means, mean over seeds; shifts are quantized − full precision):")
    self.doc.table(["bits", "weight rel. L2", "induced sparsity", "total sparsity", "activation rel. error",
                    "logit |shift|", "logit variance change", "true-class prob shift", "margin shift"], rows)
    self.doc.h(2, "Explain: curvature")
    fig = figure_explain_curvature(ctx)
    if fig is None:
      return self.absent("curvature", "the explain section has no per-group curvature (grad_norm, "
                         "top_eigenvalue); rerun the explain stage with curvature enabled (--force).")
    self.sections["curvature"] = "ok"
    self.fig("explain_curvature", fig, "Per-group gradient norm and top Hessian eigenvalue against group size "
             "(log scales where all values are positive; mean ± std over seeds); shaded: group sizes below half the "
             "median, the minority rule.")
    rows = []
    for b in explain_bits(ctx):
      c = lambda key: explain_ms(ctx, b, "curvature", key)
      rows.append([bits_label(b), pm(*c("spearman_size_grad_norm"), "{:.2f}"),
                   pm(*c("spearman_size_top_eigenvalue"), "{:.2f}"), rel(ctx.minority, c("grad_norm")[0]),
                   rel(ctx.minority, c("top_eigenvalue")[0]), rel(ctx.minority, c("trace")[0])])
    self.doc.p("**Curvature** (Spearman correlation with group size per seed, mean ± std; per-group values as "
               "minority / majority means):")
    self.doc.table(["bits", "ρ(size, grad norm)", "ρ(size, top eigenvalue)", "grad norm", "top eigenvalue",
                    "Hessian trace"], rows)
    self.fig("explain_density", verdicts.figure_density(ctx),
             "Each group's Hessian spectral density by stochastic Lanczos quadrature (several random starts, "
             "Gaussian-smoothed; first seed), at full precision and a low bit-width; minority groups dashed.")
    self.theory()

  def theory(self) -> None:
    """The second-order test of the theory (fqjax.explain.theory), when explain computed it."""
    rows = verdicts.theory_rows(self.ctx)
    if not rows:
      return
    self.doc.h(2, "Explain: second-order test of the theory")
    self.fig("explain_theory", verdicts.figure_theory(self.ctx),
             "Per group: the second-order estimate g·d + ½ d·H·d (gradient and Hessian of the group's loss at the "
             "full-precision weights, d = weight change) against the observed excess loss; hollow: minority.")
    self.doc.p("d = quantized − full-precision weights (BatchNorm statistics as trained); correlations over groups "
               "of the estimate with each split's observed excess loss (Spearman / Pearson); p: one-sided permutation "
               "p-value of the Spearman correlation on the curvature split; per-group columns as minority / "
               "majority means over seeds; bound = ||g|| ||d|| + ½ λmax ||d||².")
    self.doc.table(["variant", "bits", "‖d‖", "ρ / r by split", "p", "observed excess loss", "second-order estimate",
                    "bound"], rows)

  def mitigate(self) -> None:
    ctx, m = self.ctx, self.open_section("Mitigation ablation", "mitigate")
    if not m:
      return
    summary = m.get("summary") if isinstance(m.get("summary"), Mapping) else None
    done = _finished_entries(ctx, m)
    unfinished = any(n < len(ctx.seeds) for n in done.values())
    self.sections["mitigate"] = "incomplete" if unfinished or summary is None else "ok"
    if summary is None:
      self.doc.missing(f"the mitigate stage has not finished ({sum(done.values())} of {len(done) * len(ctx.seeds)} "
                       "(method, bit-width, seed) entries done), so results.json has no summary over seeds yet; "
                       "rerun the mitigate stage to complete it.")
      self.doc.table(["bits", "method", "seeds finished"],
                     [[b, method, f"{n} of {len(ctx.seeds)}"] for (method, b), n in done.items()])
      return
    if unfinished:
      self.doc.missing("the mitigate stage has not finished every (method, bit-width, seed); the table shows the "
                       "summary as last stored (rerun the mitigate stage to complete it).")
    control = (" `fair_ft` fine-tunes without quantization: the full-precision control, at the full-precision size."
               if "fair_ft" in m.get("methods", []) else "")
    self.doc.p("Each method fine-tunes (or, for `ptq`, only quantizes) the same full-precision model." + control +
               " Mean ± std over seeds as stored in `mitigate.summary`; **bold**: best per column and bit-width "
               "(`mitigate.best`: highest accuracy / worst group, lowest fairness violation, size, optimizer steps, "
               "training time). A method that ran at other weight bits than the target names them, e.g. "
               "`qat_equal_size (5b)` (uniform bits matching mixed precision's size).")
    self.doc.table(["bits", "method"] + [c[1] for c in ABLATION_COLUMNS], _ablation_rows(m))
    self.doc.p(_steps_sentence(m))
    metric, rows, grid_size = _selection_rows(ctx, m)
    if rows:
      on = "validation worst-group accuracy" if metric == "val_worst_group_accuracy" else f"`{metric}`"
      if grid_size > 1:
        self.doc.p(f"Each training method's setting was chosen from `mitigate.grid` ({grid_size} settings) on {on}; "
                   "test numbers are of the chosen setting only. **Chosen setting** (the most frequent over seeds):")
        self.doc.table(["method"] + [f"{b} bits" for b in sorted_bits(m.get("bit_widths", []))], rows)
      else:
        self.doc.p(f"Settings: one grid setting per method (no choice made on {on}).")
    self.fig("mitigate_ablation", figure_mitigate_ablation(ctx, summary),
             "Fairness violation and worst-group accuracy per method and target bit-width (mean ± std over seeds).")
    self.fig("mitigate_pareto", figure_mitigate_pareto(ctx, summary),
             "Worst-group accuracy (left) and fairness violation (right) against model size in KB (log scale when "
             "the sizes span more than 4×) for every method and target bit-width (mean ± std over seeds; labels: "
             "target bits, → the bits used where they differ). Circled, joined by dashed steps: the Pareto front, "
             "the highest worst-group accuracy / lowest fairness violation at no larger size.")
    rows = verdicts.allocation_rows(ctx, m)
    if rows:
      self.doc.p("**Per-layer bits of the allocation methods** (fqjax.study.allocate; the most frequent over seeds; layers "
                 "in forward order): `fair_alloc*` minimizes the worst group's predicted excess loss, `blind_alloc*` "
                 "the whole training loss's, within the same byte budget.")
      self.doc.table(["method", "bits", "per-layer bits", "budget KB", "size KB", "worst group's predicted excess loss",
                      "its measured one", "additivity max |error|"], rows)

  def claims(self) -> None:
    ctx = self.ctx
    self.doc.h(2, "Claims")
    try:
      checked, source = claims_lib.check_claims(ctx.results), "computed from this results.json by `fqjax.analysis.claims`"
    except Exception as err:  # a partial or older results.json: fall back on the stored section
      checked, source = ctx.results.get("claims"), f"as stored in results.json ({type(err).__name__}: {err})"
    if not checked:
      return self.absent("claims", "no claims could be checked on this results.json.")
    self.sections["claims"] = "ok"
    self.doc.p(f"Findings of the paper checked on this run ({source}).")
    rows = [[name.replace("_", " "), f"**{c.get('verdict', '?')}**", _claim_numbers(c)]
            for name, c in checked.items() if isinstance(c, Mapping)]
    self.doc.table(["claim", "verdict", "key numbers"], rows)
    for name, c in checked.items():
      rows = verdicts.judgement_rows(c) if isinstance(c, Mapping) else []
      if len(rows) > 1:
        self.doc.details(f"{name.replace('_', ' ')}: {c.get('verdict')}, by variant and definition",
                         "\n".join(" | ".join(r) for r in rows))
    if isinstance(checked.get("rules"), str):
      self.doc.details("The rules behind the verdicts", checked["rules"])

  def run_info(self) -> None:
    r = self.ctx.results
    self.doc.h(2, "Run")
    timings = r.get("timings") or {}
    rows = [[k, num(v, "{:.1f}")] for k, v in timings.items()]
    total = sum(float(v) for v in timings.values() if isinstance(v, (int, float)))
    self.doc.p("**Wall times** of each stage's last run:")
    self.doc.table(["stage", "seconds"], rows + [["total", num(total, "{:.1f}")]])
    files = [f for f in ("results.json", "results.csv", "config.json", "fqjax.log")
             if os.path.exists(os.path.join(self.ctx.workdir, f))]
    if files:
      self.doc.p("Files in the workdir: " + ", ".join(f"`{f}`" for f in files) + ".")
    self.doc.details("Config of this run", json.dumps(r.get("config", {}), indent=1, sort_keys=True), "json")


def _minority_sentence(ctx: Ctx) -> str:
  """The minority rule as fqjax.analysis.claims applies it: train count below half the median group size."""
  rule = "Minority: train count below half the median group size"
  if ctx.minority is not None:
    return f"{rule} (below {ctx.minority_threshold:g} here)."
  if ctx.minority_threshold is None:
    return f"{rule} (none here: there is a single group)."
  return f"{rule} (none here: no group is below {ctx.minority_threshold:g})."


def _ptq_row(ctx: Ctx, b: int) -> list:
  """One row of the PTQ summary table from ptq.summary[b] (and the size, ``tables.ptq_size_bytes``)."""
  s = ptq_summary(ctx, b)
  lo, hi = (num(mean_std_at(dig(s, "fairness_violation_ci", side))[0]) for side in ("low", "high"))
  size = ptq_size_bytes(ctx.results, b)
  return [bits_label(b), num(None if size is None else size / 1024, "{:.1f}"), summary_cell(s.get("accuracy")),
          summary_cell(s.get("worst_group_accuracy")), summary_cell(s.get("fairness_violation")),
          "–" if "–" in (lo, hi) else f"[{lo}, {hi}]", summary_cell(s.get("accuracy_drop"))]


def _seeds_without(ctx: Ctx, p: Mapping) -> list[int]:
  """The study's seeds that lack a ptq.per_seed entry at some bit-width."""
  bits = [str(b) for b in p.get("bit_widths", [])]
  return [int(s) for s in ctx.seeds if any(dig(p, "per_seed", s, b) is None for b in bits)]


def _finished_entries(ctx: Ctx, m: Mapping) -> dict:
  """{(method, bits): how many of the study's seeds have an entry in mitigate.per_seed}."""
  return {(method, b): sum(dig(m, "per_seed", s, method, b) is not None for s in ctx.seeds)
          for b in [str(b) for b in sorted_bits(m.get("bit_widths", []))] for method in m.get("methods", [])}


def _method_label(method: str, b: str, s: Mapping) -> str:
  """'qat_equal_size (5b)' where the summary's weight bits ("w_bits") are not the target ``b``; else the method."""
  w = s.get("w_bits")  # None: mixed precision (or no uniform bits stored)
  return f"{method} ({w}b)" if isinstance(w, int) and not isinstance(w, bool) and w != int(b) else method


def _ablation_rows(m: Mapping) -> list:
  """The ablation table from mitigate.summary; the cell of mitigate.best's method per column in bold."""
  rows = []
  for b in [str(b) for b in sorted_bits(m.get("bit_widths", []))]:
    best = dig(m, "best", b) or {}
    for method in m.get("methods", []):
      s = dig(m, "summary", method, b) or {}
      row = [b, _method_label(method, b, s)]
      for key, _, scale, fmt in ABLATION_COLUMNS:
        cell = summary_cell(s.get(key), fmt, scale)
        row.append(f"**{cell}**" if best.get(key) == method and cell not in (EMPTY, "–") else cell)
      rows.append(row)
  return rows


def _steps_text(x: float) -> str:
  return f"{x:.0f}" if float(x).is_integer() else f"{x:.1f}"


def _steps_sentence(m: Mapping) -> str:
  """Whether every training method ran the same optimizer steps (mitigate.summary steps, mean over seeds);
  else the (method, bit-width) entries that differ from the most common count."""
  steps = {}
  for b in [str(b) for b in sorted_bits(m.get("bit_widths", []))]:
    for method in m.get("methods", []):
      mean = mean_std_at(dig(m, "summary", method, b, "steps"))[0]
      if np.isfinite(mean) and mean > 0:  # 0 steps: a method that does not train (ptq)
        steps[(method, b)] = float(mean)
  if not steps:
    return "No training method has a stored optimizer step count (`steps`)."
  counts = list(steps.values())
  common = max(counts, key=counts.count)
  if all(v == common for v in counts):
    names = ", ".join(f"`{x}`" for x in dict.fromkeys(method for method, _ in steps))
    return f"Every training method ({names}) ran the same number of optimizer steps ({_steps_text(common)})."
  odd = ", ".join(f"`{method}` {_steps_text(v)} at {b} bits" for (method, b), v in steps.items() if v != common)
  return (f"The training methods did not all run the same number of optimizer steps (mean over seeds): most ran "
          f"{_steps_text(common)}, but {odd}.")


def _selection_rows(ctx: Ctx, m: Mapping) -> tuple:
  """(selection metric, rows, largest grid): per trained method, the grid setting chosen most often over the
  seeds at each bit-width, e.g. 'learning_rate=0.03 (2/3 seeds)'; '–' where no seed has a selection."""
  metric, rows, grid_size = None, [], 0
  for method in m.get("methods", []):
    cells = []
    for b in [str(b) for b in sorted_bits(m.get("bit_widths", []))]:
      sels = [x for x in (dig(m, "per_seed", s, method, b, "selection") for s in ctx.seeds) if isinstance(x, Mapping)]
      if not sels:
        cells.append("–")
        continue
      metric = metric or sels[0].get("metric")
      grid_size = max([grid_size] + [len(x.get("grid") or []) for x in sels])
      chosen = [", ".join(f"{k}={v}" for k, v in (x.get("chosen") or {}).items()) or "default" for x in sels]
      top = max(dict.fromkeys(chosen), key=chosen.count)  # ties: the first seed's choice
      cells.append(f"{top} ({chosen.count(top)}/{len(sels)} seeds)")
    if any(c != "–" for c in cells):
      rows.append([method] + cells)
  return metric, rows, grid_size


def _claim_numbers(c: Mapping) -> str:
  if c.get("verdict") == "not tested":
    return str(c.get("why", "")) + (f" (groups without data: {', '.join(str(g) for g in c['groups_without_data'])})"
                                    if c.get("groups_without_data") and "no test rows" not in str(c.get("why"))
                                    else "")
  parts = []
  if "spearman_bits_vs_fairness_violation" in c:
    parts.append(f"Spearman(bits, FV) = {num(c['spearman_bits_vs_fairness_violation'], '{:.2f}')}; FV lowest − "
                 f"highest bits = {num(c.get('increase_lowest_vs_highest_bits'))} (std at lowest "
                 f"{num(c.get('std_at_lowest_bits'))})")
  per_bits = c.get("per_bits") or {}
  for b in sorted(per_bits, key=lambda k: -int(k)):
    v = per_bits[b]
    mark = "✓" if v.get("holds") else "✗"
    if "minority_mean" in v:
      rho = f", ρ(size) {num(v['spearman_size'], '{:.2f}')}" if "spearman_size" in v else ""
      parts.append(f"{b}-bit: minority {num(v['minority_mean'], '{:.3g}')} vs majority "
                   f"{num(v.get('majority_mean'), '{:.3g}')}{rho} {mark}")
    elif isinstance(v.get("fairness_violation"), Mapping):
      fv = v["fairness_violation"]
      parts.append(f"{b}-bit: FV " + " / ".join(f"{k} {num(fv.get(k))}" for k in ("fairqat", "ptq", "qat"))
                   + f", accuracy loss vs qat {num(v.get('accuracy_loss_vs_qat'))} (qat std "
                   f"{num(v.get('qat_accuracy_std'))}) {mark}")
  for b, why in (c.get("not_tested_at") or {}).items():
    parts.append(f"{b}-bit: not tested ({why})")
  if c.get("groups_without_data"):
    ids = [str(g) for g in c["groups_without_data"]]
    parts.append(f"left out (no data): group{'s' if len(ids) > 1 else ''} {', '.join(ids)}")
  return "; ".join(parts) or "–"
