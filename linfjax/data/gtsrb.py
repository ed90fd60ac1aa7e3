"""GTSRB as it ships: the official folder layout, labels from its CSV files, verified.

Reads the German Traffic Sign Recognition Benchmark from the folder its three official
archives unpack into (`python -m linfjax.fetch gtsrb DIR` writes it):

  GTSRB/Final_Training/Images/000CC/TTTTT_FFFFF.ppm   class CC's training images, track
                                                       (one physical sign) TTTTT, frame FFFFF
  GTSRB/Final_Training/Images/000CC/GT-000CC.csv       one row per image, ClassId last
  GTSRB/Final_Test/Images/NNNNN.ppm                    the test images, no class in the path
  GTSRB/Final_Test/GT-final_test.csv                   the test labels (GTSRB_Final_Test_GT.zip)

The CSV files are the labels: a folder and its CSV that disagree, a row naming a missing
image, an image no row names, a file that is not a binary PPM or is truncated, each stops
the load with a `DatasetError` naming the file. Images of any size are resized to
`image_size` (PIL's bilinear filter); the official release has 15-250 pixel images. A
`SHA256SUMS` file beside `GTSRB/` is checked against the bytes read.

Every training image carries its track as a *group*: frames of one track are
near-duplicates, so the defender's clean set S is held out by track (`data.Split`), and no
sign has frames both in training and in S.

Decoding is cached (linfjax/data/cache.py) under a key made of every file's SHA-256 and the
requested size: the next load reads and hashes the files, which it must do anyway to know
the data is the same, and skips the decoding and resizing.

References:
  Stallkamp et al., "The German Traffic Sign Recognition Benchmark: A multi-class
  classification competition", IJCNN 2011.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import os
import re

import numpy as np
from absl import logging

from linfjax.data import cache
from linfjax.data import images as image_files
from linfjax.data.dataset import Dataset, DatasetError

ROOT_DIR = "GTSRB"
TRAIN_DIR = os.path.join(ROOT_DIR, "Final_Training", "Images")
TEST_DIR = os.path.join(ROOT_DIR, "Final_Test", "Images")
TEST_LABELS = os.path.join(ROOT_DIR, "Final_Test", "GT-final_test.csv")
TEST_ROWS_WITHOUT_LABELS = os.path.join(TEST_DIR, "GT-final_test.test.csv")
CSV_COLUMNS = ("Filename", "Width", "Height", "Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2", "ClassId")
SUMS_FILE = "SHA256SUMS"
# Bumped when the decoded arrays of the same files would differ (decoder or resizing).
CACHE_VERSION = 2
_CLASS_FOLDER = re.compile(r"^000(\d\d)$")
_TRAIN_IMAGE = re.compile(r"^(\d{5})_(\d{5})\.ppm$")

# The 43 classes' signs (short names for figures), in ClassId order.
CLASS_NAMES = (
    "limit 20", "limit 30", "limit 50", "limit 60", "limit 70", "limit 80",
    "end limit 80", "limit 100", "limit 120", "no passing", "no passing >3.5t",
    "right of way", "priority road", "yield", "stop", "no vehicles", "no >3.5t",
    "no entry", "caution", "curve left", "curve right", "double curve", "bumpy road",
    "slippery road", "narrows right", "road work", "traffic signals", "pedestrians",
    "children", "bicycles", "ice/snow", "wild animals", "end of limits", "turn right",
    "turn left", "ahead only", "straight or right", "straight or left", "keep right",
    "keep left", "roundabout", "end no passing", "end no passing >3.5t")


@dataclasses.dataclass(frozen=True)
class Layout:
  """The files of a GTSRB folder and their labels, as its CSV files give them.

  Paths are relative to `root`; `train_groups` is each training image's track, numbered
  `class * 100000 + track` so that tracks of different classes never share a number.
  """
  root: str
  train_paths: tuple[str, ...]
  train_labels: np.ndarray  # int32 [N]
  train_groups: np.ndarray  # int64 [N]
  test_paths: tuple[str, ...]
  test_labels: np.ndarray  # int32 [M]
  num_classes: int


def find_root(path: str) -> str:
  """The folder that holds `GTSRB/` (`path` itself, or its parent when `path` is GTSRB/)."""
  if not os.path.isdir(path):
    raise DatasetError(f"{path}: no such directory (data.path should name the folder holding "
                       "GTSRB/, as the official archives unpack; `python -m linfjax.fetch "
                       "gtsrb DIR` downloads them into DIR)")
  if os.path.isdir(os.path.join(path, ROOT_DIR)):
    return path
  if os.path.basename(os.path.normpath(path)) == ROOT_DIR:
    return os.path.dirname(os.path.normpath(path))
  raise DatasetError(f"{path}: holds no {ROOT_DIR}/ folder (expected {TRAIN_DIR}/000CC/ and "
                     f"{TEST_DIR}/ as the official archives unpack)")


def _read_rows(path: str) -> list[dict[str, str]]:
  """A GTSRB CSV file's rows (`;`-separated, one header line naming CSV_COLUMNS)."""
  try:
    with open(path, newline="", encoding="utf-8") as f:
      rows = list(csv.reader(f, delimiter=";"))
  except FileNotFoundError:
    raise DatasetError(f"{path}: missing (every GTSRB image folder comes with its CSV "
                       "file of labels)") from None
  except (UnicodeDecodeError, csv.Error) as e:
    raise DatasetError(f"{path}: not a readable CSV file ({e})") from None
  if not rows or tuple(rows[0]) != CSV_COLUMNS:
    raise DatasetError(f"{path}: the header must be {';'.join(CSV_COLUMNS)}, found "
                       f"{';'.join(rows[0]) if rows else 'an empty file'}")
  parsed = []
  for number, row in enumerate(rows[1:], 2):
    if not row:
      continue
    if len(row) != len(CSV_COLUMNS) or not row[-1].strip().isdigit():
      raise DatasetError(f"{path}:{number}: expected {len(CSV_COLUMNS)} fields ending in the "
                         f"ClassId, found {';'.join(row)!r}")
    parsed.append(dict(zip(CSV_COLUMNS, (value.strip() for value in row))))
  return parsed


