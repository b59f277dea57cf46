"""The quantization options every model carries and passes down to its quantized layers."""
import dataclasses
from typing import Any

import flax.linen as nn


def _option(default: Any) -> Any:
  # Keyword-only, so models can declare required fields (num_classes) after these defaults.
  return dataclasses.field(default=default, kw_only=True)


class QuantModel(nn.Module):
  """Base of fqjax models: options of their QuantDense / QuantConvBN layers.

  fold_bn: fold BatchNorm into the conv kernel before quantization (inference).
  per_channel: one weight scale per output channel (else per tensor).
  ste: straight-through estimator, "clipped" or "identity".
  lsq: learned step sizes (LSQ) for the weights.
  dtype: compute dtype of matmuls / convs (e.g. jnp.bfloat16); params and quantizers stay float32.
  """
  fold_bn: bool = _option(False)
  per_channel: bool = _option(True)
  ste: str = _option("clipped")
  lsq: bool = _option(False)
  dtype: Any = _option(None)

  def quant_kwargs(self, *, bn: bool = True) -> dict:
    """Options for a layer: per_channel, ste, lsq, dtype, and fold_bn for conv + BatchNorm layers."""
    kw = dict(per_channel=self.per_channel, ste=self.ste, lsq=self.lsq, dtype=self.dtype)
    if bn:
      kw["fold_bn"] = self.fold_bn
    return kw
