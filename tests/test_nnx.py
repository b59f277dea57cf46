"""Tests for fqjax.quantization.nnx: the NNX layers equal the Linen ones (outputs and STE gradients) for the same
weights and bits, bit sweeps by vmap over a stacked bits state compile once, bad bits are errors.

Speed: on CPU nearly all the time is XLA compiles, and one compile of many cases costs far less than
eager op-by-op dispatch (one compile per op and shape). So each test jits one function holding all its
cases (Linen and NNX side by side, bits as traced arguments), and models are built abstractly
(nnx.eval_shape / jax.eval_shape) and filled from numpy, with no XLA random init.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fqjax.quantization import layers, quant
from fqjax.quantization import nnx as fnnx
from fqjax.quantization.layers import BitSpec, QuantRule

SETTINGS = [(b, b) for b in (32, 8, 4, 2)] + [(4, 32), (32, 2)]  # (w, a): both quantized, then each alone
RULES = [QuantRule(per_channel=pc, scale=s) for pc in (True, False) for s in ("max", "half_step", "mse")]
# Conv + BatchNorm differs from QuantConv only around the weight quantizer: a few rules there.
RULES_BY_KIND = {"linear": RULES, "conv": RULES, "convbn_fold": RULES[::2] + RULES[4:5],
                 "convbn": [RULES[0], RULES[5]], "convbn_train": [RULES[1], RULES[5]]}
GRAD_RULES = [QuantRule(), QuantRule(per_channel=False, scale="mse", narrow_range=True, ste="identity"),
              QuantRule(lsq=True)]
GRAD_RULES_BY_KIND = {"linear": GRAD_RULES, "conv": GRAD_RULES, "convbn": GRAD_RULES[1:],
                      "convbn_fold": GRAD_RULES[:1], "convbn_train": GRAD_RULES[::2]}
KINDS = list(RULES_BY_KIND)


def _rand(seed, shape, scale=1.0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * scale, jnp.float32)


def _filled(make):
  """The NNX model ``make()`` builds, built abstractly, then params and BatchNorm statistics from numpy
  (variances positive) and bits 32."""
  model = nnx.eval_shape(make)
  for i, var_type in enumerate((nnx.Param, nnx.BatchStat)):
    leaves, tree = jax.tree.flatten(nnx.state(model, var_type))
    values = [_rand(100 * i + j, leaf.shape, 0.5) for j, leaf in enumerate(leaves)]
    nnx.update(model, jax.tree.unflatten(tree, [0.5 + jnp.abs(v) if i else v for v in values]))
  fnnx.set_bits(model, BitSpec.uniform(None))
  return model


@functools.lru_cache(maxsize=None)
def _built(kind, lsq=False):
  """(linen layer, random Linen variables, graphdef and state of the NNX twin holding them, x, call kwargs)."""
  rule = QuantRule(lsq=lsq)
  x = _rand(1, (5, 12) if kind == "linear" else (2, 6, 6, 3))
  if kind == "linear":
    lin, kw = layers.QuantDense(6, quant=rule), {}
    make = lambda: fnnx.QuantLinear(12, 6, quant=rule, rngs=nnx.Rngs(0))  # noqa: E731
  elif kind == "conv":
    lin = layers.QuantConv(4, (3, 3), strides=2, quant=rule)
    make, kw = lambda: fnnx.QuantConv(3, 4, (3, 3), strides=2, quant=rule, rngs=nnx.Rngs(0)), {}
  else:  # "convbn" (inference), "convbn_fold" (inference, folded), "convbn_train"
    fold = kind == "convbn_fold"
    lin = layers.QuantConvBN(4, (3, 3), padding="VALID", fold_bn=fold, quant=rule)
    make = lambda: fnnx.QuantConvBN(3, 4, (3, 3), padding="VALID", fold_bn=fold, quant=rule,  # noqa: E731
                                    rngs=nnx.Rngs(0))
    kw = {"train": kind == "convbn_train"}
  shapes = jax.eval_shape(functools.partial(lin.init, **kw), jax.random.PRNGKey(0), x)  # Linen's variables
  leaves, tree = jax.tree.flatten(shapes)
  variables = jax.tree.unflatten(tree, [_rand(10 + i, leaf.shape, 0.5) for i, leaf in enumerate(leaves)])
  if "batch_stats" in variables:  # a valid BatchNorm: scale near 1, var > 0
    variables["params"]["scale"] = 1.0 + variables["params"]["scale"]
    variables["batch_stats"]["var"] = 0.5 + jnp.abs(variables["batch_stats"]["var"])
  if lsq:  # LSQ's own init, so the learned scale is not a trivial constant
    variables["params"]["w_scale"] = quant.lsq_init_scale(variables["params"]["kernel"], 3, axis=-1)
  ours = nnx.eval_shape(make)
  fnnx.load_linen_variables(ours, {**variables, "bits": {"w": None, "a": None}})
  return (lin, variables, *nnx.split(ours), x, kw)


def _pair(kind, lsq=False):
  """(linen layer, its variables, a fresh NNX twin holding them, x, call kwargs)."""
  lin, variables, graphdef, state, x, kw = _built(kind, lsq)
  return lin, variables, nnx.merge(graphdef, jax.tree.map(jnp.asarray, state)), x, kw


def _linen(lin, rule, variables, x, kw, w, a):
  """(output, new batch_stats or None) of the Linen layer with ``rule`` at bits (w, a)."""
  lin = lin.clone(quant=rule)
  if kw.get("train"):
    y, new = lin.apply({**variables, "bits": {"w": w, "a": a}}, x, mutable=["batch_stats"], **kw)
    return y, new["batch_stats"]
  return lin.apply({**variables, "bits": {"w": w, "a": a}}, x, **kw), None


def _bits_state(w, a):
  return nnx.State({"w_bits": fnnx.Bits(w), "a_bits": fnnx.Bits(a)})  # a root layer's bits


def _nnx(graphdef, rest, rule, x, kw, w, a):
  """(output, new BatchNorm statistics or None) of the NNX layer with ``rule`` at bits (w, a)."""
  # merge reuses the state's variables: copy them, or one rule's BatchNorm update is the next one's start
  model = nnx.merge(graphdef, _bits_state(w, a), jax.tree.map(lambda v: v, rest))
  model.quant = rule
  y = model(x, **kw)
  return y, ({"mean": model.mean[...], "var": model.var[...]} if kw.get("train") else None)


@pytest.mark.parametrize("kind", KINDS)
def test_outputs_equal_linen(kind):
  """Scale rules "max", "half_step", "mse", per channel and per tensor, at 32, 8, 4, 2 bits and mixed:
  outputs (and, training, the running statistics) equal Linen's to 1e-6."""
  lin, variables, graphdef, state, x, kw = _built(kind)
  bits_graphdef, _, rest = nnx.split(nnx.merge(graphdef, state), fnnx.Bits, ...)
  rules = RULES_BY_KIND[kind]

  @jax.jit  # both sides' weights are arguments: constants would be folded at compile time, off by an ulp
  def both(w, a, rest, variables):
    return [(_nnx(bits_graphdef, rest, r, x, kw, w, a), _linen(lin, r, variables, x, kw, w, a)) for r in rules]

  first = {}
  for w, a in SETTINGS:
    for rule, (got, want) in zip(rules, both(jnp.float32(w), jnp.float32(a), rest, variables)):
      np.testing.assert_allclose(got[0], want[0], atol=1e-6, rtol=0, err_msg=f"{rule} w={w} a={a}")
      jax.tree.map(lambda g, h: np.testing.assert_allclose(g, h, atol=1e-6, err_msg=f"{rule} stats"),
                   got[1], want[1])
      first.setdefault(w, got[0])
  assert not np.allclose(first[32], first[2], atol=1e-2)  # the bits reach the layer


