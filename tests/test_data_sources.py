"""Data sources: digits, synthetic, arrays, TFDS (under mock_data), utkface (monkeypatched)."""
import json
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

import fqjax.data as data
from fqjax.data import synthetic, tfds_sources


def _cfg(**fields):
  cfg = data.default_data_config()
  for key, value in fields.items():
    cfg[key] = value
  return cfg


def _assert_consistent(s: data.Splits):
  """dtypes, metadata counts vs arrays, and no overlap between splits of one source."""
  for name, split in s.items():
    assert split.x.dtype == np.float32 and split.y.dtype == np.int32
    assert split.group.dtype == np.int32 and split.index.dtype == np.int64
    assert split.x.shape[1:] == s.info.input_shape
    assert s.info.counts[name] == np.bincount(split.group, minlength=s.info.num_groups).tolist()
    assert len(np.unique(split.index)) == len(split)
  by_source = {}
  for name, split in s.items():
    by_source.setdefault(s.info.source_splits[name], []).append(split.index)
  for indices in by_source.values():
    joined = np.concatenate(indices)
    assert len(np.unique(joined)) == len(joined), "splits of one source overlap"


# ----------------------------------------------------------------------------
# digits, splitting, config
# ----------------------------------------------------------------------------

def test_digits_default_shapes_normalization_and_disjoint_cover():
  s = data.load(_cfg())
  _assert_consistent(s)
  assert s.info.name == "digits" and s.info.input_shape == (8, 8, 1)
  assert s.info.group_is_label and s.info.num_groups == 10
  np.testing.assert_array_equal(s.train.group, s.train.y)
  # Without imbalance the three splits partition all 1797 images.
  everything = np.sort(np.concatenate([sp.index for _, sp in s.items()]))
  np.testing.assert_array_equal(everything, np.arange(1797))
  # Standardized with train statistics: train is exactly mean 0 / std 1, test only close.
  assert abs(float(s.train.x.mean())) < 1e-5 and abs(float(s.train.x.std()) - 1) < 1e-4
  assert abs(float(s.test.x.mean())) < 0.1
  json.dumps(s.to_dict())  # metadata is JSON-ready


def test_digits_rows_match_source_images():
  from sklearn.datasets import load_digits
  raw = load_digits().images
  s = data.load(_cfg(normalize="unit"))
  np.testing.assert_allclose(s.val.x[..., 0], raw[s.val.index] / 16.0, rtol=1e-6)
  np.testing.assert_array_equal(s.val.y, load_digits().target[s.val.index])


def test_split_is_stratified_by_group():
  s = data.load(_cfg(val_fraction=0.15, test_fraction=0.2))
  total = sum(np.array(s.info.counts[k]) for k in ("train", "val", "test"))
  for name, fraction in (("val", 0.15), ("test", 0.2)):
    deviation = np.abs(np.array(s.info.counts[name]) - fraction * total)
    assert deviation.max() <= 1.0, (name, deviation)


def test_splits_reproducible_and_seed_dependent():
  a, b, c = data.load(_cfg(seed=3)), data.load(_cfg(seed=3)), data.load(_cfg(seed=4))
  for name in ("train", "val", "test"):
    np.testing.assert_array_equal(a[name].index, b[name].index)
    np.testing.assert_array_equal(a[name].x, b[name].x)
  assert not np.array_equal(a.test.index, c.test.index)


def test_stratified_split_tiny_groups_keep_train_and_label_mix():
  group = np.array([0] * 40 + [1] * 2 + [2])
  y = np.array([0, 1] * 20 + [0, 1, 0])
  train, val, test = data.stratified_split(group, y, (0.25, 0.25), seed=0)
  assert sorted(np.concatenate([train, val, test]).tolist()) == list(range(43))
  for g in (0, 1, 2):
    assert np.sum(group[train] == g) >= 1  # train never loses a group
  # In group 0 (20 of each label), val's 10 examples hold 5 of each label.
  assert np.bincount(y[val][group[val] == 0]).tolist() == [5, 5]


@pytest.mark.parametrize("fields, match", [
    (dict(name="imagenet"), r"config\.data\.name='imagenet'.*digits, mnist"),
    (dict(val_fraction=0.6, test_fraction=0.5), "must be < 1"),
    (dict(val_fraction=-0.1), r"config\.data\.val_fraction"),
    (dict(normalize="minmax"), r"config\.data\.normalize"),
    (dict(image_size=0), r"config\.data\.image_size"),
    (dict(name="celeb_a", label_attribute="Smile"), r"label_attribute='Smile'.*Smiling"),
    (dict(name="cifar10", group_attribute="Male"), r"group_attribute='Male'.*cifar10"),
    (dict(name="utkface", group_attribute="age"), r"age_bin"),
    (dict(name="arrays"), r"config\.data\.path"),
])
def test_validate_data_config_names_field(fields, match):
  with pytest.raises(ValueError, match=match):
    data.validate_data_config(_cfg(**fields))


