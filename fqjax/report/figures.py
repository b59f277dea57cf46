"""The report's figures, drawn on matplotlib's Agg canvas (no pyplot, no display, no global backend change).

Each figure_* function takes a Ctx and returns a Figure, or None when its data is not in results.json.
"""
from __future__ import annotations

import os
import tempfile
from typing import Mapping, Optional

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fqjax.analysis.metrics import spearman
from fqjax.report.common import (FULL, FILE_MODE, Ctx, bits_label, dig, explain_bits, explain_ms, floats, mean_std_at,
                                 finite_mean, num, ptq_summary, sorted_bits)

DPI = 110


def new_figure(width: float, height: float, ncols: int = 1):
  fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
  FigureCanvasAgg(fig)
  axes = fig.subplots(1, ncols, squeeze=False)[0]
  for ax in axes:
    ax.grid(True, alpha=0.3)
  return fig, axes


def group_colors(n: int) -> list:
  from matplotlib import colormaps
  if n <= 10:
    return [colormaps["tab10"](i) for i in range(n)]
  if n <= 20:
    return [colormaps["tab20"](i) for i in range(n)]
  return [colormaps["turbo"](i / max(n - 1, 1)) for i in range(n)]


def bits_colors(n: int) -> list:
  from matplotlib import colormaps
  return [colormaps["plasma"](0.1 + 0.75 * i / max(n - 1, 1)) for i in range(n)]


def save_png(fig: Figure, path: str) -> None:
  """Atomic: a temporary file in the same folder, then os.replace."""
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp_", suffix=".png")
  os.close(fd)
  try:
    fig.savefig(tmp, format="png", dpi=DPI)
    os.chmod(tmp, FILE_MODE)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def _group_means(cells, num_groups: int) -> np.ndarray:
  """[G] means of a stored per-group summary (a list of mean_std dicts); NaN where missing."""
  if not isinstance(cells, list) or len(cells) != num_groups:
    return np.full(num_groups, np.nan)
  return np.asarray([mean_std_at(c)[0] for c in cells], np.float64)


def figure_ptq_group_accuracy(ctx: Ctx) -> Optional[Figure]:
  """Per-group test accuracy (ptq.summary mean over seeds) against the PTQ bit-width; minority groups dashed."""
  p = ctx.results.get("ptq")
  if not p or not isinstance(p.get("summary"), Mapping):
    return None
  bits = sorted_bits(p.get("bit_widths", []))
  acc = np.stack([_group_means(dig(ptq_summary(ctx, b), "groups", "accuracy"), ctx.num_groups)
                  for b in bits])  # [B, G]
  fig, (ax,) = new_figure(9.5, 5.0)
  x = np.arange(len(bits))
  colors = group_colors(ctx.num_groups)
  empty = [g for g in range(ctx.num_groups) if not np.isfinite(acc[:, g]).any()]  # no test rows: nothing to draw
  for g in range(ctx.num_groups):
    if g in empty:
      continue
    mino = ctx.is_minority(g)
    ax.plot(x, acc[:, g], linestyle="--" if mino else "-", marker="o" if mino else "s", markersize=5,
            linewidth=2.0 if mino else 1.4, color=colors[g], markerfacecolor="white" if mino else colors[g],
            label=ctx.group_label(g))
  ax.set_xticks(x, [bits_label(b) for b in bits])
  ax.set_xlabel("weight bit-width (post-training quantization)")
  ax.set_ylabel(f"test accuracy (mean over {len(ctx.seeds)} seed(s))")
  ax.set_title("Per-group accuracy against bit-width" + ("  (dashed: minority groups)" if ctx.minority is not None
                                                          else ""))
  if empty:
    ax.text(0.01, 0.01, "not drawn (no test rows): " + ", ".join(ctx.names[g] for g in empty), fontsize="small",
            transform=ax.transAxes, va="bottom")
  if len(empty) < ctx.num_groups:
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small", title="group (train count)")
  return fig


