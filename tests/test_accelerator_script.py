"""benchmarks/accelerator.py --size cpu_small end to end: one JSON with every section, goals, versions, stages."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow  # about 60 s on a 2-core CPU
def test_accelerator_cpu_small(tmp_path):
  out = tmp_path / "x.json"
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "accelerator.py"), "--size", "cpu_small",
                         "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=240)
  assert proc.returncode == 0, proc.stderr[-3000:]
  d = json.loads(out.read_text())
  for name in ("quant_overhead", "ptq_sweep", "curvature", "study"):
    assert name in d["sections"], name
    assert "error" not in d["sections"][name], d["sections"][name].get("error")
  for pkg in ("jax", "jaxlib", "flax"):
    assert d["versions"][pkg], pkg
  assert d["device"]["backend"] and d["device"]["kind"]
  keys = {g["key"] for g in d["goals"]}
  assert {"qat_over_fp_float32", "qat_img_s_bfloat16", "sweep_speedup_small_cnn", "sweep_speedup_resnet18",
          "group_grad_norms_over_gradient", "hvp_over_gradient", "wall_over_hvp_and_gradient"} <= keys
  for g in d["goals"]:
    assert g["status"] in ("pass", "fail", "not measured", "not applicable at this size"), g
  assert all(g["status"] in ("pass", "fail") for g in d["goals"] if g["key"] == "hvp_over_gradient")
  stages = d["sections"]["study"]["stages"]
  for stage in ("train", "ptq", "explain", "mitigate"):
    assert isinstance(stages[stage], float), (stage, stages)
  assert [r["dtype"] for r in d["sections"]["quant_overhead"]["train_step"]] == ["float32", "bfloat16"]
  explain = d["sections"]["study"]["explain_overhead"]  # the study's explain stage against its model programs
  assert explain["hvp_program_calls"] > 0 and 0 < explain["compile_s"] < explain["wall_s"] == stages["explain"]
  assert "study stages" in proc.stdout


def test_accelerator_failure_is_recorded(monkeypatch):
  sys.path.insert(0, ROOT)
  from benchmarks import accelerator

  def boom(cfg):
    raise RuntimeError("broken benchmark")

  monkeypatch.setattr(accelerator, "SECTIONS", [("ptq_sweep", boom)])
  out = accelerator.run_sections(accelerator.SIZES["cpu_small"], 60)
  assert "RuntimeError: broken benchmark" in out["ptq_sweep"]["error"]
  goals = accelerator.goals(out, "cpu_small")
  assert {g["status"] for g in goals if g["section"] == "ptq_sweep"} == {"not measured"}