def test_validate_accepts_study_config_with_data_section():
  import ml_collections
  study = ml_collections.ConfigDict({"data": _cfg(name="bogus")})
  with pytest.raises(ValueError, match="config.data.name='bogus'"):
    data.load(study)


def test_memory_guard_says_how_to_fix():
  with pytest.raises(ValueError, match="image_size"):
    data.load(_cfg(max_gib=1e-4))


def test_every_dataset_has_a_loader():
  assert set(data.LOADERS) == set(data.DATASET_NAMES)
  for name, (module, function) in data.LOADERS.items():
    assert module.startswith("fqjax.data.") and function.startswith("load_"), name


def test_digits_and_arrays_never_import_tfds():
  code = ("import sys, numpy as np, fqjax.data as d; d.load(d.default_data_config()); "
          "d.from_arrays(np.ones((20, 3), np.float32), np.arange(20) % 2); "
          "c = d.default_data_config(); c.name = 'synthetic'; d.load(c); "
          "assert 'tensorflow_datasets' not in sys.modules and 'tensorflow' not in sys.modules")
  subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------
# synthetic
# ----------------------------------------------------------------------------

def test_synthetic_geometry_and_group_sizes():
  x, y, g = synthetic.make_synthetic((300, 100), 2, (16,), separation=4.0,
                                          noise=(0.1, 0.5), shift=(0.0, 2.0), seed=0)
  assert x.shape == (400, 16) and np.bincount(g).tolist() == [300, 100]
  m = [x[(g == 0) & (y == c)].mean(0) for c in (0, 1)]
  np.testing.assert_allclose(np.linalg.norm(m[0] - m[1]), 4.0, atol=0.05)
  # Per-group noise: within-class spread of group 1 is 5x that of group 0.
  spread = [x[(g == k) & (y == 0)].std(0).mean() for k in (0, 1)]
  np.testing.assert_allclose(spread[1] / spread[0], 5.0, rtol=0.15)
  # Group 1 is shifted by 2 along a unit direction.
  mean1 = x[(g == 1) & (y == 0)].mean(0)
  np.testing.assert_allclose(np.linalg.norm(mean1 - m[0]), 2.0, atol=0.2)


def test_synthetic_load_images_and_group_as_label():
  s = data.load(_cfg(name="synthetic"))
  _assert_consistent(s)
  assert s.info.input_shape == (8, 8, 1) and not s.info.group_is_label
  assert sum(np.array(s.info.counts[k]) for k in ("train", "val", "test")).tolist() == [600, 150]
  s2 = data.load(_cfg(name="synthetic", group_attribute="label"))
  np.testing.assert_array_equal(s2.train.group, s2.train.y)
  assert s2.info.group_is_label
  with pytest.raises(ValueError, match="synthetic.noise"):
    synthetic.make_synthetic((10, 10), noise=(1.0, 1.0, 1.0))


# ----------------------------------------------------------------------------
# arrays
# ----------------------------------------------------------------------------

