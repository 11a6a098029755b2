"""The docs' option tables against the code: every option exists, with the documented default.

A table whose header starts ``| option |`` lists options in its first column
(``--flag``, or a ``[[channels]]`` key in backticks in docs/delivery.md);
a ``default`` column, or a number after the flag (``--jwt-leeway-s 5``),
is the default the docs promise.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from wirehub.config import ChannelOptions, Config

DOCS = Path(__file__).resolve().parent.parent / "docs"
PROSE_DEFAULTS = {"off": False, "on": True}


def option_rows() -> list[tuple[str, str, str | None]]:
    """(doc, option cell, default cell or None) of every option table row."""
    rows = []
    for doc in sorted(DOCS.glob("*.md")):
        header: list[str] | None = None
        for line in doc.read_text().splitlines():
            if not line.startswith("|"):
                header = None
                continue
            cells = [c.strip() for c in line.strip("|").split("|")]
            if cells[0] == "option":
                header = cells
            elif header is not None and not set(cells[0]) <= set("-: "):
                default = cells[header.index("default")] if "default" in header else None
                rows.append((doc.name, cells[0], default))
    return rows


UNITS = {"KiB": 1024, "MiB": 1024 ** 2}
NUMBER = re.compile(r"(-?\d[\d,_]*(?:\.\d+)?)(?: ?(KiB|MiB))?")


def parse_defaults(text: str) -> list[Any]:
    """The default(s) a cell states, in order: ``1,000/s, burst 2,000`` -> [1000, 2000]."""
    if text.startswith("unset"):
        return [None]
    if text in PROSE_DEFAULTS:
        return [PROSE_DEFAULTS[text]]
    if text == "any":
        return [[]]
    numbers = [float(n.replace(",", "").replace("_", "")) * UNITS.get(unit, 1) for n, unit in NUMBER.findall(text)]
    return numbers or [text.strip("`")]


ROWS = option_rows()


def test_the_docs_have_option_tables():
    assert {doc for doc, _, _ in ROWS} >= {"delivery.md", "docker.md", "security.md"}


@pytest.mark.parametrize("doc, cell, default", ROWS, ids=[f"{d}:{c[:40]}" for d, c, _ in ROWS])
def test_a_documented_option_exists_with_its_default(doc, cell, default):
    kind = ChannelOptions if doc == "delivery.md" else Config
    names = re.findall(r"`--([a-z0-9-]+)(?: (\d[\d.]*))?", cell) or \
        [(name, None) for name in re.findall(r"^`([a-z_]+)`", cell)]
    assert names, f"{doc}: no option in {cell!r}"
    stated = parse_defaults(default) if default is not None else None
    for i, (flag, inline_default) in enumerate(names):
        name = flag.replace("-", "_")
        assert name in kind.__struct_fields__, f"{doc}: {cell!r} is not a {kind.__name__} option"
        if stated is not None and i < len(stated):
            documented = stated[i]
        elif inline_default:
            documented = float(inline_default)
        else:
            continue  # the row names the option without a default (a key, a file)
        actual = getattr(kind(), name)
        if isinstance(actual, (int, float)) and not isinstance(actual, bool):
            actual = float(actual)
        assert actual == documented, f"{doc}: {name} is documented as {default or inline_default}"
