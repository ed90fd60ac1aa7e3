"""Every config field with its default, type, allowed values and meaning, read off the code.

    python -m linfjax.config                       # base_config() and the quick variant
    python -m linfjax.config configs/cifar_blend.py:quick   # that config's values

Nothing here is a copy that could drift from the code:
  - the fields, defaults and types are those of the live `config.base_config()`;
  - the allowed values are the rules `config.validate` checks, recorded by its
    `_check_choice` / `_check_range` / `_check_int` calls while it validates the base
    config under every trigger preset (`config.checked_rules`); the few fields that
    validation checks inline are described in INLINE_RULES, which a test keeps in step
    with base_config's fields;
  - the meanings are the comments written beside (or in the comment block right above) each
    field's assignment in `base_config`'s source; a block's comment describes its block.
So a field added to base_config is listed with no extra work, with its rule when validated
through the check helpers and with its comment when it has one.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import inspect
import io
import os
import sys
import textwrap
import tokenize
from typing import Any, Sequence

import ml_collections

from linfjax import config as config_lib

# Fields that `config.validate` checks without the check helpers, and the rule it applies.
INLINE_RULES = {
    "stages": f"one or more of {', '.join(map(repr, config_lib.STAGE_NAMES))}, run in order",
    "data.path": "a directory holding cifar-10-batches-py (or that folder itself); needed "
                 "when data.source='cifar10_dir'",
    "data.name": "a prepared TFDS dataset name; needed when data.source='tfds'",
    "trigger.offset": "two integers >= 0, (row, col)",
    "trigger.color": "values in [0, 1], one per image channel (or one for all)",
    "trigger.pattern_file": "a .npy array or image file; needed when trigger.pattern='file'",
    "model.probe_layers": "layer names of the model; empty: the last conv map before pooling",
    "prune.layer": "a layer name of the model; empty: the default probe",
    "prune.norms": f"distinct names from {', '.join(map(repr, config_lib.PRUNE_NORMS))}",
    "prune.levels": "fractions in [0, 1) (level_unit='fraction') or counts >= 0 ('count')",
    "sweep.axes": "'FIELD=V1,V2,... FIELD=...' (linfjax/runs/grid.py); empty: a single run",
}


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


def leaves(config: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
  """{'block.field': value} for every leaf, in the config's order."""
  out = {}
  for key in config.keys():
    value = config[key]
    if isinstance(value, ml_collections.ConfigDict):
      out.update(leaves(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def _attribute_path(node: ast.AST) -> str | None:
  """`config.a.b` -> 'a.b' (the root name dropped); None for other targets."""
  parts = []
  while isinstance(node, ast.Attribute):
    parts.append(node.attr)
    node = node.value
  return ".".join(reversed(parts)) if isinstance(node, ast.Name) and parts else None


def source_comments(function) -> dict[str, str]:
  """Field path -> its comment, from the assignments in `function`'s source, in source order.

  A field's comment is the comment block right above its assignment (no blank line
  between) followed by the comment on its own line(s).
  """
  source = textwrap.dedent(inspect.getsource(function))
  lines = source.splitlines()
  trailing, full_line = {}, {}
  for token in tokenize.generate_tokens(io.StringIO(source).readline):
    if token.type == tokenize.COMMENT:
      row, col = token.start
      text = token.string.lstrip("#").strip()
      if lines[row - 1][:col].strip():
        trailing[row] = text
      else:
        full_line[row] = text
  comments = {}
  assignments = [node for node in ast.walk(ast.parse(source))
                 if isinstance(node, ast.Assign) and len(node.targets) == 1]
  for node in sorted(assignments, key=lambda node: node.lineno):
    path = _attribute_path(node.targets[0])
    if path is None:
      continue
    above, row = [], node.lineno - 1
    while row in full_line:
      above.insert(0, full_line[row])
      row -= 1
    beside = [trailing[r] for r in range(node.lineno, node.end_lineno + 1) if r in trailing]
    comments[path] = " ".join(above + beside)
  return comments


def describe(config: ml_collections.ConfigDict | None = None,
             variant: ml_collections.ConfigDict | None = None) -> list[Field]:
  """The fields of `config` (default: base_config()), each compared with `variant`'s
  value (default: the quick variant of `config`)."""
  config = config_lib.base_config() if config is None else config
  if variant is None:
    variant = config_lib.make_quick(ml_collections.ConfigDict(config.to_dict()))
  probes = [config_lib.base_config()]
  for preset in config_lib.TRIGGER_PRESETS.values():
    probe = config_lib.base_config()
    probe.trigger.update(preset)
    probes.append(probe)
  rules = {**INLINE_RULES, **config_lib.checked_rules(probes)}
  comments = source_comments(config_lib.base_config)
  variant_values = leaves(variant)
  order = {path: i for i, path in enumerate(comments)}
  fields = []
  for path, value in sorted(leaves(config).items(), key=lambda item: order.get(item[0], len(order))):
    rule = rules.get(path, "True or False" if isinstance(value, bool) else "")
    fields.append(Field(path, value, variant_values.get(path, value), _type_name(value), rule,
                        comments.get(path, "")))
  return fields


def render(fields: Sequence[Field], *, variant_name: str = "quick") -> str:
  """Plain text: per block, a line per field, its rule and its meaning indented below."""
  comments = source_comments(config_lib.base_config)
  out, block = [], None
  for field in fields:
    current = field.path.rsplit(".", 1)[0] if "." in field.path else ""
    if current != block:
      block = current
      header = f"[{block}]" if block else "[top level]"
      note = comments.get(block, "")
      out.append("")
      out.append(header + (f"  {note}" if note else ""))
    changed = "" if field.variant_value == field.value else \
        f"; {variant_name}: {field.variant_value!r}"
    out.append(f"--config.{field.path}={field.value!r}  ({field.type_name}{changed})")
    if field.rule:
      out.append(f"    allowed: {field.rule}")
    if field.comment:
      out.append(textwrap.fill(field.comment, width=96, initial_indent="    ",
                               subsequent_indent="    "))
  return "\n".join(out).lstrip("\n") + "\n"


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
  print("Every field of base_config() (linfjax/config.py), set with --config.FIELD=VALUE; "
        "'quick:' gives the :quick variant's value where it differs.\n" + render(describe()))
  return 0
