"""The runner's one cache rule, per seed, and the workdir lock (issue 11).

Each case starts from a copy of one finished train + ptq workdir (an MLP 8 -> 8 -> 2 on
three groups of user arrays, seeds 0 and 1) and checks what is recomputed and what is reused.
"""
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from fqjax.study import config as config_lib
from fqjax.outputs import workdir as workdir_lib
from fqjax.study import runner
from fqjax.errors import WorkdirError

STAGES = ("train", "ptq")


def _write_data(path, seed=0, n=(60, 60, 20)):
  rng = np.random.default_rng(seed)
  group = np.repeat(np.arange(len(n)), n)
  y = rng.integers(0, 2, size=len(group))
  x = rng.normal(size=(len(group), 8)).astype(np.float32) + 1.5 * y[:, None]
  np.savez(path, x=x, y=y, group=group)
  return str(path)


def _config(path, seeds=(0, 1)):
  c = config_lib.base_config()
  c.seeds = seeds
  c.data.name = "arrays"
  c.data.path = str(path)
  c.model.name = "mlp"
  c.model.kwargs.hidden = (8,)
  c.train.epochs = 2
  c.train.batch_size = 32
  c.ptq.bit_widths = (32, 4)
  c.eval.bootstrap_resamples = 0
  return c


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  root = tmp_path_factory.mktemp("cache")
  path = _write_data(root / "data.npz")
  res = runner.run(_config(path), str(root / "wd"), STAGES, progress=False)
  return {"root": root, "npz": path, "results": res}


@pytest.fixture
def wd(finished, tmp_path):
  """A copy of the finished workdir and of its data file (the config points at the copy)."""
  shutil.copytree(finished["root"] / "wd", tmp_path / "wd")
  shutil.copy(finished["npz"], tmp_path / "data.npz")
  return {"dir": str(tmp_path / "wd"), "npz": str(tmp_path / "data.npz")}


def _train_records(res):
  return res["train"]["per_seed"]


def test_a_replaced_data_file_recomputes_train_and_ptq(finished, wd):
  _write_data(wd["npz"], seed=1, n=(50, 50, 30))  # same path, other content
  res = runner.run(_config(wd["npz"]), wd["dir"], STAGES, progress=False)
  assert res["last_run"]["stages"]["train"] != "skipped" and res["last_run"]["stages"]["ptq"] != "skipped"
  assert res["dataset"]["identity"] != finished["results"]["dataset"]["identity"]
  for seed in ("0", "1"):
    rec = _train_records(res)[seed]
    assert rec["resumed_from"] is None and rec["epochs_run"] == 2  # retrained from scratch, old checkpoints gone
    # the metrics are of the new data: their group counts are the new test split's
    assert rec["test"]["groups"]["count"] == res["dataset"]["counts"]["test"]
    assert res["ptq"]["per_seed"][seed]["32"]["groups"]["count"] == res["dataset"]["counts"]["test"]
  assert res["dataset"]["counts"]["train"] != finished["results"]["dataset"]["counts"]["train"]


def test_removing_a_seed_drops_it_and_summaries_use_exactly_the_configured_seeds(finished, wd):
  res = runner.run(_config(wd["npz"], seeds=(0,)), wd["dir"], STAGES, progress=False)
  assert res["last_run"]["stages"]["train"] == "skipped" and res["last_run"]["stages"]["ptq"] == "skipped"
  assert list(res["ptq"]["per_seed"]) == ["0"] and list(_train_records(res)) == ["0"]
  s = res["ptq"]["summary"]["4"]["accuracy"]
  assert s["n"] == 1 and s["mean"] == res["ptq"]["per_seed"]["0"]["4"]["accuracy"] and s["std"] == 0.0
  on_disk = json.load(open(os.path.join(wd["dir"], "results.json")))
  assert on_disk["seeds"] == [0] and list(on_disk["ptq"]["per_seed"]) == ["0"]
  assert on_disk["ptq"]["summary"]["4"]["accuracy"]["n"] == 1


def test_adding_a_seed_computes_only_that_seed(finished, wd):
  res = runner.run(_config(wd["npz"], seeds=(0, 1, 2)), wd["dir"], STAGES, progress=False)
  old = finished["results"]
  for seed in ("0", "1"):
    assert _train_records(res)[seed] == _train_records(old)[seed]
    assert res["ptq"]["per_seed"][seed] == old["ptq"]["per_seed"][seed]
  assert _train_records(res)["2"]["epochs_run"] == 2
  assert res["ptq"]["summary"]["4"]["accuracy"]["n"] == 3
  judgement = res["claims"]["fairness_violation_grows_as_bits_shrink"]["judgements"]["max/keep | fairness_violation"]
  assert judgement["fairness_violation"]["4"]["n"] == 3
  with open(os.path.join(wd["dir"], "fqjax.log")) as f:
    log = f.read().split("train seed 2:")[0]  # this run's log up to the new seed
  assert log.count("train seed 0: done already, skipped") == 1
  assert "ptq seed 1: done already, skipped" in open(os.path.join(wd["dir"], "fqjax.log")).read()


