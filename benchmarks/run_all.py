"""Every fqjax benchmark in one run: one table of ratios with the backend and device, written as JSON.

Usage: python benchmarks/run_all.py [--size small|full] [--json benchmarks/results/latest.json]
  small: sized for a CPU; full: sized for one accelerator. Run times and latest figures: benchmarks/README.md.

Ratios (medians; each measured within one run of its script):
  quantized / full-precision train step   (quant_overhead; goal <= 1.3x)
  input pipeline / train step, images/s   (input_pipeline; goal >= 5x)
  naive loop / one-function sweep          (ptq_sweep; goal >= 1x, i.e. the sweep is not slower)
  all group gradient norms / one gradient  (curvature; goal <= 1.5x)
  HVP / gradient                           (curvature; expected 2-3x)
  Lanczos / power-iteration HVPs at tol 1e-3 on the top eigenvalue (curvature; goal <= 0.5)
  explain stage wall / its HVP + gradient compute (curvature section 6, explain_overhead; goal <= 1.5)
"""
import argparse
import datetime
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax

from benchmarks import curvature, input_pipeline, ptq_sweep, quant_overhead
from benchmarks.common import device_description, write_json_atomic


def _rows(size: str) -> tuple[list, dict]:
  raw, rows = {}, []
  t0 = time.perf_counter()
  q = raw["quant_overhead"] = quant_overhead.run(size)
  for r in q["rows"]:
    rows.append(("quant step / fp step", f"{r['model']} batch {r['batch']}", r["ratio"], "<= 1.3"))
  p = raw["input_pipeline"] = input_pipeline.run(size)
  for r in p["rows"]:
    rows.append(("pipeline / train step (img/s)", r["dataset"], r["gather"] / r["step"], ">= 5"))
  s = raw["ptq_sweep"] = ptq_sweep.run(size)
  for r in s["rows"]:
    rows.append(("naive loop / sweep (steady)", f"{r['model']} N {r['n']}", r["loop_over_sweep_steady"], ">= 1"))
    rows.append(("naive loop / sweep (with compile)", f"{r['model']} N {r['n']}", r["loop_over_sweep_first_call"],
                 ">= 1"))
  c = raw["curvature"] = curvature.run(size)
  for label, key, goal in curvature.RATIO_KEYS:
    setting = c["explain_stage"]["setting"] if key.startswith("explain_") else c.get("setting", "")
    rows.append((label, setting, c["ratios"][key], goal))
  raw["wall_s"] = time.perf_counter() - t0
  return rows, raw


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--size", choices=("small", "full"), default="small")
  parser.add_argument("--json", default=os.path.join("benchmarks", "results", "latest.json"))
  args = parser.parse_args()
  device = device_description()
  print(f"fqjax benchmarks, size {args.size}, {device}, {platform.node()}, "
        f"{datetime.date.today().isoformat()}")
  rows, raw = _rows(args.size)
  print(f"{'ratio':<45} {'setting':<28} {'value':>8}  goal")
  for label, setting, value, goal in rows:
    print(f"{label:<45} {setting:<28} {value:>8.2f}  {goal}")
  print(f"total wall time {raw['wall_s']:.0f} s")
  write_json_atomic(args.json, {"size": args.size, "device": device, "backend": jax.default_backend(),
                                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                                "table": [dict(zip(("ratio", "setting", "value", "goal"), r)) for r in rows],
                                "raw": raw})
  print(f"written: {args.json}")


if __name__ == "__main__":
  main()
