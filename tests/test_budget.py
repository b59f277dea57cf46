"""Step budgets, hardness signals and their smoothing, equal-size bits, the selection grid and run_entry."""
import collections
import math

import jax
import ml_collections
import numpy as np
import pytest
from scipy.special import logsumexp

from fqjax.quantization import layers, quant
from fqjax.training import losses, train
from fqjax.study import mitigate
from fqjax.study.schemes import quantization_for
from fqjax.study.seed import TrainedSeed
from fqjax.quantization.bitspec import BitSpec, weight_bits_by_layer
from fqjax.study.config import base_config
from fqjax.data import from_arrays
from fqjax.models import MLP, SmallCNN

GROUPS = np.repeat([0, 1, 2], [50, 30, 10])


def _tcfg(**kw):
  t = base_config().train
  for k, v in kw.items():
    t[k] = v
  return t


def _rows(tcfg, epoch=0, seed=0):
  return train._epoch_rows(None, 3, GROUPS, tcfg, seed, epoch)


# --- rows_per_epoch ---

def test_rows_per_epoch_cuts_a_longer_draw_to_a_seeded_subset_of_it():
  """Oversampling draws 150 rows; R = 90 keeps exactly 90 of them (a sub-multiset), the same for the same
  (seed, epoch) and another for another epoch."""
  draw = _rows(_tcfg(sampling="oversample"))
  assert len(draw) == 150
  cut = _rows(_tcfg(sampling="oversample", rows_per_epoch=90))
  assert len(cut) == 90
  assert not collections.Counter(cut.tolist()) - collections.Counter(draw.tolist())  # every row from the draw
  np.testing.assert_array_equal(cut, _rows(_tcfg(sampling="oversample", rows_per_epoch=90)))
  assert not np.array_equal(cut, _rows(_tcfg(sampling="oversample", rows_per_epoch=90), epoch=1))
  assert not np.array_equal(cut, _rows(_tcfg(sampling="oversample", rows_per_epoch=90), seed=1))


def test_rows_per_epoch_pads_a_shorter_draw_with_seeded_repeats():
  """Undersampling draws 30 rows; R = 90 keeps the draw first and adds 60 repeats of its rows, deterministically."""
  draw = _rows(_tcfg(sampling="undersample"))
  assert len(draw) == 30
  padded = _rows(_tcfg(sampling="undersample", rows_per_epoch=90))
  assert len(padded) == 90
  np.testing.assert_array_equal(padded[:30], draw)
  assert set(padded[30:].tolist()) <= set(draw.tolist())
  np.testing.assert_array_equal(padded, _rows(_tcfg(sampling="undersample", rows_per_epoch=90)))
  assert not np.array_equal(padded, _rows(_tcfg(sampling="undersample", rows_per_epoch=90), epoch=1))


def test_rows_per_epoch_equal_to_the_draw_and_none_change_nothing():
  """R equal to the draw's length, or no R, returns the draw itself; without sampling, every row in order."""
  draw = _rows(_tcfg(sampling="oversample"))
  np.testing.assert_array_equal(_rows(_tcfg(sampling="oversample", rows_per_epoch=150)), draw)
  split = np.zeros(90)
  np.testing.assert_array_equal(train._epoch_rows(split, 3, GROUPS, _tcfg(), 0, 0), np.arange(90))
  sub = train._epoch_rows(split, 3, GROUPS, _tcfg(rows_per_epoch=40), 0, 0)
  assert len(sub) == 40 and len(set(sub.tolist())) == 40  # no row twice from a draw without repeats


@pytest.fixture(scope="module")
def tabular():
  """Three groups of 2-D features (group 2 the minority and noisiest), an MLP with 4 hidden units, its untrained
  variables."""
  rng = np.random.default_rng(0)
  group = np.repeat([0, 1, 2], [120, 60, 20])
  y = rng.integers(0, 2, size=len(group))
  x = (rng.normal(size=(len(group), 2)) * (1 + 0.5 * group[:, None]) + 2.0 * y[:, None]).astype(np.float32)
  splits = from_arrays(x, y, group)
  model = MLP(num_classes=2, hidden=(4,))
  variables = {"params": model.init(jax.random.PRNGKey(0), splits.train.x[:2])["params"], "batch_stats": {}}
  return splits, model, variables


