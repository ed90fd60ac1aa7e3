"""Download CIFAR-10 or GTSRB from its official address, verified, resumable.

    python -m linfjax.fetch [cifar10] DIR   # CIFAR-10 (the name may be left out)
    python -m linfjax.fetch gtsrb DIR       # GTSRB (linfjax.data.fetch_gtsrb)

CIFAR-10 downloads `cifar-10-python.tar.gz` (163 MB) into DIR from the CIFAR-10 page's
address, resuming an interrupted download where it stopped (HTTP Range), checks its size and
the MD5 the page publishes, unpacks `DIR/cifar-10-batches-py/` (the full set: the full
configs read it with `--config.data.source=cifar10_dir --config.data.path=DIR`), and writes
the quick configs' subset to `DIR/cifar10-subset/`: the first 1,017 images of each of the six
batch files, in their order, in the original file format, with a SHA256SUMS file. Those
files are byte for byte the quick runs' reference subset (SUBSET_SHA256 is checked), so a
quick run on them is the README's quick run:

    python -m linfjax.main --config=configs/cifar_patch.py:quick --workdir=runs/quick \\
        --config.data.path=DIR/cifar10-subset

GTSRB downloads its three official archives (348 MB), checked the same way, and unpacks
DIR/GTSRB/ as GTSRB ships it; the GTSRB configs then read `--config.data.path=DIR`.

Rerunning the command skips what is already done and verified. Nothing is unpacked outside
`DIR/cifar-10-batches-py/` (or `DIR/GTSRB/`): an archive member with an absolute path, `..`,
a link or a device is refused, as is any file other than the dataset's.

References:
  Krizhevsky, "Learning Multiple Layers of Features from Tiny Images", 2009;
  https://www.cs.toronto.edu/~kriz/cifar.html (the address and MD5 below).
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import shutil
import struct
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from typing import Callable, Sequence

import numpy as np
import tqdm

from linfjax import data, errors, files

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
ARCHIVE = "cifar-10-python.tar.gz"
MD5 = "c58f30108f718f92721af3b95e74349a"  # Published on the CIFAR-10 page.
SIZE = 170_498_071  # Bytes; also the size TFDS and mirrors record for this file.
SUBSET_DIR = "cifar10-subset"
SUBSET_SIZE = 1017  # Images taken from the start of each batch file.
SUMS_FILE = "SHA256SUMS"
META_FILE = data.CIFAR_META_FILE
BATCH_FILES = (*data.CIFAR_TRAIN_FILES, data.CIFAR_TEST_FILE)
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
CHUNK = 1 << 20
DATASETS = ("cifar10", "gtsrb")  # The first argument names one of these, or is DIR.


class FetchError(errors.UserError):
  """A download, archive or subset is not what it should be (the message says what to do)."""


def _digest(path: str, algorithm: str) -> str:
  digest = hashlib.new(algorithm)
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(CHUNK), b""):
      digest.update(chunk)
  return digest.hexdigest()


def _bar(total: int | None, initial: int, desc: str, enabled: bool) -> tqdm.tqdm:
  return tqdm.tqdm(total=total, initial=initial, desc=desc, unit="B", unit_scale=True,
                   disable=not enabled, leave=False)


def download(url: str, path: str, *, md5: str, size: int | None = None, timeout: float = 60,
             progress: bool = False, log: Callable[[str], None] = lambda text: None) -> str:
  """Downloads `url` to `path`, resuming `path + '.part'`, and checks its size and MD5.

  Raises:
    FetchError: the server cannot be reached or refuses, the transfer stopped early (the
      partial file is kept: calling again resumes it), or the MD5 differs (the file is
      removed: calling again downloads it afresh).
  """
  if os.path.exists(path) and (size is None or os.path.getsize(path) == size) \
      and _digest(path, "md5") == md5:
    log(f"{path}: already downloaded, MD5 verified")
    return path
  part = path + ".part"
  start = os.path.getsize(part) if os.path.exists(part) else 0
  if size is not None and start > size:
    os.remove(part)
    start = 0
  if size is None or start < size:
    _transfer(url, part, start, size=size, timeout=timeout, progress=progress, log=log)
  received = os.path.getsize(part)
  if size is not None and received != size:
    raise FetchError(f"{part}: {received} bytes received of {size}; the download stopped "
                     "early: rerun the same command to resume it")
  digest = _digest(part, "md5")
  if digest != md5:
    os.remove(part)
    raise FetchError(f"{url}: the downloaded file's MD5 is {digest}, not the published {md5}; "
                     f"it was deleted: rerun to download it again (if this repeats, the "
                     "server or a proxy serves other content)")
  os.replace(part, path)
  log(f"{path}: {received} bytes, MD5 {md5} verified")
  return path


def _transfer(url: str, part: str, start: int, *, size: int | None, timeout: float,
              progress: bool, log: Callable[[str], None]) -> None:
  """Appends the bytes from `start` on to `part` (from 0 if the server cannot resume)."""
  headers = {"Range": f"bytes={start}-"} if start else {}
  try:
    response = urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                      timeout=timeout)
  except urllib.error.HTTPError as e:
    if e.code == 416 and start:  # Nothing left to send: the partial file is complete.
      return
    raise FetchError(f"{url}: the server answered HTTP {e.code} ({e.reason}); check the "
                     "address, or try again later") from None
  except (urllib.error.URLError, OSError) as e:
    reason = getattr(e, "reason", e)
    raise FetchError(f"{url}: cannot connect ({reason}); check the network (or proxy "
                     f"settings), or put {os.path.basename(part[:-5])} into "
                     f"{os.path.dirname(part) or '.'} by hand and rerun") from None
  with response:
    if start and response.status != 206:
      log(f"{url}: the server does not resume downloads; starting again from byte 0")
      start = 0
    elif start:
      log(f"{part}: resuming at byte {start}")
    length = response.headers.get("Content-Length")
    total = size if size is not None else (start + int(length) if length else None)
    received = start
    with open(part, "ab" if start else "wb") as f, \
        _bar(total, start, os.path.basename(part[:-5]), progress) as bar:
      while True:
        try:
          chunk = response.read(CHUNK)
        except (http.client.HTTPException, OSError) as e:
          raise FetchError(f"{url}: the transfer stopped after {received} bytes "
                           f"({type(e).__name__}); {part} is kept: rerun the same command to "
                           "resume it") from None
        if not chunk:
          break
        f.write(chunk)
        received += len(chunk)
        bar.update(len(chunk))
  if total is not None and received < total:
    raise FetchError(f"{url}: the transfer stopped after {received} of {total} bytes; {part} "
                     "is kept: rerun the same command to resume it")


def _check_member(archive: str, member: tarfile.TarInfo) -> str:
  """The member's path inside cifar-10-batches-py/; FetchError for anything unsafe or foreign."""
  name = member.name
  parts = os.path.normpath(name).split(os.sep)
  if os.path.isabs(name) or ".." in name.split("/") or parts[0] != data.CIFAR_BATCH_DIR:
    raise FetchError(f"{archive}: refusing member {name!r}: a CIFAR-10 archive holds only "
                     f"{data.CIFAR_BATCH_DIR}/; the archive is not CIFAR-10's (delete it)")
  if not (member.isfile() or member.isdir()):
    raise FetchError(f"{archive}: refusing member {name!r}: links and devices are not "
                     "unpacked; the archive is not CIFAR-10's (delete it)")
  return name


