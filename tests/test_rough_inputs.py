"""Rough inputs through the real command lines (launch.py, python -m fqjax.study.allocate, python -m fqjax.report):
one clear line (no traceback), and nothing in the workdir changed where it should not (issue 26).

Most commands run in this process through the same code a shell runs (``Cli``: launch.py's flag parsing and
main, the CLIs' main) to keep the suite fast; a few run as real subprocesses (Ctrl-C, a special file, the
allocate and report CLIs)."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch.py")


def _data(path, n=120):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(n, 5)).astype(np.float32)
  y = rng.integers(0, 3, n)
  np.savez(path, x=x + y[:, None], y=y, group=rng.integers(0, 3, n))
  return str(path)


class Done:
  """What a command left: its exit code and its output (subprocess.CompletedProcess's fields)."""

  def __init__(self, returncode, stdout, stderr):
    self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def _in_process(argv, capsys):
  """``python launch.py argv...`` in this process: launch.py's run_cli minus absl's process setup (the same
  flag parsing, one-line usage errors with exit 2, and main's error handling)."""
  import launch
  from absl import flags
  capsys.readouterr()
  code = 0
  try:
    try:
      handles, rest = launch.parse_flags(["launch.py", *argv])
    except flags.Error as e:
      launch._usage_error(str(e))
    launch.main(rest, handles)
  except SystemExit as e:
    code = e.code if isinstance(e.code, int) else 1
  out = capsys.readouterr()
  return Done(code, out.out, out.err)


def _launch(tmp_path, *args, stages="train", capsys=None):
  base = ["--config=" + os.path.join(ROOT, "experiments", "arrays.py"), f"--config.data.path={_data(tmp_path / 'd.npz')}",
          "--config.seeds=(0,)", "--config.train.epochs=1", "--no_progress", f"--stages={stages}"]
  if capsys is not None:
    return _in_process([*base, *args], capsys)
  return subprocess.run([sys.executable, LAUNCH, *base, *args], capture_output=True, text=True, cwd=ROOT,
                        timeout=300)


def _one_line_error(proc, prefix="fqjax: error: "):
  assert proc.returncode != 0, proc.stdout[-2000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith(prefix)]
  assert len(errors) == 1, proc.stderr[-3000:]
  return errors[0]


def _files(folder):
  return {os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), "rb").read()
          for d, _, files in os.walk(folder) for f in files if f not in ("fqjax.log", ".fqjax.lock")}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
  """One finished train + ptq run of a tiny MLP, for the CLIs that read a workdir."""
  root = tmp_path_factory.mktemp("rough")
  proc = _launch(root, f"--workdir={root / 'wd'}", "--config.ptq.bit_widths=(32,4)", "--config.model.kwargs.hidden=(8,)",
                 stages="train,ptq")
  assert proc.returncode == 0, proc.stderr[-3000:]
  return root


@pytest.mark.parametrize("factory,message", [
    ("six_logits", "the model's output is (2, 6) for a batch of 2, not logits [2, 3]"),
    ("too_few_logits", "the model's output is (2, 2) for a batch of 2, not logits [2, 3]"),
    ("no_layers", "the model has no Dense or Conv layer to quantize"),
    ("with_dropout", "the model needs an RNG stream in training"),
])
def test_a_model_that_cannot_be_studied_is_refused_before_training(tmp_path, capsys, factory, message):
  proc = _launch(tmp_path, f"--workdir={tmp_path / 'wd'}", f"--config.model.name=tests.rough_models:{factory}",
                 capsys=capsys)
  line = _one_line_error(proc)
  assert message in line and f"tests.rough_models:{factory}" in line
  assert not (tmp_path / "wd").exists()  # refused before the workdir is made


