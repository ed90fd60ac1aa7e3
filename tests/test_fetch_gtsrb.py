"""linfjax.fetch gtsrb against an HTTP server on 127.0.0.1 serving zips the tests build.

The zips copy the official archives' layout on a tiny scale: three classes of four PPM images
with their CSVs, four test images with theirs, and the GT archive's one CSV.
"""

import dataclasses
import hashlib
import io
import os
import stat
import zipfile

import numpy as np
import pytest
from test_fetch import _Server

from linfjax import fetch
from linfjax.data import download, fetch_cifar, fetch_gtsrb

CLASSES = ("00000", "00001", "00002")
HEADER = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2"


def _ppm(seed: int, width: int = 5, height: int = 4) -> bytes:
  pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
  return f"P6\n{width} {height}\n255\n".encode() + pixels.tobytes()


def _csv(rows) -> bytes:
  return "".join(f"{row}\r\n" for row in rows).encode()


def _files() -> tuple[dict, dict, dict]:
  """The training, test and GT archives' files, {member name: bytes}, as GTSRB names them."""
  train = {"GTSRB/Readme-Images.txt": b"training set readme\r\n"}
  for label, name in enumerate(CLASSES):
    rows = [HEADER + ";ClassId"]
    for track in range(2):
      for frame in range(2):
        image = f"{track:05d}_{frame:05d}.ppm"
        train[f"GTSRB/Final_Training/Images/{name}/{image}"] = _ppm(100 * label + 10 * track + frame)
        rows.append(f"{image};5;4;0;0;4;3;{label}")
    train[f"GTSRB/Final_Training/Images/{name}/GT-{name}.csv"] = _csv(rows)
  test = {"GTSRB/Readme-Images-Final-test.txt": b"test set readme\r\n"}
  for i in range(4):
    test[f"GTSRB/Final_Test/Images/{i:05d}.ppm"] = _ppm(1000 + i, 6, 5)
  test["GTSRB/Final_Test/Images/GT-final_test.test.csv"] = _csv(
      [HEADER] + [f"{i:05d}.ppm;6;5;1;1;5;4" for i in range(4)])
  gt = {"GT-final_test.csv": _csv([HEADER + ";ClassId"] +
                                  [f"{i:05d}.ppm;6;5;1;1;5;4;{i % 3}" for i in range(4)])}
  return train, test, gt


def _zip(files: dict, extra: dict | None = None) -> bytes:
  """A zip of `files` with an entry per folder first (as zip tools write), then `extra`
  {name: bytes or a ZipInfo (its content b'/etc/passwd')}."""
  buffer = io.BytesIO()
  with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
    folders = sorted({name[:i + 1] for name in files for i, c in enumerate(name) if c == "/"})
    for folder in folders:
      zf.writestr(folder, b"")
    for name, content in files.items():
      zf.writestr(name, content)
    for name, content in (extra or {}).items():
      zf.writestr(content if isinstance(content, zipfile.ZipInfo) else name,
                  b"/etc/passwd" if isinstance(content, zipfile.ZipInfo) else content)
  return buffer.getvalue()


def _expected_layout() -> dict:
  """{path under DIR: bytes}: what a person who unzips the three archives by hand has."""
  train, test, gt = _files()
  return {**train, **test, "GTSRB/Final_Test/GT-final_test.csv": gt["GT-final_test.csv"]}


def _tree(root: str) -> dict:
  found = {}
  for folder, _, names in os.walk(root):
    for name in names:
      path = os.path.join(folder, name)
      with open(path, "rb") as f:
        found[os.path.relpath(path, os.path.dirname(root)).replace(os.sep, "/")] = f.read()
  return found


def _archives(contents: list[bytes], **changes) -> tuple:
  """The official archive rules with these contents' MD5s and sizes (and `changes`)."""
  return tuple(dataclasses.replace(archive, md5=hashlib.md5(content).hexdigest(),
                                   size=len(content), **changes)
               for archive, content in zip(fetch_gtsrb.ARCHIVES, contents))


class _Served:
  """The three zips at their official names under one server's base_url."""

  def __init__(self, contents: list[bytes]):
    self.contents = contents
    self.server = _Server({archive.name: content
                           for archive, content in zip(fetch_gtsrb.ARCHIVES, contents)})
    self.archives = _archives(contents)

  def fetch(self, directory: str, **kwargs):
    kwargs.setdefault("archives", self.archives)
    kwargs.setdefault("log", lambda text: None)
    return fetch_gtsrb.fetch_gtsrb(directory, base_url=self.server.base_url, **kwargs)


@pytest.fixture
def served():
  served = _Served([_zip(files) for files in _files()])
  yield served
  served.server.close()


def _leftovers(directory: str) -> list[str]:
  return [name for name in os.listdir(directory) if name.startswith(".unpack-")
          or name.endswith(".part")]


