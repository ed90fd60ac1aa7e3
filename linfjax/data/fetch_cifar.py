"""CIFAR-10 from its official archive, and the quick configs' subset written from it.

`fetch(DIR)` downloads `cifar-10-python.tar.gz` (163 MB) from the CIFAR-10 page's address,
resuming an interrupted download (HTTP Range), checks its size and the MD5 the page publishes,
unpacks `DIR/cifar-10-batches-py/` (the full set: the full configs read it with
`--config.data.source=cifar10_dir --config.data.path=DIR`), and writes the quick configs'
subset to `DIR/cifar10-subset/`: the first 1,017 images of each of the six batch files, in
their order, in the original file format, with a SHA256SUMS file. Those files are byte for
byte the quick runs' reference subset (SUBSET_SHA256 is checked). Nothing is unpacked outside
`DIR/cifar-10-batches-py/`: an archive member with an absolute path, `..`, a link or a device
is refused, as is any file other than CIFAR-10's.

References:
  Krizhevsky, "Learning Multiple Layers of Features from Tiny Images", 2009;
  https://www.cs.toronto.edu/~kriz/cifar.html (the address and MD5 below).
"""

from __future__ import annotations

import os
import shutil
import struct
import tarfile
import tempfile
from typing import Callable, Sequence

import numpy as np

from linfjax import errors, files
from linfjax.data import cifar, download

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
ARCHIVE = "cifar-10-python.tar.gz"
MD5 = "c58f30108f718f92721af3b95e74349a"  # Published on the CIFAR-10 page.
SIZE = 170_498_071  # Bytes; also the size TFDS and mirrors record for this file.
SUBSET_DIR = "cifar10-subset"
SUBSET_SIZE = 1017  # Images taken from the start of each batch file.
SUMS_FILE = "SHA256SUMS"
META_FILE = cifar.CIFAR_META_FILE
BATCH_FILES = (*cifar.CIFAR_TRAIN_FILES, cifar.CIFAR_TEST_FILE)
# The quick runs' reference subset (its SHA256SUMS): what write_subset produces from the
# official archive; a mismatch means other data (or another writer) and is reported.
SUBSET_SHA256 = {
    "batches.meta": "f962466ef690d46b226450fb9aadc74ba4bc64a76aa526b5827fe4bc5c7125cb",
    "data_batch_1": "be16aeb4ba0fb1a51a9d670f2f902d863755c58c8454cfc42a515295b5d03549",
    "data_batch_2": "6714a5b4f889ab0f4caf233b06945a834d661307a8cfeb80353116a2593ea56c",
    "data_batch_3": "03d2dbfb958138107c960d2124fb3a8ac64eaa9d83af5e7d84c030c069123a8d",
    "data_batch_4": "827a5971d08851dad2a61c03b2e6c3ed25facd1f3d2cbd04a84b692de6561d02",
    "data_batch_5": "d1f10231aadf47199cf43510b87e4563eb405264b780b56bb5fa586aca0d8366",
    "test_batch": "00e4efc42fed7c88fe8b076f6f399b001f007b0fef08ab425ae321f63168e460",
}



def _check_member(archive: str, member: tarfile.TarInfo) -> str:
  """The member's path inside cifar-10-batches-py/; download.FetchError for anything unsafe or foreign."""
  name = member.name
  parts = os.path.normpath(name).split(os.sep)
  if os.path.isabs(name) or ".." in name.split("/") or parts[0] != cifar.CIFAR_BATCH_DIR:
    raise download.FetchError(f"{archive}: refusing member {name!r}: a CIFAR-10 archive holds only "
                     f"{cifar.CIFAR_BATCH_DIR}/; the archive is not CIFAR-10's (delete it)")
  if not (member.isfile() or member.isdir()):
    raise download.FetchError(f"{archive}: refusing member {name!r}: links and devices are not "
                     "unpacked; the archive is not CIFAR-10's (delete it)")
  return name


def unpack(archive: str, directory: str) -> str:
  """Unpacks the archive's cifar-10-batches-py/ into `directory`; returns that folder.

  Extraction goes to a temporary folder beside it that is renamed when complete, so an
  interrupted unpack leaves nothing half-written under the final name.
  """
  target = os.path.join(directory, cifar.CIFAR_BATCH_DIR)
  if os.path.isdir(target) and all(os.path.isfile(os.path.join(target, name))
                                   for name in (META_FILE, *BATCH_FILES)):
    return target
  staging = tempfile.mkdtemp(prefix=".unpack-", dir=directory)
  try:
    try:
      with tarfile.open(archive, "r:gz") as tar:
        members = tar.getmembers()
        for member in members:
          _check_member(archive, member)
        extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(staging, members=members, **extra)
    except (tarfile.TarError, EOFError, OSError) as e:
      if isinstance(e, OSError) and errors.from_os_error(e) is not None:
        raise
      raise download.FetchError(f"{archive}: cannot be unpacked ({type(e).__name__}: {e}); it is "
                       "damaged: delete it and rerun") from None
    missing = [name for name in (META_FILE, *BATCH_FILES)
               if not os.path.isfile(os.path.join(staging, cifar.CIFAR_BATCH_DIR, name))]
    if missing:
      raise download.FetchError(f"{archive}: lacks {', '.join(missing)} under {cifar.CIFAR_BATCH_DIR}/; "
                       "it is not CIFAR-10's python version (delete it)")
    if os.path.exists(target):
      shutil.rmtree(target)
    os.replace(os.path.join(staging, cifar.CIFAR_BATCH_DIR), target)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return target


