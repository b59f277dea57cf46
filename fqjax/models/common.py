"""The quantization options every model carries and passes down to its quantized layers."""
import dataclasses
from typing import Any

import flax.linen as nn

from fqjax.quantization.layers import QuantRule


def _option(default: Any) -> Any:
  # Keyword-only, so models can declare required fields (num_classes) after these defaults.
  return dataclasses.field(default=default, kw_only=True)


class QuantModel(nn.Module):
  """Base of fqjax models: the options of their QuantDense / QuantConvBN layers.

  quant: how every layer quantizes its weights (``fqjax.quantization.layers.QuantRule``: per_channel,
    narrow_range, ste, lsq); ``fqjax.quantization.layers.configured(model, per_channel=False)`` changes one.
  fold_bn: fold BatchNorm into the conv kernel before quantization (inference).
  dtype: compute dtype of matmuls / convs (e.g. jnp.bfloat16); params and quantizers stay float32.
  """
  quant: QuantRule = _option(QuantRule())
  fold_bn: bool = _option(False)
  dtype: Any = _option(None)

  def quant_kwargs(self, *, bn: bool = True) -> dict:
    """Options for a layer or block: quant, dtype, and fold_bn for conv + BatchNorm layers."""
    kw = dict(quant=self.quant, dtype=self.dtype)
    if bn:
      kw["fold_bn"] = self.fold_bn
    return kw
