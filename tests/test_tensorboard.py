"""fqjax.outputs.tensorboard on a hand-built results dict: every written scalar reads back (via the TFRecord reader,
no TensorFlow), NaN/None values are skipped, reruns do not duplicate points, absent stages write no runs,
foreign folders under tensorboard/ survive, and a missing tensorboardX gives an actionable ImportError."""
import copy
import math
import os
import shutil
import struct
import sys

import pytest

pytest.importorskip("tensorboardX")  # a requirement; skipped only in an environment without it

from fqjax.outputs import tensorboard as tb# noqa: E402

NAN = float("nan")
GROUPS = ["young", "older adults"]  # the space must become "_" in the tag


def _metrics(acc, worst, fv, size=None, steps=None, groups=(0.9, 0.6)):
  m = {"accuracy": acc, "worst_group_accuracy": worst, "fairness_violation": fv,
       "groups": {"accuracy": list(groups), "count": [10, 5]}}
  if size is not None:
    m.update(size_bytes=size, steps=steps, train_s=1.0)
  return m


def _results():
  history = {s: [{"epoch": e, "steps": 3, "train_loss": 1.0 / (e + 1 + s), "train_accuracy": 0.5 + 0.1 * e,
                  "val_accuracy": 0.4 + 0.1 * e, "val_worst_group_accuracy": 0.2 + 0.05 * e, "weights": [1, 1]}
                 for e in range(3)] for s in (0, 1)}
  history[1][1]["val_accuracy"] = NAN  # never written
  history[1][2]["train_loss"] = None  # as results.json stores a NaN
  ptq_seed = {"32": _metrics(0.9, 0.8, 0.1), "4": _metrics(0.7, 0.5, 0.3, groups=(0.8, None)),
              "2": _metrics(0.3, 0.0, NAN, groups=(0.4, 0.0))}
  other_seed = {"32": _metrics(0.9, 0.8, 0.1), "4": _metrics(0.75, 0.55, 0.25, groups=(0.85, 0.55))}
  mitigate_seed = {"ptq": {"4": _metrics(0.7, 0.5, 0.3, size=2048, steps=0),
                           "2": _metrics(0.3, 0.0, 1.0, size=1024, steps=0)},
                   "fairqat": {"4": _metrics(0.8, 0.6, 0.2, size=2048, steps=120),
                               "2": _metrics(0.5, NAN, 0.4, size=1024, steps=120)}}
  return {
      "seeds": [0, 1], "dataset": {"group_names": GROUPS},
      "train": {"per_seed": {str(s): {"history": history[s], "wall_s": 1.0} for s in (0, 1)}},
      "ptq": {"variant": "max/keep", "bit_widths": [32, 4, 2],
              "per_seed": {"0": ptq_seed, "1": copy.deepcopy(ptq_seed)},
              "variants": {"mse/recalibrate": {"per_seed": {"0": other_seed, "1": copy.deepcopy(other_seed)}}}},
      "mitigate": {"methods": ["ptq", "fairqat"], "bit_widths": [4, 2],
                   "per_seed": {"0": mitigate_seed, "1": copy.deepcopy(mitigate_seed)}},
  }


def _finite(v):
  return v is not None and math.isfinite(v)


def _expected(results):
  """{run: {tag: [(step, value)]}} built straight from the dict, independently of fqjax.outputs.tensorboard."""
  exp = {}

  def add(run, tag, step, value, scale=1.0):
    if _finite(value):
      exp.setdefault(run, {}).setdefault(tag, []).append((step, value * scale))

  for s, rec in results["train"]["per_seed"].items():
    for h in rec["history"]:
      for tag, key in [("train/loss", "train_loss"), ("train/accuracy", "train_accuracy"),
                       ("val/accuracy", "val_accuracy"), ("val/worst_group_accuracy", "val_worst_group_accuracy")]:
        add(f"train/seed_{s}", tag, h["epoch"], h[key])
  ptq = results["ptq"]
  sections = {"max_keep": ptq["per_seed"]}
  sections.update({v.replace("/", "_"): sec["per_seed"] for v, sec in ptq.get("variants", {}).items()})
  for variant, per_seed in sections.items():
    for s, by_bits in per_seed.items():
      for b in sorted(by_bits, key=int):
        m, run = by_bits[b], f"ptq/{variant}/seed_{s}"
        for key in ("accuracy", "worst_group_accuracy", "fairness_violation"):
          add(run, f"ptq/{key}", int(b), m[key])
        for name, a in zip(GROUPS, m["groups"]["accuracy"]):
          add(run, f"ptq/group_accuracy/{name.replace(' ', '_')}", int(b), a)
  for s, by_method in results.get("mitigate", {}).get("per_seed", {}).items():
    for method, by_bits in by_method.items():
      for b in sorted(by_bits, key=int):
        m, run = by_bits[b], f"mitigate/{method}/seed_{s}"
        for key in ("accuracy", "worst_group_accuracy", "fairness_violation", "steps"):
          add(run, f"mitigate/{key}", int(b), m[key])
        add(run, "mitigate/size_kb", int(b), m["size_bytes"], 1 / 1024)
  return exp


def _read_all(workdir, paths):
  root = os.path.join(workdir, "tensorboard")
  out = {}
  for p in paths:
    run = os.path.relpath(os.path.dirname(p), root).replace(os.sep, "/")
    assert run not in out, f"two event files in {run}"
    out[run] = tb.read_scalars(p)
  return out


