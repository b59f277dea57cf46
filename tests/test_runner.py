"""The study runner on digits with a tiny MLP: outputs, schema, skip / force / stale stages, resume, NaN, launch.py.

The tiny model is an MLP 64 -> 16 -> 10: 64*16 + 16 + 16*10 + 10 = 1210 parameters.
"""
import copy
import csv
import json
import math
import os
import re
import runpy
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from fqjax.study import config as config_lib
from fqjax import data as data_lib
from fqjax.outputs import results as results_lib
from fqjax import models
from fqjax.study import runner
from fqjax.training import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch.py")
NUM_PARAMS = 64 * 16 + 16 + 16 * 10 + 10
SEEDS = (0, 1)
BITS = (32, 4, 2)
# The stages of this issue; later stages (mitigate, ...) have their own tests.
STAGES = ("train", "ptq")


def _tiny_config(seeds=SEEDS, epochs=1, bit_widths=BITS):
  c = config_lib.base_config()
  c.name = "tiny"
  c.seeds = seeds
  c.data.name = "digits"
  c.model.name = "mlp"
  c.model.kwargs.hidden = (16,)
  c.train.epochs = epochs
  c.train.batch_size = 64
  c.ptq.bit_widths = bit_widths
  c.eval.bootstrap_resamples = 50
  return c


def _read_json(path):
  def no_nan(token):
    raise AssertionError(f"{path} holds {token}, which is not JSON")
  with open(path) as f:
    return json.load(f, parse_constant=no_nan)


def _read_csv(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def _snapshot(folder):
  """{relative path: (size, mtime_ns)} of every file under ``folder``."""
  out = {}
  for root, _, files in os.walk(folder):
    for name in files:
      path = os.path.join(root, name)
      st = os.stat(path)
      out[os.path.relpath(path, folder)] = (st.st_size, st.st_mtime_ns)
  return out


def _copy_workdir(src, dst):
  shutil.copytree(src, dst, copy_function=shutil.copy2)
  return str(dst)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("study"))
  res = runner.run(_tiny_config(), workdir, STAGES, progress=False)
  return {"workdir": workdir, "returned": res}


# ----------------------------------------------------------------------------
# One run: outputs and their contents
# ----------------------------------------------------------------------------

def test_run_writes_every_output(study):
  wd = study["workdir"]
  for name in ("config.json", "results.json", "results.csv", "fqjax.log"):
    assert os.path.isfile(os.path.join(wd, name)), name
  cfg = _read_json(os.path.join(wd, "config.json"))
  assert cfg["seeds"] == [0, 1] and cfg["ptq"]["bit_widths"] == [32, 4, 2] and cfg["model"]["name"] == "mlp"
  res = _read_json(os.path.join(wd, "results.json"))
  results_lib.validate(res)
  returned = study["returned"]
  assert returned["ptq"]["per_seed"]["1"]["4"]["accuracy"] == res["ptq"]["per_seed"]["1"]["4"]["accuracy"]
  assert returned["timings"] == res["timings"]
  assert res["schema_version"] == results_lib.SCHEMA_VERSION
  assert res["seeds"] == [0, 1]
  assert res["model"] == {"name": "mlp", "num_params": NUM_PARAMS, "layer_names": ["dense0", "head"]}
  assert res["dataset"]["name"] == "digits" and res["dataset"]["num_groups"] == 10
  assert set(res["timings"]) == {"data", "train", "ptq"} and all(v > 0 for v in res["timings"].values())
  for seed in SEEDS:
    rec = res["train"]["per_seed"][str(seed)]
    assert rec["epochs_run"] == 1 and rec["resumed_from"] is None
    assert [h["epoch"] for h in rec["history"]] == [0]
    assert rec["test"]["n"] == sum(res["dataset"]["counts"]["test"])
    ckpt = os.path.join(wd, "checkpoints", f"seed_{seed}", "train")
    mngr = train.checkpoint_manager(ckpt)
    assert mngr.all_steps() == [0]  # epochs - 1
    mngr.close()
  # The two seeds train different models.
  assert (res["train"]["per_seed"]["0"]["history"] != res["train"]["per_seed"]["1"]["history"])
  with open(os.path.join(wd, "fqjax.log")) as f:
    log = f.read()
  for line in ("train seed 0: 1 epochs of mlp on digits", "train seed 1: 1 epochs of mlp on digits",
               "stage train finished", "ptq seed 1: 32b acc", "stage ptq finished"):
    assert line in log


