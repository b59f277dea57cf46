"""UTKFace ethnicity classification (5 races), race as the group, ResNet-18 at 64x64.

Prepare once (manual download): python -m fqjax.data.utkface --manual_dir DIR --data_dir DATA --image_size 64
"""
from fqjax.study.config import base_config


def get_config():
  c = base_config()
  c.name = "utkface_resnet18"
  c.seeds = (0, 1, 2)
  c.data.name = "utkface"
  c.data.image_size = 64
  c.data.label_attribute = "race"
  c.data.group_attribute = "race"
  c.model.name = "resnet18"
  c.model.kwargs.stem = "cifar"
  c.train.epochs = 40
  c.train.batch_size = 128
  c.train.learning_rate = 0.05
  return c