def test_a_seed_trained_without_its_ptq_is_reported_as_missing_not_summarized(finished, wd):
  res = runner.run(_config(wd["npz"], seeds=(0, 1, 2)), wd["dir"], ["train"], progress=False)
  assert res["ptq"]["missing_seeds"] == [2] and "summary" not in res["ptq"]
  claim = res["claims"]["fairness_violation_grows_as_bits_shrink"]
  assert claim["verdict"] == "not tested" and "no results yet for seeds [2]" in claim["why"]
  on_disk = json.load(open(os.path.join(wd["dir"], "results.json")))
  assert "summary" not in on_disk["ptq"] and on_disk["ptq"]["missing_seeds"] == [2]


def test_a_changed_train_config_retrains_and_recomputes_downstream(finished, wd):
  c = _config(wd["npz"])
  c.train.learning_rate = 0.2
  res = runner.run(c, wd["dir"], STAGES, progress=False)
  for seed in ("0", "1"):
    assert _train_records(res)[seed]["resumed_from"] is None
    assert _train_records(res)[seed]["history"] != _train_records(finished["results"])[seed]["history"]
  assert res["ptq"]["per_seed"] != finished["results"]["ptq"]["per_seed"]


def test_a_changed_ptq_config_keeps_training(finished, wd):
  c = _config(wd["npz"])
  c.ptq.bit_widths = (32, 3)
  res = runner.run(c, wd["dir"], STAGES, progress=False)
  assert res["last_run"]["stages"]["train"] == "skipped"
  assert sorted(res["ptq"]["per_seed"]["0"]) == ["3", "32"]


def test_force_recomputes_from_scratch_with_the_same_numbers(finished, wd):
  res = runner.run(_config(wd["npz"]), wd["dir"], STAGES, force=True, progress=False)
  for seed in ("0", "1"):
    rec, old = _train_records(res)[seed], _train_records(finished["results"])[seed]
    assert rec["resumed_from"] is None and rec["epochs_run"] == 2
    assert rec["history"] == old["history"] and rec["variables_digest"] == old["variables_digest"]
  assert res["ptq"]["per_seed"] == finished["results"]["ptq"]["per_seed"]


def test_a_second_run_in_the_same_process_logs_only_into_its_own_workdir(finished, wd, tmp_path):
  other = tmp_path / "other"
  runner.run(_config(wd["npz"], seeds=(0,)), str(other), ["train"], progress=False)
  before = open(os.path.join(wd["dir"], "fqjax.log")).read()
  runner.run(_config(wd["npz"], seeds=(0,)), str(other), ["train"], progress=False)
  assert open(os.path.join(wd["dir"], "fqjax.log")).read() == before
  assert "train seed 0: done already, skipped" in open(other / "fqjax.log").read()


HOLD_LOCK = """
import sys, time
from fqjax.outputs import workdir
with workdir.workdir_lock(sys.argv[1]):
  print("locked", flush=True)
  time.sleep(120)
"""


def test_a_second_process_is_refused_at_once_naming_the_holder(finished, wd):
  holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, wd["dir"]], stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    before = open(os.path.join(wd["dir"], "results.json")).read()
    t0 = time.perf_counter()
    with pytest.raises(WorkdirError) as err:
      runner.run(_config(wd["npz"]), wd["dir"], STAGES, force=True, progress=False)
    assert time.perf_counter() - t0 < 30  # refused, not waiting for the holder
    assert f"pid {holder.pid}, started 20" in str(err.value) and "in use by another fqjax process" in str(err.value)
    assert open(os.path.join(wd["dir"], "results.json")).read() == before
  finally:
    holder.kill()  # a crash: the OS releases the lock
    holder.wait()
  res = runner.run(_config(wd["npz"]), wd["dir"], STAGES, progress=False)
  assert res["last_run"]["stages"]["train"] == "skipped"


def test_lock_is_released_after_a_failed_run(finished, wd):
  bad = _config(wd["npz"])
  bad.train.learning_rate = 1e30  # diverges: the run fails inside the lock
  with pytest.raises(Exception):
    runner.run(bad, wd["dir"], ["train"], force=True, progress=False)
  with workdir_lib.workdir_lock(wd["dir"]):
    pass  # free again


def test_stage_keys_follow_the_stage_version_and_only_the_primary_ptq_variant(monkeypatch):
  """Entries computed by older code (a lower STAGE_VERSIONS) are not reused; explain's key names only the primary
  PTQ variant (the others' entries are kept by name), while ptq's key covers every variant."""
  from fqjax.study import cache
  c = config_lib.base_config()
  train_entry = {"variables_digest": "abc"}
  keys = {stage: cache.stage_key(c, stage, train_entry, "k") for stage in ("ptq", "explain", "mitigate")}
  c.ptq.variants = ("max/keep", "mse/recalibrate")
  assert cache.stage_key(c, "explain", train_entry, "k") == keys["explain"]
  assert cache.stage_key(c, "ptq", train_entry, "k") != keys["ptq"]
  c.ptq.variants = ("mse/recalibrate", "max/keep")  # another primary variant: explain's entries are stale
  assert cache.stage_key(c, "explain", train_entry, "k") != keys["explain"]
  c.ptq.variants = ("max/keep",)
  monkeypatch.setitem(cache.STAGE_VERSIONS, "explain", cache.STAGE_VERSIONS["explain"] + 1)
  assert cache.stage_key(c, "explain", train_entry, "k") != keys["explain"]
  assert cache.stage_key(c, "mitigate", train_entry, "k") == keys["mitigate"]
