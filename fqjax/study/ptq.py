"""Post-training quantization: evaluate a trained model at a sweep of bit-widths from one compiled function.

The bit-widths of a sweep are a stacked "bits" tree [K] (see fqjax.quantization.layers). One
jitted function maps it over the K bit-widths for each input batch:
  mode "vmap": jax.vmap over K (one wide program; wins when launch overhead dominates),
  mode "map":  jax.lax.map over K (one program, K sequential passes; wins for large
               conv nets on CPU, where vmap turns convs into batched-kernel convs).
  mode "devices": the K bit-widths split over the devices of a mesh (jax.shard_map), each
               device running lax.map over its share (one bit-width per device when K <= devices).
Either way the sweep compiles once per batch shape, never once per bit-width.
"auto" picks per backend (``resolve_mode``; measured by benchmarks/ptq_sweep.py).
With a data-parallel mesh (modes vmap/map), each input batch is split over the devices instead.
"""
from __future__ import annotations

import functools
from typing import Iterable, Mapping, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fqjax import choices
from fqjax.quantization import layers, quant
from fqjax.training import parallel
from fqjax.data.pipeline import padded_batches
from fqjax.quantization.layers import BitSpec

SWEEP_MODES = choices.SWEEP_MODES


def parse_variant(variant: str) -> tuple[str, str]:
  """("max", "keep") from "max/keep": a PTQ variant is a weight scale rule and a BatchNorm mode.

  Scale rules: fqjax.choices.WEIGHT_SCALE_RULES (quant.weight_scale). BatchNorm: "keep" the trained
  running statistics, or "recalibrate" them for the quantized model (recalibrate_batch_stats).
  """
  scale, _, bn = str(variant).partition("/")
  if scale not in choices.WEIGHT_SCALE_RULES or bn not in choices.PTQ_BN_MODES:
    raise ValueError(f"PTQ variant {variant!r} is not '<scale>/<bn>' with scale in {choices.WEIGHT_SCALE_RULES} "
                     f"and bn in {choices.PTQ_BN_MODES}, e.g. 'max/keep' or 'mse/recalibrate'.")
  return scale, bn


def resolve_mode(mode: str, num_params: int) -> str:
  """The sweep mode for this backend and model size: "auto" -> "map" or "vmap".

  On CPU vmap over the weights turns each conv into a grouped conv, so lax.map wins for
  conv nets of every size, and the dense-only models where vmap wins cannot be told apart
  by parameter count: CPU always gets map. Accelerators are launch-bound on small models:
  vmap under 2M parameters, map above. (Timings: benchmarks/README.md, benchmarks/ptq_sweep.py.)
  """
  if mode not in SWEEP_MODES:
    raise ValueError(f"sweep mode must be one of {SWEEP_MODES}, got {mode!r}.")
  if mode != "auto":
    return mode
  if jax.default_backend() != "cpu" and num_params < 2_000_000:
    return "vmap"
  return "map"


def sweep_specs(bit_widths: Sequence[int], a_bits: Union[int, str, None] = None) -> list[BitSpec]:
  """One uniform BitSpec per weight bit-width (None or >= 32: full precision).

  a_bits: None (full-precision activations), an int, or "same" (= each weight bit-width).
  """
  specs = []
  for bits in bit_widths:
    a = bits if a_bits == "same" else a_bits
    w = None if bits is None or bits >= quant.FULL_PRECISION_BITS else int(bits)
    a = None if a is None or a >= quant.FULL_PRECISION_BITS else int(a)
    specs.append(BitSpec.uniform(w, a))
  return specs


@functools.lru_cache(maxsize=32)
def sweep_fn(model: nn.Module, mode: str):
  """jitted f(variables, stacked bits trees [K], x [B, ...]) -> logits [K, B, C]."""

  def one(variables, bits_tree, x):
    return model.apply({**variables, layers.BITS: bits_tree}, x, train=False)

  if mode == "vmap":
    return jax.jit(jax.vmap(one, in_axes=(None, 0, None)))
  if mode == "map":
    return jax.jit(lambda variables, bits_trees, x: jax.lax.map(lambda t: one(variables, t, x), bits_trees))
  raise ValueError(f"sweep_fn mode must be 'vmap' or 'map', got {mode!r}.")


@functools.lru_cache(maxsize=32)
def device_sweep_fn(model: nn.Module, mesh: parallel.Mesh):
  """jitted f(variables, stacked bits trees [K], x) with K split over the mesh; K must be a multiple of its size."""
  P = jax.sharding.PartitionSpec

  def local(variables, bits_trees, x):
    return jax.lax.map(lambda t: model.apply({**variables, layers.BITS: t}, x, train=False), bits_trees)

  return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), P(parallel.DATA_AXIS), P()),
                               out_specs=P(parallel.DATA_AXIS)))


