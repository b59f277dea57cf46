"""Weighted cross-entropy and per-group (or per-class) weight tables.

A weight table ``w: [G] float32`` gives every group g (or class) a weight; a
batch gathers its per-sample weights with :func:`gather_weights` and passes
them to :func:`weighted_cross_entropy`.

Schemes, with n_g the number of training samples in group g:

  uniform:            w_g ∝ 1
  inverse_frequency:  w_g ∝ 1 / n_g
  effective_number:   w_g ∝ (1 - beta) / (1 - beta^n_g)        (Cui et al., CVPR 2019)
  hardness:           w_g = floor + (1 - floor) * h_g,  h_g ∝ loss_g^power
                      (FairQAT's "higher weights for harder groups"; loss_g is the
                      current validation loss or error of group g, refreshed each epoch)

Every table is normalized so that the mean weight over the training set is 1:

  sum_g n_g w_g / sum_g n_g = 1.

Then the weighted loss of :func:`weighted_cross_entropy`, which divides by the
batch size rather than by the sum of the weights, has the same scale as the
plain mean cross-entropy in expectation, and a learning rate tuned without
weights still fits. Groups with n_g = 0 get weight 0 under inverse_frequency and
effective_number (their formula is infinite); no training sample gathers them.

All functions are written in jax.numpy and work under ``jax.jit``; argument
checks that need concrete values run only outside tracing.
"""
from __future__ import annotations

from typing import Optional

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fqjax.analysis import metrics
from fqjax.choices import WEIGHT_SCHEMES  # the config's choice tuple; _WEIGHT_TABLES has the same keys

Array = jax.Array


def _concrete(*xs) -> bool:
  return not any(isinstance(x, jax.core.Tracer) for x in xs)


# ----------------------------------------------------------------------------
# Loss
# ----------------------------------------------------------------------------

def weighted_cross_entropy(logits: Array, labels: Array, weights: Optional[Array] = None,
                           mask: Optional[Array] = None) -> Array:
  """Per-sample weighted softmax cross-entropy, averaged over the batch.

  ce_i = -log softmax(logits_i)[labels_i]   (optax.softmax_cross_entropy_with_integer_labels)

    no mask:    loss = sum_i w_i ce_i / B
    with mask:  loss = sum_i m_i w_i ce_i / max(sum_i m_i, 1)

  Dividing by B (or the number of real samples), not by sum_i w_i, keeps the
  weights' effect: a batch of up-weighted samples has a larger loss. With
  weights normalized to mean 1 over the training set (all tables here are),
  E[w] = 1 and the loss scale matches unweighted cross-entropy.

  Args:
    logits: [B, C] float (computed in float32).
    labels: [B] int, in [0, C).
    weights: [B] float32 per-sample weights, or None for all ones.
    mask: [B] float32, 1 for real samples and 0 for padding (see
      fqjax.data.pipeline.epoch_batches), or None when every sample is real.

  Returns:
    Scalar float32.
  """
  chex.assert_rank(logits, 2)
  batch = logits.shape[0]
  chex.assert_shape(labels, (batch,))
  if not jnp.issubdtype(jnp.asarray(labels).dtype, jnp.integer):
    raise ValueError(f"labels must be integer class ids [B], got dtype {jnp.asarray(labels).dtype}.")
  ce = optax.softmax_cross_entropy_with_integer_labels(jnp.asarray(logits, jnp.float32), labels)
  if weights is not None:
    chex.assert_shape(weights, (batch,))
    ce = ce * jnp.asarray(weights, jnp.float32)
  if mask is None:
    return jnp.sum(ce) / batch
  chex.assert_shape(mask, (batch,))
  mask = jnp.asarray(mask, jnp.float32)
  # where(), not a product: a padded row with inf/nan loss must not poison the sum.
  return jnp.sum(jnp.where(mask > 0, mask * ce, 0.0)) / jnp.maximum(jnp.sum(mask), 1.0)


# ----------------------------------------------------------------------------
# Weight tables
# ----------------------------------------------------------------------------

def _check_counts(counts) -> Array:
  counts = jnp.asarray(counts)
  if counts.ndim != 1 or counts.shape[0] == 0:
    raise ValueError(f"counts must be a non-empty 1-D array [G] of samples per group, got shape {counts.shape}.")
  if _concrete(counts):
    c = np.asarray(counts)
    if (c < 0).any() or c.sum() <= 0:
      raise ValueError(
          f"counts must be >= 0 with a positive total, got {c.tolist()}; "
          "compute them on the training split, e.g. fqjax.training.sampling.group_counts(train.group, G).")
  return counts.astype(jnp.float32)


