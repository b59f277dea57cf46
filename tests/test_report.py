"""fqjax.report on the shared tiny study (tests/conftest.py), as run and with a constructed explain section.

Checks: every figure is a decodable, non-trivial PNG; report.html is self-contained and
references only files that exist; report.md has every section and the numbers of
results.json; partial workdirs render and say what is missing; the CLI's exit codes.
"""
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from fqjax.analysis import claims
from fqjax import report
from fqjax.outputs import results
from fqjax.analysis.tables import dig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTIONS = ("Full-precision training", "PTQ sweep", "Explain: forward chain", "Explain: curvature",
            "Mitigation ablation", "Claims", "Run")


def fake_explain(res, bit_widths=(32, 4, 2), k=3):
  """An explain section with the documented schema; minority groups get larger curvature and shifts."""
  sizes = np.asarray(res["dataset"]["counts"]["train"], np.float64)
  num_groups, layer_names = len(sizes), res["model"]["layer_names"]
  small = claims.minority_mask(res).astype(np.float64)
  per_seed = {}
  for si, seed in enumerate(res["seeds"]):
    rng = np.random.default_rng(si)
    jitter = lambda: 1 + 0.05 * rng.standard_normal(num_groups)
    per_seed[str(seed)] = {}
    for b in bit_widths:
      e = 0.0 if b == 32 else 2.0 ** -b
      per_layer = {n: {"mean_abs_diff": 0.01 * e * (i + 1), "rel_l2": e * (i + 1),
                       "induced_sparsity": min(1.0, 2 * e * (i + 1)), "total_sparsity": min(1.0, 2.5 * e * (i + 1)),
                       "size": 100 * (i + 1)} for i, n in enumerate(layer_names)}
      var_fp = 4.0 + sizes / sizes.max()
      var_q = var_fp * (1 - e * (1 + small))
      tp_fp = 0.9 - 0.2 * small
      grad = 10.0 / np.sqrt(sizes) * (1 + e) * jitter()
      eig = 50.0 / sizes * (1 + e) * jitter()
      margin = (2 * tp_fp - 1 - e * (1 + small)).tolist()
      if si == 1:
        margin[0] = None  # JSON null: a group with no samples or a NaN
      per_seed[str(seed)][str(b)] = {
          "weights": {"per_layer": per_layer, "model": {k2: float(np.mean([v[k2] for v in per_layer.values()]))
                                                        for k2 in per_layer[layer_names[0]]}},
          "activations": {n: (e * (i + 1) * (1 + small)).tolist() for i, n in enumerate(layer_names)},
          "logits": {"abs_shift": (e * (1 + small)).tolist(), "variance": var_q.tolist(),
                     "variance_fp": var_fp.tolist(), "variance_change": (var_q - var_fp).tolist()},
          "softmax": {"true_prob": (tp_fp - e * small).tolist(), "top_prob": (tp_fp * 0 + 0.9).tolist(),
                      "margin": margin, "true_prob_fp": tp_fp.tolist(), "top_prob_fp": [0.9] * num_groups,
                      "margin_fp": (2 * tp_fp - 1).tolist(), "true_prob_shift": (-e * small).tolist(),
                      "top_prob_shift": [0.0] * num_groups, "margin_shift": (-e * (1 + small)).tolist()},
          "accuracy": (0.9 - 0.1 * small - e).tolist(), "loss": (0.3 + 0.2 * small + e).tolist(),
          "curvature": {"grad_norm": grad.tolist(), "top_eigenvalue": eig.tolist(),
                        "top_k_eigenvalues": [[float(v) / (j + 1) for j in range(k)] for v in eig],
                        "spearman_size_grad_norm": claims.spearman(sizes, grad),
                        "spearman_size_top_eigenvalue": claims.spearman(sizes, eig)}}
  return {"keys": {}, "bit_widths": list(bit_widths), "group_sizes": sizes.astype(int).tolist(),
          "per_seed": per_seed}


