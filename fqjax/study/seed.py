"""One trained seed, as every stage after training receives it (a frozen value instead of six arguments)."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence


@dataclasses.dataclass(frozen=True)
class TrainedSeed:
  """model: the trained Flax module (unbound); variables: its trained {"params", "batch_stats"};
  splits: the seed's fqjax.data.Splits; layer_names: the model's quantizable layers in forward order
  (fqjax.quantization.layers.quant_layer_names); seed: the training seed (also seeds calibration batches and
  subsampling); mesh: a data-parallel jax Mesh or None (one device)."""
  model: Any
  variables: Mapping
  splits: Any
  layer_names: Sequence[str]
  seed: int
  mesh: Any = None
