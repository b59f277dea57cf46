"""The study report: report.md, report.html and PNG figures, all from a workdir's results.json.

  python -m fqjax.report WORKDIR          (or the runner's `report` stage)

Writes into WORKDIR:
  report.md      Markdown (figures as relative links)
  report.html    one self-contained page (inline CSS, no scripts); figures are the same relative PNGs
  figures/*.png  fqjax.report.common.FIGURE_NAMES: ptq_group_accuracy, ptq_fairness, ptq_variants,
                 ptq_variant_groups, explain_weights, explain_logits_softmax, explain_curvature, explain_density,
                 explain_theory, mitigate_ablation, mitigate_pareto (each only when its data is in
                 results.json)

Every number comes from results.json (see fqjax.outputs.results): the PTQ and ablation tables and
figures from the summaries the runner stored (ptq.summary and intervals, explain theory tables,
mitigate.summary and mitigate.best, formatted by fqjax.analysis.tables' cell rules), the explain section (no
stored summary) as mean and standard deviation (ddof=1) over seeds, ignoring seeds or values that are missing or null.
Sections whose stage did not run are listed with the command that adds them.
Minority groups (fqjax.analysis.claims.minority_mask: train count below half the median) are
drawn dashed / shaded in every figure. Figures use matplotlib's Agg canvas
directly (no pyplot, no display, no global backend change).
"""
from __future__ import annotations

import argparse
import os
from typing import Mapping, Optional, Sequence

from fqjax.outputs import results as results_lib
from fqjax.errors import FqjaxError
from fqjax.outputs import workdir as workdir_lib
from fqjax.report.common import ABLATION_COLUMNS, FIGURE_NAMES, FIGURES_DIR, FULL, dig, write_text
from fqjax.report.common import bits_label, Ctx  # noqa: F401  (kept at fqjax.report.* for callers and tests)
from fqjax.report.figures import (DPI, figure_explain_curvature, figure_explain_logits, figure_explain_weights,
                                  figure_mitigate_ablation, figure_ptq_fairness, figure_ptq_group_accuracy)
from fqjax.report.sections import Report

# Layout: common.py (constants, numbers over seeds, Ctx), figures.py (matplotlib figures),
# document.py (Markdown / HTML blocks), sections.py (one method per report section); here the entry points.

__all__ = ["write_report", "main", "FULL", "FIGURES_DIR", "FIGURE_NAMES", "DPI", "ABLATION_COLUMNS",
           "figure_ptq_group_accuracy", "figure_ptq_fairness", "figure_explain_weights", "figure_explain_logits",
           "figure_explain_curvature", "figure_mitigate_ablation"]


def write_report(workdir: str, results: Optional[Mapping] = None) -> dict:
  """Writes report.md, report.html and figures/*.png into ``workdir`` from its results.json.

  Args:
    workdir: a study workdir (fqjax.study.runner layout).
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
    results = results_lib.read_results_file(path)  # CorruptFileError naming the file if unreadable
  fig_dir = os.path.join(workdir, FIGURES_DIR)
  os.makedirs(fig_dir, exist_ok=True)
  rep = Report(Ctx(results, workdir), fig_dir)
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
  write_text(md_path, rep.doc.markdown())
  title = f"fqjax report: {dig(results, 'config', 'name') or 'study'}"
  write_text(html_path, rep.doc.html(title))
  return {"markdown": md_path, "html": html_path, "figures": dict(rep.figures), "sections": dict(rep.sections)}


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m fqjax.report",
                                   description="Write report.md, report.html and figures/ for a study workdir.")
  parser.add_argument("workdir", help="a study workdir holding results.json")
  args = parser.parse_args(argv)
  try:
    workdir_lib.check_finished_workdir(args.workdir, "results.json")
  except FqjaxError as e:
    parser.error(str(e))
  try:
    out = write_report(args.workdir)
  except FqjaxError as e:
    parser.exit(1, f"fqjax: error: {e}\n")
  print(f"wrote {out['markdown']}, {out['html']} and {len(out['figures'])} figure(s) in "
        f"{os.path.join(args.workdir, FIGURES_DIR)}")
  for section, status in out["sections"].items():
    if status != "ok":
      print(f"  {section}: {status}")
  return 0
