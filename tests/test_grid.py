"""Grid specs: axes parsed by the config's types, expanded into named, validated runs."""

import pytest

from linfjax import config as config_lib
from linfjax.runs import grid


def quick_grid(axes: str):
  config = config_lib.make_quick(config_lib.base_config())
  config.sweep.axes = axes
  return config


def test_expansion_names_values_and_configs():
  runs = grid.expand(quick_grid("trigger=patch,blend poison.rate=0.05,0.1 seed=0,1,2"))
  assert len(runs) == 12
  assert [r.index for r in runs] == list(range(12))
  assert runs[0].name == "trigger=patch,poison.rate=0.05,seed=0"
  assert runs[1].name == "trigger=patch,poison.rate=0.05,seed=1"
  assert runs[-1].name == "trigger=blend,poison.rate=0.1,seed=2"
  assert len({r.name for r in runs}) == 12
  last = runs[-1]
  assert last.values == {"trigger": "blend", "poison.rate": 0.1, "seed": 2}
  assert last.config.seed == 2 and last.config.poison.rate == 0.1
  assert last.config.trigger.kind == "blend" and last.config.trigger.pattern == "noise"
  assert runs[0].config.trigger.kind == "patch" and runs[0].config.trigger.pattern == "solid"
  assert all(r.config.sweep.axes == "" for r in runs)
  assert runs[0].config.train.epochs == 10  # The base config's other fields are kept.


def test_values_take_the_fields_types():
  runs = grid.expand(quick_grid("model.width=0.5,1 poison.target=3 train.flip=false"))
  assert [r.config.model.width for r in runs] == [0.5, 1.0]
  assert isinstance(runs[1].config.model.width, float)
  assert runs[0].config.poison.target == 3 and isinstance(runs[0].config.poison.target, int)
  assert runs[0].config.train.flip is False
  assert runs[0].name == "model.width=0.5,poison.target=3,train.flip=false"


@pytest.mark.parametrize("axes, message", [
    ("poison.rat=0.1", "unknown field 'poison.rat'"),
    ("poison.target=1.5", "is not an integer"),
    ("poison.rate=abc", "is not a number"),
    ("trigger=patch,star", "unknown trigger preset 'star'; known: patch, blend"),
    ("trigger.color=1", "holds a tuple"),
    ("poison=1", "is a block"),
    ("seed=0,0", "distinct"),
    ("seed=0 seed=1", "appears twice"),
    ("seed", "is not FIELD=VALUE"),
    ("sweep.models_per_device=2", "sweep block cannot be an axis"),
    ("poison.rate=0.1,1.5", "grid run poison.rate=1.5: config.poison.rate: 1.5 is outside"),
])
def test_bad_axes_name_the_problem(axes, message):
  with pytest.raises(config_lib.ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
    grid.expand(quick_grid(axes))


def test_no_axes_is_not_a_grid():
  assert not grid.is_grid(config_lib.base_config())
  assert grid.is_grid(quick_grid("seed=0,1"))


@pytest.mark.parametrize("text, expected", [("0/4", (0, 4)), ("3/4", (3, 4)), (" 1/2 ", (1, 2))])
def test_parse_shard(text, expected):
  assert grid.parse_shard(text) == expected


@pytest.mark.parametrize("text", ["4/4", "1", "a/b", "0/0", "-1/2"])
def test_parse_shard_rejects(text):
  with pytest.raises(config_lib.ConfigError, match="INDEX/COUNT"):
    grid.parse_shard(text)
