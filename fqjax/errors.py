"""fqjax's own errors: one sentence a user can act on, with the low-level cause chained.

`launch.py` prints an `FqjaxError` as its message alone (the cause's type and first line
follow on one line; `--traceback` shows everything), so a corrupted checkpoint reads as
"what file, what is wrong, how to recover" instead of a 200-line orbax traceback.
"""
from __future__ import annotations


class FqjaxError(Exception):
  """Base class: its message is complete on its own and says how to recover."""


class InputError(FqjaxError, ValueError):
  """Data or a config value that cannot be used as given (ValueError for older callers)."""


class MissingFileError(FqjaxError, FileNotFoundError):
  """A file the study needs is not there (FileNotFoundError for older callers)."""


class StaleModelError(FqjaxError):
  """A stage needs a trained model whose checkpoint was trained on other inputs (data, model, train config)."""


class WorkdirError(FqjaxError):
  """The workdir itself is unusable (a file, not writable)."""


class CorruptFileError(FqjaxError):
  """A file in the workdir or a data file is unreadable; nothing was changed."""

  def __init__(self, path: str, problem: str, recovery: str):
    self.path, self.problem, self.recovery = path, problem, recovery
    super().__init__(f"{path}: {problem}. {recovery}")


def cause_summary(error: BaseException) -> str:
  """'Type: first line' of the chained cause (or context), '' when there is none."""
  cause = error.__cause__ or error.__context__
  if cause is None:
    return ""
  first = (str(cause).strip().splitlines() or [""])[0]
  if len(first) > 200:
    first = first[:197] + "..."
  return f"{type(cause).__name__}: {first}" if first else type(cause).__name__
