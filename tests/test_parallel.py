"""Data parallelism and device sweeps on 8 simulated CPU devices (in a subprocess: XLA_FLAGS must be
set before JAX starts), and the bfloat16 compute switch."""
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fqjax.quantization import layers, quant
from fqjax.quantization.layers import BitSpec
from fqjax.models import SmallCNN

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import json, os, sys
    sys.path.insert(0, {root!r})
    import jax, numpy as np
    from fqjax import data
    from fqjax.quantization import layers
    from fqjax.training import parallel, train
    from fqjax.study import ptq, runner
    from fqjax.study.config import base_config
    from fqjax.models import SmallCNN

    assert jax.device_count() == 8, jax.devices()
    out = {{}}

    def config(data_parallel):
      c = base_config()
      c.seeds = (0,)
      c.data.name = "synthetic"
      c.data.synthetic.group_sizes = (110, 35)  # 145 rows: train, val and test sizes are not multiples of 8
      c.model.name = "small_cnn"
      c.model.kwargs.width = 4
      c.train.epochs = 1
      c.train.batch_size = 32
      c.ptq.bit_widths = (32, 2)
      c.eval.batch_size = 20  # rounded up to a multiple of 8 under data parallelism
      c.eval.bootstrap_resamples = 0
      c.parallel.data_parallel = data_parallel
      return c

    res = {{}}
    for dp in (False, True):
      r = runner.run(config(dp), os.path.join({tmp!r}, f"dp{{int(dp)}}"), ["train", "ptq"], progress=False)
      res[dp] = r
    out["sizes"] = res[True]["dataset"]["sizes"]
    out["train_test"] = [res[dp]["train"]["per_seed"]["0"]["test"] for dp in (False, True)]
    out["ptq"] = [res[dp]["ptq"]["per_seed"]["0"] for dp in (False, True)]
    out["history"] = [res[dp]["train"]["per_seed"]["0"]["history"] for dp in (False, True)]

    # Bit-widths spread over devices (3 bit-widths on 8 devices: padded) equal one device's lax.map sweep.
    m = SmallCNN(num_classes=3, width=4)
    x = np.random.default_rng(0).normal(size=(37, 8, 8, 1)).astype(np.float32)
    v = m.init(jax.random.PRNGKey(0), x[:2])
    names = layers.quant_layer_names(m, x[:2])
    trees = [s.bits_tree(names) for s in ptq.sweep_specs([32, 8, 4, 3, 2, 6, 5, 7, 3])]
    single = ptq.sweep_logits(m, v, x, trees, batch_size=16, mode="map")
    spread = ptq.sweep_logits(m, v, x, trees, batch_size=16, mode="devices")
    sharded_batch = ptq.sweep_logits(m, v, x, trees, batch_size=16, mode="map", mesh=parallel.data_mesh())
    out["sweep_shapes"] = [list(single.shape), list(spread.shape), list(sharded_batch.shape)]
    out["sweep_err"] = [float(np.abs(single - spread).max()), float(np.abs(single - sharded_batch).max())]
    try:
      parallel.check_divisible(30, parallel.data_mesh(), "train.batch_size")
      out["divisible_error"] = None
    except ValueError as e:
      out["divisible_error"] = str(e)
    print("RESULT" + json.dumps(out))
""")


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
  tmp = str(tmp_path_factory.mktemp("parallel"))
  # The device count joins the fast-compile flags that tests/conftest.py set.
  flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip()
  env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", SCRIPT.format(root=ROOT, tmp=tmp)], env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")][-1]
  return json.loads(line[len("RESULT"):])


def test_data_parallel_training_matches_single_device(sharded):
  assert sharded["sizes"]["test"] % 8 != 0 and sharded["sizes"]["train"] % 32 != 0
  single, multi = sharded["history"]
  for a, b in zip(single, multi):
    assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
    assert a["val_accuracy"] == pytest.approx(b["val_accuracy"], abs=1e-9)
  a, b = sharded["train_test"]
  assert a["groups"]["count"] == b["groups"]["count"]  # padded rows are never counted
  assert sum(b["groups"]["count"]) == sharded["sizes"]["test"]
  assert a["accuracy"] == pytest.approx(b["accuracy"], abs=1e-9)
  np.testing.assert_allclose(a["groups"]["loss"], b["groups"]["loss"], rtol=1e-4)


def test_data_parallel_ptq_sweep_matches_single_device(sharded):
  a, b = sharded["ptq"]
  assert set(a) == set(b) == {"32", "2"}
  for bits in a:
    assert a[bits]["groups"]["count"] == b[bits]["groups"]["count"]
    np.testing.assert_allclose(a[bits]["groups"]["accuracy"], b[bits]["groups"]["accuracy"], atol=1e-9)
    np.testing.assert_allclose(a[bits]["groups"]["loss"], b[bits]["groups"]["loss"], rtol=1e-3)


def test_bit_widths_spread_over_devices(sharded):
  assert sharded["sweep_shapes"] == [[9, 37, 3]] * 3
  assert max(sharded["sweep_err"]) < 1e-5


def test_batch_size_must_divide_over_devices(sharded):
  assert "train.batch_size=30" in sharded["divisible_error"] and "8 devices" in sharded["divisible_error"]


def test_bfloat16_compute_keeps_float32_params_and_grid():
  model = SmallCNN(num_classes=3, width=4)
  bf16 = model.clone(dtype=jnp.bfloat16)
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 8, 8, 1))
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), x)
  assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(jax.eval_shape(bf16.init,
                                                                                      jax.random.PRNGKey(0), x)))
  names = layers.quant_layer_names(model, x)
  bits = BitSpec.uniform(4).bits_tree(names)
  y32 = jax.jit(model.apply)({**variables, "bits": bits}, x)
  y16 = jax.jit(bf16.apply)({**variables, "bits": bits}, x)
  assert y16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y16, np.float32), y32, rtol=0.05, atol=0.05)
  # The kernels the bf16 model multiplies by are the float32 grid values (quantized before the cast).
  state = jax.jit(lambda v: bf16.apply(v, x, mutable=[layers.KERNELS])[1])({**variables, "bits": bits})
  k = state[layers.KERNELS]["conv2"]["kernel"][0]
  assert k.dtype == jnp.float32
  np.testing.assert_array_equal(k, quant.fake_quant(variables["params"]["conv2"]["kernel"], 4, axis=-1))
  grads = jax.jit(jax.grad(lambda p: jnp.sum(bf16.apply({**variables, "params": p, "bits": bits},
                                                         x).astype(jnp.float32))))(variables["params"])
  assert grads["conv1"]["kernel"].dtype == jnp.float32