def test_ptq_results_hold_hand_checked_numbers(study):
  res = _read_json(os.path.join(study["workdir"], "results.json"))
  p = res["ptq"]
  assert p["bit_widths"] == [32, 4, 2] and sorted(p["per_seed"]) == ["0", "1"]
  for seed in ("0", "1"):
    by_bits = p["per_seed"][seed]
    assert sorted(by_bits, key=int) == ["2", "4", "32"]
    # Storage: 32 bits = 1210 float32. At b bits each kernel is b bits per weight plus one 32-bit scale
    # per output channel; biases stay float32:
    #   4 bits: (4*1024 + 32*16) + (4*160 + 32*10) + 32*26 = 6400 bits = 800 bytes
    #   2 bits: (2*1024 + 32*16) + (2*160 + 32*10) + 32*26 = 4032 bits = 504 bytes
    assert [by_bits[b]["size_bytes"] for b in ("32", "4", "2")] == [4 * NUM_PARAMS, 800, 504]
    # 32 bits is the full-precision model: same as the train stage's test metrics, zero drop.
    fp = res["train"]["per_seed"][seed]["test"]
    assert by_bits["32"]["accuracy"] == fp["accuracy"]
    assert by_bits["32"]["groups"]["accuracy"] == fp["groups"]["accuracy"]
    assert by_bits["32"]["groups"]["accuracy_drop"] == [0.0] * 10 and by_bits["32"]["accuracy_drop"] == 0.0
    for b, m in by_bits.items():
      acc = np.asarray(m["groups"]["accuracy"], float)
      assert m["fairness_violation"] == pytest.approx(acc.max() - acc.min())
      assert m["worst_group_accuracy"] == pytest.approx(acc.min())
      np.testing.assert_allclose(m["groups"]["accuracy_drop"], np.asarray(fp["groups"]["accuracy"]) - acc,
                                 atol=1e-12)
      ci = m["fairness_violation_ci"]
      assert ci["num_resamples"] == 50 and 0.0 <= ci["low"] <= ci["high"] <= 1.0
  # Summaries: mean and sample std (ddof=1) over the two seeds.
  for b in ("32", "4", "2"):
    a0, a1 = p["per_seed"]["0"][b]["accuracy"], p["per_seed"]["1"][b]["accuracy"]
    s = p["summary"][b]["accuracy"]
    assert s["mean"] == pytest.approx((a0 + a1) / 2) and s["n"] == 2
    assert s["std"] == pytest.approx(abs(a0 - a1) / math.sqrt(2))
    g = p["summary"][b]["groups"]["accuracy"]
    assert len(g) == 10
    assert g[3]["mean"] == pytest.approx((p["per_seed"]["0"][b]["groups"]["accuracy"][3]
                                          + p["per_seed"]["1"][b]["groups"]["accuracy"][3]) / 2)


def test_results_csv_has_one_row_per_variant_bits_seed_split_group(study):
  res = _read_json(os.path.join(study["workdir"], "results.json"))
  rows = _read_csv(os.path.join(study["workdir"], "results.csv"))
  groups = ["all"] + [str(g) for g in range(10)]
  # fp: 2 seeds x (val, test) x 11; ptq: 2 seeds x 3 bit-widths x test x 11.
  expected = ({("fp", "32", str(s), split, g) for s in SEEDS for split in ("val", "test") for g in groups}
              | {("ptq", str(b), str(s), "test", g) for s in SEEDS for b in BITS for g in groups})
  assert len(rows) == 2 * 2 * 11 + 2 * 3 * 11 == 110
  keys = [(r["variant"], r["bits"], r["seed"], r["split"], r["group"]) for r in rows]
  assert len(set(keys)) == len(keys) and set(keys) == expected
  by_key = dict(zip(keys, rows))
  m = res["ptq"]["per_seed"]["1"]["2"]
  row = by_key[("ptq", "2", "1", "test", "all")]
  assert float(row["accuracy"]) == m["accuracy"] and float(row["fairness_violation"]) == m["fairness_violation"]
  assert int(row["count"]) == m["n"]
  row = by_key[("ptq", "2", "1", "test", "7")]
  assert float(row["accuracy"]) == m["groups"]["accuracy"][7] and int(row["count"]) == m["groups"]["count"][7]
  assert float(row["accuracy_drop"]) == m["groups"]["accuracy_drop"][7] and row["fairness_violation"] == ""
  val = res["train"]["per_seed"]["0"]["val"]
  row = by_key[("fp", "32", "0", "val", "5")]
  assert int(row["count"]) == res["dataset"]["counts"]["val"][5] and float(row["loss"]) == val["groups"]["loss"][5]


