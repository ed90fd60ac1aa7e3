"""The gtsrb source on small layouts the tests write: labels from the CSVs, tracks, resizing,
the decoded cache, every broken variant as one DatasetError naming the file, and S by track."""

import hashlib
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from linfjax import data
from linfjax.data import cache, gtsrb

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADER = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"


def _ppm(image: np.ndarray, comment: bool = True) -> bytes:
  height, width, _ = image.shape
  head = b"P6\n" + (b"# made by a test\n" if comment else b"") + f"{width} {height}\n255\n".encode()
  return head + image.astype(np.uint8).tobytes()


def write_layout(root, *, classes=3, tracks=3, frames=4, tests=5, size=(32, 32), seed=0,
                 sums=False, varied_sizes=False):
  """Writes root/GTSRB/... as the official archives unpack; returns what should load."""
  rng = np.random.default_rng(seed)
  expected = {"train": [], "labels": [], "groups": [], "test": [], "test_labels": []}
  sizes = [(size[0] + 3 * i, size[1] + 5 * i) if varied_sizes else size for i in range(7)]
  train_root = os.path.join(root, "GTSRB", "Final_Training", "Images")
  for c in range(classes):
    folder = os.path.join(train_root, f"{c:05d}")
    os.makedirs(folder)
    rows = [HEADER]
    for t in range(tracks):
      for f in range(frames):
        h, w = sizes[(c + t + f) % len(sizes)]
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        name = f"{t:05d}_{f:05d}.ppm"
        with open(os.path.join(folder, name), "wb") as out:
          out.write(_ppm(image))
        rows.append(f"{name};{w};{h};1;1;{w - 1};{h - 1};{c}")
        expected["train"].append(image)
        expected["labels"].append(c)
        expected["groups"].append(c * 100_000 + t)
    with open(os.path.join(folder, f"GT-{c:05d}.csv"), "w") as out:
      out.write("\n".join(rows) + "\n")
  test_root = os.path.join(root, "GTSRB", "Final_Test", "Images")
  os.makedirs(test_root)
  rows = [HEADER]
  for i in range(tests):
    h, w = sizes[i % len(sizes)]
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    label = int(rng.integers(0, classes))
    with open(os.path.join(test_root, f"{i:05d}.ppm"), "wb") as out:
      out.write(_ppm(image, comment=False))
    rows.append(f"{i:05d}.ppm;{w};{h};1;1;{w - 1};{h - 1};{label}")
    expected["test"].append(image)
    expected["test_labels"].append(label)
  with open(os.path.join(root, "GTSRB", "Final_Test", "GT-final_test.csv"), "w") as out:
    out.write("\n".join(rows) + "\n")
  with open(os.path.join(test_root, "GT-final_test.test.csv"), "w") as out:
    out.write("\n".join(row.rsplit(";", 1)[0] for row in rows) + "\n")
  if sums:
    lines = []
    for directory, _, names in os.walk(os.path.join(root, "GTSRB")):
      for name in sorted(names):
        path = os.path.join(directory, name)
        with open(path, "rb") as f:
          lines.append(f"{hashlib.sha256(f.read()).hexdigest()}  {os.path.relpath(path, root)}")
    with open(os.path.join(root, "SHA256SUMS"), "w") as out:
      out.write("\n".join(lines) + "\n")
  return expected


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
  directory = tmp_path / "cache"
  monkeypatch.setenv(cache.ENV, str(directory))
  return directory


def test_loads_labels_from_the_csvs_tracks_as_groups_and_the_test_labels(tmp_path):
  expected = write_layout(tmp_path, sums=True)
  dataset = data.load_gtsrb(str(tmp_path))
  np.testing.assert_array_equal(dataset.train_images, np.stack(expected["train"]))
  np.testing.assert_array_equal(dataset.train_labels, expected["labels"])
  np.testing.assert_array_equal(dataset.train_groups, expected["groups"])
  np.testing.assert_array_equal(dataset.test_images, np.stack(expected["test"]))
  np.testing.assert_array_equal(dataset.test_labels, expected["test_labels"])
  assert dataset.class_names == ("limit 20", "limit 30", "limit 50")
  # GTSRB/ itself names the same data.
  again = data.load_gtsrb(str(tmp_path / "GTSRB"))
  np.testing.assert_array_equal(again.train_images, dataset.train_images)


def test_images_of_any_size_are_resized_and_mixed_sizes_without_a_size_are_refused(tmp_path):
  expected = write_layout(tmp_path, varied_sizes=True)
  dataset = data.load_gtsrb(str(tmp_path), image_size=(16, 20))
  assert dataset.train_images.shape == (36, 16, 20, 3)
  assert dataset.test_images.shape == (5, 16, 20, 3)
  # The resize is PIL's bilinear one, as for the other image sources.
  np.testing.assert_array_equal(dataset.train_images[1],
                                data.images.resize(expected["train"][1], (16, 20)))
  with pytest.raises(data.DatasetError, match=r"is \d+x\d+ but .* set data.image_size"):
    data.load_gtsrb(str(tmp_path))