def test_fit_steps_under_a_row_budget(tabular, tmp_path):
  """With rows_per_epoch = R, fit runs epochs * ceil(R / batch) steps whatever the sampler draws: the same
  as plain training on R rows; the history records per-epoch steps and the hardness signal."""
  splits, model, variables = tabular
  n = len(splits.train)
  common = dict(epochs=2, batch_size=16, learning_rate=0.01, warmup_epochs=0.0)
  over = _tcfg(sampling="oversample", rows_per_epoch=n, **common)
  draw = train._epoch_rows(splits.train, 3, splits.train.group, _tcfg(sampling="oversample"), 0, 0)
  assert math.ceil(len(draw) / 16) > math.ceil(n / 16)  # without the budget it would take more steps
  out = train.fit(model, splits, over, 0, str(tmp_path / "over"), train.FineTuning(init_variables=variables),
                  progress=False)
  plain = train.fit(model, splits, _tcfg(**common), 0, str(tmp_path / "plain"),
                    train.FineTuning(init_variables=variables), progress=False)
  assert out["steps"] == 2 * math.ceil(n / 16) == plain["steps"]
  assert [h["steps"] for h in out["history"]] == [math.ceil(n / 16)] * 2
  assert sum(out["sample_counts"]) == n
  for h in out["history"]:
    assert len(h["hardness_signal"]) == 3 and all(0 <= s <= over.hardness_cap for s in h["hardness_signal"])


# --- hardness signals ---

def _ce(logits, y):
  return logsumexp(logits, axis=1) - logits[np.arange(len(y)), y]


def test_hardness_signal_by_hand_for_each_source():
  """capped_loss = mean min(ce, cap), error_rate = 1 - accuracy, loss = mean ce, per id; an id without rows -> 0."""
  logits = np.array([[2.0, 0.0], [0.0, 9.0], [1.0, 1.5], [-3.0, 3.0], [0.5, 0.0]])
  y = np.array([0, 0, 1, 0, 1])
  ids = np.array([0, 0, 1, 1, 3])  # id 2 has no row
  ce = _ce(logits, y)
  cap = 2.5
  by_id = lambda v: np.array([v[:2].mean(), v[2:4].mean(), 0.0, v[4]])
  out = {s: losses.hardness_signal(logits, y, ids, 4, ml_collections.ConfigDict(
      {"hardness_source": s, "hardness_cap": cap})) for s in ("capped_loss", "error_rate", "loss")}
  np.testing.assert_allclose(out["loss"], by_id(ce), rtol=1e-10)
  np.testing.assert_allclose(out["capped_loss"], by_id(np.minimum(ce, cap)), rtol=1e-10)
  np.testing.assert_allclose(out["error_rate"], [0.5, 0.5, 0.0, 1.0])
  assert (out["capped_loss"] <= cap).all() and out["loss"][0] > cap  # the cap bites on id 0's 9-logit miss
  assert ((out["error_rate"] >= 0) & (out["error_rate"] <= 1)).all()
  assert all(o.dtype == np.float64 and o.shape == (4,) for o in out.values())


def test_collapsed_model_gets_bounded_weights_only_from_the_capped_signal():
  """A collapsed model (an MLP head predicting class 0, logits scaled by 1e4) has losses of 1e4..1e7.
  The capped signal gives finite hardness weights below the worst case of any signal in [0, cap] (all of the
  cap on the smallest group); the uncapped loss lets one outlier row dominate: a far more extreme table."""
  # Groups 0 and 1: half the rows are class 1 at margin 1 (loss 1e4); group 2: one class-1 row at margin 1000.
  x = np.array([1.0] * 20 + [1.0] * 20 + [1.0] * 9 + [1000.0], np.float32)[:, None]
  y = np.array(([0] * 5 + [1] * 5) * 4 + [0] * 9 + [1])
  ids = np.repeat([0, 1, 2], [20, 20, 10])
  model = MLP(num_classes=2, hidden=())
  params = {"head": {"kernel": np.array([[1e4, 0.0]], np.float32), "bias": np.zeros(2, np.float32)}}
  logits = train.predict(model, {"params": params}, x)
  assert (logits.argmax(-1) == 0).all() and logits.max() >= 1e6  # collapsed, with huge losses
  counts = np.array([200, 200, 20])  # training rows per group
  floor, power, cap = 0.1, 1.0, 3.0
  signal = lambda source: losses.hardness_signal(logits, y, ids, 3, ml_collections.ConfigDict(
      {"hardness_source": source, "hardness_cap": cap}))
  table = lambda s: np.asarray(losses.weight_table("hardness", counts, group_losses=s, power=power, floor=floor))
  capped, raw = signal("capped_loss"), signal("loss")
  np.testing.assert_allclose(capped, [1.5, 1.5, 0.3], rtol=1e-6)
  w_capped, w_raw = table(capped), table(raw)
  assert np.isfinite(w_capped).all() and np.isfinite(w_raw).all()
  # Worst case over signals in [0, cap]: all of the cap on one group, 0 elsewhere; the smallest group gains most.
  bound = max(table(cap * np.eye(3)[g])[g] for g in range(3))
  assert bound == pytest.approx(floor + (1 - floor) * counts.sum() / counts.min(), rel=1e-5)
  assert w_capped.max() <= bound and w_capped.min() >= floor
  assert np.sum(counts * w_capped) / counts.sum() == pytest.approx(1.0, rel=1e-5)
  assert (w_raw.max() / w_raw.min()) > 5 * (w_capped.max() / w_capped.min())
  assert w_raw.argmax() == 2 and w_capped.argmax() != 2  # the one outlier row decides the uncapped table


