"""Your own data from an .npz file: x (images [N, H, W, C] or features [N, D]), y, group.

Run: python launch.py --config experiments/arrays.py --config.data.path=my_data.npz --workdir runs/mine
The model is chosen from the shape of x: an MLP for [N, D] features, SmallCNN for images.
Optional keys in the file: x_val/y_val/group_val, x_test/y_test/group_test, group_names, class_names.
"""
from fqjax.study.config import base_config


def get_config():
  c = base_config()
  c.name = "arrays"
  c.seeds = (0, 1, 2)
  c.data.name = "arrays"
  c.data.path = None  # required: --config.data.path=/path/to/data.npz
  c.model.name = "auto"
  c.train.epochs = 20
  c.train.batch_size = 128
  c.train.learning_rate = 0.05
  return c
