"""Every input a user can give works or gets a clear error (issue 10).

Each case writes its own small arrays or damages a copy of a tiny finished workdir, then checks
the message (what file or field, what is wrong, how to recover) and that the workdir is unchanged
where it should be. The tiny study is an MLP 8 -> 8 -> 2 on 3 groups of Gaussian features.
"""
import glob
import json
import logging
import os
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest

from fqjax.study import config as config_lib
from fqjax import data as data_lib
from fqjax.study import runner
from fqjax.training import train
from fqjax.errors import CorruptFileError, FqjaxError, InputError, MissingFileError, WorkdirError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch.py")
STAGES = ("train", "ptq")


def _arrays(n_per_group=(60, 60, 20), num_classes=2, dim=8, seed=0):
  """x [N, dim] float32, y [N] in 0..num_classes-1, group [N]: class-dependent means, so it is learnable."""
  rng = np.random.default_rng(seed)
  group = np.repeat(np.arange(len(n_per_group)), n_per_group)
  y = rng.integers(0, num_classes, size=len(group))
  x = rng.normal(size=(len(group), dim)).astype(np.float32) + 1.5 * y[:, None]
  return x, y, group


def _write_npz(path, **arrays):
  np.savez(path, **arrays)
  return str(path)


def _config(path, seeds=(0,), epochs=2):
  c = config_lib.base_config()
  c.name = "inputs"
  c.seeds = seeds
  c.data.name = "arrays"
  c.data.path = str(path)
  c.model.name = "mlp"
  c.model.kwargs.hidden = (8,)
  c.train.epochs = epochs
  c.train.batch_size = 32
  c.ptq.bit_widths = (32, 4)
  c.eval.bootstrap_resamples = 0
  return c


def _snapshot(folder, skip=("fqjax.log", ".fqjax.lock")):
  """{relative path: bytes} of every file under ``folder`` but the log (it records the error) and the lock
  (it names its latest holder)."""
  out = {}
  for root, _, files in os.walk(folder):
    for name in files:
      path = os.path.join(root, name)
      rel = os.path.relpath(path, folder)
      if rel not in skip:
        with open(path, "rb") as f:
          out[rel] = f.read()
  return out


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """A finished train + ptq workdir with two seeds on a user .npz."""
  root = tmp_path_factory.mktemp("finished")
  x, y, g = _arrays()
  path = _write_npz(root / "data.npz", x=x, y=y, group=g)
  wd = str(root / "wd")
  res = runner.run(_config(path, seeds=(0, 1)), wd, STAGES, progress=False)
  return {"npz": path, "workdir": wd, "results": res}


def _copy(finished, tmp_path):
  wd = str(tmp_path / "wd")
  shutil.copytree(finished["workdir"], wd)
  return wd


# ----------------------------------------------------------------------------
# Data: sizes, labels, groups
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("rows", [1, 2, 3])
def test_tiny_data_is_refused_before_training_with_counts_per_group_and_split(tmp_path, rows):
  x, y, g = _arrays()
  path = _write_npz(tmp_path / "tiny.npz", x=x[:rows], y=np.arange(rows) % 2, group=np.zeros(rows, int))
  wd = tmp_path / "wd"
  with pytest.raises(InputError) as err:
    runner.run(_config(path), str(wd), STAGES, progress=False)
  msg = str(err.value)
  # 1-2 rows: val and test are empty; 3 rows: one each, and class 1 then has no training row.
  assert "too small" in msg and ("has 0 rows" in msg if rows < 3 else "class(es) '1' have no training rows" in msg)
  assert "Rows per group (train/val/test): '0' " in msg
  assert "at least 1 row in each split" in msg and "val_fraction" in msg
  assert not wd.exists()  # refused before the workdir was made


def test_a_group_without_training_rows_is_named(tmp_path):
  x, y, g = _arrays()
  test = (x[:10], y[:10], np.full(10, 2))
  # group 2 exists only in the test split: the model never sees it in training.
  with pytest.raises(InputError, match=r"group\(s\) '2' have no training rows.*'2' 0/0/10"):
    data_lib.from_arrays(x[g < 2], y[g < 2], g[g < 2], test=test, group_names=["a", "b", "2"])


