"""Download GTSRB's three official archives, verified, and unpack them into its own layout.

    python -m linfjax.fetch gtsrb DIR

downloads into DIR, from the archive address that the GTSRB benchmark page links to,

  GTSRB_Final_Training_Images.zip  the 39,209 training images and a CSV per class,
  GTSRB_Final_Test_Images.zip      the 12,630 test images (and a CSV without classes),
  GTSRB_Final_Test_GT.zip          the test images' classes (GT-final_test.csv),

resuming an interrupted download (HTTP Range) and checking each file's size and MD5, then
unpacks them into the layout that a person who downloads and unzips them by hand has:

  DIR/GTSRB/Final_Training/Images/000CC/XXXXX_YYYYY.ppm and GT-000CC.csv (43 classes)
  DIR/GTSRB/Final_Test/Images/NNNNN.ppm and GT-final_test.test.csv
  DIR/GTSRB/Final_Test/GT-final_test.csv (the GT archive's one file)

The archives stay in DIR: a rerun checks them (no request) and skips what is unpacked; delete
them and a rerun downloads them again. An archive is unpacked into a temporary folder in DIR
and moved into place only when complete. Nothing is unpacked from a member with an absolute
path, `..`, a link, a device or encryption, from one outside the archive's own top folder
(`GTSRB/`; the GT archive's only file), or from an archive that would unpack to more bytes
than its bound (a zip bomb).

References:
  Stallkamp, Schlipsing, Salmen, Igel, "Man vs. computer: Benchmarking machine learning
  algorithms for traffic sign recognition", Neural Networks 32, 2012;
  https://benchmark.ini.rub.de/gtsrb_dataset.html (links to the address below).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import stat
import tempfile
import zipfile
from typing import Callable, Sequence

from linfjax import errors
from linfjax.data import download

BASE_URL = "https://sid.erda.dk/public/archives/daaeac0d7ce1152aea9b61d9f1e19370/"
DATA_DIR = "GTSRB"  # What the archives unpack into DIR, and what `data.path=DIR` is read for.
_GiB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Archive:
  """One official archive: its name at the base address, digest, and what it may unpack.

  Attributes:
    name: the file name, at BASE_URL and in DIR.
    md5: its published MD5.
    size: its size in bytes (None: not checked; the MD5 still is).
    members: the only top-level entry it may hold: a folder when it ends in '/', else a file.
    into: the folder under DIR its members go to ('' for DIR itself).
    required: a path under DIR that a complete archive unpacks (else it is not this archive).
    max_bytes: the most bytes it may unpack to; more is a zip bomb, not GTSRB.
  """
  name: str
  md5: str
  size: int | None
  members: str
  into: str
  required: str
  max_bytes: int


# MD5s: the ones torchvision (the test archives) and other GTSRB loaders check; sizes: the
# Content-Length this address served in a published download log (test ones also tabulated).
ARCHIVES = (
    Archive("GTSRB_Final_Training_Images.zip", "f33fd80ac59bff73c82d25ab499e03a3", 276_294_756,
            members="GTSRB/", into="", required="GTSRB/Final_Training/Images", max_bytes=2 * _GiB),
    Archive("GTSRB_Final_Test_Images.zip", "c7e4e6327067d32654124b0fe9e82185", 88_978_620,
            members="GTSRB/", into="", required="GTSRB/Final_Test/Images", max_bytes=_GiB),
    Archive("GTSRB_Final_Test_GT.zip", "fe31e9c9270bbcd7b84b7f21a9d9d9e5", 99_620,
            members="GT-final_test.csv", into="GTSRB/Final_Test",
            required="GTSRB/Final_Test/GT-final_test.csv", max_bytes=1 << 24),
)


def _refuse(path: str, name: str, why: str) -> download.FetchError:
  return download.FetchError(f"{path}: refusing member {name!r}: {why}; the archive is not "
                          "GTSRB's official one (delete it and rerun)")


def _check(path: str, archive: Archive, info: zipfile.ZipInfo) -> str:
  """The member's path under DIR ('/'-separated); FetchError for anything unsafe or foreign."""
  name = info.filename
  parts = name.rstrip("/").split("/")
  if name.startswith("/") or "\\" in name or ":" in parts[0] or "" in parts \
      or any(part in (".", "..") for part in parts):
    raise _refuse(path, name, "absolute paths, '..' and odd names are not unpacked")
  if not (name.startswith(archive.members) if archive.members.endswith("/")
          else name == archive.members):
    raise _refuse(path, name, f"this archive holds only {archive.members}")
  mode = info.external_attr >> 16
  if stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
    raise _refuse(path, name, "links and devices are not unpacked")
  if info.flag_bits & 0x1:
    raise _refuse(path, name, "encrypted members are not unpacked")
  return f"{archive.into}/{name}" if archive.into else name


