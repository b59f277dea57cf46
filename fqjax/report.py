"""The study report: report.md, report.html and PNG figures, all from a workdir's results.json.

  python -m fqjax.report WORKDIR          (or the runner's `report` stage)

Writes into WORKDIR:
  report.md      Markdown (figures as relative links)
  report.html    one self-contained page (inline CSS, no scripts); figures are the same relative PNGs
  figures/*.png  ptq_group_accuracy, ptq_fairness, explain_weights, explain_logits_softmax,
                 explain_curvature, mitigate_ablation (each only when its data is in results.json)

Every number comes from results.json (see fqjax.results). Means and standard
deviations (ddof=1) are over seeds, ignoring seeds or values that are missing or
null. Sections whose stage did not run are listed with the command that adds them.
Minority groups (fqjax.claims.minority_mask: train count below half the median) are
drawn dashed / shaded in every figure. Figures use matplotlib's Agg canvas
directly (no pyplot, no display, no global backend change).
"""
from __future__ import annotations

import argparse
import html
import json
import os
import re
import sys
import tempfile
import warnings
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fqjax import claims as claims_lib
from fqjax import results as results_lib

FULL = 32
FIGURES_DIR = "figures"
FIGURE_NAMES = ("ptq_group_accuracy", "ptq_fairness", "explain_weights", "explain_logits_softmax",
                "explain_curvature", "mitigate_ablation")
DPI = 110
# Ablation columns: (key, header, direction of "best", scale, format).
ABLATION_COLUMNS = (("accuracy", "accuracy", "max", 1.0, "{:.3f}"),
                    ("worst_group_accuracy", "worst group", "max", 1.0, "{:.3f}"),
                    ("fairness_violation", "fairness violation", "min", 1.0, "{:.3f}"),
                    ("size_bytes", "size KB", "min", 1 / 1024, "{:.1f}"),
                    ("train_s", "train s", "min", 1.0, "{:.1f}"))
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------
# Numbers: stacking over seeds, mean and std, formatting
# ----------------------------------------------------------------------------

def _dig(node: Any, *path) -> Any:
  """node[path[0]][path[1]]...; None where a key is missing or a node is not a mapping."""
  for key in path:
    if not isinstance(node, Mapping) or str(key) not in node:
      return None
    node = node[str(key)]
  return node


def _floats(value: Any) -> np.ndarray:
  """A number or (nested) list with nulls -> float64 array with NaN."""
  if isinstance(value, (list, tuple)):
    return np.asarray([_floats(v) for v in value], np.float64)
  return np.asarray(np.nan if value is None else value, np.float64)


def _stack(per_seed: Mapping, seeds: Sequence, getter: Callable[[Mapping], Any]) -> Optional[np.ndarray]:
  """[S, ...] array of getter(per_seed[seed]) over the seeds that have a value of a common shape."""
  rows = []
  for s in seeds:
    entry = per_seed.get(str(s)) if isinstance(per_seed, Mapping) else None
    value = getter(entry) if entry is not None else None
    if value is not None:
      try:
        rows.append(_floats(value))
      except (TypeError, ValueError):
        continue
  if not rows or any(r.shape != rows[0].shape for r in rows):
    return None
  return np.stack(rows)


