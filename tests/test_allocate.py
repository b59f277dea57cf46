"""Tests for fqjax.study.allocate: the sensitivity table against theory.second_order_terms, exact sizes, the MILP
against brute force, fair vs group-blind allocations, additivity and the CLI on a tiny trained workdir."""
import functools
import itertools
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from fqjax.study import allocate, runner
from fqjax.quantization import layers, quant
from fqjax.explain import theory
from fqjax.quantization.layers import BitSpec
from fqjax.models import MLP

BITS = (2, 4, 8)
GROUPS = np.array([0] * 20 + [1] * 9 + [2] * 3 + [0] * 4 + [1] * 4)  # 24 / 13 / 3 rows, interleaved


@functools.lru_cache(maxsize=None)
def _mlp():
  """MLP 64 -> 6 -> 5 -> 3 (three quantizable layers) on 40 8x8 inputs; trained-looking random weights."""
  model = MLP(num_classes=3, hidden=(6, 5))
  rng = np.random.default_rng(3)
  x = rng.normal(size=(40, 8, 8, 1)).astype(np.float32)
  y = rng.integers(0, 3, 40).astype(np.int32)
  variables = jax.tree_util.tree_map(np.asarray, model.init(jax.random.PRNGKey(0), x[:1]))
  return model, variables, x, y


@functools.lru_cache(maxsize=None)
def _table():
  """float32 (the programs allocate_bits compiles too): the table, theory per (l, b), additivity at 8 bits."""
  model, variables, x, y = _mlp()
  names = layers.quant_layer_names(model, x[:1])
  table = allocate.sensitivity(model, variables, x, y, GROUPS, 3, names, BITS, batch_size=16)
  direct = {}
  for (i, name), (j, b) in itertools.product(enumerate(names), enumerate(BITS)):
    tree = BitSpec(w_bits=None, layers={name: (b, None)}).bits_tree(names)
    direct[i, j] = theory.second_order_terms(model, variables, tree, x, y, GROUPS, 3, batch_size=16)
  eight = allocate.additivity(model, variables, x, y, GROUPS, 3, table, [{n: 8 for n in names},
                                                                        dict(zip(names, (8, 4, 8)))])
  return table, direct, eight


