"""Runs an fqjax study.

  python launch.py                                   # the default digits study, workdir runs/digits
  python launch.py --config experiments/cifar10_resnet18.py --config.train.epochs=5 --workdir runs/c10
  python launch.py --stages=ptq --force              # rerun one stage

Stages (in order): train, ptq, explain, mitigate, report; with no --stages
every stage this version implements runs. Finished stages are skipped unless --force.

Every field of the config can be set with --config.<path>=<value>, typed as in the
config file: --config.data.path=my.npz, --config.seeds="(0,1)",
--config.data.imbalance.keep_fractions="{3: 0.2}", --config.ptq.a_bits=same.
model.kwargs and mitigate.grid are open: --config.model.kwargs.width=8 or
--config.mitigate.grid.hardness_floor="(0.1,0.3)" adds a key (a Python literal) to them.
An unknown field is refused in one line with the closest existing names; an fqjax error
prints its message alone (--traceback shows the full traceback).
"""
from __future__ import annotations

import difflib
import os
import re
import sys
import time
from typing import NamedTuple, Optional, Sequence

from absl import app, flags, logging as absl_logging
from ml_collections import config_dict, config_flags
from ml_collections.config_flags import config_flags as config_flags_lib, config_path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "experiments", "digits.py")
CONFIG_FLAG = "config"
# Sections whose keys are not fixed by the config file: --config.<section>.<new key>=<literal> adds a key.
OPEN_SECTIONS = ("model.kwargs", "mitigate.grid")

_OVERRIDE_RE = re.compile(rf"^--?(?:no)?{CONFIG_FLAG}\.")
_CONFIG_RE = re.compile(rf"^--?{CONFIG_FLAG}(=|$)")


class Flags(NamedTuple):
  """The FlagHolders of launch.py's flags (read `.value` after parsing)."""
  config: flags.FlagHolder
  workdir: flags.FlagHolder
  stages: flags.FlagHolder
  force: flags.FlagHolder
  no_progress: flags.FlagHolder
  traceback: flags.FlagHolder


class ConfigOverrideError(flags.Error):
  """A --config.<path> override or the --config file itself cannot be used; the message is one line."""


def config_file_in(argv: Sequence[str]) -> str:
  """The config file named by --config=PATH / --config PATH in argv (the last one), else DEFAULT_CONFIG."""
  path = DEFAULT_CONFIG
  for i, arg in enumerate(argv):
    match = _CONFIG_RE.match(arg)
    if match:
      if match.group(1) == "=":
        path = arg.split("=", 1)[1]
      elif i + 1 < len(argv):
        path = argv[i + 1]
  return path


def last_overrides_win(argv: Sequence[str]) -> list[str]:
  """argv with only the last --config.<path>=value of each path (absl appends a repeated tuple-valued flag:
  `--config.seeds=(0,) --config.seeds=(1,)` would run seeds (0, 1); here the last value wins, as for every
  other flag). The two-token form `--config.<path> value` is handled too."""
  argv = list(argv)
  spans, i = [], 0  # (path, start, end) of every override
  while i < len(argv):
    arg = argv[i]
    if _OVERRIDE_RE.match(arg):
      path = arg.split("=", 1)[0].split(".", 1)[1]
      takes_next = "=" not in arg and not arg.lstrip("-").startswith("no") and i + 1 < len(argv) \
          and not argv[i + 1].startswith("-")
      end = i + (2 if takes_next else 1)
      spans.append((path, i, end))
      i = end
    else:
      i += 1
  last = {path: start for path, start, _ in spans}
  dropped = {k for path, start, end in spans if last[path] != start for k in range(start, end)}
  return [arg for k, arg in enumerate(argv) if k not in dropped]


def override_paths(argv: Sequence[str]) -> list[str]:
  """The field paths of every --config.<path>[=value] (and --noconfig.<path>) in argv, in order."""
  return [arg.split("=", 1)[0].split(".", 1)[1] for arg in argv if _OVERRIDE_RE.match(arg)]


