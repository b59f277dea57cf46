"""Time of a PTQ bit-width sweep: one compiled sweep function vs a loop of per-bit-width compilations.

Usage: python benchmarks/ptq_sweep.py [--models small_cnn,resnet18] [--size small|cpu|full] [--n 256]
                                      [--batch 256] [--repeats 3] [--a_bits 8|same] [--json PATH]
Sizes (N test images, batch; repeats): small: SmallCNN 360, 360; ResNet-18 32, 32; 3 (for a CPU; what
run_all uses). cpu (the default): SmallCNN 360, 360; ResNet-18 256, 256; 3. full: SmallCNN 360, 360;
ResNet-18 10000, 256; 5 (one accelerator). Run times and figures: benchmarks/README.md.

For each model it evaluates the inference logits of the test set at the bit-widths
(32, 8, 6, 5, 4, 3, 2) (weights; activations per --a_bits, default full precision
as in the study config) four ways:
  vmap:   fqjax.study.ptq.sweep_fn(model, "vmap"): one compiled function, jax.vmap over the stacked bits
  map:    fqjax.study.ptq.sweep_fn(model, "map"):  one compiled function, jax.lax.map over the stacked bits
  loop1:  a Python loop over bit-widths calling ONE jitted function with the bits tree as an
          argument (traced: compiled once)
  static: the naive baseline: one jitted function per bit-width with its bits baked in as Python
          constants (K compilations), called in a Python loop
Each way loops over the test set in fixed-shape batches (padded, as fqjax.study.ptq.sweep_logits does); the
batches are put on the device once beforehand, so no mode pays host transfers the others do not.

Printed per model: the first call including compilation (for static: the K compilations and runs
together; caches cleared before each mode) and the steady-state median (benchmarks.common.
median_times_interleaved), then the ratios
  loop/sweep: static time / best of (vmap, map), first call and steady state; >= 1 means the sweep is
              not slower than the loop (issue goal on CPU; reported for GPU when one is available),
  map/vmap:   map time / vmap time, > 1 means vmap is faster,
and which mode fqjax.study.ptq.resolve_mode("auto", num_params) picks here, and whether it is the faster one.
Before timing, every mode's logits are checked against the vmap sweep's (np.testing.assert_allclose;
see check_same_logits for the tolerance when activations are quantized).

Importable: ``run(size="small" | "cpu" | "full")`` returns the results dict that --json writes.
"""
import argparse
import os
import sys
import time
from typing import Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import block, device_description, median_times_interleaved, write_json_atomic
from fqjax.quantization import layers
from fqjax.study import ptq
from fqjax.data.pipeline import padded_batches
from fqjax.models import get_model

BIT_WIDTHS = (32, 8, 6, 5, 4, 3, 2)
MODES = ("vmap", "map", "loop1", "static")
NUM_CLASSES = 10
# model: (input shape [H, W, C], dataset the shape stands for)
SHAPES = {"small_cnn": ((8, 8, 1), "digits"), "resnet18": ((32, 32, 3), "cifar10")}
# size: {model: (n test images, batch size)}, repeats. "small" runs ResNet-18 at batch 32, not 256, to
# keep a CPU run short; "cpu" (the command-line default) is ResNet-18 at batch 256 on one batch;
# "full" is the digits test split and the CIFAR-10 test set.
SIZES = {
    "small": ({"small_cnn": (360, 360), "resnet18": (32, 32)}, 3),
    "cpu": ({"small_cnn": (360, 360), "resnet18": (256, 256)}, 3),
    "full": ({"small_cnn": (360, 360), "resnet18": (10000, 256)}, 5),
}


def _num_params(variables) -> int:
  return sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(variables["params"]))


def _make_runners(model, variables, bits_trees: Sequence[dict], batches) -> dict:
  """{mode: (build, run)}: build() makes fresh jitted functions (nothing compiled yet); run(fns)
  evaluates the whole sweep and returns device arrays: a list over batches of [K, batch, C] for the
  sweeps, a list over bit-widths of lists over batches of [batch, C] for the loops."""
  stacked = layers.stack_bits_trees(bits_trees)
  # Python floats: concrete bits, so the quantizers see constants (and 32 bits drops them).
  static_trees = [jax.tree_util.tree_map(float, t) for t in bits_trees]

  def apply(variables, bits_tree, x):
    return model.apply({**variables, layers.BITS: bits_tree}, x, train=False)

  def static_fn(bits_tree):
    return jax.jit(lambda variables, x: apply(variables, bits_tree, x))

  def sweep_build(mode):
    def build():
      ptq.sweep_fn.cache_clear()
      return ptq.sweep_fn(model, mode)
    return build

  def sweep_run(fn):
    return [fn(variables, stacked, x) for x, _ in batches]

  return {
      "vmap": (sweep_build("vmap"), sweep_run),
      "map": (sweep_build("map"), sweep_run),
      "loop1": (lambda: jax.jit(apply),
                lambda fn: [[fn(variables, t, x) for x, _ in batches] for t in bits_trees]),
      "static": (lambda: [static_fn(t) for t in static_trees],
                 lambda fns: [[fn(variables, x) for x, _ in batches] for fn in fns]),
  }


