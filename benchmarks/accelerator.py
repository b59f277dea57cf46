"""Every accelerator measurement of the "scale" issue in one run, written as one JSON file.

Usage:
  python benchmarks/accelerator.py --size cpu_small [--out PATH] [--budget_s S]   # tiny models, < 60 s on 2 CPUs
  python benchmarks/accelerator.py --size gpu [--out PATH]                        # one H100, < 8 minutes

Sections (each caught and recorded on failure, never fatal):
  quant_overhead  quant_overhead's measure/run, plus QAT (w4 a8) and FP train steps of
                  fqjax.training.train.make_train_step in float32 and bfloat16 (model kwarg dtype), images/s
  ptq_sweep       one-function sweep vs per-bit-width loop (ptq_sweep.run)
  curvature       group norms / gradient, HVP / gradient, second-order terms / HVP per group
  study           fqjax.study.runner.run per stage (last_run["stages"]); its explain stage against the compute
                  in its model programs (benchmarks/explain_overhead.py)
Then versions, device, a "goals" list (goal, measured value, pass/fail/not measured) and a table.
A section starts only while the wall-clock budget (--budget_s) is not spent; later ones are recorded
as skipped.

Output: --out, else $OUT/accelerator_<device kind>_<date>.json when $OUT is set, else
benchmarks/results/accelerator_<device kind>_<date>.json (written atomically).

The GPU image lacks ml-collections and the PyYAML it imports (and tensorflow-datasets, array-record, tensorboardX);
fqjax.training.train / fqjax.study.runner import ml_collections, so carry them as wheels (benchmarks/gpu_run.sh does both steps):
  here:  bash benchmarks/gpu_run.sh --download     (Python 3.12 wheels into wheels/)
  there: bash benchmarks/gpu_run.sh                (run tool with carry ["wheels"])
The study runs with config.tensorboard off (no tensorboardX there).
This module imports only the standard library and jax at import time; fqjax and the other benchmark
scripts are imported inside the sections.
"""
import argparse
import datetime
import os
import platform
import re
import statistics
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp

# Per size: train-step model/batch/steps, quant_overhead rows, ptq_sweep args, curvature args, study.
SIZES = {
    # cpu_small skips quant_overhead.measure (its compiles cost ~4 s); gpu runs quant_overhead.run("full").
    "cpu_small": {"budget_s": 55, "step": ("small_cnn", 32, 2, 2), "qo": [],
                  "ptq": {"size": "small", "models": ["small_cnn"], "repeats": 2},
                  "curv": {"n": 96, "width": 4, "repeats": 1, "batch": 96}, "study": "tiny"},
    "gpu": {"budget_s": 480, "step": ("resnet18", 256, 20, 5), "qo": None,
            "ptq": {"size": "full"}, "curv": None, "study": "resnet18"},
}
SHAPES = {"small_cnn": (8, 8, 1), "resnet18": (32, 32, 3)}


def _versions() -> dict:
  import importlib.metadata as md
  out = {"python": platform.python_version()}
  for pkg in ("jax", "jaxlib", "flax", "optax", "ml-collections"):
    try:
      out[pkg] = md.version(pkg)
    except md.PackageNotFoundError:
      out[pkg] = None
  return out


def _device() -> dict:
  dev = jax.devices()[0]
  return {"backend": jax.default_backend(), "kind": dev.device_kind, "count": jax.device_count(),
          "platform": dev.platform, "host": platform.node(), "cpus": os.cpu_count()}


def _write(path: str, payload: dict) -> None:
  try:  # benchmarks.common's atomic writer; fallback kept local so a broken import still writes
    from benchmarks.common import write_json_atomic
  except Exception:  # noqa: BLE001
    write_json_atomic = None
  if write_json_atomic is not None:
    return write_json_atomic(path, payload)
  import json
  os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
  with os.fdopen(fd, "w") as f:
    json.dump(payload, f, indent=2, default=str)
  os.replace(tmp, path)


