"""Study config validation: every bad field fails before any work starts, naming the field."""
import glob
import os
import runpy

import pytest

from fqjax.study import config as config_lib
from fqjax.study import cache, runner, schemes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = sorted(glob.glob(os.path.join(REPO, "experiments", "*.py")))


def _config(**overrides):
  """base_config with dotted-path overrides; ignore_type lets a test put a wrong type in a field."""
  c = config_lib.base_config()
  with c.ignore_type():
    for path, value in overrides.items():
      *parents, leaf = path.split(".")
      node = c
      for p in parents:
        node = node[p]
      node[leaf] = value
  return c


def test_base_config_is_valid():
  c = config_lib.base_config()
  assert config_lib.validate_config(c) is c


@pytest.mark.parametrize("path", [p for p in EXPERIMENTS if not p.endswith("__init__.py")],
                         ids=os.path.basename)
def test_experiment_configs_validate(path, monkeypatch):
  monkeypatch.syspath_prepend(REPO)  # experiments/ import each other as a package
  c = runpy.run_path(path)["get_config"]()
  if c.data.name == "arrays":
    # The .npz path is required and has no default: the error says so.
    with pytest.raises(ValueError, match=r"config\.data\.path"):
      config_lib.validate_config(c)
    c.data.path = "/some/data.npz"
  config_lib.validate_config(c)


BAD = [
    ("data.name", "bogus", r"config\.data\.name='bogus'"),
    ("model.name", "resnet7", r"config\.model\.name is invalid: got 'resnet7'"),
    ("ptq.bit_widths", (32, 0), r"config\.ptq\.bit_widths is invalid"),
    ("ptq.bit_widths", (33, 4), r"config\.ptq\.bit_widths is invalid"),
    ("ptq.bit_widths", (), r"config\.ptq\.bit_widths is invalid: got \(\)"),
    ("ptq.bit_widths", (8, 8), r"config\.ptq\.bit_widths is invalid.*distinct"),
    ("ptq.bit_widths", (32, True), r"config\.ptq\.bit_widths is invalid"),
    ("seeds", (), r"config\.seeds is invalid: got \(\)"),
    ("seeds", (0, 0), r"config\.seeds is invalid.*distinct"),
    ("seeds", (-1,), r"config\.seeds is invalid"),
    ("train.epochs", 1.5, r"config\.train\.epochs is invalid: got 1\.5"),
    ("train.epochs", "3", r"config\.train\.epochs is invalid: got '3'"),
    ("train.epochs", 0, r"config\.train\.epochs is invalid"),
    ("train.batch_size", 0, r"config\.train\.batch_size is invalid"),
    ("train.optimizer", "lbfgs", r"config\.train\.optimizer is invalid"),
    ("train.learning_rate", 0.0, r"config\.train\.learning_rate is invalid"),
    ("train.sampling", "bogus", r"config\.train\.sampling is invalid"),
    ("train.loss_weights", "bogus", r"config\.train\.loss_weights is invalid"),
    ("ptq.a_bits", 0, r"config\.ptq\.a_bits is invalid"),
    ("ptq.calibration", "bogus", r"config\.ptq\.calibration is invalid"),
    ("ptq.sweep_mode", "bogus", r"config\.ptq\.sweep_mode is invalid"),
    ("eval.bootstrap_resamples", -1, r"config\.eval\.bootstrap_resamples is invalid"),
    # Batch sizes only used after training (evaluation, calibration) must fail up front too.
    ("eval.batch_size", 0, r"config\.eval\.batch_size is invalid"),
    ("train.eval_batch_size", 0, r"config\.train\.eval_batch_size is invalid"),
    ("ptq.calibration_batch_size", 0, r"config\.ptq\.calibration_batch_size is invalid"),
]


@pytest.mark.parametrize("path,value,message", BAD, ids=[f"{p}={v!r}" for p, v, _ in BAD])
def test_invalid_config_fails_before_any_work(tmp_path, path, value, message):
  c = _config(**{path: value})
  with pytest.raises(ValueError, match=message):
    config_lib.validate_config(c)
  workdir = tmp_path / "wd"
  with pytest.raises(ValueError, match=message):
    runner.run(c, str(workdir), progress=False)
  assert not workdir.exists(), "the runner wrote to the workdir before rejecting the config"


