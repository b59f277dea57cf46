"""Tests for fqjax.data.utkface on small archives of real JPEGs written here with PIL."""
import io
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from fqjax.data import utkface

# (file name, RGB colour, (width, height)). Colours are solid so that a resized
# image can be matched to its labels by its mean colour.
VALID = [
    ("25_0_3_20170119171058347.jpg.chip.jpg", (200, 30, 30), (40, 40)),
    ("1_1_0_20161219140623097.jpg.chip.jpg", (30, 200, 30), (30, 50)),  # not square: center crop
    ("80_0_4_20170110182418864.JPG", (30, 30, 200), (24, 24)),
    ("45_1_1_20170109150557335.jpg", (200, 200, 30), (16, 16)),
    ("33_0_2_20170116174525125.jpg.chip.jpg", (120, 120, 120), (40, 40)),
]
MALFORMED = [
    "39_1_20170116174525125.jpg.chip.jpg",  # race missing: occurs in the official set
    "20_0_7_20170110000000000.jpg",  # race 7
    "20_2_1_20170110000000000.jpg",  # gender 2
    "abc_0_1_20170110000000000.jpg",
    "._25_0_3_20170119171058347.jpg.chip.jpg",  # macOS resource fork
]
CORRUPT = "50_0_0_20170101000000000.jpg.chip.jpg"  # valid name, not a JPEG inside
SIZE = 8


def _jpeg(color, size):
  buf = io.BytesIO()
  Image.fromarray(np.full((size[1], size[0], 3), color, np.uint8)).save(buf, format="JPEG", quality=95)
  return buf.getvalue()


def _add(tar, name, data):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def _write_archive(path, folder="UTKFace"):
  with tarfile.open(path, "w:gz") as tar:
    for name, color, size in VALID:
      _add(tar, f"{folder}/{name}", _jpeg(color, size))
    for name in MALFORMED:
      _add(tar, f"{folder}/{name}", _jpeg((0, 0, 0), (8, 8)))
    _add(tar, f"{folder}/{CORRUPT}", b"this is not a jpeg")
    _add(tar, f"{folder}/README.txt", b"UTKFace")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  root = tmp_path_factory.mktemp("utkface")
  manual = root / "manual"
  manual.mkdir()
  _write_archive(manual / "UTKFace.tar.gz")
  stats = utkface.prepare(str(root / "data"), str(manual), SIZE)
  return root, stats


# ----------------------------------------------------------------------------
# File names
# ----------------------------------------------------------------------------

def test_parse_file_name_both_suffixes():
  assert utkface.parse_file_name("25_0_3_20170119171058347.jpg.chip.jpg") == (25, 0, 3, "20170119171058347")
  assert utkface.parse_file_name("some/dir/9_1_4_2017.jpg") == (9, 1, 4, "2017")
  assert utkface.parse_file_name("9_1_4_2017.JPG").race == 4


@pytest.mark.parametrize("name,match", [
    ("39_1_20170116174525125.jpg.chip.jpg", "four '_'-separated integers"),
    ("20_0_5_2017.jpg", "race 5 is not in 0..4"),
    ("20_2_1_2017.jpg", "gender 2"),
    ("131_0_1_2017.jpg", "age 131 is above 130"),
    ("20_0_1_2017.png", "not a .jpg"),
    ("20_0_1_.jpg", "four"),
])
def test_parse_file_name_malformed(name, match):
  with pytest.raises(utkface.MalformedName, match=match):
    utkface.parse_file_name(name)


# ----------------------------------------------------------------------------
# Safe extraction
# ----------------------------------------------------------------------------

def _tar_with(path, members):
  """members: list of (TarInfo kwargs, data or None)."""
  with tarfile.open(path, "w") as tar:
    for kw, data in members:
      info = tarfile.TarInfo(kw.pop("name"))
      for k, v in kw.items():
        setattr(info, k, v)
      if data is not None:
        info.size = len(data)
      tar.addfile(info, io.BytesIO(data) if data is not None else None)
  return str(path)


GOOD = ({"name": "UTKFace/1_0_0_2017.jpg"}, b"x")
SYM = tarfile.SYMTYPE