def unpack(archive: str, directory: str) -> str:
  """Unpacks the archive's cifar-10-batches-py/ into `directory`; returns that folder.

  Extraction goes to a temporary folder beside it that is renamed when complete, so an
  interrupted unpack leaves nothing half-written under the final name.
  """
  target = os.path.join(directory, data.CIFAR_BATCH_DIR)
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
      raise FetchError(f"{archive}: cannot be unpacked ({type(e).__name__}: {e}); it is "
                       "damaged: delete it and rerun") from None
    missing = [name for name in (META_FILE, *BATCH_FILES)
               if not os.path.isfile(os.path.join(staging, data.CIFAR_BATCH_DIR, name))]
    if missing:
      raise FetchError(f"{archive}: lacks {', '.join(missing)} under {data.CIFAR_BATCH_DIR}/; "
                       "it is not CIFAR-10's python version (delete it)")
    if os.path.exists(target):
      shutil.rmtree(target)
    os.replace(os.path.join(staging, data.CIFAR_BATCH_DIR), target)
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
  out_dir = os.path.join(directory, data.CIFAR_BATCH_DIR)
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(batch_dir, META_FILE), "rb") as f:
    files.write_bytes(os.path.join(out_dir, META_FILE), f.read())
  for name in BATCH_FILES:
    path = os.path.join(batch_dir, name)
    batch = data.cifar.unpickle(path)  # The restricted unpickler: the archive is untrusted input.
    rows, labels = batch.get("data"), batch.get("labels")
    if not isinstance(rows, np.ndarray) or rows.ndim != 2 or labels is None \
        or len(labels) != len(rows):
      raise FetchError(f"{path}: not a CIFAR-10 batch (expected 'data' [N, 3072] and N "
                       "'labels'); delete the archive and the folder and rerun")
    if len(rows) < size:
      raise FetchError(f"{path}: holds {len(rows)} images, fewer than the subset's {size}")
    files.write_bytes(os.path.join(out_dir, name),
                      encode_batch(str(batch.get("batch_label", "")), labels[:size], rows[:size]))
  lines = [f"{_digest(os.path.join(out_dir, name), 'sha256')}  {data.CIFAR_BATCH_DIR}/{name}"
           for name in (META_FILE, *BATCH_FILES)]
  files.write_text(os.path.join(directory, SUMS_FILE), "\n".join(lines) + "\n")
  return directory


