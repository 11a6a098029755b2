"""Pick the client hot path: the Cython extension, else the pure-Python twin.

``WIREHUB_NO_EXTENSIONS=1`` forces the pure-Python version (aiohttp's
``AIOHTTP_NO_EXTENSIONS`` habit), which is how the tests cover both.
"""

from __future__ import annotations

import os

if os.environ.get("WIREHUB_NO_EXTENSIONS") == "1":
    from . import _pure as impl
else:
    try:
        from wirehub._ext import loadgen_client as impl  # type: ignore[no-redef]
    except ImportError:
        from . import _pure as impl

Recorder = impl.Recorder
Subscriber = impl.Subscriber
Sender = impl.Sender
SocketReader = impl.SocketReader
KIND_RAW: int = impl.KIND_RAW
KIND_WIREHUB_JSON: int = impl.KIND_WIREHUB_JSON
KIND_WIREHUB_TLV: int = impl.KIND_WIREHUB_TLV
IMPLEMENTATION: str = impl.IMPLEMENTATION

__all__ = ["IMPLEMENTATION", "KIND_RAW", "KIND_WIREHUB_JSON", "KIND_WIREHUB_TLV", "Recorder",
           "Sender", "SocketReader", "Subscriber"]
