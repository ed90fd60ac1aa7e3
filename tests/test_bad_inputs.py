"""Bad inputs through the command line: one line, exit status 2, workdir and data untouched.

This file: the config's fields, the command line and the config file;
tests/test_bad_run_inputs.py: the data, the workdir and the train stage's checkpoints.

Every case runs `main.cli` in-process (a few run `python -m linfjax.main` for real exit
codes) and checks: the exit status is 2, stderr has exactly one `error: ` line, it is the
last line and matches the expected message, no traceback is printed, and every file and
folder of the workdir and the data is byte for byte what it was (hashed before and after).
"""

import hashlib
import os
import re

import pytest
from conftest import REPO_ROOT, write_cifar_dir

from linfjax import config as config_lib
from linfjax import main

CONFIG = os.path.join(REPO_ROOT, "configs", "cifar_patch.py")


def tree_hash(path):
  """None if absent; a file's SHA-256; a folder's sorted (relative path, hash or 'dir')."""
  if not os.path.lexists(path):
    return None
  if not os.path.isdir(path):
    with open(path, "rb") as f:
      return hashlib.sha256(f.read()).hexdigest()
  entries = []
  for root, dirs, names in os.walk(path):
    for name in dirs:
      entries.append((os.path.relpath(os.path.join(root, name), path), "dir"))
    for name in names:
      entries.append((os.path.relpath(os.path.join(root, name), path),
                      tree_hash(os.path.join(root, name))))
  return sorted(entries)


def tiny_args(data_dir, workdir, *extra, config=CONFIG + ":quick"):
  return ["linfjax.main", f"--config={config}", f"--workdir={workdir}",
          f"--config.data.path={data_dir}", "--config.data.clean_set_size=20",
          "--config.model.width=0.125", "--config.train.epochs=1", "--config.train.batch_size=16",
          "--config.train.eval_batch_size=32", "--config.poison.rate=0.2",
          "--config.reverse.steps=2", "--config.reverse.mini_batches=1", *extra]


def refused(capsys, argv, pattern, *watch):
  """Runs the command line; checks the one-line error, exit 2, and that `watch` is unchanged."""
  before = [tree_hash(path) for path in watch]
  status = main.cli(argv)
  err = capsys.readouterr().err
  lines = [line for line in err.splitlines() if line.strip()]
  errors_ = [line for line in lines if line.startswith("error: ")]
  assert status == 2, err
  assert len(errors_) == 1 and lines[-1] == errors_[0], err
  assert re.search(pattern, errors_[0]), errors_[0]
  assert "Traceback" not in err
  assert [tree_hash(path) for path in watch] == before
  return errors_[0]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("data"))
  write_cifar_dir(root)
  return root


@pytest.fixture
def workdir(tmp_path):
  return str(tmp_path / "run")


# --- names and numbers the config validation refuses ----------------------------------------

RULES = {path: rule.text for path, rule in config_lib.rules().items()
         if rule.text.startswith(("an integer >= ", "a number in ", "one of "))}
# Fields checked only under another trigger kind: the flags that make it the kind in force.
CONDITIONS = {path: rule.condition for path, rule in config_lib.rules().items()
              if rule.condition is not None}
KIND_FLAGS = {"blend": ["--config.trigger.kind=blend", "--config.trigger.pattern=noise"],
              "sig": ["--config.trigger.kind=sig", "--config.trigger.clean_label=True"],
              "patch": []}


def _kind_flags(kind: str) -> list[str]:
  """The flags that select attack `kind`, whose own fields are checked only then."""
  return KIND_FLAGS.get(kind, [f"--config.trigger.kind={kind}"])


def _out_of_range(rule):
  """A value just outside an 'an integer >= m' or 'a number in (lo, hi]' rule."""
  if rule.startswith("an integer >= "):
    return str(int(rule.split(">= ")[1]) - 1)
  match = re.fullmatch(r"a number in ([\[(])(\S+), (\S+)([\])])", rule)
  low = float(match.group(2))
  return str(low) if match.group(1) == "(" else str(low - 1.0)


NUMERIC = sorted(field for field, rule in RULES.items() if not rule.startswith("one of"))
CHOICES = sorted(field for field, rule in RULES.items() if rule.startswith("one of"))


def test_every_checked_field_is_covered():
  assert len(NUMERIC) >= 30 and len(CHOICES) >= 10


@pytest.mark.parametrize("field", NUMERIC)
def test_numeric_field_out_of_range(capsys, data_dir, workdir, field):
  extra = _kind_flags(CONDITIONS[field][1][0]) if field in CONDITIONS else []
  refused(capsys, tiny_args(data_dir, workdir, *extra,
                            f"--config.{field}={_out_of_range(RULES[field])}"),
          rf"config\.{re.escape(field)}: ", workdir, data_dir)


def test_numeric_field_above_its_range(capsys, data_dir, workdir):
  refused(capsys, tiny_args(data_dir, workdir, "--config.poison.rate=1.0"),
          r"config\.poison\.rate: 1\.0 is outside \(0\.0, 1\.0\)", workdir, data_dir)


