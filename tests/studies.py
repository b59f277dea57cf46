"""Study configs the tests share (a plain module: tests import it; conftest.py only holds fixtures)."""
from fqjax.study.config import base_config

TINY_GROUP_SIZES = (160, 80, 30)  # 30 < half the median (40): one minority group


def tiny_study_config():
  """Two seeds of a width-4 SmallCNN (with BatchNorm) on three synthetic groups of 8x8 images, every stage."""
  c = base_config()
  c.name = "tiny"
  c.seeds = (0, 1)
  c.data.name = "synthetic"
  c.data.synthetic.group_sizes = TINY_GROUP_SIZES
  c.data.synthetic.noise = (1.0, 1.2, 1.5)
  c.data.synthetic.shift = (0.0, 0.5, 1.0)
  c.model.name = "small_cnn"
  c.model.kwargs.width = 4
  c.train.epochs = 2
  c.train.batch_size = 32
  c.train.learning_rate = 0.05
  c.ptq.bit_widths = (32, 8, 4, 2)
  c.eval.bootstrap_resamples = 20
  c.explain.bit_widths = (32, 2)
  c.explain.top_k = 3
  c.explain.trace_probes = 2
  c.explain.lanczos_max_iters = 40
  c.explain.lanczos_tol = 1e-3
  c.explain.size_matched_repeats = 1
  c.mitigate.bit_widths = (4,)
  c.mitigate.methods = ("ptq", "qat", "lsq_qat", "mp_qat", "fairqat")
  c.mitigate.epochs = 1
  c.mitigate.batch_size = 32
  return c
