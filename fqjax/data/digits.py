"""scikit-learn's bundled handwritten digits: real 8x8x1 images, no download.

1797 images of the digits 0-9 (about 180 each), pixel values 0..16. The group is
the digit itself, so class imbalance (config.data.imbalance) makes minority groups.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np

from fqjax.data.assemble import assemble
from fqjax.data.splits import Splits

CLASS_NAMES = tuple(str(d) for d in range(10))
PIXEL_MAX = 16.0  # sklearn digits pixels are counts 0..16, not 0..255


def digits_arrays() -> Tuple[np.ndarray, np.ndarray]:
  """(images [1797, 8, 8, 1] uint8 in 0..16, labels [1797] int32)."""
  from sklearn.datasets import load_digits  # bundled with scikit-learn, offline
  bunch = load_digits()
  images = bunch.images.astype(np.uint8)[..., None]
  return images, bunch.target.astype(np.int32)


def load_digits(cfg) -> Splits:
  """Digits Splits from a validated data config (train / val / test carved by digit)."""
  x, y = digits_arrays()
  index = np.arange(len(y), dtype=np.int64)
  return assemble(name="digits", pools={"all": (x, y, y, index)}, cfg=cfg, scale=PIXEL_MAX,
                  class_names=CLASS_NAMES, group_names=CLASS_NAMES, label_attribute="label",
                  group_attribute="label")
