"""Channels and fan-out within one process.

The hub keeps, per channel, the list of subscribers' ``OutBatch`` objects and
turns each publication the broker hands it into one frame that ``fanout``
appends to every batch. It is the broker's ``BrokerEventHandler``.
"""

from __future__ import annotations

import re
from types import SimpleNamespace
from typing import TYPE_CHECKING

from .broker.base import Broker
from .metrics import Metrics
from .protocol.codec import JsonCodec, TlvCodec
from .protocol.errors import InvalidChannel, NotSubscribed, TooManySubscriptions
from .protocol.messages import Publication, StreamPosition

if TYPE_CHECKING:
    from .connection import Connection

OP_TEXT = 0x1
OP_BINARY = 0x2
_CHANNEL_CHARS = re.compile(r"[A-Za-z0-9_\-.:@/=]+")


class Channel:
    """One channel's local subscribers, in subscription order."""

    __slots__ = ("name", "batches", "members")

    def __init__(self, name: str) -> None:
        self.name = name
        self.batches: list = []  # OutBatch per subscriber, what fanout iterates
        self.members: dict[str, Connection] = {}


class Hub:
    def __init__(self, broker: Broker, impl: SimpleNamespace, json_codec: JsonCodec,
                 tlv_codec: TlvCodec, metrics: Metrics, *, max_channel_length: int,
                 max_subscriptions: int) -> None:
        self.channels: dict[str, Channel] = {}
        self.clients: dict[str, Connection] = {}
        self._broker = broker
        self._json = json_codec
        self._tlv = tlv_codec
        self._metrics = metrics
        self._build_frame = impl.frame.build_frame
        self._fanout = impl.fanout.fanout
        self._max_channel_length = max_channel_length
        self._max_subscriptions = max_subscriptions
        self.subscription_count = 0
        broker.bind(self)

    def check_channel(self, name: str) -> None:
        """Raise ``InvalidChannel`` unless ``name`` is a valid channel name."""
        if name in self.channels:
            return  # already validated when it was created
        if not name or len(name) > self._max_channel_length:
            raise InvalidChannel(f"channel name must be 1 to {self._max_channel_length} characters")
        if _CHANNEL_CHARS.fullmatch(name) is None:
            raise InvalidChannel(f"channel name {name[:64]!r} has characters outside [A-Za-z0-9_-.:@/=]")

    def subscribe(self, conn: Connection, name: str) -> None:
        """Add ``conn`` to ``name``; subscribing twice is a no-op.

        Raises:
            InvalidChannel, TooManySubscriptions
        """
        self.check_channel(name)
        if name in conn.subscriptions:
            return
        if len(conn.subscriptions) >= self._max_subscriptions:
            raise TooManySubscriptions(
                f"a connection may hold at most {self._max_subscriptions} subscriptions")
        channel = self.channels.get(name)
        if channel is None:
            channel = self.channels[name] = Channel(name)
            self._broker.subscribe(name)
        channel.batches.append(conn.batch)
        channel.members[conn.client_id] = conn
        conn.subscriptions.add(name)
        self.subscription_count += 1

    def unsubscribe(self, conn: Connection, name: str) -> None:
        """Remove ``conn`` from ``name``.

        Raises:
            NotSubscribed
        """
        if name not in conn.subscriptions:
            raise NotSubscribed(f"not subscribed to {name[:64]!r}")
        conn.subscriptions.discard(name)
        self.subscription_count -= 1
        channel = self.channels[name]
        channel.batches.remove(conn.batch)
        del channel.members[conn.client_id]
        if not channel.members:
            del self.channels[name]
            self._broker.unsubscribe(name)

    def drop(self, conn: Connection) -> None:
        """Forget a closed connection and all its subscriptions."""
        for name in list(conn.subscriptions):
            self.unsubscribe(conn, name)
        self.clients.pop(conn.client_id, None)

    def publish(self, channel: str, data: bytes, *, binary: bool = False,
                origin: str | None = None) -> StreamPosition:
        """Publish through the broker; ``origin`` (a client id) is excluded from delivery."""
        self._metrics.publications_total += 1
        return self._broker.publish(channel, data, binary=binary, origin=origin)

    def handle_publication(self, pub: Publication, origin: str | None) -> None:
        channel = self.channels.get(pub.channel)
        if channel is None:
            return
        if pub.binary:
            frame = self._build_frame(OP_BINARY, self._tlv.encode_message(pub.channel, pub.offset, pub.data))
        else:
            frame = self._build_frame(OP_TEXT, self._json.encode_message(pub.channel, pub.offset, pub.data))
        exclude = None
        if origin is not None:
            member = channel.members.get(origin)
            if member is not None:
                exclude = member.batch
        self._metrics.deliveries_total += self._fanout(channel.batches, frame, exclude)
