"""launch.py's command line: every config field of every experiment is overridable with its type,
unknown fields are refused in one line, fqjax errors print one line, stage times of this run.

Overrides are parsed in-process through launch.py's own flag definition (launch.parse_flags on a
fresh absl FlagValues); only the one-line refusals run `python launch.py` as a subprocess.
"""
import glob
import os
import subprocess
import sys

import pytest
from absl import flags
from ml_collections import config_dict
from ml_collections.config_flags import config_path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)
import launch  # noqa: E402  (the repository root is not a package)

LAUNCH = os.path.join(REPO, "launch.py")
# config_flags loads config files with importlib's deprecated load_module (its own business).
pytestmark = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")
EXPERIMENTS = sorted(p for p in glob.glob(os.path.join(REPO, "experiments", "*.py"))
                     if not p.endswith("__init__.py"))

# Object-typed placeholders take Python literals; one documented example each (see fqjax/study/config.py,
# fqjax/data/options.py, fqjax/study/mitigate.py). An object field not listed gets a generic literal.
OBJECT_EXAMPLES = {
    "data.imbalance.keep_fractions": ("{3: 0.2, 'cat': 0.5}", {3: 0.2, "cat": 0.5}),
    "data.imbalance.order": ("[2, 0, 1]", [2, 0, 1]),
    "ptq.a_bits": ("6", 6),
    "mitigate.a_bits": ("4", 4),
    "explain.bit_widths": ("(8, 4)", (8, 4)),
    "train.sampling_target": ("200", 200),
    "mitigate.sampling_target": ("max", "max"),
}
GENERIC_OBJECT = ("{'k': [1, 2.5]}", {"k": [1, 2.5]})


def _parse(*args):
  """The config launch.py would run for `python launch.py *args`."""
  handles, rest = launch.parse_flags(["launch.py", *args])
  assert rest == ["launch.py"]
  return handles.config.value


def _load(path):
  return launch.parse_flags(["launch.py", f"--config={path}"])[0].config.value


def _override(path, field_type, default):
  """(command-line text, expected parsed value) for a leaf, chosen from its type; differs from default."""
  if field_type is config_dict.ConfigDict:
    return "{'width': 8}", {"width": 8}
  if field_type is bool:
    return ("false", False) if default else ("true", True)
  if field_type is int:
    value = 8 if default == 7 else 7
    return str(value), value
  if field_type is float:
    value = 0.625 if default == 0.375 else 0.375
    return repr(value), value
  if field_type is str:
    return "override_value", "override_value"
  if field_type is tuple:
    kinds = {type(v) for v in default}
    if kinds == {str}:
      value = ("qat", "ptq")
    elif kinds == {float}:
      value = (0.25, 0.5)
    else:  # ints, or empty / mixed
      value = (3, 1)
    value = value if value != tuple(default) else value[::-1]
    return repr(value), value
  if field_type is object:
    return OBJECT_EXAMPLES.get(path, GENERIC_OBJECT)
  raise AssertionError(f"config field {path} has type {field_type.__name__}, which launch.py cannot "
                       "override; give it a typed default or ml_collections.config_dict.placeholder(type)")


def _plain(value):
  return value.to_dict() if isinstance(value, config_dict.ConfigDict) else value


def _same_type(parsed, expected):
  if isinstance(expected, dict):
    return isinstance(parsed, (dict, config_dict.ConfigDict))
  if type(parsed) is not type(expected):
    return False
  if isinstance(expected, (tuple, list)):
    return all(type(a) is type(b) for a, b in zip(parsed, expected))
  return True