def _drop_key(r):
  del r["ptq"]["per_seed"]["0"]["4"]["fairness_violation"]


def _short_group_list(r):
  r["train"]["per_seed"]["1"]["test"]["groups"]["accuracy"].pop()


def _missing_bits(r):
  del r["ptq"]["per_seed"]["1"]["2"]


def _bad_size(r):
  r["ptq"]["per_seed"]["0"]["32"]["size_bytes"] = "big"


def _no_seeds(r):
  del r["seeds"]


def _new_schema(r):
  r["schema_version"] = 2


@pytest.mark.parametrize("breakage,message", [
    (_drop_key, r"at ptq\.per_seed\.0\.4: missing 'fairness_violation'"),
    (_short_group_list, r"at train\.per_seed\.1\.test\.groups\.accuracy: expected a list of 10 values"),
    (_missing_bits, r"at ptq\.per_seed\.1: expected one entry per bit-width"),
    (_bad_size, r"at ptq\.per_seed\.0\.32\.size_bytes: expected a number"),
    (_no_seeds, r"at seeds: missing"),
    (_new_schema, r"at schema_version: expected 1"),
])
def test_validate_rejects_a_broken_copy_naming_the_place(study, breakage, message):
  good = _read_json(os.path.join(study["workdir"], "results.json"))
  results_lib.validate(good)
  broken = copy.deepcopy(good)
  breakage(broken)
  with pytest.raises(ValueError, match=message):
    results_lib.validate(broken)


# ----------------------------------------------------------------------------
# Rerunning a workdir: skip, force, stale
# ----------------------------------------------------------------------------

def test_second_run_skips_finished_stages_and_force_reruns(study, tmp_path):
  wd = _copy_workdir(study["workdir"], tmp_path / "wd")
  ckpts = os.path.join(wd, "checkpoints")
  before = _read_json(os.path.join(wd, "results.json"))
  snap = _snapshot(ckpts)

  again = runner.run(_tiny_config(), wd, STAGES, progress=False)
  assert again["timings"]["train"] == before["timings"]["train"]
  assert again["timings"]["ptq"] == before["timings"]["ptq"]
  assert _snapshot(ckpts) == snap
  after = _read_json(os.path.join(wd, "results.json"))
  assert after["train"]["per_seed"] == before["train"]["per_seed"]
  assert after["ptq"]["per_seed"] == before["ptq"]["per_seed"]
  with open(os.path.join(wd, "fqjax.log")) as f:
    log = f.read()
  assert "train seed 0: done already, skipped" in log and "ptq seed 1: done already, skipped" in log

  forced = runner.run(_tiny_config(), wd, STAGES, force=True, progress=False)
  assert forced["timings"]["train"] != before["timings"]["train"]
  assert forced["timings"]["ptq"] != before["timings"]["ptq"]
  new_snap = _snapshot(ckpts)
  commits = [k for k in new_snap if k.endswith("commit_success.txt")]
  assert commits and all(new_snap[k] != snap.get(k) for k in commits)  # checkpoints written anew
  after = _read_json(os.path.join(wd, "results.json"))
  for seed in ("0", "1"):
    rec, old = after["train"]["per_seed"][seed], before["train"]["per_seed"][seed]
    assert rec["resumed_from"] is None and rec["epochs_run"] == 1  # retrained from scratch, not resumed
    assert rec["history"] == old["history"] and rec["test"] == old["test"]  # training is deterministic
  assert after["ptq"]["per_seed"] == before["ptq"]["per_seed"]