@pytest.mark.parametrize("kind", KINDS)
def test_ste_gradients_equal_linen(kind):
  """d loss / d (params, x) through the STE at 3-bit weights and 4-bit inputs (concrete): clipped (per
  channel, max), identity (per tensor, narrow, mse) and LSQ's learned scale."""
  static, data = [], []
  for rule in GRAD_RULES_BY_KIND[kind]:
    lin, variables, graphdef, state, x, kw = _built(kind, rule.lsq)
    bits_graphdef, _, params, rest = nnx.split(nnx.merge(graphdef, state), fnnx.Bits, nnx.Param, ...)
    r = _rand(5, jax.eval_shape(lambda: _linen(lin, rule, variables, x, kw, 3.0, 4.0)[0]).shape)
    static.append((rule, lin, variables, bits_graphdef, kw, r))
    data.append((variables, params, rest, x))

  @jax.jit
  def grads(data):
    out = []
    for (rule, lin, _, bits_graphdef, kw, r), (variables, params, rest, x) in zip(static, data):
      def linen_loss(p, x):
        return jnp.sum(_linen(lin, rule, {**variables, "params": p}, x, kw, 3.0, 4.0)[0] * r)

      def nnx_loss(p, x):
        model = nnx.merge(bits_graphdef, _bits_state(np.float32(3), np.float32(4)), p,
                          jax.tree.map(lambda v: v, rest))
        model.quant = rule
        return jnp.sum(model(x, **kw) * r)

      out.append((jax.grad(nnx_loss, argnums=(0, 1))(params, x),
                  jax.grad(linen_loss, argnums=(0, 1))(variables["params"], x)))
    return out

  for (rule, *_), ((got_p, got_x), (want_p, want_x)) in zip(static, grads(data)):
    np.testing.assert_allclose(got_x, want_x, atol=1e-6, rtol=1e-6, err_msg=str(rule))
    got_p = nnx.to_pure_dict(got_p)
    assert set(got_p) == set(want_p)
    for name in want_p:
      np.testing.assert_allclose(got_p[name], want_p[name], atol=1e-6, rtol=1e-6, err_msg=f"{rule} {name}")