def encode_batch(batch_label: str, labels: Sequence[int], rows) -> bytes:
  """A batch file as CIFAR-10 writes it: a Python 2 protocol-2 pickle of
  {'batch_label': str, 'labels': [int], 'data': uint8 [N, 3072]}, in that order.

  Written opcode by opcode, as Python 2's cPickle wrote the originals (byte strings, lists
  appended 1,000 items at a time, the array through numpy.core.multiarray._reconstruct),
  so that a subset is byte for byte the reference one; `data`'s restricted unpickler reads it.
  """
  rows = np.ascontiguousarray(rows, dtype=np.uint8)
  if rows.ndim != 2:
    raise ValueError(f"rows must be [N, 3072] uint8, got shape {rows.shape}")
  memo = iter(range(1, 256))

  def put() -> bytes:
    return b"q" + bytes([next(memo)])

  def string(text: str) -> bytes:
    raw = text.encode("latin1")
    if len(raw) > 255:
      raise ValueError(f"string too long for this encoder: {text[:20]!r}...")
    return b"U" + bytes([len(raw)]) + raw + put()

  def integer(value: int) -> bytes:
    if 0 <= value < 256:
      return b"K" + bytes([value])
    if 0 <= value < 65536:
      return b"M" + struct.pack("<H", value)
    return b"J" + struct.pack("<i", value)

  out = [b"\x80\x02}", put(), b"(", string("batch_label"), string(batch_label),
         string("labels"), b"]", put()]
  labels = [int(label) for label in labels]
  for first in range(0, len(labels), 1000):
    chunk = labels[first:first + 1000]
    out.append(integer(chunk[0]) + b"a" if len(chunk) == 1 else
               b"(" + b"".join(integer(v) for v in chunk) + b"e")
  out += [b"U\x04data", put(), b"cnumpy.core.multiarray\n_reconstruct\n", put(),
          b"cnumpy\nndarray\n", put(), b"K\x00\x85U\x01b\x87R", put(), b"(K\x01",
          integer(rows.shape[0]), integer(rows.shape[1]), b"\x86cnumpy\ndtype\n", put(),
          b"U\x02u1K\x00K\x01\x87R", put(), b"(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xff"
          b"K\x00tb\x89T", struct.pack("<I", rows.nbytes), rows.tobytes(), b"tbu."]
  return b"".join(out)


def write_subset(batch_dir: str, directory: str, *, size: int = SUBSET_SIZE) -> str:
  """Writes the first `size` images of each batch file to `directory/cifar-10-batches-py/`.

  batches.meta is copied as it is; `directory/SHA256SUMS` lists every file's digest (the
  `cifar10_dir` loader checks it). Returns `directory`.
  """
  out_dir = os.path.join(directory, cifar.CIFAR_BATCH_DIR)
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(batch_dir, META_FILE), "rb") as f:
    files.write_bytes(os.path.join(out_dir, META_FILE), f.read())
  for name in BATCH_FILES:
    path = os.path.join(batch_dir, name)
    batch = cifar.unpickle(path)  # The restricted unpickler: the archive is untrusted input.
    rows, labels = batch.get("data"), batch.get("labels")
    if not isinstance(rows, np.ndarray) or rows.ndim != 2 or labels is None \
        or len(labels) != len(rows):
      raise download.FetchError(f"{path}: not a CIFAR-10 batch (expected 'data' [N, 3072] and N "
                       "'labels'); delete the archive and the folder and rerun")
    if len(rows) < size:
      raise download.FetchError(f"{path}: holds {len(rows)} images, fewer than the subset's {size}")
    files.write_bytes(os.path.join(out_dir, name),
                      encode_batch(str(batch.get("batch_label", "")), labels[:size], rows[:size]))
  lines = [f"{download.digest(os.path.join(out_dir, name), 'sha256')}  {cifar.CIFAR_BATCH_DIR}/{name}"
           for name in (META_FILE, *BATCH_FILES)]
  files.write_text(os.path.join(directory, SUMS_FILE), "\n".join(lines) + "\n")
  return directory


def matches_shared_subset(directory: str) -> list[str]:
  """Files of a written subset whose SHA-256 differs from the reference subset's (empty: same)."""
  return [name for name, expected in SUBSET_SHA256.items()
          if download.digest(os.path.join(directory, cifar.CIFAR_BATCH_DIR, name), "sha256") != expected]


def fetch(directory: str, *, url: str = URL, md5: str = MD5, size: int | None = SIZE,
          subset_size: int = SUBSET_SIZE, subset: bool = True, progress: bool = False,
          log: Callable[[str], None] = print) -> dict[str, str]:
  """Download, verify, unpack and (unless `subset=False`) write the subset; returns paths."""
  os.makedirs(directory, exist_ok=True)
  archive = download.download(url, os.path.join(directory, ARCHIVE), md5=md5, size=size,
                     progress=progress, log=log)
  batch_dir = unpack(archive, directory)
  log(f"{batch_dir}: the full CIFAR-10 (50,000 + 10,000 images when from the official archive)")
  paths = {"archive": archive, "full": directory}
  if subset:
    subset_dir = write_subset(batch_dir, os.path.join(directory, SUBSET_DIR), size=subset_size)
    paths["subset"] = subset_dir
    if md5 == MD5 and subset_size == SUBSET_SIZE:
      different = matches_shared_subset(subset_dir)
      log(f"{subset_dir}: {subset_size} images per batch file; " + (
          "identical to the quick runs' reference subset (SHA-256 checked)" if not different else
          f"WARNING: {', '.join(different)} differ from the quick runs' reference subset's "
          "digests, so runs on it are not comparable with the README's figures"))
  return paths
