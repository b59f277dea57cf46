"""Per-seed splits: split_seed, load_for_seed, and the runner's record and checks of each seed's data."""
import os

import ml_collections
import numpy as np
import pytest

from fqjax import data
from fqjax.study import runner
from fqjax.training import train
from fqjax.study.cache import data_identity
from fqjax.study.config import base_config
from fqjax.errors import InputError


def _config(seeds, resplit=True, data_seed=7):
  c = base_config()
  c.data.seed = data_seed
  c.data.resplit_per_seed = resplit
  return ml_collections.ConfigDict({"seeds": seeds, "data": c.data})  # seeds may be an int here


def test_split_seed_rules():
  """Several seeds: data.seed + s; one seed (an int or a 1-tuple) or resplit False: data.seed."""
  c = _config((0, 1, 2))
  assert [data.split_seed(c, s) for s in (0, 1, 2)] == [7, 8, 9]
  assert data.split_seed(_config(3), 3) == 7
  assert data.split_seed(_config((3,)), 3) == 7
  assert [data.split_seed(_config((0, 1, 2), resplit=False), s) for s in (0, 1, 2)] == [7, 7, 7]
  assert base_config().data.resplit_per_seed is True  # the default


def _tiny(tiny_config, resplit=True):
  """The tiny study at one epoch with a width-2 CNN, training only: cheap enough for the runner tests."""
  c = tiny_config()
  c.model.kwargs.width = 2
  c.train.epochs = 1
  c.data.resplit_per_seed = resplit
  return c


def test_load_for_seed_gives_each_seed_its_split_with_equal_group_counts(tiny_config):
  """Seeds 0 and 1 get different training rows but the same rows per group and split; config is untouched."""
  c = _tiny(tiny_config)
  s0, s1 = data.load_for_seed(c, 0), data.load_for_seed(c, 1)
  assert c.data.seed == base_config().data.seed  # load_for_seed works on a copy
  assert not np.array_equal(s0.train.index, s1.train.index)
  assert s0.info.counts == s1.info.counts
  assert data_identity(s0) != data_identity(s1)
  c.data.seed += 1  # seed 0 of a study whose data.seed is one higher is seed 1's split
  assert data_identity(data.load_for_seed(c, 0)) == data_identity(s1)


def test_runner_trains_each_seed_on_its_own_split(tiny_config, tmp_path):
  """results.dataset records each seed's split identity and data seed; seed 1's model is evaluated on seed 1's
  test split (its record matches a re-evaluation there, not on seed 0's)."""
  c = _tiny(tiny_config)
  res = runner.run(c, str(tmp_path / "w"), ["train"], progress=False)
  ds = res["dataset"]
  ids = {s: data_identity(data.load_for_seed(c, s)) for s in (0, 1)}
  assert ds["split_identities"] == {"0": ids[0], "1": ids[1]} and ids[0] != ids[1]
  assert ds["split_seeds"] == {"0": c.data.seed, "1": c.data.seed + 1}
  assert ds["identity"] == ids[0]
  s0, s1 = data.load_for_seed(c, 0), data.load_for_seed(c, 1)
  model = runner.models.build_model(c, s1.info)
  loaded = train.load_trained(model, s1, c.train, 1, str(tmp_path / "w" / "checkpoints" / "seed_1" / "train"))
  record = res["train"]["per_seed"]["1"]["test"]
  kw = dict(group_is_label=s1.info.group_is_label)
  own = train.evaluate(model, loaded["variables"], s1.test, s1.info.num_groups, **kw)
  other = train.evaluate(model, loaded["variables"], s0.test, s0.info.num_groups, **kw)
  assert record["loss"] == pytest.approx(own["loss"]) and record["loss"] != pytest.approx(other["loss"])


def test_runner_with_resplit_off_shares_one_split(tiny_config, tmp_path):
  """resplit_per_seed False: both seeds record the same split identity and data.seed."""
  c = _tiny(tiny_config, resplit=False)
  res = runner.run(c, str(tmp_path / "w"), ["train"], progress=False)
  ds = res["dataset"]
  assert ds["split_identities"]["0"] == ds["split_identities"]["1"] == ds["identity"]
  assert ds["split_seeds"] == {"0": c.data.seed, "1": c.data.seed}


def test_unequal_group_counts_across_seeds_are_refused(tiny_config, tmp_path, monkeypatch):
  """A seed whose split has other rows per group stops the run before the workdir exists, naming
  resplit_per_seed and both seeds' counts."""
  c = _tiny(tiny_config)
  real = data.load_for_seed

  def uneven(config, seed):
    if seed == 0:
      return real(config, seed)
    c1 = config.copy_and_resolve_references()
    c1.data.synthetic.group_sizes = (160, 80, 29)
    return real(c1, seed)

  monkeypatch.setattr(data, "load_for_seed", uneven)
  workdir = str(tmp_path / "w")
  with pytest.raises(InputError, match="resplit_per_seed") as err:
    runner.run(c, workdir, ["train"], progress=False)
  assert "seed 1" in str(err.value) and "seed 0" in str(err.value)
  assert not os.path.exists(workdir)
