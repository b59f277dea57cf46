"""Cost of fake quantization in a training step: (4-bit weights, 8-bit activations) / full precision.

Usage: python benchmarks/quant_overhead.py [--models small_cnn,resnet18] [--batch 128] [--repeats 5]
Goal (issue 2): at most 1.3x on CPU. Prints medians and the ratio per model.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import optax

from benchmarks.common import device_description, median_times_interleaved
from fqjax.quantization import layers
from fqjax.quantization.layers import BitSpec
from fqjax.models import get_model

SHAPES = {"small_cnn": (8, 8, 1), "resnet18": (32, 32, 3), "mlp": (8, 8, 1)}


def make_step(model, tx):
  """One jitted SGD step; ``bits_tree`` is None (full precision, no quantizers) or a bits tree argument."""

  def loss_fn(params, batch_stats, bits_tree, x, y):
    variables = {"params": params, "batch_stats": batch_stats}
    if bits_tree is not None:
      variables[layers.BITS] = bits_tree
    logits, upd = model.apply(variables, x, train=True, mutable=["batch_stats"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd["batch_stats"]

  @jax.jit
  def step(params, batch_stats, opt_state, bits_tree, x, y):
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats, bits_tree, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss

  return step


def measure(name: str, batch: int, repeats: int, w_bits: int = 4, a_bits: int = 8) -> dict:
  model = get_model(name, 10)
  key = jax.random.PRNGKey(0)
  x = jax.random.normal(key, (batch,) + SHAPES[name])
  y = jax.random.randint(key, (batch,), 0, 10)
  variables = jax.jit(model.init)(key, x)
  tx = optax.sgd(0.01, momentum=0.9)
  opt_state = tx.init(variables["params"])
  step = make_step(model, tx)
  bits_tree = BitSpec.uniform(w_bits, a_bits).bits_tree(layers.quant_layer_names(model, x))
  args = (variables["params"], variables["batch_stats"], opt_state)
  t = median_times_interleaved({"fp": lambda: step(*args, None, x, y),
                                "quant": lambda: step(*args, bits_tree, x, y)}, repeats)
  t_fp, t_q = t["fp"], t["quant"]
  return {"model": name, "batch": batch, "fp_s": t_fp, "quant_s": t_q, "ratio": t_q / t_fp}


def run(size: str = "small") -> dict:
  """Results for benchmarks/run_all.py. small: SmallCNN at batch 128 and ResNet-18 at batch 16
  (a CPU is slow at ResNet-18 batch 128); full: both at batch 128."""
  if size not in ("small", "full"):
    raise ValueError(f"size must be 'small' or 'full', got {size!r}.")
  rows = [measure("small_cnn", 128, 7)]
  rows.append(measure("resnet18", 16 if size == "small" else 128, 3 if size == "small" else 10))
  return {"benchmark": "quant_overhead", "size": size, "device": device_description(), "rows": rows}


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--models", default="small_cnn,resnet18")
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  print(f"device: {device_description()}")
  print(f"{'model':<10} {'batch':>5} {'fp step (s)':>12} {'w4a8 step (s)':>14} {'ratio':>6}")
  rows = []
  for name in args.models.split(","):
    r = measure(name, args.batch, args.repeats)
    rows.append(r)
    print(f"{r['model']:<10} {r['batch']:>5} {r['fp_s']:>12.4f} {r['quant_s']:>14.4f} {r['ratio']:>6.2f}")
  return rows


if __name__ == "__main__":
  main()
