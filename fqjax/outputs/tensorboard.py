"""TensorBoard scalars from a results.json dict, and a reader for event files that needs no TensorFlow.

write_scalars(workdir, results) rewrites workdir/tensorboard/{train,ptq,mitigate}/ from scratch:
  train/seed_<s>:                     step = epoch: train/loss, train/accuracy, val/accuracy,
                                      val/worst_group_accuracy (results["train"]["per_seed"][s]["history"])
  ptq/<variant, "/" -> "_">/seed_<s>: step = bits: ptq/accuracy, ptq/worst_group_accuracy,
                                      ptq/fairness_violation, ptq/group_accuracy/<group name> (the primary
                                      variant's ptq.per_seed and every ptq.variants[v].per_seed)
  mitigate/<method>/seed_<s>:         step = target bits: mitigate/accuracy, mitigate/worst_group_accuracy,
                                      mitigate/fairness_violation, mitigate/size_kb (size_bytes / 1024),
                                      mitigate/steps
Missing stages, missing fields and None/NaN/inf values are skipped, never written. Group names become tag-safe
(characters other than letters, digits, "_", "-", "." turn into "_", as TensorBoard requires). Other folders
under tensorboard/ are left alone. Values are stored as float32 (TensorBoard's simple_value).

read_scalars(path) parses the TFRecord framing itself and decodes each record with tensorboardX's Event proto.
"""
from __future__ import annotations

import math
import os
import re
import shutil
import struct
import tempfile
from typing import Any, Iterator, Mapping

OWNED = ("train", "ptq", "mitigate")  # the tensorboard/ subfolders write_scalars owns and rewrites
TRAIN_TAGS = (("train/loss", "train_loss"), ("train/accuracy", "train_accuracy"),
              ("val/accuracy", "val_accuracy"), ("val/worst_group_accuracy", "val_worst_group_accuracy"))
PTQ_TAGS = (("ptq/accuracy", "accuracy"), ("ptq/worst_group_accuracy", "worst_group_accuracy"),
            ("ptq/fairness_violation", "fairness_violation"))
MITIGATE_TAGS = (("mitigate/accuracy", "accuracy", 1.0),
                 ("mitigate/worst_group_accuracy", "worst_group_accuracy", 1.0),
                 ("mitigate/fairness_violation", "fairness_violation", 1.0),
                 ("mitigate/size_kb", "size_bytes", 1 / 1024), ("mitigate/steps", "steps", 1.0))
EVENT_PREFIX = "events.out.tfevents."
INSTALL_HINT = ("TensorBoard scalars need tensorboardX (pure Python, no TensorFlow): pip install tensorboardX; "
                "or turn the scalars off with --config.tensorboard=False")
_UNSAFE = re.compile(r"[^-\w.]")


def _tensorboardx():
  """The tensorboardX module, imported lazily: it is optional, and only this module needs it."""
  try:
    import tensorboardX
    import tensorboardX.proto.event_pb2  # noqa: F401  (read_scalars needs it; import errors surface here)
    import tensorboardX.record_writer  # noqa: F401
  except ImportError as e:
    raise ImportError(INSTALL_HINT) from e
  return tensorboardX


def safe_name(name: Any) -> str:
  """A tag or folder component: characters TensorBoard rejects, and "/", become "_"."""
  return _UNSAFE.sub("_", str(name)) or "_"


def _number(value: Any) -> float | None:
  """A finite float, or None for None, NaN, inf, booleans and anything that is not a number."""
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    return None
  value = float(value)
  return value if math.isfinite(value) else None


def _int_key(key: Any) -> int | None:
  try:
    return int(key)
  except (TypeError, ValueError):
    return None


def _seed_items(per_seed: Any) -> list[tuple[str, Any]]:
  """(seed, entry) pairs in numeric seed order (results.json keys seeds as strings)."""
  if not isinstance(per_seed, Mapping):
    return []
  return sorted(per_seed.items(), key=lambda kv: (_int_key(kv[0]) is None, _int_key(kv[0]) or 0, str(kv[0])))