def test_smoothed_is_an_ema_and_ema_1_is_the_identity():
  """smoothed = ema * signal + (1 - ema) * previous; no previous -> the signal; ema = 1 keeps no memory."""
  prev, sig = np.array([1.0, 2.0, 0.0]), np.array([3.0, 6.0, 1.0])
  cfg = lambda ema: ml_collections.ConfigDict({"hardness_ema": ema})
  np.testing.assert_allclose(losses.smoothed_hardness(prev, sig, cfg(0.5)), [2.0, 4.0, 0.5])
  np.testing.assert_allclose(losses.smoothed_hardness(prev, sig, cfg(0.25)), 0.25 * sig + 0.75 * prev)
  np.testing.assert_array_equal(losses.smoothed_hardness(None, sig, cfg(0.25)), sig)
  np.testing.assert_array_equal(losses.smoothed_hardness(prev, sig, cfg(1.0)), sig)
  np.testing.assert_array_equal(losses.smoothed_hardness(np.array([1e9, 0, 7]), sig, cfg(1.0)), sig)
  np.testing.assert_array_equal(losses.smoothed_hardness(prev, sig, ml_collections.ConfigDict()), sig)  # default ema 1
  # Two steps: the first signal's share decays by (1 - ema) per epoch.
  s1 = losses.smoothed_hardness(None, np.array([4.0]), cfg(0.5))
  s2 = losses.smoothed_hardness(s1, np.array([0.0]), cfg(0.5))
  assert losses.smoothed_hardness(s2, np.array([0.0]), cfg(0.5))[0] == pytest.approx(1.0)


# --- equal-size bits, the grid, checkpoint names ---

def test_equal_size_bits_is_the_smallest_uniform_width_at_least_as_large_as_mixed_precision():
  """SmallCNN: mixed precision at 4 bits with 8-bit edges -> b with size(b) >= size(mp) > size(b - 1)."""
  model = SmallCNN(num_classes=2, width=2)
  sample = np.zeros((2, 8, 8, 1), np.float32)
  params = model.init(jax.random.PRNGKey(0), sample)["params"]
  names = layers.quant_layer_names(model, sample)
  m = base_config().mitigate
  assert m.edge_bits == 8
  size = lambda spec: quant.storage_size(params, weight_bits_by_layer(spec, names))["bytes"]
  mp = size(BitSpec.first_last(4, edge_bits=8))
  b = mitigate.equal_size_bits(4, m, params, names)
  assert 4 < b < 8
  assert size(BitSpec.uniform(b)) >= mp > size(BitSpec.uniform(b - 1))
  spec = mitigate.method_spec("qat_equal_size", 4, m, params, names)
  assert spec.w_bits == b and not spec.layers
  assert mitigate.equal_size_bits(8, m, params, names) == 8  # edges at the target: mp is uniform
  assert mitigate.method_spec("fair_ft", 4, m).w_bits is None


def test_grid_settings_are_the_cartesian_product_in_grid_order():
  """Every combination once; the first field (fields in the ConfigDict's sorted order) varies slowest."""
  m = base_config().mitigate
  m.grid = ml_collections.ConfigDict({"learning_rate": (0.01, 0.03), "epochs": (1, 2, 3)})
  got = mitigate.grid_settings(m)
  assert got == [{"epochs": e, "learning_rate": lr} for e in (1, 2, 3) for lr in (0.01, 0.03)]
  assert [mitigate.setting_label(s) for s in got[:2]] == ["epochs=1,learning_rate=0.01", "epochs=1,learning_rate=0.03"]
  m.grid = ml_collections.ConfigDict()
  assert mitigate.grid_settings(m) == [{}] and mitigate.setting_label({}) == "default"


