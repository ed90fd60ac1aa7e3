"""`python -m linfjax.config [CONFIG_FILE[:VARIANT]]`: every config field with its default,
type, allowed values and meaning, and the names each registry offers.

    python -m linfjax.config                               # base_config() and the quick variant
    python -m linfjax.config configs/cifar_blend.py:quick  # that config's values

Nothing here is a copy that could drift from the code: the fields, defaults, rules and
meanings are the declarations of the modules that read them (linfjax/settings.py), assembled
by `config.blocks()`; the registries are the tables the runs use.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys
import textwrap
from typing import Any, Sequence

import ml_collections

from linfjax import attacks, config as config_lib, data, defenses, models
from linfjax.detection import detectors, outliers


@dataclasses.dataclass(frozen=True)
class Field:
  """One leaf of a config."""
  path: str  # e.g. "train.learning_rate"
  value: Any
  variant_value: Any  # The compared variant's value (quick, or a given config file's).
  type_name: str
  rule: str
  comment: str


def _type_name(value: Any) -> str:
  if isinstance(value, (tuple, list)):
    kinds = sorted({type(v).__name__ for v in value})
    return f"tuple of {' or '.join(kinds)}" if kinds else "tuple"
  return type(value).__name__


def _node(config, path: str):
  for part in filter(None, path.split(".")):
    config = config[part]
  return config


def describe(config: ml_collections.ConfigDict | None = None,
             variant: ml_collections.ConfigDict | None = None) -> list[Field]:
  """The fields of `config` (default: base_config()), in declaration order, each compared
  with `variant`'s value (default: the quick variant of `config`)."""
  config = config_lib.base_config() if config is None else config
  if variant is None:
    variant = config_lib.make_quick(ml_collections.ConfigDict(config.to_dict()))
  fields = []
  for path, owners in config_lib.blocks().items():
    for owner in owners:
      for name, (rule, doc) in owner.documentation().items():
        value = _node(config, path)[name]
        fields.append(Field(f"{path}.{name}" if path else name, value,
                            _node(variant, path)[name], _type_name(value), rule, doc))
  return fields


def render(fields: Sequence[Field], *, variant_name: str = "quick") -> str:
  """Plain text: per block, a line per field, its rule and its meaning indented below."""
  out, block = [], None
  for field in fields:
    current = field.path.rsplit(".", 1)[0] if "." in field.path else ""
    if current != block:
      block = current
      out += ["", f"[{block}]" if block else "[top level]"]
    changed = "" if field.variant_value == field.value else \
        f"; {variant_name}: {field.variant_value!r}"
    out.append(f"--config.{field.path}={field.value!r}  ({field.type_name}{changed})")
    if field.rule:
      out.append(f"    allowed: {field.rule}")
    if field.comment:
      out.append(textwrap.fill(field.comment, width=96, initial_indent="    ",
                               subsequent_indent="    "))
  return "\n".join(out).lstrip("\n") + "\n"


def registries() -> str:
  """The names a config can use, with one line each, registry by registry."""
  sections = [
      ("Attacks (trigger.kind, grid axis trigger=NAME)",
       {name: attack.description for name, attack in attacks.ATTACKS.items()}),
      ("Defenses (prune.defenses, prune.real_defenses)",
       {name: defense.description + ("" if defense.needs_trigger else "; needs no trigger")
        for name, defense in defenses.DEFENSES.items()}),
      ("Training-time defenses (train stage, a model of their own beside the two)",
       {"abl": "ABL: isolation by the loss under flooding, fine-tuning on the rest, gradient "
               "ascent on the isolated examples (abl.enabled=True); needs no trigger"}),
      ("Detection statistics (reverse.statistic)",
       {name: f"{statistic.description}; flags above {statistic.default_threshold}"
        for name, statistic in outliers.STATISTICS.items()}),
      ("Data-side detectors (linfjax.detection.detectors, called from Python)",
       {name: detector.description for name, detector in detectors.DETECTORS.items()}),
      ("Models (model.name)", {name: (cls.__doc__ or "").strip().splitlines()[0]
                               for name, cls in models.MODELS.items()}),
      ("Data sources (data.source)", {name: source.needs
                                      for name, source in data.SOURCES.items()}),
      ("Protocols (protocol; a variant :NAME or a grid axis protocol=NAME applies one)",
       {name: ", ".join(f"{field}={value!r}" for field, value in fields.items())
        or "the defaults above (ours)" for name, fields in config_lib.PROTOCOLS.items()}),
  ]
  out = []
  for title, entries in sections:
    out += ["", f"{title}: {len(entries)}"]
    out += [textwrap.fill(f"{name}: {text}", width=96, initial_indent="  ",
                          subsequent_indent="      ") for name, text in entries.items()]
  return "\n".join(out) + "\n"


def _load_config_file(argument: str) -> ml_collections.ConfigDict:
  path, _, variant = argument.partition(":")
  if not os.path.isfile(path):
    raise config_lib.ConfigError(f"{path}: no such config file")
  spec = importlib.util.spec_from_file_location("listed_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant) if variant else module.get_config()


def main(argv: Sequence[str]) -> int:
  if len(argv) > 2 or any(arg in ("-h", "--help") for arg in argv[1:]):
    print(__doc__)
    return 0 if len(argv) <= 2 else 2
  if len(argv) == 2:
    try:
      listed = _load_config_file(argv[1])
    except config_lib.ConfigError as e:
      print(f"error: {e}", file=sys.stderr)
      return 2
    text = render(describe(config_lib.base_config(), listed), variant_name=argv[1])
    print(f"Fields of {argv[1]} against base_config() (its value after ';'):\n{text}")
    return 0
  print("Every field of base_config(), set with --config.FIELD=VALUE; 'quick:' gives the "
        ":quick variant's value where it differs.\n" + render(describe()) + registries())
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
