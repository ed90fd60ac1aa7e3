"""linfjax.fetch against an HTTP server on 127.0.0.1 serving archives the tests build."""

import hashlib
import http.server
import io
import os
import tarfile
import threading

import numpy as np
import pytest
from conftest import SHARED_SUBSET, write_cifar_dir

from linfjax import config as config_lib
from linfjax import data, fetch
from linfjax.data import download, fetch_cifar


def _archive_from(batch_root: str, extra: dict | None = None) -> bytes:
  """A .tar.gz of batch_root/cifar-10-batches-py, plus `extra` members {name: TarInfo or bytes}."""
  buffer = io.BytesIO()
  with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
    tar.add(os.path.join(batch_root, "cifar-10-batches-py"), arcname="cifar-10-batches-py")
    for name, content in (extra or {}).items():
      if isinstance(content, tarfile.TarInfo):
        tar.addfile(content)
      else:
        info = tarfile.TarInfo(name)
        info.size = len(content)
        tar.addfile(info, io.BytesIO(content))
  return buffer.getvalue()


class _Server:
  """Serves `content` with Range support; can cut a transfer short.

  `content` is served at every path (`url` names /archive.tar.gz) when it is bytes; when it
  is a dict {path: bytes}, each at its path under `base_url`, and any other path is a 404.
  """

  def __init__(self, content: bytes | dict[str, bytes]):
    self.content = content
    self.cut_after = None  # Close the connection after this many body bytes.
    self.honour_range = True
    self.ranges, self.paths, self.bytes_sent = [], [], 0
    server = self

    class Handler(http.server.BaseHTTPRequestHandler):
      def do_GET(self):
        body, status = server.content, 200
        if isinstance(body, dict):
          body = body.get(self.path.lstrip("/"))
        requested = self.headers.get("Range")
        server.ranges.append(requested)
        server.paths.append(self.path)
        if body is None:
          self.send_error(404)
          return
        start = 0
        if requested and server.honour_range:
          start = int(requested.split("=")[1].split("-")[0])
          if start >= len(body):
            self.send_response(416)
            self.end_headers()
            return
          status = 206
        self.send_response(status)
        self.send_header("Content-Length", str(len(body) - start))
        if status == 206:
          self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.end_headers()
        payload = body[start:]
        if server.cut_after is not None:
          payload = payload[:server.cut_after]
        self.wfile.write(payload)
        server.bytes_sent += len(payload)
        if server.cut_after is not None:
          self.close_connection = True

      def log_message(self, *args):
        pass

    self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
    self.url = self.base_url + "archive.tar.gz"
    self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
    self.thread.start()

  def close(self):
    self.httpd.shutdown()
    self.httpd.server_close()


@pytest.fixture
def served(tmp_path):
  """(server, archive bytes, the batches' data/labels as written) for a 20-image-per-file set."""
  root = str(tmp_path / "source")
  batches, labels = write_cifar_dir(root, per_batch=20, num_test=20)
  content = _archive_from(root)
  server = _Server(content)
  yield server, content, batches, labels
  server.close()


def _fetch(server, content, directory, **kwargs):
  kwargs.setdefault("subset_size", 7)
  return fetch_cifar.fetch(directory, url=server.url, md5=hashlib.md5(content).hexdigest(),
                     size=len(content), log=lambda text: None, **kwargs)


