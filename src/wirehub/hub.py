"""Channels and fan-out within one process.

The hub keeps, per channel, the list of subscribers' ``OutBatch`` objects and
turns each publication the broker hands it into one frame that ``fanout``
appends to every batch. It is the broker's ``BrokerEventHandler`` and the
``SourceHost`` of every source (``sources/base.py``): subscribes to a
channel a source owns go to that source, which joins the connection itself.
A subscribe that resumes (``since``) or asks for ``tail`` joins through a
recovery (``recovery.py``), and a channel's ``ChannelPolicy``
(``delivery.py``) says what the broker keeps of it and what its slow
subscribers get (``fanout.fanout_held``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Iterable
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import msgspec

from .broker.base import Broker, HistoryPage, Published, PublishedOnce
from .delivery import DISCONNECT, ChannelPolicies, ChannelPolicy
from .metrics import Metrics
from .protocol.codec import JsonCodec, TlvCodec
from .protocol.errors import (Forbidden, InvalidChannel, InvalidField, NotSubscribed, TooManySubscriptions,
                              WirehubError)
from .protocol.messages import (Error, Lagged, Publication, PublicationData, Reply, StreamPosition, Subscribe,
                                Subscribed)
from .protocol.patterns import (RESERVED_CHANNELS, PatternError, check_pattern, is_channel_name, is_pattern,
                                is_reserved)
from .recovery import EPOCH_CHANGED, Recovery, plan

if TYPE_CHECKING:
    from .connection import Connection
    from .sources.base import Source

logger = logging.getLogger("wirehub.hub")

OP_TEXT = 0x1
OP_BINARY = 0x2
# Publications a recovery reads from the broker, and sends, at a time; it
# waits for the connection's socket to drain between two pages.
RECOVERY_PAGE = 1000
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

    __slots__ = ("name", "groups", "takeover", "members", "recovering", "rate_held", "notice")

    def __init__(self, name: str) -> None:
        self.name = name
        self.groups: dict[int | None, list] = {}
        self.takeover: list[Connection] = []
        self.members: dict[str, Connection] = {}
        # Members still catching up from history: not in ``groups`` yet, the
        # live publications wait in their Recovery.
        self.recovering: dict[str, Recovery] | None = None
        # Members whose subscription has a max_rate (a Hold on their batch).
        self.rate_held: set[str] | None = None
        self.notice: Callable[[int, int, int, int], bytes] | None = None  # builds ``lagged``

    def add(self, conn: Connection, recovery: Recovery | None = None) -> None:
        """Add a member: live, or catching up through ``recovery``."""
        if recovery is None:
            self._add_live(conn)
        else:
            if self.recovering is None:
                self.recovering = {}
            self.recovering[conn.client_id] = recovery
        self.members[conn.client_id] = conn

    def _add_live(self, conn: Connection) -> None:
        if conn.fanout_group == TAKEOVER:
            self.takeover.append(conn)
        else:
            self.groups.setdefault(conn.fanout_group, []).append(conn.batch)

    def go_live(self, conn: Connection) -> None:
        """A member caught up: from now on publications reach it by fan-out."""
        del self.recovering[conn.client_id]
        if not self.recovering:
            self.recovering = None
        self._add_live(conn)

    def remove(self, conn: Connection) -> Recovery | None:
        """Remove a member; return its recovery if it was still catching up."""
        recovery = self.recovering.pop(conn.client_id, None) if self.recovering else None
        if recovery is None:
            if conn.fanout_group == TAKEOVER:
                self.takeover.remove(conn)
            else:
                group = self.groups[conn.fanout_group]
                group.remove(conn.batch)
                if not group:
                    del self.groups[conn.fanout_group]
        elif not self.recovering:
            self.recovering = None
        if self.rate_held is not None:
            self.rate_held.discard(conn.client_id)
        del self.members[conn.client_id]
        return recovery


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
            self._stop(conn)

    def recheck(self, conn: Connection, direct: Channel | None) -> None:
        """Add or remove ``conn`` after its subscriptions or its token changed."""
        client_id = conn.client_id
        is_direct = direct is not None and client_id in direct.members
        wanted = (client_id in self.holders and not is_direct
                  and conn.principal.can_subscribe(self.name))
        if wanted != (client_id in self.targets.members):
            if wanted:
                self.targets.add(conn)
            elif is_direct:
                self.targets.remove(conn)  # the channel delivers it now, its hold included
            else:
                self._stop(conn)

    def _stop(self, conn: Connection) -> None:
        # Nothing more reaches it through patterns: what a slow-consumer
        # policy held back for it goes too.
        self.targets.remove(conn)
        conn.batch.unhold(self.name)


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
                 compress_threshold_bytes: int, policies: ChannelPolicies | None = None,
                 recovery_held_bytes: int = 4 << 20, local_broker: Broker | None = None) -> None:
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
        # Sources' channels ($sys:metrics, runners) are this process's own:
        # with a shared broker they stay in a local one, unless their source
        # shares them with the cluster (logs:*, ``_broker_for``).
        self._local = local_broker or broker
        self._json = json_codec
        self._tlv = tlv_codec
        self._metrics = metrics
        self._build_frame = impl.frame.build_frame
        self._build_message_frame = impl.frame.build_message_frame
        self._frame_payload = impl.frame.frame_payload
        self._fanout = impl.fanout.fanout
        self._fanout_held = impl.fanout.fanout_held
        self.policies = policies or ChannelPolicies()
        self._recovery_held_bytes = recovery_held_bytes
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
        # Channels whose subscriber count changed since the broker last took
        # them (``take_presence``); only for a broker that shares counts.
        self._presence: set[str] | None = set() if getattr(broker, "shares_presence", False) else None
        broker.bind(self)
        if self._local is not broker:
            self._local.bind(self)

    def _broker_for(self, name: str) -> Broker:
        if self._local is self._broker:
            return self._broker
        source = self.source_for(name)
        return self._broker if source is None or source.shares(name) else self._local

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
            if is_reserved(name):
                if name in RESERVED_CHANNELS:
                    return  # the gateway's own: its source refuses a publish
                raise InvalidChannel(f"channel name {name[:64]!r}: names starting with '$' are reserved, "
                                     f"and the gateway's are {', '.join(sorted(RESERVED_CHANNELS))}")
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
        ``subscribed``, with ``position(name)``), False when the answer goes
        through ``answer``, now or later: from the channel's source, or from
        a recovery (``since``, ``tail``).

        Raises:
            InvalidChannel, TooManySubscriptions, InvalidField; a source's errors.
        """
        pattern = is_pattern(name)
        if pattern:
            self.check_pattern(name)
        else:
            self.check_channel(name)
        asks = request is not None and (request.tail is not None or request.since is not None
                                        or request.max_rate is not None)
        if asks and pattern:
            raise InvalidField("`since`, `tail` and `max_rate` apply to a channel, not to a pattern")
        if name in conn.subscriptions:
            if asks:
                raise InvalidField(f"already subscribed to {name[:64]!r}: `since`, `tail` and `max_rate` "
                                   f"need a new subscription (unsubscribe first)")
            return True
        awaiting = self._awaiting.get(conn.client_id, ())
        if name in awaiting:
            raise InvalidField(f"a subscribe to {name[:64]!r} is already waiting for its answer")
        if len(conn.subscriptions) + len(awaiting) >= self._max_subscriptions:
            raise TooManySubscriptions(
                f"a connection may hold at most {self._max_subscriptions} subscriptions")
        if pattern or request is None:
            self.join(conn, name)
            return True
        policy = self.policies.for_channel(name)
        if request.max_rate is not None:
            self._check_max_rate(conn, name, request.max_rate, policy)
        if self.sources and answer is not None:
            source = self.source_for(name)
            if source is not None:
                return self._ask_source(source, conn, name, request, answer)
        if request.since is not None or request.tail or (answer is not None and not self._broker.live(name)):
            if answer is None:
                raise TypeError("a subscribe with `since` or `tail` is answered later: pass `answer`")
            self.recover(conn, name, request, answer)
            return False
        self.join(conn, name, request.max_rate)
        return True

    @staticmethod
    def _check_max_rate(conn: Connection, name: str, max_rate: float, policy: ChannelPolicy) -> None:
        if policy.max_rate and max_rate > policy.max_rate:
            raise InvalidField(f"max_rate {max_rate:g} is over the cap of {name[:64]!r}, "
                               f"{policy.max_rate:g} a second")
        if conn.fanout_group == TAKEOVER:
            raise InvalidField("max_rate needs frames that stand alone: this connection's "
                               "permessage-deflate keeps context between messages")

    def position(self, name: str) -> StreamPosition | None:
        """A channel's position now (what ``subscribed`` carries); None for a pattern."""
        return None if is_pattern(name) else self._broker_for(name).position(name)

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
            elif type(reply) is Subscribed and reply.position is None:
                reply = msgspec.structs.replace(reply, position=self.position(name))
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

    def join(self, conn: Connection, name: str, max_rate: float | None = None) -> None:
        """Add ``conn`` to the channel or pattern ``name`` (validated) without asking a source."""
        if name in conn.subscriptions:
            return
        if is_pattern(name):
            self._join_pattern(conn, name)
        else:
            channel = self._channel(name)
            channel.add(conn)
            if max_rate is not None:
                self._rate_hold(channel, conn, max_rate)
            self._recheck_routes(conn, name, channel)
        self._count(conn, name)

    def _channel(self, name: str) -> Channel:
        channel = self.channels.get(name)
        if channel is None:
            channel = self.channels[name] = Channel(name)
            self._broker_for(name).subscribe(name)
        return channel

    def _count(self, conn: Connection, name: str) -> None:
        if not conn.subscriptions:
            conn.subscriptions = set()  # idle connections share one empty frozenset
        conn.subscriptions.add(name)
        self.subscription_count += 1
        if self._presence is not None:
            self._presence.add(name)

    def _recheck_routes(self, conn: Connection, name: str, channel: Channel | None) -> None:
        # Subscribed to the channel itself (or not any more): its pattern
        # subscriptions stop (or start again) delivering it.
        routes = self._routes.get(name)
        if routes is not None:
            routes.recheck(conn, channel)

    def _rate_hold(self, channel: Channel, conn: Connection, max_rate: float) -> None:
        policy = self.policies.for_channel(channel.name)
        conn.batch.hold(channel.name, policy.slow_consumer, policy.max_queue_bytes, 1.0 / max_rate,
                        self._notice(channel))
        if channel.rate_held is None:
            channel.rate_held = set()
        channel.rate_held.add(conn.client_id)

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
        if self._presence is not None:
            self._presence.add(name)
        if is_pattern(name):
            self._leave_pattern(conn, name)
            return
        channel = self.channels[name]
        recovery = channel.remove(conn)
        if recovery is not None and recovery.task is not asyncio.current_task():
            recovery.task.cancel()
        conn.batch.unhold(name)
        if not channel.members:
            del self.channels[name]
            self._broker_for(name).unsubscribe(name)
            if self.sources:
                source = self.source_for(name)
                if source is not None:
                    source.vacated(name)
            channel = None
        self._recheck_routes(conn, name, channel)

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
            if self._local is not self._broker:
                self._local.subscribe_pattern(pattern)
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
        if self._local is not self._broker:
            self._local.unsubscribe_pattern(pattern)
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
        # No pattern covers a reserved name ($sys:metrics): those are read
        # with a permission, never through ``**`` (protocol.patterns).
        sources = self._index.match(routes.name) if not is_reserved(routes.name) else []
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

    def publish(self, channel: str, data: PublicationData, *, binary: bool = False,
                origin: str | None = None, key: str | None = None) -> Published:
        """Publish through the broker; ``origin`` (a client id) is excluded from
        delivery. The position comes at once, or as a future with a shared
        broker (``Broker.publish``).

        Raises:
            InvalidChannel, Forbidden, Unavailable
        """
        self.check_channel(channel)
        return self.publish_checked(channel, data, binary=binary, origin=origin, key=key)

    def publish_checked(self, channel: str, data: PublicationData, *, binary: bool = False,
                        origin: str | None = None, key: str | None = None) -> Published:
        """``publish`` for a name the caller already passed through ``check_channel``
        (a client's publish is checked before its permission is)."""
        self._check_writable(channel)
        result = self._broker.publish(channel, data, binary=binary, origin=origin, key=key,
                                      history=self.policies.for_channel(channel).history)
        self._metrics.publications_total += 1
        return result

    def publish_once(self, channel: str, data: PublicationData, idempotency_key: str, *, binary: bool = False,
                     origin: str | None = None, key: str | None = None) -> PublishedOnce:
        """``publish_checked`` with an idempotency key: a retry of a publish
        the broker accepted lately is not published again; returns the
        position and whether it was such a retry (``Broker.publish_once``),
        at once or as a future."""
        self._check_writable(channel)
        result = self._broker.publish_once(channel, data, idempotency_key, binary=binary, origin=origin, key=key,
                                           history=self.policies.for_channel(channel).history)
        if type(result) is tuple:
            self._count_once(result)
        else:
            result.add_done_callback(self._counted_once)
        return result

    def _count_once(self, result: tuple[StreamPosition, bool]) -> None:
        if result[1]:
            self._metrics.duplicate_publishes_total += 1
        else:
            self._metrics.publications_total += 1

    def _counted_once(self, done: asyncio.Future[tuple[StreamPosition, bool]]) -> None:
        if not done.cancelled() and done.exception() is None:
            self._count_once(done.result())

    def _check_writable(self, channel: str) -> None:
        # On every publish, and there is always a source ($sys:metrics): the
        # loop of source_for, without its call.
        for source in self.sources:
            if source.owns(channel):
                raise Forbidden(f"{channel[:64]!r} is written by the gateway only")

    async def history(self, channel: str, since: StreamPosition | None = None, limit: int = 100,
                      reverse: bool = False) -> HistoryPage:
        """``channel``'s kept publications after ``since`` (before it with
        ``reverse``); a ``since`` of another epoch reads from the oldest (or newest)."""
        broker = self._broker_for(channel)
        page = await broker.history(channel, since=since.offset if since is not None else None, limit=limit,
                                    reverse=reverse)
        if since is not None and since.epoch != page.position.epoch:
            page = await broker.history(channel, limit=limit, reverse=reverse)
        return page

    # -- SourceHost -------------------------------------------------------------

    def emit(self, channel: str, data: bytes) -> Published:
        """Publish a source's JSON ``data`` on ``channel``: its position, or a
        future of it when the source shares the channel with the cluster."""
        self._metrics.publications_total += 1
        return self._broker_for(channel).publish(channel, data, history=self.policies.for_channel(channel).history)

    def send_history(self, conn: Connection, channel: str, entries: Iterable[tuple[int, bytes]]) -> None:
        """Send ``(offset, JSON data)`` entries to ``conn`` alone, as ``message``s."""
        encode = self._json.encode_message
        sent = size = 0
        for offset, data in entries:
            message = encode(channel, offset, data)
            conn.push(OP_TEXT, message)
            sent += 1
            size += len(message)
        self._metrics.deliveries_total += sent
        self._metrics.delivered_bytes_total += size

    def viewers(self, channel: str) -> int:
        found = self.channels.get(channel)
        return len(found.members) if found is not None else 0

    def take_presence(self) -> dict[str, int]:
        """Channels whose subscriber count changed since the last call, and their counts now."""
        changed, self._presence = self._presence or set(), set()
        return {name: self.viewers(name) for name in changed if not is_pattern(name)}

    def allowed(self, conn: Connection, channel: str) -> bool:
        principal = conn.principal
        return principal is not None and principal.can_subscribe(channel)

    def handle_gap(self, channel: str, first: int, last: int) -> None:
        """The broker lost ``first``-``last``: each live subscriber is told
        (``lagged``); one still recovering finds the hole itself."""
        found = self.channels.get(channel)
        if found is not None:
            for client_id, conn in found.members.items():
                if not found.recovering or client_id not in found.recovering:
                    self._send_lagged(conn, channel, first, last, OP_TEXT)

    def handle_new_epoch(self, channel: str, position: StreamPosition) -> None:
        """The channel's stream started again: each subscriber gets a
        ``subscribed`` that says so, as a resume across epochs does, and
        offsets from 1 follow."""
        found = self.channels.get(channel)
        if found is not None:
            notice = self._json.encode(Subscribed(channel, None, position, False, EPOCH_CHANGED))
            for conn in found.members.values():
                conn.push(OP_TEXT, notice)

    def handle_publication(self, pub: Publication, origin: str | None) -> None:
        channel = self.channels.get(pub.channel)
        by_pattern = self._pattern_targets(pub.channel) if self.patterns else None
        if channel is not None and channel.recovering is not None:
            for recovery in channel.recovering.values():
                recovery.hold(pub)
        if channel is None and by_pattern is None:
            return
        frame = self._message_frame(pub)
        opcode = OP_BINARY if pub.binary else OP_TEXT
        payload = self._frame_payload(frame)
        policy = self.policies.for_channel(pub.channel)
        delivered = 0
        if channel is not None:
            delivered += self._deliver(channel, opcode, payload, origin, pub, policy)
        if by_pattern is not None:
            delivered += self._deliver(by_pattern, opcode, payload, origin, pub, policy)
        self._metrics.deliveries_total += delivered

    def _message_frame(self, pub: Publication) -> bytes:
        """``pub``'s ``message``, framed: built once, with its data copied
        once (straight from the received message, when a client published
        it), and kept on the publication for whoever recovers it from history."""
        frame = pub.frame
        if frame is None:
            if pub.binary:
                opcode, (head, tail) = OP_BINARY, self._tlv.message_ends(pub.channel, pub.offset, len(pub.data))
            else:
                opcode, (head, tail) = OP_TEXT, self._json.message_ends(pub.channel, pub.offset)
            frame = pub.frame = self._build_message_frame(opcode, head, pub.data, tail)
        return frame

    def _deliver(self, channel: Channel, opcode: int, payload: memoryview, origin: str | None,
                 pub: Publication, policy: ChannelPolicy) -> int:
        sender = channel.members.get(origin) if origin is not None else None
        exclude = sender.batch if sender is not None else None
        held = policy.slow_consumer != DISCONNECT or channel.rate_held
        delivered = size = 0
        for window_bits, batches in channel.groups.items():
            if window_bits is None or len(payload) < self._threshold:
                frame = pub.frame
            else:
                # Encode once, compress once per window size, frame once.
                frame = self._build_frame(opcode, self._compressors[window_bits].compress(payload), True)
            if held:
                reached = self._fanout_held(batches, frame, exclude, channel.name, pub.offset, pub.key,
                                            policy.slow_consumer, policy.max_queue_bytes, self._notice(channel))
            else:
                reached = self._fanout(batches, frame, exclude)
            delivered += reached
            size += reached * len(frame)  # counted per group, not per subscriber
        for conn in channel.takeover:
            if conn is not sender and conn.push(opcode, payload):
                delivered += 1
                size += len(payload)  # before the connection compresses it
        self._metrics.delivered_bytes_total += size
        return delivered

    # -- lagged ------------------------------------------------------------------

    def _notice(self, channel: Channel) -> Callable[[int, int, int, int], bytes]:
        if channel.notice is None:
            channel.notice = functools.partial(self._lagged, channel.name)
        return channel.notice

    def _lagged(self, name: str, dropped: int, first: int, last: int, opcode: int) -> bytes:
        """The payload of a ``lagged`` notice, in the encoding ``opcode`` says."""
        self._metrics.dropped_total += dropped
        self._metrics.lagged_total += 1
        codec = self._tlv if opcode == OP_BINARY else self._json
        return codec.encode(Lagged(name, dropped, first, last))

    # -- recovery ------------------------------------------------------------------

    def recover(self, conn: Connection, name: str, request: Subscribe, answer: Callable[[Reply], None]) -> None:
        """Subscribe ``conn`` to the channel ``name`` from ``request.since`` or
        with its last ``request.tail`` publications (``recovery.py``); the
        answer and the publications follow through a task.

        Raises:
            InvalidField: ``since.offset`` past the channel's last offset, or
                ``tail`` on a channel that keeps fewer publications.
        """
        policy = self.policies.for_channel(name)
        # Not live yet on a shared broker: the task waits for the position, then checks ``since``.
        broker = self._broker_for(name)
        position = broker.position(name) if broker.live(name) else None
        since = request.since
        if position is not None:
            self._check_since(name, request, position)
        if since is None and request.tail:
            if policy.history is None:
                raise InvalidField(f"`tail` needs a channel that keeps history: {name[:64]!r} keeps none "
                                   f"(history_size, docs/delivery.md)", id=request.id)
            if request.tail > policy.history.size:
                raise InvalidField(f"tail must be at most {policy.history.size}: what {name[:64]!r} keeps "
                                   f"(history_size)", id=request.id)
        channel = self._channel(name)
        recovery = Recovery(self._recovery_held_bytes)
        channel.add(conn, recovery)
        self._recheck_routes(conn, name, channel)
        self._count(conn, name)
        recovery.task = asyncio.ensure_future(
            self._recover(channel, conn, recovery, request, answer, position, policy, broker))

    @staticmethod
    def _check_since(name: str, request: Subscribe, position: StreamPosition) -> None:
        since = request.since
        if since is not None and since.epoch == position.epoch and since.offset > position.offset:
            raise InvalidField(f"since.offset {since.offset} is past the last offset of {name[:64]!r}, "
                               f"{position.offset}", id=request.id)

    async def _recover(self, channel: Channel, conn: Connection, recovery: Recovery, request: Subscribe,
                       answer: Callable[[Reply], None], position: StreamPosition | None,
                       policy: ChannelPolicy, broker: Broker) -> None:
        name = channel.name
        since = request.since
        try:
            if position is None:
                await broker.sync(name)
                position = broker.position(name)
                self._check_since(name, request, position)
            if since is None and not request.tail:
                # A plain subscribe that waited for the channel to be live here.
                answer(Subscribed(name, request.id, position))
                self._send_recovered(conn, name, list(recovery.held), position.offset + 1)
                channel.go_live(conn)
                if request.max_rate is not None:
                    self._rate_hold(channel, conn, request.max_rate)
                return
            if since is None:
                after = max(0, position.offset - request.tail)
                page = await broker.history(name, since=after, limit=RECOVERY_PAGE)
                answer(Subscribed(name, request.id, position))
            else:
                same_epoch = since.epoch == position.epoch
                page = await broker.history(name, since=since.offset if same_epoch else None,
                                            limit=RECOVERY_PAGE)
                decision = plan(since, position, page.first_offset, policy.history is not None)
                self._metrics.recoveries_total[decision.reason or "recovered"] += 1
                answer(Subscribed(name, request.id, position, decision.recovered, decision.reason,
                                  decision.missed))
                after = decision.after
            # From the oldest kept: a gap ``plan`` reported is not reported again.
            next_offset = max(after + 1, page.first_offset)
            while True:
                if page.first_offset > next_offset:  # trimmed while the recovery read
                    self._send_lagged(conn, name, next_offset, page.first_offset - 1, OP_TEXT)
                    next_offset = page.first_offset
                next_offset = self._send_recovered(conn, name, page.publications, next_offset)
                if recovery.covers(next_offset) or (not page.more and next_offset > page.position.offset):
                    break
                await conn.batch.drained()
                if conn.batch.closed:
                    return
                page = await broker.history(name, since=next_offset - 1, limit=RECOVERY_PAGE)
            # Live publications held meanwhile, after the last one history gave; then live.
            self._send_recovered(conn, name, list(recovery.held), next_offset)
            channel.go_live(conn)
            if request.max_rate is not None:
                self._rate_hold(channel, conn, request.max_rate)
        except asyncio.CancelledError:
            raise  # unsubscribed or gone: Hub.unsubscribe has cleaned up
        except WirehubError as exc:  # the broker is unavailable, or ``since`` is past its end
            self._metrics.errors_total[exc.code] += 1
            answer(Error(exc.code, exc.message, request.id))
            if name in conn.subscriptions:
                self.unsubscribe(conn, name)
        except Exception:
            logger.exception("recovery of %r failed", name, extra={"client_id": conn.client_id})
            conn.close(1011, "internal error")

    def _send_recovered(self, conn: Connection, name: str, pubs: list[Publication], next_offset: int) -> int:
        """Send ``pubs`` from ``next_offset`` on (a ``lagged`` notice for a
        hole); return the offset that follows the last one sent."""
        frames: list[bytes] = []
        plain = conn.fanout_group is None
        sent = size = 0
        for pub in pubs:
            if pub.offset < next_offset:
                continue
            if pub.offset > next_offset:
                conn.batch.push_many(frames)
                frames = []
                self._send_lagged(conn, name, next_offset, pub.offset - 1, OP_BINARY if pub.binary else OP_TEXT)
            frame = self._message_frame(pub)
            if plain:
                frames.append(frame)
            else:  # compressed by the connection
                conn.push(OP_BINARY if pub.binary else OP_TEXT, self._frame_payload(frame))
            next_offset = pub.offset + 1
            sent += 1
            size += len(frame)
        if frames:
            conn.batch.push_many(frames)
        self._metrics.deliveries_total += sent
        self._metrics.delivered_bytes_total += size
        return next_offset

    def _send_lagged(self, conn: Connection, name: str, first: int, last: int, opcode: int) -> None:
        conn.push(opcode, self._lagged(name, last - first + 1, first, last, opcode))
