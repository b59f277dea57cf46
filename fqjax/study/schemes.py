"""How an entry of a study quantizes, as frozen values: a PTQ scheme, a mitigation method's parts, and the one
description (``Quantization``) that every stage builds its quantized model from.

No JAX here: config validation parses schemes with this module, and the analysis side reads methods' parts.

  PTQScheme.parse("mse/recalibrate")     -> PTQScheme(scale="mse", bn="recalibrate")
  ptq_schemes(config)                    -> [PTQScheme] of config.ptq.variants (the first is the primary one)
  quantization_for(config, scheme=...)   -> Quantization for the PTQ and explain stages and the allocate CLI
  quantization_for(config, method=...)   -> Quantization for a mitigation method (its PTQ variant's grid and
                                            BatchNorm handling when it is evaluated without training)
  Quantization.apply(model)              -> the model clone (fqjax.quantization.layers.configured)
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

from fqjax import choices


@dataclasses.dataclass(frozen=True)
class PTQScheme:
  """A post-training quantization variant: a weight scale rule and a BatchNorm mode.

  scale: fqjax.choices.WEIGHT_SCALE_RULES (fqjax.quantization.quant.weight_scale).
  bn: "keep" the trained running statistics, or "recalibrate" them for the quantized model.
  """
  scale: str = "max"
  bn: str = "keep"

  def __post_init__(self):
    if self.scale not in choices.WEIGHT_SCALE_RULES or self.bn not in choices.PTQ_BN_MODES:
      raise ValueError(f"PTQ scheme {self.scale!r}/{self.bn!r}: scale must be one of {choices.WEIGHT_SCALE_RULES} "
                       f"and bn one of {choices.PTQ_BN_MODES}, e.g. 'max/keep' or 'mse/recalibrate'.")

  @classmethod
  def parse(cls, text: Any) -> "PTQScheme":
    """PTQScheme from "<scale>/<bn>" (a PTQScheme is returned as it is)."""
    if isinstance(text, PTQScheme):
      return text
    scale, sep, bn = str(text).partition("/")
    if not sep or scale not in choices.WEIGHT_SCALE_RULES or bn not in choices.PTQ_BN_MODES:
      raise ValueError(f"PTQ variant {text!r} is not '<scale>/<bn>' with scale in {choices.WEIGHT_SCALE_RULES} "
                       f"and bn in {choices.PTQ_BN_MODES}, e.g. 'max/keep' or 'mse/recalibrate'.")
    return cls(scale, bn)

  @property
  def name(self) -> str:
    """"<scale>/<bn>": the name results.json files the variant under."""
    return f"{self.scale}/{self.bn}"

  @property
  def recalibrates(self) -> bool:
    return self.bn == "recalibrate"

  def __str__(self) -> str:
    return self.name


def ptq_schemes(config) -> list[PTQScheme]:
  """The schemes of config.ptq.variants, the primary one first."""
  return [PTQScheme.parse(v) for v in config.ptq.variants]


@dataclasses.dataclass(frozen=True)
class Method:
  """What a mitigation method changes: precision layout, data sampling, loss weights, learned scales, training."""
  mixed_precision: bool = False
  sampling: bool = False
  weighting: bool = False
  lsq: bool = False
  trains: bool = True
  quantized: bool = True
  allocation: Optional[str] = None  # "fair" / "blind": per-layer bits from fqjax.study.allocate


METHOD_PARTS = {
    "ptq": Method(trains=False),
    "qat": Method(),
    "lsq_qat": Method(lsq=True),
    "mp_qat": Method(mixed_precision=True),
    "qat_equal_size": Method(),
    "sampling_qat": Method(sampling=True),
    "weighted_qat": Method(weighting=True),
    "fairqat": Method(mixed_precision=True, sampling=True, weighting=True),
    "fair_ft": Method(sampling=True, weighting=True, quantized=False),
    "blind_alloc": Method(trains=False, allocation="blind"),
    "fair_alloc": Method(trains=False, allocation="fair"),
    "blind_alloc_qat": Method(allocation="blind"),
    "fair_alloc_qat": Method(allocation="fair"),
}


@dataclasses.dataclass(frozen=True)
class Quantization:
  """How one entry quantizes: the options of its model clone and whether BatchNorm is re-estimated.

  options: (name, value) pairs for fqjax.quantization.layers.configured (per_channel, fold_bn, scale, lsq);
    an option left out keeps the model's own value.
  recalibrate_bn: the BatchNorm running statistics are re-estimated for the quantized model (PTQ only;
    training methods update them themselves).
  """
  options: tuple = ()
  recalibrate_bn: bool = False

  def apply(self, model):
    """The clone of ``model`` that quantizes this way (a Flax module; imports the quantization library)."""
    from fqjax.quantization import layers
    return layers.configured(model, **dict(self.options))

  @property
  def scale(self) -> Optional[str]:
    return dict(self.options).get("scale")


def quantization_for(config, *, scheme: Optional[PTQScheme] = None, method: Optional[str] = None) -> Quantization:
  """The quantization description of a study entry.

  Without ``method``: a PTQ entry of ``scheme`` (default: the primary one, config.ptq.variants[0]) with
  config.ptq's per_channel and fold_bn. With ``method`` (config.mitigate.methods): LSQ scales and BatchNorm
  folding per config.mitigate.bn; a method that does not train (ptq, *_alloc) is PTQ with
  config.mitigate.ptq_variant's weight grid and BatchNorm mode; ``scheme`` then overrides that variant.
  """
  if method is None:
    scheme = scheme or ptq_schemes(config)[0]
    p = config.ptq
    return Quantization((("per_channel", bool(p.per_channel)), ("fold_bn", bool(p.fold_bn)),
                         ("scale", scheme.scale)), scheme.recalibrates)
  if method not in METHOD_PARTS:
    raise ValueError(f"unknown mitigation method {method!r}; allowed: {choices.MITIGATE_METHODS}.")
  m, parts = config.mitigate, METHOD_PARTS[method]
  options = (("lsq", parts.lsq), ("fold_bn", m.bn == "fold"))
  if parts.trains and scheme is None:
    return Quantization(options, False)
  scheme = scheme or PTQScheme.parse(m.ptq_variant)
  return Quantization(options + (("scale", scheme.scale),), scheme.recalibrates and not parts.trains)
