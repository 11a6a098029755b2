"""The interfaces between the hub and a source, and the thread-to-loop handoff.

A *source* owns a family of channels (``logs:*``, ``runners``, ...) whose
publications it produces itself. The hub hands it every subscribe to one of
them; the source answers now or later (``subscribed`` or ``error``), and when
it admits a connection it sends that connection its history and joins it to
the channel through the ``SourceHost`` callbacks, all within one event-loop
callback. The loop is single-threaded, so no publication can fall between the
history and the live stream, and none can appear in both::

    client ─ subscribe ─▶ Hub.subscribe ─▶ Source.subscribe ──(later, on the loop)──┐
                                                                                     ▼
             reply(subscribed); host.send_history(conn, channel, ring[-tail:]); host.join(conn, channel)

Callbacks point upward (as with the broker): a source never imports the hub
or the connection; the hub implements ``SourceHost`` and calls the source
when a channel it owns is subscribed to, cancelled or left empty.

Sources that read a blocking API run it on worker threads and hand results
to the loop through a ``Handoff``: bounded (the worker blocks when the loop
falls behind), batched (one ``call_soon_threadsafe`` per drain cycle, however
many items were put), and drained a slice at a time so the loop stays
responsive.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from ..broker.base import HistoryPage, Published
from ..protocol.messages import Reply, StreamPosition, Subscribe

logger = logging.getLogger("wirehub.sources")

Answer = Callable[[Reply], None]
"""Sends a reply (``Subscribed`` or ``Error``) to the subscriber, in the codec of its request."""


class Subscriber(Protocol):
    """The connection, as a source sees it."""

    client_id: str


class SourceHost(Protocol):
    """What a source may ask of the hub (the hub implements it)."""

    def emit(self, channel: str, data: bytes) -> Published:
        """Publish JSON ``data`` on ``channel``: the publication's position, or
        (a channel the source ``shares``) a future of it from the shared broker.

        Raises:
            Unavailable: the shared broker cannot take it now.
        """

    async def history(self, channel: str, since: StreamPosition | None = None, limit: int = 100,
                      reverse: bool = False) -> HistoryPage:
        """The publications kept on ``channel`` after ``since`` (before it, newest first, with ``reverse``)."""

    def send_history(self, conn: Subscriber, channel: str, entries: Iterable[tuple[int, bytes]]) -> None:
        """Send ``(offset, JSON data)`` entries to ``conn`` alone, as ``message``s on ``channel``."""

    def join(self, conn: Subscriber, channel: str, max_rate: float | None = None) -> None:
        """Subscribe ``conn`` to ``channel``: every later publication reaches it
        (at most ``max_rate`` a second, the latest kept, when set)."""

    def recover(self, conn: Subscriber, channel: str, request: Subscribe, answer: Answer) -> None:
        """Subscribe ``conn`` from ``request.since`` out of the channel's history
        (what a source emits is kept there): the hub answers through ``answer``
        and joins the live stream without a gap or a repeat.

        Raises:
            WirehubError: an impossible ``since`` (the client gets the error).
        """

    def viewers(self, channel: str) -> int:
        """How many connections are subscribed to ``channel`` (pending ones not included)."""

    def allowed(self, conn: Subscriber, channel: str) -> bool:
        """Whether ``conn`` may still subscribe to ``channel`` (its token may have
        changed while its subscribe waited); a source checks before admitting."""


class Source(Protocol):
    """A producer of channels, started and stopped by their subscribers."""

    def owns(self, channel: str) -> bool:
        """Whether ``channel`` belongs to this source (clients may not publish on it)."""

    def shares(self, channel: str) -> bool:
        """Whether ``channel`` goes through the shared broker (``--broker redis://``),
        for the subscribers of every gateway, rather than through this gateway's own."""

    def bind(self, host: SourceHost) -> None:
        """Register the hub; called once, before ``start``."""

    async def start(self) -> None:
        """Start background work that runs whatever the subscribers (called by ``Gateway.start``)."""

    async def close(self) -> None:
        """Stop every stream and thread (called by ``Gateway.stop``)."""

    def subscribe(self, conn: Subscriber, channel: str, request: Subscribe, answer: Answer) -> bool:
        """Handle a subscribe to an owned channel.

        Returns True when the hub should join ``conn`` and answer
        ``subscribed`` itself; False when the source answers through
        ``answer`` (now or later) and joins the connection itself.

        Raises:
            WirehubError: refused now (the client gets the error).
        """

    def cancel(self, conn: Subscriber, channel: str) -> bool:
        """Forget ``conn``'s pending subscribe to ``channel``; True if there was one."""

    def forget(self, conn: Subscriber) -> None:
        """``conn`` closed: forget its pending subscribes."""

    def vacated(self, channel: str) -> None:
        """The last subscriber of ``channel`` left."""


class Handoff:
    """Items from one worker thread to the event loop: batched, bounded, in order.

    The worker calls ``put``; the loop receives ``deliver(items)`` with at most
    ``batch_items`` items per callback and yields to other callbacks between
    slices. ``put`` blocks while ``max_items`` items or ``max_bytes`` bytes are
    waiting (backpressure reaches the worker, and through its socket, the
    producer), so memory is bounded by those limits plus one put.

    Args:
        loop: the event loop ``deliver`` runs on.
        deliver: called on the loop with a list of items, in put order.
        max_items, max_bytes: what may wait for the loop before ``put`` blocks.
        batch_items: most items per ``deliver`` call.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, deliver: Callable[[list[Any]], None], *,
                 max_items: int = 8192, max_bytes: int = 8 << 20, batch_items: int = 1024) -> None:
        self._loop = loop
        self._deliver = deliver
        self._max_items = max_items
        self._max_bytes = max_bytes
        self._batch_items = batch_items
        self._queue: collections.deque[tuple[Any, int]] = collections.deque()
        self._bytes = 0
        self._cond = threading.Condition()
        self._scheduled = False
        self._closed = False
        # Statistics, for tests and metrics.
        self.wakeups = 0          # call_soon_threadsafe calls
        self.blocked = 0          # puts that had to wait for the loop
        self.max_items_seen = 0
        self.max_bytes_seen = 0

    @property
    def closed(self) -> bool:
        return self._closed

    def put(self, items: list[tuple[Any, int]]) -> bool:
        """Queue ``(item, size_bytes)`` pairs (worker thread); block while the queue is full.

        Returns False once the handoff is closed (the worker should stop).
        """
        wake = False
        with self._cond:
            if self._queue and (len(self._queue) >= self._max_items or self._bytes >= self._max_bytes):
                self.blocked += 1
                while not self._closed and (len(self._queue) >= self._max_items
                                            or self._bytes >= self._max_bytes):
                    self._cond.wait()
            if self._closed:
                return False
            self._queue.extend(items)
            self._bytes += sum(size for _, size in items)
            self.max_items_seen = max(self.max_items_seen, len(self._queue))
            self.max_bytes_seen = max(self.max_bytes_seen, self._bytes)
            if not self._scheduled:
                self._scheduled = wake = True
        if wake:
            self.wakeups += 1
            try:
                self._loop.call_soon_threadsafe(self._drain)
            except RuntimeError:  # the loop is closed: nobody will drain
                self.close()
                return False
        return True

    def close(self) -> None:
        """Refuse further items, drop queued ones and release a blocked ``put`` (any thread)."""
        with self._cond:
            self._closed = True
            self._queue.clear()
            self._bytes = 0
            self._cond.notify_all()

    def _drain(self) -> None:
        with self._cond:
            if self._closed:
                return
            queue = self._queue
            n = min(len(queue), self._batch_items)
            batch = [queue.popleft() for _ in range(n)]
            self._bytes -= sum(size for _, size in batch)
            more = bool(queue)
            if not more:
                self._scheduled = False
            self._cond.notify_all()
        try:
            self._deliver([item for item, _ in batch])
        except Exception:
            logger.exception("source delivery failed")
        if more:
            # The next slice runs after the callbacks already waiting
            # (socket reads, flushes, pings): a fast producer cannot hog the loop.
            self._loop.call_soon(self._drain)
