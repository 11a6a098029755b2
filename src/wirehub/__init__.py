"""wirehub: a real-time WebSocket pub/sub gateway with a compiled hot path."""

from .__version__ import __version__
from .broker.base import HistoryPage
from .client import Client, connect
from .config import ChannelOptions, Config
from .connection import Connection
from .gateway import Gateway
from .protocol.errors import CloseCode, ErrorCode, Rejected, WirehubError
from .protocol.messages import Publication, StreamPosition

__all__ = ["ChannelOptions", "Client", "Config", "CloseCode", "Connection", "ErrorCode", "Gateway", "HistoryPage",
           "Publication", "Rejected", "StreamPosition", "WirehubError", "__version__", "connect"]