def normalize_weights(raw: Array, counts: Array) -> Array:
  """Scales ``raw`` so that sum_g n_g w_g / sum_g n_g = 1.

  Args:
    raw: [G] non-negative unnormalized weights.
    counts: [G] samples per group in the training set (after any resampling:
      the set the loss is averaged over).

  Returns:
    [G] float32. If sum_g n_g raw_g = 0 (e.g. every group's loss is 0) the
    uniform table (all ones) is returned instead of a division by zero.
  """
  counts = _check_counts(counts)
  raw = jnp.asarray(raw, jnp.float32)
  chex.assert_equal_shape([raw, counts])
  mass = jnp.sum(counts * raw)
  ok = mass > 0
  return jnp.where(ok, raw * jnp.sum(counts) / jnp.where(ok, mass, 1.0), jnp.ones_like(raw))


def uniform_weights(counts: Array) -> Array:
  """w_g = 1 for every group: [G] float32."""
  return jnp.ones_like(_check_counts(counts))


def inverse_frequency_weights(counts: Array) -> Array:
  """w_g ∝ 1 / n_g, normalized (w_g = N / (G' n_g) with G' non-empty groups); 0 where n_g = 0."""
  counts = _check_counts(counts)
  raw = jnp.where(counts > 0, 1.0 / jnp.maximum(counts, 1.0), 0.0)
  return normalize_weights(raw, counts)


def effective_number_weights(counts: Array, beta: float = 0.999) -> Array:
  """w_g ∝ (1 - beta) / (1 - beta^n_g), normalized; 0 where n_g = 0.

  The effective number of samples (1 - beta^n) / (1 - beta) grows like n for
  small n and saturates at 1 / (1 - beta), so the weights go from uniform
  (beta = 0) towards inverse frequency (beta -> 1).

  Args:
    counts: [G] samples per group.
    beta: in [0, 1). Cui et al. use 0.9 to 0.9999; larger means closer to 1/n_g.
  """
  counts = _check_counts(counts)
  if _concrete(beta) and not 0.0 <= float(beta) < 1.0:
    raise ValueError(f"beta must be in [0, 1), got {beta!r}; typical values are 0.9, 0.99, 0.999, 0.9999.")
  beta = jnp.asarray(beta, jnp.float32)
  # -expm1(n log beta) = 1 - beta^n without cancellation for beta near 1.
  effective = -jnp.expm1(counts * jnp.log(beta)) / (1.0 - beta)
  raw = jnp.where(counts > 0, 1.0 / jnp.where(counts > 0, effective, 1.0), 0.0)
  return normalize_weights(raw, counts)


def hardness_weights(counts: Array, group_losses: Array, power: float = 1.0,
                     floor: float = 0.1) -> Array:
  """Higher weight for harder groups: w_g = floor + (1 - floor) * h_g, h_g ∝ loss_g^power.

  h is normalized to training-set mean 1, so w is too (a convex mix of two
  mean-1 tables), and every group keeps at least ``floor`` even at zero loss.
  Call again each epoch with the new per-group validation losses (or error
  rates); under jit this recompiles nothing.

  Args:
    counts: [G] training samples per group (sets the normalization).
    group_losses: [G] float >= 0, the current validation loss or error of each group.
    power: >= 0. 0 gives uniform weights, 1 proportional to the loss, larger
      values sharpen the preference (power = 1 / temperature).
    floor: in [0, 1], the smallest weight relative to the mean.

  Returns:
    [G] float32.
  """
  counts = _check_counts(counts)
  group_losses = jnp.asarray(group_losses, jnp.float32)
  if group_losses.shape != counts.shape:
    raise ValueError(
        f"group_losses must have one entry per group, shape {counts.shape}, got {group_losses.shape}.")
  if _concrete(group_losses):
    gl = np.asarray(group_losses)
    if not np.isfinite(gl).all() or (gl < 0).any():
      raise ValueError(f"group_losses must be finite and >= 0, got {gl.tolist()}.")
  if _concrete(power) and not float(power) >= 0.0:
    raise ValueError(f"power must be >= 0, got {power!r}.")
  if _concrete(floor) and not 0.0 <= float(floor) <= 1.0:
    raise ValueError(f"floor must be in [0, 1], got {floor!r}.")
  hard = normalize_weights(group_losses ** jnp.asarray(power, jnp.float32), counts)
  return floor + (1.0 - floor) * hard


