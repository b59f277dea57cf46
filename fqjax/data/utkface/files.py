"""UTKFace files: name parsing, safe archive extraction, finding and decoding the images.

No TFDS here (builder.py wraps these in a TFDS builder). UTKFace (Zhang, Song
and Qi, CVPR 2017; https://susanqq.github.io/UTKFace/) names every image
``age_gender_race_date.jpg``; the aligned-and-cropped set adds ``.chip.jpg``
(``25_0_3_20170119171058347.jpg.chip.jpg``):

  age:    0..116 (integer years)
  gender: 0 Male, 1 Female
  race:   0 White, 1 Black, 2 Asian, 3 Indian, 4 Others
  date:   yyyymmddHHMMSSFFF, when the photo was collected

A few official names are malformed (a field missing, e.g.
``39_1_20170116174525125.jpg.chip.jpg``): they are skipped, logged and counted.
"""
from __future__ import annotations

import logging
import os
import posixpath
import re
import shutil
import tarfile
import tempfile
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

log = logging.getLogger("fqjax.data.utkface")

NAME = "utkface"
RACE_NAMES = ("White", "Black", "Asian", "Indian", "Others")
GENDER_NAMES = ("Male", "Female")
MAX_AGE = 130  # official ages go to 116; anything above is a typo, not a person
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
MAX_LISTED = 20  # how many skipped names the stats keep as examples

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Download UTKFace from https://susanqq.github.io/UTKFace/ ("Aligned&Cropped Faces",
UTKFace.tar.gz; or "crop_part1.tar.gz") and place the archive, or its extracted
UTKFace/ or crop_part1/ folder, in the manual dir, then run
  python -m fqjax.data.utkface --manual_dir <manual_dir> --data_dir <data_dir> --image_size 64
