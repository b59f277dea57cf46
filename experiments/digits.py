"""The default study: scikit-learn's handwritten digits (offline), SmallCNN, digit classes as groups.

Three digit classes are made minorities in the training split (kept at 15% of
their examples), as in the class-imbalance studies of the quantization-fairness
literature. Run: python launch.py  (or --config experiments/digits.py).
"""
from fqjax.config import base_config


def get_config():
  c = base_config()
  c.name = "digits"
  c.seeds = (0, 1, 2)
  c.data.name = "digits"
  c.data.imbalance.kind = "keep_fractions"
  c.data.imbalance.keep_fractions = {3: 0.15, 5: 0.15, 8: 0.15}
  c.model.name = "small_cnn"
  c.model.kwargs.width = 16
  c.train.epochs = 15
  c.train.batch_size = 64
  c.train.learning_rate = 0.05
  c.train.warmup_epochs = 1.0
  c.ptq.bit_widths = (32, 8, 6, 5, 4, 3, 2)
  # The paper's PTQ (max|w| scale, trained BatchNorm statistics) and a deployed-style one (MSE-chosen
  # clipping, BatchNorm re-estimated for the quantized model), compared in one study.
  c.ptq.variants = ("max/keep", "mse/recalibrate")
  c.explain.bit_widths = (32, 8, 4, 3, 2)
  c.mitigate.bit_widths = (4, 2)
  return c
