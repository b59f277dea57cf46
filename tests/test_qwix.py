"""Cross-check against Qwix (optional: skipped when qwix is not installed; `pip install qwix` to run it).

Qwix's weight-only PTQ on a Linen model (real int4 / int8 weights, per-output-channel absmax scales) computes what
fqjax's fake quantization computes on the same grid: fqjax's "half_step" rule (max|w| / (qmax + 1/2)) is Qwix's
absmax calibration, and fqjax's "max" rule (max|w| / qmax) is Qwix's "absmax,<(qmax + 1/2) / qmax>".
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fqjax.quantization import layers, quant
from fqjax.quantization.bitspec import BitSpec

qwix = pytest.importorskip("qwix")

QTYPES = {8: jnp.int8, 4: jnp.int4}


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rule", ["half_step", "max"])
def test_qwix_absmax_grid_is_fqjax_grid(bits, rule):
  w = jax.random.normal(jax.random.PRNGKey(bits), (16, 8))
  qmax = 2 ** (bits - 1) - 1
  method = "absmax" if rule == "half_step" else f"absmax,{(qmax + 0.5) / qmax!r}"
  ours = quant.fake_quant(w, bits, axis=1, scale=quant.weight_scale(w, bits, rule, axis=1))
  theirs = qwix.dequantize(qwix.quantize(w, QTYPES[bits], channelwise_axes=[1], calibration_method=method))
  np.testing.assert_allclose(np.asarray(theirs), np.asarray(ours), atol=1e-6)


class _Plain(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3, name="fc2")(nn.relu(nn.Dense(16, name="fc1")(x)))


class _Fqjax(nn.Module):
  rule: layers.QuantRule = layers.QuantRule(scale="half_step")

  @nn.compact
  def __call__(self, x):
    x = nn.relu(layers.QuantDense(16, quant=self.rule, name="fc1")(x))
    return layers.QuantDense(3, quant=self.rule, name="fc2")(x)


def test_qwix_ptq_of_a_linen_model_equals_fqjax_at_a_chosen_bit_assignment():
  """fc1 at 4 bits and fc2 at 8 bits: Qwix's integer-weight model and fqjax's fake-quantized one agree."""
  x = jax.random.normal(jax.random.PRNGKey(1), (5, 8))
  plain = _Plain()
  params = plain.init(jax.random.PRNGKey(0), x)["params"]
  provider = qwix.PtqProvider([qwix.QuantizationRule(module_path="fc1", weight_qtype=jnp.int4),
                               qwix.QuantizationRule(module_path="fc2", weight_qtype=jnp.int8)])
  qmodel = qwix.quantize_model(plain, provider)
  abstract = jax.eval_shape(qmodel.init, jax.random.PRNGKey(0), x)
  qparams = qwix.quantize_params(params, abstract["params"])
  assert qparams["fc1"]["kernel"].array.qvalue.dtype == jnp.int4  # real integer weights
  theirs = qmodel.apply({"params": qparams}, x)
  bits = BitSpec(w_bits=None, layers={"fc1": (4, None), "fc2": (8, None)}).bits_tree(["fc1", "fc2"])
  ours = _Fqjax().apply({"params": params, layers.BITS: bits}, x)
  np.testing.assert_allclose(np.asarray(theirs), np.asarray(ours), atol=1e-5)
