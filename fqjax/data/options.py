"""The data config (`config.data`): defaults and early validation.

Fields of `default_data_config()`:
  name:            dataset, one of DATASET_NAMES ('digits' is the offline default).
  data_dir:        TFDS / UTKFace data directory; None = TFDS default
                   ($TFDS_DATA_DIR or ~/tensorflow_datasets).
  path:            .npz file for name='arrays'.
  seed:            NumPy seed for splits, subsets and imbalance.
  resplit_per_seed: with several training seeds, seed s draws its own split, subsets and
                   imbalance from data.seed + s (so the minority's few images vary across
                   seeds and the spread over seeds includes the split's; synthetic data
                   are drawn from it too); with one seed, or False, every seed uses data.seed.
  val_fraction:    fraction of the train pool (or of the whole dataset when it has
                   no test split) carved out as val, stratified by group.
  test_fraction:   fraction of the whole dataset carved out as test; only used
                   when the source has no test split (digits, utkface, synthetic,
                   arrays without x_test).
  label_attribute: what y is; None = the dataset default (DEFAULT_ATTRIBUTES).
  group_attribute: what group is; None = the dataset default: the label itself
                   for digits / mnist / fashion_mnist / cifar10 / svhn_cropped /
                   utkface (race), 'Male' for celeb_a, the given / generated
                   group array for arrays / synthetic.
  image_size:      resize images to image_size x image_size (center crop to a
                   square first when the source is not square); None = native.
  resize_method:   'area' (box filter) or 'nearest'.
  max_examples:    at most this many examples read from each source split (a
                   seeded random subset); None = all.
  max_gib:         refuse to build float32 arrays larger than this (GiB, all
                   splits together); lower image_size / max_examples instead.
  normalize:       'standardize' (scale to [0, 1], then per-channel / per-feature
                   mean and std of the final train split) or 'unit' ([0, 1] only).
  age_bins:        utkface age_bin edges: bins [0, e0), [e0, e1), ..., [e_last, inf).
  remap_labels:    arrays only: map the sorted distinct labels to 0..C-1 (else sparse
                   labels such as {0, 1, 1000} are an error).
  remap_groups:    arrays only: the same for group ids.
  imbalance:       applied to train only; see fqjax.data.imbalance.
    kind:          'none' | 'keep_fractions' | 'long_tail'.
    keep_fractions: {group id or name: fraction} (others keep 1.0) or a list of
                   one fraction per group.
    rho:           long-tail imbalance ratio, largest / smallest group (>= 1).
    order:         group ids from head (largest) to tail; None = 0, 1, ..., G-1.
  synthetic:       see fqjax.data.synthetic.make_synthetic.
"""
from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from fqjax.errors import InputError

DATASET_NAMES = ("digits", "mnist", "fashion_mnist", "cifar10", "svhn_cropped", "celeb_a",
                 "utkface", "arrays", "synthetic")
TFDS_CLASSIFICATION = ("mnist", "fashion_mnist", "cifar10", "svhn_cropped")
TFDS_NAMES = TFDS_CLASSIFICATION + ("celeb_a",)  # the datasets read by fqjax.data.tfds_sources
NORMALIZE_KINDS = ("standardize", "unit")
RESIZE_METHODS = ("area", "nearest")
IMBALANCE_KINDS = ("none", "keep_fractions", "long_tail")

CELEB_A_ATTRIBUTES = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs",
    "Big_Lips", "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair",
    "Bushy_Eyebrows", "Chubby", "Double_Chin", "Eyeglasses", "Goatee", "Gray_Hair",
    "Heavy_Makeup", "High_Cheekbones", "Male", "Mouth_Slightly_Open", "Mustache",
    "Narrow_Eyes", "No_Beard", "Oval_Face", "Pale_Skin", "Pointy_Nose", "Receding_Hairline",
    "Rosy_Cheeks", "Sideburns", "Smiling", "Straight_Hair", "Wavy_Hair", "Wearing_Earrings",
    "Wearing_Hat", "Wearing_Lipstick", "Wearing_Necklace", "Wearing_Necktie", "Young")
UTKFACE_ATTRIBUTES = ("race", "gender", "age_bin")

# (default label attribute, default group attribute) per dataset.
DEFAULT_ATTRIBUTES = {name: ("label", "label") for name in ("digits",) + TFDS_CLASSIFICATION}
DEFAULT_ATTRIBUTES.update({"celeb_a": ("Smiling", "Male"), "utkface": ("race", "race"),
                           "arrays": ("label", "group"), "synthetic": ("label", "group")})
# Attributes allowed as label / group per dataset.
ALLOWED_ATTRIBUTES = {name: (("label",), ("label",)) for name in ("digits",) + TFDS_CLASSIFICATION}
ALLOWED_ATTRIBUTES.update({
    "celeb_a": (CELEB_A_ATTRIBUTES, CELEB_A_ATTRIBUTES),
    "utkface": (UTKFACE_ATTRIBUTES, UTKFACE_ATTRIBUTES),
    "arrays": (("label",), ("group", "label")),
    "synthetic": (("label",), ("group", "label")),
})