def sweep_logits(model: nn.Module, variables: Mapping, x: np.ndarray, bits_trees: Sequence[dict], *,
                 batch_size: int = 512, mode: str = "auto", mesh: Optional[parallel.Mesh] = None) -> np.ndarray:
  """Inference logits of every bit assignment: [K, N, C] float32.

  x: [N, ...]; bits_trees: K "bits" trees (e.g. ``[s.bits_tree(names) for s in specs]``).
  ``variables`` may hold "quant_stats" (calibrated activation ranges).
  mesh: with mode "devices", the devices the bit-widths are spread over (default: all);
    with vmap/map, a data-parallel mesh that splits each batch (None: one device).
  """
  num_params = sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(variables.get("params", {})))
  mode = resolve_mode(mode, num_params)
  k = len(bits_trees)
  if mode == "devices":
    mesh = mesh or parallel.data_mesh()
    trees = list(bits_trees) + [bits_trees[-1]] * (-k % mesh.size)  # pad K to a multiple of the devices
    fn = device_sweep_fn(model, mesh)
    stacked = parallel.put_tree(layers.stack_bits_trees(trees), parallel.batch_sharding(mesh))
    variables = parallel.put_tree(variables, parallel.replicated(mesh))
    batch_multiple, x_sharding = 1, parallel.replicated(mesh)
  else:
    fn = sweep_fn(model, mode)
    stacked = layers.stack_bits_trees(bits_trees)
    if mesh is not None:
      stacked = parallel.put_tree(stacked, parallel.replicated(mesh))
      variables = parallel.put_tree(variables, parallel.replicated(mesh))
    batch_multiple = 1 if mesh is None else mesh.size
    x_sharding = None if mesh is None else parallel.batch_sharding(mesh)
  out = []
  for chunk, real in padded_batches(x, batch_size, batch_multiple):  # fixed shape: one compilation
    if x_sharding is not None:
      chunk = parallel.global_array(chunk, x_sharding)
    out.append(fn(variables, stacked, chunk)[:k, :real])  # on device: one transfer at the end
  return np.asarray(parallel.to_host(jnp.concatenate(out, axis=1)), np.float32)


def calibration_batches(x: np.ndarray, batch_size: int, num_batches: int, seed: int) -> list[np.ndarray]:
  """``num_batches`` random training batches [batch_size, ...] for activation calibration."""
  rng = np.random.default_rng(seed)
  order = rng.permutation(len(x))
  return [np.asarray(x[order[i * batch_size:(i + 1) * batch_size]])
          for i in range(num_batches) if len(order[i * batch_size:(i + 1) * batch_size])]


def prepare_variables(model: nn.Module, variables: Mapping, calib_x: Optional[Iterable[np.ndarray]],
                      calibration: str = "minmax") -> dict:
  """Adds calibrated "quant_stats" (activation ranges) when calibration batches are given."""
  variables = {k: v for k, v in variables.items() if k not in (layers.BITS, layers.QUANT_STATS)}
  if calib_x is None:
    return variables
  return {**variables, layers.QUANT_STATS: layers.calibrate_activations(model, variables, calib_x, calibration)}


@functools.lru_cache(maxsize=32)
def _batch_stats_fn(model: nn.Module):
  def stats(variables, x):
    _, state = model.apply(variables, x, train=True, mutable=["batch_stats", layers.BN_BATCH_STATS])
    return jax.tree_util.tree_map(lambda v: v[0], state[layers.BN_BATCH_STATS], is_leaf=lambda v: isinstance(v, tuple))
  return jax.jit(stats)


def recalibrate_batch_stats(model: nn.Module, variables: Mapping, bits_tree: Mapping,
                            batches: Iterable[np.ndarray]) -> dict:
  """BatchNorm running statistics re-estimated for the quantized model, as deployed PTQ pipelines do.

  Each BatchNorm layer's mean and var become the averages, over ``batches`` (each [B, ...]), of the
  batch mean and (biased) batch variance that the network quantized by ``bits_tree`` computes in
  training mode at that layer (the layers before it quantized too). Returns a "batch_stats" tree of
  the same structure as ``variables["batch_stats"]``; a model without BatchNorm gets its own back.
  """
  batch_stats = variables.get("batch_stats") or {}
  if not jax.tree_util.tree_leaves(batch_stats):
    return dict(batch_stats)
  fn = _batch_stats_fn(model)
  inputs = {k: v for k, v in variables.items() if k not in (layers.BITS,)}
  total, n = None, 0
  for x in batches:
    stats = fn({**inputs, layers.BITS: bits_tree}, jnp.asarray(x))
    total = stats if total is None else jax.tree_util.tree_map(jnp.add, total, stats)
    n += 1
  if n == 0:
    raise ValueError("recalibrate_batch_stats needs at least one batch.")
  return jax.device_get(jax.tree_util.tree_map(lambda s: s / n, total))
