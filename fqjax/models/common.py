"""What every model passes down to its quantized layers."""
import flax.linen as nn


def quant_kwargs(model: nn.Module, *, bn: bool = True) -> dict:
  """The layer options a model carries (per_channel, ste, lsq, dtype, and fold_bn for conv+BN layers)."""
  kw = dict(per_channel=model.per_channel, ste=model.ste, lsq=model.lsq, dtype=model.dtype)
  if bn:
    kw["fold_bn"] = model.fold_bn
  return kw
