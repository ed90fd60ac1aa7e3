"""The config listing (`python -m linfjax.config`) is read off the settings declarations."""

import dataclasses
import importlib
import os
import subprocess
import sys

import pytest
from conftest import REPO_ROOT

from linfjax import attacks, defenses, models, settings
from linfjax import config as config_lib

listing = importlib.import_module("linfjax.config.__main__")


def test_every_field_is_listed_with_its_default_type_rule_and_meaning():
  fields = listing.describe()
  text = listing.render(fields)
  by_path = {f.path: f for f in fields}
  config = config_lib.base_config()
  for path, field in by_path.items():
    node = config
    for part in path.split("."):
      node = node[part]
    assert field.value == node and f"--config.{path}={node!r}" in text
  assert by_path["poison.rate"].rule == "a number in (0.0, 1.0)"
  assert by_path["train.epochs"].rule == "an integer >= 1"
  assert by_path["model.name"].rule == "one of " + ", ".join(map(repr, models.MODELS))
  assert by_path["trigger.alpha"].rule == "a number in (0.0, 1.0] (when kind is 'blend')"
  assert by_path["train.flip"].rule == "True or False"
  assert by_path["prune.defenses"].rule.startswith("distinct names from 'linf', 'linf_ft'")
  assert "held-out clean set S" in by_path["data.clean_set_size"].comment
  assert by_path["poison.stamp"].comment.startswith("Where the trigger is stamped")
  assert by_path["train.epochs"].variant_value == 10 and by_path["train.epochs"].value == 100
  assert by_path["prune.anp.iterations"].variant_value == 200


def test_a_field_declared_by_a_new_owner_is_listed_and_checked(monkeypatch):
  @dataclasses.dataclass(frozen=True)
  class Knob(settings.Settings):
    new_knob: int = settings.spec(7, settings.integer(2), "Steps of something.")

  blocks = config_lib.blocks()
  monkeypatch.setattr(config_lib, "blocks",
                      lambda: {**blocks, "reverse": (*blocks["reverse"], Knob)})
  field = {f.path: f for f in listing.describe()}["reverse.new_knob"]
  assert (field.value, field.type_name, field.rule, field.comment) == (
      7, "int", "an integer >= 2", "Steps of something.")
  config = config_lib.base_config()
  config.reverse.new_knob = 1
  with pytest.raises(config_lib.ConfigError,
                     match=r"config\.reverse\.new_knob: must be an integer >= 2, got 1"):
    config_lib.validate(config)


def test_the_registries_are_listed_with_their_counts():
  text = listing.registries()
  assert f"Attacks (trigger.kind, grid axis trigger=NAME): {len(attacks.ATTACKS)}" in text
  assert f"Defenses (prune.defenses, prune.real_defenses): {len(defenses.DEFENSES)}" in text
  assert "Training-time defenses (train stage" in text and "  abl: ABL" in text
  for name in (*attacks.ATTACKS, *defenses.DEFENSES):
    assert f"  {name}: " in text


@pytest.mark.parametrize("args", [[], ["configs/cifar_blend.py:quick"]])
def test_command_exits_0(args):
  out = subprocess.run([sys.executable, "-m", "linfjax.config", *args], cwd=REPO_ROOT,
                       capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": REPO_ROOT})
  assert out.returncode == 0, out.stderr
  assert "--config.reverse.steps=1000" in out.stdout
  if args:
    assert "configs/cifar_blend.py:quick: 'blend'" in out.stdout
  else:
    assert "Defenses (prune.defenses" in out.stdout
