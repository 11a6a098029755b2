"""Channels and fan-out within one process.

The hub keeps, per channel, the list of subscribers' ``OutBatch`` objects and
turns each publication the broker hands it into one frame that ``fanout``
appends to every batch. It is the broker's ``BrokerEventHandler`` and the
``SourceHost`` of every source (``sources/base.py``): subscribes to a
channel a source owns go to that source, which joins the connection itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from .broker.base import Broker
from .metrics import Metrics
from .protocol.codec import JsonCodec, TlvCodec
from .protocol.errors import Forbidden, InvalidChannel, InvalidField, NotSubscribed, TooManySubscriptions
from .protocol.messages import Error, Publication, Reply, StreamPosition, Subscribe
from .protocol.patterns import PatternError, check_pattern, is_channel_name, is_pattern

if TYPE_CHECKING:
    from .connection import Connection
    from .sources.base import Source

OP_TEXT = 0x1
OP_BINARY = 0x2
# Channels whose pattern subscribers are kept (PatternRoutes); past this the
# oldest entry goes, so a publisher cycling names cannot grow memory.
ROUTES_LIMIT = 10_000


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

    def add(self, conn: Connection) -> None:
        if conn.fanout_group == TAKEOVER:
            self.takeover.append(conn)
        else:
            self.groups.setdefault(conn.fanout_group, []).append(conn.batch)
        self.members[conn.client_id] = conn

    def remove(self, conn: Connection) -> None:
        if conn.fanout_group == TAKEOVER:
            self.takeover.remove(conn)
        else:
            group = self.groups[conn.fanout_group]
            group.remove(conn.batch)
            if not group:
                del self.groups[conn.fanout_group]
        del self.members[conn.client_id]


class PatternChannel(Channel):
    """The subscribers of one pattern, and the channels whose routes it feeds.

    ``dependents`` names the channels whose ``PatternRoutes`` count this
    pattern among their sources: a subscribe or unsubscribe on the pattern
    updates those routes, and no others.
    """

    __slots__ = ("dependents",)

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.dependents: set[str] = set()


class PatternRoutes:
    """Who receives one channel's publications through pattern subscriptions.

    ``sources`` are the patterns that cover the channel as of ``version`` of
    the index (``PatternIndex.match``); ``holders`` counts, per client id,
    how many of them the client holds; ``targets`` is the fan-out set: the
    holders that may read the channel (``can_subscribe``, per concrete
    channel) and are not subscribed to it directly, which deliver it
    themselves. A publication reaches each target once, however many of its
    patterns match.
    """

    __slots__ = ("name", "sources", "holders", "targets", "version")

    def __init__(self, name: str) -> None:
        self.name = name
        self.sources: list[PatternChannel] = []
        self.holders: dict[str, int] = {}
        self.targets = Channel(name)
        self.version = -1  # older than any index: the first lookup fills the sources

    def hold(self, conn: Connection, direct: Channel | None) -> None:
        """``conn`` holds one more of the sources."""
        held = self.holders.get(conn.client_id, 0)
        self.holders[conn.client_id] = held + 1
        if not held:
            self.recheck(conn, direct)

    def release(self, conn: Connection) -> None:
        """``conn`` holds one source less."""
        held = self.holders[conn.client_id] - 1
        if held:
            self.holders[conn.client_id] = held
            return
        del self.holders[conn.client_id]
        if conn.client_id in self.targets.members:
            self.targets.remove(conn)

    def recheck(self, conn: Connection, direct: Channel | None) -> None:
        """Add or remove ``conn`` after its subscriptions or its token changed."""
        client_id = conn.client_id
        wanted = (client_id in self.holders
                  and (direct is None or client_id not in direct.members)
                  and conn.principal.can_subscribe(self.name))
        if wanted != (client_id in self.targets.members):
            if wanted:
                self.targets.add(conn)
            else:
                self.targets.remove(conn)


class Hub:
    """Subscriptions of this process's connections, and delivery to them.

    A subscription is to a channel or to a pattern (``protocol.patterns``).
    A pattern subscriber receives a channel's publications only when its
    principal may subscribe to that channel. Patterns are found through a
    segment trie (``routing.PatternIndex``), and each channel's pattern
    subscribers are kept in its ``PatternRoutes``, which every subscription
    change updates where it matters (docs/architecture.md, "Pattern routing").
    """

    def __init__(self, broker: Broker, impl: SimpleNamespace, json_codec: JsonCodec,
                 tlv_codec: TlvCodec, metrics: Metrics, *, max_channel_length: int,
                 max_subscriptions: int, shared_compressors: dict[int, Any],
                 compress_threshold_bytes: int) -> None:
        self.channels: dict[str, Channel] = {}
        self.patterns: dict[str, PatternChannel] = {}
        # Patterns by segment, and the pattern subscribers of each channel
        # published on, kept up to date subscription by subscription.
        self._index = impl.routing.PatternIndex()
        self._routes: dict[str, PatternRoutes] = {}
        # Moves on every pattern added to or removed from the index: routes
        # built at an older version check that the same patterns still match.
        self._index_version = 0
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
        self.sources: list[Source] = []
        # Source subscribes not answered yet, per client id: they count
        # toward the subscription limit, and a second one for the same
        # channel is refused instead of replacing the first.
        self._awaiting: dict[str, set[str]] = {}
        broker.bind(self)

    def add_source(self, source: Source) -> None:
        """Hand the channels ``source`` owns to it (``sources/base.py``)."""
        self.sources.append(source)
        source.bind(self)

    def source_for(self, name: str) -> Source | None:
        for source in self.sources:
            if source.owns(name):
                return source
        return None

    def check_channel(self, name: str) -> None:
        """Raise ``InvalidChannel`` unless ``name`` is a valid channel name."""
        if name in self.channels:
            return  # already validated when it was created
        if not name or len(name) > self._max_channel_length:
            raise InvalidChannel(f"channel name must be 1 to {self._max_channel_length} characters")
        if not is_channel_name(name):
            raise InvalidChannel(f"channel name {name[:64]!r} has characters outside [A-Za-z0-9_-.:@/=]")

    def check_pattern(self, pattern: str) -> None:
        """Raise ``InvalidChannel`` unless ``pattern`` is a valid channel pattern."""
        if pattern in self.patterns:
            return  # already validated when it was created
        if len(pattern) > self._max_channel_length:
            raise InvalidChannel(f"channel pattern must be 1 to {self._max_channel_length} characters")
        try:
            check_pattern(pattern)
        except PatternError as exc:
            raise InvalidChannel(str(exc)) from None

    def subscribe(self, conn: Connection, name: str, request: Subscribe | None = None,
                  answer: Callable[[Reply], None] | None = None) -> bool:
        """Add ``conn`` to the channel or pattern ``name``; subscribing twice is a no-op.

        Returns True when ``conn`` is subscribed now (the caller answers
        ``subscribed``), False when the channel's source answers through
        ``answer``, now or later.

        Raises:
            InvalidChannel, TooManySubscriptions, InvalidField; a source's errors.
        """
        pattern = is_pattern(name)
        if pattern:
            self.check_pattern(name)
        else:
            self.check_channel(name)
        tail = request.tail if request is not None else None
        if name in conn.subscriptions:
            if tail is not None:
                raise InvalidField(f"already subscribed to {name[:64]!r}: `tail` needs a new "
                                   f"subscription (unsubscribe first)")
            return True
        awaiting = self._awaiting.get(conn.client_id, ())
        if name in awaiting:
            raise InvalidField(f"a subscribe to {name[:64]!r} is already waiting for its answer")
        if len(conn.subscriptions) + len(awaiting) >= self._max_subscriptions:
            raise TooManySubscriptions(
                f"a connection may hold at most {self._max_subscriptions} subscriptions")
        if not pattern and self.sources and request is not None and answer is not None:
            source = self.source_for(name)
            if source is not None:
                return self._ask_source(source, conn, name, request, answer)
        if tail is not None:
            raise InvalidField("`tail` is only supported on source channels such as logs:<container>")
        self.join(conn, name)
        return True

    def _ask_source(self, source: Source, conn: Connection, name: str, request: Subscribe,
                    answer: Callable[[Reply], None]) -> bool:
        """Hand a subscribe to ``source``, which answers now or later; until
        then it is awaiting (counted, and not to be asked twice)."""
        awaiting = self._awaiting.setdefault(conn.client_id, set())
        awaiting.add(name)
        errors = self._metrics.errors_total

        def answered(reply: Reply) -> None:
            self._stop_awaiting(conn.client_id, name)
            if type(reply) is Error:
                errors[reply.code] += 1
            answer(reply)

        try:
            return source.subscribe(conn, name, request, answered)
        except BaseException:
            self._stop_awaiting(conn.client_id, name)
            raise

    def _stop_awaiting(self, client_id: str, name: str) -> None:
        awaiting = self._awaiting.get(client_id)
        if awaiting is not None:
            awaiting.discard(name)
            if not awaiting:
                del self._awaiting[client_id]

    def join(self, conn: Connection, name: str) -> None:
        """Add ``conn`` to the channel or pattern ``name`` (validated) without asking a source."""
        if name in conn.subscriptions:
            return
        if is_pattern(name):
            self._join_pattern(conn, name)
        else:
            channel = self.channels.get(name)
            if channel is None:
                channel = self.channels[name] = Channel(name)
                self._broker.subscribe(name)
            channel.add(conn)
            routes = self._routes.get(name)
            if routes is not None:
                routes.recheck(conn, channel)  # now delivered through the channel itself
        if not conn.subscriptions:
            conn.subscriptions = set()  # idle connections share one empty frozenset
        conn.subscriptions.add(name)
        self.subscription_count += 1

    def unsubscribe(self, conn: Connection, name: str) -> None:
        """Remove ``conn`` from the channel or pattern ``name``.

        Raises:
            NotSubscribed
        """
        if name not in conn.subscriptions:
            source = self.source_for(name) if self.sources else None
            if source is not None and source.cancel(conn, name):
                self._stop_awaiting(conn.client_id, name)
                return  # a subscribe its source had not answered yet
            raise NotSubscribed(f"not subscribed to {name[:64]!r}")
        conn.subscriptions.discard(name)
        self.subscription_count -= 1
        if is_pattern(name):
            self._leave_pattern(conn, name)
            return
        channel = self.channels[name]
        channel.remove(conn)
        if not channel.members:
            del self.channels[name]
            self._broker.unsubscribe(name)
            if self.sources:
                source = self.source_for(name)
                if source is not None:
                    source.vacated(name)
            channel = None
        routes = self._routes.get(name)
        if routes is not None:
            routes.recheck(conn, channel)  # back to its patterns, if it holds any

    def revoke(self, conn: Connection) -> list[str]:
        """After ``conn``'s principal changed: end the channel subscriptions it
        no longer allows and return their names; its pattern subscriptions
        stay, and now deliver only the channels the new token allows."""
        principal = conn.principal
        revoked = [name for name in conn.subscriptions
                   if not is_pattern(name) and not principal.can_subscribe(name)]
        for name in revoked:
            self.unsubscribe(conn, name)
        for name in conn.subscriptions:
            if is_pattern(name):
                for channel in self.patterns[name].dependents:
                    self._routes[channel].recheck(conn, self.channels.get(channel))
        return revoked

    # -- pattern routing ----------------------------------------------------------

    def _join_pattern(self, conn: Connection, pattern: str) -> None:
        subscribers = self.patterns.get(pattern)
        if subscribers is None:
            subscribers = self.patterns[pattern] = PatternChannel(pattern)
            self._index.add(pattern, subscribers)
            self._index_version += 1
            self._broker.subscribe_pattern(pattern)
        subscribers.add(conn)
        for name in subscribers.dependents:
            self._routes[name].hold(conn, self.channels.get(name))

    def _leave_pattern(self, conn: Connection, pattern: str) -> None:
        subscribers = self.patterns[pattern]
        subscribers.remove(conn)
        for name in subscribers.dependents:
            self._routes[name].release(conn)
        if subscribers.members:
            return
        del self.patterns[pattern]
        self._index.discard(pattern)
        self._index_version += 1
        self._broker.unsubscribe_pattern(pattern)
        if not self.patterns:
            self._routes.clear()

    def _pattern_targets(self, name: str) -> Channel | None:
        """The pattern subscribers that get ``name``'s publications: each once,
        only if not subscribed to ``name`` itself, only if allowed to read it.

        Kept per channel and updated by each subscription change, so a
        publication costs a dict lookup; after a pattern was added to or
        removed from the index anywhere, the index is asked which patterns
        cover ``name`` now (``O(segments)``) and only a difference is applied.
        """
        routes = self._routes.get(name)
        if routes is None:
            routes = self._new_routes(name)
        elif routes.version != self._index_version:
            self._follow_index(routes)
        targets = routes.targets
        return targets if targets.members else None

    def _new_routes(self, name: str) -> PatternRoutes:
        if len(self._routes) >= ROUTES_LIMIT:
            oldest = self._routes.pop(next(iter(self._routes)))
            for subscribers in oldest.sources:
                subscribers.dependents.discard(oldest.name)
        routes = self._routes[name] = PatternRoutes(name)
        self._follow_index(routes)
        return routes

    def _follow_index(self, routes: PatternRoutes) -> None:
        """Make ``routes.sources`` the patterns that cover the channel now."""
        routes.version = self._index_version
        sources = self._index.match(routes.name)
        if sources == routes.sources:  # the same PatternChannels, in order
            return
        name = routes.name
        for subscribers in routes.sources:
            if subscribers not in sources:
                # Gone from the index, so it has no members left to release.
                subscribers.dependents.discard(name)
        direct = self.channels.get(name)
        for subscribers in sources:
            if subscribers not in routes.sources:
                subscribers.dependents.add(name)
                for conn in subscribers.members.values():
                    routes.hold(conn, direct)
        routes.sources = sources

    def metric_lines(self) -> list[str]:
        """Pattern routing on ``/metrics``: what the index and the routes hold."""
        return ["# TYPE wirehub_patterns gauge", f"wirehub_patterns {len(self.patterns)}",
                "# TYPE wirehub_pattern_index_nodes gauge",
                f"wirehub_pattern_index_nodes {self._index.node_count}",
                "# TYPE wirehub_pattern_routes gauge", f"wirehub_pattern_routes {len(self._routes)}"]

    def drop(self, conn: Connection) -> None:
        """Forget a closed connection and all its subscriptions."""
        self._awaiting.pop(conn.client_id, None)
        for source in self.sources:
            source.forget(conn)
        for name in list(conn.subscriptions):
            self.unsubscribe(conn, name)
        self.clients.pop(conn.client_id, None)

    def publish(self, channel: str, data: bytes, *, binary: bool = False,
                origin: str | None = None) -> StreamPosition:
        """Publish through the broker; ``origin`` (a client id) is excluded from delivery.

        Raises:
            InvalidChannel, Forbidden
        """
        self.check_channel(channel)
        return self.publish_checked(channel, data, binary=binary, origin=origin)

    def publish_checked(self, channel: str, data: bytes, *, binary: bool = False,
                        origin: str | None = None) -> StreamPosition:
        """``publish`` for a name the caller already passed through ``check_channel``
        (a client's publish is checked before its permission is)."""
        if self.sources and self.source_for(channel) is not None:
            raise Forbidden(f"{channel[:64]!r} is written by the gateway only")
        self._metrics.publications_total += 1
        return self._broker.publish(channel, data, binary=binary, origin=origin)

    # -- SourceHost -------------------------------------------------------------

    def emit(self, channel: str, data: bytes) -> int:
        """Publish a source's JSON ``data`` on ``channel``; return its offset."""
        self._metrics.publications_total += 1
        return self._broker.publish(channel, data).offset

    def send_history(self, conn: Connection, channel: str, entries: Iterable[tuple[int, bytes]]) -> None:
        """Send ``(offset, JSON data)`` entries to ``conn`` alone, as ``message``s."""
        encode = self._json.encode_message
        sent = 0
        for offset, data in entries:
            conn.push(OP_TEXT, encode(channel, offset, data))
            sent += 1
        self._metrics.deliveries_total += sent

    def viewers(self, channel: str) -> int:
        found = self.channels.get(channel)
        return len(found.members) if found is not None else 0

    def allowed(self, conn: Connection, channel: str) -> bool:
        principal = conn.principal
        return principal is not None and principal.can_subscribe(channel)

    def handle_publication(self, pub: Publication, origin: str | None) -> None:
        channel = self.channels.get(pub.channel)
        by_pattern = self._pattern_targets(pub.channel) if self.patterns else None
        if channel is None and by_pattern is None:
            return
        if pub.binary:
            opcode, payload = OP_BINARY, self._tlv.encode_message(pub.channel, pub.offset, pub.data)
        else:
            opcode, payload = OP_TEXT, self._json.encode_message(pub.channel, pub.offset, pub.data)
        delivered = 0
        if channel is not None:
            delivered += self._deliver(channel, opcode, payload, origin)
        if by_pattern is not None:
            delivered += self._deliver(by_pattern, opcode, payload, origin)
        self._metrics.deliveries_total += delivered

    def _deliver(self, channel: Channel, opcode: int, payload: bytes, origin: str | None) -> int:
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
        return delivered
