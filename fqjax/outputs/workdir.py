"""The workdir's own files: the lock, the log, checkpoint folders' keys (written by fqjax.study.runner only), and
the checks the CLIs that read a finished workdir (report, allocate) make first.

  .fqjax.lock   an OS file lock (flock) held for a whole run; it holds the pid and start time of
                its holder, so a second process is refused with a message naming them
  fqjax.log     each run's log is appended; the handler is removed when the run ends, so a second
                run in the same process never writes into the first one's workdir
  <checkpoint folder>/KEY   the cache key of the run whose checkpoints the folder holds
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
from typing import Optional

from fqjax.outputs import results
from fqjax.errors import WorkdirError

log = logging.getLogger("fqjax")
LOCK_FILE = ".fqjax.lock"
KEY_FILE = "KEY"
KEY_PARTS_FILE = "KEY.parts.json"


@contextlib.contextmanager
def workdir_lock(workdir: str):
  """Holds an exclusive OS lock on ``workdir`` (released on exit, also when the process dies).

  Raises WorkdirError at once, naming the holder's pid and start time, when another process holds it.
  """
  path = os.path.join(workdir, LOCK_FILE)
  try:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  except OSError as e:
    raise WorkdirError(f"--workdir {workdir} cannot be written to ({e.strerror}: {path}); choose a folder you can "
                       "write to.") from e
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError:
    holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown process"
    os.close(fd)
    raise WorkdirError(f"{workdir} is in use by another fqjax process ({holder}); wait for it to finish, or "
                       "use another --workdir.") from None
  try:
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()}, started {results.now()}\n".encode(), 0)
    yield
  finally:
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def in_use_by(workdir: str) -> Optional[str]:
  """The holder ("pid N, started T") of ``workdir``'s lock when another process runs a study there, else None.
  Probes with a shared non-blocking lock, released at once."""
  path = os.path.join(workdir, LOCK_FILE)
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:
    return None  # no lock file: no run has held it
  try:
    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    fcntl.flock(fd, fcntl.LOCK_UN)
    return None
  except OSError:
    return os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown process"
  finally:
    os.close(fd)


def check_finished_workdir(workdir: str, needs: str) -> None:
  """Refuses, in one line, a path that is no study workdir for a CLI reading one: missing, a file, without
  the file ``needs`` (e.g. "results.json"), or in use by a running study (its results are half-written)."""
  if not os.path.exists(workdir):
    raise WorkdirError(f"workdir {workdir!r} does not exist; give the --workdir of a study run by launch.py.")
  if not os.path.isdir(workdir):
    raise WorkdirError(f"workdir {workdir!r} is a file, not a folder; give the --workdir of a study run by "
                       "launch.py.")
  holder = in_use_by(workdir)
  if holder:
    raise WorkdirError(f"{workdir} is in use by a running fqjax study ({holder}); wait for it to finish: its "
                       "results are not complete yet.")
  if not os.path.isfile(os.path.join(workdir, needs)):
    raise WorkdirError(f"no {needs} in {workdir!r}; rerun the study's launch.py command with --workdir {workdir} "
                       f"(it writes {needs}), or run a study there first.")


@contextlib.contextmanager
def log_file(workdir: str):
  """Appends this run's log to workdir/fqjax.log; the handler is removed afterwards."""
  handler = logging.FileHandler(os.path.abspath(os.path.join(workdir, "fqjax.log")))
  handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
  log.setLevel(logging.INFO)
  log.addHandler(handler)
  try:
    yield
  finally:
    log.removeHandler(handler)
    handler.close()


def claim_checkpoints(folder: str, key: str, fresh: bool) -> None:
  """Makes ``folder`` the checkpoint folder of ``key``: one of another key (or none) is deleted first."""
  path = os.path.join(folder, KEY_FILE)
  held = open(path).read().strip() if os.path.exists(path) else None
  if fresh or (os.path.isdir(folder) and held != key):
    shutil.rmtree(folder, ignore_errors=True)
  if not os.path.exists(path):
    results.atomic_write_text(path, key + "\n")


def write_key_parts(folder: str, parts: dict) -> None:
  """The parts of a checkpoint's key (fqjax.study.cache.train_key_parts), beside its KEY file."""
  results.atomic_write_text(os.path.join(folder, KEY_PARTS_FILE), json.dumps(parts, sort_keys=True) + "\n")


def key_parts(folder: str) -> Optional[dict]:
  """The stored key parts of a checkpoint folder, or None (none written, or unreadable)."""
  try:
    with open(os.path.join(folder, KEY_PARTS_FILE)) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def checkpoint_key(folder: str) -> Optional[str]:
  path = os.path.join(folder, KEY_FILE)
  return open(path).read().strip() if os.path.exists(path) else None


def check_workdir(workdir: str) -> None:
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise WorkdirError(f"--workdir {workdir} is a file, not a folder; choose another --workdir (or move the "
                       "file away).")


def make_workdir(workdir: str) -> None:
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, ".fqjax.write_probe")
    with open(probe, "w"):
      pass
    os.remove(probe)
  except OSError as e:
    raise WorkdirError(f"--workdir {workdir} cannot be created ({e.strerror}); choose a folder you can write "
                       "to.") from e