"""

_NAME_RE = re.compile(r"^(\d+)_(\d+)_(\d+)_(\d+)$")
_SUFFIX_RE = re.compile(r"\.jpg(\.chip\.jpg)?$", re.IGNORECASE)


# ----------------------------------------------------------------------------
# File names
# ----------------------------------------------------------------------------

class Attributes(NamedTuple):
  """What a UTKFace file name says about its face."""
  age: int
  gender: int
  race: int
  date: str


class MalformedName(ValueError):
  """A .jpg whose name is not age_gender_race_date.jpg[.chip.jpg]."""


def is_jpeg_name(name: str) -> bool:
  """True for names ending in .jpg (any case), including .jpg.chip.jpg."""
  return bool(_SUFFIX_RE.search(posixpath.basename(name.replace("\\", "/"))))


def parse_file_name(name: str) -> Attributes:
  """Parses ``age_gender_race_date.jpg`` or ``age_gender_race_date.jpg.chip.jpg``.

  Args:
    name: a file name or path (only the base name is read).

  Returns:
    Attributes(age, gender, race, date).

  Raises:
    MalformedName: with the reason, for any other pattern or an out-of-range field.
  """
  base = posixpath.basename(name.replace("\\", "/"))
  suffix = _SUFFIX_RE.search(base)
  if not suffix:
    raise MalformedName(f"{base!r}: not a .jpg / .jpg.chip.jpg file")
  match = _NAME_RE.match(base[:suffix.start()])
  if not match:
    raise MalformedName(f"{base!r}: expected age_gender_race_date.jpg (four '_'-separated integers)")
  age, gender, race, date = int(match[1]), int(match[2]), int(match[3]), match[4]
  if age > MAX_AGE:
    raise MalformedName(f"{base!r}: age {age} is above {MAX_AGE}")
  if gender >= len(GENDER_NAMES):
    raise MalformedName(f"{base!r}: gender {gender} is not 0 (Male) or 1 (Female)")
  if race >= len(RACE_NAMES):
    raise MalformedName(f"{base!r}: race {race} is not in 0..4 {RACE_NAMES}")
  return Attributes(age=age, gender=gender, race=race, date=date)


# ----------------------------------------------------------------------------
# Safe extraction
# ----------------------------------------------------------------------------

class UnsafeArchiveError(ValueError):
  """An archive member would be written (or would point) outside the extraction folder."""


def _unsafe(archive: str, member: str, why: str) -> UnsafeArchiveError:
  return UnsafeArchiveError(
      f"Refusing to extract {archive!r}: member {member!r} {why}. Nothing was extracted. "
      "The official UTKFace archives contain only relative paths under UTKFace/ or crop_part1/; "
      "re-download the archive from https://susanqq.github.io/UTKFace/ or extract it yourself "
      "after inspecting it, and place the image folder in the manual dir.")


def _inside(relative: str) -> bool:
  """True if a relative POSIX path, normalized, stays inside its root."""
  norm = posixpath.normpath(relative)
  return norm != ".." and not norm.startswith("../")


def _check_members(archive: str, members: Sequence[tarfile.TarInfo]) -> None:
  for m in members:
    name = m.name
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
      raise _unsafe(archive, name, "has an absolute path")
    if not _inside(name):
      raise _unsafe(archive, name, "would land outside the target folder (path traversal with '..')")
    if m.issym():
      if m.linkname.startswith(("/", "\\")):
        raise _unsafe(archive, name, f"is a symlink to the absolute path {m.linkname!r}")
      if not _inside(posixpath.join(posixpath.dirname(name), m.linkname)):
        raise _unsafe(archive, name, f"is a symlink pointing outside the target folder ({m.linkname!r})")
    elif m.islnk():
      if m.linkname.startswith(("/", "\\")) or not _inside(m.linkname):
        raise _unsafe(archive, name, f"is a hard link to {m.linkname!r}, outside the target folder")
    elif not (m.isfile() or m.isdir()):
      raise _unsafe(archive, name, "is a device, FIFO or other special file")


def safe_extract(archive: str, target_dir: str) -> List[str]:
  """Extracts a tar archive into ``target_dir``, refusing anything that could escape it.

  Every member is checked before anything is written: absolute paths, '..'
  traversal, symlinks or hard links pointing outside, and special files raise
  UnsafeArchiveError. Extraction then runs with tarfile's 'data' filter, which
  re-checks each path against the real file system (catching escapes through
  chains of in-archive symlinks), into a temporary sibling folder that is
  renamed to ``target_dir`` only on success; a refused archive leaves nothing.

  Args:
    archive: path to a .tar, .tar.gz, .tgz, .tar.bz2 or .tar.xz file.
    target_dir: folder to create; must not exist yet.

  Returns:
    The extracted regular files, as paths under target_dir (sorted).
  """
  if os.path.exists(target_dir):
    raise FileExistsError(f"safe_extract: target folder {target_dir!r} already exists; remove it or pick another.")
  try:
    tar = tarfile.open(archive, "r:*")
  except (tarfile.TarError, OSError) as error:
    raise ValueError(
        f"Cannot read {archive!r} as a tar archive ({error}). Expected UTKFace.tar.gz or "
        "crop_part1.tar.gz from https://susanqq.github.io/UTKFace/, or place the extracted "
        "image folder in the manual dir instead.") from error
  parent = os.path.dirname(os.path.abspath(target_dir))
  os.makedirs(parent, exist_ok=True)
  partial = tempfile.mkdtemp(prefix=os.path.basename(target_dir) + ".partial-", dir=parent)
  try:
    with tar:
      members = tar.getmembers()
      _check_members(archive, members)
      try:
        tar.extractall(partial, members=members, filter="data")
      except tarfile.FilterError as error:
        member = getattr(error, "tarinfo", None)
        raise _unsafe(archive, member.name if member is not None else "?",
                      f"was refused by tarfile's data filter ({error})") from error
    os.rename(partial, target_dir)
  except BaseException:
    shutil.rmtree(partial, ignore_errors=True)
    raise
  return sorted(os.path.join(target_dir, m.name) for m in members if m.isfile())


# ----------------------------------------------------------------------------
# Finding the images
# ----------------------------------------------------------------------------

class Scan(NamedTuple):
  """What a manual dir holds.

  examples: [(path, Attributes)] sorted by file name, one per distinct name.
  stats: JSON-ready counts (see prepare()).
  """
  examples: List[Tuple[str, Attributes]]
  stats: Dict[str, object]


def _archive_stem(file_name: str) -> Optional[str]:
  lower = file_name.lower()
  for suffix in ARCHIVE_SUFFIXES:
    if lower.endswith(suffix):
      return file_name[:-len(suffix)]
  return None


def _files_under(folder: str) -> List[str]:
  out = []
  for root, dirs, files in os.walk(folder):
    dirs.sort()
    out.extend(os.path.join(root, f) for f in sorted(files))
  return out


def _extract_cached(archive: str, extract_root: str) -> str:
  """Extracts once; a marker with the archive's size and mtime makes later runs reuse it."""
  st = os.stat(archive)
  stamp = f"{os.path.basename(archive)} {st.st_size} {int(st.st_mtime)}"
  target = os.path.join(extract_root, f"{NAME}-{os.path.basename(archive)}")
  marker = target + ".done"
  if os.path.isdir(target) and os.path.isfile(marker):
    with open(marker) as f:
      if f.read() == stamp:
        return target
  if os.path.exists(target):
    shutil.rmtree(target)
  log.info("Extracting %s to %s", archive, target)
  safe_extract(archive, target)
  with open(marker, "w") as f:
    f.write(stamp)
  return target