@pytest.mark.parametrize("field", CHOICES)
def test_unknown_name(capsys, data_dir, workdir, field):
  extra = _kind_flags(CONDITIONS[field][1][0]) if field in CONDITIONS else []
  message = refused(capsys, tiny_args(data_dir, workdir, *extra, f"--config.{field}=bogus"),
                    rf"config\.{re.escape(field)}: unknown value 'bogus'; known: ",
                    workdir, data_dir)
  allowed = RULES[field].removeprefix("one of ").replace("'", "")
  assert message.endswith(allowed)


@pytest.mark.parametrize("override, pattern", [
    ("--config.prune.defenses=('linf', 'l5')", r"config\.prune\.defenses: must be distinct "
     r"names from linf, linf_ft, l2, .*nc_unlearning, .*got \('linf', 'l5'\)"),
    ("--config.prune.layers.layers=('conv9',)", r"config\.prune\.layers\.layers: unknown layer "
     r"'conv9' of model 'cnn'"),
    ("--config.stages=('train', 'finetune')", r"config\.stages: unknown stage 'finetune'; "
     r"known: train, reverse, analysis, prune"),
    ("--config.stages=train,reverse", r"config\.stages: unknown stage 'train,reverse'; .*"
     r"\(several stages: --config\.stages=\"\('train','reverse'\)\", or the flag once"),
    ("--config.prune.layer=conv9", r"config\.prune\.layer: unknown layer 'conv9' of model "
     r"'cnn'; known: .*conv3_2"),
    ("--config.trigger.color=(1.0, 2.0, 1.0)", r"config\.trigger\.color: must be values in "
     r"\[0, 1\]"),
    ("--config.sweep.axes=seed=", r"config\.sweep\.axes: 'seed=' is not FIELD=VALUE"),
    ("--config.sweep.axes=seed=0,,1", r"config\.sweep\.axes: seed needs distinct, non-empty "
     r"values"),
    ("--config.sweep.axes=sed=0,1", r"config\.sweep\.axes: unknown field 'sed'"),
])
def test_other_refused_values(capsys, data_dir, workdir, override, pattern):
  refused(capsys, tiny_args(data_dir, workdir, override), pattern, workdir, data_dir)


def test_unknown_tfds_dataset(capsys, workdir, data_dir):
  refused(capsys, tiny_args(data_dir, workdir, "--config.data.source=tfds",
                            "--config.data.name=no_such_dataset_xyz"),
          r"TFDS dataset 'no_such_dataset_xyz' .*cannot be opened", workdir, data_dir)


# --- the command line and the config file ----------------------------------------------------

def test_override_typo_names_the_field_and_the_fix(capsys, data_dir, workdir):
  refused(capsys, tiny_args(data_dir, workdir, "--config.poison.rat=0.2"),
          r"^error: --config\.poison\.rat: config\.poison has no field 'rat'; did you mean "
          r"--config\.poison\.rate\?", workdir, data_dir)


def test_override_of_the_wrong_type(capsys, data_dir, workdir):
  refused(capsys, tiny_args(data_dir, workdir, "--config.poison.rate=abc"),
          r"--config\.poison\.rate=abc: could not convert string to float", workdir, data_dir)


def test_unknown_flag(capsys, data_dir, workdir):
  refused(capsys, tiny_args(data_dir, workdir, "--bogus=1"),
          r"Unknown command line flag 'bogus'.*--help", workdir, data_dir)


def test_missing_workdir_flag(capsys, data_dir):
  refused(capsys, [a for a in tiny_args(data_dir, "x") if not a.startswith("--workdir")],
          r"--workdir is required", data_dir)


def test_unknown_variant(capsys, data_dir, workdir):
  refused(capsys, tiny_args(data_dir, workdir, config=CONFIG + ":fast"),
          r"unknown config variant 'fast'; known: '', 'quick'", workdir, data_dir)


def test_config_file_that_does_not_exist(capsys, data_dir, workdir):
  refused(capsys, tiny_args(data_dir, workdir, config="configs/cifar_pach.py:quick"),
          r"no config file 'configs/cifar_pach.py'", workdir, data_dir)


@pytest.mark.parametrize("source, pattern", [
    ("def get_config(:\n  pass\n", r"the config file does not parse \(invalid syntax"),
    ("def get_config():\n  return 1 / 0\n", r"ZeroDivisionError: division by zero"),
    ("x = 1\n", r"has no attribute 'get_config'"),
    ("def get_config():\n  return 3\n", r"get_config\(\) returned int, not a ConfigDict"),
])
def test_config_file_that_does_not_load(capsys, tmp_path, data_dir, workdir, source, pattern):
  path = tmp_path / "bad_config.py"
  path.write_text(source)
  refused(capsys, tiny_args(data_dir, workdir, config=str(path)), pattern, workdir, data_dir)


def test_shard_without_a_grid(capsys, data_dir, workdir):
  refused(capsys, tiny_args(data_dir, workdir, "--shard=0/2"),
          r"--shard and --distributed need a grid", workdir, data_dir)