def test_changed_ptq_config_reruns_only_ptq(study, tmp_path):
  wd = _copy_workdir(study["workdir"], tmp_path / "wd")
  before = _read_json(os.path.join(wd, "results.json"))
  snap = _snapshot(os.path.join(wd, "checkpoints"))
  c = _tiny_config(bit_widths=(32, 3))
  c.ptq.per_channel = False
  res = runner.run(c, wd, STAGES, progress=False)
  assert res["timings"]["train"] == before["timings"]["train"]
  assert res["timings"]["ptq"] != before["timings"]["ptq"]
  assert _snapshot(os.path.join(wd, "checkpoints")) == snap
  after = _read_json(os.path.join(wd, "results.json"))
  results_lib.validate(after)
  assert after["ptq"]["bit_widths"] == [32, 3] and after["ptq"]["per_channel"] is False
  assert after["train"]["per_seed"] == before["train"]["per_seed"]
  # Per-tensor scales: one 32-bit scale per kernel.
  #   3 bits: (3*1024 + 32) + (3*160 + 32) + 32*26 = 4448 bits = 556 bytes
  assert after["ptq"]["per_seed"]["0"]["3"]["size_bytes"] == 556
  assert len(_read_csv(os.path.join(wd, "results.csv"))) == 2 * 2 * 11 + 2 * 2 * 11


# ----------------------------------------------------------------------------
# fit: resume after an interruption, divergence
# ----------------------------------------------------------------------------

class _Interrupt(Exception):
  """Stands for a kill right after a checkpoint was written."""


@pytest.fixture(scope="module")
def tiny_model():
  c = _tiny_config(seeds=(0,), epochs=3)
  splits = data_lib.load(c)
  return c, splits, models.build_model(c, splits.info)


def _assert_same_tree(a, b):
  jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)


def test_interrupted_fit_resumes_to_the_uninterrupted_result(tiny_model, tmp_path):
  c, splits, model = tiny_model
  a = train.fit(model, splits, c.train, 0, str(tmp_path / "a"), progress=False)
  assert a["resumed_from"] is None and a["epochs_run"] == 3
  assert [h["epoch"] for h in a["history"]] == [0, 1, 2]

  def stop_after_epoch_1(epoch, entry):
    if epoch == 1:
      raise _Interrupt()

  b_dir = str(tmp_path / "b")
  with pytest.raises(_Interrupt):
    train.fit(model, splits, c.train, 0, b_dir, on_epoch_end=stop_after_epoch_1, progress=False)
  mngr = train.checkpoint_manager(b_dir)
  assert mngr.latest_step() == 1
  mngr.close()
  assert train.load_trained(model, splits, c.train, 0, b_dir) is None  # not finished yet

  b = train.fit(model, splits, c.train, 0, b_dir, progress=False)
  assert b["resumed_from"] == 2 and b["epochs_run"] == 1
  assert b["history"] == a["history"]
  _assert_same_tree(b["variables"], a["variables"])
  loaded = train.load_trained(model, splits, c.train, 0, b_dir)
  _assert_same_tree(loaded["variables"], a["variables"])
  assert loaded["history"] == a["history"]