def leaf_paths(config, prefix: str = "") -> list[str]:
  """Dotted paths of the leaves of a ConfigDict (an empty sub-ConfigDict counts as a leaf)."""
  paths = []
  for key in config.keys():
    value = config[key]
    if isinstance(value, config_dict.ConfigDict) and len(value):
      paths.extend(leaf_paths(value, f"{prefix}{key}."))
    else:
      paths.append(f"{prefix}{key}")
  return paths


def section_paths(config, prefix: str = "") -> list[str]:
  """Dotted paths of the non-empty sub-ConfigDicts of a ConfigDict."""
  paths = []
  for key in config.keys():
    value = config[key]
    if isinstance(value, config_dict.ConfigDict) and len(value):
      paths.append(f"{prefix}{key}")
      paths.extend(section_paths(value, f"{prefix}{key}."))
  return paths


def _field_exists(config, path: str) -> bool:
  try:
    config_path.get_value(path, config)
    return True
  except (KeyError, IndexError, AttributeError, ValueError, TypeError):
    return False


def _new_key_in_open_section(config, path: str) -> bool:
  parent, _, key = path.rpartition(".")
  return (parent in OPEN_SECTIONS and key.isidentifier() and _field_exists(config, parent)
          and isinstance(config_path.get_value(parent, config), config_dict.ConfigDict))


def _shown(path: str) -> str:
  """path relative to the working directory when it is below it (the default config is absolute)."""
  rel = os.path.relpath(path) if os.path.isabs(path) else path
  return path if rel.startswith("..") else rel


def unknown_field_message(config, path: str, config_file: str) -> str:
  """One line: the unknown --config.<path>, the closest existing names (or the section's fields)."""
  # Close as a whole path, and close in the last name too: a shared section prefix alone
  # ("train.nonexistent" ~ "train.momentum") is no suggestion.
  last = path.rpartition(".")[2]
  candidates = leaf_paths(config) + section_paths(config)
  close = [c for c in difflib.get_close_matches(path, candidates, n=10, cutoff=0.6)
           if difflib.SequenceMatcher(None, last, c.rpartition(".")[2]).ratio() >= 0.5][:3]
  message = f"--{CONFIG_FLAG}.{path}: no such field in the config of {_shown(config_file)}"
  if close:
    return message + "; did you mean " + " or ".join(close) + "?"
  # No close name: list what the deepest existing section on the path holds.
  parts, section, node = path.split("."), "", config
  for part in parts[:-1]:
    child = node.get(part) if isinstance(node, config_dict.ConfigDict) else None
    if not isinstance(child, config_dict.ConfigDict):
      break
    section, node = f"{section}.{part}" if section else part, child
  where = f"config.{section}" if section else "the config"
  return message + f"; {where} has: " + ", ".join(sorted(node.keys()))