class _Net(nnx.Module):
  """ConvBN -> relu -> strided Conv -> spatial mean -> Linear: x [B, 8, 8, 3] -> [B, 3]."""

  def __init__(self, rngs):
    self.stem = fnnx.QuantConvBN(3, 4, rngs=rngs)
    self.conv = fnnx.QuantConv(4, 6, strides=2, quant=QuantRule(per_channel=False, scale="mse"), rngs=rngs)
    self.head = fnnx.QuantLinear(6, 3, quant=QuantRule(scale="half_step"), rngs=rngs)

  def __call__(self, x):
    h = self.conv(jax.nn.relu(self.stem(x)))
    return self.head(jnp.mean(h, axis=(1, 2)))


def _net():
  return _filled(lambda: _Net(nnx.Rngs(0)))


def test_vmap_sweep_equals_separate_calls_and_traces_once():
  model, x = _net(), _rand(1, (2, 8, 8, 3))
  names = fnnx.quant_layer_names(model, x)
  assert names == ["stem", "conv", "head"]  # forward order, not iter_modules' alphabetical one
  graphdef, _, rest = nnx.split(model, fnnx.Bits, ...)
  traces = []

  @jax.jit
  def sweep(stacked, rest, x):
    traces.append(1)  # a Python side effect: runs once per trace
    return jax.vmap(lambda bits: nnx.merge(graphdef, bits, rest)(x))(stacked)

  full_graphdef = nnx.graphdef(model)
  single = jax.jit(lambda state, x: nnx.merge(full_graphdef, state)(x))  # one bit setting per call
  for settings in ([BitSpec.uniform(8, 8), BitSpec.uniform(4, 8), BitSpec.uniform(2, 4)],
                   [BitSpec.first_last(2, 8), BitSpec.uniform(None), {"conv": (3, 32), "head": {"a": 2}}]):
    before = fnnx.bits_state(model)
    stacked = fnnx.stack_bits(model, settings, layer_names=names)
    jax.tree.map(np.testing.assert_array_equal, fnnx.bits_state(model), before)  # the model is unchanged
    swept = sweep(stacked, rest, x)
    assert swept.shape == (3, 2, 3)
    for k, setting in enumerate(settings):
      fnnx.set_bits(model, setting, layer_names=names)
      np.testing.assert_allclose(swept[k], single(nnx.state(model), x), atol=1e-6, rtol=0, err_msg=str(setting))
      fnnx.set_bits(model, BitSpec.uniform(None))
  assert len(traces) == 1
  assert not np.allclose(swept[0], swept[1])  # the bits reached the layers


