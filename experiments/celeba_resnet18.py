"""CelebA: predict Smiling, group by Male (a separate attribute: DP and EO gaps are reported).

Images resized to 64x64 and at most 60k training examples to bound memory.
"""
from fqjax.study.config import base_config


def get_config():
  c = base_config()
  c.name = "celeba_resnet18"
  c.seeds = (0, 1, 2)
  c.data.name = "celeb_a"
  c.data.label_attribute = "Smiling"
  c.data.group_attribute = "Male"
  c.data.image_size = 64
  c.data.max_examples = 60000
  c.model.name = "resnet18"
  c.model.kwargs.stem = "cifar"
  c.train.epochs = 20
  c.train.batch_size = 128
  c.train.learning_rate = 0.05
  return c