@pytest.mark.parametrize("bad,match", [
    ({"name": "../evil.jpg"}, "outside the target folder"),
    ({"name": "UTKFace/../../evil.jpg"}, "outside the target folder"),
    ({"name": "/tmp/evil.jpg"}, "absolute path"),
    ({"name": "UTKFace/link.jpg", "type": SYM, "linkname": "/etc/passwd"}, "symlink to the absolute path"),
    ({"name": "UTKFace/link.jpg", "type": SYM, "linkname": "../../outside.jpg"}, "symlink pointing outside"),
    ({"name": "UTKFace/hard.jpg", "type": tarfile.LNKTYPE, "linkname": "../x.jpg"}, "hard link"),
    ({"name": "UTKFace/fifo", "type": tarfile.FIFOTYPE}, "special file"),
])
def test_safe_extract_refuses_escapes(tmp_path, bad, match):
  name = bad["name"]
  archive = _tar_with(tmp_path / "a.tar", [(dict(GOOD[0]), GOOD[1]),
                                          (dict(bad), None if "type" in bad else b"evil")])
  target = tmp_path / "out" / "t"
  with pytest.raises(utkface.UnsafeArchiveError, match=match) as info:
    utkface.safe_extract(archive, str(target))
  assert repr(name) in str(info.value) and "Nothing was extracted" in str(info.value)
  # Nothing written: no target, no leftover partial folder, no escaped file.
  assert os.listdir(tmp_path / "out") == []
  assert not (tmp_path / "evil.jpg").exists()


def test_safe_extract_catches_escape_through_symlink_chain(tmp_path):
  # Each link alone resolves inside by name, but sub/e -> d/.. with d -> .. lands outside:
  # only the real file system sees it, which tarfile's data filter checks.
  archive = _tar_with(tmp_path / "a.tar", [
      ({"name": "sub", "type": tarfile.DIRTYPE}, None),
      ({"name": "sub/d", "type": SYM, "linkname": ".."}, None),
      ({"name": "sub/e", "type": SYM, "linkname": "d/.."}, None),
      ({"name": "sub/e/escaped.jpg"}, b"evil"),
  ])
  with pytest.raises(utkface.UnsafeArchiveError, match="data filter"):
    utkface.safe_extract(archive, str(tmp_path / "out" / "t"))
  assert os.listdir(tmp_path / "out") == []
  assert not (tmp_path / "escaped.jpg").exists() and not (tmp_path / "out" / "escaped.jpg").exists()


def test_safe_extract_good_archive(tmp_path):
  archive = _tar_with(tmp_path / "a.tar", [
      (dict(GOOD[0]), GOOD[1]),
      ({"name": "UTKFace/inside.jpg", "type": SYM, "linkname": "1_0_0_2017.jpg"}, None),
  ])
  files = utkface.safe_extract(archive, str(tmp_path / "t"))
  assert files == [str(tmp_path / "t" / "UTKFace" / "1_0_0_2017.jpg")]
  assert (tmp_path / "t" / "UTKFace" / "inside.jpg").read_bytes() == b"x"
  with pytest.raises(FileExistsError, match="already exists"):
    utkface.safe_extract(archive, str(tmp_path / "t"))
  (tmp_path / "notatar.tar.gz").write_bytes(b"garbage")
  with pytest.raises(ValueError, match="Cannot read .* as a tar archive"):
    utkface.safe_extract(str(tmp_path / "notatar.tar.gz"), str(tmp_path / "u"))