def _user_arrays(n=120, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.integers(0, 256, size=(n, 4, 4, 3), dtype=np.uint8)
  y = rng.integers(0, 3, size=n)
  group = rng.integers(0, 2, size=n)
  return x, y, group


def test_from_arrays_rows_map_back_to_inputs():
  x, y, group = _user_arrays()
  s = data.from_arrays(x, y, group, class_names=["a", "b", "c"], group_names=["g0", "g1"])
  _assert_consistent(s)
  assert s.info.class_names == ("a", "b", "c") and s.info.group_names == ("g0", "g1")
  norm = s.info.normalization
  assert norm["scale"] == 255.0  # uint8 images are scaled to [0, 1] first
  expected = (x[s.test.index] / 255.0 - np.array(norm["mean"])) / np.array(norm["std"])
  np.testing.assert_allclose(s.test.x, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(s.test.group, group[s.test.index])


def test_from_arrays_tabular_group_defaults_to_label():
  x = np.random.default_rng(0).normal(size=(50, 5)).astype(np.float64)
  s = data.from_arrays(x, np.arange(50) % 2)
  assert s.info.group_is_label and s.info.input_shape == (5,)
  np.testing.assert_allclose(s.train.x.mean(0), 0, atol=1e-5)  # per-feature standardization


def test_npz_with_predefined_splits(tmp_path):
  x, y, group = _user_arrays(100)
  xt, yt, gt = _user_arrays(30, seed=1)
  path = tmp_path / "d.npz"
  np.savez(path, x_train=x, y_train=y, group_train=group, x_test=xt, y_test=yt, group_test=gt,
           group_names=np.array(["light", "dark"]))
  s = data.load(_cfg(name="arrays", path=str(path)))
  _assert_consistent(s)
  np.testing.assert_array_equal(s.test.index, np.arange(30))  # the given test split, whole
  assert len(s.train) + len(s.val) == 100 and s.info.source_splits["val"] == "train"
  assert s.info.group_names == ("light", "dark")


def test_npz_errors(tmp_path):
  x, y, group = _user_arrays(20)
  with pytest.raises(FileNotFoundError, match="np.savez"):
    data.load(_cfg(name="arrays", path=str(tmp_path / "missing.npz")))
  np.savez(tmp_path / "typo.npz", x=x, y=y, groups=group)
  with pytest.raises(ValueError, match=r"unknown keys \['groups'\]"):
    data.load(_cfg(name="arrays", path=str(tmp_path / "typo.npz")))
  np.savez(tmp_path / "half.npz", x_train=x, y_train=y)
  with pytest.raises(ValueError, match="no 'x_test'"):
    data.load(_cfg(name="arrays", path=str(tmp_path / "half.npz")))


def _bad(**override):
  x, y, group = _user_arrays(40)
  args = dict(x=x, y=y, group=group)
  args.update(override)
  return args


@pytest.mark.parametrize("args, match", [
    (_bad(x=np.full((40, 4, 4), 1.0)), r"x has shape \(40, 4, 4\).*\[\.\.\., None\]"),
    (_bad(x=np.ones((40,))), r"x has shape \(40,\)"),
    (_bad(x=np.where(np.arange(40)[:, None] == 7, np.nan, np.ones((40, 3)))), "NaN/inf.*row 7"),
    (_bad(x=np.array([["a"]] * 40)), "must be numeric"),
    (_bad(y=np.arange(40) * 0.5), r"y has dtype float64.*astype"),
    (_bad(y=np.arange(40) - 1), r"y has negative values"),
    (_bad(y=np.arange(39)), "y has 39 entries but x has 40 rows"),
    (_bad(y=np.eye(40, dtype=int)), r"argmax"),
    (_bad(group=np.arange(40) % 3, group_names=["a", "b"]), r"group has value 2.*group_names"),
    (_bad(y=np.arange(40) % 4, class_names=["a", "b", "c"]), r"y has value 3.*class_names"),
    (_bad(val=_user_arrays(5)), "val split was given without a test split"),
    (_bad(test=(np.ones((5, 2, 2, 3), np.uint8), np.zeros(5, int), np.zeros(5, int))),
     r"x_test has shape \(5, 2, 2, 3\)"),
    (_bad(test=(np.ones((5, 4, 4, 3), np.uint8), np.zeros(5, int), None)),
     "group_test is missing"),
])
def test_from_arrays_validation_errors(args, match):
  with pytest.raises(ValueError, match=match):
    data.from_arrays(**args)


# ----------------------------------------------------------------------------
# TFDS (mock_data, no TensorFlow) and the missing-dataset error
# ----------------------------------------------------------------------------

MOCK = dict(num_examples=60, policy=tfds.testing.MockPolicy.USE_CODE)


@pytest.mark.parametrize("name, native", [("mnist", (28, 28, 1)), ("fashion_mnist", (28, 28, 1)),
                                          ("cifar10", (32, 32, 3)), ("svhn_cropped", (32, 32, 3))])
def test_tfds_classification_under_mock(name, native):
  with tfds.testing.mock_data(**MOCK):
    s = data.load(_cfg(name=name, data_dir="/nonexistent"))
    source = tfds.data_source(name, split="train")
    labels = np.array([source[int(i)]["label"] for i in s.val.index])
    first = np.asarray(source[int(s.train.index[0])]["image"])
  _assert_consistent(s)
  assert s.info.input_shape == native and s.info.group_is_label
  assert s.info.source_splits == {"train": "train", "val": "train", "test": "test"}
  assert len(s.train) + len(s.val) == 60 and len(s.test) == 60
  np.testing.assert_array_equal(s.val.y, labels)
  norm = s.info.normalization
  np.testing.assert_allclose(s.train.x[0], (first / 255.0 - norm["mean"]) / norm["std"],
                             rtol=1e-5, atol=1e-5)


def test_tfds_resize_and_max_examples():
  with tfds.testing.mock_data(**MOCK):
    s = data.load(_cfg(name="cifar10", image_size=8, max_examples=40, normalize="unit"))
    source = tfds.data_source("cifar10", split="train")
    image = np.asarray(source[int(s.train.index[0])]["image"])
  assert s.info.input_shape == (8, 8, 3)
  assert len(s.train) + len(s.val) == 40 and len(s.test) == 40
  # 'area' resize of 32 -> 8 is the mean of each 4x4 block (PIL's fixed-point box filter
  # and uint8 output are within one level of it).
  blocks = image.reshape(8, 4, 8, 4, 3).mean(axis=(1, 3))
  np.testing.assert_allclose(s.train.x[0] * 255.0, blocks, atol=1.0)


def test_celeb_a_label_and_group_attributes():
  with tfds.testing.mock_data(**MOCK):
    s = data.load(_cfg(name="celeb_a", label_attribute="Smiling", group_attribute="Young",
                       image_size=16))
    source = tfds.data_source("celeb_a", split="test")
    attrs = [source[int(i)]["attributes"] for i in s.test.index]
  _assert_consistent(s)
  assert s.info.input_shape == (16, 16, 3)  # 218x178 center-cropped to square, resized
  assert s.info.class_names == ("not Smiling", "Smiling")
  assert s.info.group_names == ("not Young", "Young") and not s.info.group_is_label
  np.testing.assert_array_equal(s.test.y, [int(a["Smiling"]) for a in attrs])
  np.testing.assert_array_equal(s.test.group, [int(a["Young"]) for a in attrs])
  assert not np.array_equal(s.test.y, s.test.group)


def test_missing_tfds_dataset_error_names_dataset_dir_and_command(tmp_path):
  from fqjax.data.tfds_sources import DatasetNotPreparedError
  with pytest.raises(DatasetNotPreparedError) as info:
    data.load(_cfg(name="cifar10", data_dir=str(tmp_path)))
  message = str(info.value)
  assert "'cifar10'" in message and str(tmp_path / "cifar10") in message
  assert "pip install tensorflow" in message
  assert f"tfds build cifar10 --data_dir={tmp_path} --file_format=array_record" in message
  assert list(tmp_path.iterdir()) == []  # nothing was downloaded


def test_resize_image_crops_to_center_square():
  image = np.zeros((6, 4, 1), np.uint8)
  image[1:5] = 200  # the central 4x4 square
  out = tfds_sources.resize_image(image, 2, "area")
  assert out.shape == (2, 2, 1) and (out == 200).all()


# ----------------------------------------------------------------------------
# UTKFace through a stand-in for fqjax.data.utkface.read_prepared
# ----------------------------------------------------------------------------

@pytest.fixture
def fake_utkface(monkeypatch):
  calls = []
  rng = np.random.default_rng(0)
  n = 300
  prepared = {"image": rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8),
              "race": rng.integers(0, 5, n), "gender": rng.integers(0, 2, n),
              "age": rng.integers(1, 90, n)}

  def read_prepared(data_dir, image_size):
    calls.append((data_dir, image_size))
    return prepared

  from fqjax.data import utkface
  monkeypatch.setattr(utkface, "read_prepared", read_prepared)
  return prepared, calls


def test_utkface_default_race(fake_utkface):
  prepared, calls = fake_utkface
  s = data.load(_cfg(name="utkface", data_dir="/data/tfds", image_size=8))
  _assert_consistent(s)
  assert calls == [("/data/tfds", 8)]
  assert s.info.group_names == ("White", "Black", "Asian", "Indian", "Others")
  assert s.info.group_is_label and s.info.group_attribute == "race"
  np.testing.assert_array_equal(s.train.y, prepared["race"][s.train.index])
  assert len(s.train) + len(s.val) + len(s.test) == 300


def test_utkface_gender_label_age_bin_group(fake_utkface):
  prepared, _ = fake_utkface
  s = data.load(_cfg(name="utkface", image_size=8, label_attribute="gender",
                     group_attribute="age_bin", age_bins=(30, 60)))
  assert s.info.class_names == ("Male", "Female")
  assert s.info.group_names == ("<30", "30-59", "60+")
  age = prepared["age"][s.val.index]
  np.testing.assert_array_equal(s.val.group, (age >= 30).astype(int) + (age >= 60))
  np.testing.assert_array_equal(s.val.y, prepared["gender"][s.val.index])


def test_utkface_rejects_wrong_image_size(fake_utkface):
  with pytest.raises(ValueError, match=r"expected \[N, 16, 16, 3\] uint8"):
    data.load(_cfg(name="utkface", image_size=16))
