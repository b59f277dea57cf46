"""The report's parts for issue 12's verdicts: PTQ intervals, per-group accuracy by variant, the second-order
test of the theory, and each claim's judgements (variant | definition -> verdict).

Figures and tables read what the runner stored: ptq holders' "intervals" (fqjax.analysis.stats.intervals per
bit-width), explain holders' "theory" (fqjax.analysis.summaries.theory_table), and the claims' "judgements".
"""
from __future__ import annotations

from typing import Mapping, Optional

import numpy as np
from matplotlib.figure import Figure

from fqjax.analysis.judgements import holders
from fqjax.report.common import FULL, bits_label, Ctx, dig, num, sorted_bits
from fqjax.report.figures import bits_colors, group_colors, new_figure


def _interval(node: Optional[Mapping], fmt: str = "{:.3f}") -> str:
  """'mean [low, high]' of a {"mean", "low", "high"} dict; '–' without a mean."""
  mean = num(dig(node, "mean"), fmt)
  if mean == "–":
    return mean
  return f"{mean} [{num(dig(node, 'low'), fmt)}, {num(dig(node, 'high'), fmt)}]"


def ptq_holders(ctx: Ctx) -> dict:
  p = ctx.results.get("ptq")
  return holders(p, ctx.results) if isinstance(p, Mapping) else {}


def interval_rows(ctx: Ctx) -> list:
  """Per variant and bit-width: worst-group accuracy and the minority-minus-majority drop difference D, each
  'mean [95% interval]', and the accuracy claim's status there."""
  judgements = dig(ctx.results, "claims", "minority_loses_more_accuracy", "judgements") or {}
  rows = []
  for name, holder in ptq_holders(ctx).items():
    intervals = holder.get("intervals") or {}
    per_bits = dig(judgements, f"{name} | accuracy_drop", "per_bits") or {}
    for b in sorted_bits(intervals):
      iv = intervals[str(b)]
      status = dig(per_bits, str(b), "status") or ("–" if b >= FULL else "not judged")
      collapsed = " (collapsed)" if dig(per_bits, str(b), "collapsed") else ""
      rows.append([name, bits_label(b), _interval(iv.get("worst_group_accuracy")),
                   _interval(iv.get("drop_difference")), status + collapsed])
  return rows


def figure_variant_groups(ctx: Ctx) -> Optional[Figure]:
  """Per-group test accuracy against bit-width, one panel per PTQ variant (mean over seeds; band: the group's
  95% bootstrap interval); minority groups dashed. None without intervals."""
  variants = {n: h.get("intervals") for n, h in ptq_holders(ctx).items() if isinstance(h.get("intervals"), Mapping)}
  variants = {n: iv for n, iv in variants.items() if iv}
  if not variants:
    return None
  fig, axes = new_figure(5.2 * len(variants), 4.4, len(variants))
  axes = np.atleast_1d(axes)
  colors = group_colors(ctx.num_groups)
  for ax, (name, intervals) in zip(axes, variants.items()):
    bits = sorted_bits(intervals)
    x = np.arange(len(bits))
    for g in ctx.size_order():
      cell = lambda b, k: dig(intervals, str(b), "group_accuracy", k)
      vals = {k: np.asarray([np.nan if (cell(b, k) or [None] * (g + 1))[g] is None else cell(b, k)[g]
                             for b in bits], np.float64) for k in ("mean", "low", "high")}
      style = "--" if ctx.is_minority(g) else "-"
      ax.plot(x, vals["mean"], style, marker="o", color=colors[g], label=ctx.group_label(g))
      ax.fill_between(x, vals["low"], vals["high"], color=colors[g], alpha=0.12)
    ax.set_title(f"PTQ {name}")
    ax.set_xticks(x, [bits_label(b) for b in bits])
    ax.set_xlabel("weight bit-width")
    ax.set_ylim(-0.02, 1.02)
  axes[0].set_ylabel("group test accuracy (mean over seeds, 95% interval)")
  axes[-1].legend(fontsize="x-small", ncol=2)
  return fig


def explain_holders(ctx: Ctx) -> dict:
  e = ctx.results.get("explain")
  return holders(e, ctx.results) if isinstance(e, Mapping) else {}


