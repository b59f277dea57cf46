"""The layout's rules, checked on the source: which package may import which, and the analysis side without JAX.

docs/ARCHITECTURE.md states the same order. A module may import fqjax modules of its own layer or of layers
below it, never above; the analysis side (config validation, summaries, claims, statistics, tables, results,
report) loads no JAX, so results can be read and configs checked on any machine.
"""
import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fqjax")

# Lowest first; a package may import its own layer and the ones with a lower rank.
RANK = {"fqjax": 0, "fqjax.errors": 0, "fqjax.choices": 0, "fqjax.outputs": 1, "fqjax.analysis": 2,
        "fqjax.report": 3, "fqjax.quantization": 4, "fqjax.data": 5, "fqjax.models": 6, "fqjax.training": 7,
        "fqjax.explain": 8, "fqjax.study": 9}

ANALYSIS_SIDE = ("fqjax.study.config", "fqjax.study.schemes", "fqjax.analysis.summaries", "fqjax.analysis.claims",
                 "fqjax.analysis.decisions",
                 "fqjax.analysis.claims_mitigate", "fqjax.analysis.judgements", "fqjax.analysis.stats",
                 "fqjax.analysis.metrics", "fqjax.analysis.tables", "fqjax.outputs.results",
                 "fqjax.outputs.tensorboard", "fqjax.report")


def _layer(module: str) -> str:
  """The layer a dotted fqjax module belongs to: its top-level package (or fqjax itself for fqjax/__init__)."""
  parts = module.split(".")
  return ".".join(parts[:2]) if len(parts) > 1 else "fqjax"


def _modules():
  for folder, _, files in os.walk(ROOT):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(folder, name)
        rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
        yield (rel[:-len(".__init__")] if rel.endswith(".__init__") else rel), path


def _imports(path: str):
  """Every fqjax module a file imports (at module level or inside functions)."""
  tree = ast.parse(open(path).read(), path)
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "fqjax":
      if node.module == "fqjax":
        yield from (f"fqjax.{a.name}" for a in node.names)
      else:
        yield node.module
    elif isinstance(node, ast.Import):
      yield from (a.name for a in node.names if a.name.split(".")[0] == "fqjax")


def test_every_package_has_a_layer():
  packages = {_layer(m) for m, _ in _modules()}
  assert packages <= set(RANK), f"packages without a layer in this test and docs/ARCHITECTURE.md: {packages - set(RANK)}"


def test_no_upward_import():
  upward = []
  for module, path in _modules():
    own = RANK[_layer(module)]
    for imported in _imports(path):
      target = _layer(imported)
      if target in RANK and RANK[target] > own and not (module == "fqjax" or imported == "fqjax.__version__"):
        upward.append(f"{module} imports {imported}")
  assert not upward, "imports from a higher layer:\n" + "\n".join(upward)


def test_the_check_can_fail(tmp_path):
  """The import scan sees a function-level import (so test_no_upward_import is not vacuous)."""
  f = tmp_path / "m.py"
  f.write_text("def f():\n  from fqjax.study import runner\n")
  assert list(_imports(str(f))) == ["fqjax.study"]
  assert RANK[_layer("fqjax.study.runner")] > RANK[_layer("fqjax.analysis.claims")]


@pytest.mark.parametrize("modules", [ANALYSIS_SIDE])
def test_analysis_side_imports_no_jax(modules):
  code = ("import sys\n" + "".join(f"import {m}\n" for m in modules) +
          "heavy = [m for m in ('jax', 'jaxlib', 'flax', 'optax', 'orbax', 'tensorflow') if m in sys.modules]\n"
          "print(','.join(heavy))\n")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.strip() == "", f"importing the analysis side loaded {proc.stdout.strip()}"
  # Not vacuous: the compute side does load JAX.
  proc = subprocess.run([sys.executable, "-c", "import sys, fqjax.study.runner; print('jax' in sys.modules)"],
                        capture_output=True, text=True, timeout=120)
  assert proc.stdout.strip() == "True", proc.stderr