def test_concrete_bits_equal_linen():
  """Bits set as Python numbers (checked eagerly, no quantizer at all at 32) give Linen's outputs too."""
  cases = []
  for kind, w, a in [("linear", 32, 32), ("linear", 4, 8), ("convbn_fold", 2, 32)]:
    lin, variables, ours, x, kw = _pair(kind)
    fnnx.set_bits(ours, {"w": w, "a": a})
    cases.append((ours, lin, {**variables, "bits": {"w": w, "a": a}}, x))
  # The models are closed over, so their bits are concrete inside the trace.
  outs = jax.jit(lambda: [(m(x), lin.apply(v, x)) for m, lin, v, x in cases])()
  for got, want in outs:
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)


def test_set_and_read_bits():
  model = _net()
  fnnx.set_bits(model, {"stem": (4, None), "head": {"w": 2}})
  assert nnx.to_pure_dict(fnnx.bits_state(model)) == {
      "stem": {"w_bits": 4.0, "a_bits": 32.0}, "conv": {"w_bits": 32.0, "a_bits": 32.0},
      "head": {"w_bits": 2.0, "a_bits": 32.0}}
  fnnx.set_bits(model, BitSpec(w_bits=8, layers={"conv": (2, 2)}))
  assert nnx.to_pure_dict(fnnx.bits_state(model))["conv"] == {"w_bits": 2.0, "a_bits": 2.0}
  fnnx.set_bits(model, layers.bits_tree_from({"stem": (6, 6), "conv": (5, 5), "head": (4, None)}))  # Linen's tree
  assert nnx.to_pure_dict(fnnx.bits_state(model))["head"] == {"w_bits": 4.0, "a_bits": 32.0}
  assert sorted(fnnx.quant_layers(model)) == ["conv", "head", "stem"]


@pytest.mark.parametrize("bad", [0, 33, 2.5, -1])
def test_bad_bits_are_errors(bad):
  model = _net()
  before = fnnx.bits_state(model)
  with pytest.raises(ValueError, match=r"bits\['head'\]\['w'\] must be an integer"):
    fnnx.set_bits(model, {"stem": (4, 4), "head": (bad, 8)})
  jax.tree.map(np.testing.assert_array_equal, fnnx.bits_state(model), before)  # nothing half-set
  with pytest.raises(ValueError, match="QuantLinear w_bits must be an integer"):
    fnnx.QuantLinear(3, 2, w_bits=bad, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="must be an integer"):
    fnnx.stack_bits(model, [BitSpec.uniform(4), {"conv": (8, bad)}])


def test_bad_bits_in_the_forward_pass_like_linen():
  """Bits written straight into the variables are checked when concrete, by Linen's rule: 0 is an error."""
  lin, variables, ours, x, _ = _pair("linear")
  ours.w_bits.set_value(jnp.float32(0))
  with pytest.raises(ValueError, match=r"QuantLinear.w_bits must be an integer >= 1"):
    ours(x)
  with pytest.raises(ValueError, match="bits must be an integer >= 1"):
    lin.apply({**variables, "bits": {"w": 0, "a": 32}}, x)