@pytest.mark.parametrize("experiment", EXPERIMENTS, ids=[os.path.basename(p) for p in EXPERIMENTS])
def test_every_config_field_is_overridable_with_its_type(experiment):
  default = _load(experiment)
  leaves = launch.leaf_paths(default)
  assert len(leaves) > 50, leaves  # the walk reaches into every section
  defaults = {p: _plain(config_path.get_value(p, default)) for p in leaves}
  failures = []
  for path in leaves:
    field_type = config_path.get_type(path, default)
    text, expected = _override(path, field_type, defaults[path])
    try:
      parsed = _parse(f"--config={experiment}", f"--config.{path}={text}")
    except Exception as e:  # pylint: disable=broad-except  # collect every field's failure
      failures.append(f"--config.{path}={text}: {type(e).__name__}: {e}")
      continue
    value = config_path.get_value(path, parsed)
    if _plain(value) != expected or not _same_type(value, expected):
      failures.append(f"--config.{path}={text}: parsed {value!r} ({type(value).__name__}), "
                      f"expected {expected!r} ({type(expected).__name__})")
    changed = [p for p in leaves if p != path and _plain(config_path.get_value(p, parsed)) != defaults[p]]
    if changed:
      failures.append(f"--config.{path}={text} also changed {changed}")
  assert not failures, "\n".join(failures)


def test_every_leaf_type_is_covered_by_the_walk():
  # A guard on the walk itself: the experiments hold every kind of field the override chooser knows.
  types = set()
  for experiment in EXPERIMENTS:
    config = _load(experiment)
    types |= {config_path.get_type(p, config) for p in launch.leaf_paths(config)}
  assert {bool, int, float, str, tuple, object, config_dict.ConfigDict} <= types, types


# ----------------------------------------------------------------------------
# Commands a user types
# ----------------------------------------------------------------------------

def test_arrays_with_a_data_path(monkeypatch):
  monkeypatch.chdir(REPO)  # the path as a user types it, relative to the repository
  config = _parse("--config", os.path.join("experiments", "arrays.py"), "--config.data.path=my.npz")
  assert config.name == "arrays" and config.data.path == "my.npz"
  assert config.data.data_dir is None  # the other placeholders stay unset


def test_keep_fractions_as_a_dict_literal():
  config = _parse("--config.data.imbalance.keep_fractions={3: 0.2}")
  assert config.data.imbalance.keep_fractions == {3: 0.2}
  assert isinstance(config.data.imbalance.keep_fractions, dict)
  config = _parse("--config.data.imbalance.keep_fractions=[1.0, 0.5, 0.25]")
  assert config.data.imbalance.keep_fractions == [1.0, 0.5, 0.25]


def test_image_size_and_max_examples_are_ints():
  config = _parse("--config.data.image_size=32", "--config.data.max_examples=1000")
  assert config.data.image_size == 32 and type(config.data.image_size) is int
  assert config.data.max_examples == 1000 and type(config.data.max_examples) is int
  with pytest.raises(flags.IllegalFlagValueError, match="image_size"):
    _parse("--config.data.image_size=big")


@pytest.mark.parametrize("text, expected", [("same", "same"), ("8", 8)])
def test_ptq_a_bits_takes_same_or_an_int(text, expected):
  config = _parse(f"--config.ptq.a_bits={text}")
  assert config.ptq.a_bits == expected and type(config.ptq.a_bits) is type(expected)


def test_seeds_as_a_tuple():
  assert _parse("--config.seeds=(0,1)").seeds == (0, 1)
  assert _parse("--config.seeds=5").seeds == (5,)


def test_bool_fields_take_the_no_prefix():
  assert _parse("--noconfig.ptq.per_channel").ptq.per_channel is False
  assert _parse("--config.data.remap_labels").data.remap_labels is True


def test_model_kwargs_accepts_new_keys():
  arrays = os.path.join(REPO, "experiments", "arrays.py")
  assert len(_load(arrays).model.kwargs) == 0  # empty in this experiment
  config = _parse(f"--config={arrays}", "--config.model.kwargs.width=8", "--config.model.kwargs.stem=cifar")
  assert config.model.kwargs.to_dict() == {"width": 8, "stem": "cifar"}
  # Where kwargs already has keys, a new one is added beside them.
  assert _parse("--config.model.kwargs.depth=3").model.kwargs.to_dict() == {"width": 16, "depth": 3}
  # The whole dict at once replaces it.
  assert _parse("--config.model.kwargs={'width': 8}").model.kwargs.to_dict() == {"width": 8}