def test_good_download_gives_the_official_layout_byte_for_byte(served, tmp_path):
  directory = str(tmp_path / "gtsrb")
  paths = served.fetch(directory)
  assert paths["data"] == directory
  assert _tree(os.path.join(directory, "GTSRB")) == _expected_layout()
  assert len(_expected_layout()) == 3 * 5 + 1 + 5 + 1 + 1  # Every file, none missed.
  assert sorted(os.listdir(directory)) == sorted(
      ["GTSRB"] + [archive.name for archive in fetch_gtsrb.ARCHIVES])
  for archive, content in zip(fetch_gtsrb.ARCHIVES, served.contents):
    with open(paths[archive.name], "rb") as f:
      assert f.read() == content
  assert sorted(served.server.paths) == sorted(f"/{a.name}" for a in fetch_gtsrb.ARCHIVES)
  # A rerun finds everything done and verified: no request, no file written again.
  image = os.path.join(directory, "GTSRB/Final_Training/Images/00001/00001_00000.ppm")
  inode, lines = os.stat(image).st_ino, []
  served.fetch(directory, log=lines.append)
  assert len(served.server.paths) == 3 and os.stat(image).st_ino == inode
  assert [line.split(": ", 1)[1] for line in lines] == [
      "already downloaded, MD5 verified"] * 3 + ["already unpacked"] * 3
  # A file deleted after the unpack comes back from the kept archive, still without a request.
  os.remove(os.path.join(directory, "GTSRB/Final_Test/Images/00002.ppm"))
  served.fetch(directory)
  assert _tree(os.path.join(directory, "GTSRB")) == _expected_layout()
  assert len(served.server.paths) == 3 and _leftovers(directory) == []


def test_interrupted_download_resumes_with_a_range_request(served, tmp_path):
  directory = str(tmp_path / "gtsrb")
  served.server.cut_after = 100
  first = fetch_gtsrb.ARCHIVES[0].name
  with pytest.raises(download.FetchError, match=r"stopped after 100 of \d+ bytes.*rerun the same"):
    served.fetch(directory)
  assert os.path.getsize(os.path.join(directory, first + ".part")) == 100
  assert not os.path.exists(os.path.join(directory, "GTSRB"))
  served.server.cut_after, served.server.bytes_sent = None, 0
  served.fetch(directory)
  assert served.server.paths[1] == f"/{first}" and served.server.ranges[1] == "bytes=100-"
  assert served.server.bytes_sent == sum(map(len, served.contents)) - 100  # The rest only.
  assert _tree(os.path.join(directory, "GTSRB")) == _expected_layout()
  assert _leftovers(directory) == []


@pytest.mark.parametrize("index", [0, 2])
def test_wrong_checksum_deletes_the_file_and_unpacks_nothing(served, tmp_path, index):
  directory = str(tmp_path / "gtsrb")
  archives = list(served.archives)
  archives[index] = dataclasses.replace(archives[index], md5="0" * 32)
  with pytest.raises(download.FetchError, match="MD5 is .*not the published 0{32}.*deleted"):
    served.fetch(directory, archives=archives)
  assert sorted(os.listdir(directory)) == sorted(a.name for a in archives[:index])


