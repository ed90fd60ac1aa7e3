"""Bad data, workdirs and checkpoints through the command line: one line, exit status 2,
workdir and data untouched (the checks of tests/test_bad_inputs.py's `refused`)."""

import contextlib
import errno
import gc
import os
import pickle
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import REPO_ROOT, write_cifar_dir

from linfjax import config as config_lib
from linfjax import files
from linfjax.runs import checkpoints, pipeline
from linfjax.runs.stages import train as train_stage
from linfjax.training import train as train_lib
import test_bad_inputs
from test_bad_inputs import refused, tiny_args

# The same module-scoped data and per-test workdir as tests/test_bad_inputs.py.
data_dir, workdir = test_bad_inputs.data_dir, test_bad_inputs.workdir


# --- the data -----------------------------------------------------------------------------

def _broken_data(tmp_path, change):
  root = str(tmp_path / "broken")
  write_cifar_dir(root)
  change(os.path.join(root, "cifar-10-batches-py"))
  return root


def _rewrite_batch(name, **fields):
  def change(batch_dir):
    path = os.path.join(batch_dir, name)
    with open(path, "rb") as f:
      batch = pickle.load(f, encoding="latin1")
    batch.update(fields)
    with open(path, "wb") as f:
      pickle.dump(batch, f, protocol=2)
  return change


class _RunsCode:
  def __reduce__(self):
    return (os.system, ("touch /tmp/linfjax_pwned",))


