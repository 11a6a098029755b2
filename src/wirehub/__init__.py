"""wirehub: a real-time WebSocket pub/sub gateway with a compiled hot path."""

from .__version__ import __version__
from .config import Config
from .connection import Connection
from .gateway import Gateway
from .protocol.errors import CloseCode, ErrorCode, Rejected, WirehubError

__all__ = ["Config", "CloseCode", "Connection", "ErrorCode", "Gateway", "Rejected",
           "WirehubError", "__version__"]