def _train_step_rate(name: str, batch: int, steps: int, repeats: int, dtype) -> dict:
  """Images/s of make_train_step for FP and QAT (w4 a8), timed round-robin on one fixed batch."""
  import optax
  from fqjax.quantization import layers
  from fqjax.training import train
  from fqjax.quantization.layers import BitSpec
  from fqjax.models import get_model
  model = get_model(name, 10, dtype=dtype)
  key = jax.random.PRNGKey(0)
  x = jax.random.normal(key, (batch,) + SHAPES[name])
  b = {"x": x, "y": jax.random.randint(key, (batch,), 0, 10), "group": jnp.zeros((batch,), jnp.int32),
       "mask": jnp.ones((batch,), jnp.float32)}
  table = jnp.ones((1,), jnp.float32)
  bits = BitSpec.uniform(4, 8).bits_tree(layers.quant_layer_names(model, x))
  step = train.make_train_step(model)
  tx = optax.sgd(0.01, momentum=0.9)
  states = {k: train.create_train_state(model, key, x, tx) for k in ("fp", "qat")}
  extras = {"fp": None, "qat": {layers.BITS: bits}}

  def burst(k):  # the state is donated, so each call threads it through
    for _ in range(steps):
      states[k], m = step(states[k], b, table, extras[k])
    jax.block_until_ready(m["loss"])

  for k in states:
    burst(k)  # compile and warm up
  times = {k: [] for k in states}
  for _ in range(repeats):
    for k in states:
      t0 = time.perf_counter()
      burst(k)
      times[k].append(time.perf_counter() - t0)
  med = {k: statistics.median(v) / steps for k, v in times.items()}
  return {"model": name, "batch": batch, "dtype": jnp.dtype(dtype).name, "fp_step_s": med["fp"],
          "qat_step_s": med["qat"], "fp_img_s": batch / med["fp"], "qat_img_s": batch / med["qat"],
          "qat_over_fp": med["qat"] / med["fp"]}


def section_quant(cfg: dict) -> dict:
  from benchmarks import quant_overhead
  out = {}
  if cfg["qo"] is None:  # gpu: the script's own accelerator size
    out["quant_overhead"] = quant_overhead.run("full")
  else:
    out["quant_overhead"] = {"rows": [quant_overhead.measure(*r) for r in cfg["qo"]]}
  name, batch, steps, repeats = cfg["step"]
  out["train_step"] = [_train_step_rate(name, batch, steps, repeats, d) for d in (jnp.float32, jnp.bfloat16)]
  out["ratios"] = {f"qat_over_fp_{r['dtype']}": r["qat_over_fp"] for r in out["train_step"]}
  out["ratios"]["qat_img_s_bfloat16"] = out["train_step"][1]["qat_img_s"]
  return out


def section_ptq(cfg: dict) -> dict:
  from benchmarks import ptq_sweep
  out = ptq_sweep.run(**cfg["ptq"])
  # The goal's speed-up counts compilation (a study sweeps once per seed); steady state kept beside it.
  out["ratios"] = {f"sweep_speedup_{r['model']}": r["loop_over_sweep_first_call"] for r in out["rows"]}
  out["ratios"].update({f"sweep_speedup_steady_{r['model']}": r["loop_over_sweep_steady"] for r in out["rows"]})
  return out


def section_curvature(cfg: dict) -> dict:
  from benchmarks import curvature
  c = cfg["curv"]
  if c is None:
    return curvature.run("full")
  # cpu_small: the same measurements on an untrained tiny SmallCNN and a slice of the long-tailed digits.
  import numpy as np
  from fqjax.models import SmallCNN
  x, y, group = curvature.digits(long_tail=True)
  keep = np.random.default_rng(0).permutation(len(x))[:c["n"]]
  x, y, group = x[keep], y[keep], group[keep]
  model = SmallCNN(num_classes=10, width=c["width"])
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), x[:2])
  out = {"setting": f"small_cnn w{c['width']} digits N {len(x)} (untrained)"}
  out["grad_norm_cost"] = curvature.grad_cost("small_cnn", model, variables, x, y, group, c["repeats"],
                                              batch_sizes=(c["batch"],))
  out["hvp_cost"] = curvature.hvp_cost(model, variables, x, y, c["repeats"], batch_size=c["batch"])
  out["theory_cost"] = curvature.theory_cost(model, variables, x, y, group, c["repeats"], batch_size=c["batch"])
  out["ratios"] = {"group_grad_norms_over_gradient": out["grad_norm_cost"]["ratio"],
                   "hvp_over_gradient": out["hvp_cost"]["ratio"],
                   "theory_over_hvp": out["theory_cost"]["theory_over_hvp"]}
  return out


