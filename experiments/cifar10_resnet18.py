"""CIFAR-10, ResNet-18 (CIFAR stem), classes as groups, balanced training set."""
from fqjax.study.config import base_config


def get_config():
  c = base_config()
  c.name = "cifar10_resnet18"
  c.seeds = (0, 1, 2)
  c.data.name = "cifar10"
  c.model.name = "resnet18"
  c.model.kwargs.stem = "cifar"
  c.train.epochs = 60
  c.train.batch_size = 128
  c.train.learning_rate = 0.1
  c.train.weight_decay = 5e-4
  c.train.warmup_epochs = 2.0
  c.ptq.calibration_batch_size = 256
  return c