def test_sensitivity_equals_second_order_terms_of_each_layer_alone():
  table, direct, _ = _table()
  assert table["predicted"].shape == (3, 3, 3) and table["bits"] == list(BITS)
  assert table["layers"] == ["dense0", "dense1", "head"]
  for (i, j), terms in direct.items():
    np.testing.assert_allclose(table["predicted"][:, i, j], terms["second_order"], rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(table["first_order"][:, i, j], terms["first_order"], rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(table["curvature_term"][:, i, j], terms["curvature_term"], rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(table["loss_fp"], terms["loss_fp"], rtol=1e-6)
  assert np.all(np.ptp(table["predicted"], axis=0) > 0)  # the groups really differ
  np.testing.assert_array_equal(table["counts"], [24, 13, 3])


def test_sizes_add_up_to_storage_size_of_the_whole_allocation():
  table, _, _ = _table()
  params = _mlp()[1]["params"]
  assert table["base_bytes"] == 4 * (6 + 5 + 3)  # the biases at float32
  for choice in [(0, 0, 0), (2, 2, 2), (0, 1, 2), (2, 0, 1)]:
    alloc = {n: BITS[j] for n, j in zip(table["layers"], choice)}
    expected = quant.storage_size(params, alloc)["bytes"]
    assert table["base_bytes"] + sum(table["sizes"][i, j] for i, j in enumerate(choice)) == expected


def test_additivity_errors_are_small_at_8_bits():
  _, _, reports = _table()
  for rep in reports:
    scale = np.abs(rep["measured"]).max()
    assert rep["vs_measured"]["max_abs"] < 0.05 * scale + 1e-7, rep
    assert rep["vs_joint"]["max_abs"] < 0.05 * scale + 1e-7, rep
    np.testing.assert_allclose(rep["vs_measured"]["error"], rep["predicted"] - rep["measured"], rtol=1e-12)
    assert rep["vs_measured"]["mean_abs"] <= rep["vs_measured"]["max_abs"]


def _toy_table(seed=0, groups=3):
  rng = np.random.default_rng(seed)
  bits = [2, 4, 8]
  s = rng.exponential(1.0, (groups, 3, 3)) / np.array(bits) ** 2 + rng.normal(0, 0.01, (groups, 3, 3))
  sizes = np.array([[10.0, 20, 40], [30, 60, 120], [5, 10, 20]])
  return {"layers": ["a", "b", "c"], "bits": bits, "predicted": s, "sizes": sizes, "base_bytes": 7.0}


def _brute_force(table, budget, objective, weights=None, lam=1.0):
  best = np.inf
  for choice in itertools.product(range(3), repeat=3):
    size = table["base_bytes"] + sum(table["sizes"][l, b] for l, b in enumerate(choice))
    if size <= budget:
      per_group = sum(table["predicted"][:, l, b] for l, b in enumerate(choice))
      best = min(best, allocate.objective_value(per_group, objective, weights, lam))
  return best


@pytest.mark.parametrize("objective", ["worst_group", "weighted", "mean_plus_worst"])
def test_milp_equals_brute_force(objective):
  for seed in range(3):
    table = _toy_table(seed)
    weights = np.array([0.2, 0.5, 0.3]) if objective == "weighted" else None
    for budget in (52, 70, 100, 120, 170, 187):
      out = allocate.allocate(table, budget, objective=objective, weights=weights, lam=0.5)
      assert out["objective"] == pytest.approx(_brute_force(table, budget, objective, weights, 0.5), abs=1e-9)
      choice = [table["bits"].index(out["bits"][n]) for n in table["layers"]]
      size = table["base_bytes"] + sum(table["sizes"][l, b] for l, b in enumerate(choice))
      assert size <= budget and out["size_bytes"] == int(np.ceil(size))
      np.testing.assert_allclose(out["predicted"], allocate.predicted_for(table, out["bits"]))


def test_budget_too_small_raises_and_generous_budget_picks_largest_bits():
  table = _toy_table()
  with pytest.raises(ValueError, match="smallest possible size 52 bytes"):
    allocate.allocate(table, 51.9)
  with pytest.raises(ValueError, match="objective"):
    allocate.allocate(table, 1000, objective="best")
  table["predicted"] = np.abs(table["predicted"]) / np.array([1.0, 2.0, 4.0])  # more bits, less loss
  for objective in ("worst_group", "weighted", "mean_plus_worst"):
    assert allocate.allocate(table, 1e6, objective=objective)["bits"] == {"a": 8, "b": 8, "c": 8}


def test_fair_and_blind_allocations_differ_when_a_small_group_is_sensitive():
  # Group 1 (5% of the rows) suffers from layer "a" at low bits, group 0 from layer "b"; the budget affords
  # 8 bits for one of them. The whole loss is the count-weighted mean of the groups' losses.
  s = np.zeros((2, 3, 3))
  s[0, 1] = [1.0, 0.3, 0.0]
  s[1, 0] = [10.0, 3.0, 0.0]
  s[:, 2] = [0.1, 0.05, 0.0]
  sizes = np.array([[10.0, 20, 40], [10, 20, 40], [1, 2, 4]])
  fair = {"layers": ["a", "b", "c"], "bits": [2, 4, 8], "predicted": s, "sizes": sizes, "base_bytes": 0.0}
  blind = {**fair, "predicted": np.tensordot(np.array([0.95, 0.05]), s, 1)[None]}
  out_fair, out_blind = allocate.allocate(fair, 62), allocate.allocate(blind, 62)
  assert out_fair["bits"]["a"] == 8 and out_blind["bits"]["b"] == 8 and out_fair["bits"] != out_blind["bits"]
  assert allocate.predicted_for(fair, out_fair["bits"]).max() < allocate.predicted_for(fair, out_blind["bits"]).max()


def test_allocate_bits_returns_a_bitspec_within_budget():
  model, variables, x, y = _mlp()
  names = layers.quant_layer_names(model, x[:1])
  budget = quant.storage_size(variables["params"], layers.weight_bits_by_layer(BitSpec.uniform(4), names))["bytes"]
  for fair in (True, False):
    spec = allocate.allocate_bits(model, variables, x, y, GROUPS, budget, candidate_bits=BITS, fair=fair,
                                  batch_size=16)
    assert isinstance(spec, BitSpec) and spec.w_bits is None
    resolved = spec.resolve(names)
    assert set(resolved) == set(names) and all(a is None and w in BITS for w, a in resolved.values())
    assert quant.storage_size(variables["params"], layers.weight_bits_by_layer(spec, names))["bytes"] <= budget


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
  from studies import tiny_study_config  # the module-scoped fixture cannot use the function-scoped tiny_config
  config = tiny_study_config()
  config.seeds = (0,)
  workdir = str(tmp_path_factory.mktemp("alloc_study"))
  runner.run(config, workdir, ["train"], progress=False)
  return workdir


def test_cli_prints_bits_and_rejects_impossible_budget(trained_workdir, capsys):
  assert allocate.main([trained_workdir, "--budget_kb", "12"]) == 0
  out = capsys.readouterr().out
  for name in ("conv1", "conv2", "conv3", "head"):  # 12 KB exceeds the float32 model: any bits fit
    assert re.search(rf"^  {name} +[2348] bits$", out, re.M), out
  assert "predicted excess loss per group: g0" in out and "g2" in out
  assert allocate.main([trained_workdir, "--budget_kb", "0.1", "--blind", "--bits", "2,4"]) == 2
  err = capsys.readouterr().err
  assert "smallest possible size" in err and len(err.strip().splitlines()) == 1
  assert allocate.main([trained_workdir, "--budget_kb", "12", "--seed", "5"]) == 2
  assert "no finished training checkpoint for seed 5" in capsys.readouterr().err


def test_cli_module_exits_2_for_a_missing_workdir(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "fqjax.study.allocate", str(tmp_path / "nope"), "--budget_kb", "12"],
                        capture_output=True, text=True, timeout=120, cwd=os.path.dirname(os.path.dirname(__file__)))
  assert proc.returncode == 2 and "does not exist" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
