"""The one importer of the compiled hot path.

``implementation()`` returns a namespace with ``tlv``, ``frame``, ``bucket``,
``fanout``, ``deflate``, ``listener``, ``readahead`` and ``routing``: the
Cython modules from ``wirehub._ext`` when they are built, else (or with ``WIREHUB_NO_EXTENSIONS=1``) the pure-Python
references from ``wirehub._pure``. Both have the same API.
"""

from __future__ import annotations

import importlib
import os
from types import SimpleNamespace

MODULES = ("tlv", "frame", "bucket", "fanout", "deflate", "listener", "readahead", "routing")


def load(name: str) -> SimpleNamespace:
    """Load one implementation by name: ``"ext"`` or ``"pure"``."""
    package = {"ext": "wirehub._ext", "pure": "wirehub._pure"}[name]
    modules = {m: importlib.import_module(f"{package}.{m}") for m in MODULES}
    return SimpleNamespace(name=name, **modules)


def implementation() -> SimpleNamespace:
    """The implementation the gateway uses by default."""
    if os.environ.get("WIREHUB_NO_EXTENSIONS") == "1":
        return load("pure")
    try:
        return load("ext")
    except ImportError:
        return load("pure")
