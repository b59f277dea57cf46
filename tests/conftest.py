"""Shared test setup: cheap XLA compiles for tiny models, and one tiny study shared by the runner,
explain, mitigate and report tests (computed once per test session, also across pytest-xdist workers).
"""
import fcntl
import os
import shutil

# The tests' models are tiny, so XLA's compile time dominates their run time: compile with LLVM's cheap
# settings (numbers are compared within one run, never against a stored constant of another setting).
# Set before JAX is imported; a subprocess a test starts inherits it.
_FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FAST_COMPILE}".strip()
# One compilation cache for the session's processes (xdist workers and the launch.py subprocesses tests start
# inherit the variables): the same tiny programs are compiled once, not once per process.
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import tempfile
  _OWN_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="fqjax_test_jit_cache_")
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import pytest  # noqa: E402

from fqjax.outputs import results  # noqa: E402
from fqjax.study import runner  # noqa: E402

from studies import TINY_GROUP_SIZES, tiny_study_config  # noqa: E402,F401 (the builder tests import too)


def _compute(workdir: str) -> None:
  runner.run(tiny_study_config(), workdir, None, progress=False)


@pytest.fixture(scope="session")
def tiny_study(tmp_path_factory):
  """{"workdir", "results"} of the finished tiny study. Read only: copy it (tiny_study_copy) to change it."""
  worker = os.environ.get("PYTEST_XDIST_WORKER")
  if worker is None:
    workdir = str(tmp_path_factory.mktemp("tiny_study"))
    _compute(workdir)
  else:  # xdist: the first worker computes it under a lock in the folder all workers share; the others wait
    shared = tmp_path_factory.getbasetemp().parent
    workdir = str(shared / "tiny_study")
    with open(shared / "tiny_study.lock", "w") as lock:
      fcntl.flock(lock, fcntl.LOCK_EX)
      if not os.path.exists(os.path.join(workdir, "report.html")):
        shutil.rmtree(workdir, ignore_errors=True)
        _compute(workdir)
  return {"workdir": workdir, "results": results.read_json(os.path.join(workdir, "results.json"))}


@pytest.fixture
def tiny_config():
  """The tiny study's config factory: call it for a fresh config to change."""
  return tiny_study_config


@pytest.fixture(scope="module")
def tiny_run(tiny_study):
  """(workdir, results) of the finished tiny study, read only."""
  return tiny_study["workdir"], tiny_study["results"]


@pytest.fixture
def tiny_study_copy(tiny_study, tmp_path):
  """A private copy of the tiny study's workdir (a path) that a test may rerun or damage."""
  copy = tmp_path / "tiny_study"
  shutil.copytree(tiny_study["workdir"], copy)
  return str(copy)


def pytest_sessionfinish(session, exitstatus):
  if _OWN_CACHE is not None:  # the process that made the cache (the xdist controller) removes it
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)
