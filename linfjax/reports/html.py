"""The pieces every report shares: the HTML page's style, escaping, tables, notes, images, and
Markdown tables for the command-line summaries."""

from __future__ import annotations

import base64
import html
import os
from typing import Any, Iterable, Sequence

STYLE = """
body { font-family: sans-serif; margin: 2em; max-width: 80em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #bbb; padding: 0.25em 0.6em; text-align: right; }
th { background: #eee; } td.text, th.text { text-align: left; }
figure { margin: 1em 0; } figcaption { color: #555; font-size: small; }
img { max-width: 100%; } .note { color: #a33; } pre { background: #f6f6f6; padding: 1em; }
"""


def escape(value: Any) -> str:
  return html.escape(str(value))


def number(value: Any, digits: int = 2) -> str:
  """A cell's text: floats to `digits` places, integers as they are, None as '-'."""
  if isinstance(value, bool) or value is None:
    return escape("-" if value is None else value)
  if isinstance(value, int):
    return str(value)
  if isinstance(value, float):
    return f"{value:.{digits}f}"
  return escape(value)


def table(header: Sequence[str], rows: Iterable[Sequence[Any]], *, text_columns: int = 1,
          digits: int = 2, escaped: bool = False) -> str:
  """An HTML table; the first `text_columns` columns are left-aligned labels. Cells are
  escaped (and numbers formatted) unless `escaped` says they are HTML already."""
  def cell(tag, i, value):
    css = ' class="text"' if i < text_columns else ""
    return f"<{tag}{css}>{value}</{tag}>"

  def text(i, value):
    if escaped:
      return value
    return escape(value) if i < text_columns else number(value, digits)

  head = "".join(cell("th", i, escape(h)) for i, h in enumerate(header))
  body = "".join("<tr>" + "".join(cell("td", i, text(i, v)) for i, v in enumerate(row))
                 + "</tr>" for row in rows)
  return f"<table><tr>{head}</tr>{body}</table>"


def markdown(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
  """A Markdown table of cells already formatted as text."""
  lines = ["| " + " | ".join(map(str, header)) + " |", "|" + " --- |" * len(header)]
  lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
  return "\n".join(lines)


def note(text: str) -> str:
  return f'<p class="note">{escape(text)}</p>'


def image(path: str, caption: str) -> str:
  """A PNG embedded in the page (a report is one self-contained file)."""
  with open(path, "rb") as f:
    data = base64.b64encode(f.read()).decode("ascii")
  return (f'<figure><img src="data:image/png;base64,{data}" alt="{escape(caption)}">'
          f"<figcaption>{escape(caption)}</figcaption></figure>")


def pngs(directory: str) -> list[str]:
  """Every PNG under `directory`, sorted."""
  found = []
  for root, _, names in os.walk(directory):
    found += [os.path.join(root, name) for name in names if name.lower().endswith(".png")]
  return sorted(found)


def page(title: str, body: str) -> str:
  """A whole HTML document with the shared style."""
  return (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{escape(title)}</title>"
          f"<style>{STYLE}</style></head><body>{body}</body></html>\n")