def figure_ptq_fairness(ctx: Ctx) -> Optional[Figure]:
  """Fairness violation with std error bars (and bootstrap CI band); overall and worst-group accuracy.

  All from ptq.summary[bits]: mean ± std over seeds; the band is the mean over seeds of the CI bounds.
  """
  p = ctx.results.get("ptq")
  if not p or not isinstance(p.get("summary"), Mapping):
    return None
  bits = sorted_bits(p.get("bit_widths", []))
  x = np.arange(len(bits))
  ms = lambda key: np.asarray([mean_std_at(dig(ptq_summary(ctx, b), *key)) for b in bits], np.float64).T  # [2, B]
  fig, (ax1, ax2) = new_figure(11.5, 4.4, 2)
  fv = ms(("fairness_violation",))
  low, high = ms(("fairness_violation_ci", "low"))[0], ms(("fairness_violation_ci", "high"))[0]
  if np.isfinite(low).any():
    ax1.fill_between(x, low, high, color="tab:red", alpha=0.15, label="bootstrap CI (mean over seeds)")
  ax1.errorbar(x, fv[0], yerr=fv[1], color="tab:red", marker="o", capsize=4, label="mean ± std over seeds")
  ax1.set_title("Fairness violation (max − min group accuracy)")
  ax1.set_ylabel("fairness violation")
  for key, color, label in (("accuracy", "tab:blue", "overall accuracy"),
                            ("worst_group_accuracy", "tab:orange", "worst-group accuracy")):
    m = ms((key,))
    ax2.errorbar(x, m[0], yerr=m[1], color=color, marker="o", capsize=4, label=label)
  ax2.set_title("Overall and worst-group accuracy")
  ax2.set_ylabel("test accuracy (mean ± std over seeds)")
  for ax in (ax1, ax2):
    ax.set_xticks(x, [bits_label(b) for b in bits])
    ax.set_xlabel("weight bit-width (post-training quantization)")
    ax.legend(fontsize="small")
  return fig


def ptq_variant_summaries(ctx: Ctx) -> dict:
  """{variant name: its ptq summary {bits: Summary}}: the primary variant first, then ptq.variants (stored order);
  only variants whose summary is stored."""
  p = ctx.results.get("ptq") or {}
  out = {p.get("variant", "max/keep"): p.get("summary")}
  out.update({name: entry.get("summary") for name, entry in (p.get("variants") or {}).items()})
  return {name: s for name, s in out.items() if isinstance(s, Mapping)}


def figure_ptq_variants(ctx: Ctx) -> Optional[Figure]:
  """Fairness violation and worst-group accuracy (mean ± std over seeds) against bit-width, one line per PTQ
  variant ("<weight scale>/<BatchNorm>"); None unless the study compared two or more variants."""
  summaries = ptq_variant_summaries(ctx)
  if len(summaries) < 2:
    return None
  bits = sorted_bits(ctx.results["ptq"].get("bit_widths", []))
  x = np.arange(len(bits))
  fig, (ax1, ax2) = new_figure(11.5, 4.4, 2)
  for name, summary in summaries.items():
    for ax, key in ((ax1, "fairness_violation"), (ax2, "worst_group_accuracy")):
      ms = np.asarray([mean_std_at(dig(summary, str(b), key)) for b in bits], np.float64).T  # [2, B]
      ax.errorbar(x, ms[0], yerr=ms[1], marker="o", capsize=4, label=name)
  ax1.set_title("Fairness violation by PTQ variant")
  ax1.set_ylabel("fairness violation (mean ± std over seeds)")
  ax2.set_title("Worst-group accuracy by PTQ variant")
  ax2.set_ylabel("worst-group test accuracy")
  for ax in (ax1, ax2):
    ax.set_xticks(x, [bits_label(b) for b in bits])
    ax.set_xlabel("weight bit-width (post-training quantization)")
    ax.legend(fontsize="small", title="weight scale / BatchNorm")
  return fig


