"""fqjax.analysis.tables on hand-built results: exact strings for a 2-bit-width, 2-group study, empty cells,
unfinished stages, and that the tables read the stored summaries (never per-seed entries)."""
import json

import pytest

from fqjax.analysis import tables


def _ms(mean, std=0.0, n=2):
  return {"mean": mean, "std": std, "n": n}


NO_DATA = {"mean": None, "std": None, "n": 0}  # as results.json stores a summary with no value behind it


def _results():
  summary = {
      "32": {"size_bytes": _ms(4096), "accuracy": _ms(0.9, 0.01), "worst_group_accuracy": _ms(0.85, 0.02),
             "fairness_violation": _ms(0.1, 0.005), "groups": {"accuracy": [_ms(0.95, 0.01), _ms(0.85, 0.02)]}},
      "4": {"size_bytes": _ms(512), "accuracy": _ms(0.8, 0.1), "worst_group_accuracy": {"mean": 0.6, "n": 1},
            "fairness_violation": NO_DATA, "groups": {"accuracy": [_ms(0.8, 0.1), NO_DATA]}},
  }
  # per_seed carries numbers unlike the summary: a table that re-aggregated would show them.
  per_seed = {s: {"32": {"size_bytes": 1, "accuracy": 0.0}, "4": {"size_bytes": 1, "accuracy": 0.0}}
              for s in ("0", "1")}
  mitigate = {"methods": ["ptq", "fairqat"], "bit_widths": [4], "per_seed": {},
              "summary": {"ptq": {"4": {"accuracy": _ms(0.7, 0.02), "worst_group_accuracy": _ms(0.5, 0.05),
                                        "fairness_violation": _ms(0.3, 0.01), "size_bytes": _ms(512),
                                        "steps": _ms(0), "train_s": _ms(0.01), "w_bits": 4}},
                          "fairqat": {"4": {"accuracy": _ms(0.75, 0.01), "worst_group_accuracy": NO_DATA,
                                            "fairness_violation": _ms(0.2, 0.03), "size_bytes": _ms(700),
                                            "steps": _ms(120), "train_s": _ms(12.34, 0.5), "w_bits": None}}},
              "best": {"4": {"accuracy": "fairqat", "worst_group_accuracy": "ptq", "fairness_violation": "fairqat",
                             "size_bytes": "ptq", "steps": "ptq", "train_s": "ptq"}}}
  claims = {"rules": "the rules", "fairness_violation_grows_as_bits_shrink": {"verdict": "holds", "why": ""},
            "fairqat_beats_ptq_and_qat": {"verdict": "not tested", "why": "the mitigate stage did not run"}}
  return {"seeds": [0, 1], "dataset": {"group_names": ["young", "older_adults"]},
          "ptq": {"bit_widths": [32, 4], "per_seed": per_seed, "summary": summary}, "mitigate": mitigate,
          "claims": claims}


PTQ_TABLE = "\n".join([
    "bits  size KB       accuracy    worst group  fairness viol.     young older_ad",
    "  32      4.0    0.900±0.010    0.850±0.020     0.100±0.005     0.950    0.850",
    "   4      0.5    0.800±0.100          0.600           empty     0.800    empty",
])
ABLATION_TABLE = "\n".join([
    "bits method              accuracy    worst group  fairness viol.  size KB  steps  train s",
    "   4 ptq             0.700±0.020    0.500±0.050*    0.300±0.010       0.5      0      0.0",
    "   4 fairqat         0.750±0.010*         empty     0.200±0.030*      0.7    120     12.3",
])


def test_ptq_table_exact():
  assert tables.ptq_table(_results()) == PTQ_TABLE


def test_ablation_table_exact_with_best_marks_and_an_empty_cell():
  assert tables.ablation_table(_results()["mitigate"]) == ABLATION_TABLE


def test_ablation_table_names_the_weight_bits_used_where_not_the_target():
  section = _results()["mitigate"]
  section["methods"].append("qat_equal_size")
  section["summary"]["qat_equal_size"] = {"4": {**section["summary"]["fairqat"]["4"], "w_bits": 5,
                                                "steps": _ms(119.6)}}
  lines = tables.ablation_table(section).splitlines()
  assert lines[3] == "   4 qat_equal_size (5b)   0.750±0.010          empty     0.200±0.030       0.7    120     12.3"
  assert lines[1].startswith("   4 " + "ptq".ljust(len("qat_equal_size (5b)")) + "   0.700±0.020 ")  # widened
  assert len({len(line) for line in lines}) == 1  # every column still lines up