def test_prepare_refuses_unsafe_archive(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  _tar_with(manual / "UTKFace.tar", [(dict(GOOD[0]), GOOD[1]), ({"name": "../evil.jpg"}, b"evil")])
  with pytest.raises(utkface.UnsafeArchiveError, match="'../evil.jpg'"):
    utkface.prepare(str(tmp_path / "data"), str(manual), SIZE)
  assert not (tmp_path / "data" / "downloads" / "evil.jpg").exists()


# ----------------------------------------------------------------------------
# The builder end to end
# ----------------------------------------------------------------------------

def test_prepare_counts_skipped(prepared):
  _, stats = prepared
  assert stats["num_examples"] == len(VALID)
  assert stats["skipped_malformed"] == len(MALFORMED)
  assert len(stats["skipped_malformed_names"]) == len(MALFORMED)
  assert any("39_1_20170116174525125.jpg.chip.jpg" in s for s in stats["skipped_malformed_names"])
  assert stats["skipped_unreadable"] == 1 and stats["skipped_unreadable_names"] == [CORRUPT]
  assert stats["ignored_files"] == 1 and stats["duplicates"] == 0
  assert stats["sources"] == ["UTKFace.tar.gz"]


def test_read_prepared_arrays_match_names_and_pixels(prepared):
  root, _ = prepared
  data = utkface.read_prepared(str(root / "data"), SIZE)
  n = len(VALID)
  assert data["image"].shape == (n, SIZE, SIZE, 3) and data["image"].dtype == np.uint8
  for key in ("race", "gender", "age"):
    assert data[key].shape == (n,) and data[key].dtype == np.int32
  by_name = {name: i for i, name in enumerate(data["file_name"])}
  assert set(by_name) == {name for name, _, _ in VALID}
  for name, color, _ in VALID:
    i = by_name[name]
    attrs = utkface.parse_file_name(name)
    assert (data["age"][i], data["gender"][i], data["race"][i]) == (attrs.age, attrs.gender, attrs.race)
    np.testing.assert_allclose(data["image"][i].reshape(-1, 3).mean(0), color, atol=6)


def test_prepared_stats_persist_and_prepare_reuses(prepared):
  root, stats = prepared
  stored = utkface.prepared_stats(str(root / "data"), SIZE)
  assert stored["skipped_malformed"] == len(MALFORMED) and stored["num_examples"] == len(VALID)
  # A second prepare reuses the dataset (same stats, no rebuild).
  again = utkface.prepare(str(root / "data"), str(root / "manual"), SIZE)
  assert again == stats


def test_tfds_data_source_reads_it(prepared):
  import tensorflow_datasets as tfds
  root, _ = prepared
  source = tfds.data_source(f"utkface/{SIZE}", data_dir=str(root / "data"), download=False)
  assert len(source["train"]) == len(VALID)
  assert source["train"][0]["image"].shape == (SIZE, SIZE, 3)


def test_read_prepared_not_prepared_says_how(prepared, tmp_path):
  root, _ = prepared
  with pytest.raises(FileNotFoundError) as info:
    utkface.read_prepared(str(root / "data"), 12)
  message = str(info.value)
  assert os.path.join(str(root / "data"), "utkface", "12", utkface.VERSION) in message
  assert "python -m fqjax.data.utkface --manual_dir" in message and "--image_size 12" in message
  assert "utkface.prepare(" in message
  with pytest.raises(FileNotFoundError, match="python -m fqjax.data.utkface"):
    utkface.read_prepared(str(tmp_path / "nowhere"), 32)
  with pytest.raises(ValueError, match="image_size must be an int >= 1"):
    utkface.read_prepared(str(root / "data"), 0)


def test_folders_deduplicate_and_archive_next_to_folder_is_skipped(tmp_path):
  manual = tmp_path / "manual"
  for folder, picks in (("UTKFace", VALID[:3]), ("crop_part1", VALID[2:4])):
    (manual / folder).mkdir(parents=True)
    for name, color, size in picks:
      (manual / folder / name).write_bytes(_jpeg(color, size))
  (manual / "loose_dir_note.txt").write_bytes(b"")
  _write_archive(manual / "UTKFace.tar.gz")  # same stem as the UTKFace/ folder: skipped
  stats = utkface.prepare(str(tmp_path / "data"), str(manual), SIZE)
  assert stats["sources"] == ["UTKFace/", "crop_part1/"]
  assert stats["num_examples"] == 4 and stats["duplicates"] == 1
  assert stats["skipped_malformed"] == 0
  data = utkface.read_prepared(str(tmp_path / "data"), SIZE)
  assert sorted(data["file_name"]) == sorted(name for name, _, _ in VALID[:4])
  # overwrite=True rebuilds from the current manual dir.
  (manual / "crop_part1" / VALID[4][0]).write_bytes(_jpeg(VALID[4][1], VALID[4][2]))
  assert utkface.prepare(str(tmp_path / "data"), str(manual), SIZE)["num_examples"] == 4
  assert utkface.prepare(str(tmp_path / "data"), str(manual), SIZE, overwrite=True)["num_examples"] == 5
  assert len(utkface.read_prepared(str(tmp_path / "data"), SIZE)["age"]) == 5


def test_prepare_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="missing or empty"):
    utkface.prepare(str(tmp_path / "data"), str(tmp_path / "nope"), SIZE)
  manual = tmp_path / "manual"
  manual.mkdir()
  (manual / "bad.jpg").write_bytes(_jpeg((0, 0, 0), (8, 8)))
  with pytest.raises(FileNotFoundError, match="No UTKFace images with valid names.*1 malformed"):
    utkface.prepare(str(tmp_path / "data"), str(manual), SIZE)


def test_cli_and_no_tfds_on_import(prepared, tmp_path):
  root, _ = prepared
  code = ("import sys, fqjax.data.utkface; "
          "assert 'tensorflow_datasets' not in sys.modules, 'importing fqjax.data.utkface imported TFDS'")
  subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
  out = subprocess.run(
      [sys.executable, "-m", "fqjax.data.utkface", "--manual_dir", str(root / "manual"),
       "--data_dir", str(tmp_path / "cli"), "--image_size", "4"],
      capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
  assert out.returncode == 0, out.stderr[-2000:]
  assert '"num_examples": 5' in out.stdout
  assert utkface.read_prepared(str(tmp_path / "cli"), 4)["image"].shape == (5, 4, 4, 3)
