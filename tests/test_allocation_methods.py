"""The allocation methods of the ablation (fair_alloc, blind_alloc and their QAT versions) through the runner, their
claim and report parts, and the per-group spectral density in the explain stage."""
import json
import os

import numpy as np

from fqjax.study import allocate, runner
from fqjax import report


def test_allocation_methods_run_at_the_mixed_precision_budget(tiny_study, tiny_study_copy, tiny_config, monkeypatch):
  """Each allocation entry records its per-layer bits within the byte budget of mixed precision at the target;
  the sensitivity table is computed once per seed and kind (fair / blind), whatever the number of methods."""
  calls = []
  real = allocate.sensitivity
  monkeypatch.setattr(allocate, "sensitivity", lambda *a, **k: calls.append(a[5]) or real(*a, **k))
  c = tiny_config()
  c.mitigate.methods = ("mp_qat", "blind_alloc", "fair_alloc", "fair_alloc_qat")
  res = runner.run(c, tiny_study_copy, ["train", "mitigate"], progress=False)
  m = res["mitigate"]
  assert sorted(calls) == [1, 1, 3, 3]  # blind: one group of every row; fair: the 3 groups; once per seed each
  names = res["model"]["layer_names"]
  for seed in ("0", "1"):
    mp = m["per_seed"][seed]["mp_qat"]["4"]
    for method in ("blind_alloc", "fair_alloc", "fair_alloc_qat"):
      entry = m["per_seed"][seed][method]["4"]
      alloc = entry["allocation"]
      assert list(alloc["layer_bits"]) == names and set(alloc["layer_bits"].values()) <= {2, 3, 4, 8}
      assert alloc["budget_bytes"] == mp["size_bytes"] and entry["size_bytes"] <= alloc["budget_bytes"]
      assert len(alloc["predicted_excess_loss"]) == (1 if method == "blind_alloc" else 3)
    assert m["per_seed"][seed]["fair_alloc"]["4"]["steps"] == 0
    assert m["per_seed"][seed]["fair_alloc_qat"]["4"]["steps"] == mp["steps"] > 0
    # The QAT version starts from the same allocation as the PTQ one.
    assert (m["per_seed"][seed]["fair_alloc_qat"]["4"]["allocation"]["layer_bits"]
            == m["per_seed"][seed]["fair_alloc"]["4"]["allocation"]["layer_bits"])
  claim = res["claims"]["fair_allocation_beats_group_blind"]
  assert list(claim["judgements"]) == ["mitigate | ptq"]  # blind_alloc_qat was not run: no qat pair
  assert claim["judgements"]["mitigate | ptq"]["verdict"] in ("holds", "partly", "does not hold", "inconclusive")
  out = report.write_report(tiny_study_copy, res)
  md = open(out["markdown"]).read()
  assert "**Per-layer bits of the allocation methods**" in md
  assert sum(line.startswith("| fair_alloc | 4 |") for line in md.splitlines()) == 1


def test_explain_records_each_groups_spectral_density(tiny_study):
  """At the density bit-widths (32 in the tiny study) each group has a density on one common grid; the report
  draws it."""
  e = tiny_study["results"]["explain"]
  for seed in ("0", "1"):
    d = e["per_seed"][seed]["32"]["curvature"]["density"]
    grid = np.asarray(d["grid"])
    assert len(d["density"]) == 3 and all(len(row) == len(grid) for row in d["density"])
    for row in d["density"]:
      assert np.all(np.asarray(row) >= 0) and abs(np.trapezoid(row, grid) - 1.0) < 0.05
    assert "density" not in e["per_seed"][seed]["2"]["curvature"]  # 2 bits is not a density bit-width here
  assert os.path.isfile(os.path.join(tiny_study["workdir"], "figures", "explain_density.png"))