def test_good_download_unpacks_and_writes_the_first_images_of_each_file(served, tmp_path):
  server, content, batches, labels = served
  directory = str(tmp_path / "cifar")
  paths = _fetch(server, content, directory)
  with open(paths["archive"], "rb") as f:
    assert f.read() == content
  full = data.load_cifar10_dir(paths["full"])
  assert len(full.train_labels) == 100 and len(full.test_labels) == 20
  subset = data.load_cifar10_dir(paths["subset"])  # Its SHA256SUMS is checked on load.
  expected_rows = np.concatenate([b[:7] for b in batches[:5]])
  np.testing.assert_array_equal(
      subset.train_images, expected_rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
  np.testing.assert_array_equal(subset.train_labels, np.concatenate([l[:7] for l in labels[:5]]))
  np.testing.assert_array_equal(subset.test_labels, labels[5][:7])
  # One flag points the quick config at it.
  config = config_lib.make_quick(config_lib.base_config())
  config.data.path = paths["subset"]
  assert data.load(config.data).train_images.shape == (35, 32, 32, 3)
  # A rerun finds everything done: no second request.
  requests = len(server.ranges)
  _fetch(server, content, directory)
  assert len(server.ranges) == requests


def test_interrupted_download_keeps_its_part_and_resumes_with_a_range_request(served, tmp_path):
  server, content, _, _ = served
  directory = str(tmp_path / "cifar")
  server.cut_after = 1000
  with pytest.raises(download.FetchError, match=r"stopped after 1000 of \d+ bytes.*rerun the same command"):
    _fetch(server, content, directory)
  part = os.path.join(directory, fetch_cifar.ARCHIVE + ".part")
  assert os.path.getsize(part) == 1000
  assert not os.path.exists(os.path.join(directory, "cifar-10-batches-py"))
  server.cut_after, server.bytes_sent = None, 0
  paths = _fetch(server, content, directory)
  assert server.ranges[-1] == "bytes=1000-"
  assert server.bytes_sent == len(content) - 1000  # Only the rest was sent again.
  with open(paths["archive"], "rb") as f:
    assert f.read() == content
  assert not os.path.exists(part)


def test_server_without_range_support_restarts_from_zero(served, tmp_path):
  server, content, _, _ = served
  directory = str(tmp_path / "cifar")
  server.cut_after = 500
  with pytest.raises(download.FetchError):
    _fetch(server, content, directory)
  server.cut_after, server.honour_range = None, False
  paths = _fetch(server, content, directory)
  with open(paths["archive"], "rb") as f:
    assert f.read() == content


def test_wrong_checksum_deletes_the_file_and_unpacks_nothing(served, tmp_path):
  server, content, _, _ = served
  directory = str(tmp_path / "cifar")
  with pytest.raises(download.FetchError, match="MD5 is .*not the published 0{32}.*deleted"):
    fetch_cifar.fetch(directory, url=server.url, md5="0" * 32, size=len(content), log=lambda t: None)
  assert sorted(os.listdir(directory)) == []


def test_truncated_archive_with_matching_checksum_is_reported_as_damaged(tmp_path):
  root = str(tmp_path / "source")
  write_cifar_dir(root, per_batch=20, num_test=20)
  content = _archive_from(root)[:5000]
  server = _Server(content)
  try:
    with pytest.raises(download.FetchError, match="cannot be unpacked.*damaged"):
      _fetch(server, content, str(tmp_path / "cifar"))
  finally:
    server.close()
  assert not os.path.exists(tmp_path / "cifar" / "cifar-10-batches-py")


@pytest.mark.parametrize("member", ["../escape.txt", "/tmp/absolute.txt", "link", "other.txt"])
def test_unsafe_or_foreign_members_are_refused(tmp_path, member):
  root = str(tmp_path / "source")
  write_cifar_dir(root, per_batch=20, num_test=20)
  if member == "link":
    info = tarfile.TarInfo("cifar-10-batches-py/link")
    info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
    extra = {member: info}
  else:
    extra = {member: b"payload"}
  content = _archive_from(root, extra)
  server = _Server(content)
  try:
    with pytest.raises(download.FetchError, match="refusing member"):
      _fetch(server, content, str(tmp_path / "out" / "cifar"))
  finally:
    server.close()
  assert not os.path.exists(tmp_path / "out" / "escape.txt")
  assert not os.path.exists(tmp_path / "out" / "cifar" / "cifar-10-batches-py")


def test_unreachable_server_names_the_address(tmp_path):
  server = _Server(b"")
  url = server.url
  server.close()
  with pytest.raises(download.FetchError, match="cannot connect"):
    fetch_cifar.fetch(str(tmp_path / "cifar"), url=url, md5="0" * 32, size=10, log=lambda t: None)


@pytest.mark.skipif(not os.path.isdir(SHARED_SUBSET), reason="needs ../shared/data")
def test_subset_of_an_archive_of_the_shared_files_is_byte_identical(tmp_path):
  """The writer reproduces ../shared's subset exactly (what the official archive gives)."""
  content = _archive_from(SHARED_SUBSET)
  server = _Server(content)
  try:
    paths = _fetch(server, content, str(tmp_path / "cifar"), subset_size=fetch_cifar.SUBSET_SIZE)
  finally:
    server.close()
  assert fetch_cifar.matches_shared_subset(paths["subset"]) == []
  for name in os.listdir(os.path.join(SHARED_SUBSET, "cifar-10-batches-py")):
    with open(os.path.join(SHARED_SUBSET, "cifar-10-batches-py", name), "rb") as f, \
        open(os.path.join(paths["subset"], "cifar-10-batches-py", name), "rb") as g:
      assert f.read() == g.read(), name
  with open(os.path.join(SHARED_SUBSET, "SHA256SUMS")) as f, \
      open(os.path.join(paths["subset"], "SHA256SUMS")) as g:
    assert sorted(f.read().split()) == sorted(g.read().split())


def test_main_prints_one_line_and_exits_2(tmp_path, capsys):
  server = _Server(b"")
  url = server.url
  server.close()
  assert fetch.main(["fetch", str(tmp_path / "cifar"), f"--url={url}"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("error: ") and "cannot connect" in err
