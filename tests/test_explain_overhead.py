"""benchmarks/explain_overhead.py counts what the explain stage computes: its recorded HVP calls are exactly the
products the results report (Lanczos runs plus the theory's one product per group), one gradient pass per group
and use, one forward chain call per entry, and its compute is less than the stage's wall time."""
import json

import numpy as np

from benchmarks import explain_overhead
from studies import tiny_study_config


def test_recorded_products_are_the_ones_the_results_report(tmp_path):
  config = tiny_study_config()
  config.seeds = (0,)
  config.explain.bit_widths = (32, 4, 2)
  config.explain.density_bits = ()
  config.explain.size_matched_repeats = 0
  config.explain.trace_probes = 0
  config.tensorboard = False
  out = explain_overhead.measure(config, str(tmp_path / "study"))
  res = json.loads((tmp_path / "study" / "results.json").read_text())
  entries = res["explain"]["per_seed"]["0"]
  lanczos = sum(sum(e["curvature"]["num_hvps"]) for e in entries.values())
  groups = len(res["dataset"]["counts"]["train"])
  theory = groups * sum(1 for e in entries.values() if "theory" in e)  # each group's train rows fit one batch
  assert max(res["dataset"]["counts"]["train"]) <= config.explain.batch_size
  assert out["hvp_program_calls"] == lanczos + theory
  calls = {}
  for row in out["calls"]:
    calls[row["program"]] = calls.get(row["program"], 0) + row["count"]
  entries_with_curvature = len(entries)  # one gradient per group in each, one more per group for the theory
  assert calls["_grad_program"] == groups * entries_with_curvature + theory
  assert calls["_chain_fn"] == len(entries)  # the test split fits one forward batch
  assert 0 < out["compile_s"] < out["wall_s"]
  compute = sum(out["compute_s"].values())
  assert 0 < compute < out["wall_s"]
  assert all(np.isfinite(v) and v > 0 for v in out["ratios"].values())
