"""Typed settings: one declaration per config field, with its default, rule and meaning.

A consumer (the training step, Neural Cleanse, an attack, a defense) declares the config
fields it reads as a frozen dataclass of `spec(default, rule, doc)` fields and reads its block
with `from_config`. The same declaration gives the block's defaults (`defaults`), checks a
block (`check_block`: each field against its rule, then the class's own `check` for rules
that relate fields), and documents every field for `python -m linfjax.config`. So a field
is written down once, by the module that uses it.

A rule is a predicate with its description; a value that breaks it is a `ConfigError` that
names the field (`config.train.learning_rate: 20.0 is outside (0.0, 10.0]`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence, TypeVar

import ml_collections

from linfjax import errors


class ConfigError(errors.UserError, ValueError):
  """A config field holds a value that linfjax cannot run with."""


def fail(field: str, message: str) -> None:
  """Raises the ConfigError of one field: `config.<field>: <message>`."""
  raise ConfigError(f"config.{field}: {message}")


@dataclasses.dataclass(frozen=True)
class Rule:
  """What a field's value must be: `problem(value)` says what is wrong, or None.

  `condition`, when set, is (field, values): the rule applies only while that field of the
  same block holds one of the values (an attack's fields, checked for that attack only).
  """
  text: str
  problem: Callable[[Any], str | None]
  condition: tuple[str, tuple] | None = None

  def when(self, field: str, *values: Any) -> "Rule":
    """This rule, applied only while `field` is one of `values`."""
    return dataclasses.replace(self, condition=(field, values))

  def applies(self, block) -> bool:
    return self.condition is None or block[self.condition[0]] in self.condition[1]

  @property
  def description(self) -> str:
    if self.condition is None:
      return self.text
    field, values = self.condition
    return f"{self.text} (when {field} is {' or '.join(map(repr, values))})"


def _is_number(value: Any) -> bool:
  return (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value))


def choice(*allowed: str) -> Rule:
  """One of `allowed`."""
  return Rule(f"one of {', '.join(repr(a) for a in allowed)}",
              lambda v: None if v in allowed else
              f"unknown value {v!r}; known: {', '.join(map(str, allowed))}")


def number(low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> Rule:
  """A finite number in the interval."""
  interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"

  def problem(value):
    if not _is_number(value):
      return f"must be a number, got {value!r}"
    if (value <= low if low_open else value < low) or (value >= high if high_open else value > high):
      return f"{value!r} is outside {interval}"
    return None

  return Rule(f"a number in {interval}", problem)


def integer(minimum: int) -> Rule:
  """An integer >= minimum."""
  return Rule(f"an integer >= {minimum}",
              lambda v: None if isinstance(v, int) and not isinstance(v, bool) and v >= minimum
              else f"must be an integer >= {minimum}, got {v!r}")


def boolean() -> Rule:
  return Rule("True or False",
              lambda v: None if isinstance(v, bool) else f"must be True or False, got {v!r}")


def names(known: Sequence[str], *, empty: bool = True) -> Rule:
  """Distinct names from `known` (a tuple); `empty`: none at all is allowed."""
  known = tuple(known)

  def problem(value):
    chosen = tuple(value) if isinstance(value, (tuple, list)) else None
    if chosen is None or len(set(chosen)) != len(chosen) or not set(chosen) <= set(known) \
        or (not chosen and not empty):
      return f"must be distinct names from {', '.join(known)}, got {value!r}"
    return None

  return Rule(f"distinct names from {', '.join(map(repr, known))}", problem)


def described(text: str) -> Rule:
  """A rule the owner's `check` enforces (the text documents it)."""
  return Rule(text, lambda v: None)


def spec(default: Any, rule: Rule | None = None, doc: str = "") -> Any:
  """A settings field: its default, its rule (None: any value of the default's type), its
  meaning for the field listing."""
  return dataclasses.field(default=default, metadata={"rule": rule, "doc": doc})


SettingsType = TypeVar("SettingsType", bound="Settings")


class Settings:
  """Base of the frozen dataclasses that declare a config block's fields (see module doc)."""

  @classmethod
  def fields(cls) -> tuple[dataclasses.Field, ...]:
    return dataclasses.fields(cls)

  @classmethod
  def from_config(cls: type[SettingsType], block) -> SettingsType:
    """The declared fields of a config block (other fields of the block are ignored)."""
    values = {}
    for field in cls.fields():
      value = block[field.name]
      values[field.name] = tuple(value) if isinstance(value, list) else value
    return cls(**values)

  @classmethod
  def defaults(cls) -> dict[str, Any]:
    """{field: default} in declaration order, for building a config block."""
    return {field.name: field.default for field in cls.fields()}

  @classmethod
  def check_block(cls, block, prefix: str) -> None:
    """Checks every declared field of `block` against its rule, then `check`."""
    for field in cls.fields():
      rule = field.metadata.get("rule")
      if rule is not None and rule.applies(block):
        problem = rule.problem(block[field.name])
        if problem:
          fail(f"{prefix}.{field.name}" if prefix else field.name, problem)
    cls.from_config(block).check(prefix)

  def check(self, prefix: str) -> None:
    """Rules that relate fields (override); raise with `fail(f"{prefix}.field", ...)`."""
    del prefix

  @classmethod
  def rules(cls) -> dict[str, Rule]:
    """{field: its rule} for the fields that have one."""
    return {field.name: field.metadata["rule"] for field in cls.fields()
            if field.metadata.get("rule") is not None}

  @classmethod
  def documentation(cls) -> dict[str, tuple[str, str]]:
    """{field: (rule description, meaning)} for the field listing."""
    return {field.name: ((field.metadata.get("rule") or described("")).description,
                         field.metadata.get("doc", "")) for field in cls.fields()}


def block(*owners: type[Settings], **extra: Any) -> ml_collections.ConfigDict:
  """A config block holding the defaults of every owner's fields (and `extra` fields)."""
  values: dict[str, Any] = {}
  for owner in owners:
    for name, default in owner.defaults().items():
      if name in values and values[name] != default:
        raise ValueError(f"field {name!r} is declared twice with different defaults")
      values[name] = default
  values.update(extra)
  return ml_collections.ConfigDict(values)