def study_config(kind: str):
  """cpu_small: tests/conftest.py's tiny_study_config (copied, 1 seed); gpu: ResNet-18, CIFAR-shaped data."""
  from fqjax.study.config import base_config  # lazy: needs ml_collections
  c = base_config()
  c.data.name = "synthetic"
  c.tensorboard = False  # tensorboardX is not in the accelerator image; the benchmark needs no scalars
  if kind == "tiny":
    c.name, c.seeds = "tiny", (0,)
    c.data.synthetic.group_sizes = (160, 80, 30)
    c.data.synthetic.noise, c.data.synthetic.shift = (1.0, 1.2, 1.5), (0.0, 0.5, 1.0)
    c.model.name, c.model.kwargs.width = "small_cnn", 4
    c.train.epochs, c.train.batch_size, c.train.learning_rate = 2, 32, 0.05
    c.ptq.bit_widths = (32, 8, 4, 2)
    c.eval.bootstrap_resamples = 20
    c.explain.bit_widths, c.explain.top_k, c.explain.trace_probes = (32,), 3, 2  # conftest: (32, 2)
    c.explain.lanczos_max_iters, c.explain.lanczos_tol, c.explain.size_matched_repeats = 20, 1e-3, 1  # conftest: 40
    c.mitigate.bit_widths = (4,)
    c.mitigate.methods = ("ptq", "qat", "fairqat")  # conftest has 5 methods; 3 keep cpu_small under 60 s
    c.mitigate.epochs, c.mitigate.batch_size = 1, 32
    return c
  # gpu: 10 long-tailed groups (ratio 1/50), 18.5k images: ~12k train after the 0.2 test / 0.15 val carve-out.
  c.name, c.seeds = "scale_resnet18", (0, 1, 2)
  sizes = tuple(int(round(6600 * 0.02 ** (g / 9))) for g in range(10))
  c.data.synthetic.group_sizes = sizes
  c.data.synthetic.num_classes, c.data.synthetic.shape = 10, (32, 32, 3)
  c.data.synthetic.noise = tuple(1.0 + 0.05 * g for g in range(10))
  c.data.synthetic.shift = tuple(0.1 * g for g in range(10))
  c.model.name = "resnet18"
  c.train.epochs, c.train.batch_size = 3, 256
  c.mitigate.epochs, c.mitigate.batch_size = 1, 256
  c.mitigate.bit_widths = (4,)
  c.explain.trace_probes, c.explain.lanczos_max_iters = 2, 20  # ResNet-18 HVPs: keep explain inside the budget
  return c


def section_study(cfg: dict) -> dict:
  """The whole study timed per stage, its explain stage measured against its model programs
  (benchmarks/explain_overhead.py: every HVP, gradient and forward program call re-timed warm afterwards)."""
  from benchmarks import explain_overhead
  from fqjax.study import runner# lazy: needs ml_collections
  config = study_config(cfg["study"])
  stages, total = {}, 0.0
  with tempfile.TemporaryDirectory() as workdir:
    t0 = time.perf_counter()
    for part in (["train", "ptq"], ["explain"], ["mitigate", "report"]):
      if part == ["explain"]:
        with explain_overhead.recording() as (recorder, compile_s):
          res = runner.run(config, workdir, part, progress=False)
      else:
        res = runner.run(config, workdir, part, progress=False)
      stages.update({k: v for k, v in res["last_run"]["stages"].items() if k in part})
      total += res["last_run"]["total_s"]
    wall = time.perf_counter() - t0
    explain = explain_overhead.summarize(recorder, compile_s, stages["explain"])
  return {"config": config.name, "seeds": list(config.seeds), "model": config.model.name,
          "group_sizes": list(config.data.synthetic.group_sizes), "stages": stages, "total_s": total,
          "wall_s": wall, "explain_overhead": {k: v for k, v in explain.items() if k != "calls"},
          "ratios": explain["ratios"]}


SECTIONS = [("quant_overhead", section_quant), ("ptq_sweep", section_ptq), ("curvature", section_curvature),
            ("study", section_study)]


