"""The stages' entry points without a workdir: a trained seed and the config in, JSON-ready dicts out."""
import csv
import json
import os

import numpy as np
import pytest

from fqjax.study import config as config_lib
from fqjax.quantization import layers
from fqjax.study import explain_stage, ptq, runner
from fqjax.study.seed import TrainedSeed
from fqjax.training import checkpoints, train
from fqjax.study.config import base_config
from fqjax.data import from_arrays
from fqjax.models import get_model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  rng = np.random.default_rng(0)
  group = np.repeat([0, 1, 2], [80, 60, 20])
  y = rng.integers(0, 2, size=len(group))
  x = rng.normal(size=(len(group), 6)).astype(np.float32) + y[:, None]
  splits = from_arrays(x, y, group)
  c = base_config()
  c.train.epochs, c.train.batch_size = 2, 32
  c.ptq.bit_widths = (32, 4)
  c.eval.bootstrap_resamples = 0
  c.explain.top_k, c.explain.lanczos_max_iters, c.explain.batch_size = 2, 10, 64
  model = get_model("mlp", 2, hidden=(8,))
  record, variables = train.train_seed(model, splits, c, 0, str(tmp_path_factory.mktemp("ckpt")), progress=False)
  names = layers.quant_layer_names(model, splits.train.x[:2])
  trained = TrainedSeed(model=model, variables=variables, splits=splits, layer_names=tuple(names), seed=0)
  return {"config": c, "splits": splits, "model": model, "record": record, "variables": variables, "names": names,
          "trained": trained}


def test_train_seed_returns_a_json_ready_record_and_its_variables(setup):
  record = setup["record"]
  json.dumps(record, allow_nan=True)  # JSON-ready
  assert record["epochs_run"] == 2 and len(record["history"]) == 2
  assert record["variables_digest"] == checkpoints.tree_digest(setup["variables"])
  assert record["test"]["groups"]["count"] == setup["splits"].info.counts["test"]


def test_ptq_seed_at_32_bits_is_the_trained_model(setup):
  s, c = setup["splits"], setup["config"]
  out = ptq.ptq_seed(setup["trained"], c)
  json.dumps(out, allow_nan=True)
  assert sorted(out["by_bits"]) == ["32", "4"] and out["sweep_mode"] == "map"
  full = out["by_bits"]["32"]
  assert full["accuracy"] == pytest.approx(setup["record"]["test"]["accuracy"])
  assert full["groups"]["accuracy_drop"] == pytest.approx([0.0, 0.0, 0.0])
  assert out["by_bits"]["4"]["size_bytes"] < full["size_bytes"]


def test_explain_entry_is_pure_and_json_ready(setup):
  s, c = setup["splits"], setup["config"]
  a, b = explain_stage.explain_entry(setup["trained"], c, 4), explain_stage.explain_entry(setup["trained"], c, 4)
  a.pop("wall_s"), b.pop("wall_s")
  assert a == b  # the same inputs give the same numbers
  json.dumps(a, allow_nan=True)
  assert len(a["curvature"]["grad_norm"]) == 3 and len(a["curvature"]["top_k_eigenvalues"][0]) == 2


def test_size_matched_curvature_and_group_caps(setup):
  """size_matched: every group cut to the smallest group's size m; the smallest group keeps all its rows, so
  its values equal the full ones (std 0 over repeats). max_examples_per_group caps each group first."""
  s, c = setup["splits"], setup["config"]
  c = c.copy_and_resolve_references()
  c.explain.size_matched_repeats = 2
  entry = explain_stage.explain_entry(setup["trained"], c, 4)
  curv = entry["curvature"]
  counts = s.info.counts["train"]
  smallest = int(np.argmin(counts))
  sm = curv["size_matched"]
  assert sm["size"] == min(counts) and sm["repeats"] == 2 and curv["activation_bits_ignored"] is False
  assert sm["grad_norm"]["mean"][smallest] == pytest.approx(curv["grad_norm"][smallest], rel=1e-5)
  assert sm["grad_norm"]["std"][smallest] == pytest.approx(0.0, abs=1e-6)
  assert sm["top_eigenvalue"]["mean"][smallest] == pytest.approx(curv["top_eigenvalue"][smallest], rel=1e-3)
  assert sm["grad_norm"]["std"][int(np.argmax(counts))] > 0  # the largest group: other rows each repeat
  capped = c.copy_and_resolve_references()
  capped.explain.size_matched_repeats, capped.explain.max_examples_per_group = 0, min(counts)
  entry = explain_stage.explain_entry(setup["trained"], capped, 4)
  assert "size_matched" not in entry["curvature"]
  assert entry["curvature"]["grad_norm"][smallest] == pytest.approx(curv["grad_norm"][smallest], rel=1e-5)