@pytest.fixture(scope="module")
def workdirs(tiny_study, tmp_path_factory):
  """The shared tiny study (tests/conftest.py) three ways: "full" as run; "partial", its results after
  train and ptq only; "explained", its results with a constructed explain section (known curvature)."""
  base = tmp_path_factory.mktemp("report")
  full, partial, explained = (str(base / n) for n in ("full", "partial", "explained"))
  shutil.copytree(tiny_study["workdir"], full)
  res = json.loads(json.dumps(tiny_study["results"]))
  os.makedirs(partial)
  shutil.copy(os.path.join(full, "config.json"), partial)
  early = {k: v for k, v in res.items() if k not in ("explain", "mitigate", "claims")}
  early["claims"] = claims.check_claims(early)
  early["timings"] = {k: v for k, v in res["timings"].items() if k in ("data", "train", "ptq")}
  results.write_results_file(os.path.join(partial, "results.json"), early)
  res["explain"] = fake_explain(res)
  os.makedirs(explained)
  results.write_results_file(os.path.join(explained, "results.json"), res)
  return {"full": full, "partial": partial, "explained": explained, "results": res}


def _check_png(path):
  assert os.path.getsize(path) > 5_000, path
  with Image.open(path) as im:
    im.verify()
  with Image.open(path) as im:
    assert im.format == "PNG"
    assert im.width > 200 and im.height > 200, (path, im.size)
    pixels = np.asarray(im.convert("L"), np.float64)
  assert pixels.std() > 5, f"{path} looks blank"


def _check_html(workdir):
  text = open(os.path.join(workdir, "report.html")).read()
  assert text.startswith("<!DOCTYPE html>") and "<style>" in text
  assert "<script" not in text and "<link" not in text and "@import" not in text and "url(" not in text
  refs = re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', text)
  local = [r for r in refs if not r.startswith("#")]
  for ref in local:
    assert not re.match(r"^[a-z]+:|^//|^/", ref), f"external or absolute reference {ref}"
    assert os.path.isfile(os.path.join(workdir, ref)), f"report.html references a missing file {ref}"
  for ref in re.findall(r"\]\(([^)]+)\)", open(os.path.join(workdir, "report.md")).read()):
    assert os.path.isfile(os.path.join(workdir, ref)), f"report.md references a missing file {ref}"
  return text, local


def test_full_report_figures_links_and_sections(workdirs):
  wd = workdirs["explained"]
  out = report.write_report(wd)
  # One PTQ variant: no comparison; the constructed explain section has no second-order test and no density.
  assert set(out["figures"]) == set(report.FIGURE_NAMES) - {"ptq_variants", "explain_theory", "explain_density"}
  assert out["sections"] == {s: "ok" for s in ("train", "ptq", "explain", "curvature", "mitigate", "claims")}
  assert "mitigate_pareto" in out["figures"]  # the size / worst group / fairness trade-off of the ablation
  for path in out["figures"].values():
    assert os.path.dirname(path) == os.path.join(wd, "figures")
    _check_png(path)
  html_text, refs = _check_html(wd)
  assert {f"figures/{n}.png" for n in out["figures"]} <= set(refs)
  assert "<details><summary>Config of this run</summary>" in html_text
  md = open(out["markdown"]).read()
  for section in SECTIONS:
    assert f"## {section}" in md or f"# {section}" in md, section
    assert f">{section}</h" in html_text, section
  assert "Missing" not in md
  assert not [f for f in os.listdir(wd) + os.listdir(os.path.join(wd, "figures")) if f.startswith(".tmp_")]
  for path in [out["markdown"], out["html"], *out["figures"].values()]:
    assert os.stat(path).st_mode & 0o044 == 0o044, f"{path} is not readable by others"


