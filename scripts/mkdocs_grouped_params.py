"""Griffe extension for the API reference: grouped Google-style parameters, one row each.

Our docstrings document parameters that share a meaning on one line, e.g.

    Args:
        num_workers, collate_fn, worker_init_fn, multiprocessing_context, generator,
            prefetch_factor, persistent_workers, in_order: as for torch's DataLoader.

Griffe's Google parser takes one name per entry: it warns ("Failed to get 'name: description'
pair", "does not appear in the function signature") and drops the entry, so the rendered
parameter table silently lacks those names. This extension rewrites such an entry into one
entry per name, each with the shared description, before griffe parses the docstring; a name
that is not in the signature still fails the strict build. Loaded by mkdocs.yml
(``extensions:`` of the python handler).
"""
from __future__ import annotations

import re
from typing import Any

import griffe

_SECTION = re.compile(
    r"^(\s*)(Args|Arguments|Parameters|Params|Keyword Args|Keyword Arguments|"
    r"Other Parameters):\s*$")
_NAMES = re.compile(r"^\*{0,2}\w+(\s*,\s*\*{0,2}\w+)+$")


def expand_grouped_params(text: str) -> str:
    """``text`` with every grouped parameter entry (``a, b: desc``) split into ``a: desc``
    and ``b: desc``; everything else is unchanged."""
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        out.append(lines[i])
        header = _SECTION.match(lines[i])
        i += 1
        if not header:
            continue
        base = len(header.group(1))
        # the section: lines more indented than its header, or empty
        end = i
        while end < len(lines) and (not lines[end].strip()
                                    or _indent(lines[end]) > base):
            end += 1
        body = lines[i:end]
        first = next((ln for ln in body if ln.strip()), None)
        if first is None:
            continue
        item_indent = _indent(first)
        out.extend(_expand_section(body, item_indent))
        i = end
    return "\n".join(out)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _expand_section(body: list[str], item_indent: int) -> list[str]:
    # split the section into entries: a line at item_indent starts one
    entries: list[list[str]] = []
    for line in body:
        if line.strip() and _indent(line) == item_indent:
            entries.append([line])
        elif entries:
            entries[-1].append(line)
        else:
            entries.append([line])
    out: list[str] = []
    for entry in entries:
        out.extend(_expand_entry(entry, item_indent))
    return out


def _expand_entry(entry: list[str], item_indent: int) -> list[str]:
    # the head (names) runs up to the first ':' and may span lines ending in ','
    head_lines = 0
    head = ""
    for k, line in enumerate(entry):
        head += (" " if head else "") + line.strip()
        if ":" in line:
            head_lines = k + 1
            break
        if not line.rstrip().endswith(","):
            return entry
    else:
        return entry
    names_part, _, first_desc = head.partition(":")
    if not _NAMES.match(names_part.strip()):
        return entry
    names = [n.strip() for n in names_part.split(",")]
    rest = entry[head_lines:]
    pad = " " * item_indent
    out: list[str] = []
    for name in names:
        out.append(f"{pad}{name}: {first_desc.strip()}")
        out.extend(rest)
    return out


class GroupedParams(griffe.Extension):
    """Rewrites grouped parameter entries of every docstring before it is parsed."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None and "," in obj.docstring.value:
            obj.docstring.value = expand_grouped_params(obj.docstring.value)
