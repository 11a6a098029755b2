"""The broker interface: where publications travel and get their offsets.

A broker owns each channel's stream position (offset + epoch) and hands
every publication to the ``BrokerEventHandler`` of each process that has
subscribers on the channel. The hub registers itself as that handler; the
broker never imports the hub (callbacks point upward).
"""

from __future__ import annotations

from typing import Protocol

from ..protocol.messages import Publication, StreamPosition


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

    def publish(self, channel: str, data: bytes, *, binary: bool = False,
                origin: str | None = None) -> StreamPosition:
        """Append a publication to ``channel`` and deliver it; return its position."""

    async def close(self) -> None:
        """Release connections and tasks."""