def test_unfinished_mitigate_stage_is_marked_incomplete(workdirs, tmp_path):
  res = json.loads(json.dumps(workdirs["results"]))
  del res["mitigate"]["per_seed"]["1"]["fairqat"]  # a run killed before its last entry: no summary stored yet
  del res["mitigate"]["summary"], res["mitigate"]["best"]
  out = report.write_report(str(tmp_path), results=res)
  assert out["sections"]["mitigate"] == "incomplete"
  assert not {"mitigate_ablation", "mitigate_pareto"} & set(out["figures"])
  md = open(out["markdown"]).read()
  assert "has not finished (9 of 10 (method, bit-width, seed) entries done)" in md
  assert "| 4 | fairqat | 1 of 2 |" in md and "| 4 | qat | 2 of 2 |" in md
  acc = res["mitigate"]["per_seed"]["0"]["fairqat"]["4"]["accuracy"]
  assert f"{acc:.3f} ±" not in md.split("## Mitigation ablation")[1].split("## Claims")[0]  # nothing re-averaged


def test_stored_summary_of_an_unfinished_mitigate_stage_is_shown_and_marked(workdirs, tmp_path):
  res = json.loads(json.dumps(workdirs["results"]))
  del res["mitigate"]["per_seed"]["1"]["fairqat"]  # e.g. a seed added after the summary was stored
  out = report.write_report(str(tmp_path), results=res)
  assert out["sections"]["mitigate"] == "incomplete"
  md = open(out["markdown"]).read()
  assert "summary as last stored" in md
  fv = res["mitigate"]["summary"]["fairqat"]["4"]["fairness_violation"]
  row = next(line for line in md.splitlines() if line.startswith("| 4 | fairqat |"))
  assert f"{fv['mean']:.3f} ± {fv['std']:.3f}" in row


def test_unfinished_ptq_stage_is_marked_incomplete(workdirs, tmp_path):
  res = json.loads(json.dumps(workdirs["results"]))
  del res["ptq"]["per_seed"]["1"], res["ptq"]["summary"]
  out = report.write_report(str(tmp_path), results=res)
  assert out["sections"]["ptq"] == "incomplete"
  assert not {"ptq_group_accuracy", "ptq_fairness"} & set(out["figures"])
  assert "the ptq stage has not finished (no entry yet for seeds [1])" in open(out["markdown"]).read()


def test_report_reads_the_stored_summaries(workdirs, tmp_path):
  """Numbers and the best method come from ptq.summary, mitigate.summary and mitigate.best as stored."""
  res = json.loads(json.dumps(workdirs["results"]))
  res["ptq"]["summary"]["4"]["accuracy"] = {"mean": 0.1234, "std": 0.0456, "n": 2}
  res["ptq"]["summary"]["4"]["fairness_violation_ci"] = {"low": {"mean": 0.011, "std": 0.0, "n": 2},
                                                         "high": {"mean": 0.022, "std": 0.0, "n": 2}}
  res["ptq"]["summary"]["4"]["groups"]["accuracy"][0] = {"mean": None, "std": None, "n": 0}
  res["mitigate"]["summary"]["qat"]["4"]["worst_group_accuracy"] = {"mean": 0.9876, "std": 0.0, "n": 2}
  res["mitigate"]["best"]["4"]["worst_group_accuracy"] = "qat"
  out = report.write_report(str(tmp_path), results=res)
  md = open(out["markdown"]).read()
  ptq_section = md.split("## PTQ sweep")[1].split("## Explain")[0]
  row = next(line for line in ptq_section.splitlines() if line.startswith("| 4 | "))
  assert "| 0.123 ± 0.046 |" in row and "| [0.011, 0.022] |" in row
  label = report.Ctx(res, "").group_label(0)
  group_row = next(line for line in ptq_section.splitlines() if line.startswith(f"| {label} |"))
  assert group_row.split("|")[4].strip() == "empty"  # columns 32 (FP), 8, 4, 2: no data stored at 4 bits
  ablation = md.split("## Mitigation ablation")[1].split("## Claims")[0]
  worst = {line.split("|")[2].strip(): line.split("|")[4].strip() for line in ablation.splitlines()
           if line.startswith("| 4 | ")}  # method -> worst-group cell
  assert worst["qat"] == "**0.988 ± 0.000**"
  assert [m for m, cell in worst.items() if cell.startswith("**")] == ["qat"]