def test_nan_loss_raises_naming_the_step_and_keeps_last_good_checkpoint(tiny_model, tmp_path):
  c, splits, model = tiny_model
  ckpt = str(tmp_path / "ckpt")
  one = c.copy_and_resolve_references()
  one.train.epochs = 1
  good = train.fit(model, splits, one.train, 0, ckpt, progress=False)
  # Continue the same run for two more epochs at an absurd learning rate: epoch 1 blows up.
  bad = c.copy_and_resolve_references()
  bad.train.learning_rate = 1e30
  with pytest.raises(train.TrainingDiverged) as err:
    train.fit(model, splits, bad.train, 0, ckpt, progress=False)
  msg = str(err.value)
  found = re.search(r"at step (\d+) \(epoch (\d+), batch (\d+)\)", msg)
  assert found, msg
  step, epoch, batch = map(int, found.groups())
  steps_per_epoch = -(-len(splits.train) // c.train.batch_size)
  assert epoch == 1 and step == steps_per_epoch * epoch + batch
  assert "last good checkpoint is epoch 0" in msg
  mngr = train.checkpoint_manager(ckpt)
  assert mngr.all_steps() == [0]
  mngr.close()
  kept = train.load_trained(model, splits, one.train, 0, ckpt)
  _assert_same_tree(kept["variables"], good["variables"])


# ----------------------------------------------------------------------------
# launch.py
# ----------------------------------------------------------------------------

def _launch(args, timeout=300):
  return subprocess.run([sys.executable, LAUNCH, *args], cwd=REPO, capture_output=True, text=True,
                        timeout=timeout)


def test_launch_digits_prints_the_table_and_timings(tmp_path):
  wd = tmp_path / "wd"
  out = _launch(["--config", os.path.join(REPO, "experiments", "digits.py"), "--config.seeds=(0,)",
                 "--config.train.epochs=1", "--config.ptq.bit_widths=(32,4)",
                 "--config.eval.bootstrap_resamples=20", "--stages=train,ptq", "--workdir", str(wd),
                 "--no_progress"])
  assert out.returncode == 0, out.stderr[-3000:]
  res = _read_json(wd / "results.json")
  results_lib.validate(res)
  assert res["seeds"] == [0] and res["ptq"]["bit_widths"] == [32, 4]
  assert res["config"]["train"]["epochs"] == 1 and res["model"]["name"] == "small_cnn"
  lines = out.stdout.splitlines()
  variant_at = lines.index("ptq variant mse/recalibrate:")  # digits compares two PTQ variants
  assert res["ptq"]["variant"] == "max/keep" and list(res["ptq"]["variants"]) == ["mse/recalibrate"]
  lines = lines[:variant_at]  # the primary variant's table
  header = [l for l in lines if l.split()[:3] == ["bits", "size", "KB"] and "fairness viol." in l]
  assert len(header) == 1
  for b in ("32", "4"):
    row = [l for l in lines if l.split()[:1] == [b]]
    assert len(row) == 1, out.stdout
    assert f"{res['ptq']['summary'][b]['accuracy']['mean']:.3f}±" in row[0]
  assert any(l.startswith("stage wall times: data ") and "train " in l and "ptq " in l
             for l in out.stdout.splitlines()), out.stdout
  assert str(wd / "results.json") in out.stdout


def test_launch_rejects_an_unknown_stage(tmp_path):
  wd = tmp_path / "wd"
  out = _launch(["--stages=bogus", "--workdir", str(wd), "--no_progress"], timeout=120)
  assert out.returncode != 0
  assert "--stages got ['bogus']" in out.stderr and "'train', 'ptq'" in out.stderr
  assert not wd.exists()


KILL_CONFIG = '''
from fqjax.study.config import base_config


def get_config():
  c = base_config()
  c.name = "kill"
  c.seeds = (0,)
  c.data.name = "digits"
  c.model.name = "mlp"
  c.model.kwargs.hidden = (16,)
  c.train.epochs = {epochs}
  c.train.batch_size = 64
  c.ptq.bit_widths = (32, 4)
  c.eval.bootstrap_resamples = 20
  return c
'''


def test_killed_launch_resumes_to_the_uninterrupted_result(tmp_path):
  epochs = 15
  cfg_path = tmp_path / "kill_config.py"
  cfg_path.write_text(KILL_CONFIG.format(epochs=epochs))
  wd = tmp_path / "killed"
  # Only the train stage: resuming is its business, and PTQ would add two compilations.
  cmd = [sys.executable, LAUNCH, "--config", str(cfg_path), "--stages=train", "--workdir", str(wd),
         "--no_progress"]
  ckpt = wd / "checkpoints" / "seed_0" / "train"
  first = ckpt / "0" / "commit_success.txt"
  proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.monotonic() + 180
    while not first.exists():
      assert proc.poll() is None, "launch.py ended before its first checkpoint"
      assert time.monotonic() < deadline, "no checkpoint of epoch 0 after 180 s"
      time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
  finally:
    proc.kill()
    proc.wait()
  # It died in the middle of training: a few epochs saved, no results yet.
  saved = sorted(int(d) for d in os.listdir(ckpt) if d.isdigit())
  assert saved and saved[-1] < epochs - 1, saved
  assert not (wd / "results.json").exists()

  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  resumed = _read_json(wd / "results.json")
  rec = resumed["train"]["per_seed"]["0"]
  assert rec["resumed_from"] is not None and rec["resumed_from"] >= 1
  assert rec["epochs_run"] == epochs - rec["resumed_from"]

  ref_dir = tmp_path / "uninterrupted"
  runner.run(runpy.run_path(str(cfg_path))["get_config"](), str(ref_dir), ["train"], progress=False)
  ref = _read_json(ref_dir / "results.json")
  ref_rec = ref["train"]["per_seed"]["0"]
  assert ref_rec["resumed_from"] is None
  assert rec["history"] == ref_rec["history"]
  assert rec["test"] == ref_rec["test"] and rec["val"] == ref_rec["val"]