def _mean_std(stack: Optional[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
  """Mean and sample std (ddof=1; 0 for one value) over axis 0, ignoring NaN."""
  if stack is None:
    return np.asarray(np.nan), np.asarray(np.nan)
  n = np.sum(np.isfinite(stack), axis=0)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    mean = np.nanmean(stack, axis=0)
    std = np.where(n > 1, np.nanstd(stack, axis=0, ddof=1), 0.0)
  return mean, np.where(n == 0, np.nan, std)


def _num(x: Any, fmt: str = "{:.3f}") -> str:
  try:
    x = float(x)
  except (TypeError, ValueError):
    return "–"
  return fmt.format(x) if np.isfinite(x) else "–"


def _pm(mean: Any, std: Any, fmt: str = "{:.3f}") -> str:
  m = _num(mean, fmt)
  return m if m == "–" or not np.isfinite(float(std)) else f"{m} ± {_num(std, fmt)}"


def _bits_label(b: int) -> str:
  return f"{b} (FP)" if int(b) >= FULL else str(b)


def _sorted_bits(bits: Sequence) -> list[int]:
  """Full precision first, then fewer and fewer bits (figures read left to right as bits shrink)."""
  return sorted({int(b) for b in bits}, reverse=True)


def _rel(minority: Optional[np.ndarray], values: np.ndarray) -> str:
  """'minority / majority' means of per-group values."""
  if minority is None or values is None or np.ndim(values) != 1 or len(values) != len(minority):
    return "–"
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    return f"{_num(np.nanmean(values[minority]), '{:.3g}')} / {_num(np.nanmean(values[~minority]), '{:.3g}')}"


# ----------------------------------------------------------------------------
# The document: blocks rendered both to Markdown and to HTML
# ----------------------------------------------------------------------------

def _inline_html(text: str) -> str:
  """Escapes, then `code` and **bold** (the only inline markup the report uses)."""
  out = html.escape(str(text), quote=True)
  out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
  return re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", out)


def _slug(text: str) -> str:
  return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


class _Doc:
  def __init__(self):
    self.blocks: list[tuple] = []

  def h(self, level: int, text: str):
    self.blocks.append(("h", level, text))

  def p(self, text: str):
    self.blocks.append(("p", text))

  def missing(self, text: str):
    self.blocks.append(("missing", text))

  def table(self, header: Sequence[str], rows: Sequence[Sequence[str]]):
    self.blocks.append(("table", list(header), [list(r) for r in rows]))

  def figure(self, relpath: str, caption: str):
    self.blocks.append(("figure", relpath, caption))

  def details(self, summary: str, text: str, lang: str = ""):
    self.blocks.append(("details", summary, text, lang))

  def bullets(self, items: Sequence[str]):
    self.blocks.append(("bullets", list(items)))

  def markdown(self) -> str:
    out = []
    for b in self.blocks:
      kind = b[0]
      if kind == "h":
        out.append("#" * b[1] + " " + b[2])
      elif kind == "p":
        out.append(b[1])
      elif kind == "missing":
        out.append("> **Missing:** " + b[1])
      elif kind == "bullets":
        out.append("\n".join(f"- {item}" for item in b[1]))
      elif kind == "table":
        cell = lambda c: str(c).replace("|", "\\|").replace("\n", " ")
        lines = ["| " + " | ".join(cell(c) for c in b[1]) + " |", "|" + "---|" * len(b[1])]
        lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in b[2]]
        out.append("\n".join(lines))
      elif kind == "figure":
        out.append(f"![{b[2]}]({b[1]})\n\n*{b[2]}*")
      elif kind == "details":
        out.append(f"<details><summary>{html.escape(b[1])}</summary>\n\n```{b[3]}\n{b[2]}\n```\n\n</details>")
    return "\n\n".join(out) + "\n"

  def html(self, title: str) -> str:
    out = []
    for b in self.blocks:
      kind = b[0]
      if kind == "h":
        out.append(f'<h{b[1]} id="{_slug(b[2])}">{_inline_html(b[2])}</h{b[1]}>')
      elif kind == "p":
        out.append(f"<p>{_inline_html(b[1])}</p>")
      elif kind == "missing":
        out.append(f'<p class="missing"><strong>Missing:</strong> {_inline_html(b[1])}</p>')
      elif kind == "bullets":
        out.append("<ul>" + "".join(f"<li>{_inline_html(i)}</li>" for i in b[1]) + "</ul>")
      elif kind == "table":
        head = "".join(f"<th>{_inline_html(c)}</th>" for c in b[1])
        body = "".join("<tr>" + "".join(f"<td>{_inline_html(c)}</td>" for c in row) + "</tr>" for row in b[2])
        out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
      elif kind == "figure":
        src = html.escape(b[1], quote=True)
        out.append(f'<figure><a href="{src}"><img src="{src}" alt="{html.escape(b[2], quote=True)}"></a>'
                   f"<figcaption>{_inline_html(b[2])}</figcaption></figure>")
      elif kind == "details":
        out.append(f"<details><summary>{_inline_html(b[1])}</summary><pre>{html.escape(b[2])}</pre></details>")
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n<main>\n"
            + "\n".join(out) + "\n</main>\n</body>\n</html>\n")


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;color:#1f2328;margin:0;background:#fff}
main{max-width:1150px;margin:0 auto;padding:1.5rem 2rem 4rem}
h1{border-bottom:2px solid #d0d7de;padding-bottom:.3rem}h2{border-bottom:1px solid #d0d7de;margin-top:2.2rem}
table{border-collapse:collapse;margin:.8rem 0;font-size:.9rem;font-variant-numeric:tabular-nums}
th,td{border:1px solid #d0d7de;padding:.3rem .6rem;text-align:left;vertical-align:top}
th{background:#f6f8fa}tbody tr:nth-child(even){background:#fafbfc}
figure{margin:1rem 0}figure img{max-width:100%;border:1px solid #eaeef2}
figcaption{color:#57606a;font-size:.9rem;margin-top:.3rem}
code{background:#f6f8fa;padding:.1rem .3rem;border-radius:4px;font-size:.88em}
pre{background:#f6f8fa;padding:.8rem;overflow-x:auto;font-size:.8rem}
.missing{border-left:4px solid #d97706;background:#fff7ed;padding:.5rem .8rem}
details{margin:.8rem 0}summary{cursor:pointer;font-weight:600}
"""


# ----------------------------------------------------------------------------
# Figures (matplotlib Agg canvas, no pyplot)
# ----------------------------------------------------------------------------

def _new_figure(width: float, height: float, ncols: int = 1):
  fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
  FigureCanvasAgg(fig)
  axes = fig.subplots(1, ncols, squeeze=False)[0]
  for ax in axes:
    ax.grid(True, alpha=0.3)
  return fig, axes


def _group_colors(n: int) -> list:
  from matplotlib import colormaps
  if n <= 10:
    return [colormaps["tab10"](i) for i in range(n)]
  if n <= 20:
    return [colormaps["tab20"](i) for i in range(n)]
  return [colormaps["turbo"](i / max(n - 1, 1)) for i in range(n)]


def _bits_colors(n: int) -> list:
  from matplotlib import colormaps
  return [colormaps["plasma"](0.1 + 0.75 * i / max(n - 1, 1)) for i in range(n)]


_FILE_MODE = 0o644  # mkstemp makes 0600 files; a report is meant to be read (served, shared)


def _write_text(path: str, text: str) -> None:
  results_lib.atomic_write_text(path, text)
  os.chmod(path, _FILE_MODE)


def _save_png(fig: Figure, path: str) -> None:
  """Atomic: a temporary file in the same folder, then os.replace."""
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp_", suffix=".png")
  os.close(fd)
  try:
    fig.savefig(tmp, format="png", dpi=DPI)
    os.chmod(tmp, _FILE_MODE)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


class _Ctx:
  """What every section needs: results, group names / counts, the minority mask, seeds."""

  def __init__(self, results: Mapping, workdir: str):
    self.results = results
    self.workdir = workdir
    ds = results.get("dataset", {})
    self.names = [str(n) for n in ds.get("group_names", [])]
    self.num_groups = int(ds.get("num_groups", len(self.names)) or len(self.names))
    if len(self.names) != self.num_groups:
      self.names = [f"group {i}" for i in range(self.num_groups)]
    self.train_counts = _dig(ds, "counts", "train")
    try:
      self.minority = claims_lib.minority_mask(results)
    except (KeyError, TypeError, ValueError):
      self.minority = None
    self.seeds = [str(s) for s in results.get("seeds", [])]

  def is_minority(self, g: int) -> bool:
    return self.minority is not None and bool(self.minority[g])

  def group_label(self, g: int) -> str:
    n = f" (n={self.train_counts[g]})" if self.train_counts and g < len(self.train_counts) else ""
    return f"{self.names[g]}{n}{', minority' if self.is_minority(g) else ''}"

  def size_order(self) -> list[int]:
    if self.train_counts and len(self.train_counts) == self.num_groups:
      return [int(g) for g in np.argsort(np.asarray(self.train_counts), kind="stable")]
    return list(range(self.num_groups))


def figure_ptq_group_accuracy(ctx: _Ctx) -> Optional[Figure]:
  """Per-group test accuracy (mean over seeds) against the PTQ bit-width; minority groups dashed."""
  p = ctx.results.get("ptq")
  if not p:
    return None
  bits = _sorted_bits(p.get("bit_widths", []))
  acc = np.stack([_mean_std(_stack(p["per_seed"], ctx.seeds, lambda e, b=b: _dig(e, b, "groups", "accuracy")))[0]
                  * np.ones(ctx.num_groups) for b in bits])  # [B, G]
  fig, (ax,) = _new_figure(9.5, 5.0)
  x = np.arange(len(bits))
  colors = _group_colors(ctx.num_groups)
  for g in range(ctx.num_groups):
    mino = ctx.is_minority(g)
    ax.plot(x, acc[:, g], linestyle="--" if mino else "-", marker="o" if mino else "s", markersize=5,
            linewidth=2.0 if mino else 1.4, color=colors[g], markerfacecolor="white" if mino else colors[g],
            label=ctx.group_label(g))
  ax.set_xticks(x, [_bits_label(b) for b in bits])
  ax.set_xlabel("weight bit-width (post-training quantization)")
  ax.set_ylabel(f"test accuracy (mean over {len(ctx.seeds)} seed(s))")
  ax.set_title("Per-group accuracy against bit-width" + ("  (dashed: minority groups)" if ctx.minority is not None
                                                          else ""))
  ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small", title="group (train count)")
  return fig


def figure_ptq_fairness(ctx: _Ctx) -> Optional[Figure]:
  """Fairness violation with std error bars (and bootstrap CI band); overall and worst-group accuracy."""
  p = ctx.results.get("ptq")
  if not p:
    return None
  bits = _sorted_bits(p.get("bit_widths", []))
  x = np.arange(len(bits))
  ms = lambda key: np.asarray([_mean_std(_stack(p["per_seed"], ctx.seeds, lambda e, b=b: _dig(e, b, *key)))
                               for b in bits], np.float64).T  # [2, B]
  fig, (ax1, ax2) = _new_figure(11.5, 4.4, 2)
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
    ax.set_xticks(x, [_bits_label(b) for b in bits])
    ax.set_xlabel("weight bit-width (post-training quantization)")
    ax.legend(fontsize="small")
  return fig


def _explain_bits(ctx: _Ctx) -> list[int]:
  return _sorted_bits(_dig(ctx.results, "explain", "bit_widths") or [])


def _explain_ms(ctx: _Ctx, bits: int, *path) -> tuple[np.ndarray, np.ndarray]:
  return _mean_std(_stack(ctx.results["explain"].get("per_seed", {}), ctx.seeds,
                          lambda e: _dig(e, bits, *path)))


def figure_explain_weights(ctx: _Ctx) -> Optional[Figure]:
  """Induced sparsity and relative L2 error of each layer's weights against bit-width."""
  bits = [b for b in _explain_bits(ctx) if b < FULL]
  per_seed = _dig(ctx.results, "explain", "per_seed") or {}
  layer_names = []
  for s in ctx.seeds:
    for b in bits:
      for name in _dig(per_seed, s, b, "weights", "per_layer") or {}:
        if name not in layer_names:
          layer_names.append(name)
  order = [n for n in ctx.results.get("model", {}).get("layer_names", []) if n in layer_names]
  layer_names = order + [n for n in layer_names if n not in order]
  if not bits or not layer_names:
    return None
  fig, axes = _new_figure(12.0, 4.6, 2)
  x = np.arange(len(bits))
  colors = [c for c in _bits_colors(len(layer_names))]
  keys = (("induced_sparsity", "induced sparsity (W≠0, Q(W)=0)", "Induced sparsity per layer"),
          ("rel_l2", "relative L2 error ‖Q(W)−W‖/‖W‖", "Relative L2 weight error per layer"))
  for ax, (key, ylabel, title) in zip(axes, keys):
    for name, color in zip(layer_names, colors):
      ax.plot(x, [_explain_ms(ctx, b, "weights", "per_layer", name, key)[0] for b in bits], marker="o",
              markersize=4, color=color, label=name)
    ax.plot(x, [_explain_ms(ctx, b, "weights", "model", key)[0] for b in bits], color="black", linewidth=2.4,
            linestyle="--", label="whole model")
    vals = np.asarray([_explain_ms(ctx, b, "weights", "model", key)[0] for b in bits])
    if key == "rel_l2" and np.all(np.isfinite(vals)) and np.all(vals > 0):
      ax.set_yscale("log")
    ax.set_xticks(x, [_bits_label(b) for b in bits])
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


def _shade_minority_columns(ax, ctx: _Ctx, order: list[int]) -> None:
  first = True
  for i, g in enumerate(order):
    if ctx.is_minority(g):
      ax.axvspan(i - 0.5, i + 0.5, color="0.85", alpha=0.6, zorder=0, label="minority group" if first else None)
      first = False


def figure_explain_logits(ctx: _Ctx) -> Optional[Figure]:
  """Logit variance, true-class probability and margin per group: full precision and each bit-width."""
  bits = [b for b in _explain_bits(ctx) if b < FULL]
  panels = ((("logits", "variance"), "logit variance over classes", "Logit variance"),
            (("softmax", "true_prob"), "true-class probability p_y", "True-class probability"),
            (("softmax", "margin"), "margin p_y − max_{c≠y} p_c", "Margin (< 0: misclassified)"))
  if not bits or all(np.all(np.isnan(_explain_ms(ctx, b, *panels[0][0])[0])) for b in bits):
    return None
  order = ctx.size_order()
  x = np.arange(len(order))
  colors = _bits_colors(len(bits))
  fig, axes = _new_figure(15.0, 4.8, 3)
  for ax, (path, ylabel, title) in zip(axes, panels):
    _shade_minority_columns(ax, ctx, order)
    fp_path = path[:-1] + (path[-1] + "_fp",)
    fp = np.nanmean(np.stack([_explain_ms(ctx, b, *fp_path)[0] * np.ones(ctx.num_groups) for b in bits]), axis=0) \
        if any(np.isfinite(_explain_ms(ctx, b, *fp_path)[0]).any() for b in bits) else None
    if fp is not None:
      ax.plot(x, fp[order], color="black", linewidth=2.4, marker="s", label="full precision")
    for b, color in zip(bits, colors):
      v = _explain_ms(ctx, b, *path)[0] * np.ones(ctx.num_groups)
      ax.plot(x, v[order], color=color, marker="o", markersize=4, label=f"{b}-bit")
    ax.set_xticks(x, [ctx.names[g] for g in order], rotation=45 if len(order) > 5 else 0,
                  ha="right" if len(order) > 5 else "center")
    ax.set_xlabel("group (sorted by train count, smallest first)")
    ax.set_ylabel(ylabel + " (group mean)")
    ax.set_title(title)
  axes[-1].legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small")
  return fig


def figure_explain_curvature(ctx: _Ctx) -> Optional[Figure]:
  """Per-group gradient norm and top Hessian eigenvalue against group (train) size."""
  e = ctx.results.get("explain") or {}
  bits = _explain_bits(ctx)
  sizes = np.asarray(_floats(e.get("group_sizes") or ctx.train_counts or []), np.float64)
  if not bits or sizes.shape != (ctx.num_groups,) or all(
      np.all(np.isnan(_explain_ms(ctx, b, "curvature", "grad_norm")[0])) for b in bits):
    return None
  order = np.argsort(sizes, kind="stable")
  colors = _bits_colors(len(bits))
  fig, axes = _new_figure(12.5, 4.8, 2)
  for ax, key, ylabel, title in zip(axes, ("grad_norm", "top_eigenvalue"),
                                    ("gradient norm ‖∇L_g‖", "top Hessian eigenvalue λ_max(H_g)"),
                                    ("Gradient norm against group size",
                                     "Top Hessian eigenvalue against group size")):
    all_vals = []
    for b, color in zip(bits, colors):
      m, s = _explain_ms(ctx, b, "curvature", key)
      m, s = m * np.ones(ctx.num_groups), s * np.ones(ctx.num_groups)
      if not np.isfinite(m).any():
        continue
      rho = claims_lib.spearman(sizes, m)
      label = ("full precision" if b >= FULL else f"{b}-bit") + f" (Spearman ρ={_num(rho, '{:.2f}')})"
      ax.errorbar(sizes[order], m[order], yerr=s[order], marker="o", markersize=5, capsize=3, color=color,
                  linewidth=2.4 if b >= FULL else 1.4, label=label)
      all_vals.append(m)
    vals = np.concatenate(all_vals) if all_vals else np.array([])
    if sizes.min() > 0:
      _log_axis(ax.xaxis, ax.set_xscale, sizes)
    if vals.size and np.all(vals[np.isfinite(vals)] > 0):
      _log_axis(ax.yaxis, ax.set_yscale, vals)
    if ctx.minority is not None:
      ax.axvspan(sizes.min() / 1.15, float(np.median(sizes)), color="0.85", alpha=0.6, zorder=0,
                 label="minority (below median size)")
    ax.set_xlabel("group size (training examples)")
    ax.set_ylabel(ylabel + " (mean ± std over seeds)")
    ax.set_title(title)
    ax.legend(fontsize="x-small")
  return fig


def _ablation_summary(ctx: _Ctx) -> Optional[dict]:
  """{method: {bits: {column: (mean, std, n)}}} from mitigate.per_seed (tolerates unfinished runs)."""
  m = ctx.results.get("mitigate")
  if not m:
    return None
  out = {}
  for method in m.get("methods", []):
    out[method] = {}
    for b in m.get("bit_widths", []):
      cols = {}
      for key, *_ in ABLATION_COLUMNS:
        stack = _stack(m.get("per_seed", {}), ctx.seeds, lambda e: _dig(e, method, b, key))
        mean, std = _mean_std(stack)
        cols[key] = (float(mean), float(std), 0 if stack is None else int(np.isfinite(stack).sum()))
      out[method][str(b)] = cols
  return out


def figure_mitigate_ablation(ctx: _Ctx, summary: Mapping) -> Optional[Figure]:
  """Fairness violation and worst-group accuracy per method and bit-width (std error bars)."""
  m = ctx.results["mitigate"]
  methods, bits = list(m.get("methods", [])), [str(b) for b in _sorted_bits(m.get("bit_widths", []))]
  if not methods or not bits:
    return None
  fig, axes = _new_figure(12.0, 4.6, 2)
  width = 0.8 / len(methods)
  colors = _group_colors(len(methods))
  for ax, key, title in zip(axes, ("fairness_violation", "worst_group_accuracy"),
                            ("fairness violation (lower is better)", "worst-group accuracy (higher is better)")):
    for i, (method, color) in enumerate(zip(methods, colors)):
      mean = [summary[method][b][key][0] for b in bits]
      std = [summary[method][b][key][1] for b in bits]
      ax.bar(np.arange(len(bits)) + (i - (len(methods) - 1) / 2) * width, mean, width, yerr=std, capsize=3,
             color=color, edgecolor="black", linewidth=0.5, label=method)
    ax.set_xticks(np.arange(len(bits)), [f"{b}-bit" for b in bits])
    ax.set_xlabel("target weight bit-width")
    ax.set_ylabel(title.split(" (")[0] + " (mean ± std over seeds)")
    ax.set_title(title.capitalize())
  axes[1].legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small", title="method")
  return fig


# ----------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------

def _rerun_hint(ctx: _Ctx, stage: str) -> str:
  name = str(_dig(ctx.results, "config", "name") or "")
  exp = f"experiments/{name}.py" if name and os.path.exists(os.path.join(_REPO, "experiments", f"{name}.py")) \
      else "<this study's experiment file>"
  return (f"run `python launch.py --config {exp} --stages={stage} --workdir {ctx.workdir}` "
          "(with the same --config overrides as this run), then rerun the report")


class _Report:
  def __init__(self, ctx: _Ctx, fig_dir: str):
    self.ctx, self.fig_dir = ctx, fig_dir
    self.doc = _Doc()
    self.figures: dict[str, str] = {}
    self.sections: dict[str, str] = {}

  def fig(self, name: str, fig: Optional[Figure], caption: str) -> None:
    if fig is None:
      return
    path = os.path.join(self.fig_dir, name + ".png")
    _save_png(fig, path)
    self.figures[name] = path
    self.doc.figure(f"{FIGURES_DIR}/{name}.png", caption)

  def absent(self, section: str, why: str) -> None:
    self.sections[section] = "missing: " + why
    self.doc.missing(why)

  def overview(self) -> None:
    ctx, r = self.ctx, self.ctx.results
    ds, model = r.get("dataset", {}), r.get("model", {})
    self.doc.h(1, f"fqjax report: {_dig(r, 'config', 'name') or 'study'}")
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
    self.doc.p("Minority: train count below the median group size" + (
        "." if ctx.minority is not None else " (none here: all groups are at or above the median)."))

  def train(self) -> None:
    ctx, t = self.ctx, self.ctx.results.get("train")
    self.doc.h(2, "Full-precision training")
    if not t:
      return self.absent("train", "the train stage is not in this workdir; " + _rerun_hint(ctx, "train"))
    self.sections["train"] = "ok"
    rows = []
    for s in ctx.seeds:
      rec = t.get("per_seed", {}).get(s)
      if rec:
        test = rec.get("test", {})
        rows.append([s, str(rec.get("epochs_run", "–")), _num(test.get("accuracy")),
                     _num(test.get("worst_group_accuracy")), _num(test.get("fairness_violation")),
                     _num(_dig(rec, "val", "accuracy")), _num(rec.get("wall_s"), "{:.1f}")])
    self.doc.table(["seed", "epochs", "test accuracy", "worst group", "fairness violation", "val accuracy",
                    "wall s"], rows)

  def ptq(self) -> None:
    ctx, p = self.ctx, self.ctx.results.get("ptq")
    self.doc.h(2, "PTQ sweep")
    if not p:
      return self.absent("ptq", "the ptq stage is not in this workdir; " + _rerun_hint(ctx, "ptq"))
    self.sections["ptq"] = "ok"
    self.doc.p(f"Weights quantized after training (activation bits {p.get('a_bits')}, per-channel "
               f"{p.get('per_channel')}, BN folded {p.get('fold_bn')}); test split.")
    self.fig("ptq_group_accuracy", figure_ptq_group_accuracy(ctx),
             "Per-group test accuracy against bit-width (mean over seeds); minority groups dashed with open markers.")
    self.fig("ptq_fairness", figure_ptq_fairness(ctx),
             "Left: fairness violation (mean ± std over seeds; band: bootstrap CI). Right: overall and worst-group "
             "accuracy.")
    bits = _sorted_bits(p.get("bit_widths", []))
    get = lambda b, *path: _mean_std(_stack(p.get("per_seed", {}), ctx.seeds, lambda e: _dig(e, b, *path)))
    rows = []
    for b in bits:
      ci = (_num(get(b, "fairness_violation_ci", "low")[0]), _num(get(b, "fairness_violation_ci", "high")[0]))
      rows.append([_bits_label(b), _num(get(b, "size_bytes")[0] / 1024, "{:.1f}"), _pm(*get(b, "accuracy")),
                   _pm(*get(b, "worst_group_accuracy")), _pm(*get(b, "fairness_violation")),
                   "–" if "–" in ci else f"[{ci[0]}, {ci[1]}]", _pm(*get(b, "accuracy_drop"))])
    self.doc.p("**PTQ sweep summary** (test split, mean ± std over seeds):")
    self.doc.table(["bits", "size KB", "accuracy", "worst group", "fairness violation", "FV bootstrap CI",
                    "accuracy drop"], rows)
    grid = {b: get(b, "groups", "accuracy") for b in bits}
    rows = [[ctx.group_label(g)] + [_pm(grid[b][0][g] if np.ndim(grid[b][0]) else np.nan,
                                        grid[b][1][g] if np.ndim(grid[b][1]) else np.nan) for b in bits]
            for g in ctx.size_order()]
    self.doc.p("**Per-group accuracy** (mean ± std over seeds; groups by train count, smallest first):")
    self.doc.table(["group"] + [f"{_bits_label(b)} bits" for b in bits], rows)

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
    bits = [b for b in _explain_bits(ctx) if b < FULL]
    rows = []
    for b in bits:
      w = lambda key: _explain_ms(ctx, b, "weights", "model", key)[0]
      acts = [_explain_ms(ctx, b, "activations", name)[0] for name in
              (_dig(e, "per_seed", ctx.seeds[0] if ctx.seeds else "", b, "activations") or {})]
      act = np.nanmean(np.stack(acts), axis=0) if acts and all(np.shape(a) == (ctx.num_groups,) for a in acts) \
          else None
      rows.append([str(b), _num(w("rel_l2")), _num(w("induced_sparsity")), _num(w("total_sparsity")),
                   _rel(ctx.minority, act), _rel(ctx.minority, _explain_ms(ctx, b, "logits", "abs_shift")[0]),
                   _rel(ctx.minority, _explain_ms(ctx, b, "logits", "variance_change")[0]),
                   _rel(ctx.minority, _explain_ms(ctx, b, "softmax", "true_prob_shift")[0]),
                   _rel(ctx.minority, _explain_ms(ctx, b, "softmax", "margin_shift")[0])])
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
             "(log scales where all values are positive; mean ± std over seeds); shaded: minority sizes.")
    rows = []
    for b in _explain_bits(ctx):
      c = lambda key: _explain_ms(ctx, b, "curvature", key)
      rows.append([_bits_label(b), _pm(*c("spearman_size_grad_norm"), "{:.2f}"),
                   _pm(*c("spearman_size_top_eigenvalue"), "{:.2f}"), _rel(ctx.minority, c("grad_norm")[0]),
                   _rel(ctx.minority, c("top_eigenvalue")[0]), _rel(ctx.minority, c("trace")[0])])
    self.doc.p("**Curvature** (Spearman correlation with group size per seed, mean ± std; per-group values as "
               "minority / majority means):")
    self.doc.table(["bits", "ρ(size, grad norm)", "ρ(size, top eigenvalue)", "grad norm", "top eigenvalue",
                    "Hessian trace"], rows)

  def mitigate(self) -> None:
    ctx, m = self.ctx, self.ctx.results.get("mitigate")
    self.doc.h(2, "Mitigation ablation")
    if not m:
      return self.absent("mitigate", "the mitigate stage is not in this workdir; " + _rerun_hint(ctx, "mitigate"))
    summary = _ablation_summary(ctx)
    incomplete = any(cols[k][2] < len(ctx.seeds) for by_bits in summary.values() for cols in by_bits.values()
                     for k in ("accuracy",))
    self.sections["mitigate"] = "incomplete" if incomplete else "ok"
    if incomplete:
      self.doc.missing("the mitigate stage has not finished every (method, bit-width, seed); the table shows the "
                       "seeds that finished (rerun the mitigate stage to complete it).")
    rows = []
    for b in [str(b) for b in _sorted_bits(m.get("bit_widths", []))]:
      best = {}
      for key, _, direction, *_ in ABLATION_COLUMNS:
        vals = {k: summary[k][b][key][0] for k in summary if np.isfinite(summary[k][b][key][0])}
        if vals:
          best[key] = (max if direction == "max" else min)(vals, key=lambda k: vals[k])
      for method in m.get("methods", []):
        row = [b, method]
        for key, _, _, scale, fmt in ABLATION_COLUMNS:
          mean, std, _ = summary[method][b][key]
          cell = _pm(mean * scale, std * scale, fmt)
          row.append(f"**{cell}**" if best.get(key) == method else cell)
        rows.append(row)
    self.doc.p("Each method fine-tunes (or, for `ptq`, only quantizes) the same full-precision model. Mean ± std "
               "over seeds; **bold**: best per column and bit-width (highest accuracy / worst group, lowest "
               "fairness violation, size, training time).")
    self.doc.table(["bits", "method"] + [c[1] for c in ABLATION_COLUMNS], rows)
    self.fig("mitigate_ablation", figure_mitigate_ablation(ctx, summary),
             "Fairness violation and worst-group accuracy per method and target bit-width (mean ± std over seeds).")

  def claims(self) -> None:
    ctx = self.ctx
    self.doc.h(2, "Claims")
    try:
      checked, source = claims_lib.check_claims(ctx.results), "computed from this results.json by `fqjax.claims`"
    except Exception as err:  # a partial or older results.json: fall back on the stored section
      checked, source = ctx.results.get("claims"), f"as stored in results.json ({type(err).__name__}: {err})"
    if not checked:
      return self.absent("claims", "no claims could be checked on this results.json.")
    self.sections["claims"] = "ok"
    self.doc.p(f"Findings of the paper checked on this run ({source}).")
    rows = [[name.replace("_", " "), f"**{c.get('verdict', '?')}**", _claim_numbers(c)]
            for name, c in checked.items() if isinstance(c, Mapping)]
    self.doc.table(["claim", "verdict", "key numbers"], rows)
    if isinstance(checked.get("rules"), str):
      self.doc.details("The rules behind the verdicts", checked["rules"])

  def run_info(self) -> None:
    r = self.ctx.results
    self.doc.h(2, "Run")
    timings = r.get("timings") or {}
    rows = [[k, _num(v, "{:.1f}")] for k, v in timings.items()]
    total = sum(float(v) for v in timings.values() if isinstance(v, (int, float)))
    self.doc.p("**Wall times** of each stage's last run:")
    self.doc.table(["stage", "seconds"], rows + [["total", _num(total, "{:.1f}")]])
    files = [f for f in ("results.json", "results.csv", "config.json", "fqjax.log")
             if os.path.exists(os.path.join(self.ctx.workdir, f))]
    if files:
      self.doc.p("Files in the workdir: " + ", ".join(f"`{f}`" for f in files) + ".")
    self.doc.details("Config of this run", json.dumps(r.get("config", {}), indent=1, sort_keys=True), "json")


def _claim_numbers(c: Mapping) -> str:
  if c.get("verdict") == "not tested":
    return str(c.get("why", ""))
  parts = []
  if "spearman_bits_vs_fairness_violation" in c:
    parts.append(f"Spearman(bits, FV) = {_num(c['spearman_bits_vs_fairness_violation'], '{:.2f}')}; FV lowest − "
                 f"highest bits = {_num(c.get('increase_lowest_vs_highest_bits'))} (std at lowest "
                 f"{_num(c.get('std_at_lowest_bits'))})")
  per_bits = c.get("per_bits") or {}
  for b in sorted(per_bits, key=lambda k: -int(k)):
    v = per_bits[b]
    mark = "✓" if v.get("holds") else "✗"
    if "minority_mean" in v:
      rho = f", ρ(size) {_num(v['spearman_size'], '{:.2f}')}" if "spearman_size" in v else ""
      parts.append(f"{b}-bit: minority {_num(v['minority_mean'], '{:.3g}')} vs majority "
                   f"{_num(v.get('majority_mean'), '{:.3g}')}{rho} {mark}")
    elif isinstance(v.get("fairness_violation"), Mapping):
      fv = v["fairness_violation"]
      parts.append(f"{b}-bit: FV " + " / ".join(f"{k} {_num(fv.get(k))}" for k in ("fairqat", "ptq", "qat"))
                   + f", accuracy loss vs qat {_num(v.get('accuracy_loss_vs_qat'))} (qat std "
                   f"{_num(v.get('qat_accuracy_std'))}) {mark}")
  return "; ".join(parts) or "–"


# ----------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------

def write_report(workdir: str, results: Optional[Mapping] = None) -> dict:
  """Writes report.md, report.html and figures/*.png into ``workdir`` from its results.json.

  Args:
    workdir: a study workdir (fqjax.runner layout).
    results: the results dict; default: read ``workdir/results.json``.

  Returns:
    {"markdown": path, "html": path, "figures": {name: path},
     "sections": {section: "ok" | "incomplete" | "missing: <why>"}}
    where sections covers train, ptq, explain, curvature, mitigate, claims.

  Raises:
    FileNotFoundError: no results.json in ``workdir`` (and ``results`` not given).
  """
  if results is None:
    path = os.path.join(workdir, "results.json")
    if not os.path.isfile(path):
      raise FileNotFoundError(f"no results.json in {workdir}: run a study there first "
                              f"(python launch.py --workdir {workdir}).")
    results = results_lib.read_json(path)
  fig_dir = os.path.join(workdir, FIGURES_DIR)
  os.makedirs(fig_dir, exist_ok=True)
  rep = _Report(_Ctx(results, workdir), fig_dir)
  rep.overview()
  body_start = len(rep.doc.blocks)
  for section in (rep.train, rep.ptq, rep.explain, rep.mitigate, rep.claims, rep.run_info):
    section()
  contents = [f"{k}: {v.split(':')[0]}" for k, v in rep.sections.items()]
  missing = any(v != "ok" for v in rep.sections.values())
  rep.doc.blocks[body_start:body_start] = [("p", "**Sections:** " + ", ".join(contents) + "."
                                            + (" What is missing, and why, is said in each section." if missing
                                               else ""))]
  for name in FIGURE_NAMES:  # a figure from an earlier report whose data is gone now
    stale = os.path.join(fig_dir, name + ".png")
    if name not in rep.figures and os.path.exists(stale):
      os.remove(stale)
  md_path, html_path = os.path.join(workdir, "report.md"), os.path.join(workdir, "report.html")
  _write_text(md_path, rep.doc.markdown())
  title = f"fqjax report: {_dig(results, 'config', 'name') or 'study'}"
  _write_text(html_path, rep.doc.html(title))
  return {"markdown": md_path, "html": html_path, "figures": dict(rep.figures), "sections": dict(rep.sections)}


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m fqjax.report",
                                   description="Write report.md, report.html and figures/ for a study workdir.")
  parser.add_argument("workdir", help="a study workdir holding results.json")
  args = parser.parse_args(argv)
  if not os.path.isdir(args.workdir):
    parser.error(f"workdir {args.workdir!r} does not exist; give the --workdir of a study run by launch.py.")
  if not os.path.isfile(os.path.join(args.workdir, "results.json")):
    parser.error(f"no results.json in {args.workdir!r}; run a study there first "
                 f"(python launch.py --workdir {args.workdir}).")
  out = write_report(args.workdir)
  print(f"wrote {out['markdown']}, {out['html']} and {len(out['figures'])} figure(s) in "
        f"{os.path.join(args.workdir, FIGURES_DIR)}")
  for section, status in out["sections"].items():
    if status != "ok":
      print(f"  {section}: {status}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