def test_checkpoint_name_shares_fair_ft_across_bit_widths():
  """fair_ft is full precision: one folder for all bit-widths; quantized methods get one per bit-width."""
  assert mitigate.checkpoint_name("fair_ft", 4) == mitigate.checkpoint_name("fair_ft", 2) == "fair_ft"
  assert mitigate.checkpoint_name("qat", 4) == "qat_w4" != mitigate.checkpoint_name("qat", 2)
  assert mitigate.checkpoint_name("qat_equal_size", 4) == "qat_equal_size_w4"


def test_qat_train_config_applies_the_budget_and_the_setting():
  """budget "steps": rows_per_epoch = training rows; "epochs": None. A grid setting overrides (typed) fields."""
  m = base_config().mitigate
  t = mitigate.qat_train_config("sampling_qat", m, base_config().train, {"learning_rate": 1, "epochs": 3}, 123)
  assert t.rows_per_epoch == 123 and t.sampling == m.sampling and t.loss_weights == "uniform"
  assert t.learning_rate == 1.0 and isinstance(t.learning_rate, float) and t.epochs == 3
  assert t.hardness_source == m.hardness_source and t.hardness_ema == m.hardness_ema
  m.budget = "epochs"
  assert mitigate.qat_train_config("fairqat", m, base_config().train, None, 123).rows_per_epoch is None


# --- run_entry ---

@pytest.fixture(scope="module")
def entries(tabular, tmp_path_factory):
  """run_entry for qat, sampling_qat, fair_ft and ptq at 4 bits with a 2-point learning-rate grid."""
  splits, model, variables = tabular
  c = base_config()
  m = c.mitigate
  m.epochs, m.batch_size = 1, 32
  m.grid = ml_collections.ConfigDict({"learning_rate": (0.0001, 0.3)})
  assert m.budget == "steps"
  info = splits.info
  fp_test = train.evaluate(model, variables, splits.test, info.num_groups, group_is_label=info.group_is_label)
  names = layers.quant_layer_names(model, splits.train.x[:2])
  root = tmp_path_factory.mktemp("mitigate")
  out = {}
  trained = TrainedSeed(model=model, variables=variables, splits=splits, layer_names=tuple(names), seed=0)
  for method in ("qat", "sampling_qat", "fair_ft", "ptq"):
    folder = str(root / mitigate.checkpoint_name(method, 4))
    out[method] = mitigate.run_entry(trained, c, method, 4, folder, fp_test=fp_test)
    out[method]["folder"] = folder
  return {"out": out, "config": c, "splits": splits, "model": model, "names": names}


def test_selection_keeps_the_best_validation_worst_group_setting(entries):
  """"selection" lists both settings with their validation numbers; "chosen" is the best (val worst-group
  accuracy, then val accuracy, then grid order) and its checkpoint is what the test metrics come from."""
  for method in ("qat", "sampling_qat", "fair_ft"):
    sel = entries["out"][method]["selection"]
    assert sel["metric"] == "val_worst_group_accuracy"
    assert [row["setting"] for row in sel["grid"]] == [{"learning_rate": 0.0001}, {"learning_rate": 0.3}]
    for row in sel["grid"]:
      assert 0 <= row["val_worst_group_accuracy"] <= row["val_accuracy"] <= 1
    best = max(sel["grid"][::-1], key=lambda r: (r["val_worst_group_accuracy"], r["val_accuracy"]))
    assert sel["chosen"] == best["setting"]
  # Not vacuous: the learning rate that trains wins somewhere (here on the val-accuracy tie-break).
  assert any(entries["out"][mth]["selection"]["chosen"] == {"learning_rate": 0.3} for mth in ("qat", "fair_ft"))
  # The chosen checkpoint, reloaded and evaluated on test, gives the entry's test numbers.
  e, c, splits = entries, entries["config"], entries["splits"]
  qat = e["out"]["qat"]
  chosen = qat["selection"]["chosen"]
  tcfg = mitigate.qat_train_config("qat", c.mitigate, c.train, chosen, len(splits.train))
  folder = f"{qat['folder']}/{mitigate.setting_label(chosen)}"
  qmodel = quantization_for(c, method="qat").apply(e["model"])
  loaded = train.load_trained(qmodel, splits, tcfg, 0, folder)
  bits = BitSpec.uniform(4).bits_tree(e["names"])
  again = train.evaluate(qmodel, {**loaded["variables"], "bits": bits}, splits.test, splits.info.num_groups,
                         group_is_label=splits.info.group_is_label)
  assert again["accuracy"] == pytest.approx(qat["accuracy"])
  assert again["loss"] == pytest.approx(qat["loss"])
  val = train.evaluate(qmodel, {**loaded["variables"], "bits": bits}, splits.val, splits.info.num_groups,
                       group_is_label=splits.info.group_is_label)
  row = next(r for r in qat["selection"]["grid"] if r["setting"] == chosen)
  assert val["worst_group_accuracy"] == pytest.approx(row["val_worst_group_accuracy"])