def _bits_items(by_bits: Any) -> list[tuple[int, Mapping]]:
  """(bits, metrics) pairs in ascending bits, so TensorBoard's line runs left to right."""
  if not isinstance(by_bits, Mapping):
    return []
  items = [(_int_key(b), m) for b, m in by_bits.items()]
  return sorted((b, m) for b, m in items if b is not None and isinstance(m, Mapping))


def group_tags(results: Mapping, num_groups: int) -> list[str]:
  """ptq/group_accuracy/<name> per group: dataset.group_names made tag-safe (and unique), else group_<i>."""
  names = (results.get("dataset") or {}).get("group_names") or []
  if len(names) != num_groups:
    names = [f"group_{g}" for g in range(num_groups)]
  tags, seen = [], set()
  for g, name in enumerate(names):
    tag = safe_name(name)
    if tag in seen:  # two names that differ only in unsafe characters must not merge into one curve
      tag = f"{tag}_{g}"
    seen.add(tag)
    tags.append(f"ptq/group_accuracy/{tag}")
  return tags


def _train_runs(results: Mapping) -> dict[str, list]:
  runs = {}
  for seed, record in _seed_items((results.get("train") or {}).get("per_seed")):
    points = []
    for i, entry in enumerate((record or {}).get("history") or []):
      step = _int_key(entry.get("epoch", i))
      for tag, key in TRAIN_TAGS:
        points.append((tag, step, _number(entry.get(key))))
    runs[f"train/seed_{seed}"] = points
  return runs


def _ptq_points(results: Mapping, by_bits: Any) -> list:
  points = []
  for bits, m in _bits_items(by_bits):
    points += [(tag, bits, _number(m.get(key))) for tag, key in PTQ_TAGS]
    accuracy = (m.get("groups") or {}).get("accuracy") or []
    points += [(tag, bits, _number(a)) for tag, a in zip(group_tags(results, len(accuracy)), accuracy)]
  return points


def _ptq_runs(results: Mapping) -> dict[str, list]:
  ptq = results.get("ptq") or {}
  # The primary variant's entries are ptq.per_seed itself; the others sit under ptq.variants.
  sections = {ptq.get("variant") or "primary": ptq}
  sections.update({v: s for v, s in (ptq.get("variants") or {}).items() if isinstance(s, Mapping)})
  runs = {}
  for variant, section in sections.items():
    for seed, by_bits in _seed_items(section.get("per_seed")):
      runs[f"ptq/{safe_name(variant)}/seed_{seed}"] = _ptq_points(results, by_bits)
  return runs


def _mitigate_runs(results: Mapping) -> dict[str, list]:
  runs = {}
  for seed, by_method in _seed_items((results.get("mitigate") or {}).get("per_seed")):
    for method, by_bits in (by_method or {}).items():
      points = []
      for bits, m in _bits_items(by_bits):
        for tag, key, scale in MITIGATE_TAGS:
          value = _number(m.get(key))
          points.append((tag, bits, None if value is None else value * scale))
      runs[f"mitigate/{safe_name(method)}/seed_{seed}"] = points
  return runs


def collect_scalars(results: Mapping) -> dict[str, list[tuple[str, int, float]]]:
  """{run folder relative to tensorboard/: [(tag, step, value)]} of everything write_scalars writes.

  Points without a value or step are dropped, and so are runs left without points."""
  runs = {**_train_runs(results), **_ptq_runs(results), **_mitigate_runs(results)}
  runs = {run: [(t, s, v) for t, s, v in points if s is not None and v is not None]
          for run, points in runs.items()}
  return {run: points for run, points in runs.items() if points}


def _write_run(summary_writer, logdir: str, points: list) -> None:
  writer = summary_writer(logdir=logdir)
  try:
    for tag, step, value in points:
      writer.add_scalar(tag, value, global_step=step)
    writer.flush()
  finally:
    writer.close()