def test_the_parsed_config_is_locked():
  config = _parse("--config.model.kwargs.depth=3")
  with pytest.raises(AttributeError):
    config.train.nonexistent = 1
  with pytest.raises(AttributeError):
    config.model.kwargs.another = 1


def test_overrides_are_read_from_the_given_argv_not_sys_argv(monkeypatch):
  monkeypatch.setattr(sys, "argv", ["launch.py", "--config.train.epochs=99"])
  assert _parse("--config.train.epochs=3").train.epochs == 3


# ----------------------------------------------------------------------------
# Unknown fields: one line naming the field and the closest names
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("args, expected", [
    (["--config.train.epoch=3"], "did you mean train.epochs"),
    (["--config.trian.epochs=3"], "did you mean train.epochs"),
    (["--config=experiments/arrays.py", "--config.trian.epochs=3"], "did you mean train.epochs"),
    (["--config.ptq.abits=same"], "did you mean ptq.a_bits"),
    (["--config.train.epochs.x=1"], "; config.train has: batch_size"),
    (["--config.zzz=1"], "the config has: claims, data, distributed"),
    (["--config.data.synthetic.qqqqqqqq=1"], "; config.data.synthetic has: group_sizes, noise"),
    (["--config.train.nonexistent=1"], "; config.train has: batch_size, effective_beta"),
    (["--config.trian={'epochs': 3}"], "did you mean train?"),
])
def test_unknown_field_is_one_line_with_close_names(args, expected, monkeypatch):
  monkeypatch.chdir(REPO)
  with pytest.raises(launch.ConfigOverrideError) as info:
    _parse(*args)
  message = str(info.value)
  assert "\n" not in message
  path = args[-1].split("=", 1)[0]
  assert message.startswith(f"{path}: no such field in the config of "), message
  assert expected in message, message


def test_a_missing_config_file_is_one_line():
  with pytest.raises(launch.ConfigOverrideError, match=r"^--config=nope\.py: no such file"):
    _parse("--config=nope.py")