def test_ptq_variants_are_computed_summarized_and_keyed(tiny_study, tiny_study_copy, tiny_config):
  """config.ptq.variants: the primary variant stays ptq.per_seed / explain.per_seed (same numbers, not
  recomputed); the others go to ptq.variants / explain.variants with their own summaries, intervals and theory
  tables; BatchNorm recalibration changes the quantized model's numbers; at 32 bits every variant is the
  trained model; every claim is judged per variant."""
  c = tiny_config()
  c.ptq.variants = ("max/keep", "mse/recalibrate", "half_step/keep")
  res = runner.run(c, tiny_study_copy, ["train", "ptq", "explain"], progress=False)
  old, old_explain = tiny_study["results"]["ptq"], tiny_study["results"]["explain"]
  p, e = res["ptq"], res["explain"]
  assert res["last_run"]["stages"]["train"] == "skipped" and p["variant"] == "max/keep" == e["variant"]
  assert p["per_seed"] == old["per_seed"]  # the primary variant's numbers are unchanged
  assert e["per_seed"] == old_explain["per_seed"]  # and its explain entries were kept, not recomputed
  assert sorted(p["variants"]) == sorted(e["variants"]) == ["half_step/keep", "mse/recalibrate"]
  for name, entry in p["variants"].items():
    assert sorted(entry["per_seed"]) == ["0", "1"] and entry["summary"]["2"]["accuracy"]["n"] == 2
    assert entry["per_seed"]["0"]["32"] == old["per_seed"]["0"]["32"]  # 32 bits: the model as trained
    assert sorted(entry["intervals"]) == sorted(entry["summary"])
    explained = e["variants"][name]["per_seed"]
    assert explained["1"]["32"] == old_explain["per_seed"]["1"]["32"]  # shared, not recomputed
    assert "theory" in explained["1"]["2"] and set(e["variants"][name]["theory"]) == {"2"}
  recal = p["variants"]["mse/recalibrate"]["per_seed"]["0"]["2"]
  assert recal["groups"]["loss"] != old["per_seed"]["0"]["2"]["groups"]["loss"]
  assert e["variants"]["mse/recalibrate"]["per_seed"]["0"]["2"]["logits"] != old_explain["per_seed"]["0"]["2"]["logits"]
  judged = res["claims"]["logit_variance_drops_more_for_minority"]["judgements"]
  assert {name.split(" | ")[0] for name in judged} == {"max/keep", "mse/recalibrate", "half_step/keep"}
  # The report compares the variants: figures and a table with one row per variant and bit-width.
  from fqjax import report
  out = report.write_report(tiny_study_copy, res)
  assert "ptq_variants" in out["figures"] and os.path.getsize(out["figures"]["ptq_variants"]) > 5_000
  assert {"ptq_variant_groups", "explain_theory"} <= set(out["figures"])
  md = open(out["markdown"]).read()
  assert "**PTQ variants**" in md and sum(line.startswith("| mse/recalibrate | ") for line in md.splitlines()) == 4 + 4 + 1
  with open(os.path.join(tiny_study_copy, "results.csv")) as f:
    labels = {row["variant"] for row in csv.DictReader(f)}
  assert {"ptq", "ptq/mse/recalibrate", "explain", "explain/half_step/keep"} <= labels
  # Dropping a variant drops its entries and recomputes nothing.
  c.ptq.variants = ("max/keep", "mse/recalibrate")
  res = runner.run(c, tiny_study_copy, ["train", "ptq", "explain"], progress=False)
  assert list(res["explain"]["variants"]) == ["mse/recalibrate"] and res["last_run"]["stages"]["explain"] == "skipped"
  with pytest.raises(ValueError, match="config.ptq.variants"):
    bad = tiny_config()
    bad.ptq.variants = ("max/fold",)
    config_lib.validate_config(bad)


def test_claims_config_rejudges_without_recomputing(tiny_study_copy, tiny_config):
  """config.claims only changes the verdicts: every stage is skipped, the claims change and are written."""
  c = tiny_config()
  c.claims.equivalence_margin = 1.0  # nobody loses more than every example
  res = runner.run(c, tiny_study_copy, None, progress=False)
  assert all(v == "skipped" for k, v in res["last_run"]["stages"].items() if k not in ("data", "report"))
  assert res["claims"]["minority_loses_more_accuracy"]["verdict"] == "not applicable"
  with open(os.path.join(tiny_study_copy, "results.json")) as f:
    assert json.load(f)["claims"]["minority_loses_more_accuracy"]["equivalence_margin"] == 1.0
  c.claims.collapse_fraction = 1.5
  with pytest.raises(ValueError, match="claims.collapse_fraction"):
    runner.run(c, tiny_study_copy, None, progress=False)