def test_report_numbers_come_from_results(workdirs):
  wd, res = workdirs["explained"], workdirs["results"]
  md = open(report.write_report(wd)["markdown"]).read()
  for b in res["ptq"]["bit_widths"]:  # PTQ summary table: mean ± std over seeds as the runner summarized them
    s = res["ptq"]["summary"][str(b)]
    row = next(line for line in md.splitlines() if line.startswith(f"| {report.bits_label(b)} | "))
    for key in ("accuracy", "worst_group_accuracy", "fairness_violation"):
      assert f"{s[key]['mean']:.3f} ± {s[key]['std']:.3f}" in row, (b, key, row)
  # Ablation: the bold fairness-violation cell is the method that mitigate.summarize found best.
  best = res["mitigate"]["best"]["4"]["fairness_violation"]
  for method in res["mitigate"]["methods"]:
    row = next(line for line in md.splitlines() if line.startswith(f"| 4 | {method} |"))
    fv_cell = row.split("|")[5].strip()
    fv = res["mitigate"]["summary"][method]["4"]["fairness_violation"]
    assert f"{fv['mean']:.3f} ± {fv['std']:.3f}" in fv_cell
    assert fv_cell.startswith("**") == (method == best), row
  # Steps: the stored summary's mean ± std (integers); every training method ran the same steps in the tiny study.
  steps_col = 3 + [c[0] for c in report.ABLATION_COLUMNS].index("steps")
  trained = [mth for mth in res["mitigate"]["methods"] if res["mitigate"]["summary"][mth]["4"]["steps"]["mean"] > 0]
  for method in res["mitigate"]["methods"]:
    row = next(line for line in md.splitlines() if line.startswith(f"| 4 | {method} |"))
    steps = res["mitigate"]["summary"][method]["4"]["steps"]
    assert row.split("|")[steps_col].strip().strip("*") == f"{steps['mean']:.0f} ± {steps['std']:.0f}", row
  assert "ptq" not in trained and len({res["mitigate"]["summary"][mth]["4"]["steps"]["mean"] for mth in trained}) == 1
  assert "Every training method (" + ", ".join(f"`{mth}`" for mth in trained) + ") ran the same number" in md
  # Selection: chosen on validation worst-group accuracy; the most frequent choice over seeds, with its count.
  assert "on validation worst-group accuracy" in md
  for method in trained:
    chosen = [", ".join(f"{k}={v}" for k, v in res["mitigate"]["per_seed"][s][method]["4"]["selection"]["chosen"]
                        .items()) for s in map(str, res["seeds"])]
    row = next(line for line in md.splitlines() if line.startswith(f"| {method} | ") and "seeds)" in line)
    top, n, of = re.search(r"\| ([^|]+?) \((\d+)/(\d+) seeds\) \|", row).groups()
    assert top in chosen and int(n) == chosen.count(top) == max(map(chosen.count, chosen)), row
    assert int(of) == len(res["seeds"])
  # Claims: verdicts of fqjax.analysis.claims on this results.json, the explain claims tested on the injected section.
  checked = claims.check_claims(res)
  for name, c in checked.items():
    if isinstance(c, dict):
      row = next(line for line in md.splitlines() if line.startswith(f"| {name.replace('_', ' ')} |"))
      assert f"**{c['verdict']}**" in row
  judged = checked["minority_gradient_norm_larger"]["judgements"]
  assert judged["max/keep | norm_of_mean_gradient (at_bits)"]["verdict"] == "holds"
  assert judged["max/keep | size_matched (at_bits)"]["verdict"] == "not tested"  # not in the constructed section
  # Config and wall times at the end.
  assert md.index("## Run") > md.index("## Claims")
  for stage in ("train", "ptq", "mitigate"):
    assert re.search(rf"\| {stage} \| {res['timings'][stage]:.1f} \|", md), stage
  assert json.dumps(res["config"]["ptq"]["bit_widths"]) .replace(" ", "") in md.replace("\n", "").replace(" ", "")