def test_truncated_zip_with_matching_checksum_is_damaged(tmp_path):
  train, test, gt = _files()
  damaged = _zip(test)
  served = _Served([_zip(train), damaged[:len(damaged) // 2], _zip(gt)])
  try:
    with pytest.raises(download.FetchError, match="GTSRB_Final_Test_Images.zip: cannot be "
                       "unpacked.*damaged: delete it and rerun"):
      served.fetch(str(tmp_path / "gtsrb"))
  finally:
    served.server.close()
  assert not os.path.exists(tmp_path / "gtsrb" / "GTSRB" / "Final_Test")
  assert _leftovers(str(tmp_path / "gtsrb")) == []


def _symlink(name: str) -> zipfile.ZipInfo:
  info = zipfile.ZipInfo(name)
  info.create_system = 3  # Unix: the high 16 bits of external_attr are st_mode.
  info.external_attr = (stat.S_IFLNK | 0o777) << 16
  return info


@pytest.mark.parametrize("index, member", [
    (0, "../escape.txt"), (0, "ABSOLUTE"), (0, "GTSRB/Final_Training/Images/00000/link"),
    (0, "Other/x.txt"), (0, "GTSRB"), (1, "GTSRB/../../escape.txt"),
    (2, "GTSRB/Final_Test/GT-final_test.csv"), (2, "extra.csv")])
def test_unsafe_or_foreign_members_are_refused(tmp_path, index, member):
  directory = tmp_path / "out" / "gtsrb"
  if member == "ABSOLUTE":  # Inside tmp_path, so that a wrong unpack would be seen.
    member = str(tmp_path / "absolute.txt")
  extra = {member: _symlink(member) if member.endswith("link") else b"payload"}
  files = list(_files())
  contents = [_zip(f, extra if i == index else None) for i, f in enumerate(files)]
  served = _Served(contents)
  try:
    with pytest.raises(download.FetchError, match=f"{fetch_gtsrb.ARCHIVES[index].name}: "
                       "refusing member.*not GTSRB's official one"):
      served.fetch(str(directory))
  finally:
    served.server.close()
  assert [p.name for p in tmp_path.rglob("*") if p.name in ("escape.txt", "absolute.txt")] == []
  assert not os.path.exists(directory / "Other") and not os.path.exists(directory / "extra.csv")
  assert _leftovers(str(directory)) == []
  # Earlier archives are unpacked; nothing of the refused one is.
  expected = {path: data for unpacked in files[:index] for path, data in unpacked.items()}
  found = _tree(str(directory / "GTSRB")) if os.path.isdir(directory / "GTSRB") else {}
  assert found == expected


def test_an_archive_that_unpacks_beyond_its_bound_is_refused(served, tmp_path):
  directory = str(tmp_path / "gtsrb")
  with pytest.raises(download.FetchError, match=r"would unpack \d+ bytes, more than the 100 "):
    served.fetch(directory, archives=_archives(served.contents, max_bytes=100))
  assert not os.path.exists(os.path.join(directory, "GTSRB"))


def test_main_gtsrb_prints_the_next_command(served, tmp_path, capsys, monkeypatch):
  monkeypatch.setattr(fetch_gtsrb, "ARCHIVES", served.archives)
  directory = str(tmp_path / "gtsrb")
  assert fetch.main(["fetch", "gtsrb", directory, f"--base_url={served.server.base_url}"]) == 0
  assert _tree(os.path.join(directory, "GTSRB")) == _expected_layout()
  out = capsys.readouterr().out
  assert ("python -m linfjax.main --config=configs/gtsrb_patch.py:quick --workdir=runs/gtsrb "
          f"--config.data.path={directory}\n") in out
  assert "cifar" not in out


def _unreachable() -> str:
  server = _Server(b"")
  url = server.base_url
  server.close()
  return url


def test_main_gtsrb_with_an_unreachable_server_prints_one_line_and_exits_2(tmp_path, capsys):
  url = _unreachable()
  assert fetch.main(["fetch", "gtsrb", str(tmp_path / "gtsrb"), f"--base_url={url}"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("error: ") and "cannot connect" in err
  assert f"{url}GTSRB_Final_Training_Images.zip" in err


@pytest.mark.parametrize("args", [["cifar10", "DIR"], ["DIR"]])
def test_main_without_gtsrb_still_fetches_cifar10(tmp_path, capsys, args):
  url = _unreachable() + "cifar.tar.gz"
  argv = [str(tmp_path / "c") if arg == "DIR" else arg for arg in args]
  assert fetch.main(["fetch", *argv, f"--url={url}"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and f"{url}: cannot connect" in err
  assert fetch_cifar.ARCHIVE in err and os.path.isdir(tmp_path / "c")


@pytest.mark.parametrize("args, message", [
    (["gtsrb"], "DIR is missing: python -m linfjax.fetch gtsrb DIR"),
    (["mnist", "DIR"], "unknown dataset 'mnist'; known: cifar10, gtsrb"),
    (["cifar10", "DIR", "--base_url=http://x/"], "--base_url is a flag of gtsrb, not of cifar10"),
    (["gtsrb", "DIR", "--url=http://x/a"], "--url is a flag of cifar10, not of gtsrb"),
    (["DIR", "--no_subset", "--base_url=http://x/"], "--base_url is a flag of gtsrb")])
def test_main_misuse_prints_one_line_and_exits_2(tmp_path, capsys, args, message):
  argv = [str(tmp_path / "d") if arg == "DIR" else arg for arg in args]
  assert fetch.main(["fetch", *argv]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("error: ") and message in err
  assert not os.path.exists(tmp_path / "d")


def test_an_archive_without_its_images_folder_is_not_gtsrbs(tmp_path):
  train, test, gt = _files()
  readme_only = {"GTSRB/Readme-Images.txt": train["GTSRB/Readme-Images.txt"]}
  served = _Served([_zip(readme_only), _zip(test), _zip(gt)])
  try:
    with pytest.raises(download.FetchError, match="GTSRB_Final_Training_Images.zip: lacks "
                       "GTSRB/Final_Training/Images; it is not GTSRB's"):
      served.fetch(str(tmp_path / "gtsrb"))
  finally:
    served.server.close()
  assert not os.path.exists(tmp_path / "gtsrb" / "GTSRB")


def test_a_folder_where_the_archive_has_a_file_is_reported_not_deleted(served, tmp_path):
  directory = tmp_path / "gtsrb"
  in_the_way = directory / "GTSRB" / "Readme-Images.txt"
  os.makedirs(in_the_way / "mine")
  with pytest.raises(download.FetchError, match="Readme-Images.txt: a folder stands where the "
                     "archive has a file; move it away and rerun"):
    served.fetch(str(directory))
  assert os.path.isdir(in_the_way / "mine")
  os.rmdir(in_the_way / "mine")
  os.rmdir(in_the_way)
  served.fetch(str(directory))  # Once moved away, a rerun completes the unpack.
  assert _tree(str(directory / "GTSRB")) == _expected_layout()
