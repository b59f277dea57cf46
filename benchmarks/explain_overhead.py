"""The explain stage's wall time against the compute in its model programs (issue 16's goal: <= 1.5x).

Usage: python benchmarks/explain_overhead.py [--size small|full] [--json PATH]
  small: the default digits study (experiments/digits.py) with seed 0 only: 7 explain entries
  full:  the default study as it runs (3 seeds, 21 entries)
Also reported as section (6) of benchmarks/curvature.py and by benchmarks/accelerator.py (on its study config).

How: the study's training runs first (its own stage, not timed here); then fqjax.study.runner runs the explain stage
alone while every jitted model program the stage calls is counted by the exact shapes of its arguments:
  hvp      hvp._hvp_program: Lanczos products, density, the theory's product
  grad     hvp._grad_program (group gradients for the norms and the theory), curvature._sample_norm_step
           (per-sample gradient norms, vmap of grad)
  forward  forward._chain_fn, forward._kernels_program, theory._loss_program, curvature._dequantize_program
After the stage each distinct call is re-run warm with the arguments of its first call (bursts of 5 back-to-back
calls blocked on once, median of 7 bursts), and compute = sum over distinct calls of count x time per call.
Everything else is overhead: compilation (measured from jax.monitoring's compile events during the stage),
Lanczos bookkeeping, host syncs, Python, and the recorder's own bookkeeping (a shape signature per call).
Printed: wall / (hvp + grad), wall / (all model programs), (wall - compilation) / (all model programs).
"""
import argparse
import collections
import contextlib
import functools
import importlib
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import numpy as np

from benchmarks.common import device_description, write_json_atomic

# (module path, factory name, kind) of every jitted model program the explain stage calls.
PROGRAMS = [("fqjax.explain.hvp", "_hvp_program", "hvp"),
            ("fqjax.explain.hvp", "_grad_program", "grad"),
            ("fqjax.explain.curvature", "_sample_norm_step", "grad"),
            ("fqjax.explain.curvature", "_dequantize_program", "forward"),
            ("fqjax.explain.forward", "_chain_fn", "forward"),
            ("fqjax.explain.forward", "_kernels_program", "forward"),
            ("fqjax.explain.theory", "_loss_program", "forward")]
COMPILE_EVENTS = ("/jax/core/compile/backend_compile_duration", "/jax/core/compile/jaxpr_trace_duration",
                  "/jax/core/compile/jaxpr_to_mlir_module_duration")
DONATING = {"_sample_norm_step"}  # donates its first argument: re-timing passes fresh copies


def _signature(args) -> tuple:
  leaves = jax.tree_util.tree_leaves(args)
  return tuple((tuple(np.shape(a)), str(getattr(a, "dtype", type(a).__name__))) for a in leaves)


class _Recorder:
  """Counts each program call by (factory, argument shapes) and keeps its first call's arguments."""

  def __init__(self):
    self.calls = {}

  def wrap(self, factory, name: str, kind: str):
    @functools.lru_cache(maxsize=None)
    def make(*fargs):
      program = factory(*fargs)

      def call(*args):
        key = (name, id(program), _signature(args))
        if key not in self.calls:
          self.calls[key] = {"name": name, "kind": kind, "count": 0, "program": program, "args": _copy(args)}
        self.calls[key]["count"] += 1
        return program(*args)

      return call
    return make


def _copy(args):
  return jax.tree_util.tree_map(lambda a: a.copy() if isinstance(a, jax.Array) else a, args)


def _time_call(rec: dict, repeats: int = 7, burst: int = 5) -> float:
  """Seconds per warm call with the recorded arguments: ``burst`` calls dispatched back to back and blocked on
  once (as the stage dispatches them: no per-call sync latency counted as compute), median over ``repeats``."""
  times = []
  for _ in range(repeats + 1):
    argsets = [_copy(rec["args"]) if rec["name"] in DONATING else rec["args"] for _ in range(burst)]
    jax.block_until_ready(argsets)
    t = time.perf_counter()
    jax.block_until_ready([rec["program"](*args) for args in argsets])
    times.append((time.perf_counter() - t) / burst)
  return statistics.median(times[1:])  # the first may still compile (a copy's layout) or warm caches