# scheme -> (table function, the keyword options of weight_table it takes besides counts)
_WEIGHT_TABLES = {
    "uniform": (uniform_weights, ()),
    "inverse_frequency": (inverse_frequency_weights, ()),
    "effective_number": (effective_number_weights, ("beta",)),
    "hardness": (hardness_weights, ("group_losses", "power", "floor")),
}


def weight_table(scheme: str, counts: Array, *, beta: float = 0.999,
                 group_losses: Optional[Array] = None, power: float = 1.0,
                 floor: float = 0.1) -> Array:
  """Builds a [G] float32 weight table by name (the config's ``loss_weights`` field).

  Args:
    scheme: one of WEIGHT_SCHEMES.
    counts: [G] training samples per group or class.
    beta: effective_number only.
    group_losses: [G] float32 per-group validation losses; hardness only, and required there.
    power, floor: hardness only.
  """
  if scheme not in _WEIGHT_TABLES:
    raise ValueError(f"Unknown weighting scheme {scheme!r}; allowed: {WEIGHT_SCHEMES}.")
  fn, takes = _WEIGHT_TABLES[scheme]
  if "group_losses" in takes and group_losses is None:
    raise ValueError(
        f"scheme {scheme!r} needs group_losses [G], the current per-group validation loss; "
        "before the first evaluation use scheme 'uniform'.")
  if "group_losses" not in takes and group_losses is not None:
    raise ValueError(f"group_losses is only used by scheme 'hardness', got scheme {scheme!r}.")
  options = {"beta": beta, "group_losses": group_losses, "power": power, "floor": floor}
  return fn(counts, **{name: options[name] for name in takes})


def gather_weights(table: Array, ids: Array) -> Array:
  """Per-sample weights of a batch: w_i = table[ids_i].

  Args:
    table: [G] float32 weight table.
    ids: [B] int group (or class) ids in [0, G).

  Returns:
    [B] float32.
  """
  chex.assert_rank(table, 1)
  chex.assert_rank(ids, 1)
  if _concrete(ids) and np.size(ids):
    i = np.asarray(ids)
    if i.min() < 0 or i.max() >= table.shape[0]:
      raise ValueError(f"ids must be in [0, {table.shape[0]}), got min {i.min()} and max {i.max()}.")
  # Under jit ids cannot be checked; "fill" makes an out-of-range id a NaN weight, so the
  # loss shows the bug instead of silently using another group's weight.
  return jnp.take(jnp.asarray(table, jnp.float32), ids, axis=0, mode="fill", fill_value=jnp.nan)


# ----------------------------------------------------------------------------
# What hardness weights follow (host side, once per epoch)
# ----------------------------------------------------------------------------

def hardness_signal(logits: np.ndarray, y: np.ndarray, ids: np.ndarray, num_ids: int, tcfg) -> np.ndarray:
  """What hardness weights follow, per group or class id [num_ids] float64 (0 for an id without rows).

  ``tcfg.hardness_source``: "capped_loss" = mean over the id's validation rows of min(cross-entropy,
  hardness_cap) (a collapsed model's huge losses stay bounded), "error_rate" = 1 - accuracy, "loss" = the
  uncapped mean cross-entropy.
  """
  source = tcfg.get("hardness_source", "loss")
  if source == "error_rate":
    per_sample = (np.asarray(logits).argmax(-1) != y).astype(np.float64)
  else:
    per_sample = metrics.per_sample_loss(logits, y)
    if source == "capped_loss":
      per_sample = np.minimum(per_sample, float(tcfg.hardness_cap))
  return np.nan_to_num(metrics.group_mean(per_sample, ids, num_ids), nan=0.0)


def smoothed_hardness(previous: Optional[np.ndarray], signal: np.ndarray, tcfg) -> np.ndarray:
  """EMA across epochs: ema * signal + (1 - ema) * previous (the signal itself when there is no previous)."""
  if previous is None:
    return np.asarray(signal, np.float64)
  ema = float(tcfg.get("hardness_ema", 1.0))
  return ema * np.asarray(signal, np.float64) + (1.0 - ema) * np.asarray(previous, np.float64)
