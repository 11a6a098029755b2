"""The broker interface: where publications travel, get their offsets and are kept.

A broker owns each channel's stream position (offset + epoch) and its
history, and hands every publication to the ``BrokerEventHandler`` of each
process that has subscribers on the channel. The hub registers itself as
that handler; the broker never imports the hub (callbacks point upward).
What a channel keeps is the caller's to say, per publication
(``HistoryOptions``): the broker stores, trims and answers, it does not
decide policy.

``MemoryBroker`` (one process, the default) answers everything at once.
``RedisBroker`` (many gateways as one, docs/scaling.md) answers a publish
with a future that resolves once Redis has it, and a channel is ``live`` in
a process only once every later publication is sure to reach it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Protocol, Union

from ..protocol.messages import Publication, PublicationData, StreamPosition

# What ``publish`` and ``publish_once`` answer: now, or once a shared broker has it.
Published = Union[StreamPosition, "asyncio.Future[StreamPosition]"]
PublishedOnce = Union[tuple[StreamPosition, bool], "asyncio.Future[tuple[StreamPosition, bool]]"]


@dataclass(frozen=True, slots=True)
class HistoryOptions:
    """What a channel keeps of its publications.

    Args:
        size: publications kept (0: none).
        ttl_s: a publication older than this is no longer kept (0: no limit).
        max_bytes: the channel's kept publications take at most this much
            memory, as the broker counts it (0: only the broker's global cap).
    """

    size: int
    ttl_s: float = 0.0
    max_bytes: int = 0


@dataclass(slots=True)
class HistoryPage:
    """Kept publications of one channel, as ``Broker.history`` answers.

    ``first_offset`` is the oldest offset still kept (``position.offset + 1``
    when nothing is), so a caller can tell whether an offset it wants is gone;
    ``more``: the page stopped at its limit and more publications follow in
    that direction.
    """

    publications: list[Publication]
    position: StreamPosition
    first_offset: int
    more: bool


class BrokerEventHandler(Protocol):
    def handle_publication(self, pub: Publication, origin: str | None) -> None:
        """Deliver ``pub`` to local subscribers; ``origin`` is the publishing client's id."""

    def handle_gap(self, channel: str, first: int, last: int) -> None:
        """Offsets ``first`` to ``last`` of ``channel`` are lost to this process
        (a shared broker no longer keeps them): tell its subscribers."""

    def handle_new_epoch(self, channel: str, position: StreamPosition) -> None:
        """``channel``'s stream was lost and started again (``position``: its
        new epoch, offset 0); its publications follow from offset 1."""

    def viewers(self, channel: str) -> int:
        """Local subscribers of ``channel`` now."""

    def take_presence(self) -> dict[str, int]:
        """The channels whose local subscriber count changed since the last
        call, with their counts now (for a broker that shares them)."""


class Broker(Protocol):
    def bind(self, handler: BrokerEventHandler) -> None:
        """Register the handler publications are delivered to."""

    def subscribe(self, channel: str) -> None:
        """This process now has subscribers on ``channel``: route its publications here."""

    def unsubscribe(self, channel: str) -> None:
        """The last local subscriber of ``channel`` left."""

    def subscribe_pattern(self, pattern: str) -> None:
        """Route here the publications of every channel ``pattern`` covers
        (``protocol.patterns``); the hub filters them per subscriber."""

    def unsubscribe_pattern(self, pattern: str) -> None:
        """The last local subscriber of ``pattern`` left."""

    def publish(self, channel: str, data: PublicationData, *, binary: bool = False, origin: str | None = None,
                key: str | None = None, history: HistoryOptions | None = None) -> Published:
        """Append a publication to ``channel``, keep it as ``history`` says, deliver it;
        return its position: at once (``StreamPosition``) in one process, or
        as a future that resolves once a shared broker has it.

        Raises:
            Unavailable: a shared broker cannot take it now (nothing was published).
        """

    def publish_once(self, channel: str, data: PublicationData, idempotency_key: str, *, binary: bool = False,
                     origin: str | None = None, key: str | None = None,
                     history: HistoryOptions | None = None) -> PublishedOnce:
        """``publish``, unless a publish with ``idempotency_key`` was accepted on
        ``channel`` within the broker's idempotency window: then nothing is
        published, and the answer is that publish's position and True. The
        check and the publish are one step (one process here; one script in
        a shared broker), so two retries racing each other publish once."""

    def live(self, channel: str) -> bool:
        """Whether ``position(channel)`` is known here and every later
        publication of the subscribed ``channel`` will reach this process
        (always, in one process); if not, ``sync`` waits for it."""

    async def sync(self, channel: str) -> None:
        """Wait until the subscribed ``channel`` is ``live``.

        Raises:
            Unavailable: a shared broker cannot be reached.
        """

    def position(self, channel: str) -> StreamPosition:
        """``channel``'s last offset and its epoch, as this process knows them
        now (a channel that is ``live`` here)."""

    def health(self) -> str | None:
        """None, or why the broker cannot serve now (``/healthz`` answers 503 with it)."""

    async def subscribers(self, channel: str) -> int:
        """Subscribers of ``channel`` in every process that shares this broker."""

    async def history(self, channel: str, *, since: int | None = None, limit: int = 100,
                      reverse: bool = False) -> HistoryPage:
        """Kept publications of ``channel``: those after offset ``since`` (from
        the oldest kept when None), oldest first, at most ``limit``; with
        ``reverse``, those before ``since`` (from the newest when None),
        newest first."""

    async def close(self) -> None:
        """Release connections and tasks."""