def _assert_matches(got, exp):
  assert sorted(got) == sorted(exp)
  for run, tags in exp.items():
    assert sorted(got[run]) == sorted(tags), run
    for tag, points in tags.items():
      assert [s for s, _ in got[run][tag]] == [s for s, _ in points], (run, tag)
      # TensorBoard's simple_value is a float32
      assert [v for _, v in got[run][tag]] == pytest.approx([v for _, v in points], rel=1e-6), (run, tag)
      assert all(math.isfinite(v) for _, v in got[run][tag])


def test_every_scalar_reads_back(tmp_path):
  results = _results()
  paths = tb.write_scalars(str(tmp_path), results)
  assert paths == sorted(paths) and all(os.path.isfile(p) for p in paths)
  got, exp = _read_all(str(tmp_path), paths), _expected(results)
  _assert_matches(got, exp)
  # 2 train + 2 variants x 2 seeds + 2 methods x 2 seeds
  assert len(paths) == 10
  # spot checks of the skipping and naming rules
  assert [s for s, _ in got["train/seed_1"]["val/accuracy"]] == [0, 2]
  assert [s for s, _ in got["train/seed_1"]["train/loss"]] == [0, 1]
  assert [s for s, _ in got["ptq/max_keep/seed_0"]["ptq/fairness_violation"]] == [4, 32]
  assert got["ptq/max_keep/seed_0"]["ptq/group_accuracy/older_adults"] == [(2, 0.0), (32, pytest.approx(0.6))]
  assert got["mitigate/fairqat/seed_1"]["mitigate/size_kb"] == [(2, 1.0), (4, 2.0)]
  assert [s for s, _ in got["mitigate/fairqat/seed_0"]["mitigate/worst_group_accuracy"]] == [4]
  # only the runs' own folders and no staging leftovers in the workdir
  assert sorted(os.listdir(tmp_path)) == ["tensorboard"]


def test_rerun_does_not_duplicate_and_keeps_foreign_folders(tmp_path):
  results = _results()
  first = tb.write_scalars(str(tmp_path), results)
  foreign = tmp_path / "tensorboard" / "mine" / "note.txt"
  foreign.parent.mkdir()
  foreign.write_text("kept")
  second = tb.write_scalars(str(tmp_path), results)
  assert len(second) == len(first)
  _assert_matches(_read_all(str(tmp_path), second), _expected(results))
  assert foreign.read_text() == "kept"
  assert sorted(os.listdir(tmp_path)) == ["tensorboard"]


def test_missing_stages_write_no_runs(tmp_path):
  results = _results()
  tb.write_scalars(str(tmp_path), results)  # an earlier run with mitigate: its folder must go
  del results["mitigate"]
  results["ptq"].pop("variants")
  paths = tb.write_scalars(str(tmp_path), results)
  root = tmp_path / "tensorboard"
  assert not (root / "mitigate").exists()
  assert not any("/mitigate/" in p or "mse_recalibrate" in p for p in paths)
  _assert_matches(_read_all(str(tmp_path), paths), _expected(results))
  assert tb.write_scalars(str(tmp_path / "empty"), {"seeds": [0]}) == []


def test_read_scalars_rejects_corruption_and_tolerates_truncation(tmp_path):
  path = tb.write_scalars(str(tmp_path), _results())[0]
  data = open(path, "rb").read()
  (first_length,) = struct.unpack("<Q", data[:8])
  truncated = tmp_path / "truncated"
  truncated.write_bytes(data[:-3])
  assert sum(map(len, tb.read_scalars(str(truncated)).values())) == \
      sum(map(len, tb.read_scalars(path).values())) - 1
  corrupt = bytearray(data)
  corrupt[12 + first_length + 4 + 12] ^= 0xFF  # a byte of the second record's data
  bad = tmp_path / "corrupt"
  bad.write_bytes(bytes(corrupt))
  with pytest.raises(ValueError, match="corrupt"):
    tb.read_scalars(str(bad))


def test_missing_tensorboardx_says_how_to_install_or_disable(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorboardX", None)
  with pytest.raises(ImportError) as info:
    tb.write_scalars(str(tmp_path), _results())
  assert "pip install tensorboardX" in str(info.value)
  assert "--config.tensorboard=False" in str(info.value)
  assert not (tmp_path / "tensorboard").exists()


def test_the_runner_writes_scalars_and_the_config_turns_them_off(tiny_study, tiny_study_copy, tiny_config):
  """A study run leaves TensorBoard event files whose PTQ points are the stored results; with
  config.tensorboard False a run that changes the results writes none."""
  from fqjax.study import runner
  ptq_run = os.path.join(tiny_study["workdir"], "tensorboard", "ptq", "max_keep", "seed_0")
  points = dict(tb.read_scalars(ptq_run)["ptq/accuracy"])
  stored = tiny_study["results"]["ptq"]["per_seed"]["0"]
  for bits, value in points.items():
    assert abs(value - stored[str(bits)]["accuracy"]) < 1e-6
  shutil.rmtree(os.path.join(tiny_study_copy, "tensorboard"))
  c = tiny_config()
  c.tensorboard = False
  c.claims.collapse_fraction = 0.4  # changes the claims, so the results are rewritten
  runner.run(c, tiny_study_copy, None, progress=False)
  assert not os.path.exists(os.path.join(tiny_study_copy, "tensorboard"))
