"""The embedded single-process broker (the default).

Publication is synchronous: ``publish`` assigns the next offset, keeps the
publication if the channel has history, and calls the hub before returning,
so a publish costs no task, no await and no copy.

History lives in one list per channel (a window over it: trimming moves its
start, and the list is compacted once half of it is trimmed, so a page at
any offset is one slice), trimmed on each publish by the channel's
``HistoryOptions`` (count, age, bytes), and all channels together
stay under ``max_history_bytes``: past it, the least recently published
channel loses its history. A kept publication is counted as twice its data
plus ``ENTRY_OVERHEAD_BYTES``: the data, the framed ``message`` the hub
caches on it for recoveries, and the objects that hold them.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable

from ..protocol.messages import Publication, PublicationData, StreamPosition
from .base import BrokerEventHandler, HistoryOptions, HistoryPage
from .idempotency import RecentKeys

# Python objects behind one kept publication besides its data and frame: the
# Publication struct, two bytes headers, a list slot (measured with
# tracemalloc: ~190 bytes on CPython 3.11).
ENTRY_OVERHEAD_BYTES = 200


def entry_bytes(pub: Publication) -> int:
    """What one kept publication counts against the history limits."""
    return 2 * len(pub.data) + ENTRY_OVERHEAD_BYTES


class _Kept:
    """A channel's kept publications, oldest first, with contiguous offsets.

    ``entries[start:]`` are kept; dropping the oldest moves ``start`` (O(1)),
    and the dropped prefix is cut once it is half of the list, so any page
    is found by arithmetic and copied by one slice.
    """

    __slots__ = ("entries", "start")

    def __init__(self) -> None:
        self.entries: list[Publication] = []
        self.start = 0

    def __len__(self) -> int:
        return len(self.entries) - self.start

    def first(self) -> Publication:
        return self.entries[self.start]

    def pop_oldest(self) -> Publication:
        pub = self.entries[self.start]
        self.start += 1
        if self.start > 64 and self.start * 2 > len(self.entries):
            del self.entries[:self.start]
            self.start = 0
        return pub

    def page(self, begin: int, end: int) -> list[Publication]:
        """Kept publications ``begin`` to ``end`` (indexes from the oldest kept)."""
        return self.entries[self.start + begin:self.start + end]


class _Stream:
    __slots__ = ("name", "offset", "epoch", "subscribed", "history", "history_bytes", "options")

    def __init__(self, name: str) -> None:
        self.name = name  # one string for every kept publication of the channel
        self.offset = 0
        self.epoch = secrets.token_hex(4)
        self.subscribed = False
        self.history: _Kept | None = None
        self.history_bytes = 0
        self.options: HistoryOptions | None = None


class MemoryBroker:
    """Offsets, history and delivery within one process.

    Args:
        max_idle_channels: channels without subscribers or history whose
            offsets are remembered; past this the oldest are forgotten (a
            publisher could otherwise grow memory by publishing to ever new
            names). A forgotten channel starts again at offset 1 under a new
            epoch. Channels with subscribers are never forgotten.
        max_history_bytes: the history of all channels together. Past it the
            least recently published channel loses its history: if nobody
            here is subscribed to it, the channel is forgotten (new epoch,
            offsets from 1); if someone is, it keeps its offsets and epoch,
            so a subscriber resuming later learns exactly which offsets it
            missed (``history_trimmed``) instead of losing its place.
        clock: seconds, for ``history_ttl_s``.
    """

    def __init__(self, max_idle_channels: int = 100_000, max_history_bytes: int = 256 << 20,
                 clock: Callable[[], float] = time.monotonic, idempotency_window_s: float = 120.0,
                 idempotency_max_keys: int = 100_000) -> None:
        self._streams: dict[str, _Stream] = {}
        self._idle: dict[str, None] = {}  # insertion-ordered: oldest first
        self._max_idle = max_idle_channels
        self._kept: dict[str, None] = {}  # channels with history, least recently published first
        self._kept_bytes = 0
        self.max_history_bytes = max_history_bytes
        self._clock = clock
        self._handler: BrokerEventHandler | None = None
        self._patterns: dict[str, None] = {}
        self.idempotency = RecentKeys(idempotency_window_s, idempotency_max_keys)

    @property
    def history_bytes(self) -> int:
        """What all kept publications count, against ``max_history_bytes``."""
        return self._kept_bytes

    def bind(self, handler: BrokerEventHandler) -> None:
        self._handler = handler

    def _stream(self, channel: str) -> _Stream:
        stream = self._streams.get(channel)
        if stream is None:
            stream = self._streams[channel] = _Stream(channel)
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
            if channel not in self._kept:
                self._mark_idle(channel)

    def subscribe_pattern(self, pattern: str) -> None:
        self._patterns[pattern] = None

    def unsubscribe_pattern(self, pattern: str) -> None:
        self._patterns.pop(pattern, None)

    def publish(self, channel: str, data: PublicationData, *, binary: bool = False, origin: str | None = None,
                key: str | None = None, history: HistoryOptions | None = None) -> StreamPosition:
        stream = self._stream(channel)
        stream.offset += 1
        pub = Publication(stream.name, data, stream.offset, stream.epoch, binary, key, self._clock())
        if history is not None and history.size > 0:
            self._keep(channel, stream, pub, history)
        # One process: with any pattern subscribed, the hub sees everything and matches.
        if (stream.subscribed or self._patterns) and self._handler is not None:
            self._handler.handle_publication(pub, origin)
        return StreamPosition(pub.offset, pub.epoch)

    def publish_once(self, channel: str, data: PublicationData, idempotency_key: str, *, binary: bool = False,
                     origin: str | None = None, key: str | None = None,
                     history: HistoryOptions | None = None) -> tuple[StreamPosition, bool]:
        now = self._clock()
        seen = self.idempotency.seen(channel, idempotency_key, now)
        # A key from an earlier epoch points at a stream this broker lost: publish again.
        if seen is not None and seen.epoch == self._stream(channel).epoch:
            return seen, True
        position = self.publish(channel, data, binary=binary, origin=origin, key=key, history=history)
        self.idempotency.remember(channel, idempotency_key, position, now)
        return position, False

    def live(self, channel: str) -> bool:
        return True

    async def sync(self, channel: str) -> None:
        return None

    def position(self, channel: str) -> StreamPosition:
        stream = self._stream(channel)
        return StreamPosition(stream.offset, stream.epoch)

    def health(self) -> str | None:
        return None

    async def subscribers(self, channel: str) -> int:
        return self._handler.viewers(channel) if self._handler is not None else 0

    async def history(self, channel: str, *, since: int | None = None, limit: int = 100,
                      reverse: bool = False) -> HistoryPage:
        stream = self._stream(channel)
        kept = stream.history
        if kept:
            self._expire(stream)
        position = StreamPosition(stream.offset, stream.epoch)
        if not kept:
            return HistoryPage([], position, stream.offset + 1, False)
        first = kept.first().offset  # kept offsets are contiguous (``_keep``)
        if reverse:
            end = len(kept) if since is None else max(0, min(len(kept), since - first))
            start = max(0, end - limit)
            page = kept.page(start, end)
            page.reverse()
            return HistoryPage(page, position, first, start > 0)
        start = 0 if since is None else max(0, since + 1 - first)
        return HistoryPage(kept.page(start, start + limit), position, first, start + limit < len(kept))

    async def close(self) -> None:
        self._handler = None

    # -- history ------------------------------------------------------------------

    def _keep(self, channel: str, stream: _Stream, pub: Publication, options: HistoryOptions) -> None:
        # On every publish of a channel with history: kept lean (measured with
        # bench/delivery.py instructions, ~1 µs per publication).
        kept = stream.history
        if kept is None or not kept.entries or kept.entries[-1].offset + 1 != pub.offset:
            # New, or publications went by unkept (the options changed): the
            # kept offsets must stay contiguous for history() to index them.
            self._drop_history(stream)
            kept = stream.history = _Kept()
            self._idle.pop(channel, None)  # the history budget bounds it now
        stream.options = options
        entries = kept.entries
        entries.append(pub)
        cost = 2 * len(pub.data) + ENTRY_OVERHEAD_BYTES  # entry_bytes(pub)
        stream.history_bytes += cost
        self._kept_bytes += cost
        while len(entries) - kept.start > options.size or (
                options.max_bytes and stream.history_bytes > options.max_bytes):
            self._forget_oldest(stream)
        if options.ttl_s:
            self._expire(stream)
        recent = self._kept
        if next(reversed(recent), None) != channel:
            recent.pop(channel, None)
            recent[channel] = None  # now the most recently published
        while self._kept_bytes > self.max_history_bytes:
            oldest = next(iter(recent))
            if oldest == channel:
                self._forget_oldest(stream)  # this channel alone is over the budget
            else:
                self._evict(oldest)

    def _forget_oldest(self, stream: _Stream) -> None:
        cost = entry_bytes(stream.history.pop_oldest())
        stream.history_bytes -= cost
        self._kept_bytes -= cost

    def _expire(self, stream: _Stream) -> None:
        options, kept = stream.options, stream.history
        if options is not None and options.ttl_s > 0:
            horizon = self._clock() - options.ttl_s
            while kept and kept.first().time < horizon:
                self._forget_oldest(stream)

    def _drop_history(self, stream: _Stream) -> None:
        self._kept_bytes -= stream.history_bytes
        stream.history_bytes = 0
        stream.history = None

    def _evict(self, channel: str) -> None:
        """The history budget is spent: ``channel`` loses its history."""
        del self._kept[channel]
        stream = self._streams[channel]
        self._drop_history(stream)
        if not stream.subscribed:
            del self._streams[channel]  # forgotten: a new epoch when it is next used