def test_sparse_labels_are_refused_listing_the_values_or_remapped_on_request(tmp_path):
  x, y, g = _arrays()
  sparse = np.asarray([0, 1, 5, 1000])[np.arange(len(y)) % 4]
  with pytest.raises(InputError) as err:
    data_lib.from_arrays(x, sparse, g)
  msg = str(err.value)
  assert "4 distinct labels (0, 1, 5, 1000)" in msg and "K would be 1001" in msg
  assert "--config.data.remap_labels=True" in msg
  cfg = data_lib.default_data_config()
  cfg.remap_labels = True
  splits = data_lib.from_arrays(x, sparse, g, config=cfg)
  assert splits.info.num_classes == 4 and splits.info.class_names == ("0", "1", "5", "1000")
  # Remapping keeps which rows share a class.
  for split in (splits.train, splits.test):
    np.testing.assert_array_equal(np.asarray([0, 1, 5, 1000])[split.y], sparse[split.index])


def test_sparse_group_ids_are_refused_or_remapped(tmp_path):
  x, y, g = _arrays()
  with pytest.raises(InputError, match=r"group holds 3 distinct groups \(0, 7, 9\).*remap_groups"):
    data_lib.from_arrays(x, y, np.asarray([0, 7, 9])[g])
  cfg = data_lib.default_data_config()
  cfg.remap_groups = True
  splits = data_lib.from_arrays(x, y, np.asarray([0, 7, 9])[g], config=cfg)
  assert splits.info.group_names == ("0", "7", "9") and splits.info.counts["train"][2] > 0


def test_missing_group_array_falls_back_to_the_label_and_says_so_once(tmp_path, caplog):
  x, y, _ = _arrays()
  path = _write_npz(tmp_path / "nogroup.npz", x=x, y=y)
  c = _config(path)
  with caplog.at_level(logging.WARNING, logger="fqjax"):
    splits = data_lib.load(c)
  said = [r for r in caplog.records if "no group array given" in r.getMessage()]
  assert len(said) == 1 and "group_attribute='label'" in said[0].getMessage()
  assert splits.info.group_attribute == "label" and splits.info.num_groups == 2


# ----------------------------------------------------------------------------
# Unreadable data files
# ----------------------------------------------------------------------------

def _load_error(path):
  c = _config(path)
  with pytest.raises(FqjaxError) as err:
    data_lib.load(c)
  return err.value


def test_random_bytes_npz_is_named_and_never_advises_allow_pickle(tmp_path):
  path = tmp_path / "random.npz"
  path.write_bytes(np.random.default_rng(0).bytes(300))
  e = _load_error(str(path))
  assert isinstance(e, CorruptFileError) and str(path) in str(e)
  assert "not an .npz (zip) archive" in str(e) and "np.savez" in str(e)
  assert "allow_pickle" not in str(e)