def test_ablation_table_of_the_tiny_study(tiny_study):
  """Steps are the stored summary's mean; a method run at other bits than the target names them."""
  section = tiny_study["results"]["mitigate"]
  lines = tables.ablation_table(section).splitlines()
  header = lines[0]
  end = header.index(" steps ") + len(" steps")  # the steps column is right-aligned under its header
  rows = iter(lines[1:])
  for b in section["bit_widths"]:
    for method in section["methods"]:
      s, line = section["summary"][method][str(b)], next(rows)
      assert line[end - 6:end].strip() == f"{s['steps']['mean']:.0f}", line
      w = s.get("w_bits")
      used = f"{method} ({w}b)" if isinstance(w, int) and w != b else method
      assert line[5:].startswith(used + " "), line  # e.g. 'qat_equal_size (5b)' where it needed 5 bits


def test_tables_read_back_from_json_are_the_same():
  res = json.loads(json.dumps(_results()))
  assert tables.ptq_table(res) == PTQ_TABLE and tables.ablation_table(res["mitigate"]) == ABLATION_TABLE
  nan = _results()  # NaN in memory (before the results file turns it into null) is empty as well
  nan["ptq"]["summary"]["4"]["fairness_violation"] = {"mean": float("nan"), "std": float("nan"), "n": 0}
  assert tables.ptq_table(nan) == PTQ_TABLE


def test_claims_lines():
  assert tables.claims_lines(_results()) == ("  fairness_violation_grows_as_bits_shrink: holds\n"
                                             "  fairqat_beats_ptq_and_qat: not tested (the mitigate stage did not run)")
  assert tables.claims_lines({}) == ""


def test_size_falls_back_on_the_first_seed_for_older_summaries():
  res = _results()
  del res["ptq"]["summary"]["4"]["size_bytes"]
  res["ptq"]["per_seed"]["0"]["4"]["size_bytes"] = 2048
  assert tables.ptq_size_bytes(res, 4) == 2048 and tables.ptq_size_bytes(res, "32") == 4096
  assert tables.ptq_table(res).splitlines()[2].startswith("   4      2.0 ")
  del res["ptq"]["per_seed"]["0"]["4"]["size_bytes"]
  assert tables.ptq_size_bytes(res, 4) is None
  assert tables.ptq_table(res).splitlines()[2].startswith("   4    empty ")


def test_missing_and_unfinished_stages():
  assert tables.ptq_table({"seeds": [0]}) == "(no ptq results)"
  res = _results()
  del res["ptq"]["summary"], res["mitigate"]["summary"]
  assert tables.ptq_table(res) == tables.UNFINISHED.format(stage="ptq")
  assert tables.ablation_table(res["mitigate"]) == tables.UNFINISHED.format(stage="mitigate")
  assert "has not finished" in tables.ptq_table(res)


@pytest.mark.parametrize("ms,kwargs,expected", [
    (_ms(0.5, 0.01), {}, "0.500±0.010"),
    (_ms(0.5, None), {}, "0.500"),
    ({"mean": 0.5, "std": float("nan")}, {}, "0.500"),
    (NO_DATA, {}, "empty"),
    (None, {}, "empty"),
    ({"mean": "n/a"}, {}, "empty"),
    (_ms(2048, 512), {"fmt": "{:.1f}", "sep": " ± ", "scale": 1 / 1024}, "2.0 ± 0.5"),
])
def test_mean_std_cell(ms, kwargs, expected):
  assert tables.mean_std_cell(ms, **kwargs) == expected


def test_dig_and_finite():
  node = {"a": {"4": {"b": 1}}}
  assert tables.dig(node, "a", 4, "b") == 1 and tables.dig(node, "a", "8") is None and tables.dig(node, "a", 4, "b",
                                                                                                   "c") is None
  assert tables.finite("2.5") == 2.5
  assert [tables.finite(x) for x in (None, float("nan"), float("inf"), "x")] == [None] * 4
