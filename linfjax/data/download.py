"""Downloads that resume and verify: HTTP Range for an interrupted file, size and MD5 checks.

Every dataset fetcher (linfjax/data/fetch_cifar.py, fetch_gtsrb.py) downloads through
`download`; a failure is a `FetchError` whose one line says what to do (rerun to resume, check
the network, delete a damaged file).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import urllib.error
import urllib.request
from typing import Callable

import tqdm

from linfjax import errors

CHUNK = 1 << 20


class FetchError(errors.UserError):
  """A download, archive or subset is not what it should be (the message says what to do)."""


def digest(path: str, algorithm: str) -> str:
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
      and digest(path, "md5") == md5:
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
  received_md5 = digest(part, "md5")
  if received_md5 != md5:
    os.remove(part)
    raise FetchError(f"{url}: the downloaded file's MD5 is {received_md5}, not the published {md5}; "
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
