"""MNIST with a long-tailed class distribution (rho = 10), SmallCNN; digits as groups.

Needs the prepared TFDS dataset (array_record); the error message gives the command.
"""
from fqjax.study.config import base_config


def get_config():
  c = base_config()
  c.name = "mnist_imbalanced"
  c.seeds = (0, 1, 2)
  c.data.name = "mnist"
  c.data.imbalance.kind = "long_tail"
  c.data.imbalance.rho = 10.0
  c.model.name = "small_cnn"
  c.model.kwargs.width = 32
  c.train.epochs = 10
  c.train.batch_size = 128
  c.train.learning_rate = 0.05
  return c