@pytest.mark.parametrize("stages,message", [
    (["bogus"], r"--stages got \['bogus'\]; allowed: .*'train', 'ptq', 'explain', 'mitigate', 'report'"),
    (["train", "bogus"], r"--stages got \['train', 'bogus'\]"),
    ([], r"--stages got \[\]"),
])
def test_unknown_stage_fails_before_any_work(tmp_path, stages, message):
  workdir = tmp_path / "wd"
  with pytest.raises(ValueError, match=message):
    runner.run(config_lib.base_config(), str(workdir), stages=stages, progress=False)
  assert not workdir.exists()


def test_every_stage_is_implemented_in_pipeline_order():
  assert runner.available_stages() == list(config_lib.STAGES)


def test_check_stages_returns_pipeline_order():
  assert config_lib.check_stages(["ptq", "train"]) == ["train", "ptq"]
  assert config_lib.check_stages(("report", "train", "explain")) == ["train", "explain", "report"]


def test_cache_keys_track_exactly_their_inputs():
  a = config_lib.base_config()
  entry = {"variables_digest": "d0"}
  train_a, ptq_a = cache.train_key(a, "data0", 0), cache.stage_key(a, "ptq", entry, "t0")
  assert train_a == cache.train_key(config_lib.base_config(), "data0", 0)
  assert cache.train_key(a, "data1", 0) != train_a  # other data
  assert cache.train_key(a, "data0", 1) != train_a  # another seed
  b = config_lib.base_config()
  b.ptq.bit_widths = (32, 4)
  b.seeds = (0, 1, 2)  # the list of seeds is not an input of one seed's entry
  assert cache.train_key(b, "data0", 0) == train_a
  assert cache.stage_key(b, "ptq", entry, "t0") != ptq_a
  # explain keeps its entries per bit-width: its key leaves the bit-width lists out
  assert cache.stage_key(b, "explain", entry, "t0") == cache.stage_key(a, "explain", entry, "t0")
  c = config_lib.base_config()
  c.train.learning_rate = 0.2
  assert cache.train_key(c, "data0", 0) != train_a
  # downstream keys follow the train entry they were computed from, by key and by variables
  assert cache.stage_key(a, "ptq", entry, "t1") != ptq_a
  assert cache.stage_key(a, "ptq", {"variables_digest": "d1"}, "t0") != ptq_a
  assert cache.stage_key(a, "ptq", None, None) is None
  d = config_lib.base_config()
  d.eval.bootstrap_resamples = 10
  assert cache.train_key(d, "data0", 0) == train_a
  assert cache.stage_key(d, "ptq", entry, "t0") != ptq_a

def test_every_choice_tuple_is_the_one_in_fqjax_choices():
  """The modules that implement a choice use fqjax.choices' tuple, and their tables have exactly its keys."""
  from fqjax.quantization import calibration, quant
  from fqjax import choices
  from fqjax.training import losses, sampling, train
  from fqjax.study import mitigate, ptq
  from fqjax.models import MODEL_NAMES, MODELS
  assert tuple(MODELS) == MODEL_NAMES == choices.MODEL_NAMES
  assert tuple(calibration.CALIBRATORS) == choices.CALIBRATIONS and quant.WEIGHT_SCALE_RULES == choices.WEIGHT_SCALE_RULES
  assert sampling.METHODS == choices.SAMPLING_METHODS and losses.WEIGHT_SCHEMES == choices.WEIGHT_SCHEMES
  assert ptq.SWEEP_MODES == choices.SWEEP_MODES and train.OPTIMIZERS == choices.OPTIMIZERS
  assert tuple(schemes.METHOD_PARTS) == mitigate.METHODS == choices.MITIGATE_METHODS
  assert runner.available_stages() == list(choices.STAGES)


def test_choices_and_claims_load_no_jax():
  import subprocess
  import sys
  code = ("import sys, fqjax.choices, fqjax.analysis.claims, fqjax.analysis.tables; "
          "sys.exit(any(m == 'jax' or m.startswith('jax.') for m in sys.modules))")
  assert subprocess.run([sys.executable, "-c", code]).returncode == 0
