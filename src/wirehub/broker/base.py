"""The broker interface: where publications travel, get their offsets and are kept.

A broker owns each channel's stream position (offset + epoch) and its
history, and hands every publication to the ``BrokerEventHandler`` of each
process that has subscribers on the channel. The hub registers itself as
that handler; the broker never imports the hub (callbacks point upward).
What a channel keeps is the caller's to say, per publication
(``HistoryOptions``): the broker stores, trims and answers, it does not
decide policy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from ..protocol.messages import Publication, PublicationData, StreamPosition


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
                key: str | None = None, history: HistoryOptions | None = None) -> StreamPosition:
        """Append a publication to ``channel``, keep it as ``history`` says, deliver it;
        return its position."""

    def publish_once(self, channel: str, data: PublicationData, idempotency_key: str, *, binary: bool = False,
                     origin: str | None = None, key: str | None = None,
                     history: HistoryOptions | None = None) -> tuple[StreamPosition, bool]:
        """``publish``, unless a publish with ``idempotency_key`` was accepted on
        ``channel`` within the broker's idempotency window: then nothing is
        published, and the answer is that publish's position and True. The
        check and the publish are one step (one process here; one script in
        a shared broker), so two retries racing each other publish once."""

    def position(self, channel: str) -> StreamPosition:
        """``channel``'s last offset and its epoch, as this process knows them now."""

    async def history(self, channel: str, *, since: int | None = None, limit: int = 100,
                      reverse: bool = False) -> HistoryPage:
        """Kept publications of ``channel``: those after offset ``since`` (from
        the oldest kept when None), oldest first, at most ``limit``; with
        ``reverse``, those before ``since`` (from the newest when None),
        newest first."""

    async def close(self) -> None:
        """Release connections and tasks."""