def _check_listing(folder: str, csv_path: str, named: list[str]) -> None:
  """Every row names an existing image of the folder, and every image has its row."""
  present = {name for name in os.listdir(folder) if name.lower().endswith(".ppm")}
  seen = set()
  for name in named:
    if name in seen:
      raise DatasetError(f"{csv_path}: names {name} twice")
    seen.add(name)
    if name not in present:
      raise DatasetError(f"{os.path.join(folder, name)}: named in {csv_path} but missing")
  unlisted = sorted(present - seen)
  if unlisted:
    raise DatasetError(f"{os.path.join(folder, unlisted[0])}: not named in {csv_path} "
                       f"({len(unlisted)} such images); the folder and its CSV disagree")


def read_layout(path: str) -> Layout:
  """Lists a GTSRB folder's images and labels from its CSV files, checking they agree."""
  root = find_root(path)
  train_dir = os.path.join(root, TRAIN_DIR)
  if not os.path.isdir(train_dir):
    raise DatasetError(f"{train_dir}: no such directory (the training images of the "
                       "official GTSRB_Final_Training_Images.zip)")
  folders = sorted(name for name in os.listdir(train_dir)
                   if os.path.isdir(os.path.join(train_dir, name)))
  classes = []
  for name in folders:
    match = _CLASS_FOLDER.match(name)
    if not match or int(match.group(1)) >= len(CLASS_NAMES):
      raise DatasetError(f"{os.path.join(train_dir, name)}: not a GTSRB class folder "
                         f"(00000 to 000{len(CLASS_NAMES) - 1})")
    classes.append(int(match.group(1)))
  if classes != list(range(len(classes))) or not classes:
    raise DatasetError(f"{train_dir}: class folders must run from 00000 without gaps; found "
                       f"{', '.join(folders) or 'none'}")
  train_paths, train_labels, train_groups = [], [], []
  for label, name in zip(classes, folders):
    folder = os.path.join(train_dir, name)
    csv_path = os.path.join(folder, f"GT-{name}.csv")
    rows = _read_rows(csv_path)
    if not rows:
      raise DatasetError(f"{csv_path}: lists no images")
    for number, row in enumerate(rows, 2):
      if int(row["ClassId"]) != label:
        raise DatasetError(f"{csv_path}:{number}: {row['Filename']} has ClassId "
                           f"{row['ClassId']}, but it lies in the folder of class {label}; "
                           "the folder and its CSV disagree")
      match = _TRAIN_IMAGE.match(row["Filename"])
      if not match:
        raise DatasetError(f"{csv_path}:{number}: {row['Filename']!r} is not a training image "
                           "name TTTTT_FFFFF.ppm (track, frame)")
      train_paths.append(os.path.join(TRAIN_DIR, name, row["Filename"]))
      train_labels.append(label)
      train_groups.append(label * 100_000 + int(match.group(1)))
    _check_listing(folder, csv_path, [row["Filename"] for row in rows])

  test_dir = os.path.join(root, TEST_DIR)
  labels_path = os.path.join(root, TEST_LABELS)
  if not os.path.exists(labels_path) and os.path.exists(os.path.join(root, TEST_ROWS_WITHOUT_LABELS)):
    raise DatasetError(f"{labels_path}: missing; the test labels ship apart from the test "
                       "images, in GTSRB_Final_Test_GT.zip (`python -m linfjax.fetch gtsrb DIR` "
                       "fetches both)")
  if not os.path.isdir(test_dir):
    raise DatasetError(f"{test_dir}: no such directory (the test images of the official "
                       "GTSRB_Final_Test_Images.zip)")
  rows = _read_rows(labels_path)
  if not rows:
    raise DatasetError(f"{labels_path}: lists no images")
  test_paths, test_labels = [], []
  for number, row in enumerate(rows, 2):
    if int(row["ClassId"]) >= len(classes):
      raise DatasetError(f"{labels_path}:{number}: ClassId {row['ClassId']} is not one of the "
                         f"training classes (0..{len(classes) - 1})")
    test_paths.append(os.path.join(TEST_DIR, row["Filename"]))
    test_labels.append(int(row["ClassId"]))
  _check_listing(test_dir, labels_path, [row["Filename"] for row in rows])
  return Layout(root, tuple(train_paths), np.asarray(train_labels, np.int32),
                np.asarray(train_groups, np.int64), tuple(test_paths),
                np.asarray(test_labels, np.int32), len(classes))