def test_the_second_load_reads_the_decoded_cache_and_a_changed_file_misses_it(tmp_path,
                                                                              monkeypatch):
  write_layout(tmp_path)
  first = data.load_gtsrb(str(tmp_path), image_size=(32, 32))
  decode = gtsrb._decode
  monkeypatch.setattr(gtsrb, "_decode", lambda *a: pytest.fail("decoded despite the cache"))
  second = data.load_gtsrb(str(tmp_path), image_size=(32, 32))
  np.testing.assert_array_equal(first.train_images, second.train_images)
  np.testing.assert_array_equal(first.test_images, second.test_images)
  # Other bytes in one image: another key, decoded afresh, and the new pixels are used.
  path = tmp_path / "GTSRB" / "Final_Test" / "Images" / "00002.ppm"
  payload = bytearray(path.read_bytes())
  payload[-1] ^= 0xFF
  path.write_bytes(bytes(payload))
  calls = []
  monkeypatch.setattr(gtsrb, "_decode", lambda *a: calls.append(1) or decode(*a))
  third = data.load_gtsrb(str(tmp_path), image_size=(32, 32))
  assert calls == [1]
  assert not np.array_equal(third.test_images[2], first.test_images[2])


def test_a_damaged_cache_file_is_decoded_again(tmp_path, cache_dir):
  write_layout(tmp_path)
  first = data.load_gtsrb(str(tmp_path))
  (cached,) = list(cache_dir.iterdir())
  cached.write_bytes(cached.read_bytes()[:100])
  np.testing.assert_array_equal(data.load_gtsrb(str(tmp_path)).train_images, first.train_images)


def test_no_cache_when_the_variable_says_off(tmp_path, monkeypatch, cache_dir):
  monkeypatch.setenv(cache.ENV, "off")
  write_layout(tmp_path)
  data.load_gtsrb(str(tmp_path))
  assert not cache_dir.exists()


def _train(root, c=1):
  return root / "GTSRB" / "Final_Training" / "Images" / f"{c:05d}"


def _edit_csv(path, old, new):
  path.write_text(path.read_text().replace(old, new))


def _zero_digest(sums, name):
  """Another digest of the same length for one file in SHA256SUMS."""
  lines = sums.read_text().splitlines()
  sums.write_text("\n".join(("0" * 64 + line[64:]) if line.endswith(name) else line
                            for line in lines) + "\n")