def check_config_overrides(argv: Sequence[str]) -> None:
  """Raises ConfigOverrideError (one line) for an unloadable --config file or an unknown --config.<path>.

  Runs before config_flags sees argv, so a typo never becomes a traceback from inside
  config_flags, whether or not --config=PATH is given.
  """
  argv = list(flags.FLAGS.read_flags_from_files(list(argv), force_gnu=False))
  paths = override_paths(argv)
  config_file = config_file_in(argv)
  explicit = any(_CONFIG_RE.match(arg) for arg in argv)
  if not paths and not explicit:
    return
  file_part = config_file.split(":", 1)[0]  # config_flags passes what follows ':' to get_config
  if not os.path.isfile(file_part):
    what = "is not a regular file" if os.path.exists(file_part) else "no such file"
    raise ConfigOverrideError(f"--{CONFIG_FLAG}={config_file}: {what}; give a Python file with "
                              "get_config(), e.g. --config=experiments/digits.py")
  if not file_part.endswith(".py"):
    raise ConfigOverrideError(f"--{CONFIG_FLAG}={config_file}: not a Python file (.py); give a Python file with "
                              "get_config(), e.g. --config=experiments/digits.py")
  # The same loader as the config flag; an error inside the config file is reported in one line with its place.
  try:
    config = config_flags_lib.ConfigFileFlagParser(name=CONFIG_FLAG, lock_config=False).parse(config_file)
  except Exception as e:  # noqa: BLE001 (user code: any error becomes one line naming the file and line)
    raise ConfigOverrideError(f"--{CONFIG_FLAG}={config_file}: loading it raised {type(e).__name__}: {e}"
                              f"{_error_place(e, file_part)}; fix the config file") from e
  if not isinstance(config, config_dict.ConfigDict):
    cause = getattr(config, "_error", None)  # config_flags defers an unreadable file's IOError
    detail = f" ({' '.join(str(cause).split())})" if cause is not None else ""
    raise ConfigOverrideError(f"--{CONFIG_FLAG}={config_file}: cannot load the config file{detail}; "
                              "give a Python file whose get_config() returns a ConfigDict")
  for path in paths:
    if not _field_exists(config, path) and not _new_key_in_open_section(config, path):
      raise ConfigOverrideError(unknown_field_message(config, path, config_file))


def _error_place(error: BaseException, path: str) -> str:
  """' (at <file>:<line>)' of the deepest traceback frame in ``path`` (or the SyntaxError's line), else ''."""
  if isinstance(error, SyntaxError) and error.lineno:
    return f" (at {path}:{error.lineno})"
  tb, line = error.__traceback__, None
  while tb is not None:
    if os.path.abspath(tb.tb_frame.f_code.co_filename) == os.path.abspath(path):
      line = tb.tb_lineno
    tb = tb.tb_next
  return f" (at {path}:{line})" if line else ""


def define_flags(flag_values: flags.FlagValues = flags.FLAGS, argv: Optional[Sequence[str]] = None) -> Flags:
  """Defines launch.py's flags on flag_values; returns their holders.

  argv: the command line the config overrides are read from (None: sys.argv when the
  config flag is parsed, as for `python launch.py`). Unknown --config.<path> fields are
  refused here with ConfigOverrideError. Use a fresh `flags.FlagValues()` to parse a
  command line in-process (see parse_flags).
  """
  check_config_overrides(sys.argv if argv is None else argv)
  return Flags(
      # lock_config=False with accept_new_attributes=True only so keys can be added to OPEN_SECTIONS
      # (check_config_overrides has refused every other unknown field); parse_flags locks the config.
      config=config_flags.DEFINE_config_file(
          CONFIG_FLAG, DEFAULT_CONFIG, "Study config file (a get_config() module).",
          flag_values=flag_values, lock_config=False, accept_new_attributes=True,
          sys_argv=None if argv is None else list(argv)),
      workdir=flags.DEFINE_string("workdir", None, "Output folder; default runs/<config.name>.",
                                  flag_values=flag_values),
      stages=flags.DEFINE_list("stages", None, "Comma-separated stages to run; default all available.",
                               flag_values=flag_values),
      force=flags.DEFINE_bool("force", False, "Rerun stages even if their outputs are in the workdir.",
                              flag_values=flag_values),
      no_progress=flags.DEFINE_bool("no_progress", False, "Hide progress bars.", flag_values=flag_values),
      traceback=flags.DEFINE_bool("traceback", False,
                                  "Show the full traceback of an fqjax error instead of its one-line message.",
                                  flag_values=flag_values),
  )