def default_data_config() -> ml_collections.ConfigDict:
  """The default `config.data` (digits, no imbalance); see the module doc for fields.

  Fields that default to None are typed placeholders, so `--config.data.path=my.npz`
  (and every other such field) can be set from the command line.
  """
  # One placeholder object per field: a shared FieldReference would tie the fields together.
  return ml_collections.ConfigDict({
      "name": "digits",
      "data_dir": config_dict.placeholder(str),
      "path": config_dict.placeholder(str),
      "seed": 0,
      "resplit_per_seed": True,
      "val_fraction": 0.15,
      "test_fraction": 0.2,
      "label_attribute": config_dict.placeholder(str),
      "group_attribute": config_dict.placeholder(str),
      "image_size": config_dict.placeholder(int),
      "resize_method": "area",
      "max_examples": config_dict.placeholder(int),
      "max_gib": 8.0,
      "normalize": "standardize",
      "age_bins": (20, 40, 60),
      "remap_labels": False,
      "remap_groups": False,
      # keep_fractions: a dict or list literal; order: a list of group ids (both None = unset).
      "imbalance": {"kind": "none", "keep_fractions": config_dict.placeholder(object), "rho": 10.0,
                    "order": config_dict.placeholder(object)},
      "synthetic": {
          "group_sizes": (600, 150),
          "num_classes": 2,
          "shape": (8, 8, 1),
          "separation": 3.0,
          "noise": (1.0, 1.5),
          "shift": (0.0, 1.0),
      },
  })


def data_section(config) -> ml_collections.ConfigDict:
  """`config.data` for a whole study config, or `config` itself if it is the data config."""
  if "data" in config and not isinstance(config["data"], (str, bytes)):
    return config["data"]
  return config


def resolve_attributes(cfg) -> tuple:
  """(label_attribute, group_attribute) with dataset defaults filled in."""
  label_default, group_default = DEFAULT_ATTRIBUTES[cfg.name]
  label = cfg.get("label_attribute") or label_default
  group = cfg.get("group_attribute") or group_default
  return label, group


def _check(ok: bool, message: str) -> None:
  if not ok:
    raise InputError(message)


def _is_positive_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value > 0


def validate_data_config(config, *, check_path: bool = True) -> ml_collections.ConfigDict:
  """Checks `config.data` before any data is read; returns it.

  Accepts the whole study config or the data section. Raises ValueError naming
  the field, the value given, what is allowed and how to fix it. check_path=False
  skips the .npz path check (for `from_arrays`, whose arrays are in memory).
  """
  cfg = data_section(config)
  name = cfg.get("name")
  _check(name in DATASET_NAMES,
         f"config.data.name={name!r} is not a known dataset; allowed: {', '.join(DATASET_NAMES)}.")
  val, test = cfg.get("val_fraction", 0.0), cfg.get("test_fraction", 0.0)
  for field, value in (("val_fraction", val), ("test_fraction", test)):
    _check(isinstance(value, (int, float)) and 0.0 <= value < 1.0,
           f"config.data.{field}={value!r} must be a number in [0, 1).")
  _check(val + test < 1.0,
         f"config.data.val_fraction + test_fraction = {val + test} must be < 1 so train is not empty.")
  _check(isinstance(cfg.get("seed"), int), f"config.data.seed={cfg.get('seed')!r} must be an int.")
  _check(isinstance(cfg.get("resplit_per_seed", True), bool),
         f"config.data.resplit_per_seed={cfg.get('resplit_per_seed')!r} must be True or False.")
  for field in ("image_size", "max_examples"):
    value = cfg.get(field)
    _check(value is None or _is_positive_int(value),
           f"config.data.{field}={value!r} must be None or a positive int.")
  _check(cfg.get("normalize") in NORMALIZE_KINDS,
         f"config.data.normalize={cfg.get('normalize')!r}; allowed: {NORMALIZE_KINDS}.")
  _check(cfg.get("resize_method", "area") in RESIZE_METHODS,
         f"config.data.resize_method={cfg.get('resize_method')!r}; allowed: {RESIZE_METHODS}.")
  label, group = resolve_attributes(cfg)
  allowed_labels, allowed_groups = ALLOWED_ATTRIBUTES[name]
  _check(label in allowed_labels,
         f"config.data.label_attribute={label!r} is not available for {name}; "
         f"allowed: {', '.join(allowed_labels)}.")
  _check(group in allowed_groups,
         f"config.data.group_attribute={group!r} is not available for {name}; "
         f"allowed: {', '.join(allowed_groups)} (None = {DEFAULT_ATTRIBUTES[name][1]!r}).")
  if name == "arrays" and check_path:
    _check(bool(cfg.get("path")),
           "config.data.path is empty; name='arrays' needs the path of an .npz file with keys x, y (and "
           "group): add --config.data.path=my_data.npz, or call fqjax.data.from_arrays(x, y, group) in Python.")
  edges = list(cfg.get("age_bins") or ())
  _check(len(edges) > 0 and all(a < b for a, b in zip(edges, edges[1:])) and edges[0] > 0,
         f"config.data.age_bins={tuple(edges)!r} must be increasing positive ages, e.g. (20, 40, 60).")
  imb = cfg.get("imbalance") or {}
  kind = imb.get("kind", "none")
  _check(kind in IMBALANCE_KINDS,
         f"config.data.imbalance.kind={kind!r}; allowed: {IMBALANCE_KINDS}.")
  if kind == "keep_fractions":
    _check(imb.get("keep_fractions") is not None,
           "config.data.imbalance.kind='keep_fractions' needs config.data.imbalance.keep_fractions, "
           "e.g. {3: 0.1, 8: 0.1} (group id or name -> fraction of its train examples to keep).")
  if kind == "long_tail":
    rho = imb.get("rho")
    _check(isinstance(rho, (int, float)) and rho >= 1.0,
           f"config.data.imbalance.rho={rho!r} must be a number >= 1 (largest / smallest group).")
  return cfg


def seeds_of(config) -> list[int]:
  """The training seeds of a whole study config: config.seeds as a list (an int is one seed)."""
  return [config.seeds] if isinstance(config.seeds, int) else list(config.seeds)
