"""Every named choice a config field takes, in one module that imports nothing (no JAX).

The modules that implement a choice import its tuple from here (a method table keyed by the
same names is checked against it in the tests), and fqjax.study.config validates against it, so a
config can be checked, and a results file read, without loading JAX.
"""
STAGES = ("train", "ptq", "explain", "mitigate", "report")
COMPUTE_DTYPES = ("float32", "bfloat16")
MODEL_NAMES = ("mlp", "small_cnn", "resnet18", "resnet34", "resnet50", "vgg11", "vgg16")
OPTIMIZERS = ("sgd", "adamw")
WEIGHT_TARGETS = ("group", "class")
SAMPLING_METHODS = ("none", "undersample", "oversample", "balanced", "fairqat")
WEIGHT_SCHEMES = ("uniform", "inverse_frequency", "effective_number", "hardness")
CALIBRATIONS = ("minmax", "ema", "percentile")
SWEEP_MODES = ("auto", "vmap", "map", "devices")
MITIGATE_METHODS = ("ptq", "qat", "lsq_qat", "mp_qat", "qat_equal_size", "sampling_qat", "weighted_qat", "fairqat",
                    "fair_ft", "blind_alloc", "fair_alloc", "blind_alloc_qat", "fair_alloc_qat")
ALLOC_OBJECTIVES = ("worst_group", "weighted", "mean_plus_worst")
ALLOC_BUDGETS = ("mixed_precision", "uniform")
BUDGETS = ("steps", "epochs")
HARDNESS_SOURCES = ("capped_loss", "error_rate", "loss")
GRID_FIELDS = ("learning_rate", "epochs", "hardness_floor", "hardness_power", "weight_decay")
BN_MODES = ("train", "freeze", "fold")
SPLITS = ("train", "val", "test")
WEIGHT_SCALE_RULES = ("max", "half_step", "mse")
PTQ_BN_MODES = ("keep", "recalibrate")  # a PTQ variant is "<weight scale rule>/<BatchNorm mode>"
# Candidate bit-widths of a per-layer bit allocation: 1 bit has no symmetric grid (int_range(1) is {-1, 0}), and
# above 8 bits a layer's quantization error is below float32 noise for these models.
ALLOC_BITS_RANGE = (2, 8)
