"""Reading results: one flattener of results.json trees for every table and aggregate."""

from __future__ import annotations

from typing import Any


def flatten(tree: Any, prefix: str = "", *, lists: bool = True) -> dict[str, Any]:
  """Numbers and nulls of nested dicts under dotted paths; list items by index (`lists`) or
  left out. Strings and booleans are left out.

  `{"reverse": {"flagged": None, "anomaly_index": [0.5, 3.1], "note": "x"}}` gives
  `{"reverse.flagged": None, "reverse.anomaly_index.0": 0.5, "reverse.anomaly_index.1": 3.1}`.
  """
  if tree is None or (isinstance(tree, (int, float)) and not isinstance(tree, bool)):
    return {prefix[:-1]: tree}
  items = (tree.items() if isinstance(tree, dict) else
           enumerate(tree) if isinstance(tree, list) and lists else ())
  leaves = {}
  for key, value in items:
    leaves.update(flatten(value, f"{prefix}{key}.", lists=lists))
  return leaves