BROKEN = {
    # name: (how to break the layout, the file the message names, a phrase of it)
    "class id disagrees": (lambda r: _edit_csv(_train(r) / "GT-00001.csv", "00001_00002.ppm;32;32;1;1;31;31;1",
                                               "00001_00002.ppm;32;32;1;1;31;31;2"),
                           "GT-00001.csv:", "lies in the folder of class 1"),
    "unlisted image": (lambda r: (_train(r) / "00009_00000.ppm").write_bytes(
        (_train(r) / "00000_00000.ppm").read_bytes()), "00009_00000.ppm", "not named in"),
    "row names a missing image": (lambda r: (_train(r) / "00002_00003.ppm").unlink(),
                                  "00002_00003.ppm", "named in .* but missing"),
    "not a ppm": (lambda r: (_train(r) / "00001_00001.ppm").write_bytes(b"\x89PNG\r\n"),
                  "00001_00001.ppm", "not a binary PPM"),
    "truncated ppm": (lambda r: (_train(r) / "00001_00001.ppm").write_bytes(
        (_train(r) / "00001_00001.ppm").read_bytes()[:500]), "00001_00001.ppm", "truncated"),
    "garbled header": (lambda r: (_train(r) / "00001_00001.ppm").write_bytes(b"P6\n32 x\n"),
                       "00001_00001.ppm", "malformed PPM header"),
    "missing class csv": (lambda r: (_train(r) / "GT-00001.csv").unlink(), "GT-00001.csv",
                          "missing"),
    "bad csv header": (lambda r: _edit_csv(_train(r) / "GT-00001.csv", "Roi.X1", "X1"),
                       "GT-00001.csv", "the header must be"),
    "test labels missing": (lambda r: (r / "GTSRB" / "Final_Test" / "GT-final_test.csv").unlink(),
                            "GT-final_test.csv", "GTSRB_Final_Test_GT.zip"),
    "test label not a class": (lambda r: _edit_csv(r / "GTSRB" / "Final_Test" / "GT-final_test.csv",
                                                   "00003.ppm;32;32;1;1;31;31;", "00003.ppm;32;32;1;1;31;31;9"),
                               "GT-final_test.csv:5", "not one of the training classes"),
    "class folder gap": (lambda r: _train(r, 2).rename(_train(r, 4)), "Images",
                         "without gaps"),
    "checksum mismatch": (lambda r: _zero_digest(r / "SHA256SUMS", "Final_Test/Images/00001.ppm"),
                          "00001.ppm", "does not match"),
    "no GTSRB folder": (lambda r: (r / "GTSRB").rename(r / "other"), "", "holds no GTSRB/"),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_every_broken_layout_is_one_error_naming_the_file(tmp_path, name, cache_dir):
  write_layout(tmp_path, sums=name == "checksum mismatch")
  breaks, names, phrase = BROKEN[name]
  breaks(tmp_path)
  with pytest.raises(data.DatasetError) as raised:
    data.load_gtsrb(str(tmp_path))
  message = str(raised.value)
  assert "\n" not in message
  assert names in message, message
  assert re.search(phrase, message), message
  assert not cache_dir.exists()  # Nothing written.


def test_the_command_line_refuses_a_broken_layout_with_one_error_line_and_writes_nothing(tmp_path):
  write_layout(tmp_path / "gtsrb", classes=2, tracks=2, frames=3)
  (_train(tmp_path / "gtsrb", 1) / "00001_00002.ppm").write_bytes(b"P6\n32 32\n255\n\x00")
  workdir = tmp_path / "run"
  cache_path = tmp_path / "cache-cli"
  completed = subprocess.run(
      [sys.executable, "-m", "linfjax.main", "--config=configs/gtsrb_patch.py:quick",
       f"--workdir={workdir}", f"--config.data.path={tmp_path / 'gtsrb'}"], cwd=REPO_ROOT, capture_output=True, text=True,
      env={**os.environ, cache.ENV: str(cache_path)}, timeout=300)
  assert completed.returncode == 2, completed.stderr
  last = completed.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and "Traceback" not in completed.stderr, completed.stderr
  assert "00001_00002.ppm" in last and "truncated" in last
  assert not workdir.exists() and not cache_path.exists()


def test_the_clean_set_is_whole_tracks_class_by_class():
  labels = np.repeat(np.arange(4), 30)  # 4 classes, 3 tracks of 10 frames each.
  groups = labels * 100_000 + np.tile(np.repeat(np.arange(3), 10), 4)
  split = data.hold_out_clean_set(120, 35, seed=3, groups=groups, labels=labels)
  held = np.unique(groups[split.clean_set_indices])
  # At least 35 images in whole tracks: 4 tracks, one of each class before any has two.
  assert len(split.clean_set_indices) == 40 and len(held) == 4
  assert sorted(held // 100_000) == [0, 1, 2, 3]
  assert not set(groups[split.train_indices]) & set(held)
  assert sorted(np.concatenate([split.clean_set_indices, split.train_indices])) == list(range(120))
  again = data.hold_out_clean_set(120, 35, seed=3, groups=groups, labels=labels)
  np.testing.assert_array_equal(again.clean_set_indices, split.clean_set_indices)
  other = [data.hold_out_clean_set(120, 35, seed=s, groups=groups, labels=labels)
           for s in range(4, 9)]
  assert any(not np.array_equal(o.clean_set_indices, split.clean_set_indices) for o in other)
  # A fifth track goes to the class drawn first in the second round.
  assert len(np.unique(groups[data.hold_out_clean_set(
      120, 41, seed=3, groups=groups, labels=labels).clean_set_indices])) == 5
  with pytest.raises(ValueError, match="leaves no training images"):
    data.hold_out_clean_set(120, 119, seed=0, groups=groups, labels=labels)


def test_a_run_on_gtsrb_holds_out_tracks(tmp_path):
  """The split a run uses (data.clean_set_split) follows the dataset's tracks."""
  write_layout(tmp_path, classes=3, tracks=4, frames=5)
  dataset = data.load_gtsrb(str(tmp_path))
  split = data.clean_set_split(dataset, size=10, seed=0)
  held = set(dataset.train_groups[split.clean_set_indices])
  assert len(split.clean_set_indices) == 10 and len(held) == 2
  assert not held & set(dataset.train_groups[split.train_indices])
  # Without groups (CIFAR), the same call draws images.
  plain = data.clean_set_split(data.Dataset(dataset.train_images, dataset.train_labels,
                                            dataset.test_images, dataset.test_labels,
                                            dataset.class_names), size=10, seed=0)
  np.testing.assert_array_equal(plain.clean_set_indices,
                                data.hold_out_clean_set(60, 10, 0).clean_set_indices)


SHARED_GTSRB = os.path.normpath(os.path.join(REPO_ROOT, "..", "shared", "data", "gtsrb32"))


@pytest.mark.skipif(not os.path.isdir(SHARED_GTSRB), reason="needs ../shared/data/gtsrb32")
def test_the_shared_release_loads_whole():
  dataset = data.load_gtsrb(SHARED_GTSRB)
  assert dataset.train_images.shape == (39209, 32, 32, 3)
  assert dataset.test_images.shape == (12630, 32, 32, 3)
  assert dataset.num_classes == 43 and len(np.unique(dataset.train_groups)) == 1307
  assert np.bincount(dataset.train_labels).min() == 210