@pytest.mark.parametrize("args,message", [
    (["--config.train.learning_rate=inf"], "config.train.learning_rate is invalid: got inf; allowed: a finite number > 0"),
    (["--config.parallel.data_parallel=True", "--config.parallel.num_devices=5"],
     "config.parallel.num_devices is invalid: got 5; allowed: 1..1"),
    (["--config.distributed.initialize=True"], "config.distributed.initialize=True, but jax.distributed.initialize"),
    (["--config.name=../../x"], "config.name is invalid: got '../../x'"),
    (["--config.mitigate.methods=(ptq,qat)"],
     "Strings in a tuple need quotes, and the tuple needs shell quotes: --config.mitigate.methods=\"('ptq','qat')\""),
])
def test_bad_settings_get_one_line(tmp_path, capsys, monkeypatch, args, message):
  monkeypatch.chdir(tmp_path)  # no --workdir: the default runs/<name> must not be made either
  proc = _launch(tmp_path, *args, capsys=capsys)
  assert not (tmp_path / "runs").exists()
  assert message in _one_line_error(proc)


def test_divergence_is_an_fqjax_error_and_logged(tmp_path, monkeypatch):
  """TrainingDiverged is an fqjax error: launch.py prints its one line, and the runner logs it to fqjax.log."""
  from fqjax.errors import FqjaxError
  from fqjax.study import runner
  from fqjax.study.config import base_config
  from fqjax.training import train
  assert issubclass(train.TrainingDiverged, FqjaxError)

  def diverge(*args, **kwargs):
    raise train.TrainingDiverged("loss became nan at step 1 (epoch 0, batch 1); training stopped.")

  monkeypatch.setattr(train, "fit", diverge)
  c = base_config()
  c.data.name, c.data.path, c.seeds, c.model.name = "arrays", _data(tmp_path / "d.npz"), (0,), "mlp"
  with pytest.raises(train.TrainingDiverged):
    runner.run(c, str(tmp_path / "wd"), ["train"], progress=False)
  assert "stage train: loss became nan at step 1" in (tmp_path / "wd" / "fqjax.log").read_text()


def test_config_file_that_is_not_python_is_refused(tmp_path, capsys):
  (tmp_path / "hostname").write_text("vm\n")
  proc = _in_process([f"--config={tmp_path / 'hostname'}"], capsys)
  assert "not a Python file (.py)" in _one_line_error(proc, "launch.py: error: ")
  (tmp_path / "bad.py").write_text("def get_config():\n  return undefined_name\n")
  proc = subprocess.run([sys.executable, LAUNCH, f"--config={tmp_path / 'bad.py'}"], capture_output=True, text=True,
                        cwd=tmp_path, timeout=120)
  line = _one_line_error(proc, "launch.py: error: ")
  assert "NameError: name 'undefined_name' is not defined" in line and f"{tmp_path / 'bad.py'}:2" in line


def test_a_repeated_tuple_flag_keeps_its_last_value(tmp_path, capsys):
  proc = _launch(tmp_path, f"--workdir={tmp_path / 'wd'}", "--config.ptq.bit_widths=(32,4)",
                 "--config.ptq.bit_widths=(8,)", "--config.seeds=(3,)", capsys=capsys)
  assert proc.returncode == 0, proc.stderr[-3000:]
  config = json.loads((tmp_path / "wd" / "config.json").read_text())
  assert config["ptq"]["bit_widths"] == [8] and config["seeds"] == [3]


def test_a_workdir_that_cannot_be_written_is_one_line(tmp_path, capsys):
  proc = _launch(tmp_path, "--workdir=/proc/1", capsys=capsys)  # exists, is a folder, and nobody (not even root) writes there
  assert "--workdir /proc/1 cannot be" in _one_line_error(proc)


def test_ctrl_c_prints_one_line(tmp_path):
  cmd = [sys.executable, LAUNCH, "--config=" + os.path.join(ROOT, "experiments", "arrays.py"),
         f"--config.data.path={_data(tmp_path / 'd.npz', n=3000)}", "--config.seeds=(0,)", "--config.train.epochs=200",
         "--no_progress", "--stages=train", f"--workdir={tmp_path / 'wd'}"]
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
  log = tmp_path / "wd" / "fqjax.log"
  deadline = time.time() + 120
  while time.time() < deadline and not (log.exists() and "train seed 0" in log.read_text()):
    time.sleep(0.2)
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 130, err[-3000:]
  assert "Traceback" not in err and "fqjax: interrupted; rerun the same command to resume" in err, err[-3000:]


