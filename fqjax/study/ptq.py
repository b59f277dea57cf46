"""Post-training quantization: evaluate a trained model at a sweep of bit-widths from one compiled function,
and the PTQ stage's per-seed entry (``ptq_seed``).

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

How an entry quantizes (weight grid, BatchNorm handling) is a fqjax.study.schemes.Quantization;
``quantization_start`` and ``deployed_variables`` turn trained variables into what that quantized model
runs with (calibrated activation ranges; BatchNorm statistics re-estimated when the scheme says so), for the
PTQ, explain and mitigate stages alike.
"""
from __future__ import annotations

import functools
import time
from typing import Iterable, Mapping, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fqjax import choices
from fqjax.analysis import metrics, stats
from fqjax.study.schemes import Quantization, ptq_schemes, quantization_for
from fqjax.study.seed import TrainedSeed
from fqjax.quantization import layers, quant
from fqjax.training import parallel, train
from fqjax.data.pipeline import padded_batches
from fqjax.quantization.layers import BitSpec

SWEEP_MODES = choices.SWEEP_MODES


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


def quantization_start(model: nn.Module, variables: Mapping, train_x: np.ndarray, pcfg, seed: int, *,
                       calibrate: bool) -> dict:
  """The variables a quantized ``model`` starts from: the trained ``variables`` without stale
  "bits" / "quant_stats", plus, with ``calibrate``, activation ranges ("quant_stats") calibrated by
  ``model`` on ``pcfg.calibration_batches`` random training batches of ``train_x`` [N, ...] drawn from ``seed``.
  """
  calib = calibration_batches(train_x, pcfg.calibration_batch_size, pcfg.calibration_batches,
                              seed) if calibrate else None
  return prepare_variables(model, variables, calib, pcfg.calibration)


def deployed_variables(qmodel: nn.Module, qvars: Mapping, bits_tree, quantization: Quantization,
                       train_x: np.ndarray, pcfg, seed: int) -> dict:
  """``qvars`` as the quantized model is deployed: BatchNorm statistics re-estimated for ``bits_tree`` when
  ``quantization.recalibrate_bn`` (on ``pcfg.bn_batches`` training batches drawn from ``seed``); unchanged
  otherwise and at full precision (where every scheme is the model as trained)."""
  if not quantization.recalibrate_bn or layers.is_full_precision_tree(bits_tree):
    return dict(qvars)
  batches = calibration_batches(train_x, pcfg.calibration_batch_size, pcfg.bn_batches, seed + 1)
  return {**qvars, "batch_stats": recalibrate_batch_stats(qmodel, qvars, bits_tree, batches)}