def figure_explain_weights(ctx: Ctx) -> Optional[Figure]:
  """Induced sparsity and relative L2 error of each layer's weights against bit-width."""
  bits = [b for b in explain_bits(ctx) if b < FULL]
  per_seed = dig(ctx.results, "explain", "per_seed") or {}
  layer_names = []
  for s in ctx.seeds:
    for b in bits:
      for name in dig(per_seed, s, b, "weights", "per_layer") or {}:
        if name not in layer_names:
          layer_names.append(name)
  order = [n for n in ctx.results.get("model", {}).get("layer_names", []) if n in layer_names]
  layer_names = order + [n for n in layer_names if n not in order]
  if not bits or not layer_names:
    return None
  fig, axes = new_figure(12.0, 4.6, 2)
  x = np.arange(len(bits))
  colors = [c for c in bits_colors(len(layer_names))]
  keys = (("induced_sparsity", "induced sparsity (W≠0, Q(W)=0)", "Induced sparsity per layer"),
          ("rel_l2", "relative L2 error ‖Q(W)−W‖/‖W‖", "Relative L2 weight error per layer"))
  for ax, (key, ylabel, title) in zip(axes, keys):
    for name, color in zip(layer_names, colors):
      ax.plot(x, [explain_ms(ctx, b, "weights", "per_layer", name, key)[0] for b in bits], marker="o",
              markersize=4, color=color, label=name)
    ax.plot(x, [explain_ms(ctx, b, "weights", "model", key)[0] for b in bits], color="black", linewidth=2.4,
            linestyle="--", label="whole model")
    vals = np.asarray([explain_ms(ctx, b, "weights", "model", key)[0] for b in bits])
    if key == "rel_l2" and np.all(np.isfinite(vals)) and np.all(vals > 0):
      ax.set_yscale("log")
    ax.set_xticks(x, [bits_label(b) for b in bits])
    ax.set_xlabel("weight bit-width")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
  axes[1].legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="x-small", title="layer",
                 ncol=2 if len(layer_names) > 14 else 1)
  return fig


def _log_axis(axis, set_scale, values: np.ndarray) -> None:
  """Log scale with plain-number tick labels (20, 50, 100 rather than 2×10^1); more labels on a short range."""
  from matplotlib import ticker
  set_scale("log")
  values = values[np.isfinite(values) & (values > 0)]
  decades = np.log10(values.max() / values.min()) if values.size else 3.0
  labelled = "23456789" if decades < 0.7 else "2345" if decades < 1.5 else "25" if decades < 3 else ""
  axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
  axis.set_minor_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.1e}"[0] in labelled else ""))


def _shade_minority_columns(ax, ctx: Ctx, order: list[int]) -> None:
  first = True
  for i, g in enumerate(order):
    if ctx.is_minority(g):
      ax.axvspan(i - 0.5, i + 0.5, color="0.85", alpha=0.6, zorder=0, label="minority group" if first else None)
      first = False


def figure_explain_logits(ctx: Ctx) -> Optional[Figure]:
  """Logit variance, true-class probability and margin per group: full precision and each bit-width."""
  bits = [b for b in explain_bits(ctx) if b < FULL]
  panels = ((("logits", "variance"), "logit variance over classes", "Logit variance"),
            (("softmax", "true_prob"), "true-class probability p_y", "True-class probability"),
            (("softmax", "margin"), "margin p_y − max_{c≠y} p_c", "Margin (< 0: misclassified)"))
  if not bits or all(np.all(np.isnan(explain_ms(ctx, b, *panels[0][0])[0])) for b in bits):
    return None
  order = ctx.size_order()
  x = np.arange(len(order))
  colors = bits_colors(len(bits))
  fig, axes = new_figure(15.0, 4.8, 3)
  for ax, (path, ylabel, title) in zip(axes, panels):
    _shade_minority_columns(ax, ctx, order)
    fp_path = path[:-1] + (path[-1] + "_fp",)
    fp = finite_mean(np.stack([explain_ms(ctx, b, *fp_path)[0] * np.ones(ctx.num_groups) for b in bits]), axis=0) \
        if any(np.isfinite(explain_ms(ctx, b, *fp_path)[0]).any() for b in bits) else None
    if fp is not None:
      ax.plot(x, fp[order], color="black", linewidth=2.4, marker="s", label="full precision")
    for b, color in zip(bits, colors):
      v = explain_ms(ctx, b, *path)[0] * np.ones(ctx.num_groups)
      ax.plot(x, v[order], color=color, marker="o", markersize=4, label=f"{b}-bit")
    ax.set_xticks(x, [ctx.names[g] for g in order], rotation=45 if len(order) > 5 else 0,
                  ha="right" if len(order) > 5 else "center")
    ax.set_xlabel("group (sorted by train count, smallest first)")
    ax.set_ylabel(ylabel + " (group mean)")
    ax.set_title(title)
  axes[-1].legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small")
  return fig


