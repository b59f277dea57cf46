"""BitSpec: which bit-widths each quantized layer gets, as data, and the "bits" trees built from it.

A BitSpec resolves against a model's layer names (``fqjax.quantization.layers.quant_layer_names``) to
{layer: (w_bits, a_bits)}, and to the "bits" variable collection the layers read:
{layer path...: {"w": [] float32, "a": [] float32}}, None written as 32 (full precision).
Because bits are leaves of a tree, not module attributes, a sweep over bit-widths is a
stacked tree [K] and one compiled function. No Linen here.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Optional, Sequence

import jax
import numpy as np
import jax.numpy as jnp
from flax import traverse_util

from fqjax.quantization import quant


LayerBits = tuple[Optional[int], Optional[int]]


@dataclasses.dataclass(frozen=True)
class BitSpec:
  """Weight/activation bits per layer: a default plus per-layer overrides.

  w_bits, a_bits: defaults; None means full precision.
  layers: {layer name: (w_bits, a_bits)}; a name is a layer path from
    ``quant_layer_names`` or the alias "first" / "last" (first / last layer in
    forward order). Later entries win; exact names win over aliases.
  """
  w_bits: Optional[int] = None
  a_bits: Optional[int] = None
  layers: Mapping[str, LayerBits] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    quant.check_bits(self.w_bits, name="BitSpec.w_bits")
    quant.check_bits(self.a_bits, name="BitSpec.a_bits")
    for name, pair in self.layers.items():
      if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise ValueError(f"BitSpec.layers[{name!r}] must be a (w_bits, a_bits) pair, got {pair!r}.")
      quant.check_bits(pair[0], name=f"BitSpec.layers[{name!r}] w_bits")
      quant.check_bits(pair[1], name=f"BitSpec.layers[{name!r}] a_bits")

  @classmethod
  def uniform(cls, w_bits: Optional[int], a_bits: Optional[int] = None) -> "BitSpec":
    return cls(w_bits=w_bits, a_bits=a_bits)

  @classmethod
  def first_last(cls, w_bits: Optional[int], edge_bits: int = 8, a_bits: Optional[int] = None,
                 edge_a_bits: Optional[int] = None) -> "BitSpec":
    """Mixed precision: first and last layer at ``edge_bits``, every other layer at ``w_bits``."""
    edge_a = a_bits if edge_a_bits is None else edge_a_bits
    return cls(w_bits=w_bits, a_bits=a_bits,
               layers={"first": (edge_bits, edge_a), "last": (edge_bits, edge_a)})

  def resolve(self, layer_names: Sequence[str]) -> dict[str, LayerBits]:
    """{layer name: (w_bits, a_bits)} for every layer; unknown names are a ValueError."""
    layer_names = list(layer_names)
    if not layer_names:
      raise ValueError("BitSpec.resolve got no layer names; the model has no quantizable layers.")
    unknown = [n for n in self.layers if n not in layer_names and n not in ("first", "last")]
    if unknown:
      raise ValueError(f"BitSpec names layers the model does not have: {unknown}. "
                       f"Allowed: 'first', 'last' or one of {layer_names}.")
    out = {n: (self.w_bits, self.a_bits) for n in layer_names}
    aliases = {"first": layer_names[0], "last": layer_names[-1]}
    for alias, target in aliases.items():
      if alias in self.layers:
        out[target] = tuple(self.layers[alias])
    for name, pair in self.layers.items():
      if name not in aliases:
        out[name] = tuple(pair)
    return out

  def bits_tree(self, layer_names: Sequence[str]) -> dict:
    """The "bits" variable collection: nested {path: {"w": f32[], "a": f32[]}}; None -> 32."""
    return bits_tree_from(self.resolve(layer_names))


def _as_bits(bits: Optional[int]) -> jax.Array:
  return jnp.asarray(quant.FULL_PRECISION_BITS if bits is None else bits, jnp.float32)


def bits_tree_from(resolved: Mapping[str, LayerBits]) -> dict:
  """Nested "bits" collection from {layer path: (w_bits, a_bits)}."""
  flat = {}
  for name, (w_bits, a_bits) in resolved.items():
    flat[f"{name}/w"], flat[f"{name}/a"] = _as_bits(w_bits), _as_bits(a_bits)
  return traverse_util.unflatten_dict(flat, sep="/")


def stack_bits_trees(bits_trees: Sequence[dict]) -> dict:
  """Stacks bits trees on a new leading axis [K], for ``jax.vmap`` over bit-widths."""
  if not bits_trees:
    raise ValueError("stack_bits_trees needs at least one bits tree.")
  return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *bits_trees)


def weight_bits_by_layer(spec: BitSpec, layer_names: Sequence[str]) -> dict[str, Optional[int]]:
  """{layer: w_bits} for ``quant.storage_size``."""
  return {name: w_bits for name, (w_bits, _) in spec.resolve(layer_names).items()}


def is_full_precision_tree(bits_tree) -> bool:
  """Whether no leaf of a "bits" tree is below 32 (nothing is quantized); leaves must be concrete."""
  return all(np.all(np.asarray(leaf) >= quant.FULL_PRECISION_BITS) for leaf in jax.tree_util.tree_leaves(bits_tree))