def _replace_owned(staging: str, root: str) -> None:
  """Moves staging/<owned> over root/<owned>: old folder aside first, new one in, then the old one deleted.

  Renames within one file system never leave a half-written run in root; other root entries are kept."""
  os.makedirs(root, exist_ok=True)
  trash = tempfile.mkdtemp(dir=os.path.dirname(root), prefix=".tensorboard_old_")
  try:
    for name in OWNED:
      old, new = os.path.join(root, name), os.path.join(staging, name)
      if os.path.lexists(old):
        os.rename(old, os.path.join(trash, name))
      if os.path.exists(new):
        os.rename(new, old)
  finally:
    shutil.rmtree(trash, ignore_errors=True)


def event_files(root: str) -> list[str]:
  """The event files under root's owned folders (train/, ptq/, mitigate/), sorted."""
  found = []
  for name in OWNED:
    for folder, _, files in os.walk(os.path.join(root, name)):
      found += [os.path.join(folder, f) for f in files if f.startswith(EVENT_PREFIX)]
  return sorted(found)


def write_scalars(workdir: str, results: Mapping) -> list[str]:
  """Writes results' scalars (see the module docstring) under workdir/tensorboard/; returns the event files.

  Every call rewrites train/, ptq/ and mitigate/ from scratch, so a rerun never duplicates points: the runs
  are written into a temporary sibling folder first and swapped in only once all of them are closed.
  Raises ImportError (with the pip command and the config switch) when tensorboardX is not installed."""
  tbx = _tensorboardx()
  runs = collect_scalars(results)
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  root = os.path.join(workdir, "tensorboard")
  staging = tempfile.mkdtemp(dir=workdir, prefix=".tensorboard_tmp_")
  try:
    for run, points in runs.items():
      _write_run(tbx.SummaryWriter, os.path.join(staging, *run.split("/")), points)
    _replace_owned(staging, root)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return event_files(root)


def _records(path: str) -> Iterator[bytes]:
  """Each TFRecord's data: u64 length, u32 masked crc32c of the length, data, u32 masked crc32c of the data.

  A truncated last record (a writer still appending) ends the file quietly; a bad checksum raises ValueError."""
  from tensorboardX.record_writer import masked_crc32c
  with open(path, "rb") as f:
    offset = 0
    while True:
      header = f.read(12)
      if len(header) < 12:
        return
      (length,), (length_crc,) = struct.unpack("<Q", header[:8]), struct.unpack("<I", header[8:])
      if masked_crc32c(header[:8]) != length_crc:
        raise ValueError(f"{path}: corrupt record length at byte {offset}")
      data, footer = f.read(length), f.read(4)
      if len(data) < length or len(footer) < 4:
        return
      if masked_crc32c(data) != struct.unpack("<I", footer)[0]:
        raise ValueError(f"{path}: corrupt record data at byte {offset}")
      offset += 16 + length
      yield data


def _value(v) -> float | None:
  """A Summary.Value's scalar: simple_value (tensorboardX's default) or a one-element float/double tensor."""
  if v.WhichOneof("value") == "simple_value":
    return float(v.simple_value)
  if v.WhichOneof("value") == "tensor":
    t = v.tensor
    if len(t.double_val) == 1 or len(t.float_val) == 1:
      return float((t.double_val or t.float_val)[0])
    fmt = {1: "<f", 2: "<d"}.get(t.dtype)  # DT_FLOAT, DT_DOUBLE
    if fmt and len(t.tensor_content) == struct.calcsize(fmt):
      return float(struct.unpack(fmt, t.tensor_content)[0])
  return None


def read_scalars(path: str) -> dict[str, list[tuple[int, float]]]:
  """{tag: [(step, value)]} in file order from an event file, or from every event file directly in a folder.

  Needs tensorboardX (for the Event proto) but neither TensorFlow nor tensorboard."""
  _tensorboardx()
  from tensorboardX.proto.event_pb2 import Event
  paths = [path]
  if os.path.isdir(path):
    paths = sorted(os.path.join(path, f) for f in os.listdir(path) if f.startswith(EVENT_PREFIX))
  scalars: dict[str, list[tuple[int, float]]] = {}
  for p in paths:
    for data in _records(p):
      event = Event.FromString(data)
      if event.WhichOneof("what") != "summary":
        continue
      for v in event.summary.value:
        value = _value(v)
        if value is not None:
          scalars.setdefault(v.tag, []).append((int(event.step), value))
  return scalars
