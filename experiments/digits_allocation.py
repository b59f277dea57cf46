"""Bit allocation over a range of budgets: the default digits study's model and data, the ablation at 8, 4, 3 and
2 bits with the allocation methods and their equal-size alternatives (uniform QAT, first/last at 8, FairQAT).

The default study runs the allocation at its two targets (4 and 2 bits); this one spans four budgets (the sizes of
the first/last-at-8 model at each target) for the size / fairness Pareto curves. Run:
  python launch.py --config experiments/digits_allocation.py --stages=train,ptq,mitigate,report
(explain is the default study's; leave it out here to save a minute).
"""
from experiments.digits import get_config as digits_config


def get_config():
  c = digits_config()
  c.name = "digits_allocation"
  c.mitigate.bit_widths = (8, 4, 3, 2)
  c.mitigate.methods = ("ptq", "qat", "mp_qat", "qat_equal_size", "fairqat", "blind_alloc", "fair_alloc",
                        "blind_alloc_qat", "fair_alloc_qat")
  return c