@contextlib.contextmanager
def recording():
  """Within the block, every call of the PROGRAMS is recorded and compile time summed; yields (recorder,
  compile seconds by event)."""
  recorder, saved = _Recorder(), []
  for module_name, attr, kind in PROGRAMS:
    module = importlib.import_module(module_name)
    saved.append((module, attr, getattr(module, attr)))
    setattr(module, attr, recorder.wrap(getattr(module, attr), attr, kind))
  compile_s = collections.defaultdict(float)
  listener = lambda event, duration, **kw: compile_s.__setitem__(event, compile_s[event] + duration)
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield recorder, compile_s
  finally:
    if hasattr(jax.monitoring, "unregister_event_duration_listener"):  # absent from older jax: then it stays
      jax.monitoring.unregister_event_duration_listener(listener)
    for module, attr, original in saved:
      setattr(module, attr, original)


def summarize(recorder: _Recorder, compile_s: dict, wall: float) -> dict:
  """Re-times every recorded call warm and returns the ratios of ``wall`` (the stage's seconds) to them."""
  compiled = sum(compile_s.get(e, 0.0) for e in COMPILE_EVENTS)
  by_kind, rows = collections.Counter(), []
  for rec in recorder.calls.values():
    t = _time_call(rec)
    by_kind[rec["kind"]] += rec["count"] * t
    rows.append({"program": rec["name"], "count": rec["count"], "median_s": t,
                 "shapes": str(_signature(rec["args"])[-3:])})
  hvp_grad = by_kind["hvp"] + by_kind["grad"]
  model = hvp_grad + by_kind["forward"]
  return {"wall_s": wall, "compile_s": compiled, "compute_s": dict(by_kind), "calls": rows,
          "hvp_program_calls": sum(r["count"] for r in rows if r["program"] == "_hvp_program"),
          "ratios": {"wall_over_hvp_and_gradient": wall / hvp_grad, "wall_over_model_programs": wall / model,
                     "wall_less_compile_over_model_programs": (wall - compiled) / model}}


def measure(config, workdir: str) -> dict:
  """Trains ``config``'s seeds in ``workdir`` (untimed), then runs and measures its explain stage."""
  from fqjax.study import runner
  runner.run(config, workdir, stages=["train"], progress=False)
  with recording() as (recorder, compile_s):
    res = runner.run(config, workdir, stages=["explain"], progress=False)
  return summarize(recorder, compile_s, res["last_run"]["stages"]["explain"])


def study_config(size: str):
  from experiments.digits import get_config
  if size not in ("small", "full"):
    raise ValueError(f"size must be 'small' or 'full', got {size!r}.")
  c = get_config()
  if size == "small":
    c.seeds = (0,)
  c.tensorboard = False
  return c


def run(size: str = "small") -> dict:
  t0 = time.perf_counter()
  with tempfile.TemporaryDirectory() as workdir:
    out = measure(study_config(size), os.path.join(workdir, "study"))
  out.update(benchmark="explain_overhead", size=size, device=device_description(),
             setting="default digits study" + (", seed 0" if size == "small" else ", 3 seeds"),
             bench_wall_s=time.perf_counter() - t0)
  return out


def report(out: dict) -> None:
  r, c = out["ratios"], out["compute_s"]
  print(f"explain stage ({out['setting']}): wall {out['wall_s']:.1f} s, of which compilation {out['compile_s']:.1f} s;"
        f" {out['hvp_program_calls']} HVP program calls (one per product and batch)")
  print(f"  compute in model programs: hvp {c.get('hvp', 0):.1f} s, grad {c.get('grad', 0):.1f} s, "
        f"forward {c.get('forward', 0):.1f} s")
  print(f"  wall / (HVP + gradient compute)        {r['wall_over_hvp_and_gradient']:.2f}  (goal <= 1.5)")
  print(f"  wall / all model programs              {r['wall_over_model_programs']:.2f}")
  print(f"  (wall - compilation) / model programs  {r['wall_less_compile_over_model_programs']:.2f}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", choices=("small", "full"), default="small")
  parser.add_argument("--json", default=None, help="also write the results here (atomically)")
  args = parser.parse_args()
  out = run(args.size)
  report(out)
  if args.json:
    write_json_atomic(args.json, out)


if __name__ == "__main__":
  main()
