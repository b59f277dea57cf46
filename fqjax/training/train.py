"""Training: TrainState, one train_step for full precision and QAT, eval, the epoch loop, and the train stage's
entry (train_seed); checkpoint files are fqjax.training.checkpoints.

The epoch loop is restartable: after every epoch the state, the epoch number,
the loss-weight table and the history go to an orbax CheckpointManager, and
``fit`` resumes from the latest one. Epoch order and resampling are drawn
from (seed, epoch), so a resumed run ends with the same numbers as an
uninterrupted one. Host syncs happen once per epoch, not per step.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import os
import time
from typing import Any, Callable, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.training import train_state
from tqdm import tqdm

from fqjax import choices
from fqjax.training import losses, parallel, sampling
from fqjax.analysis import metrics
from fqjax.data.pipeline import DeviceArrays, epoch_batches, padded_batches
from fqjax.errors import FqjaxError
from fqjax.training.checkpoints import (checkpoint_manager, finished_epochs, restore_checkpoint,
                                        save_checkpoint, tree_digest)

log = logging.getLogger("fqjax")

OPTIMIZERS, WEIGHT_TARGETS = choices.OPTIMIZERS, choices.WEIGHT_TARGETS


class TrainState(train_state.TrainState):
  """flax TrainState plus BatchNorm running statistics."""
  batch_stats: Any = None


class TrainingDiverged(FqjaxError, RuntimeError):
  """The loss became NaN or infinite; the last good checkpoint is kept (an fqjax error: one line, logged)."""


def make_optimizer(tcfg: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.GradientTransformation:
  """SGD with momentum or AdamW, linear warmup then cosine decay, with weight decay.

  Schedule: lr rises linearly from 0 over ``warmup_epochs`` and decays by a
  cosine to 0 at the end of ``epochs``. SGD's weight decay is L2 added to the
  gradient (before momentum); AdamW's is decoupled. Equal settings return the
  same object, so a jitted step that closes over the state's optimizer is reused
  across runs (seeds, bit-widths) instead of recompiled.
  """
  if tcfg.optimizer not in OPTIMIZERS:
    raise ValueError(f"config.train.optimizer must be one of {OPTIMIZERS}, got {tcfg.optimizer!r}.")
  return _optimizer(tcfg.optimizer, float(tcfg.learning_rate), float(tcfg.momentum), float(tcfg.weight_decay),
                    float(tcfg.warmup_epochs), int(tcfg.epochs), int(steps_per_epoch))


@functools.lru_cache(maxsize=64)
def _optimizer(name: str, learning_rate: float, momentum: float, weight_decay: float, warmup_epochs: float,
               epochs: int, steps_per_epoch: int) -> optax.GradientTransformation:
  total = max(epochs * steps_per_epoch, 1)
  warmup = min(int(warmup_epochs * steps_per_epoch), total - 1)
  schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup, total, end_value=0.0)
  if name == "sgd":
    return optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(schedule, momentum=momentum))
  return optax.adamw(schedule, weight_decay=weight_decay)


def create_train_state(model: nn.Module, key: jax.Array, sample_x: jax.Array,
                       tx: optax.GradientTransformation, variables: Optional[Mapping] = None) -> TrainState:
  """Initializes params and batch stats (or takes ``variables``) and the optimizer state."""
  if variables is None:
    variables = _init_fn(model)(key, sample_x)
  else:
    variables = jax.tree_util.tree_map(jnp.array, dict(variables))  # copies: the jitted step donates the state
  # apply_fn stays None: a bound method compares by identity, so storing it in the state (a static,
  # treedef-level field) would make every model clone recompile the jitted step.
  return TrainState.create(apply_fn=None, params=variables["params"],
                           batch_stats=variables.get("batch_stats", {}), tx=tx)


@functools.lru_cache(maxsize=32)
def _init_fn(model: nn.Module) -> Callable:
  return jax.jit(functools.partial(model.init, train=False))


def model_variables(state: TrainState) -> dict:
  return {"params": state.params, "batch_stats": state.batch_stats}


@functools.lru_cache(maxsize=32)
def make_train_step(model: nn.Module, weight_key: str = "group", bn_train: bool = True) -> Callable:
  """Jitted step(state, batch, weight_table, extra) -> (state, {"loss", "correct", "count"}).

  batch: {"x": [B, ...], "y": [B], "group": [B], "mask": [B]}; weight_table: [G]
  (or [num_classes] when weight_key == "y"); extra: more variable collections,
  e.g. {"bits": bits_tree, "quant_stats": ranges} for QAT, or None for full precision.
  The loss is fqjax.training.losses.weighted_cross_entropy over the real (mask 1) samples. The state is donated.
  bn_train=False freezes BatchNorm: running statistics are used and not updated
  (and a fold_bn model trains on its folded, quantized kernel, as QAT practice does).
  """

  def loss_fn(params, state, batch, weight_table, extra):
    variables = {"params": params, "batch_stats": state.batch_stats, **(extra or {})}
    if not bn_train:
      return _frozen_bn_loss(model, variables, batch, weight_table, weight_key, state.batch_stats)
    logits, updates = model.apply(variables, batch["x"], train=True, mutable=["batch_stats"])
    weights = losses.gather_weights(weight_table, batch[weight_key])
    loss = losses.weighted_cross_entropy(logits, batch["y"], weights, batch["mask"])
    return loss, (logits, updates.get("batch_stats", {}))

  @functools.partial(jax.jit, donate_argnums=(0,))
  def step(state, batch, weight_table, extra=None):
    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state, batch, weight_table, extra)
    state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    correct = jnp.sum((jnp.argmax(logits, -1) == batch["y"]) * batch["mask"])
    return state, {"loss": loss, "correct": correct, "count": jnp.sum(batch["mask"])}

  return step


def _frozen_bn_loss(model, variables, batch, weight_table, weight_key, batch_stats):
  logits = model.apply(variables, batch["x"], train=False)
  weights = losses.gather_weights(weight_table, batch[weight_key])
  return losses.weighted_cross_entropy(logits, batch["y"], weights, batch["mask"]), (logits, batch_stats)


@functools.lru_cache(maxsize=32)
def _logits_fn(model: nn.Module) -> Callable:
  return jax.jit(lambda variables, x: model.apply(variables, x, train=False))


def predict(model: nn.Module, variables: Mapping, x: np.ndarray, batch_size: int = 512,
            mesh: Optional[parallel.Mesh] = None) -> np.ndarray:
  """Inference-mode logits [N, C] float32 of ``x`` [N, ...] in padded fixed-size batches (one compile).

  With a data-parallel ``mesh``, each batch is split over its devices; padding rows are
  dropped, never counted.
  """
  fn = _logits_fn(model)
  if mesh is not None:
    variables = parallel.put_tree(variables, parallel.replicated(mesh))
  out = []
  for chunk, real in padded_batches(x, batch_size, 1 if mesh is None else mesh.size):
    if mesh is not None:
      chunk = parallel.global_array(chunk, parallel.batch_sharding(mesh))
    out.append(fn(variables, chunk)[:real])  # stays on device: one transfer at the end, no sync per batch
  return np.asarray(parallel.to_host(jnp.concatenate(out)), np.float32)


def evaluate(model: nn.Module, variables: Mapping, split, num_groups: int, *, group_is_label: bool = True,
             batch_size: int = 512, reference: Optional[Mapping] = None,
             mesh: Optional[parallel.Mesh] = None) -> dict:
  """fqjax.analysis.metrics.group_metrics of the model on a Split (per-sample results, so exact under sharding)."""
  logits = predict(model, variables, split.x, batch_size, mesh)
  return metrics.group_metrics(logits, split.y, split.group, num_groups, group_is_label=group_is_label,
                               reference=reference)


# ----------------------------------------------------------------------------
# The epoch loop
# ----------------------------------------------------------------------------

def _weight_table(tcfg, counts: np.ndarray, group_losses: Optional[np.ndarray]) -> np.ndarray:
  scheme = tcfg.loss_weights
  if scheme == "hardness" and group_losses is None:
    scheme = "uniform"  # no validation loss yet: the first epoch trains unweighted
  kwargs = {"beta": tcfg.effective_beta}
  if scheme == "hardness":
    kwargs.update(group_losses=group_losses, power=tcfg.hardness_power, floor=tcfg.hardness_floor)
  return np.asarray(losses.weight_table(scheme, counts, **kwargs), np.float32)


def _epoch_rows(train_split, num_ids: int, ids: np.ndarray, tcfg, seed: int, epoch: int) -> np.ndarray:
  """The rows of one epoch: all of them, or the sampler's draw; with ``tcfg.rows_per_epoch`` = R, exactly R rows
  (a seeded subset of a longer draw, or the draw plus seeded repeats of it), so every method takes the same
  number of optimizer steps per epoch whatever its sampler draws."""
  if tcfg.sampling == "none":
    rows = np.arange(len(train_split), dtype=np.int64)
  else:
    kw = sampling.target_option(tcfg.sampling, tcfg.sampling_target)
    rows = sampling.sample_indices(ids, num_ids, tcfg.sampling, seed=seed * 100_003 + epoch, **kw).indices
  target = tcfg.get("rows_per_epoch")
  if target is None or len(rows) == target:
    return rows
  rng = np.random.default_rng(seed * 100_019 + epoch)
  if len(rows) > target:
    return np.sort(rng.choice(rows, size=target, replace=False))
  return np.concatenate([rows, rng.choice(rows, size=target - len(rows), replace=True)])


@dataclasses.dataclass(frozen=True)
class _Plan:
  """What one ``fit`` call trains: fixed before the first epoch."""
  model: nn.Module
  splits: Any
  tcfg: ml_collections.ConfigDict
  seed: int
  ckpt_dir: str
  ids: np.ndarray          # [N] the group (or class) id of each training example: what weights and sampling see
  num_ids: int
  by_group: bool
  bn_train_epochs: Optional[int]
  mesh: Optional[parallel.Mesh]


@dataclasses.dataclass(frozen=True)
class FineTuning:
  """What a fine-tuning run (QAT, or full-precision fine-tuning) starts from and changes; the default is
  training from scratch at full precision.

  init_variables: start from these (e.g. the trained model) instead of a fresh init.
  bits_tree: a "bits" tree for quantization-aware training, None for full precision.
  extra_variables: more collections for the forward pass (e.g. "quant_stats").
  bn_train_epochs: BatchNorm trains (batch statistics) for this many epochs, then is frozen (running
    statistics; folded when the model has fold_bn). None: never frozen.
  init_group_losses: [G] per-group losses for the first epoch's hardness weights (the starting model's
    validation losses); None: uniform first epoch.
  """
  init_variables: Optional[Mapping] = None
  bits_tree: Optional[Mapping] = None
  extra_variables: Optional[Mapping] = None
  bn_train_epochs: Optional[int] = None
  init_group_losses: Optional[Any] = None


def fit(model: nn.Module, splits, tcfg: ml_collections.ConfigDict, seed: int, ckpt_dir: str,
        start: FineTuning = FineTuning(), *, mesh: Optional[parallel.Mesh] = None,
        on_epoch_end: Optional[Callable[[int, dict], None]] = None, progress: bool = True) -> dict:
  """Trains ``model`` on splits.train, validating each epoch; resumes from ``ckpt_dir``.

  Args:
    tcfg: config.train (epochs, batch_size, optimizer, learning_rate, momentum,
      weight_decay, warmup_epochs, sampling, sampling_target, loss_weights,
      weight_target, effective_beta, hardness_power, hardness_floor, eval_batch_size).
    start: a FineTuning (initial variables, bits for QAT, BatchNorm freezing, first-epoch hardness);
      the default trains from scratch at full precision.
    mesh: a data-parallel mesh (fqjax.training.parallel.data_mesh): batches split over its
      devices, state replicated; tcfg.batch_size must be a multiple of its size.
    on_epoch_end: called with (epoch, history entry) after each checkpoint.

  Returns:
    {"variables", "history": [per-epoch dicts], "epochs_run", "resumed_from", "wall_s", "sample_counts",
     "steps": optimizer steps of all epochs}.
  Raises:
    TrainingDiverged naming the first step whose loss was not finite; CorruptFileError for an
    unreadable checkpoint in ``ckpt_dir``.
  """
  train = splits.train
  if tcfg.weight_target not in WEIGHT_TARGETS:
    raise ValueError(f"config.train.weight_target must be one of {WEIGHT_TARGETS}, got {tcfg.weight_target!r}.")
  by_group = tcfg.weight_target == "group"
  plan = _Plan(model=model, splits=splits, tcfg=tcfg, seed=seed, ckpt_dir=ckpt_dir,
               ids=train.group if by_group else train.y,
               num_ids=splits.info.num_groups if by_group else splits.info.num_classes, by_group=by_group,
               bn_train_epochs=start.bn_train_epochs, mesh=mesh)
  steps_per_epoch = -(-len(_epoch_rows(train, plan.num_ids, plan.ids, tcfg, seed, 0)) // tcfg.batch_size)
  state = create_train_state(model, jax.random.PRNGKey(seed), train.x[:2], make_optimizer(tcfg, steps_per_epoch),
                             start.init_variables)
  if mesh is not None:
    parallel.check_divisible(tcfg.batch_size, mesh, "batch_size")
  extra = {**(start.extra_variables or {}), **({"bits": start.bits_tree} if start.bits_tree is not None else {})} or None
  mngr = checkpoint_manager(ckpt_dir)
  try:
    return _fit_loop(plan, mngr, state, extra, start.init_group_losses, on_epoch_end, progress)
  finally:
    mngr.close()  # also on errors: an open manager's threads print noise at interpreter exit


def _fit_loop(plan: _Plan, mngr, state, extra, init_group_losses, on_epoch_end, progress) -> dict:
  """The epochs of ``fit`` from its latest checkpoint on."""
  tcfg, mesh = plan.tcfg, plan.mesh
  history, start_epoch, sample_counts = [], 0, None
  group_losses = None if init_group_losses is None else np.asarray(init_group_losses, np.float64)
  restored = restore_checkpoint(mngr, state)
  if restored is not None:
    state, meta = restored
    history, start_epoch = meta["history"], int(meta["epoch"]) + 1
    group_losses = None if meta["val_group_losses"] is None else np.asarray(meta["val_group_losses"])
    sample_counts = meta.get("sample_counts")  # the last epoch's draw, so a resumed run reports it too
    log.info("resuming from checkpoint of epoch %d in %s", start_epoch - 1, plan.ckpt_dir)
  if mesh is not None:
    state = parallel.put_tree(state, parallel.replicated(mesh))
    extra = None if extra is None else parallel.put_tree(extra, parallel.replicated(mesh))
  train = plan.splits.train
  data = DeviceArrays(train.x, train.y, train.group, sharding=None if mesh is None else parallel.replicated(mesh))
  t0 = time.perf_counter()
  bar = tqdm(range(start_epoch, tcfg.epochs), desc=f"train seed {plan.seed}", disable=not progress,
             initial=start_epoch, total=tcfg.epochs, leave=False)
  for epoch in bar:
    rows = _epoch_rows(train, plan.num_ids, plan.ids, tcfg, plan.seed, epoch)
    sample_counts = np.bincount(plan.ids[rows], minlength=plan.num_ids).tolist()
    table = _weight_table(tcfg, np.asarray(sample_counts), group_losses)
    table = jnp.asarray(table) if mesh is None else parallel.global_array(table, parallel.replicated(mesh))
    state, stacked = _epoch(plan, state, data, rows, table, extra, epoch, mngr)
    eval_vars = {**model_variables(state), **(extra or {})}
    entry, signal = _validate(plan, eval_vars, stacked, table, epoch)
    group_losses = losses.smoothed_hardness(group_losses, signal, tcfg)
    history.append(entry)
    # A deep copy: orbax saves asynchronously, and the live history list grows in the next epoch.
    save_checkpoint(mngr, epoch, state, {"epoch": epoch, "history": copy.deepcopy(history),
                                         "val_group_losses": group_losses.tolist(),
                                         "sample_counts": sample_counts})
    bar.set_postfix(loss=f"{entry['train_loss']:.3f}", acc=f"{entry['train_accuracy']:.3f}",
                    val_acc=f"{entry['val_accuracy']:.3f}")
    if on_epoch_end is not None:
      mngr.wait_until_finished()
      on_epoch_end(epoch, entry)
  mngr.wait_until_finished()
  return {"variables": jax.device_get(model_variables(state)), "history": history,
          "epochs_run": tcfg.epochs - start_epoch, "resumed_from": start_epoch if restored else None,
          "steps": int(sum(h.get("steps", 0) for h in history)),
          "wall_s": time.perf_counter() - t0, "sample_counts": sample_counts}


def _epoch(plan: _Plan, state, data, rows: np.ndarray, table, extra, epoch: int, mngr):
  """One epoch of steps over ``rows``; returns (state, per-step metrics stacked on the host)."""
  batches = epoch_batches(rows, plan.tcfg.batch_size, seed=plan.seed * 1_000_003 + epoch)
  step_fn = make_train_step(plan.model, "group" if plan.by_group else "y",
                            plan.bn_train_epochs is None or epoch < plan.bn_train_epochs)
  step_metrics = []
  for idx, mask in zip(batches.idx, batches.mask):
    batch = data.gather(idx, mask)
    if plan.mesh is not None:  # replicated -> split on the batch axis: a local slice, no communication
      batch = jax.device_put(batch, parallel.batch_sharding(plan.mesh))
    state, m = step_fn(state, batch, table, extra)
    step_metrics.append(m)
  stacked = jax.device_get(jax.tree_util.tree_map(lambda *v: jnp.stack(v), *step_metrics))
  bad = np.flatnonzero(~np.isfinite(stacked["loss"]))
  if bad.size:
    first = epoch * len(batches.idx) + int(bad[0])
    last_good = mngr.latest_step()
    mngr.wait_until_finished()
    kept = (f"The last good checkpoint is epoch {last_good} in {plan.ckpt_dir}." if last_good is not None
            else f"No checkpoint was written yet (it failed in the first epoch); {plan.ckpt_dir} is empty.")
    raise TrainingDiverged(
        f"loss became {stacked['loss'][bad[0]]} at step {first} (epoch {epoch}, batch {int(bad[0])}); "
        f"training stopped. {kept} Lower config.train.learning_rate or check the data for NaN/inf.")
  return state, stacked


def _validate(plan: _Plan, eval_vars, stacked, table, epoch: int) -> tuple[dict, np.ndarray]:
  """The epoch's history entry and the per-id hardness signal (``hardness_signal`` on the validation split)."""
  info, splits, tcfg = plan.splits.info, plan.splits, plan.tcfg
  logits = predict(plan.model, eval_vars, splits.val.x, tcfg.eval_batch_size, plan.mesh)
  val = metrics.group_metrics(logits, splits.val.y, splits.val.group, info.num_groups,
                              group_is_label=info.group_is_label)
  ids = splits.val.group if plan.by_group else splits.val.y
  signal = losses.hardness_signal(logits, splits.val.y, ids, plan.num_ids, tcfg)
  entry = {"epoch": epoch, "steps": int(len(stacked["loss"])),
           "train_loss": float(np.sum(stacked["loss"] * stacked["count"]) / np.sum(stacked["count"])),
           "train_accuracy": float(np.sum(stacked["correct"]) / np.sum(stacked["count"])),
           "val_accuracy": val["accuracy"], "val_loss": val["loss"],
           "val_worst_group_accuracy": val["worst_group_accuracy"], "weights": np.asarray(table).tolist(),
           "hardness_signal": signal.tolist()}
  return entry, signal