def run_sections(cfg: dict, budget_s: float, only=None) -> dict:
  """Runs each section while the budget lasts; a failure is recorded as {"error", "traceback"}."""
  t_start, out = time.perf_counter(), {}
  for name, fn in SECTIONS:
    if only and name not in only:
      continue
    spent = time.perf_counter() - t_start
    if spent > budget_s:
      out[name] = {"skipped": f"budget of {budget_s:.0f} s spent ({spent:.0f} s)"}
      continue
    t0 = time.perf_counter()
    try:
      out[name] = fn(cfg)
    except Exception as e:  # noqa: BLE001 -- recorded, so one broken benchmark does not lose the others
      out[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=8)}
    out[name]["section_wall_s"] = time.perf_counter() - t0
    print(f"[{name}] {out[name]['section_wall_s']:.1f} s" + (" ERROR " + out[name]["error"]
                                                             if "error" in out[name] else ""), flush=True)
  return out


# (goal label, section, ratio key, comparison, threshold, sizes it applies to)
GOALS = [("QAT / FP train step, float32", "quant_overhead", "qat_over_fp_float32", "<=", 1.10, None),
         ("QAT / FP train step, bfloat16", "quant_overhead", "qat_over_fp_bfloat16", "<=", 1.10, None),
         ("bf16 QAT images/s (ResNet-18 batch 256)", "quant_overhead", "qat_img_s_bfloat16", ">=", 60000, ("gpu",)),
         ("PTQ sweep speed-up, SmallCNN", "ptq_sweep", "sweep_speedup_small_cnn", ">=", 2.0, None),
         ("PTQ sweep speed-up, ResNet-18", "ptq_sweep", "sweep_speedup_resnet18", ">=", 1.0, None),
         ("group norms / gradient", "curvature", "group_grad_norms_over_gradient", "<=", 1.5, None),
         ("HVP / gradient", "curvature", "hvp_over_gradient", "<=", 2.5, None),
         ("explain wall / its HVP + gradient compute", "study", "wall_over_hvp_and_gradient", "<=", 1.5, None)]


def goals(sections: dict, size: str) -> list:
  out = []
  for label, sec, key, op, thr, sizes in GOALS:
    g = {"goal": label, "section": sec, "key": key, "target": f"{op} {thr:g}", "value": None}
    if sizes and size not in sizes:
      g["status"] = "not applicable at this size"
    else:
      value = sections.get(sec, {}).get("ratios", {}).get(key)
      if value is None:
        g["status"] = "not measured"
      else:
        g["value"] = float(value)
        g["status"] = "pass" if (value <= thr if op == "<=" else value >= thr) else "fail"
    out.append(g)
  return out


def default_path(kind: str) -> str:
  name = f"accelerator_{re.sub(r'[^A-Za-z0-9]+', '_', kind).strip('_')}_{datetime.date.today().isoformat()}.json"
  root = os.environ.get("OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
  return os.path.join(root, name)


def print_table(payload: dict) -> None:
  print(f"\n{'goal':<42} {'value':>10} {'target':>10}  status")
  for g in payload["goals"]:
    v = "-" if g["value"] is None else f"{g['value']:.3g}"
    print(f"{g['goal']:<42} {v:>10} {g['target']:>10}  {g['status']}")
  study = payload["sections"].get("study", {})
  if "stages" in study:
    print("study stages (s): " + ", ".join(f"{k} {v:.1f}" if isinstance(v, (int, float)) else f"{k} {v}"
                                          for k, v in study["stages"].items()))
  for name, sec in payload["sections"].items():
    if "error" in sec:
      print(f"{name}: ERROR {sec['error']}")
  print(f"total wall time {payload['wall_s']:.1f} s; written: {payload['path']}")


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--size", choices=tuple(SIZES), default="gpu")
  parser.add_argument("--out", default=None, help="JSON path (default: see the module doc)")
  parser.add_argument("--budget_s", type=float, default=None, help="wall-clock budget to start sections")
  parser.add_argument("--only", default=None, help="comma-separated sections (default: all)")
  args = parser.parse_args(argv)
  t0 = time.perf_counter()
  cfg, device = SIZES[args.size], _device()
  path = args.out or default_path(device["kind"])
  budget = args.budget_s if args.budget_s is not None else cfg["budget_s"]
  print(f"fqjax accelerator benchmarks, size {args.size}, {device}", flush=True)
  sections = run_sections(cfg, budget, args.only.split(",") if args.only else None)
  payload = {"size": args.size, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             "versions": _versions(), "device": device, "budget_s": budget, "sections": sections,
             "goals": goals(sections, args.size), "wall_s": time.perf_counter() - t0, "path": path}
  _write(path, payload)
  print_table(payload)
  return payload


if __name__ == "__main__":
  main()
