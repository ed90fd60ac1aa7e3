"""A grid of runs: axes over config fields, expanded into named single-run configs.

A grid is a base config plus `config.sweep.axes`, a string of whitespace-separated axes
`FIELD=VALUE,VALUE,...`, for example

    "trigger=patch,blend poison.rate=0.05,0.1 seed=0,1,2"

FIELD is a leaf of the config (`seed`, `poison.rate`, `trigger.alpha`, `model.width`),
and each value is parsed as that field's type; or it names presets, where a value sets
several fields at once: `trigger` (`config.TRIGGER_PRESETS`) and `protocol`
(`config.PROTOCOLS`).
The command line overrides the axes like any field:
`--config.sweep.axes="seed=0,1 poison.rate=0.1"`.

Runs are the product of the axes in the order given (the last axis varies fastest).
A run is named by its values, `trigger=patch,poison.rate=0.05,seed=0` (the values as
typed, so names are stable and readable), and its config is the base config with those
values set and no axes: a complete single-run config.
"""

from __future__ import annotations

import dataclasses
import itertools
import re

import ml_collections

from linfjax import config as config_lib

# Fields whose axis values are preset names: a value sets several fields at once.
PRESETS = {"trigger": config_lib.TRIGGER_PRESETS, "protocol": config_lib.PROTOCOLS}
_AXIS = re.compile(r"^([A-Za-z_][\w.]*)=(.+)$")


@dataclasses.dataclass(frozen=True)
class Axis:
  """One axis: a config field (or preset block) and its values, as typed and as parsed."""
  field: str
  tokens: tuple[str, ...]
  values: tuple


@dataclasses.dataclass(frozen=True)
class Run:
  """One member of a grid: its name, its axis values and its single-run config."""
  index: int
  name: str
  values: dict
  config: ml_collections.ConfigDict


def is_grid(config: ml_collections.ConfigDict) -> bool:
  return bool(config.sweep.axes.strip())


def _field_node(config: ml_collections.ConfigDict, field: str):
  """The value at `field`, or a ConfigError naming what is known at the failing part."""
  node = config
  parts = field.split(".")
  for depth, part in enumerate(parts):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      where = ".".join(parts[:depth]) or "the config"
      known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      raise config_lib.ConfigError(
          f"config.sweep.axes: unknown field {field!r} (no {part!r} in {where}; known: "
          f"{', '.join(known)})")
    node = node[part]
  return node


def _parse_value(field: str, token: str, current):
  """Parses `token` as the type of the field's current value."""
  if isinstance(current, bool):
    if token.lower() not in ("true", "false"):
      raise config_lib.ConfigError(f"config.sweep.axes: {field}={token!r} is not true or false")
    return token.lower() == "true"
  if isinstance(current, (int, float)):
    try:
      number = float(token)
    except ValueError:
      raise config_lib.ConfigError(
          f"config.sweep.axes: {field}={token!r} is not a number") from None
    if isinstance(current, int) and number.is_integer() and "." not in token:
      return int(number)
    if isinstance(current, int):
      raise config_lib.ConfigError(f"config.sweep.axes: {field}={token!r} is not an integer")
    return number
  if isinstance(current, str):
    return token
  raise config_lib.ConfigError(
      f"config.sweep.axes: {field} holds a {type(current).__name__}; axes take numbers, "
      "strings, booleans, or a preset block (trigger); vary a tuple with separate configs")


def parse_axes(config: ml_collections.ConfigDict) -> list[Axis]:
  """The axes of `config.sweep.axes`, each value checked against the config's fields."""
  axes, seen = [], set()
  for item in config.sweep.axes.split():
    match = _AXIS.match(item)
    if not match:
      raise config_lib.ConfigError(
          f"config.sweep.axes: {item!r} is not FIELD=VALUE,VALUE,... (e.g. seed=0,1,2)")
    field, tokens = match.group(1), tuple(match.group(2).split(","))
    if field in seen:
      raise config_lib.ConfigError(f"config.sweep.axes: {field} appears twice")
    if field == "sweep" or field.startswith("sweep."):
      raise config_lib.ConfigError("config.sweep.axes: the sweep block cannot be an axis")
    if "" in tokens or len(set(tokens)) != len(tokens):
      raise config_lib.ConfigError(
          f"config.sweep.axes: {field} needs distinct, non-empty values, got {item!r}")
    seen.add(field)
    if field in PRESETS:
      unknown = [token for token in tokens if token not in PRESETS[field]]
      if unknown:
        raise config_lib.ConfigError(
            f"config.sweep.axes: unknown {field} preset {unknown[0]!r}; known: "
            f"{', '.join(PRESETS[field])}")
      values = tokens
    else:
      current = _field_node(config, field)
      if isinstance(current, ml_collections.ConfigDict):
        raise config_lib.ConfigError(
            f"config.sweep.axes: {field} is a block; name one of its fields "
            f"({', '.join(sorted(current.keys()))})")
      values = tuple(_parse_value(field, token, current) for token in tokens)
    axes.append(Axis(field, tokens, values))
  return axes


def _set(config: ml_collections.ConfigDict, field: str, value) -> None:
  if field == "protocol":
    config_lib.apply_protocol(config, value)
    return
  if field in PRESETS:
    config[field].update(PRESETS[field][value])
    return
  *blocks, leaf = field.split(".")
  node = config
  for block in blocks:
    node = node[block]
  node[leaf] = value


def expand(config: ml_collections.ConfigDict) -> list[Run]:
  """Every run of the grid, each config validated (errors name the run)."""
  axes = parse_axes(config)
  runs = []
  for index, choice in enumerate(itertools.product(*(range(len(a.values)) for a in axes))):
    run_config = ml_collections.ConfigDict(config.to_dict())
    run_config.sweep.axes = ""
    for axis, position in zip(axes, choice):
      _set(run_config, axis.field, axis.values[position])
    name = ",".join(f"{axis.field}={axis.tokens[position]}" for axis, position in zip(axes, choice))
    try:
      config_lib.validate(run_config)
    except config_lib.ConfigError as e:
      raise config_lib.ConfigError(f"grid run {name}: {e}") from None
    values = {axis.field: axis.values[position] for axis, position in zip(axes, choice)}
    runs.append(Run(index, name, values, run_config))
  return runs


def describe(axes: list[Axis], runs: list[Run]) -> dict:
  """grid.json's content: the axes and the runs with their values."""
  return {"axes": [{"field": axis.field, "values": list(axis.values)} for axis in axes],
          "runs": [{"name": run.name, "values": run.values} for run in runs]}


def parse_shard(text: str) -> tuple[int, int]:
  """'INDEX/COUNT' -> (index, count), for `--shard`; a process takes runs index::count."""
  match = re.fullmatch(r"(\d+)/(\d+)", text.strip())
  if not match or int(match.group(2)) < 1 or int(match.group(1)) >= int(match.group(2)):
    raise config_lib.ConfigError(
        f"--shard={text!r}: expected INDEX/COUNT with 0 <= INDEX < COUNT, e.g. 0/4")
  return int(match.group(1)), int(match.group(2))