def test_ablation_names_used_bits_and_unequal_steps(workdirs, tmp_path):
  """A method run at other weight bits than the target names them; unequal optimizer steps are listed."""
  res = json.loads(json.dumps(workdirs["results"]))
  m = res["mitigate"]
  m["summary"]["qat"]["4"]["w_bits"] = 5  # as qat_equal_size stores it when mixed precision needs 5 bits
  m["summary"]["fairqat"]["4"]["steps"] = {"mean": 8.0, "std": 0.0, "n": 2}
  out = report.write_report(str(tmp_path), results=res)
  ablation = open(out["markdown"]).read().split("## Mitigation ablation")[1].split("## Claims")[0]
  assert any(line.startswith("| 4 | qat (5b) |") for line in ablation.splitlines())
  common = m["summary"]["lsq_qat"]["4"]["steps"]["mean"]
  assert f"most ran {common:.0f}, but `fairqat` 8 at 4 bits." in ablation
  w = dig(m, "summary", "qat_equal_size", "4", "w_bits")  # the tiny study's own, where it runs the method
  if isinstance(w, int) and w != 4:
    assert f"| 4 | qat_equal_size ({w}b) |" in ablation
  for method in set(m["methods"]) - {"qat", "qat_equal_size"}:  # bits as the target or mixed: the name alone
    assert any(line.startswith(f"| 4 | {method} |") for line in ablation.splitlines()), method


def test_mitigate_pareto_figure(workdirs, tmp_path):
  from fqjax.report.figures import save_png, figure_mitigate_pareto, pareto_front
  assert pareto_front([1, 2, 2, 3, 4, float("nan")], [0.5, 0.4, 0.7, 0.6, 0.9, 1.0]) == [0, 2, 4]
  assert pareto_front([1, 2, 3], [0.3, 0.2, 0.25], maximize=False) == [0, 1]
  res = json.loads(json.dumps(workdirs["results"]))
  ctx = report.Ctx(res, workdirs["explained"])
  assert figure_mitigate_pareto(ctx, None) is None
  methods = res["mitigate"]["methods"]
  fig = figure_mitigate_pareto(ctx, res["mitigate"]["summary"])
  for ax in fig.axes[:2]:
    assert len(ax.containers) == len(methods)  # one error-bar point per method and bit-width (one bit-width)
    assert [t.get_text() for t in ax.texts] == ["4b"] * len(methods)
    assert any(line.get_label() == "Pareto front" for line in ax.get_lines())
    assert ax.get_xscale() == "linear"  # the tiny study's sizes are within 4x of each other
  res["mitigate"]["summary"]["qat"]["4"]["size_bytes"]["mean"] *= 10
  res["mitigate"]["summary"]["qat"]["4"]["w_bits"] = 32
  fig = figure_mitigate_pareto(ctx, res["mitigate"]["summary"])
  assert fig.axes[0].get_xscale() == "log" and "4→32b" in [t.get_text() for t in fig.axes[0].texts]
  save_png(fig, str(tmp_path / "pareto.png"))
  _check_png(str(tmp_path / "pareto.png"))


def test_minority_groups_are_dashed(workdirs):
  res = workdirs["results"]
  minority = claims.minority_mask(res)
  assert minority is not None and minority.any() and not minority.all()
  fig = report.figure_ptq_group_accuracy(report.Ctx(res, workdirs["explained"]))
  lines = fig.axes[0].get_lines()
  assert len(lines) == res["dataset"]["num_groups"]
  for g, line in enumerate(lines):
    assert (line.get_linestyle() == "--") == bool(minority[g])
    assert ("minority" in line.get_label()) == bool(minority[g])
    mean_acc = np.mean([res["ptq"]["per_seed"][str(s)]["2"]["groups"]["accuracy"][g] for s in res["seeds"]])
    assert line.get_ydata()[-1] == pytest.approx(mean_acc)  # last point: 2 bits, mean over seeds
  fig = report.figure_explain_curvature(report.Ctx(res, workdirs["explained"]))
  assert all(ax.get_xscale() == "log" and ax.get_yscale() == "log" for ax in fig.axes)