def load_trained(model: nn.Module, splits, tcfg, seed: int, ckpt_dir: str) -> Optional[dict]:
  """Variables of the finished training run in ``ckpt_dir`` (latest epoch == epochs - 1), else None.

  Raises CorruptFileError when the finished checkpoint is there but unreadable.
  """
  if finished_epochs(ckpt_dir) != tcfg.epochs - 1:
    return None
  mngr = checkpoint_manager(ckpt_dir, create=False)
  try:
    # Only the optimizer state's structure must match the checkpoint; the schedule length does not matter.
    tx = make_optimizer(tcfg, -(-len(splits.train) // tcfg.batch_size))
    state = create_train_state(model, jax.random.PRNGKey(seed), splits.train.x[:2], tx)
    state, meta = restore_checkpoint(mngr, state, tcfg.epochs - 1)
  finally:
    mngr.close()
  return {"variables": jax.device_get(model_variables(state)), "history": meta["history"],
          "sample_counts": meta.get("sample_counts")}


def train_seed(model: nn.Module, splits, config, seed: int, ckpt_dir: str, *, mesh=None,
               progress: bool = True) -> tuple[dict, dict]:
  """The train stage's entry: full-precision training of one seed (resuming from ``ckpt_dir``) with
  config.train, and its val / test metrics (config.eval's batch size).

  Returns (record, variables): record = {"history", "val", "test", "wall_s", "epochs_run",
  "resumed_from", "sample_counts", "variables_digest"} (JSON-ready; the digest is
  fqjax.training.checkpoints.tree_digest of the final variables, the identity later stages are keyed on).
  """
  out = fit(model, splits, config.train, seed, ckpt_dir, mesh=mesh, progress=progress)
  info = splits.info
  kw = dict(group_is_label=info.group_is_label, batch_size=config.eval.batch_size, mesh=mesh)
  val = evaluate(model, out["variables"], splits.val, info.num_groups, **kw)
  test = evaluate(model, out["variables"], splits.test, info.num_groups, **kw)
  record = {"history": out["history"], "val": val, "test": test, "wall_s": out["wall_s"],
            "epochs_run": out["epochs_run"], "resumed_from": out["resumed_from"],
            "sample_counts": out["sample_counts"], "variables_digest": tree_digest(out["variables"])}
  return record, out["variables"]
