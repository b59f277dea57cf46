"""The default study: scikit-learn's handwritten digits (offline), SmallCNN, digit classes as groups.

The training split is long-tailed over the ten digit classes (class c keeps rho^(-c/9) of its
examples, rho = 20: from 115 images of digit 0 down to 6 of digit 9), as in the long-tailed
class-imbalance studies of the quantization-fairness literature, so group sizes take ten distinct
values and "inversely related to group size" can be tested. Each seed draws its own split
(data.resplit_per_seed). Run: python launch.py  (or --config experiments/digits.py).
"""
from fqjax.study.config import base_config


def get_config():
  c = base_config()
  c.name = "digits"
  c.seeds = (0, 1, 2)
  c.data.name = "digits"
  c.data.imbalance.kind = "long_tail"
  c.data.imbalance.rho = 20.0
  c.model.name = "small_cnn"
  c.model.kwargs.width = 16
  c.train.epochs = 30  # the tail (5-11 images) needs the steps: at 15 epochs of 64 digits 8 and 9 stay at 0
  c.train.batch_size = 32
  c.train.learning_rate = 0.05
  c.train.warmup_epochs = 1.0
  c.ptq.bit_widths = (32, 8, 6, 5, 4, 3, 2)
  # The paper's PTQ (max|w| scale, trained BatchNorm statistics) and a deployed-style one (MSE-chosen
  # clipping, BatchNorm re-estimated for the quantized model), compared in one study.
  c.ptq.variants = ("max/keep", "mse/recalibrate")
  c.explain.bit_widths = (32, 4, 3, 2)  # 8 bits changes nothing measurable (see the PTQ sweep); saves a fifth
  c.mitigate.bit_widths = (4, 2)
  return c
