"""The config listing is read off base_config, its source comments and validation's checks."""

import os
import subprocess
import sys

import pytest
from conftest import REPO_ROOT

from linfjax import config as config_lib
from linfjax import config_fields

ORIGINAL_BASE = config_lib.base_config


def test_every_field_is_listed_with_its_default_type_rule_and_comment():
  text = config_fields.render(config_fields.describe())
  for path, value in config_fields.leaves(config_lib.base_config()).items():
    assert f"--config.{path}={value!r}" in text
  by_path = {f.path: f for f in config_fields.describe()}
  assert by_path["poison.rate"].rule == "a number in (0.0, 1.0)"
  assert by_path["train.epochs"].rule == "an integer >= 1"
  assert by_path["model.name"].rule == "one of " + ", ".join(map(repr, config_lib.MODEL_NAMES))
  assert by_path["trigger.alpha"].rule == "a number in (0.0, 1.0]"  # Checked for blend only.
  assert by_path["prune.fine_tune"].rule == "True or False"
  assert "held-out clean set S" in by_path["data.clean_set_size"].comment
  # The block above poison.stamp is its comment.
  assert by_path["poison.stamp"].comment.startswith("Where the trigger is stamped")
  assert by_path["train.epochs"].variant_value == 10 and by_path["train.epochs"].value == 100


def test_inline_rules_name_existing_fields():
  assert set(config_fields.INLINE_RULES) <= set(config_fields.leaves(config_lib.base_config()))


def _extended_base():
  config = ORIGINAL_BASE()
  # A knob added later, with its comment above.
  config.reverse.new_knob = 7  # Steps of something.
  return config


def test_a_field_added_to_base_config_is_listed_with_no_other_change(monkeypatch):
  original_validate = config_lib.validate

  def validate(config):
    original_validate(config)
    config_lib._check_int(config, "reverse.new_knob", 2)

  monkeypatch.setattr(config_lib, "base_config", _extended_base)
  monkeypatch.setattr(config_lib, "validate", validate)
  field = {f.path: f for f in config_fields.describe()}["reverse.new_knob"]
  assert (field.value, field.type_name, field.rule) == (7, "int", "an integer >= 2")
  assert field.comment == "A knob added later, with its comment above. Steps of something."


def test_source_comments_cover_multiline_assignments():
  def sample():
    config = object()
    config.block.levels = (0.0,  # Trailing on the first line.
                           0.5)
    # Not attached: a blank line follows.

    config.block.plain = 1
    return config

  comments = config_fields.source_comments(sample)
  assert comments == {"block.levels": "Trailing on the first line.", "block.plain": ""}


@pytest.mark.parametrize("args", [[], ["configs/cifar_blend.py:quick"]])
def test_command_exits_0(args):
  out = subprocess.run([sys.executable, "-m", "linfjax.config", *args], cwd=REPO_ROOT,
                       capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": REPO_ROOT})
  assert out.returncode == 0, out.stderr
  assert "--config.reverse.steps=1000" in out.stdout
  if args:
    assert "configs/cifar_blend.py:quick: 'blend'" in out.stdout