def _to_logits(mode: str, out, batches) -> np.ndarray:
  """[K, N, C] float32 from a runner's output."""
  if mode in ("vmap", "map"):
    return np.concatenate([np.asarray(o)[:, :valid] for o, (_, valid) in zip(out, batches)], axis=1)
  return np.stack([np.concatenate([np.asarray(o)[:valid] for o, (_, valid) in zip(per_bits, batches)])
                   for per_bits in out])


def check_same_logits(logits: dict, quantized_activations: bool) -> tuple[float, float]:
  """Asserts every mode's logits [K, N, C] match the vmap sweep's; returns (max |diff|, argmax agreement).

  Weights-only quantization: the modes agree to float rounding (measured: bit-exact on CPU).
  Quantized activations: a last-bit float difference between programs (vmap's batched convs, constant
  folding in the static programs) can move an activation across a rounding boundary, shifting that
  image's logits (measured: up to 0.7% of max |logit|, 99.9% of argmaxes equal, SmallCNN and
  ResNet-18 at a_bits 8 and "same"). So there the tolerance is 5% of max |logit| and >= 99% argmax
  agreement.
  """
  ref = logits["vmap"]
  scale = max(1.0, float(np.abs(ref).max()))
  atol = 0.05 * scale if quantized_activations else 1e-5 * scale
  rtol = 0.0 if quantized_activations else 1e-5
  max_diff, agree = 0.0, 1.0
  for mode, out in logits.items():
    assert out.shape == ref.shape, (mode, out.shape, ref.shape)
    np.testing.assert_allclose(out, ref, rtol=rtol, atol=atol, err_msg=f"mode {mode!r} differs from vmap")
    mode_agree = float((out.argmax(-1) == ref.argmax(-1)).mean())
    assert mode_agree >= (0.99 if quantized_activations else 1.0), (mode, mode_agree)
    max_diff, agree = max(max_diff, float(np.abs(out - ref).max())), min(agree, mode_agree)
  return max_diff, agree


def measure(name: str, n: int, batch: int, repeats: int, bit_widths: Sequence[int] = BIT_WIDTHS,
            a_bits=None, seed: int = 0) -> dict:
  """Times the four ways of one model's sweep; asserts they give the same logits."""
  shape, dataset = SHAPES[name]
  batch = min(batch, n)
  model = get_model(name, NUM_CLASSES)
  x = np.random.default_rng(seed).normal(size=(n,) + shape).astype(np.float32)
  variables = jax.jit(model.init)(jax.random.PRNGKey(seed), jnp.asarray(x[:batch]))
  names = layers.quant_layer_names(model, jax.ShapeDtypeStruct((batch,) + shape, jnp.float32))
  specs = ptq.sweep_specs(bit_widths, a_bits)
  if any(s.a_bits is not None for s in specs):
    variables = ptq.prepare_variables(model, variables, [x[:batch]])
  bits_trees = [s.bits_tree(names) for s in specs]
  # [(device array [batch, ...] float32, number of real rows)], put on the device once.
  batches = [(jax.device_put(chunk), real) for chunk, real in padded_batches(x, batch)]
  runners = _make_runners(model, variables, bits_trees, batches)

  first, calls, logits = {}, {}, {}
  for mode, (build, run_fn) in runners.items():
    jax.clear_caches()
    start = time.perf_counter()
    fns = build()
    out = block(run_fn(fns))
    first[mode] = time.perf_counter() - start
    calls[mode] = (lambda run_fn=run_fn, fns=fns: run_fn(fns))
    logits[mode] = _to_logits(mode, out, batches)

  assert logits["vmap"].shape == (len(bit_widths), n, NUM_CLASSES), logits["vmap"].shape
  max_diff, argmax_agree = check_same_logits(logits, quantized_activations=a_bits is not None)

  steady = median_times_interleaved(calls, repeats=repeats, warmup=0)  # the first call warmed them up
  sweep_mode = min(("vmap", "map"), key=lambda m: steady[m])
  sweep_mode_first = min(("vmap", "map"), key=lambda m: first[m])
  num_params = _num_params(variables)
  auto = ptq.resolve_mode("auto", num_params)
  return {
      "model": name, "dataset_shape": dataset, "input_shape": list(shape), "n": n, "batch": batch,
      "num_params": num_params, "bit_widths": list(bit_widths), "a_bits": a_bits, "repeats": repeats,
      "steady_s": steady, "first_call_s": first, "max_abs_logit_diff": max_diff,
      "argmax_agreement": argmax_agree,
      "best_sweep_mode": sweep_mode,
      "loop_over_sweep_steady": steady["static"] / steady[sweep_mode],
      "loop_over_sweep_first_call": first["static"] / first[sweep_mode_first],
      "loop1_over_sweep_steady": steady["loop1"] / steady[sweep_mode],
      "map_over_vmap_steady": steady["map"] / steady["vmap"],
      "map_over_vmap_first_call": first["map"] / first["vmap"],
      "auto_mode": auto, "auto_is_fastest_sweep": auto == sweep_mode,
  }