def scan_manual_dir(manual_dir: str, extract_root: str) -> Scan:
  """Lists the UTKFace images in a manual dir, extracting archives as needed.

  Sources, in sorted order: sub-folders (searched recursively), archives (an
  archive is skipped when a folder of the same stem exists: UTKFace.tar.gz next
  to UTKFace/ is the same data), and loose JPEGs in manual_dir itself.

  Args:
    manual_dir: where the user placed the download.
    extract_root: where archives are extracted.

  Returns:
    Scan(examples, stats) with stats keys: sources, skipped_malformed,
    skipped_malformed_names (at most 20), duplicates, ignored_files.
  """
  if not os.path.isdir(manual_dir):
    raise FileNotFoundError(
        f"UTKFace manual dir {manual_dir!r} does not exist.\n{MANUAL_DOWNLOAD_INSTRUCTIONS}")
  sources, files = _source_files(manual_dir, extract_root)
  by_name, malformed, ignored, duplicates = _parse_names(files)
  for reason in malformed:
    log.warning("UTKFace: skipping malformed file name %s", reason)
  if ignored:
    log.info("UTKFace: ignoring %d non-JPEG file(s), e.g. %s", len(ignored), ignored[:3])
  if not by_name:
    raise FileNotFoundError(
        f"No UTKFace images with valid names found in {manual_dir!r} (sources: {sources or 'none'}; "
        f"{len(malformed)} malformed JPEG name(s), {len(ignored)} other file(s)).\n"
        f"{MANUAL_DOWNLOAD_INSTRUCTIONS}")
  stats = {
      "sources": sources,
      "skipped_malformed": len(malformed),
      "skipped_malformed_names": malformed[:MAX_LISTED],
      "duplicates": duplicates,
      "ignored_files": len(ignored),
  }
  return Scan(examples=[by_name[k] for k in sorted(by_name)], stats=stats)


def _source_files(manual_dir: str, extract_root: str) -> Tuple[list, list]:
  """(source names, file paths) of a manual dir: its folders, its archives (extracted; skipped when a folder
  of the same stem exists) and its loose files, in that order."""
  entries = sorted(e for e in os.listdir(manual_dir) if not e.startswith("."))
  folders = [e for e in entries if os.path.isdir(os.path.join(manual_dir, e))]
  sources, files = [], []
  for e in folders:
    sources.append(e + "/")
    files.extend(_files_under(os.path.join(manual_dir, e)))
  for e in entries:
    stem = _archive_stem(e)
    if stem is None or not os.path.isfile(os.path.join(manual_dir, e)):
      continue
    if stem in folders:
      log.info("Skipping %s: the folder %s/ holds its contents already.", e, stem)
      continue
    sources.append(e)
    files.extend(_files_under(_extract_cached(os.path.join(manual_dir, e), extract_root)))
  loose = [os.path.join(manual_dir, e) for e in entries
           if os.path.isfile(os.path.join(manual_dir, e)) and _archive_stem(e) is None]
  if any(is_jpeg_name(p) for p in loose):
    sources.append("./")
  files.extend(loose)
  return sources, files


def _parse_names(files) -> Tuple[Dict[str, Tuple[str, Attributes]], list, list, int]:
  """(first path and attributes per JPEG base name, malformed-name reasons, ignored non-JPEG names, duplicates)."""
  by_name: Dict[str, Tuple[str, Attributes]] = {}
  malformed, ignored, duplicates = [], [], 0
  for path in files:
    base = os.path.basename(path)
    if not is_jpeg_name(base):
      ignored.append(base)
      continue
    try:
      attributes = parse_file_name(base)
    except MalformedName as error:
      malformed.append(str(error))
      continue
    if base in by_name:
      duplicates += 1
      continue
    by_name[base] = (path, attributes)
  return by_name, malformed, ignored, duplicates


def load_image(path: str, image_size: int) -> np.ndarray:
  """Decodes a JPEG, center-crops it to a square and resizes: [S, S, 3] uint8."""
  from PIL import Image, ImageOps  # pylint: disable=g-import-not-at-top
  with Image.open(path) as image:
    image = image.convert("RGB")
    if image.size != (image_size, image_size):
      image = ImageOps.fit(image, (image_size, image_size), method=Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.uint8)
