"""Channels and fan-out within one process.

The hub keeps, per channel, the list of subscribers' ``OutBatch`` objects and
turns each publication the broker hands it into one frame that ``fanout``
appends to every batch. It is the broker's ``BrokerEventHandler``.
"""

from __future__ import annotations

import re
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

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


TAKEOVER = -1  # fan-out group of connections that compress with their own context


class Channel:
    """One channel's local subscribers, grouped by how their frames are encoded.

    ``groups`` maps ``None`` (uncompressed) or a window size (permessage-deflate
    without context takeover: one compressed frame shared by the group) to the
    subscribers' ``OutBatch`` list that ``fanout`` iterates; ``takeover`` holds
    connections whose compressor keeps context, which must compress for
    themselves.
    """

    __slots__ = ("name", "groups", "takeover", "members")

    def __init__(self, name: str) -> None:
        self.name = name
        self.groups: dict[int | None, list] = {}
        self.takeover: list[Connection] = []
        self.members: dict[str, Connection] = {}


class Hub:
    def __init__(self, broker: Broker, impl: SimpleNamespace, json_codec: JsonCodec,
                 tlv_codec: TlvCodec, metrics: Metrics, *, max_channel_length: int,
                 max_subscriptions: int, shared_compressors: dict[int, Any],
                 compress_threshold_bytes: int) -> None:
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
        self._compressors = shared_compressors
        self._threshold = compress_threshold_bytes
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
        if conn.fanout_group == TAKEOVER:
            channel.takeover.append(conn)
        else:
            channel.groups.setdefault(conn.fanout_group, []).append(conn.batch)
        channel.members[conn.client_id] = conn
        if not conn.subscriptions:
            conn.subscriptions = set()  # idle connections share one empty frozenset
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
        if conn.fanout_group == TAKEOVER:
            channel.takeover.remove(conn)
        else:
            group = channel.groups[conn.fanout_group]
            group.remove(conn.batch)
            if not group:
                del channel.groups[conn.fanout_group]
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
        """Publish through the broker; ``origin`` (a client id) is excluded from delivery.

        Raises:
            InvalidChannel
        """
        self.check_channel(channel)
        self._metrics.publications_total += 1
        return self._broker.publish(channel, data, binary=binary, origin=origin)

    def handle_publication(self, pub: Publication, origin: str | None) -> None:
        channel = self.channels.get(pub.channel)
        if channel is None:
            return
        if pub.binary:
            opcode, payload = OP_BINARY, self._tlv.encode_message(pub.channel, pub.offset, pub.data)
        else:
            opcode, payload = OP_TEXT, self._json.encode_message(pub.channel, pub.offset, pub.data)
        sender = channel.members.get(origin) if origin is not None else None
        exclude = sender.batch if sender is not None else None
        delivered = 0
        plain = None
        for window_bits, batches in channel.groups.items():
            if window_bits is None or len(payload) < self._threshold:
                if plain is None:
                    plain = self._build_frame(opcode, payload)
                frame = plain
            else:
                # Encode once, compress once per window size, frame once.
                frame = self._build_frame(opcode, self._compressors[window_bits].compress(payload), True)
            delivered += self._fanout(batches, frame, exclude)
        for conn in channel.takeover:
            if conn is not sender and conn.push(opcode, payload):
                delivered += 1
        self._metrics.deliveries_total += delivered