def figure_theory(ctx: Ctx) -> Optional[Figure]:
  """Second-order estimate g.d + 1/2 d.H.d against the observed excess loss per group (curvature split; means over
  seeds), one panel per variant, one colour per bit-width, hollow markers for minority groups, symlog axes; the
  diagonal is a perfect prediction. None without theory tables."""
  split = dig(ctx.results, "explain", "curvature_split") or "train"
  tables = {n: h.get("theory") for n, h in explain_holders(ctx).items() if h.get("theory")}
  if not tables:
    return None
  fig, axes = new_figure(5.0 * len(tables), 4.6, len(tables))
  axes = np.atleast_1d(axes)
  for ax, (name, table) in zip(axes, tables.items()):
    bits = sorted_bits(table)
    colors = bits_colors(len(bits))
    lo, hi = np.inf, -np.inf
    for color, b in zip(colors, bits):
      pred = np.asarray(floats(table[str(b)]["second_order"]))
      obs = np.asarray(floats(dig(table, str(b), "observed_excess_loss", split) or []))
      if pred.shape != obs.shape:
        continue
      for g in range(len(pred)):
        ax.scatter(obs[g], pred[g], s=36, edgecolors=color, facecolors="none" if ctx.is_minority(g) else color,
                   label=f"{bits_label(b)} bits" if g == 0 else None)
      finite = np.concatenate([pred[np.isfinite(pred)], obs[np.isfinite(obs)]])
      if finite.size:
        lo, hi = min(lo, finite.min()), max(hi, finite.max())
    if np.isfinite(lo):
      ax.plot(np.linspace(lo, hi, 200), np.linspace(lo, hi, 200), color="grey", lw=1, ls=":")
    # Excess losses span orders of magnitude across bit-widths (and can be negative): symmetric log axes.
    for set_scale in (ax.set_xscale, ax.set_yscale):
      set_scale("symlog", linthresh=1e-3)
    ax.set_title(f"Second-order test, PTQ {name}")
    ax.set_xlabel(f"observed excess loss ({split})")
    ax.legend(fontsize="x-small")
  axes[0].set_ylabel("second-order estimate g·d + ½ d·H·d")
  return fig


def floats(values) -> list:
  return [np.nan if v is None else float(v) for v in (values or [])]


def theory_rows(ctx: Ctx) -> list:
  """Per variant and bit-width: ||d||, Spearman / Pearson of the estimate against each split's excess loss,
  minority / majority means of observed, estimate and bound, and the claim's mark."""
  judgements = dig(ctx.results, "claims", "second_order_estimate_orders_excess_loss", "judgements") or {}
  split = dig(ctx.results, "explain", "curvature_split") or "train"
  rows = []
  for name, holder in explain_holders(ctx).items():
    for b in sorted_bits(holder.get("theory") or {}):
      row = holder["theory"][str(b)]
      corr = " ; ".join(f"{s}: {num(c.get('spearman'), '{:.2f}')} / {num(c.get('pearson'), '{:.2f}')}"
                        for s, c in (row.get("correlations") or {}).items())
      means = lambda values: _split_means(ctx, values)
      p = dig(judgements, f"{name} | second_order_estimate", "per_bits", str(b), "p_value")
      rows.append([name, bits_label(b), num(row.get("d_norm"), "{:.3g}"), corr, num(p, "{:.3f}"),
                   means(dig(row, "observed_excess_loss", split)), means(row.get("second_order")),
                   means(row.get("bound"))])
  return rows


def _split_means(ctx: Ctx, values) -> str:
  """'minority / majority' means of a [G] list (all groups' mean when there is no minority)."""
  v = np.asarray(floats(values), np.float64)
  if v.shape != (ctx.num_groups,) or not np.isfinite(v).any():
    return "–"
  if ctx.minority is None:
    return num(np.nanmean(v), "{:.3g}")
  return f"{num(np.nanmean(v[ctx.minority]), '{:.3g}')} / {num(np.nanmean(v[~ctx.minority]), '{:.3g}')}"