def parse_flags(argv: Sequence[str], flag_values: Optional[flags.FlagValues] = None):
  """Defines launch.py's flags on flag_values (default: a fresh FlagValues) and parses argv.

  argv[0] is the program name. Returns (Flags, remaining argv); the config is locked
  (no new fields) once parsed. Raises ConfigOverrideError or another flags.Error.
  """
  argv = last_overrides_win(argv)
  flag_values = flags.FlagValues() if flag_values is None else flag_values
  handles = define_flags(flag_values, argv)
  rest = flag_values(argv)
  config = handles.config.value
  if isinstance(config, config_dict.ConfigDict):
    config.lock()
  return handles, rest


def _usage_error(message: str) -> None:
  """One line on stderr, exit code 2 (a command-line mistake, nothing was run)."""
  sys.stderr.write(f"launch.py: error: {' '.join(str(message).split())}\n")
  sys.exit(2)


def print_error(error: BaseException) -> None:
  """`fqjax: error: <message>` and, if chained, one `(cause: ...)` line, on stderr."""
  from fqjax.errors import cause_summary
  sys.stderr.write(f"fqjax: error: {error}\n")
  cause = cause_summary(error)
  if cause:
    sys.stderr.write(f"  (cause: {cause}; rerun with --traceback for the full traceback)\n")


def format_stage_times(res: dict, total_s: float) -> str:
  """`stage wall times: data 0.2s, train skipped, ...; total 3.4s` for the stages of this run.

  Reads res["last_run"] (this invocation only); falls back to res["timings"] and the
  given total_s for results written before last_run existed.
  """
  last = res.get("last_run")
  if last and "stages" in last:
    stages = last["stages"]
    total_s = last.get("total_s", total_s)
  else:
    stages = res.get("timings", {})
  parts = [f"{name} {t:.1f}s" if isinstance(t, (int, float)) else f"{name} {t}" for name, t in stages.items()]
  return f"stage wall times: {', '.join(parts)}; total {total_s:.1f}s"


def main(argv, flags_: Flags):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from fqjax.training import parallel
  from fqjax.study import runner
  from fqjax.analysis import tables
  from fqjax.errors import FqjaxError

  try:
    config = flags_.config.value
    parallel.maybe_initialize_distributed(config.distributed)
    print(f"fqjax: {parallel.describe()}")
    workdir = flags_.workdir.value or os.path.join("runs", config.name)
    start = time.perf_counter()
    res = runner.run(config, workdir, flags_.stages.value, force=flags_.force.value,
                     progress=not flags_.no_progress.value)
    print(tables.ptq_table(res))
    for variant, entry in res.get("ptq", {}).get("variants", {}).items():  # the other PTQ variants
      print(f"ptq variant {variant}:\n" + tables.ptq_table({**res, "ptq": {**res["ptq"], **entry}}))
    if "mitigate" in res:
      print(tables.ablation_table(res["mitigate"]))
    if "claims" in res:
      print("claims of the paper, checked on this run:\n" + tables.claims_lines(res))
    print(format_stage_times(res, time.perf_counter() - start))
    print(f"results: {os.path.join(workdir, 'results.json')}, {os.path.join(workdir, 'results.csv')}")
  except FqjaxError as e:
    if flags_.traceback.value:
      raise
    sys.stdout.flush()
    print_error(e)
    sys.exit(1)
  except KeyboardInterrupt:
    if flags_.traceback.value:
      raise
    sys.stdout.flush()
    sys.stderr.write("fqjax: interrupted; rerun the same command to resume (finished entries are kept)\n")
    sys.exit(130)


def run_cli() -> None:
  """`python launch.py ...`: flags on absl's global FLAGS, one-line usage errors (exit 2)."""
  absl_logging.set_verbosity(absl_logging.WARNING)
  holder = {}

  def flags_parser(argv):
    try:
      holder["flags"], rest = parse_flags(argv, flags.FLAGS)
    except flags.Error as e:
      _usage_error(str(e))
    return rest

  app.run(lambda argv: main(argv, holder["flags"]), flags_parser=flags_parser)


if __name__ == "__main__":
  run_cli()