def _truncate(name):
  def change(batch_dir):
    path = os.path.join(batch_dir, name)
    with open(path, "rb") as f:
      payload = f.read()
    with open(path, "wb") as f:
      f.write(payload[:len(payload) // 2])
  return change


def _write_pickle(name, obj):
  def change(batch_dir):
    with open(os.path.join(batch_dir, name), "wb") as f:
      pickle.dump(obj, f, protocol=2)
  return change


@pytest.mark.parametrize("change, pattern", [
    (lambda d: os.remove(os.path.join(d, "data_batch_3")), r"data_batch_3: file not found"),
    (_truncate("data_batch_2"), r"data_batch_2: corrupt or truncated pickle"),
    (_rewrite_batch("data_batch_1", data=np.zeros((20, 100), np.uint8)),
     r"data_batch_1: 'data' must be uint8 of shape \(N, 3072\), got uint8 \(20, 100\)"),
    (_rewrite_batch("test_batch", labels=[12] * 30), r"test_batch: labels outside 0\.\.9"),
    (_rewrite_batch("data_batch_4", labels=[1] * 7), r"data_batch_4: 'labels' must be 20 integers"),
    (_write_pickle("data_batch_5", _RunsCode()), r"data_batch_5: not a safe CIFAR batch pickle: "
     r"refusing to load global posix\.system"),
    (_write_pickle("batches.meta", {"num_vis": 3072}), r"batches\.meta: 'label_names' must be"),
])
def test_bad_data_files(capsys, tmp_path, workdir, change, pattern):
  root = _broken_data(tmp_path, change)
  refused(capsys, tiny_args(root, workdir), pattern, workdir, root)
  assert not os.path.exists("/tmp/linfjax_pwned")


def test_tampered_file_fails_its_checksum(capsys, tmp_path, workdir):
  root = str(tmp_path / "summed")
  write_cifar_dir(root)
  batch = os.path.join(root, "cifar-10-batches-py", "data_batch_1")
  with open(os.path.join(root, "SHA256SUMS"), "w") as f:
    f.write(f"{'0' * 64}  cifar-10-batches-py/data_batch_1\n")
  refused(capsys, tiny_args(root, workdir), r"data_batch_1: SHA-256 .* does not match", workdir,
          root)
  assert os.path.exists(batch)


def test_missing_data_names_the_fetch_command(capsys, tmp_path, workdir):
  refused(capsys, tiny_args(str(tmp_path / "absent"), workdir),
          r"absent: no such directory .*python -m linfjax\.fetch DIR.*"
          r"--config\.data\.path=DIR/cifar10-subset", workdir)


@pytest.mark.parametrize("overrides, pattern", [
    (["--config.trigger.size=40"], r"config\.trigger: a 40x40 patch at bottom_right .* does not "
     r"fit a 32x32 image"),
    (["--config.trigger.position=offset", "--config.trigger.offset=(30, 30)"],
     r"config\.trigger: a 3x3 patch at offset \(offset \(30, 30\)\) does not fit"),
    (["--config.poison.target=10"], r"config\.poison\.target: 10 is not a class of this dataset"),
    (["--config.data.clean_set_size=100"], r"config\.data\.clean_set_size: 100 leaves no "
     r"training images"),
    (["--config.train.batch_size=90"], r"config\.train\.batch_size: 90 is larger than the 80 "
     r"training images"),
    (["--config.train.crop_padding=32"], r"config\.train\.crop_padding: 32 is not smaller"),
    (["--config.poison.rate=0.001"], r"config\.poison\.rate: poison rate 0\.001 of 80 examples "
     r"rounds to 0"),
    (["--config.trigger.color=(1.0, 1.0)"], r"config\.trigger\.color: has 2 values; the images "
     r"have 3 channels"),
    (["--config.trigger.pattern=file", "--config.trigger.pattern_file=/no/such.npy"],
     r"/no/such\.npy: trigger pattern file not found"),
])
def test_config_that_does_not_fit_the_data(capsys, data_dir, workdir, overrides, pattern):
  refused(capsys, tiny_args(data_dir, workdir, *overrides), pattern, workdir, data_dir)


def test_pattern_file_of_the_wrong_shape(capsys, tmp_path, data_dir, workdir):
  pattern = str(tmp_path / "pattern.npy")
  np.save(pattern, np.ones((5, 5, 3), np.float32))
  refused(capsys, tiny_args(data_dir, workdir, "--config.trigger.pattern=file",
                            f"--config.trigger.pattern_file={pattern}"),
          r"pattern\.npy: pattern is \(5, 5\), the patch is 3x3", workdir, data_dir)


# --- the workdir --------------------------------------------------------------------------

def test_workdir_that_is_a_file(capsys, tmp_path, data_dir):
  path = tmp_path / "afile"
  path.write_text("not a directory")
  refused(capsys, tiny_args(data_dir, str(path)), r"--workdir .*afile is a file, not a "
          r"directory", str(path), data_dir)
  refused(capsys, tiny_args(data_dir, str(path / "run")), r"lies under a file", str(path),
          data_dir)


def test_fixing_a_mistake_and_rerunning_into_the_same_workdir_is_not_refused(
    capsys, data_dir, workdir):
  refused(capsys, tiny_args(data_dir + "-typo", workdir), r"no such directory", workdir)
  assert not os.path.exists(workdir)  # No config.json that would refuse the fixed command.
  config = config_lib.make_quick(config_lib.base_config())
  config.data.path = data_dir
  pipeline.check_workdir(config, workdir)


def _prepared_workdir(data_dir, workdir, **changes):
  """A workdir as `tiny_args` would write it (config.json), with `changes` applied."""
  config = config_lib.make_quick(config_lib.base_config())
  config.data.update(path=data_dir, clean_set_size=20)
  config.model.width = 0.125
  config.train.update(epochs=1, batch_size=16, eval_batch_size=32)
  config.poison.rate = 0.2
  config.reverse.update(steps=2, mini_batches=1)
  for field, value in changes.items():
    block, name = field.split(".")
    config[block][name] = value
  pipeline.prepare_workdir(config, workdir)
  return config


def test_workdir_of_another_config(capsys, data_dir, workdir):
  _prepared_workdir(data_dir, workdir, **{"train.epochs": 3})
  refused(capsys, tiny_args(data_dir, workdir), r"holds a run of a different config "
          r"\(train\.epochs: 3 in the workdir, 1 now\)", workdir, data_dir)


@pytest.mark.parametrize("name, content, pattern", [
    ("config.json", '{"seed": 0, "stag', r"config\.json: not valid JSON"),
    ("results.json", '{"seed": 0, "train": {', r"results\.json: not valid JSON"),
    ("results.json", '[1, 2]', r"results\.json: not a results object"),
])
def test_damaged_run_files(capsys, data_dir, workdir, name, content, pattern):
  _prepared_workdir(data_dir, workdir)
  with open(os.path.join(workdir, name), "w") as f:
    f.write(content)
  refused(capsys, tiny_args(data_dir, workdir), pattern, workdir, data_dir)


@contextlib.contextmanager
def _read_only(directory):
  """Makes `directory` unwritable even for root (chattr +i, else a read-only tmpfs)."""
  if os.geteuid() != 0:
    os.chmod(directory, 0o555)
    try:
      yield directory
    finally:
      os.chmod(directory, 0o755)
    return
  if subprocess.run(["chattr", "+i", directory], capture_output=True).returncode == 0:
    try:
      yield directory
    finally:
      subprocess.run(["chattr", "-i", directory], check=True)
    return
  if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", directory],
                    capture_output=True).returncode == 0:
    try:
      yield directory
    finally:
      subprocess.run(["umount", directory], check=True)
    return
  pytest.skip("running as root without chattr or mount: no way to make a folder read-only")


def test_read_only_workdir(capsys, data_dir, workdir):
  os.makedirs(workdir)
  with _read_only(workdir):
    refused(capsys, tiny_args(data_dir, workdir),
            r"run.*: (Permission denied|Operation not permitted|Read-only file system); ",
            workdir, data_dir)


def test_full_disk_while_writing(capsys, data_dir, workdir, monkeypatch):
  real = files.tempfile.NamedTemporaryFile

  class FullDisk:
    def __init__(self, *args, **kwargs):
      self._file = real(*args, **kwargs)
      self.name = self._file.name

    def write(self, data):
      raise OSError(errno.ENOSPC, "No space left on device", self.name)

    def close(self):
      self._file.close()

    def __enter__(self):
      return self

    def __exit__(self, *exc):
      self._file.close()

  monkeypatch.setattr(files.tempfile, "NamedTemporaryFile", FullDisk)
  refused(capsys, tiny_args(data_dir, workdir), r"No space left on device; free some disk "
          r"space .* and rerun", workdir, data_dir)


def test_full_disk_on_a_small_tmpfs(capsys, tmp_path, data_dir):
  mount = tmp_path / "small"
  mount.mkdir()
  if os.geteuid() != 0 or subprocess.run(
      ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
      capture_output=True).returncode != 0:
    pytest.skip("cannot mount a tmpfs here")
  try:
    with contextlib.suppress(OSError), open(mount / "filler", "wb") as f:
      while True:
        f.write(b"\0" * 4096)
        f.flush()
    refused(capsys, tiny_args(data_dir, str(mount / "run")), r"No space left on device",
            str(mount), data_dir)
  finally:
    subprocess.run(["umount", str(mount)], check=True)


# --- checkpoints of a finished train stage ----------------------------------------------------

@pytest.fixture
def trained(data_dir, workdir):
  """A workdir whose train stage is recorded finished, with checkpoints of both models."""
  config = _prepared_workdir(data_dir, workdir)
  ctx = pipeline.make_context(config, workdir, progress=False)
  for kind in train_stage.MODEL_KINDS:
    _, state = train_stage._initial_state(ctx, len(ctx.split.train_indices))
    store = checkpoints.StageCheckpoints(train_stage.checkpoint_dir(workdir, kind))
    store.save(config.train.epochs, state)
    store.close()
  files.write_json(os.path.join(workdir, "results.json"), {"seed": 0, "train": {}})
  yield workdir
  gc.collect()  # Orbax's failed reads log "Task exception was never retrieved" when collected.


def _checkpoint_step_dir(workdir, kind="backdoored"):
  return os.path.join(train_stage.checkpoint_dir(workdir, kind), "1")


def test_missing_checkpoint(capsys, data_dir, trained):
  import shutil
  shutil.rmtree(_checkpoint_step_dir(trained))
  refused(capsys, tiny_args(data_dir, trained), r"backdoored: the trained backdoored model "
          r"cannot be restored.*\(the backdoored model has not finished training .* delete "
          r".*train and .*results\.json to train again", trained, data_dir)


def test_truncated_checkpoint(capsys, data_dir, trained):
  paths = [os.path.join(root, name) for root, _, names in os.walk(_checkpoint_step_dir(trained))
           for name in names]
  largest = max(paths, key=os.path.getsize)
  with open(largest, "r+b") as f:
    f.truncate(os.path.getsize(largest) // 2)
  refused(capsys, tiny_args(data_dir, trained), r"backdoored: the trained backdoored model "
          r"cannot be restored; it is missing, truncated or from another model \(checkpoint 1 "
          r"cannot be restored .*delete .*train and .*results\.json", trained, data_dir)


def test_foreign_checkpoint_of_another_model(capsys, data_dir, trained, tmp_path):
  import shutil
  other = _prepared_workdir(data_dir, str(tmp_path / "other"), **{"model.width": 0.25})
  ctx = pipeline.make_context(other, str(tmp_path / "other"), progress=False)
  _, state = train_stage._initial_state(ctx, len(ctx.split.train_indices))
  directory = train_stage.checkpoint_dir(trained, "vanilla")
  shutil.rmtree(directory)
  store = checkpoints.StageCheckpoints(directory)
  store.save(1, state)
  store.close()
  refused(capsys, tiny_args(data_dir, trained), r"vanilla: the trained vanilla model cannot be "
          r"restored.*\(checkpoint 1 cannot be restored", trained, data_dir)


# --- a run that was runnable but failed -------------------------------------------------------

def test_non_finite_loss_stops_in_one_line_and_leaves_no_workdir(capsys, data_dir, workdir,
                                                                  monkeypatch):
  real = train_lib.compiled_step

  def diverging(*settings):
    step = real(*settings)

    def wrapped(state, *args):
      state, metrics = step(state, *args)
      return state, {**metrics, "loss": metrics["loss"] * jax.numpy.nan}
    return wrapped

  monkeypatch.setattr(train_lib, "compiled_step", diverging)
  refused(capsys, tiny_args(data_dir, workdir), r"the training loss became nan at step 0 "
          r"\(epoch 0\); lower train\.learning_rate", workdir, data_dir)
  assert not os.path.exists(workdir)


# --- through a real process -------------------------------------------------------------------

def _process(args, cwd=REPO_ROOT):
  return subprocess.run([sys.executable, "-m", "linfjax.main", *args], cwd=cwd,
                        capture_output=True, text=True, timeout=300,
                        env={**os.environ, "PYTHONPATH": REPO_ROOT})


def test_help_exits_0():
  out = _process(["--help"])
  assert out.returncode == 0 and "--workdir" in out.stdout and "linfjax.config" in out.stdout


@pytest.mark.parametrize("args, pattern", [
    (["--config.data.path={absent}"], r"no such directory .*python -m linfjax\.fetch DIR"),
    (["--config.poison.rat=0.2"], r"did you mean --config\.poison\.rate\?"),
    (["--config.model.name=resnet"], r"config\.model\.name: unknown value 'resnet'"),
])
def test_user_errors_exit_2_in_one_line(tmp_path, data_dir, args, pattern):
  args = [a.format(absent=tmp_path / "absent") for a in args]
  workdir = tmp_path / "run"
  out = _process(tiny_args(data_dir, str(workdir), *args)[1:])
  assert out.returncode == 2, out.stderr
  assert out.stderr.strip().splitlines()[-1].startswith("error: ")
  assert re.search(pattern, out.stderr.strip().splitlines()[-1])
  assert "Traceback" not in out.stderr and not workdir.exists()


def test_verbosity_1_adds_the_traceback(tmp_path, data_dir):
  out = _process(tiny_args(data_dir, str(tmp_path / "run"), "--config.model.name=resnet",
                           "--verbosity=1")[1:])
  assert out.returncode == 2 and "Traceback" in out.stderr
  assert out.stderr.strip().splitlines()[-1].startswith("error: config.model.name")


def test_a_bug_keeps_its_traceback(tmp_path, data_dir):
  code = ("import sys; from linfjax import main; from linfjax.runs import pipeline; "
          "pipeline.run = lambda *a, **k: {}['missing']; "
          f"sys.exit(main.cli({tiny_args(data_dir, str(tmp_path / 'run'))!r}))")
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                       text=True, timeout=300, env={**os.environ, "PYTHONPATH": REPO_ROOT})
  assert out.returncode == 1
  assert "Traceback" in out.stderr and "KeyError: 'missing'" in out.stderr
  assert "error: " not in out.stderr