def _launch(args, tmp_path):
  wd = tmp_path / "wd"
  out = subprocess.run([sys.executable, LAUNCH, *args, "--workdir", str(wd), "--no_progress"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
  return out, wd


@pytest.mark.parametrize("args, field, suggestion", [
    (["--config.train.epoch=3"], "--config.train.epoch", "did you mean train.epochs"),
    (["--config", "experiments/arrays.py", "--config.trian.epochs=3"], "--config.trian.epochs",
     "did you mean train.epochs"),
    (["--config=experiments/digits.py", "--config.train.nonexistent=1"], "--config.train.nonexistent",
     "config.train has: batch_size"),
])
def test_launch_refuses_an_unknown_field_in_one_line(tmp_path, args, field, suggestion):
  out, wd = _launch(args, tmp_path)
  assert out.returncode == 2, out.stderr
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1, out.stderr
  assert lines[0].startswith(f"launch.py: error: {field}: no such field"), lines[0]
  assert suggestion in lines[0]
  assert "Traceback" not in out.stderr and out.stdout == ""
  assert not wd.exists()


# ----------------------------------------------------------------------------
# fqjax errors and stage times in main
# ----------------------------------------------------------------------------

def _failing_run(error):
  def run(*args, **kwargs):
    raise error
  return run


def _error_with_cause():
  from fqjax.errors import CorruptFileError
  try:
    try:
      raise OSError("orbax could not read the tree metadata\nsecond line")
    except OSError as cause:
      raise CorruptFileError("wd/checkpoints/0", "the checkpoint is unreadable", "Delete it and rerun.") from cause
  except CorruptFileError as e:
    return e


def test_main_prints_an_fqjax_error_in_one_line_with_its_cause(monkeypatch, capsys, tmp_path):
  from fqjax.study import runner
  monkeypatch.setattr(runner, "run", _failing_run(_error_with_cause()))
  handles, rest = launch.parse_flags(["launch.py", f"--workdir={tmp_path}"])
  with pytest.raises(SystemExit) as info:
    launch.main(rest, handles)
  assert info.value.code == 1
  err = capsys.readouterr().err.splitlines()
  assert err == ["fqjax: error: wd/checkpoints/0: the checkpoint is unreadable. Delete it and rerun.",
                 "  (cause: OSError: orbax could not read the tree metadata; "
                 "rerun with --traceback for the full traceback)"]


def test_main_prints_an_fqjax_error_without_cause_alone(monkeypatch, capsys, tmp_path):
  from fqjax.study import runner
  from fqjax.errors import InputError
  monkeypatch.setattr(runner, "run", _failing_run(InputError("config.data.path is empty.")))
  handles, rest = launch.parse_flags(["launch.py", f"--workdir={tmp_path}"])
  with pytest.raises(SystemExit) as info:
    launch.main(rest, handles)
  assert info.value.code == 1
  assert capsys.readouterr().err.splitlines() == ["fqjax: error: config.data.path is empty."]


def test_traceback_flag_reraises(monkeypatch, tmp_path):
  from fqjax.study import runner
  from fqjax.errors import CorruptFileError
  monkeypatch.setattr(runner, "run", _failing_run(_error_with_cause()))
  handles, rest = launch.parse_flags(["launch.py", f"--workdir={tmp_path}", "--traceback"])
  with pytest.raises(CorruptFileError):
    launch.main(rest, handles)


def test_other_errors_are_not_swallowed(monkeypatch, tmp_path):
  from fqjax.study import runner
  monkeypatch.setattr(runner, "run", _failing_run(RuntimeError("a bug")))
  handles, rest = launch.parse_flags(["launch.py", f"--workdir={tmp_path}"])
  with pytest.raises(RuntimeError, match="a bug"):
    launch.main(rest, handles)


def test_stage_times_are_those_of_this_run():
  res = {"timings": {"data": 0.2, "train": 50.0, "ptq": 0.9},  # train's 50 s is from an earlier run
         "last_run": {"stages": {"data": 0.24, "train": "skipped", "ptq": 0.91, "report": 1.1},
                      "total_s": 3.42}}
  assert launch.format_stage_times(res, 99.0) == (
      "stage wall times: data 0.2s, train skipped, ptq 0.9s, report 1.1s; total 3.4s")


def test_stage_times_fall_back_to_timings_without_last_run():
  res = {"timings": {"data": 0.2, "train": 5.04}}
  assert launch.format_stage_times(res, 6.0) == "stage wall times: data 0.2s, train 5.0s; total 6.0s"


def test_main_prints_the_stage_times_of_last_run(monkeypatch, capsys, tmp_path):
  from fqjax.study import runner
  res = {"timings": {"data": 0.2, "train": 50.0},
         "last_run": {"stages": {"data": 0.2, "train": "skipped"}, "total_s": 0.3}}
  monkeypatch.setattr(runner, "run", lambda *a, **k: res)
  handles, rest = launch.parse_flags(["launch.py", f"--workdir={tmp_path}"])
  launch.main(rest, handles)
  out = capsys.readouterr().out
  assert "stage wall times: data 0.2s, train skipped; total 0.3s" in out.splitlines()


def test_mitigate_grid_is_open_to_new_fields(monkeypatch):
  """--config.mitigate.grid.<field>=<literal> adds a field to the selection grid (like model.kwargs)."""
  monkeypatch.chdir(REPO)
  config = _parse("--config.mitigate.grid.hardness_floor=(0.1, 0.3)")
  assert tuple(config.mitigate.grid.hardness_floor) == (0.1, 0.3)
  assert tuple(config.mitigate.grid.learning_rate) == (0.01, 0.03)