def test_steps_budget_equalizes_qat_and_resampled_qat(entries):
  """Under budget "steps", sampling_qat (whose fairqat draw has another length) runs qat's steps:
  epochs * ceil(training rows / batch); every grid setting too."""
  out, splits, m = entries["out"], entries["splits"], entries["config"].mitigate
  expected = m.epochs * math.ceil(len(splits.train) / m.batch_size)
  draw = train._epoch_rows(splits.train, 3, splits.train.group,
                           mitigate.qat_train_config("sampling_qat", m, entries["config"].train), 0, 0)
  # The sampler alone would change the step count.
  assert math.ceil(len(draw) / m.batch_size) != math.ceil(len(splits.train) / m.batch_size)
  for method in ("qat", "sampling_qat", "fair_ft"):
    assert out[method]["steps"] == expected
    assert all(row["steps"] == expected for row in out[method]["selection"]["grid"])


def test_fair_ft_is_full_precision_and_ptq_trains_nothing(entries, tabular):
  """fair_ft: w_bits None, size = 4 bytes per parameter; qat: 4 bits and smaller; ptq: 0 steps, no selection."""
  out = entries["out"]
  _, _, variables = tabular
  n_params = sum(int(np.size(a)) for a in jax.tree_util.tree_leaves(variables["params"]))
  assert out["fair_ft"]["w_bits"] is None and out["fair_ft"]["size_bytes"] == 4 * n_params
  assert out["qat"]["w_bits"] == 4 and out["qat"]["size_bytes"] < out["fair_ft"]["size_bytes"]
  assert out["ptq"]["steps"] == 0 and "selection" not in out["ptq"] and out["ptq"]["w_bits"] == 4
  assert out["fair_ft"]["folder"].endswith("/fair_ft")


def test_selection_tie_breaks_with_stubbed_training(tabular, monkeypatch, tmp_path):
  """With fit stubbed to report given validation numbers: higher worst-group accuracy wins, then higher
  accuracy, then the earlier setting; a NaN worst-group accuracy never wins. "steps" is the chosen one's."""
  splits, model, variables = tabular
  c = base_config()
  c.mitigate.grid = ml_collections.ConfigDict({"learning_rate": (0.1, 0.2, 0.3, 0.4)})
  names = layers.quant_layer_names(model, splits.train.x[:2])
  info = splits.info
  fp_test = train.evaluate(model, variables, splits.test, info.num_groups, group_is_label=info.group_is_label)

  def run(scores):
    def fake_fit(model, splits, tcfg, seed, folder, start, **kw):
      wga, acc, steps = scores[tcfg.learning_rate]
      return {"variables": dict(start.init_variables), "steps": steps,
              "history": [{"val_worst_group_accuracy": wga, "val_accuracy": acc}]}
    monkeypatch.setattr(train, "fit", fake_fit)
    trained = TrainedSeed(model=model, variables=variables, splits=splits, layer_names=tuple(names), seed=0)
    out = mitigate.run_entry(trained, c, "qat", 4, str(tmp_path), fp_test=fp_test)
    return out["selection"]["chosen"]["learning_rate"], out["steps"]

  assert run({0.1: (0.5, 0.9, 1), 0.2: (0.6, 0.6, 2), 0.3: (0.6, 0.8, 3), 0.4: (0.6, 0.7, 4)}) == (0.3, 3)
  assert run({0.1: (0.5, 0.9, 1), 0.2: (0.6, 0.8, 2), 0.3: (0.6, 0.8, 3), 0.4: (0.2, 0.9, 4)}) == (0.2, 2)
  assert run({0.1: (float("nan"), 0.9, 1), 0.2: (0.1, 0.1, 2), 0.3: (None, 1.0, 3), 0.4: (0.0, 0.2, 4)}) == (0.2, 2)
