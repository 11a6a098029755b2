"""The one importer of the compiled hot path.

``implementation()`` returns a namespace with ``tlv``, ``frame``, ``bucket``,
``fanout``, ``deflate``, ``listener``, ``readahead``, ``routing`` and
``client_frames`` (the Python client's fast path): the
Cython modules from ``wirehub._ext`` when they are built, else (or with
``WIREHUB_NO_EXTENSIONS=1``) the pure-Python references from
``wirehub._pure``, which have the same API; a fallback nobody asked for is
never silent (``implementation``).
"""

from __future__ import annotations

import importlib
import os
from types import SimpleNamespace

MODULES = ("tlv", "frame", "bucket", "fanout", "deflate", "listener", "readahead", "routing", "client_frames")


def load(name: str) -> SimpleNamespace:
    """Load one implementation by name: ``"ext"`` or ``"pure"``.

    Raises:
        ImportError: a module did not import; the message names it and says why.
    """
    package = {"ext": "wirehub._ext", "pure": "wirehub._pure"}[name]
    modules = {}
    for module in MODULES:
        try:
            modules[module] = importlib.import_module(f"{package}.{module}")
        except ImportError as exc:
            raise ImportError(f"{package}.{module} did not import: {exc}", name=f"{package}.{module}") from exc
    return SimpleNamespace(name=name, fallback=None, **modules)


def implementation() -> SimpleNamespace:
    """The implementation the gateway uses by default: the compiled one.

    The pure twins when ``WIREHUB_NO_EXTENSIONS=1`` asks for them; also when a
    compiled module does not import (a missing build, a picows upgrade that
    breaks a ``cimport``), and then ``fallback`` says which module and why:
    ``wirehub serve`` refuses to start on it unless told to, an embedded
    ``Gateway`` logs it as a warning, and ``/metrics`` shows the hot path in
    ``wirehub_build_info``. Without this, a broken build ran about ten times
    slower and said so only in an INFO record.
    """
    if os.environ.get("WIREHUB_NO_EXTENSIONS") == "1":
        return load("pure")
    try:
        return load("ext")
    except ImportError as exc:
        impl = load("pure")
        impl.fallback = str(exc)
        return impl