def _read_all(root: str, paths: tuple[str, ...]) -> list[bytes]:
  """Every file's bytes, in order (one after another: threads were slower for small files)."""
  payloads = []
  for relative in paths:
    with open(os.path.join(root, relative), "rb") as f:
      payloads.append(f.read())
  return payloads


def _check_sums(root: str, paths: tuple[str, ...], digests: list[str]) -> None:
  """Compares the digests of the bytes read with `root/SHA256SUMS`, when that file exists."""
  sums_path = os.path.join(root, SUMS_FILE)
  if not os.path.exists(sums_path):
    return
  expected = {}
  with open(sums_path) as f:
    for number, line in enumerate(f, 1):
      parts = line.split()
      if not parts:
        continue
      if len(parts) != 2:
        raise DatasetError(f"{sums_path}:{number}: expected '<sha256>  <file>'")
      expected[parts[1].lstrip("*").removeprefix("./")] = parts[0]
  for relative, digest in zip(paths, digests):
    want = expected.get(relative)
    if want is not None and want != digest:
      raise DatasetError(f"{os.path.join(root, relative)}: SHA-256 {digest} does not match "
                         f"{want} in {sums_path}; the file is corrupt or was changed")
  for relative in expected:
    if not os.path.exists(os.path.join(root, relative)):
      raise DatasetError(f"{os.path.join(root, relative)}: listed in {sums_path} but missing")


def _cache_key(paths: tuple[str, ...], digests: list[str], size) -> str:
  key = hashlib.sha256(f"gtsrb {CACHE_VERSION} {tuple(size or ())}".encode())
  for relative, digest in zip(paths, digests):
    key.update(f"{relative} {digest}\n".encode())
  return key.hexdigest()


def _decode(payloads: list[bytes], paths: tuple[str, ...], root: str, size) -> np.ndarray:
  arrays = []
  for payload, relative in zip(payloads, paths):
    try:
      image = image_files.decode_ppm(payload, os.path.join(root, relative))
    except image_files.ImageError as e:
      raise DatasetError(str(e)) from None
    if size and image.shape[:2] != tuple(size):
      image = image_files.resize(image, tuple(size))
    elif not size and arrays and image.shape != arrays[0].shape:
      raise DatasetError(f"{os.path.join(root, relative)} is {image.shape[1]}x{image.shape[0]} "
                         f"but {os.path.join(root, paths[0])} is {arrays[0].shape[1]}x"
                         f"{arrays[0].shape[0]}; set data.image_size=(height, width) to resize "
                         "every image")
    arrays.append(image)
  return np.stack(arrays)


def load_gtsrb(path: str, *, image_size: tuple[int, ...] = ()) -> Dataset:
  """Reads, verifies and decodes a GTSRB folder (see the module docstring).

  Args:
    path: the folder holding GTSRB/ (or GTSRB/ itself).
    image_size: (height, width) every image is resized to; () keeps the stored sizes, which
      must then all be equal.
  """
  layout = read_layout(path)
  paths = layout.train_paths + layout.test_paths
  try:
    payloads = _read_all(layout.root, paths)
  except OSError as e:
    raise DatasetError(f"{e.filename}: cannot be read ({e.strerror})") from None
  digests = [hashlib.sha256(payload).hexdigest() for payload in payloads]
  _check_sums(layout.root, paths, digests)
  cache_dir = cache.directory()
  cache_path = (os.path.join(cache_dir, f"gtsrb-{_cache_key(paths, digests, image_size)}.npy")
                if cache_dir else None)
  images = cache.read(cache_path, len(paths))
  if images is None:
    images = _decode(payloads, paths, layout.root, image_size)
    cache.write(cache_path, images)
  else:
    logging.info("%s: decoded images from the cache %s", layout.root, cache_path)
  count = len(layout.train_paths)
  return Dataset(images[:count], layout.train_labels, images[count:], layout.test_labels,
                 CLASS_NAMES[:layout.num_classes], train_groups=layout.train_groups)
