"""Long-tailed CIFAR-10 (rho = 100, Cui et al. 2019), ResNet-18; classes as groups."""
from experiments.cifar10_resnet18 import get_config as cifar_config


def get_config():
  c = cifar_config()
  c.name = "cifar10_imbalanced_resnet18"
  c.data.imbalance.kind = "long_tail"
  c.data.imbalance.rho = 100.0
  return c