def figure_explain_curvature(ctx: Ctx) -> Optional[Figure]:
  """Per-group gradient norm and top Hessian eigenvalue against group (train) size.

  Shaded: sizes from below the smallest group up to claims.minority_threshold (half the median train
  count), so exactly the minority groups lie in the band.
  """
  e = ctx.results.get("explain") or {}
  bits = explain_bits(ctx)
  sizes = np.asarray(floats(e.get("group_sizes") or ctx.train_counts or []), np.float64)
  if not bits or sizes.shape != (ctx.num_groups,) or all(
      np.all(np.isnan(explain_ms(ctx, b, "curvature", "grad_norm")[0])) for b in bits):
    return None
  order = np.argsort(sizes, kind="stable")
  colors = bits_colors(len(bits))
  fig, axes = new_figure(12.5, 4.8, 2)
  for ax, key, ylabel, title in zip(axes, ("grad_norm", "top_eigenvalue"),
                                    ("gradient norm ‖∇L_g‖", "top Hessian eigenvalue λ_max(H_g)"),
                                    ("Gradient norm against group size",
                                     "Top Hessian eigenvalue against group size")):
    all_vals = []
    for b, color in zip(bits, colors):
      m, s = explain_ms(ctx, b, "curvature", key)
      m, s = m * np.ones(ctx.num_groups), s * np.ones(ctx.num_groups)
      if not np.isfinite(m).any():
        continue
      rho = spearman(sizes, m)
      label = ("full precision" if b >= FULL else f"{b}-bit") + f" (Spearman ρ={num(rho, '{:.2f}')})"
      ax.errorbar(sizes[order], m[order], yerr=s[order], marker="o", markersize=5, capsize=3, color=color,
                  linewidth=2.4 if b >= FULL else 1.4, label=label)
      all_vals.append(m)
    vals = np.concatenate(all_vals) if all_vals else np.array([])
    if sizes.min() > 0:
      _log_axis(ax.xaxis, ax.set_xscale, sizes)
    if vals.size and np.all(vals[np.isfinite(vals)] > 0):
      _log_axis(ax.yaxis, ax.set_yscale, vals)
    if ctx.minority is not None:  # the claims' rule: below half the median train count, nothing above it
      ax.axvspan(sizes.min() / 1.15, ctx.minority_threshold, color="0.85", alpha=0.6, zorder=0,
                 label=f"minority (below half the median size, {ctx.minority_threshold:g})")
    ax.set_xlabel("group size (training examples)")
    ax.set_ylabel(ylabel + " (mean ± std over seeds)")
    ax.set_title(title)
    ax.legend(fontsize="x-small")
  return fig


def figure_mitigate_ablation(ctx: Ctx, summary: Mapping) -> Optional[Figure]:
  """Fairness violation and worst-group accuracy per method and bit-width (std error bars).

  summary: mitigate.summary as stored, {method: {bits: {column: mean_std dict}}}.
  """
  m = ctx.results["mitigate"]
  methods, bits = list(m.get("methods", [])), [str(b) for b in sorted_bits(m.get("bit_widths", []))]
  if not methods or not bits:
    return None
  fig, axes = new_figure(12.0, 4.6, 2)
  width = 0.8 / len(methods)
  colors = group_colors(len(methods))
  for ax, key, title in zip(axes, ("fairness_violation", "worst_group_accuracy"),
                            ("fairness violation (lower is better)", "worst-group accuracy (higher is better)")):
    for i, (method, color) in enumerate(zip(methods, colors)):
      mean, std = np.asarray([mean_std_at(dig(summary, method, b, key)) for b in bits], np.float64).T
      ax.bar(np.arange(len(bits)) + (i - (len(methods) - 1) / 2) * width, mean, width, yerr=std, capsize=3,
             color=color, edgecolor="black", linewidth=0.5, label=method)
    ax.set_xticks(np.arange(len(bits)), [f"{b}-bit" for b in bits])
    ax.set_xlabel("target weight bit-width")
    ax.set_ylabel(title.split(" (")[0] + " (mean ± std over seeds)")
    ax.set_title(title.capitalize())
  axes[1].legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small", title="method")
  return fig


_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p")