def _unpacked(members: list[tuple[str, zipfile.ZipInfo]], directory: str) -> bool:
  """Whether every file of the archive is under `directory` with its size (a rerun's skip)."""
  for target, info in members:
    path = os.path.join(directory, target)
    if not (os.path.isdir(path) if info.is_dir() else
            os.path.isfile(path) and os.path.getsize(path) == info.file_size):
      return False
  return True


def _move_into(source: str, target: str) -> None:
  """Moves the tree `source` into the folder `target`: merges folders, replaces files.

  A folder where the archive has a file (or the reverse) is reported, not deleted.
  """
  for name in sorted(os.listdir(source)):
    here, there = os.path.join(source, name), os.path.join(target, name)
    if os.path.isdir(here) and os.path.isdir(there):
      _move_into(here, there)
    elif os.path.isdir(here) == os.path.isdir(there) or not os.path.exists(there):
      os.replace(here, there)  # A link in the way is replaced itself, not what it points to.
    else:
      kinds = ("folder", "file") if os.path.isdir(there) else ("file", "folder")
      raise download.FetchError(f"{there}: a {kinds[0]} stands where the archive has a {kinds[1]}; "
                             "move it away and rerun")


def unpack(path: str, archive: Archive, directory: str,
           log: Callable[[str], None] = lambda text: None) -> str:
  """Unpacks the zip `path` (the official `archive`) into `directory`; returns the required path.

  Every member is checked before anything is written; extraction goes to a temporary folder
  in `directory` whose tree is moved into place when complete, so an interrupted unpack
  leaves no half-written file under a final name (a rerun unpacks the archive again).
  """
  required = os.path.join(directory, archive.required)
  try:
    with zipfile.ZipFile(path) as zf:
      members = [(_check(path, archive, info), info) for info in zf.infolist()]
      total = sum(info.file_size for _, info in members)
      if total > archive.max_bytes:
        raise download.FetchError(f"{path}: would unpack {total} bytes, more than the "
                               f"{archive.max_bytes} a GTSRB archive may; it is not GTSRB's "
                               "official one (delete it and rerun)")
      if _unpacked(members, directory) and os.path.exists(required):
        log(f"{path}: already unpacked")
        return required
      staging = tempfile.mkdtemp(prefix=".unpack-", dir=directory)
      try:
        for target, info in members:
          out = os.path.join(staging, *target.split("/"))
          if info.is_dir():
            os.makedirs(out, exist_ok=True)
            continue
          os.makedirs(os.path.dirname(out), exist_ok=True)
          with zf.open(info) as source, open(out, "wb") as sink:
            shutil.copyfileobj(source, sink, download.CHUNK)
        if not os.path.exists(os.path.join(staging, archive.required)):
          raise download.FetchError(f"{path}: lacks {archive.required}; it is not GTSRB's "
                                 f"{archive.name} (delete it and rerun)")
        _move_into(staging, directory)
      finally:
        shutil.rmtree(staging, ignore_errors=True)
  except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, NotImplementedError,
          OSError) as e:
    if isinstance(e, OSError) and errors.from_os_error(e) is not None:
      raise
    raise download.FetchError(f"{path}: cannot be unpacked ({type(e).__name__}: {e}); it is "
                           "damaged: delete it and rerun") from None
  log(f"{path}: {sum(not info.is_dir() for _, info in members)} files unpacked into "
      f"{os.path.join(directory, DATA_DIR)}")
  return required


def fetch_gtsrb(directory: str, *, base_url: str = BASE_URL,
                archives: Sequence[Archive] | None = None, progress: bool = False,
                log: Callable[[str], None] = print) -> dict[str, str]:
  """Downloads and verifies every archive, then unpacks each; returns the paths.

  Args:
    directory: DIR: the archives and DIR/GTSRB/ go here (created).
    base_url: the folder address the archives are read from (a mirror must serve the same
      files: their sizes and MD5s are checked).
    archives: the archives' names, digests and rules (None: ARCHIVES, the official ones).
    progress: show a progress bar per download.
    log: receives one line per step.

  Returns:
    {'data': DIR, the value of `--config.data.path`; 'GTSRB': DIR/GTSRB; and one entry per
    archive name: its path}.
  """
  archives = ARCHIVES if archives is None else archives
  os.makedirs(directory, exist_ok=True)
  paths = {archive.name: download.download(base_url.rstrip("/") + "/" + archive.name,
                                        os.path.join(directory, archive.name), md5=archive.md5,
                                        size=archive.size, progress=progress, log=log)
           for archive in archives}
  for archive in archives:
    unpack(paths[archive.name], archive, directory, log=log)
  return {"data": directory, DATA_DIR: os.path.join(directory, DATA_DIR), **paths}