def run(size: str = "small", models: Optional[Sequence[str]] = None, n: Optional[int] = None,
        repeats: Optional[int] = None, a_bits=None, batch: Optional[int] = None,
        verbose: bool = False) -> dict:
  """Results dict for --json. size: "small" (a CPU, short), "cpu" (ResNet-18 at batch 256 on a CPU)
  or "full" (one accelerator; ResNet-18 on 10000 images). Run times: benchmarks/README.md.

  n / batch / repeats override the size's defaults (for every model). verbose prints the table.
  """
  if size not in SIZES:
    raise ValueError(f"size must be one of {tuple(SIZES)}, got {size!r}.")
  sizing, default_repeats = SIZES[size]
  models = list(models or sizing)
  unknown = [m for m in models if m not in SHAPES]
  if unknown:
    raise ValueError(f"unknown models {unknown}; allowed: {tuple(SHAPES)}.")
  rows = []
  if verbose:
    print(f"device: {device_description()}")
    print(f"bit-widths {list(BIT_WIDTHS)}, a_bits {a_bits}; times in seconds per full sweep")
    print(_HEADER)
  for name in models:
    default_n, default_batch = sizing[name]
    row = measure(name, n or default_n, batch or default_batch, repeats or default_repeats, a_bits=a_bits)
    rows.append(row)
    if verbose:
      print(format_row(row), flush=True)
  return {"benchmark": "ptq_sweep", "version": 1, "size": size, "device": device_description(),
          "backend": jax.default_backend(), "rows": rows}


_HEADER = (f"{'model':<10} {'N':>5} {'batch':>5} {'when':<7} " + " ".join(f"{m:>8}" for m in MODES)
           + f" {'loop/sweep':>10} {'map/vmap':>8}  auto")


def format_row(r: dict) -> str:
  lines = []
  for when, key, ratio, mv in (("steady", "steady_s", "loop_over_sweep_steady", "map_over_vmap_steady"),
                               ("first", "first_call_s", "loop_over_sweep_first_call",
                                "map_over_vmap_first_call")):
    times = " ".join(f"{r[key][m]:>8.4f}" for m in MODES)
    auto = (f"  {r['auto_mode']} ({'fastest' if r['auto_is_fastest_sweep'] else 'NOT fastest'}; "
            f"params {r['num_params']:,})" if when == "steady" else "")
    lines.append(f"{r['model']:<10} {r['n']:>5} {r['batch']:>5} {when:<7} {times} {r[ratio]:>10.2f} "
                 f"{r[mv]:>8.2f}{auto}")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--models", default="small_cnn,resnet18")
  parser.add_argument("--size", default="cpu", choices=tuple(SIZES),
                      help="default N, batch and repeats per model (small, cpu: 2 CPU cores; "
                           "full: one accelerator)")
  parser.add_argument("--n", type=int, default=None, help="test images per model (default: the size's)")
  parser.add_argument("--batch", type=int, default=None, help="batch size per model (default: the size's)")
  parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default: the size's)")
  parser.add_argument("--a_bits", default=None,
                      help="activation bits: unset = full precision (the study default), an int, or 'same'")
  parser.add_argument("--json", default=None, help="write the results here (atomically)")
  args = parser.parse_args()
  models = args.models.split(",")
  unknown = [m for m in models if m not in SHAPES]
  if unknown:
    parser.error(f"--models: unknown {unknown}; allowed: {','.join(SHAPES)}")
  if args.n is not None and args.n < 1:
    parser.error(f"--n must be >= 1, got {args.n}")
  if args.batch is not None and args.batch < 1:
    parser.error(f"--batch must be >= 1, got {args.batch}")
  if args.repeats is not None and args.repeats < 1:
    parser.error(f"--repeats must be >= 1, got {args.repeats}")
  a_bits = args.a_bits
  if a_bits not in (None, "same"):
    if not a_bits.isdigit() or not 1 <= int(a_bits) <= 32:
      parser.error(f"--a_bits must be an int in 1..32 or 'same', got {a_bits!r}")
    a_bits = int(a_bits)
  results = run(args.size, models, args.n, args.repeats, a_bits, args.batch, verbose=True)
  if args.json:
    write_json_atomic(args.json, results)
    print(f"wrote {args.json}")
  return results


if __name__ == "__main__":
  main()