def ptq_seed(trained: TrainedSeed, config) -> dict:
  """The PTQ stage's entry: the sweep of one trained seed on the test split, for every scheme of
  config.ptq.variants (bit-widths config.ptq.bit_widths, batches of config.eval.batch_size).

  Returns {"by_bits": {bits: group metrics + size_bytes [+ fairness_violation_ci]} of the primary
  scheme, "variants": {other scheme's name: its by_bits}, "sweep_s": seconds of all sweeps, "sweep_mode"}.
  Reference for accuracy drops: the model as trained (no folding, no quantizer in the graph), evaluated
  once; groups.paired_counts [G, 4] (fqjax.analysis.stats.CELLS) pair each test example's reference and quantized
  outcome, the sufficient statistic of the paired bootstrap; flip_rate (overall and per group) is the fraction
  of test rows whose predicted class differs from the reference's (Hooker et al. 2020). Activation ranges
  are calibrated once (at full precision, so the weight rule does not matter).
  With BatchNorm recalibration each bit-width has its own statistics, so that sweep runs one
  bit-width at a time through the same compiled function (K = 1).
  """
  pcfg, ecfg = config.ptq, config.eval
  model, variables, splits, layer_names, seed, mesh = (trained.model, trained.variables, trained.splits,
                                                       trained.layer_names, trained.seed, trained.mesh)
  bit_widths = [int(b) for b in pcfg.bit_widths]
  specs = sweep_specs(bit_widths, pcfg.a_bits)
  trees = [s.bits_tree(layer_names) for s in specs]
  qvars = quantization_start(quantization_for(config).apply(model), variables, splits.train.x, pcfg, seed,
                             calibrate=any(s.a_bits is not None for s in specs))
  num_params = sum(int(np.prod(np.shape(a))) for a in jax.tree_util.tree_leaves(variables["params"]))
  mode = resolve_mode(pcfg.sweep_mode, num_params)
  test = splits.test
  ref_logits = train.predict(model, {k: variables[k] for k in ("params", "batch_stats")}, test.x, ecfg.batch_size,
                             mesh)
  ref = metrics.group_metrics(ref_logits, test.y, test.group, splits.info.num_groups,
                              group_is_label=splits.info.group_is_label)
  t0 = time.perf_counter()
  logits = {scheme.name: _scheme_logits(model, config, scheme, qvars, trees, splits, seed, mode, mesh)
            for scheme in ptq_schemes(config)}
  sweep_s = time.perf_counter() - t0
  sizes = [quant.storage_size(qvars["params"], layers.weight_bits_by_layer(spec, layer_names),
                              per_channel=pcfg.per_channel)["bytes"] for spec in specs]
  by_variant = {name: {str(bits): _entry_metrics(ref_logits, ref, scheme_logits[i], splits, ecfg, seed, sizes[i])
                       for i, bits in enumerate(bit_widths)}
                for name, scheme_logits in logits.items()}
  primary = ptq_schemes(config)[0].name
  return {"by_bits": by_variant.pop(primary), "variants": by_variant, "sweep_s": sweep_s, "sweep_mode": mode}


def _entry_metrics(ref_logits: np.ndarray, ref: Mapping, logits: np.ndarray, splits, ecfg, seed: int,
                   size_bytes: int) -> dict:
  """Group metrics of one bit-width's test logits [N, C] against the reference's (logits [N, C] and their group
  metrics ``ref``), with the paired counts, prediction flips, storage size and (with ecfg.bootstrap_resamples) the
  fairness violation's interval."""
  test, info = splits.test, splits.info
  m = metrics.group_metrics(logits, test.y, test.group, info.num_groups, group_is_label=info.group_is_label,
                            reference=ref)
  correct = logits.argmax(-1) == test.y
  m["groups"]["paired_counts"] = stats.paired_counts(ref_logits.argmax(-1) == test.y, correct, test.group,
                                                     info.num_groups).tolist()
  flips = metrics.flip_rates(ref_logits.argmax(-1), logits.argmax(-1), test.group, info.num_groups)
  m["flip_rate"], m["groups"]["flip_rate"] = flips["overall"], flips["groups"]
  m["size_bytes"] = size_bytes
  if ecfg.bootstrap_resamples:
    m["fairness_violation_ci"] = metrics.bootstrap_fairness_violation(
        correct, test.group, info.num_groups, num_resamples=ecfg.bootstrap_resamples, seed=seed)
  return m


def _scheme_logits(model, config, scheme, qvars, trees, splits, seed: int, mode: str, mesh) -> np.ndarray:
  """Test logits [K, N, C] of one PTQ scheme at every bits tree (one sweep, or one per bit-width when
  BatchNorm is re-estimated for each)."""
  quantization = quantization_for(config, scheme=scheme)
  qmodel, test, batch_size = quantization.apply(model), splits.test, config.eval.batch_size
  if not quantization.recalibrate_bn:
    return sweep_logits(qmodel, qvars, test.x, trees, batch_size=batch_size, mode=mode, mesh=mesh)
  return np.concatenate([
      sweep_logits(qmodel, deployed_variables(qmodel, qvars, tree, quantization, splits.train.x, config.ptq, seed),
                   test.x, [tree], batch_size=batch_size, mode=mode, mesh=mesh) for tree in trees])
