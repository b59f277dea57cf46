"""Is the input pipeline ever the bottleneck? Images/s of the pipeline alone vs a SmallCNN training step.

Usage: python benchmarks/input_pipeline.py [--datasets digits,cifar10] [--batch 128] [--repeats 5]
                                           [--cifar_n 50000]

For each dataset size (digits: 1797 x 8x8x1; CIFAR-10: 50000 x 32x32x3 random
float32) it prints the median images/s of
  device gather:  epoch_batches plan + DeviceArrays.gather, batch by batch (the default path)
  host + prefetch: benchmarks/host_pipeline.py's source_batches from a list of per-image records,
                  read ahead by its prefetch thread (the path random-access sources such as
                  tfds.data_source would need; fqjax itself keeps data on the device)
  train step:     one jitted SGD step of SmallCNN (BatchNorm, weighted masked CE) on a fixed batch
  gather + step:  the real loop, gathering each batch and stepping on it
and the ratios pipeline / step (goal >= 5x) and (gather + step) / step (near 1
when the pipeline hides behind the step).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.common import device_description, median_time
from benchmarks.host_pipeline import prefetch, source_batches
from fqjax.training import losses
from fqjax.data import pipeline
from fqjax.models import SmallCNN

SHAPES = {"digits": (1797, (8, 8, 1)), "cifar10": (50000, (32, 32, 3))}
NUM_CLASSES = 10
NUM_GROUPS = 4


def make_step(model, tx, table):
  """One jitted SGD step on a gathered batch dict (x, y, group, mask); state donated."""

  def loss_fn(params, batch_stats, batch):
    logits, upd = model.apply({"params": params, "batch_stats": batch_stats}, batch["x"],
                              train=True, mutable=["batch_stats"])
    weights = losses.gather_weights(table, batch["group"])
    return losses.weighted_cross_entropy(logits, batch["y"], weights, batch["mask"]), upd["batch_stats"]

  def step(params, batch_stats, opt_state, batch):
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1, 2))


def median_rate(fn, images: int, repeats: int) -> float:
  """Median images/s of ``fn()`` (blocked on) over ``repeats`` runs after one warm-up."""
  return images / median_time(fn, repeats)


def measure(name: str, n: int, shape, batch: int, repeats: int, steps: int) -> dict:
  rng = np.random.default_rng(0)
  x = rng.standard_normal((n,) + shape, dtype=np.float32)
  y = rng.integers(0, NUM_CLASSES, n).astype(np.int32)
  group = rng.integers(0, NUM_GROUPS, n).astype(np.int32)
  data = pipeline.DeviceArrays(x, y, group)
  num_batches = -(-n // batch)
  epoch = [0]

  def gather_epoch():
    # A fresh plan each epoch, as in training; the host shuffle is part of the cost.
    epoch[0] += 1
    plan = pipeline.epoch_batches(n, batch, seed=epoch[0])
    return [data.gather(i, m) for i, m in zip(plan.idx, plan.mask)][-1]

  records = [{"x": x[i], "y": y[i], "group": group[i]} for i in range(n)]
  host_batches = min(num_batches, 100)  # a slice of the epoch: stacking records is slow in Python

  def host_epoch():
    plan = pipeline.epoch_batches(n, batch, seed=1)
    plan = pipeline.EpochBatches(plan.idx[:host_batches], plan.mask[:host_batches])
    last = None
    for last in prefetch(source_batches(records, plan), size=2, transform=jax.device_put):
      pass
    return last

  model = SmallCNN(num_classes=NUM_CLASSES)
  variables = jax.jit(lambda k, v: model.init(k, v, train=False))(jax.random.key(0), jnp.asarray(x[:batch]))
  tx = optax.sgd(0.01, momentum=0.9)
  table = losses.inverse_frequency_weights(jnp.asarray(np.bincount(group, minlength=NUM_GROUPS)))
  step = make_step(model, tx, table)
  state = [variables["params"], variables["batch_stats"], tx.init(variables["params"])]
  plan = pipeline.epoch_batches(n, batch, seed=0)
  fixed = data.gather(plan.idx[0], plan.mask[0])

  def run_steps(gather: bool):
    def run():
      loss = None
      for s in range(steps):
        b = data.gather(plan.idx[s % num_batches], plan.mask[s % num_batches]) if gather else fixed
        state[0], state[1], state[2], loss = step(*state, b)
      return loss
    return run

  gather_rate = median_rate(gather_epoch, n, repeats)
  host_rate = median_rate(host_epoch, host_batches * batch, repeats)
  step_rate = median_rate(run_steps(False), steps * batch, repeats)
  loop_rate = median_rate(run_steps(True), steps * batch, repeats)
  return {"dataset": name, "n": n, "shape": shape, "gather": gather_rate, "host": host_rate,
          "step": step_rate, "loop": loop_rate}


def run(size: str = "small") -> dict:
  """Results for benchmarks/run_all.py. small: digits + 10000 CIFAR-sized images; full: 50000."""
  if size not in ("small", "full"):
    raise ValueError(f"size must be 'small' or 'full', got {size!r}.")
  rows = []
  for name in ("digits", "cifar10"):
    n, shape = SHAPES[name]
    if name == "cifar10" and size == "small":
      n = 10000
    r = measure(name, n, shape, 128, 5, 5)
    r["gather_over_step"] = r["gather"] / r["step"]
    rows.append(r)
  return {"benchmark": "input_pipeline", "size": size, "device": device_description(), "rows": rows}


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--datasets", default="digits,cifar10")
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--steps", type=int, default=5, help="training steps per timed repeat")
  parser.add_argument("--cifar_n", type=int, default=50000, help="CIFAR-sized samples (lower to save memory)")
  args = parser.parse_args()
  print(f"device: {device_description()}; batch {args.batch}; medians of {args.repeats} repeats")
  header = (f"{'dataset':<8} {'shape':<11} {'gather img/s':>13} {'host+prefetch':>14} {'step img/s':>11} "
            f"{'gather/step':>12} {'host/step':>10} {'loop/step':>10}")
  print(header)
  rows = []
  for name in args.datasets.split(","):
    if name not in SHAPES:
      raise SystemExit(f"unknown dataset {name!r}; allowed: {sorted(SHAPES)}")
    n, shape = SHAPES[name]
    if name == "cifar10":
      n = args.cifar_n
    r = measure(name, n, shape, args.batch, args.repeats, args.steps)
    rows.append(r)
    print(f"{name:<8} {'x'.join(map(str, shape)):<11} {r['gather']:>13,.0f} {r['host']:>14,.0f} "
          f"{r['step']:>11,.0f} {r['gather'] / r['step']:>11.1f}x {r['host'] / r['step']:>9.1f}x "
          f"{r['loop'] / r['step']:>9.2f}x")
  worst = min(r["gather"] / r["step"] for r in rows)
  print(f"goal: pipeline >= 5x the step; worst gather/step ratio here: {worst:.1f}x "
        f"({'met' if worst >= 5 else 'NOT met'})")
  return rows


if __name__ == "__main__":
  main()