def pareto_front(sizes, values, maximize: bool = True) -> list[int]:
  """Indices of the Pareto front, smallest size first: the points better in ``values`` (higher when
  ``maximize``, else lower) than every point of no larger size. Non-finite points are left out."""
  sizes, values = np.asarray(sizes, np.float64), np.asarray(values, np.float64)
  sign = 1.0 if maximize else -1.0
  ok = [i for i in range(len(sizes)) if np.isfinite(sizes[i]) and np.isfinite(values[i])]
  front, best = [], -np.inf
  for i in sorted(ok, key=lambda i: (sizes[i], -sign * values[i])):  # at one size, its best point first
    if sign * values[i] > best:
      front.append(i)
      best = sign * values[i]
  return front


def _pareto_points(ctx: Ctx, summary: Mapping) -> list[tuple]:
  """(method, target bits, label, size KB mean, std, {column: (mean, std)}) for each stored summary cell."""
  m = ctx.results["mitigate"]
  points = []
  for method in m.get("methods", []):
    for b in sorted_bits(m.get("bit_widths", [])):
      s = dig(summary, method, b)
      if not isinstance(s, Mapping):
        continue
      size, size_std = (v / 1024 for v in mean_std_at(s.get("size_bytes")))
      w = s.get("w_bits")  # the weight bits used, shown where they are not the target
      label = f"{b}→{w}b" if isinstance(w, int) and not isinstance(w, bool) and w != b else f"{b}b"
      points.append((method, b, label, size, size_std,
                     {key: mean_std_at(s.get(key)) for key in ("worst_group_accuracy", "fairness_violation")}))
  return points


def figure_mitigate_pareto(ctx: Ctx, summary: Optional[Mapping]) -> Optional[Figure]:
  """Worst-group accuracy and fairness violation against model size (KB) for every method and target
  bit-width (mean ± std over seeds), one marker and colour per method, the bits next to each point; the
  Pareto front (best value at no larger size) as a step line. Log x when the sizes span more than 4x.

  summary: mitigate.summary as stored; None without one.
  """
  if not isinstance(summary, Mapping):
    return None
  points = _pareto_points(ctx, summary)
  sizes = np.asarray([p[3] for p in points], np.float64)
  if not np.isfinite(sizes).any():
    return None
  methods = list(dict.fromkeys(p[0] for p in points))
  colors = group_colors(len(methods))
  style = {mth: (colors[i], _MARKERS[i % len(_MARKERS)]) for i, mth in enumerate(methods)}
  fig, axes = new_figure(12.5, 4.8, 2)
  for ax, key, maximize, title in ((axes[0], "worst_group_accuracy", True, "Worst-group accuracy (higher is better)"),
                                   (axes[1], "fairness_violation", False, "Fairness violation (lower is better)")):
    drawn = set()
    for method, _, label, size, size_std, cols in points:
      (mean, std), (color, marker) = cols[key], style[method]
      if not (np.isfinite(size) and np.isfinite(mean)):
        continue
      ax.errorbar([size], [mean], xerr=[size_std], yerr=[std], color=color, marker=marker, markersize=7,
                  capsize=3, linestyle="none", label=None if method in drawn else method)
      drawn.add(method)
      ax.annotate(label, (size, mean), textcoords="offset points", xytext=(5, 4), fontsize="x-small")
    values = np.asarray([p[5][key][0] for p in points], np.float64)
    front = pareto_front(sizes, values, maximize)
    if front:  # held flat out to the largest size: beyond its last point the front does not improve
      xs = np.append(sizes[front], np.nanmax(sizes))
      ax.step(xs, np.append(values[front], values[front[-1]]), where="post", color="black", linestyle="--",
              linewidth=1.2, zorder=1, label="Pareto front")
      ax.scatter(sizes[front], values[front], s=160, facecolors="none", edgecolors="black", linewidths=1.0,
                 zorder=1)
    finite = sizes[np.isfinite(sizes) & (sizes > 0)]
    if finite.size and finite.max() > 4 * finite.min():  # sizes spanning more than 4x: log scale
      _log_axis(ax.xaxis, ax.set_xscale, finite)
    ax.set_xlabel("model size (KB, mean over seeds)")
    ax.set_ylabel(title.split(" (")[0].lower() + " (mean ± std over seeds)")
    ax.set_title(title)
  axes[1].legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small", title="method")
  return fig