def judgement_rows(claim: Mapping) -> list:
  """One row per judgement of a claim: name, verdict, per-bit marks (✓ holds, ✗ not, ~ inconclusive, n/a,
  c: collapsed) or why it is not tested."""
  rows = []
  for name, j in (claim.get("judgements") or {}).items():
    marks = []
    for b, entry in sorted((j.get("per_bits") or {}).items(), key=lambda kv: -int(kv[0])):
      status = entry.get("status") or ("holds" if entry.get("holds") else "does not hold")
      mark = {"holds": "✓", "does not hold": "✗", "inconclusive": "~", "not applicable": "n/a"}.get(status, "?")
      marks.append(f"{b}:{mark}{'c' if entry.get('collapsed') else ''}")
    detail = " ".join(marks) if marks else str(j.get("why", ""))
    rows.append([name, f"**{j.get('verdict')}**", detail, str(j.get("statistic", ""))])
  return rows


def allocation_rows(ctx: Ctx, m: Mapping) -> list:
  """Per allocation method and target bit-width: the per-layer bits chosen most often over seeds ('4/8/2/8',
  layers in forward order, with how many seeds chose it), the budget and size in KB, the means over seeds of the
  worst group's predicted and measured excess loss (allocation split), and the largest additivity error."""
  from collections import Counter
  rows = []
  for method in m.get("methods", []):
    for b in sorted_bits(m.get("bit_widths", [])):
      entries = [dig(m, "per_seed", s, method, b) for s in ctx.seeds]
      allocs = [e.get("allocation") for e in entries if isinstance(e, Mapping) and e.get("allocation")]
      if not allocs:
        continue
      maps = Counter("/".join(str(v) for v in a["layer_bits"].values()) for a in allocs)
      best, count = maps.most_common(1)[0]
      worst = [max(a["predicted_excess_loss"]) for a in allocs if a.get("predicted_excess_loss")]
      sizes = [e["size_bytes"] for e in entries if isinstance(e, Mapping) and "size_bytes" in e]
      measured = [max(a["measured_excess_loss"]) for a in allocs if a.get("measured_excess_loss")]
      errors = [a["additivity_max_abs_error"] for a in allocs if a.get("additivity_max_abs_error") is not None]
      rows.append([method, bits_label(b), f"{best} ({count}/{len(allocs)} seeds)",
                   num(allocs[0]["budget_bytes"] / 1024, "{:.1f}"), num(np.mean(sizes) / 1024, "{:.1f}"),
                   num(np.mean(worst) if worst else None, "{:.3g}"),
                   num(np.mean(measured) if measured else None, "{:.3g}"),
                   num(np.max(errors) if errors else None, "{:.3g}")])
  return rows


def figure_density(ctx: Ctx) -> Optional[Figure]:
  """Per-group Hessian spectral density (stochastic Lanczos quadrature, fqjax.explain.density) of the first seed,
  one panel per bit-width where explain computed it (primary PTQ variant), one line per group (minority dashed),
  log density axis. None when no density was computed."""
  e = ctx.results.get("explain") or {}
  seed = ctx.seeds[0] if ctx.seeds else None
  panels = {b: dig(e, "per_seed", seed, b, "curvature", "density") for b in sorted_bits(e.get("bit_widths", []))}
  panels = {b: d for b, d in panels.items() if isinstance(d, Mapping) and d.get("density")}
  if not panels:
    return None
  fig, axes = new_figure(5.2 * len(panels), 4.2, len(panels))
  colors = group_colors(ctx.num_groups)
  for ax, (b, d) in zip(np.atleast_1d(axes), panels.items()):
    grid = np.asarray(d["grid"], np.float64)
    for g in ctx.size_order():
      dens = np.asarray(floats(d["density"][g]), np.float64)
      ax.plot(grid, np.maximum(dens, 1e-6), "--" if ctx.is_minority(g) else "-", color=colors[g], lw=1.2,
              label=ctx.group_label(g))
    ax.set_yscale("log")
    ax.set_ylim(1e-5, None)
    ax.set_title(f"Hessian spectral density, {bits_label(b)} bits")
    ax.set_xlabel("eigenvalue of the group's loss Hessian")
  np.atleast_1d(axes)[0].set_ylabel(f"density (seed {seed}; Gaussian-smoothed SLQ)")
  np.atleast_1d(axes)[-1].legend(fontsize="x-small", ncol=2)
  return fig