def test_other_errors():
  model = _net()
  with pytest.raises(ValueError, match=r"layers the model does not have: \['nope'\]"):
    fnnx.set_bits(model, {"nope": (4, 4)})
  with pytest.raises(ValueError, match="pair"):
    fnnx.set_bits(model, {"head": (4, 4, 4)})
  with pytest.raises(ValueError, match="'first' / 'last' need the forward order"):
    fnnx.set_bits(model, BitSpec.first_last(4))
  with pytest.raises(ValueError, match="must be a layers.QuantRule"):
    fnnx.QuantLinear(3, 2, quant="per_channel", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="LSQ"):
    fnnx.QuantConvBN(3, 2, fold_bn=True, quant=QuantRule(lsq=True), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="unknown layers"):
    fnnx.set_act_ranges(model, {"nope": {"lo": 0.0, "hi": 1.0}})
  with pytest.raises(ValueError, match="unsupported collection"):
    fnnx.load_linen_variables(model, {"intermediates": {}})


def test_calibrated_activation_ranges_equal_linen():
  lin, variables, ours, x, _ = _pair("convbn")
  batches = [_rand(20 + i, x.shape, 1 + i) for i in range(3)]
  want = layers.calibrate_activations(lin, variables, batches)
  got = fnnx.calibrate_activations(ours, batches)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, atol=1e-6), got, want)
  fnnx.set_bits(ours, {"w": 4, "a": 3})
  dynamic = nnx.split(ours)
  fnnx.set_act_ranges(ours, got)
  calibrated = nnx.split(ours)

  @jax.jit
  def outputs(variables, dynamic_state, calibrated_state):
    bits = {"w": 4.0, "a": 3.0}
    return (nnx.merge(calibrated[0], calibrated_state)(x), nnx.merge(dynamic[0], dynamic_state)(x),
            lin.apply({**variables, "bits": bits, "quant_stats": want[""]}, x),  # a root layer's collection
            lin.apply({**variables, "bits": bits}, x))

  ours_cal, ours_dyn, linen_cal, linen_dyn = outputs(variables, dynamic[1], calibrated[1])
  np.testing.assert_allclose(ours_cal, linen_cal, atol=1e-6, rtol=0)
  np.testing.assert_allclose(ours_dyn, linen_dyn, atol=1e-6, rtol=0)
  assert not np.allclose(linen_cal, linen_dyn)  # the calibrated range is used
  fnnx.set_act_ranges(ours, None)
  assert ours.act_lo is None and nnx.graphdef(ours) == dynamic[0]


def test_train_and_eval_modes_follow_the_nnx_convention():
  """model.train() / model.eval() switch QuantConvBN like nnx.BatchNorm; eval is the default, as Linen's."""
  lin, variables, ours, x, _ = _pair("convbn")
  assert ours.use_running_average
  ours.train()
  train_graphdef, state = nnx.split(ours)
  ours.eval()
  eval_graphdef = nnx.graphdef(ours)

  @jax.jit
  def run(state, variables):
    model = nnx.merge(train_graphdef, state)
    y_train = model(x)  # updates the running statistics in place
    y_eval = nnx.merge(eval_graphdef, nnx.state(model))(x)
    want, new = lin.apply(variables, x, train=True, mutable=["batch_stats"])
    return y_train, y_eval, model.mean[...], want, lin.apply({**variables, **new}, x), new["batch_stats"]["mean"]

  y_train, y_eval, mean, want_train, want_eval, want_mean = run(state, variables)
  np.testing.assert_allclose(y_train, want_train, atol=1e-6, rtol=0)
  np.testing.assert_allclose(mean, want_mean, atol=1e-6, rtol=0)
  np.testing.assert_allclose(y_eval, want_eval, atol=1e-6, rtol=0)