def test_minority_sentence_and_curvature_shading_follow_the_rule(workdirs):
  """Below half the median train count (claims.minority_threshold), in words and in the shaded band."""
  res = json.loads(json.dumps(workdirs["results"]))
  res["dataset"]["counts"]["train"] = [100, 60, 45, 20]  # median 52.5, threshold 26.25: only 20 (45 < median)
  res["dataset"]["num_groups"], res["dataset"]["group_names"] = 4, ["a", "b", "c", "d"]
  res["explain"] = fake_explain(res)
  ctx = report.Ctx(res, workdirs["explained"])
  assert ctx.minority.tolist() == [False, False, False, True] and ctx.minority_threshold == 26.25
  from fqjax.report.sections import _minority_sentence
  assert _minority_sentence(ctx) == "Minority: train count below half the median group size (below 26.25 here)."
  fig = report.figure_explain_curvature(ctx)
  for ax in fig.axes:
    (band,) = [p for p in ax.patches if str(p.get_label()).startswith("minority")]
    box = band.get_bbox()
    assert box.x1 == pytest.approx(26.25) and box.x0 < 20
    assert "half the median" in band.get_label()
  even = {**res, "dataset": {**res["dataset"], "counts": {"train": [50, 40, 45, 30]}}}  # 30 < median 42.5, not < half
  assert "none here: no group is below 21.25" in _minority_sentence(report.Ctx(even, ""))
  assert report.figure_explain_curvature(report.Ctx(even, "")) is not None
  assert not [p for ax in report.figure_explain_curvature(report.Ctx(even, "")).axes for p in ax.patches]


def test_partial_workdir_says_what_is_missing(workdirs):
  wd = workdirs["partial"]
  out = report.write_report(wd)
  assert set(out["figures"]) == {"ptq_group_accuracy", "ptq_fairness", "ptq_variant_groups"}
  for name in ("explain", "curvature", "mitigate"):
    assert out["sections"][name].startswith("missing"), out["sections"]
  assert out["sections"]["ptq"] == "ok"
  for path in out["figures"].values():
    _check_png(path)
  _check_html(wd)
  md = open(out["markdown"]).read()
  assert "Explain: not in this workdir" in md and "--stages=explain" in md and "--stages=mitigate" in md
  assert f"--workdir {wd}" in md
  row = next(line for line in md.splitlines() if line.startswith("| fairqat beats ptq and qat |"))
  assert "**not tested**" in row and "mitigate stage did not run" in row
  for section in SECTIONS:
    assert f"## {section}" in md


def test_rerender_drops_figures_whose_data_is_gone(workdirs, tmp_path):
  wd = str(tmp_path)
  res = workdirs["results"]
  report.write_report(wd, results=res)
  assert os.path.exists(os.path.join(wd, "figures", "explain_curvature.png"))
  without = {k: v for k, v in res.items() if k != "explain"}
  out = report.write_report(wd, results=without)
  assert not os.path.exists(os.path.join(wd, "figures", "explain_curvature.png"))
  assert "explain_curvature" not in out["figures"] and "explain_curvature" not in open(out["html"]).read()


def test_cli(workdirs, tmp_path, capsys):
  env = {**os.environ, "PYTHONPATH": REPO}
  cmd = [sys.executable, "-m", "fqjax.report"]
  missing = subprocess.run(cmd + [str(tmp_path / "nope")], capture_output=True, text=True, env=env, cwd=REPO)
  assert missing.returncode == 2 and "does not exist" in missing.stderr
  empty = subprocess.run(cmd + [str(tmp_path)], capture_output=True, text=True, env=env, cwd=REPO)
  assert empty.returncode == 2 and "no results.json" in empty.stderr
  with pytest.raises(FileNotFoundError, match="no results.json"):
    report.write_report(str(tmp_path))
  assert report.main([workdirs["partial"]]) == 0
  assert "explain: missing" in capsys.readouterr().out
