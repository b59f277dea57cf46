"""Mitigation: QAT variants run through the runner, BN freezing, LSQ scales, the ablation summary."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fqjax.quantization import layers
from fqjax.analysis import summaries
from fqjax.study import mitigate, runner
from fqjax.outputs import results
from fqjax.analysis import tables
from fqjax.training import train
from fqjax.quantization.layers import BitSpec, QuantRule
from fqjax.models import SmallCNN


def test_ablation_section(tiny_run):
  workdir, res = tiny_run
  m = res["mitigate"]
  assert m["methods"] == ["ptq", "qat", "lsq_qat", "mp_qat", "fairqat"]
  for method in m["methods"]:
    entry = m["per_seed"]["0"][method]["4"]
    assert 0.0 <= entry["accuracy"] <= 1.0
    assert len(entry["groups"]["accuracy"]) == 3
    assert entry["train_s"] >= 0
  ptq_entry = m["per_seed"]["0"]["ptq"]["4"]
  assert ptq_entry["steps"] == 0 and "selection" not in ptq_entry  # PTQ trains nothing (it re-estimates BatchNorm)
  steps = {m["per_seed"]["0"][method]["4"]["steps"] for method in m["methods"] if method != "ptq"}
  assert len(steps) == 1 and steps.pop() > 0  # the same optimizer steps for every training method
  # Mixed precision keeps first/last layer at 8 bits: larger than uniform 4-bit, smaller than float32.
  s = m["summary"]
  assert s["mp_qat"]["4"]["size_bytes"]["mean"] > s["qat"]["4"]["size_bytes"]["mean"]
  assert s["fairqat"]["4"]["size_bytes"]["mean"] == s["mp_qat"]["4"]["size_bytes"]["mean"]
  assert set(m["best"]["4"]) == {c for c, _ in summaries.TABLE_COLUMNS}
  best_fv = m["best"]["4"]["fairness_violation"]
  assert s[best_fv]["4"]["fairness_violation"]["mean"] == min(s[k]["4"]["fairness_violation"]["mean"]
                                                               for k in m["methods"])
  assert "claims" in res and res["claims"]["fairqat_beats_ptq_and_qat"]["verdict"] != "not tested"
  results.validate(results.read_json(f"{workdir}/results.json"))
  table = tables.ablation_table(m)
  assert "fairqat" in table and "*" in table


def test_mitigate_is_restartable_and_skips_done_entries(tiny_run, tiny_study_copy, tiny_config):
  _, res = tiny_run
  again = runner.run(tiny_config(), tiny_study_copy, ["mitigate"], progress=False)
  assert again["mitigate"]["per_seed"] == res["mitigate"]["per_seed"]
  assert again["last_run"]["stages"]["mitigate"] == "skipped"
  assert again["timings"]["mitigate"] == res["timings"]["mitigate"]  # the timing of the real run is kept


def test_qat_lowers_the_quantized_training_loss(tiny_run, tiny_config, tmp_path):
  # QAT minimizes the loss of the quantized forward pass: after fine-tuning, that loss on the
  # training set is below the one of the post-training-quantized start.
  from fqjax import data
  from fqjax.analysis import metrics
  cfg = tiny_config()
  splits = data.load(cfg)
  study_model = SmallCNN(num_classes=splits.info.num_classes, width=4)
  workdir, _ = tiny_run
  fp_vars = runner.train.load_trained(study_model, splits, cfg.train, 0, f"{workdir}/checkpoints/seed_0/train")
  fp_vars = fp_vars["variables"]
  names = layers.quant_layer_names(study_model, splits.train.x[:2])
  bits = BitSpec.uniform(2).bits_tree(names)
  tcfg = mitigate.qat_train_config("qat", cfg.mitigate, cfg.train)
  tcfg.epochs, tcfg.learning_rate = 3, 0.05
  out = train.fit(study_model, splits, tcfg, 0, str(tmp_path / "qat_probe"),
                  train.FineTuning(init_variables=fp_vars, bits_tree=bits), progress=False)

  def quantized_loss(variables):
    logits = train.predict(study_model, {**variables, "bits": bits}, splits.train.x)
    return metrics.per_sample_loss(logits, splits.train.y).mean()

  assert quantized_loss(out["variables"]) < quantized_loss(fp_vars)


def test_frozen_batchnorm_keeps_running_stats():
  model = SmallCNN(num_classes=2, width=4)
  x = np.random.default_rng(0).normal(size=(8, 8, 8, 1)).astype(np.float32)
  variables = model.init(jax.random.PRNGKey(0), x)
  tx = train.make_optimizer(ml_collections.ConfigDict({"optimizer": "sgd", "learning_rate": 0.1, "momentum": 0.9,
                                                       "weight_decay": 0.0, "warmup_epochs": 0.0, "epochs": 1}), 1)
  batch = {"x": jnp.asarray(x), "y": jnp.zeros(8, jnp.int32), "group": jnp.zeros(8, jnp.int32),
           "mask": jnp.ones(8)}
  table = jnp.ones(1)
  for bn_train, changes in ((False, False), (True, True)):
    state = train.create_train_state(model, jax.random.PRNGKey(0), x, tx, variables)
    before = jax.device_get(state.batch_stats)
    state, _ = train.make_train_step(model, "group", bn_train)(state, batch, table, None)
    moved = not np.allclose(before["conv1"]["mean"], state.batch_stats["conv1"]["mean"])
    assert moved == changes
    assert not np.allclose(jax.device_get(state.params["conv1"]["kernel"]), variables["params"]["conv1"]["kernel"])


def test_lsq_scales_init_and_learn():
  model = SmallCNN(num_classes=2, width=4, quant=QuantRule(lsq=True))
  x = np.random.default_rng(0).normal(size=(4, 8, 8, 1)).astype(np.float32)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), x)
  names = layers.quant_layer_names(model, x)
  resolved = BitSpec.uniform(4).resolve(names)
  params = layers.init_lsq_scales(variables["params"], resolved)
  k = params["conv2"]["kernel"]
  np.testing.assert_allclose(params["conv2"]["w_scale"],
                             2 * np.abs(np.asarray(k)).mean(axis=(0, 1, 2)) / np.sqrt(7), rtol=1e-5)
  bits = layers.bits_tree_from(resolved)
  grads = jax.jit(jax.grad(lambda p: jnp.sum(model.apply({**variables, "params": p, "bits": bits}, x) ** 2)))(params)
  assert np.any(np.asarray(grads["conv2"]["w_scale"]) != 0)
  with pytest.raises(ValueError, match="lsq=True"):
    layers.init_lsq_scales(SmallCNN(2, width=4).init(jax.random.PRNGKey(0), x)["params"], resolved)


def test_bad_mitigate_config(tiny_config):
  c = tiny_config()
  c.mitigate.methods = ("qat", "magic")
  with pytest.raises(ValueError, match="config.mitigate.methods"):
    runner.run(c, "/tmp/never_written_fqjax", ["mitigate"])
  c = tiny_config()
  c.mitigate.bn = "sometimes"
  with pytest.raises(ValueError, match="config.mitigate.bn"):
    runner.run(c, "/tmp/never_written_fqjax", ["mitigate"])
