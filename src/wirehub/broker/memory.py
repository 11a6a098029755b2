"""The embedded single-process broker (the default).

Publication is synchronous: ``publish`` assigns the next offset and calls the
hub before returning, so a publish costs no task, no await and no copy.
"""

from __future__ import annotations

import secrets

from ..protocol.messages import Publication, StreamPosition
from .base import BrokerEventHandler


class _Stream:
    __slots__ = ("offset", "epoch", "subscribed")

    def __init__(self) -> None:
        self.offset = 0
        self.epoch = secrets.token_hex(4)
        self.subscribed = False


class MemoryBroker:
    """Offsets and delivery within one process.

    Args:
        max_idle_channels: channels without subscribers whose offsets are
            remembered; past this the oldest are forgotten (a publisher could
            otherwise grow memory by publishing to ever new names). A
            forgotten channel starts again at offset 1 under a new epoch.
            Channels with subscribers are never forgotten.
    """

    def __init__(self, max_idle_channels: int = 100_000) -> None:
        self._streams: dict[str, _Stream] = {}
        self._idle: dict[str, None] = {}  # insertion-ordered: oldest first
        self._max_idle = max_idle_channels
        self._handler: BrokerEventHandler | None = None
        self._patterns: dict[str, None] = {}

    def bind(self, handler: BrokerEventHandler) -> None:
        self._handler = handler

    def _stream(self, channel: str) -> _Stream:
        stream = self._streams.get(channel)
        if stream is None:
            stream = self._streams[channel] = _Stream()
            self._mark_idle(channel)
        return stream

    def _mark_idle(self, channel: str) -> None:
        self._idle[channel] = None
        while len(self._idle) > self._max_idle:
            oldest = next(iter(self._idle))
            del self._idle[oldest]
            del self._streams[oldest]

    def subscribe(self, channel: str) -> None:
        self._stream(channel).subscribed = True
        self._idle.pop(channel, None)

    def unsubscribe(self, channel: str) -> None:
        stream = self._streams.get(channel)
        if stream is not None and stream.subscribed:
            stream.subscribed = False
            self._mark_idle(channel)

    def subscribe_pattern(self, pattern: str) -> None:
        self._patterns[pattern] = None

    def unsubscribe_pattern(self, pattern: str) -> None:
        self._patterns.pop(pattern, None)

    def publish(self, channel: str, data: bytes, *, binary: bool = False,
                origin: str | None = None) -> StreamPosition:
        stream = self._stream(channel)
        stream.offset += 1
        # One process: with any pattern subscribed, the hub sees everything and matches.
        if (stream.subscribed or self._patterns) and self._handler is not None:
            self._handler.handle_publication(
                Publication(channel, data, stream.offset, stream.epoch, binary), origin)
        return StreamPosition(stream.offset, stream.epoch)

    async def close(self) -> None:
        self._handler = None
