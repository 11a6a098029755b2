"""wirehub: a real-time WebSocket pub/sub gateway with a compiled hot path."""

from .__version__ import __version__

__all__ = ["__version__"]
