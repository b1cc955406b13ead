"""Pointing a task file's error at its line: where a dotted setting is written in TOML or JSON text."""

from __future__ import annotations

import re


def key_line(text: str, key: str) -> int | None:
    """The line where a setting is given, best effort: `key` is a dotted path ("templates.causal.suffix"),
    found as TOML `name =` lines or `[table]` headers, or JSON `"name":`; the deepest part found wins."""
    parts = key.split(".")
    start, end, found = 0, len(text), None
    for depth, part in enumerate(parts):
        name, table = re.escape(part), re.escape(".".join(parts[: depth + 1]))
        pattern = re.compile(rf'^[ \t]*(?:\[{table}\][ \t]*$|{name}[ \t]*=)|"{name}"\s*:', re.M)
        match = pattern.search(text, start, end)
        if match is None:
            break
        found, start = match, match.end()
        if match.group(0).lstrip().startswith("["):  # a TOML table runs to the next header outside it
            following = re.compile(rf"^[ \t]*\[(?!{table}[.\]])", re.M).search(text, start)
            end = following.start() if following else len(text)
        elif match.group(0).endswith(":") and text[start:].lstrip().startswith("{"):  # a JSON object
            start = text.index("{", start)
            end = closing_brace(text, start)
        else:  # a value, not a table: nothing deeper to find
            break
    return text.count("\n", 0, found.start()) + 1 if found else None


def closing_brace(text: str, opening: int) -> int:
    depth, index, in_string = 0, opening, False
    while index < len(text):
        char = text[index]
        if in_string:
            if char == "\\":
                index += 1
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return index
        index += 1
    return len(text)
