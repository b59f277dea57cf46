"""No stage runs on a stale model: after the data, the train config, the model or the seeds change, every stage
that needs the trained model (ptq, explain, mitigate, the allocate CLI) stops with one line naming what changed,
before it computes or writes anything; the report stage shows no entry of the old model."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from fqjax.errors import MissingFileError, StaleModelError
from fqjax.study import runner
from fqjax.study.config import base_config


def _write_data(path, scale=1.0):
  rng = np.random.default_rng(0)
  n = 240
  x = rng.normal(size=(n, 6)).astype(np.float32)
  y = rng.integers(0, 3, n)
  x[:, 0] += y
  np.savez(path, x=x * scale, y=y, group=rng.integers(0, 3, n))


def _config(data_path):
  c = base_config()
  c.name = "stale"
  c.seeds = (0,)
  c.data.name = "arrays"
  c.data.path = str(data_path)
  c.model.name = "mlp"
  c.model.kwargs = {"hidden": (8,)}
  c.train.epochs, c.train.batch_size = 2, 32
  c.ptq.bit_widths = (32, 4)
  c.eval.bootstrap_resamples = 0
  c.explain.bit_widths = (4,)
  c.explain.lanczos_max_iters, c.explain.density_bits, c.explain.size_matched_repeats = 5, (), 0
  c.mitigate.methods, c.mitigate.bit_widths, c.mitigate.epochs = ("ptq",), (4,), 1
  c.tensorboard = False
  return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  root = tmp_path_factory.mktemp("stale")
  _write_data(root / "data.npz")
  runner.run(_config(root / "data.npz"), str(root / "wd"), ["train", "ptq"], progress=False)
  return root


def _change(kind, c, data_path):
  if kind == "data":
    _write_data(data_path, scale=2.0)  # same path, other contents
  elif kind == "train config":
    c.train.learning_rate = 0.2
  elif kind == "model":
    c.model.kwargs = {"hidden": (16,)}
  elif kind == "seeds":
    c.seeds = (0, 1)
  return c


def _snapshot(folder):
  return {os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), "rb").read()
          for d, _, files in os.walk(folder) for f in files if f not in ("fqjax.log", ".fqjax.lock")}


@pytest.mark.parametrize("stage", ["ptq", "explain", "mitigate"])
@pytest.mark.parametrize("kind", ["data", "train config", "model", "seeds"])
def test_a_stage_run_alone_refuses_a_stale_model(trained, tmp_path, kind, stage):
  shutil.copytree(trained, tmp_path / "s")
  wd, data = tmp_path / "s" / "wd", tmp_path / "s" / "data.npz"
  c = _change(kind, _config(data), data)
  before = _snapshot(wd)
  if kind == "seeds":  # seed 0 keeps its split (data.seed + 0); seed 1 was never trained
    error, message = MissingFileError, "no finished training checkpoint for seed 1"
  else:
    error, message = StaleModelError, rf"seed 0's trained model is stale \({kind} changed"
  with pytest.raises(error, match=message):
    runner.run(c, str(wd), [stage], force=True, progress=False)
  assert _snapshot(wd) == before  # nothing computed, nothing written


def test_with_the_train_stage_the_model_is_retrained(trained, tmp_path):
  shutil.copytree(trained, tmp_path / "s")
  wd, data = tmp_path / "s" / "wd", tmp_path / "s" / "data.npz"
  c = _change("train config", _config(data), data)
  res = runner.run(c, str(wd), ["train", "ptq"], progress=False)
  assert isinstance(res["last_run"]["stages"]["train"], float)
  assert res["ptq"]["keys"]["0"] == runner.stage_key(c, "ptq", res["train"]["per_seed"]["0"], res["train"]["keys"]["0"])


def test_report_alone_shows_no_entry_of_the_stale_model(trained, tmp_path):
  shutil.copytree(trained, tmp_path / "s")
  wd, data = tmp_path / "s" / "wd", tmp_path / "s" / "data.npz"
  res = runner.run(_change("data", _config(data), data), str(wd), ["report"], progress=False)
  assert not res["train"]["per_seed"] and not res["ptq"]["per_seed"]
  assert res["claims"]["minority_loses_more_accuracy"]["verdict"] == "not tested"
  with open(wd / "results.json") as f:
    assert not json.load(f)["ptq"]["per_seed"]


def test_allocate_cli_refuses_a_stale_model(trained, tmp_path):
  shutil.copytree(trained, tmp_path / "s")
  wd, data = tmp_path / "s" / "wd", tmp_path / "s" / "data.npz"
  with open(wd / "config.json") as f:
    config = json.load(f)
  config["data"]["path"] = str(data)  # the copy's own data file (same contents as the one trained on)
  (wd / "config.json").write_text(json.dumps(config))
  proc = subprocess.run([sys.executable, "-m", "fqjax.study.allocate", str(wd), "--budget_kb", "1"],
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr  # the model as trained: allocated
  _write_data(data, scale=2.0)
  proc = subprocess.run([sys.executable, "-m", "fqjax.study.allocate", str(wd), "--budget_kb", "1"],
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  lines = proc.stderr.strip().splitlines()
  assert "seed 0's trained model is stale (data changed" in lines[-1] and "Traceback" not in proc.stderr


def test_launch_prints_one_line(trained, tmp_path):
  shutil.copytree(trained, tmp_path / "s")
  wd, data = tmp_path / "s" / "wd", tmp_path / "s" / "data.npz"
  (tmp_path / "s" / "exp.py").write_text(
      "import sys\nsys.path.insert(0, %r)\nfrom test_stale_model import _config\n"
      "def get_config():\n  return _config(%r)\n" % (os.path.dirname(__file__), str(data)))
  launch = os.path.join(os.path.dirname(os.path.dirname(__file__)), "launch.py")
  proc = subprocess.run([sys.executable, launch, f"--config={tmp_path / 's' / 'exp.py'}", f"--workdir={wd}",
                         "--stages=ptq", "--config.train.learning_rate=0.2", "--no_progress"],
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0 and "Traceback" not in proc.stderr
  assert "fqjax: error: seed 0's trained model is stale (train config changed" in proc.stderr