def matches_shared_subset(directory: str) -> list[str]:
  """Files of a written subset whose SHA-256 differs from the reference subset's (empty: same)."""
  return [name for name, expected in SUBSET_SHA256.items()
          if _digest(os.path.join(directory, data.CIFAR_BATCH_DIR, name), "sha256") != expected]


def fetch(directory: str, *, url: str = URL, md5: str = MD5, size: int | None = SIZE,
          subset_size: int = SUBSET_SIZE, subset: bool = True, progress: bool = False,
          log: Callable[[str], None] = print) -> dict[str, str]:
  """Download, verify, unpack and (unless `subset=False`) write the subset; returns paths."""
  os.makedirs(directory, exist_ok=True)
  archive = download(url, os.path.join(directory, ARCHIVE), md5=md5, size=size,
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


def _parse(argv: Sequence[str]) -> tuple[str, str, argparse.Namespace]:
  """(dataset, DIR, flags) from the command line; FetchError for a misuse (one line)."""
  parser = argparse.ArgumentParser(
      prog="python -m linfjax.fetch", usage="%(prog)s [cifar10 | gtsrb] DIR [flags]",
      description=__doc__.split("\n\n")[0],
      epilog="Then, on CIFAR-10: python -m linfjax.main --config=configs/cifar_patch.py:quick "
             "--workdir=runs/quick --config.data.path=DIR/cifar10-subset; on GTSRB: python -m "
             "linfjax.main --config=configs/gtsrb_patch.py:quick --workdir=runs/gtsrb "
             "--config.data.path=DIR")
  parser.add_argument("dataset", metavar="DATASET", help=f"one of {', '.join(DATASETS)}; "
                      "without it, the one argument is DIR and the dataset CIFAR-10")
  parser.add_argument("directory", metavar="DIR", nargs="?", help="where the archives and "
                      "the unpacked dataset (CIFAR-10: and the subset) go (created)")
  parser.add_argument("--url", help=f"cifar10: the archive's address (default: {URL}); a "
                      "mirror must serve the same file (its MD5 is checked)")
  parser.add_argument("--no_subset", action="store_true", help="cifar10: no subset")
  parser.add_argument("--base_url", help="gtsrb: the folder holding the three archives "
                      "(default: the official one); a mirror must serve the same files")
  args = parser.parse_args(argv[1:])
  dataset, directory = args.dataset, args.directory
  if directory is None:
    if dataset in DATASETS:
      raise FetchError(f"DIR is missing: python -m linfjax.fetch {dataset} DIR")
    dataset, directory = "cifar10", args.dataset
  elif dataset not in DATASETS:
    raise FetchError(f"unknown dataset {dataset!r}; known: {', '.join(DATASETS)} (or give "
                     "only DIR for CIFAR-10)")
  for flag, value, owner in (("--url", args.url, "cifar10"), ("--no_subset", args.no_subset,
                             "cifar10"), ("--base_url", args.base_url, "gtsrb")):
    if value and dataset != owner:
      raise FetchError(f"{flag} is a flag of {owner}, not of {dataset}; drop it")
  return dataset, directory, args


def main(argv: Sequence[str]) -> int:
  try:
    dataset, directory, args = _parse(argv)
    if dataset == "gtsrb":
      from linfjax.data import fetch_gtsrb  # It imports this module: imported here, when needed.
      paths = fetch_gtsrb.fetch_gtsrb(directory, base_url=args.base_url or fetch_gtsrb.BASE_URL,
                                      progress=sys.stderr.isatty())
    else:
      paths = fetch(directory, url=args.url or URL, subset=not args.no_subset,
                    progress=sys.stderr.isatty())
  except (errors.UserError, OSError) as e:
    user_error = errors.from_os_error(e) if isinstance(e, OSError) else e
    if user_error is None:
      raise
    print(f"error: {errors.one_line(user_error)}", file=sys.stderr)
    return errors.EXIT_USER_ERROR
  if dataset == "gtsrb":
    print("Quick run on GTSRB:\n  python -m linfjax.main --config=configs/gtsrb_patch.py:quick "
          f"--workdir=runs/gtsrb --config.data.path={paths['data']}")
  if "subset" in paths:
    print("Quick run on the subset:\n  python -m linfjax.main --config=configs/cifar_patch.py:"
          f"quick --workdir=runs/quick --config.data.path={paths['subset']}")
  if "full" in paths:
    print("Full configs on the full set:\n  python -m linfjax.main --config=configs/cifar_patch.py "
          "--workdir=runs/patch --config.data.source=cifar10_dir --config.data.path="
          f"{paths['full']}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
