"""Runs an fqjax study.

  python launch.py                                   # the default digits study, workdir runs/digits
  python launch.py --config experiments/cifar10_resnet18.py --config.train.epochs=5 --workdir runs/c10
  python launch.py --stages=ptq --force              # rerun one stage

Stages (in order): train, ptq, explain, mitigate, report; with no --stages
every stage this version implements runs. Finished stages are skipped unless --force.
"""
import os
import sys
import time

from absl import app, flags, logging as absl_logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "experiments", "digits.py")

_CONFIG = config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "Study config file (a get_config() module).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder; default runs/<config.name>.")
_STAGES = flags.DEFINE_list("stages", None, "Comma-separated stages to run; default all available.")
_FORCE = flags.DEFINE_bool("force", False, "Rerun stages even if their outputs are in the workdir.")
_NO_PROGRESS = flags.DEFINE_bool("no_progress", False, "Hide progress bars.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from fqjax import parallel, runner

  config = _CONFIG.value
  parallel.maybe_initialize_distributed(config.distributed)
  print(f"fqjax: {parallel.describe()}")
  workdir = _WORKDIR.value or os.path.join("runs", config.name)
  start = time.perf_counter()
  res = runner.run(config, workdir, _STAGES.value, force=_FORCE.value, progress=not _NO_PROGRESS.value)
  print(runner.format_table(res))
  if "mitigate" in res:
    from fqjax import mitigate
    print(mitigate.format_ablation(res["mitigate"]))
  if "claims" in res:
    print("claims of the paper, checked on this run:\n" + runner.format_claims(res))
  timings = ", ".join(f"{k} {v:.1f}s" for k, v in res["timings"].items())
  print(f"stage wall times: {timings}; total {time.perf_counter() - start:.1f}s")
  print(f"results: {os.path.join(workdir, 'results.json')}, {os.path.join(workdir, 'results.csv')}")


if __name__ == "__main__":
  absl_logging.set_verbosity(absl_logging.WARNING)
  app.run(main)