def test_a_hand_edited_results_file_is_not_trusted(study, tmp_path, capsys):
  wd = tmp_path / "wd"
  os.system(f"cp -r {study / 'wd'} {wd}")
  path = wd / "results.json"
  res = json.loads(path.read_text())
  json.dumps(res)
  path.write_text(json.dumps(res, indent=4))  # reformatted by hand: still fqjax's content
  again = _launch(tmp_path, f"--workdir={wd}", "--config.ptq.bit_widths=(32,4)", "--config.model.kwargs.hidden=(8,)",
                  stages="train,ptq", capsys=capsys)
  assert again.returncode == 0, again.stderr[-3000:]
  res = json.loads(path.read_text())
  res["ptq"]["per_seed"]["0"]["4"]["accuracy"] = 0.999  # a number changed by hand
  path.write_text(json.dumps(res))
  before = _files(wd)
  proc = _launch(tmp_path, f"--workdir={wd}", "--config.ptq.bit_widths=(32,4)", "--config.model.kwargs.hidden=(8,)",
                 stages="train,ptq", capsys=capsys)
  line = _one_line_error(proc)
  assert "results.json: was changed outside fqjax after fqjax wrote it" in line
  assert _files(wd) == before
  report = subprocess.run([sys.executable, "-m", "fqjax.report", str(wd)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
  assert "was changed outside fqjax" in _one_line_error(report)


def test_a_deleted_or_garbage_config_json_is_named_and_restored_by_a_rerun(study, tmp_path, capsys):
  wd = tmp_path / "wd"
  os.system(f"cp -r {study / 'wd'} {wd}")
  good = (wd / "config.json").read_text()
  (wd / "config.json").write_text("garbage")
  proc = subprocess.run([sys.executable, "-m", "fqjax.study.allocate", str(wd), "--budget_kb", "1"],
                        capture_output=True, text=True, timeout=300, cwd=ROOT)
  line = _one_line_error(proc, "fqjax.study.allocate: error: ")
  assert f"{wd}/config.json: not a JSON config" in line and "rewrites config.json" in line
  (wd / "config.json").unlink()
  assert "no config.json in" in _one_line_error(_allocate([str(wd), "--budget_kb", "1"], capsys),
                                                "fqjax.study.allocate: error: ")
  rerun = _launch(tmp_path, f"--workdir={wd}", "--config.ptq.bit_widths=(32,4)", "--config.model.kwargs.hidden=(8,)",
                  stages="train,ptq", capsys=capsys)
  assert rerun.returncode == 0 and "train skipped" in rerun.stdout and "ptq skipped" in rerun.stdout
  restored, before = json.loads((wd / "config.json").read_text()), json.loads(good)
  restored["data"].pop("path"), before["data"].pop("path")  # this rerun's copy of the same data file
  assert restored == before


def _allocate(argv, capsys):
  """``python -m fqjax.study.allocate argv...`` in this process (its main, argparse's exit 2 included)."""
  from fqjax.study import allocate
  capsys.readouterr()
  try:
    code = allocate.main(argv)
  except SystemExit as e:
    code = e.code
  out = capsys.readouterr()
  return Done(code, out.out, out.err)


@pytest.mark.parametrize("bits", ["1,33", "100,8", "0"])
def test_allocate_bits_outside_2_to_8_are_refused(study, capsys, bits):
  proc = _allocate([str(study / "wd"), "--budget_kb", "1", f"--bits={bits}"], capsys)
  line = _one_line_error(proc, "python -m fqjax.study.allocate: error: ")
  assert f"--bits={bits}:" in line and "outside 2..8" in line


@pytest.mark.parametrize("tool", [["-m", "fqjax.report"], ["-m", "fqjax.study.allocate", "--budget_kb", "1"]])
def test_the_read_only_clis_call_a_file_a_file_and_refuse_a_running_study(study, tmp_path, tool):
  prefix = "python -m fqjax.report: error: " if "fqjax.report" in tool else "fqjax.study.allocate: error: "
  a_file = tmp_path / "f.txt"
  a_file.write_text("x")
  proc = subprocess.run([sys.executable, *tool[:2], str(a_file), *tool[2:]], capture_output=True, text=True,
                        timeout=300, cwd=ROOT)
  assert "is a file, not a folder" in _one_line_error(proc, prefix)
  # A study running in the workdir holds its lock: the CLI refuses, naming the process.
  import fcntl
  fd = os.open(study / "wd" / ".fqjax.lock", os.O_RDWR)
  holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time\n"
                             f"fd = os.open({str(study / 'wd' / '.fqjax.lock')!r}, os.O_RDWR)\n"
                             "fcntl.flock(fd, fcntl.LOCK_EX); os.ftruncate(fd, 0); os.pwrite(fd, b'pid 4242, started now', 0)\n"
                             "print('held', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
  os.close(fd)
  try:
    assert holder.stdout.readline().strip() == "held"
    proc = subprocess.run([sys.executable, *tool[:2], str(study / "wd"), *tool[2:]], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    line = _one_line_error(proc, prefix)
    assert "is in use by a running fqjax study (pid 4242, started now)" in line
  finally:
    holder.kill()
    holder.wait()
  del fcntl


@pytest.mark.parametrize("labels,message", [
    ([0, 1, 10**9], "K would be 1000000001 and ids 2, 3, 4, 5, 6, 7, 8, 9, 10, 11 and 999999988 more"),
    ([0, 1, 2**40], "K would be 1099511627777"),
    ([0, 1, 2**31], "K would be 2147483649"),
    ([0, 0, 0], "the labels hold 1 class (0); a classifier needs at least two"),
])
def test_huge_or_single_label_ids_are_refused_at_once(labels, message):
  from fqjax.data import from_arrays
  from fqjax.errors import InputError
  x = np.random.default_rng(0).normal(size=(30, 4)).astype(np.float32)
  t0 = time.perf_counter()
  with pytest.raises(InputError) as err:
    from_arrays(x, np.asarray(labels * 10, np.int64))
  assert message in str(err.value) and time.perf_counter() - t0 < 2.0  # no np.arange(10^9)


def test_huge_ids_never_wrap_to_small_ones():
  """int64 ids are checked before any int32 cast: 2^40 stays its own class when remapped, and group 2^32 + 1 is
  not group 1."""
  from fqjax.data import from_arrays
  from fqjax.data.options import default_data_config
  from fqjax.errors import InputError
  x = np.random.default_rng(0).normal(size=(30, 4)).astype(np.float32)
  c = default_data_config()
  c.remap_labels = True
  splits = from_arrays(x, np.asarray([0, 1, 2**40] * 10, np.int64), config=c)
  assert splits.info.class_names == ("0", "1", "1099511627776") and splits.info.num_classes == 3
  with pytest.raises(InputError, match="groups must be ids 0..K-1 with every id used: K would be 4294967298"):
    from_arrays(x, np.asarray([0, 1] * 15), np.asarray([0, 2**32 + 1] * 15, np.int64))


def test_complex_inputs_are_refused():
  from fqjax.data import from_arrays
  from fqjax.errors import InputError
  with pytest.raises(InputError, match="x has complex dtype complex64; fqjax needs real inputs"):
    from_arrays(np.ones((30, 4), np.complex64), np.asarray([0, 1] * 15))


@pytest.mark.parametrize("kind", ["device", "fifo"])
def test_a_special_file_as_data_path_is_refused_without_hanging(tmp_path, kind):
  path = "/dev/zero" if kind == "device" else str(tmp_path / "fifo")
  if kind == "fifo":
    os.mkfifo(path)
  proc = subprocess.run([sys.executable, LAUNCH, "--config=" + os.path.join(ROOT, "experiments", "arrays.py"),
                         f"--config.data.path={path}", f"--workdir={tmp_path / 'wd'}", "--no_progress"],
                        capture_output=True, text=True, cwd=ROOT, timeout=120)
  assert f"config.data.path='{path}' is not a regular file" in _one_line_error(proc)
  assert not (tmp_path / "wd").exists()