def test_truncated_npz_is_named(tmp_path):
  x, y, g = _arrays()
  good = _write_npz(tmp_path / "good.npz", x=x, y=y, group=g)
  blob = open(good, "rb").read()
  path = tmp_path / "truncated.npz"
  path.write_bytes(blob[: len(blob) // 2])
  e = _load_error(str(path))
  assert isinstance(e, CorruptFileError) and str(path) in str(e) and "truncated or damaged" in str(e)


def test_damaged_member_of_an_npz_is_named(tmp_path):
  x, y, g = _arrays()
  good = _write_npz(tmp_path / "good.npz", x=x, y=y, group=g)
  blob = bytearray(open(good, "rb").read())
  blob[len(blob) // 3] ^= 0xFF  # inside x's data: the zip's CRC check fails on read
  path = tmp_path / "flipped.npz"
  path.write_bytes(bytes(blob))
  e = _load_error(str(path))
  assert isinstance(e, CorruptFileError) and str(path) in str(e) and "damaged" in str(e)


def test_object_arrays_are_refused_without_loading_them(tmp_path):
  path = tmp_path / "objects.npz"
  np.savez(path, x=np.asarray([{"a": 1}, 2], dtype=object), y=np.asarray([0, 1]))
  e = _load_error(str(path))
  assert "Python objects" in str(e) and "allow_pickle" not in str(e)


def test_missing_npz_says_how_to_make_one(tmp_path):
  e = _load_error(str(tmp_path / "nope.npz"))
  assert isinstance(e, MissingFileError) and isinstance(e, FileNotFoundError) and "np.savez" in str(e)


# ----------------------------------------------------------------------------
# The workdir: unusable path, corrupted results and checkpoints
# ----------------------------------------------------------------------------

def test_workdir_that_is_a_file_is_refused(tmp_path, finished):
  path = tmp_path / "a_file"
  path.write_text("not a folder")
  with pytest.raises(WorkdirError, match=r"is a file, not a folder; choose another --workdir"):
    runner.run(_config(finished["npz"]), str(path), STAGES, progress=False)
  assert path.read_text() == "not a folder"


@pytest.mark.parametrize("content, problem", [("{", "not valid JSON (line 1, column 2"),
                                              ("[]", "holds a JSON list"),
                                              ('{"schema_version": 1}', "results.json is invalid at")])
def test_corrupted_results_json_is_named_and_left_unchanged(tmp_path, finished, content, problem):
  wd = _copy(finished, tmp_path)
  path = os.path.join(wd, "results.json")
  with open(path, "w") as f:
    f.write(content)
  before = _snapshot(wd)
  with pytest.raises(CorruptFileError) as err:
    runner.run(_config(finished["npz"], seeds=(0, 1)), wd, STAGES, progress=False)
  msg = str(err.value)
  assert msg.startswith(path) and problem in msg and "Move it away" in msg
  assert _snapshot(wd) == before


def test_moving_results_json_away_recovers_from_the_checkpoints(tmp_path, finished):
  wd = _copy(finished, tmp_path)
  os.remove(os.path.join(wd, "results.json"))
  res = runner.run(_config(finished["npz"], seeds=(0, 1)), wd, STAGES, progress=False)
  for seed in ("0", "1"):
    rec, old = res["train"]["per_seed"][seed], finished["results"]["train"]["per_seed"][seed]
    assert rec["epochs_run"] == 0  # nothing retrained: the finished checkpoint was reused
    assert rec["history"] == old["history"] and rec["test"] == old["test"]
    assert rec["sample_counts"] == old["sample_counts"] and rec["sample_counts"] is not None
  assert res["ptq"]["per_seed"] == finished["results"]["ptq"]["per_seed"]


def _damage_arrays(step_dir, how):
  files = [f for f in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
           if os.path.isfile(f)]
  assert files, step_dir
  for f in files:
    blob = bytearray(open(f, "rb").read())
    if how == "truncate":
      blob = blob[: len(blob) // 2]
    else:
      blob[len(blob) // 2] ^= 0xFF
    open(f, "wb").write(bytes(blob))


@pytest.mark.parametrize("how", ["truncate", "bitflip"])
def test_damaged_checkpoint_is_named_with_the_recovery_and_nothing_changes(tmp_path, finished, how):
  wd = _copy(finished, tmp_path)
  step_dir = os.path.join(wd, "checkpoints", "seed_1", "train", "1")
  _damage_arrays(step_dir, how)
  before = _snapshot(wd)
  c = _config(finished["npz"], seeds=(0, 1))
  c.ptq.per_channel = False  # a changed ptq config: the sweep must read the checkpoints again
  with warnings.catch_warnings():
    warnings.simplefilter("error", RuntimeWarning)  # a damaged weight must not reach the metrics as NaN
    with pytest.raises(CorruptFileError) as err:
      runner.run(c, wd, STAGES, progress=False)
  msg = str(err.value)
  assert msg.startswith(step_dir + ":") and "epoch" in msg
  assert "Delete that folder and rerun launch.py" in msg and "--stages=train,ptq" in msg
  assert "only that seed is retrained" in msg
  assert _snapshot(wd) == before


def test_deleted_checkpoint_retrains_exactly_that_seed_without_force(tmp_path, finished):
  wd = _copy(finished, tmp_path)
  shutil.rmtree(os.path.join(wd, "checkpoints", "seed_1", "train"))
  c = _config(finished["npz"], seeds=(0, 1))
  res = runner.run(c, wd, STAGES, progress=False)
  old = finished["results"]
  assert res["last_run"]["stages"]["train"] != "skipped"
  assert res["train"]["per_seed"]["0"] == old["train"]["per_seed"]["0"]  # seed 0 untouched
  rec = res["train"]["per_seed"]["1"]
  assert rec["resumed_from"] is None and rec["epochs_run"] == 2
  assert rec["history"] == old["train"]["per_seed"]["1"]["history"]  # deterministic: same numbers
  assert res["ptq"]["per_seed"] == old["ptq"]["per_seed"]
  assert train.finished_epochs(os.path.join(wd, "checkpoints", "seed_1", "train")) == 1


def test_deleted_last_epoch_resumes_that_seed_from_the_previous_epoch(tmp_path, finished):
  wd = _copy(finished, tmp_path)
  shutil.rmtree(os.path.join(wd, "checkpoints", "seed_0", "train", "1"))
  res = runner.run(_config(finished["npz"], seeds=(0, 1)), wd, STAGES, progress=False)
  rec = res["train"]["per_seed"]["0"]
  assert rec["resumed_from"] == 1 and rec["epochs_run"] == 1
  assert rec["test"] == finished["results"]["train"]["per_seed"]["0"]["test"]
  assert rec["sample_counts"] == finished["results"]["train"]["per_seed"]["0"]["sample_counts"]


def test_a_rerun_with_nothing_to_do_changes_no_file_and_says_skipped(tmp_path, finished):
  wd = _copy(finished, tmp_path)
  before = _snapshot(wd)
  res = runner.run(_config(finished["npz"], seeds=(0, 1)), wd, STAGES, progress=False)
  assert res["last_run"]["stages"]["train"] == "skipped" and res["last_run"]["stages"]["ptq"] == "skipped"
  assert isinstance(res["last_run"]["stages"]["data"], float)
  assert _snapshot(wd) == before


# ----------------------------------------------------------------------------
# Through launch.py, as a user types it
# ----------------------------------------------------------------------------

def _launch(args, cwd, timeout=300):
  env = dict(os.environ)  # with conftest.py's cheap XLA compile settings: the numbers are compared within the run
  return subprocess.run([sys.executable, LAUNCH, *args], cwd=cwd, capture_output=True, text=True,
                        timeout=timeout, env=env)


def test_readme_user_data_command_runs_then_reports_skipped_and_errors_in_one_line(tmp_path):
  x, y, g = _arrays()
  _write_npz(tmp_path / "my.npz", x=x, y=y, group=g)
  args = ["--config", os.path.join(REPO, "experiments", "arrays.py"), "--config.data.path=my.npz",
          "--workdir", "runs/mine", "--config.seeds=(0,)", "--config.train.epochs=1",
          "--config.ptq.bit_widths=(32,4)", "--config.eval.bootstrap_resamples=0", "--stages=train,ptq",
          "--no_progress"]
  first = _launch(args, cwd=tmp_path)
  assert first.returncode == 0, first.stderr[-3000:]
  res = json.loads((tmp_path / "runs" / "mine" / "results.json").read_text())
  assert res["config"]["data"]["path"] == "my.npz" and res["dataset"]["num_groups"] == 3
  again = _launch(args, cwd=tmp_path)
  assert again.returncode == 0, again.stderr[-3000:]
  timing = [l for l in again.stdout.splitlines() if l.startswith("stage wall times:")]
  assert len(timing) == 1 and "train skipped" in timing[0] and "ptq skipped" in timing[0], again.stdout
  # A damaged results file: one message naming it, the cause on one line, no traceback, exit 1.
  (tmp_path / "runs" / "mine" / "results.json").write_text("{")
  broken = _launch(args, cwd=tmp_path)
  assert broken.returncode == 1
  err = broken.stderr.strip().splitlines()
  assert err[-2].startswith("fqjax: error: runs/mine/results.json: not valid JSON"), broken.stderr
  assert err[-1].startswith("  (cause: JSONDecodeError") and "--traceback" in err[-1]
  assert "Traceback" not in broken.stderr


def test_report_cli_names_a_damaged_results_file(tmp_path, finished, capsys):
  from fqjax import report
  wd = _copy(finished, tmp_path)
  with open(os.path.join(wd, "results.json"), "w") as f:
    f.write("{")
  with pytest.raises(SystemExit) as code:
    report.main([wd])
  assert code.value.code == 1
  err = capsys.readouterr().err
  assert err.startswith(f"fqjax: error: {wd}/results.json: not valid JSON") and "Traceback" not in err


def test_launch_with_this_sessions_flags_from_a_clean_then_a_stale_workdir(tmp_path):
  """As a user types it: their own plain Flax model by name, a widened selection grid, an allocation method,
  TensorBoard off, on an .npz the test writes; then the same workdir with only a claims setting changed (nothing
  recomputed, the verdicts rewritten) and with one shared split instead of one per seed (everything recomputed)."""
  x, y, g = _arrays(dim=64)
  _write_npz(tmp_path / "imgs.npz", x=x.reshape(-1, 8, 8, 1), y=y, group=g)
  base = ["--config", os.path.join(REPO, "experiments", "arrays.py"), "--config.data.path=imgs.npz",
          "--workdir", "runs/own", "--config.seeds=(0,1)", "--config.train.epochs=1",
          "--config.model.name=tests.own_model_fixture:make_model", "--config.ptq.bit_widths=(32,4)",
          "--config.eval.bootstrap_resamples=50", "--config.mitigate.methods=('qat','fair_alloc')",
          "--config.mitigate.bit_widths=(4,)", "--config.mitigate.epochs=1",
          "--config.mitigate.grid.hardness_floor=(0.1,)", "--config.tensorboard=False",
          "--stages=train,ptq,mitigate", "--no_progress"]
  env_path = {"PYTHONPATH": REPO}
  run = lambda args: subprocess.run([sys.executable, LAUNCH, *args], cwd=tmp_path, capture_output=True, text=True,
                                    timeout=300, env={**os.environ,
                                                      **env_path})
  first = run(base)
  assert first.returncode == 0, first.stderr[-3000:]
  wd = tmp_path / "runs" / "own"
  res = json.loads((wd / "results.json").read_text())
  assert res["model"]["layer_names"] == ["conv", "hidden", "head"]  # the plain model's own layers, intercepted
  assert res["dataset"]["split_seeds"] == {"0": 0, "1": 1}
  entry = res["mitigate"]["per_seed"]["0"]
  assert {s["setting"]["hardness_floor"] for s in entry["qat"]["4"]["selection"]["grid"]} == {0.1}
  assert set(entry["fair_alloc"]["4"]["allocation"]["layer_bits"]) == {"conv", "hidden", "head"}
  assert not (wd / "tensorboard").exists()
  stale = run(base + ["--config.claims.equivalence_margin=0.9"])
  assert stale.returncode == 0, stale.stderr[-3000:]
  timing = next(l for l in stale.stdout.splitlines() if l.startswith("stage wall times:"))
  assert all(f"{s} skipped" in timing for s in ("train", "ptq", "mitigate")), timing
  judged = json.loads((wd / "results.json").read_text())["claims"]["minority_loses_more_accuracy"]
  assert judged["equivalence_margin"] == 0.9
  shared = run(base + ["--config.data.resplit_per_seed=False"])
  assert shared.returncode == 0, shared.stderr[-3000:]
  res = json.loads((wd / "results.json").read_text())
  assert res["dataset"]["split_seeds"] == {"0": 0, "1": 0}
  assert "train seed 1: dropped from the results (its inputs changed)" in shared.stderr
