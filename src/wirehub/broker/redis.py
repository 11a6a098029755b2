"""The shared broker: many gateways as one, on Redis (docs/scaling.md).

Each channel ``c`` has two Redis keys, both with the hash tag ``{c}`` so
that a Redis Cluster keeps them on one shard: ``wh:{c}:m`` (a hash: the
last ``offset``, the ``epoch``, the history ``ttl``) and ``wh:{c}:s`` (a
stream: the kept publications, entry id ``<offset>-1``); and a pub/sub
channel, ``wh:<db>:{c}`` (pub/sub ignores database numbers).

**Publish** is one Lua script (``PUBLISH_SCRIPT``): assign the next offset,
append to the stream under the channel's limits, ``PUBLISH`` the
publication with its offset and epoch, atomically. A gateway's publishes
are packed as they come (``_pack_publish``) and written together on a
connection of their own (``connections.PipelineConnection``), one write
per turn of the event loop, without waiting for the replies to the write
before; ``publish`` answers a future that resolves once Redis has run the
script (``published`` is sent then, never before).

**Delivery.** A node subscribes to a channel's pub/sub channel when it gains
the channel's first local subscriber, so a publication crosses Redis once
per node; the hub fans it out. The node tracks each channel's last offset:
an offset that jumps is a gap (a pub/sub message lost, a reconnect) and is
filled from the stream, in order, before anything newer is delivered; what
the stream no longer has is reported to subscribers (``handle_gap``, a
``lagged`` notice), never skipped silently. An epoch that changes (Redis
lost the stream) is reported too (``handle_new_epoch``).

**A channel is live** on a node once its subscription is confirmed and its
position read after that (``ENSURE_SCRIPT``): from then on every offset
after that position reaches the node. Until then the hub answers its
subscribes later (``live`` and ``sync``).

**Redis down**: publishes fail at once with ``Unavailable``, subscribers
stay connected, ``health`` names the reason; a supervisor reconnects with
backoff, subscribes again and fills every channel's gap from its stream.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import msgspec

from ..protocol.errors import Unavailable
from ..protocol.messages import Publication, PublicationData, StreamPosition
from .base import BrokerEventHandler, HistoryOptions, HistoryPage
from .leases import Leases
from .nodes import NodeRegistry, text

try:
    import redis.asyncio as aioredis
    from redis.exceptions import ConnectionError, RedisError

    from .connections import PipelineConnection, SubscriptionConnection, pack  # hiredis
except ImportError:  # pragma: no cover - the extra is missing; ``check_url`` says so
    aioredis = None

logger = logging.getLogger("wirehub.broker.redis")

# A new stream's epoch: Redis's clock in microseconds, in hex. It differs
# from every epoch the channel had before, since a stream is only ever
# lost before it starts again (and two channels sharing one is harmless).
NEW_EPOCH = """
local function new_epoch()
  local now = redis.call('TIME')
  return string.format('%x%05x', tonumber(now[1]), tonumber(now[2]))
end
"""

# KEYS: meta hash, stream[, idempotency key]
# ARGV: data, header, history size, ttl ms, pub/sub channel, now ms, idle-channel ttl ms,
#       idempotency window ms, history max bytes
# A kept publication counts 2 × its data + 200 bytes against max bytes, as
# in the memory broker (``memory.entry_bytes``).
PUBLISH_SCRIPT = NEW_EPOCH + """
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if #KEYS == 3 and epoch then
  local seen = redis.call('GET', KEYS[3])
  if seen then
    local sep = string.find(seen, ':', 1, true)
    if string.sub(seen, sep + 1) == epoch then
      return {tonumber(string.sub(seen, 1, sep - 1)), epoch, 1}
    end
  end
end
if not epoch then
  epoch = new_epoch()
  redis.call('DEL', KEYS[2])
  redis.call('HDEL', KEYS[1], 'bytes')
  redis.call('HSET', KEYS[1], 'epoch', epoch)
end
local offset = redis.call('HINCRBY', KEYS[1], 'offset', 1)
local size = tonumber(ARGV[3])
if size > 0 then
  local ttl = tonumber(ARGV[4])
  local max_bytes = tonumber(ARGV[9])
  local horizon = tonumber(ARGV[6]) - ttl
  redis.call('HSET', KEYS[1], 'ttl', ttl)
  if max_bytes > 0 then
    -- Trimmed here, oldest first, by count, bytes and age together, so
    -- that 'bytes' stays the sum of what the stream keeps.
    redis.call('XADD', KEYS[2], offset .. '-1', 'd', ARGV[1], 'h', ARGV[2], 't', ARGV[6])
    local bytes = redis.call('HINCRBY', KEYS[1], 'bytes', 2 * #ARGV[1] + 200)
    local kept = redis.call('XLEN', KEYS[2])
    while kept > 0 do
      local oldest = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)[1]
      if kept <= size and bytes <= max_bytes and (ttl == 0 or tonumber(oldest[2][6]) >= horizon) then break end
      redis.call('XDEL', KEYS[2], oldest[1])
      bytes = redis.call('HINCRBY', KEYS[1], 'bytes', -(2 * #oldest[2][2] + 200))
      kept = kept - 1
    end
  else
    redis.call('XADD', KEYS[2], 'MAXLEN', size, offset .. '-1', 'd', ARGV[1], 'h', ARGV[2], 't', ARGV[6])
    if ttl > 0 then
      -- Expired entries, up to 64 a publish (history reads skip any left).
      local oldest = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 64)
      local keep = nil
      for _, entry in ipairs(oldest) do
        if tonumber(entry[2][6]) >= horizon then keep = entry[1]; break end
      end
      if not keep then keep = (tonumber(string.match(oldest[#oldest][1], '^%d+')) + 1) .. '-0' end
      redis.call('XTRIM', KEYS[2], 'MINID', keep)
    end
  end
  if ttl > 0 then redis.call('PEXPIRE', KEYS[2], ttl) end
end
redis.call('PEXPIRE', KEYS[1], ARGV[7])
redis.call('PUBLISH', ARGV[5], offset .. ':' .. epoch .. ':' .. #ARGV[2] .. ':' .. ARGV[2] .. ARGV[1])
if #KEYS == 3 then
  redis.call('SET', KEYS[3], offset .. ':' .. epoch, 'PX', ARGV[8])
end
return {offset, epoch, 0}
"""

# The channel's position, creating its epoch if it has none. KEYS: meta; ARGV: idle ttl ms.
ENSURE_SCRIPT = NEW_EPOCH + """
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  epoch = new_epoch()
  redis.call('HSET', KEYS[1], 'epoch', epoch)
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
end
return {tonumber(redis.call('HGET', KEYS[1], 'offset') or '0'), epoch}
"""

# A node forgets nothing, but Redis forgets a channel nobody published on
# for this long (its offsets then restart at 1 under a new epoch, as the
# memory broker's idle channels do).
IDLE_CHANNEL_TTL_S = 7 * 24 * 3600
IDLE_CHANNEL_TTL_MS = b"%d" % (IDLE_CHANNEL_TTL_S * 1000)
# Which shard of a sharded cluster a Redis is (``RedisBroker._misplaced``).
SHARD_KEY = "wh:shard"
# A command Redis has not answered by then fails (``unavailable``) rather than hangs.
COMMAND_TIMEOUT_S = 5.0
# Connections to Redis: the subscription's, the publisher's, the heartbeat's,
# and the rest shared by history reads and catch-ups (``CATCH_UPS`` at once).
MAX_CONNECTIONS = 16
CATCH_UPS = 8
# Entries a gap fill or a history page reads at a time.
FILL_PAGE = 1000


class _Header(msgspec.Struct, array_like=True, gc=False):
    """What travels with a publication's data: in the stream entry and the pub/sub message."""

    binary: bool
    key: str | None
    node: str
    origin: str | None
    time: float


_encode_header = msgspec.msgpack.Encoder().encode
_decode_header = msgspec.msgpack.Decoder(_Header).decode


def check_url(url: str) -> str:
    """``url`` if it names a Redis server (``redis://``, ``rediss://``,
    ``unix://``); a message for people otherwise.

    Raises:
        ValueError
    """
    if aioredis is None:
        raise ValueError("a Redis broker needs redis-py: pip install 'wirehub[redis]'")
    scheme = urlsplit(url).scheme
    if scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"broker URL {url!r}: expected redis://HOST:PORT/DB, rediss://... or unix://PATH")
    try:
        aioredis.connection.parse_url(url)
    except ValueError as exc:
        raise ValueError(f"broker URL {url!r}: {exc}") from None
    return url


def check_urls(spec: str) -> list[str]:
    """The Redis URLs in ``spec``: one, or several separated by commas (shards,
    ``shards.py``), each checked by ``check_url`` and none twice.

    Raises:
        ValueError
    """
    urls = [check_url(part.strip()) for part in spec.split(",")]
    if len(set(urls)) != len(urls):
        raise ValueError(f"broker URLs {redacted(spec)!r}: a Redis server is named twice")
    return urls


def redacted(url: str) -> str:
    """``url`` (or a comma-separated list of them) without passwords, for logs and messages."""
    if "," in url:
        return ",".join(redacted(part.strip()) for part in url.split(","))
    parts = urlsplit(url)
    if parts.hostname is None:
        return f"{parts.scheme}://{parts.path}"
    return f"{parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}{parts.path}"


def _sha1(script: str) -> bytes:
    return hashlib.sha1(script.encode()).hexdigest().encode()


# The arguments after the data, in ``PUBLISH_SCRIPT``'s order, as RESP bulk strings.
_TAIL = b"\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n"


def _pack_publish(sha: bytes, channel: str, topic: bytes, data: memoryview, header: bytes, size: int, ttl_ms: int,
                  max_bytes: int, now_ms: int, idempotency_window_ms: int, idempotency_key: str | None) -> bytes:
    """``EVALSHA <PUBLISH_SCRIPT> ...`` in RESP, ready to write: a few
    ``%``-formats and one join rather than redis-py's per-argument packing
    (a third of a publish's cost on the gateway, measured with py-spy), or a
    list per argument (twice this one's 1.4 µs)."""
    name = channel.encode()
    length = len(name) + 7  # wh:{<name>}:m
    if idempotency_key is None:
        head = b"*14\r\n$7\r\nEVALSHA\r\n$40\r\n%s\r\n$1\r\n2\r\n$%d\r\nwh:{%s}:m\r\n$%d\r\nwh:{%s}:s\r\n$%d\r\n" \
            % (sha, length, name, length, name, len(data))
    else:
        key = idempotency_key.encode()
        head = (b"*15\r\n$7\r\nEVALSHA\r\n$40\r\n%s\r\n$1\r\n3\r\n$%d\r\nwh:{%s}:m\r\n$%d\r\nwh:{%s}:s\r\n"
                b"$%d\r\nwh:{%s}:i:%s\r\n$%d\r\n"
                % (sha, length, name, length, name, length + 1 + len(key), name, key, len(data)))
    size_arg, ttl_arg, now_arg = b"%d" % size, b"%d" % ttl_ms, b"%d" % now_ms
    window_arg, max_bytes_arg = b"%d" % idempotency_window_ms, b"%d" % max_bytes
    return b"".join((head, data, _TAIL % (
        len(header), header, len(size_arg), size_arg, len(ttl_arg), ttl_arg, len(topic), topic,
        len(now_arg), now_arg, len(IDLE_CHANNEL_TTL_MS), IDLE_CHANNEL_TTL_MS, len(window_arg), window_arg,
        len(max_bytes_arg), max_bytes_arg)))


def _keys(channel: str) -> tuple[str, str]:
    return f"wh:{{{channel}}}:m", f"wh:{{{channel}}}:s"


class _Sub:
    """One channel this node subscribes to, and how far its delivery has got."""

    __slots__ = ("channel", "confirmed", "position", "ready", "buffer", "buffered_bytes", "catching_up",
                 "resync")

    def __init__(self, channel: str, loop: asyncio.AbstractEventLoop) -> None:
        self.channel = channel
        self.confirmed = False
        # The last offset delivered here and its epoch; None until first synced.
        self.position: StreamPosition | None = None
        self.ready: asyncio.Future[None] = loop.create_future()
        # Publications that arrived while a sync or a gap fill ran, in arrival order.
        self.buffer: collections.deque[Publication] = collections.deque()
        self.buffered_bytes = 0
        self.catching_up = False
        # The buffer overflowed (or Redis came back): read the position again after the fill.
        self.resync = False


class RedisBroker:
    """Offsets, history, delivery and subscriber counts shared by every gateway on one Redis.

    Args:
        url: ``redis://[:password@]host:port/db``, ``rediss://`` or ``unix://``.
        clock: wall-clock seconds, for ``history_ttl_s`` (shared by nodes, so not monotonic).
        idempotency_window_s: how long a publish's ``idempotency_key`` is remembered (in Redis).
        max_pending_publishes: publishes waiting for Redis at once; past it a
            publish fails with ``Unavailable`` instead of queueing without bound.
        max_buffered_bytes: data held per channel while a gap is filled; past
            it the held publications are dropped and read from the stream instead.
        reconnect_max_s: the longest pause between two reconnection attempts.
        node_id: this gateway's id in the cluster (shards of one gateway share it).
        shard: this Redis's place in a sharded cluster's list (``shards.py``);
            None for a gateway on one Redis. The cluster's heartbeats,
            subscriber counts and leases are kept on the first (or only) one.
    """

    shares_presence = True  # the hub reports count changes (``take_presence``)

    def __init__(self, url: str, *, clock: Callable[[], float] = time.time, idempotency_window_s: float = 120.0,
                 max_pending_publishes: int = 10_000, max_buffered_bytes: int = 4 << 20,
                 reconnect_max_s: float = 2.0, node_id: str | None = None, shard: int | None = None) -> None:
        self.url = check_url(url)
        self.node_id = node_id or secrets.token_hex(6)
        self._shard = shard
        self._clock = clock
        self._idempotency_window_ms = max(1, int(idempotency_window_s * 1000))
        self._max_pending = max_pending_publishes
        self._max_buffered = max_buffered_bytes
        self._reconnect_max_s = reconnect_max_s
        self._handler: BrokerEventHandler | None = None
        self._subs: dict[str, _Sub] = {}
        self._patterns: dict[str, str] = {}  # wirehub pattern -> glob
        self._globs: collections.Counter[str] = collections.Counter()
        # Publishes to write at the end of this loop iteration: (EVALSHA, (answer, idempotent)).
        self._queue: list[tuple[bytes, tuple[asyncio.Future[Any], bool]]] = []
        self._flush_handle: asyncio.Handle | None = None
        self._publisher: PipelineConnection | None = None
        self._overdue_timer: asyncio.TimerHandle | None = None
        self._publish_sha = _sha1(PUBLISH_SCRIPT)
        self._loop: asyncio.AbstractEventLoop | None = None
        # Pub/sub channels are not per database: the number keeps two
        # deployments on one Redis (db 0 and db 1) from hearing each other.
        self._topic_prefix = f"wh:{aioredis.connection.parse_url(url).get('db', 0)}:{{"
        self._redis: Any = None
        self._pubsub: SubscriptionConnection | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._down: str | None = "not started"
        self._down_since = 0.0
        self._closing = False
        self._ensure_script: Any = None
        # After a reconnection every channel catches up: a few at a time, not
        # one connection each.
        self._catch_up_slots = asyncio.Semaphore(CATCH_UPS)
        # This node's figures for the others (the gateway sets it; ``nodes.SHARED``).
        self.node_figures: Callable[[], dict[str, Any]] = dict
        self.registry: NodeRegistry | None = None
        self.leases = Leases(self.node_id)  # jobs one node of the cluster does (``leases.py``)
        # Counters for /metrics (``metric_lines``).
        self.outages_total = 0
        self.resubscribes_total = 0
        self.publish_errors_total = 0
        self.gaps_filled_total = 0
        self.offsets_lost_total = 0
        self.epoch_changes_total = 0

    # -- life cycle ---------------------------------------------------------------

    async def start(self) -> None:
        """Connect, or raise ``Unavailable`` saying why (the CLI exits 2 on it)."""
        # A bounded pool that makes a command wait for a free connection
        # (redis-py's default one fails past 100 at once: "Too many connections").
        # No socket timeout: redis-py would arm an asyncio timeout for every
        # reply it reads; the broker bounds whole exchanges instead.
        pool = aioredis.BlockingConnectionPool.from_url(
            self.url, max_connections=MAX_CONNECTIONS, timeout=COMMAND_TIMEOUT_S, socket_connect_timeout=2.0,
            health_check_interval=0)
        self._redis = aioredis.Redis(connection_pool=pool)
        self._loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(COMMAND_TIMEOUT_S):
                await self._redis.ping()
                misplaced = await self._misplaced()
                if misplaced is None:
                    self._publisher = await self._open_publisher()
        except (RedisError, OSError, TimeoutError) as exc:
            await self._redis.aclose()
            raise Unavailable(f"cannot reach the broker at {redacted(self.url)}: {str(exc) or 'no answer'}") from None
        if misplaced is not None:
            await self._redis.aclose()
            raise Unavailable(misplaced)
        self._ensure_script = self._redis.register_script(ENSURE_SCRIPT)
        self._down = None
        self._tasks = [asyncio.ensure_future(self._supervise())]
        if not self._shard:  # one Redis, or the first shard: the cluster's own figures live here
            self.leases.connect(self._redis)
            self.registry = NodeRegistry(self._redis, self.node_id, figures=self.node_figures,
                                         presence=self._take_presence, clock=self._clock)
            self._tasks.append(asyncio.ensure_future(self.registry.run()))

    async def _misplaced(self) -> str | None:
        """Why this Redis is not where this gateway's list puts it, or None.

        The first gateway to list a Redis as a shard marks its place in the list
        (``SHARD_KEY``). A gateway that lists it elsewhere, or alone when it is
        not the first shard, would place channels otherwise than the others
        and silently miss their publications: it does not start.
        """
        if self._shard is not None:
            await self._redis.set(SHARD_KEY, self._shard, nx=True)
        held = await self._redis.get(SHARD_KEY)
        if held is None or int(held) == (self._shard or 0):
            return None
        if self._shard is None:
            return (f"{redacted(self.url)} is shard {int(held) + 1} of a sharded cluster: give --broker every "
                    f"shard, in the order the other gateways do")
        return (f"{redacted(self.url)} is shard {int(held) + 1} of this cluster, not {self._shard + 1}: "
                f"list the Redis servers in the same order on every gateway")

    async def close(self) -> None:
        self._closing = True
        # The reader first: its connection is closed under it (the read
        # fails), and the loop sees ``_closing``.
        self._drop_pubsub()
        if self.registry is not None:
            self.registry.stop()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for handle in (self._flush_handle, self._overdue_timer):
            if handle is not None:
                handle.cancel()
        self._fail(self._queue, Unavailable("the gateway is stopping"))
        self._queue = []
        if self._publisher is not None:  # what it still waits for is answered ``unavailable``
            self._publisher.abort()
            self._publisher = None
        if self._redis is not None:
            await self._redis.aclose()
        self._handler = None

    def health(self) -> str | None:
        """None when Redis answers; otherwise why not (``/healthz`` answers 503 with it)."""
        if self._down is None:
            return None
        return f"broker {redacted(self.url)} unreachable for {self._clock() - self._down_since:.1f} s: {self._down}"

    def metric_lines(self) -> list[str]:
        return [*render_samples([self.metric_samples()]),
                *(self.registry.metric_lines() if self.registry is not None else ())]

    def metric_samples(self) -> list[tuple[str, str, int]]:
        """This broker's figures for /metrics: (name, Prometheus type, value)."""
        return [("wirehub_broker_up", "gauge", int(self._down is None)),
                ("wirehub_broker_outages_total", "counter", self.outages_total),
                ("wirehub_broker_resubscribes_total", "counter", self.resubscribes_total),
                ("wirehub_broker_publish_errors_total", "counter", self.publish_errors_total),
                ("wirehub_broker_pending_publishes", "gauge", len(self._queue)),
                ("wirehub_broker_gaps_filled_total", "counter", self.gaps_filled_total),
                ("wirehub_broker_offsets_lost_total", "counter", self.offsets_lost_total),
                ("wirehub_broker_epoch_changes_total", "counter", self.epoch_changes_total),
                ("wirehub_broker_channels", "gauge", len(self._subs))]

    async def subscribers(self, channel: str) -> int:
        """Subscribers of ``channel`` on every gateway of the cluster (a beat behind for the others)."""
        local = self._handler.viewers(channel) if self._handler is not None else 0
        if self.registry is None:
            return local
        return await self.registry.subscribers(channel, local)

    def _take_presence(self) -> dict[str, int]:
        return self._handler.take_presence() if self._handler is not None else {}

    # -- subscriptions --------------------------------------------------------------

    def bind(self, handler: BrokerEventHandler) -> None:
        self._handler = handler

    def subscribe(self, channel: str) -> None:
        if channel in self._subs:
            return
        self._subs[channel] = _Sub(channel, asyncio.get_running_loop())
        self._command(b"SUBSCRIBE", self._topic(channel))

    def unsubscribe(self, channel: str) -> None:
        sub = self._subs.pop(channel, None)
        if sub is not None:
            if not sub.ready.done():
                sub.ready.cancel()
            self._command(b"UNSUBSCRIBE", self._topic(channel))

    def subscribe_pattern(self, pattern: str) -> None:
        glob = self._patterns.setdefault(pattern, self._glob(pattern))
        self._globs[glob] += 1
        if self._globs[glob] == 1:
            self._command(b"PSUBSCRIBE", glob)

    def unsubscribe_pattern(self, pattern: str) -> None:
        glob = self._patterns.pop(pattern, None)
        if glob is not None:
            self._globs[glob] -= 1
            if not self._globs[glob]:
                del self._globs[glob]
                self._command(b"PUNSUBSCRIBE", glob)

    def live(self, channel: str) -> bool:
        """Whether every publication of ``channel`` after ``position(channel)`` reaches this node."""
        sub = self._subs.get(channel)
        return sub is not None and sub.position is not None and self._down is None

    async def sync(self, channel: str) -> None:
        """Wait until ``channel`` is live here (``subscribe`` first).

        Raises:
            Unavailable: Redis is down.
        """
        sub = self._subs.get(channel)
        if sub is None:
            raise RuntimeError(f"{channel!r} is not subscribed")
        if self._down is not None:
            raise Unavailable(f"the broker is unavailable: {self._down}")
        await asyncio.shield(sub.ready)

    def position(self, channel: str) -> StreamPosition:
        """The last offset delivered here and its epoch (a live channel's)."""
        sub = self._subs.get(channel)
        if sub is None or sub.position is None:
            raise RuntimeError(f"{channel!r} is not live on this node")
        return sub.position

    # -- publishing ---------------------------------------------------------------

    def publish(self, channel: str, data: PublicationData, *, binary: bool = False, origin: str | None = None,
                key: str | None = None, history: HistoryOptions | None = None) -> asyncio.Future[StreamPosition]:
        return self._enqueue(channel, data, binary, origin, key, history, None)

    def publish_once(self, channel: str, data: PublicationData, idempotency_key: str, *, binary: bool = False,
                     origin: str | None = None, key: str | None = None,
                     history: HistoryOptions | None = None) -> asyncio.Future[tuple[StreamPosition, bool]]:
        return self._enqueue(channel, data, binary, origin, key, history, idempotency_key)

    def _enqueue(self, channel: str, data: PublicationData, binary: bool, origin: str | None, key: str | None,
                 history: HistoryOptions | None, idempotency_key: str | None) -> asyncio.Future[Any]:
        if self._down is not None:
            self.publish_errors_total += 1
            raise Unavailable(f"the broker is unavailable: {self._down}; nothing was published")
        waiting = len(self._queue) + (len(self._publisher.waiting) if self._publisher is not None else 0)
        if waiting >= self._max_pending:
            self.publish_errors_total += 1
            raise Unavailable(f"{waiting} publishes are waiting for the broker; nothing was published")
        now = self._clock()
        header = _encode_header(_Header(binary, key, self.node_id, origin, now))
        size, ttl_ms, max_bytes = (history.size, int(history.ttl_s * 1000), history.max_bytes) \
            if history is not None else (0, 0, 0)
        # The whole EVALSHA, packed now: the data is copied once, into it.
        command = _pack_publish(self._publish_sha, channel, self._topic(channel).encode(), memoryview(data), header,
                                size, ttl_ms, max_bytes, int(now * 1000), self._idempotency_window_ms,
                                idempotency_key)
        future = self._loop.create_future()
        self._queue.append((command, (future, idempotency_key is not None)))
        if self._flush_handle is None:
            self._flush_handle = self._loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        """Write the publishes queued during this loop iteration, in one write,
        without waiting for the replies to the ones before. (Holding a write
        until the previous one's replies are in made larger writes, but cost
        two workers 11 % of their deliveries per CPU-second: bench/redis_broker.py.)"""
        self._flush_handle = None
        batch, self._queue = self._queue, []
        publisher = self._publisher
        try:
            if publisher is None:
                raise ConnectionError("not connected")
            publisher.send([command for command, _ in batch], [token for _, token in batch],
                           self._loop.time() + COMMAND_TIMEOUT_S)
        except ConnectionError as exc:
            self._fail(batch, exc)
            self._lost(exc)
            return
        if self._overdue_timer is None:
            self._overdue_timer = self._loop.call_at(publisher.due, self._check_overdue)

    def _answer(self, token: tuple[asyncio.Future[Any], bool], reply: Any) -> None:
        """Redis's reply to one publish (``PipelineConnection.on_reply``)."""
        future, once = token
        if future.done():
            return
        if type(reply) is list:
            position = StreamPosition(reply[0], reply[1].decode())
            future.set_result((position, bool(reply[2])) if once else position)
            return
        self.publish_errors_total += 1
        if isinstance(reply, ConnectionError):
            message = (f"the broker connection failed: {reply}; the publish may or may not have been taken "
                       f"(retry with an idempotency_key)")
        elif str(reply).startswith("NOSCRIPT"):
            # Loaded on every connection: someone ran SCRIPT FLUSH. A new
            # connection loads it again (the publishes after this one fail too).
            message = "the broker lost wirehub's publish script (SCRIPT FLUSH?); nothing was published"
            if self._publisher is not None:
                self._publisher.abort()
        else:
            message = f"the broker refused the publish: {reply}"
        future.set_exception(Unavailable(message))

    def _check_overdue(self) -> None:
        """Give up on a publish connection whose oldest reply is overdue: a
        broker that stopped answering fails publishes, it does not hang them."""
        self._overdue_timer = None
        publisher = self._publisher
        if publisher is None or publisher.due is None:
            return
        if publisher.due > self._loop.time():
            self._overdue_timer = self._loop.call_at(publisher.due, self._check_overdue)
            return
        publisher.abort()  # its waiting publishes are answered ``unavailable``; ``_publisher_lost`` follows

    async def _open_publisher(self) -> PipelineConnection:
        """The publishes' connection, with the publish script loaded on it.

        Raises:
            RedisError, OSError, TimeoutError
        """
        connection = await PipelineConnection.open(self.url, COMMAND_TIMEOUT_S, self._answer, self._publisher_lost)
        try:
            async with asyncio.timeout(COMMAND_TIMEOUT_S):
                sha = await connection.request(pack(b"SCRIPT", b"LOAD", PUBLISH_SCRIPT.encode()))
        except BaseException:
            connection.abort()
            raise
        if sha != self._publish_sha:
            connection.abort()
            raise ConnectionError(f"the broker did not load the publish script: {sha!r}")
        return connection

    def _publisher_lost(self, exc: Exception) -> None:
        if self._publisher is not None and self._publisher.closed:
            self._publisher = None
            self._lost(exc)  # the supervisor opens a new one once Redis answers

    def _fail(self, batch: list[tuple[bytes, tuple[asyncio.Future[Any], bool]]], exc: BaseException) -> None:
        for _, (future, _) in batch:
            if not future.done():
                self.publish_errors_total += 1
                future.set_exception(exc if isinstance(exc, Unavailable) else Unavailable(
                    f"the broker connection failed: {exc}; the publish may or may not have been taken "
                    f"(retry with an idempotency_key)"))

    # -- receiving ----------------------------------------------------------------

    async def _supervise(self) -> None:
        """Keep a pub/sub connection, and after each outage make every channel whole again."""
        delay = 0.05
        while not self._closing:
            try:
                await self._connect_pubsub()
            except (RedisError, OSError) as exc:
                self._lost(exc)  # Redis itself does not answer
            else:
                if self._closing:
                    # ``close`` ran meanwhile, and its cancellation did not reach
                    # here: redis-py's ping can absorb one and return.
                    break
                delay = 0.05
                try:
                    await self._pubsub.wait_closed()
                except (RedisError, OSError) as exc:
                    if self._closing:
                        break
                    # The pub/sub connection alone failed (CLIENT KILL, a proxy):
                    # publishes go on; subscribe again and refill at once.
                    self.resubscribes_total += 1
                    logger.info("broker subscription connection lost (%s): subscribing again", exc)
                except Exception:  # a bug must not leave the node deaf: log, count, start again
                    logger.exception("broker subscriber failed")
                    self.resubscribes_total += 1
                self._unconfirm()
            self._drop_pubsub()
            await asyncio.sleep(delay)
            delay = min(self._reconnect_max_s, delay * 2)
        self._drop_pubsub()

    def _lost(self, exc: BaseException) -> None:
        if self._down is None and not self._closing:
            self._down = str(exc) or type(exc).__name__
            self._down_since = self._clock()
            self.outages_total += 1
            logger.warning("broker unreachable: %s; publishes fail with 'unavailable' until it is back",
                           self._down, extra={"broker": redacted(self.url)})
            if self._pubsub is not None:  # the supervisor reconnects, which proves Redis is back
                self._pubsub.close()
        self._unconfirm()

    def _unconfirm(self) -> None:
        """Every subscription must be confirmed again before its channel is refilled."""
        for sub in self._subs.values():
            sub.confirmed = False

    async def _connect_pubsub(self) -> None:
        """Open the subscription connection and subscribe everything again."""
        async with asyncio.timeout(COMMAND_TIMEOUT_S):  # a Redis that accepts but does not answer
            await self._redis.ping()
        self._pubsub = await SubscriptionConnection.open(self.url, self._on_push, COMMAND_TIMEOUT_S)
        self._pubsub.send(b"SUBSCRIBE", [self._topic(channel) for channel in self._subs])
        self._pubsub.send(b"PSUBSCRIBE", list(self._globs))
        # Up again only once subscribed again: a publication made after
        # ``/healthz`` says so reaches this node's subscribers.
        async with asyncio.timeout(COMMAND_TIMEOUT_S):
            await self._pubsub.barrier()
        # Last, with no wait between it and being up: the publishes'
        # connection may have ended while this one was made.
        if self._closing:
            return
        if self._publisher is None or self._publisher.closed:
            self._publisher = await self._open_publisher()
        if self._down is not None:
            logger.warning("broker reachable again after %.1f s", self._clock() - self._down_since,
                           extra={"broker": redacted(self.url)})
            self._down = None

    def _drop_pubsub(self) -> None:
        connection, self._pubsub = self._pubsub, None
        if connection is not None:
            connection.close()

    def _topic(self, channel: str) -> str:
        """``channel``'s pub/sub channel."""
        return f"{self._topic_prefix}{channel}}}"

    def _glob(self, pattern: str) -> str:
        """The pub/sub glob that covers a wirehub pattern: every wildcard becomes
        ``*``, which covers at least what the pattern does (the hub matches exactly)."""
        return f"{self._topic_prefix}{pattern.replace('**', '*')}}}"

    def _command(self, verb: bytes, topic: str) -> None:
        if self._pubsub is not None:  # otherwise the next connection subscribes what is current
            self._pubsub.send(verb, [topic])

    def _on_push(self, push: list[Any]) -> None:
        kind = push[0]
        if kind == b"message":
            self._on_message(push[1], push[2], False)
        elif kind == b"pmessage":
            self._on_message(push[2], push[3], True)
        elif kind == b"subscribe":
            self._on_confirmed(push[1].decode())

    def _on_confirmed(self, topic: str) -> None:
        sub = self._subs.get(topic[len(self._topic_prefix):-1])
        if sub is None or sub.confirmed:
            return
        sub.confirmed = True
        sub.resync = True  # only now is every later offset sure to arrive: read where the stream is
        if not sub.catching_up:
            sub.catching_up = True
            asyncio.ensure_future(self._catch_up(sub))

    def _on_message(self, topic: bytes, message: bytes, by_pattern: bool) -> None:
        channel = topic[len(self._topic_prefix):-1].decode()
        sub = self._subs.get(channel)
        if by_pattern and sub is not None:
            return  # its own subscription delivers it, in order
        pub, origin = self._decode(channel, message)
        if sub is None:
            if by_pattern and self._handler is not None:
                self._handler.handle_publication(pub, origin)
            return
        if sub.catching_up or sub.position is None:
            self._hold(sub, pub)
        else:
            self._accept(sub, pub, origin)

    def _decode(self, channel: str, message: bytes) -> tuple[Publication, str | None]:
        first = message.index(b":")
        second = message.index(b":", first + 1)
        third = message.index(b":", second + 1)
        end = third + 1 + int(message[second + 1:third])
        header = _decode_header(message[third + 1:end])
        pub = Publication(channel, message[end:], int(message[:first]), message[first + 1:second].decode(),
                          header.binary, header.key, header.time)
        return pub, header.origin if header.node == self.node_id else None

    def _hold(self, sub: _Sub, pub: Publication) -> None:
        sub.buffer.append(pub)
        sub.buffered_bytes += len(pub.data)
        if sub.buffered_bytes > self._max_buffered:
            sub.buffer.clear()
            sub.buffered_bytes = 0
            sub.resync = True  # read them from the stream instead

    def _accept(self, sub: _Sub, pub: Publication, origin: str | None) -> None:
        """A publication for a channel that is up to date here: deliver it, or start filling a gap."""
        position = sub.position
        if pub.epoch == position.epoch:
            if pub.offset <= position.offset:
                return  # delivered already (by a gap fill)
            if pub.offset == position.offset + 1:
                sub.position = StreamPosition(pub.offset, pub.epoch)
                if self._handler is not None:
                    self._handler.handle_publication(pub, origin)
                return
        sub.catching_up = True
        self._hold(sub, pub)
        asyncio.ensure_future(self._catch_up(sub))

    async def _catch_up(self, sub: _Sub) -> None:
        """Bring ``sub`` up to date: read its position if asked, fill every
        gap from the stream, then deliver what was held, in order."""
        try:
            while self._subs.get(sub.channel) is sub:
                if sub.resync:
                    sub.resync = False
                    offset, epoch = await self._ensure(sub.channel)
                    if sub.position is None:
                        sub.position = StreamPosition(offset, epoch)
                        sub.ready.set_result(None)
                    else:
                        await self._fill(sub, offset, epoch)
                    continue
                if not sub.buffer:
                    break
                pub = sub.buffer.popleft()
                sub.buffered_bytes -= len(pub.data)
                position = sub.position
                if pub.epoch == position.epoch and pub.offset <= position.offset:
                    continue
                if pub.epoch != position.epoch or pub.offset > position.offset + 1:
                    await self._fill(sub, pub.offset - 1, pub.epoch)
                    if self._subs.get(sub.channel) is not sub:
                        return
                sub.position = StreamPosition(pub.offset, pub.epoch)
                if self._handler is not None:
                    self._handler.handle_publication(pub, None)
        except (RedisError, OSError, TimeoutError) as exc:
            self._lost(exc)  # the supervisor reconnects, and the confirmation starts a new catch-up
            sub.confirmed = False
        finally:
            sub.catching_up = False

    async def _ensure(self, channel: str) -> tuple[int, str]:
        meta = _keys(channel)[0]
        async with self._catch_up_slots, asyncio.timeout(COMMAND_TIMEOUT_S):
            result = await self._ensure_script(keys=[meta], args=[IDLE_CHANNEL_TTL_S * 1000])
        return int(result[0]), text(result[1])

    async def _fill(self, sub: _Sub, last: int, epoch: str) -> None:
        """Deliver ``sub``'s offsets up to ``last`` of ``epoch`` from the stream;
        report what it does not keep."""
        handler = self._handler
        if epoch != sub.position.epoch:
            self.epoch_changes_total += 1
            sub.position = StreamPosition(0, epoch)
            if handler is not None:
                handler.handle_new_epoch(sub.channel, sub.position)
        _, stream = _keys(sub.channel)
        next_offset = sub.position.offset + 1
        while next_offset <= last:
            async with self._catch_up_slots, asyncio.timeout(COMMAND_TIMEOUT_S):
                entries = await self._redis.xrange(stream, f"{next_offset}-1", f"{last}-1", count=FILL_PAGE)
            if self._subs.get(sub.channel) is not sub:
                return
            for entry_id, fields in entries:
                pub = _entry(sub.channel, epoch, entry_id, fields)
                if pub.offset > next_offset:
                    self._report_lost(sub, next_offset, pub.offset - 1)
                sub.position = StreamPosition(pub.offset, epoch)
                self.gaps_filled_total += 1
                if handler is not None:
                    handler.handle_publication(pub, None)
                next_offset = pub.offset + 1
            if len(entries) < FILL_PAGE:
                break
        if next_offset <= last:
            self._report_lost(sub, next_offset, last)
            sub.position = StreamPosition(last, epoch)

    def _report_lost(self, sub: _Sub, first: int, last: int) -> None:
        self.offsets_lost_total += last - first + 1
        logger.warning("offsets %d-%d of %r are gone from the stream: subscribers are told (lagged)",
                       first, last, sub.channel)
        if self._handler is not None:
            self._handler.handle_gap(sub.channel, first, last)

    # -- history ----------------------------------------------------------------------

    async def history(self, channel: str, *, since: int | None = None, limit: int = 100,
                      reverse: bool = False) -> HistoryPage:
        """``channel``'s kept publications.

        Raises:
            Unavailable: Redis does not answer, or this node is not back from
                an outage yet (a reader that went on to publish would fail).
        """
        if self._down is not None:
            raise Unavailable(f"the broker is unavailable: {self._down}")
        meta, stream = _keys(channel)
        try:
            offset, epoch = await self._ensure(channel)
            pipe = self._redis.pipeline(transaction=True)
            pipe.hget(meta, "ttl")
            pipe.xrange(stream, "-", "+", count=FILL_PAGE)
            if reverse:
                pipe.xrevrange(stream, f"({since}-1" if since is not None else "+", "-", count=limit + 1)
            else:
                pipe.xrange(stream, f"({since}-1" if since is not None else "-", "+", count=limit + 1)
            async with asyncio.timeout(COMMAND_TIMEOUT_S):
                ttl_ms, oldest, page = await pipe.execute()
        except (RedisError, OSError, TimeoutError) as exc:
            raise Unavailable(f"the broker is unavailable: {exc}") from None
        position = StreamPosition(offset, epoch)
        ttl_s = int(ttl_ms or 0) / 1000
        horizon = self._clock() - ttl_s if ttl_s else None
        kept = [_entry(channel, epoch, entry_id, fields) for entry_id, fields in page]
        first_offset = offset + 1
        for entry_id, fields in oldest:
            if horizon is None or float(fields[b"t"]) / 1000 >= horizon:
                first_offset = int(entry_id.split(b"-")[0])
                break
        kept = [pub for pub in kept if pub.offset >= first_offset]
        more = len(kept) > limit
        return HistoryPage(kept[:limit], position, first_offset, more)


def render_samples(brokers: list[list[tuple[str, str, int]]]) -> list[str]:
    """Prometheus lines for the ``metric_samples`` of one broker, or of
    several (shards), each sample then labelled ``shard="<index>"``."""
    lines: list[str] = []
    for row, (name, kind, _) in enumerate(brokers[0]):
        lines.append(f"# TYPE {name} {kind}")
        if len(brokers) == 1:
            lines.append(f"{name} {brokers[0][row][2]}")
        else:
            lines += [f'{name}{{shard="{index}"}} {samples[row][2]}' for index, samples in enumerate(brokers)]
    return lines


def _entry(channel: str, epoch: str, entry_id: bytes, fields: dict[bytes, bytes]) -> Publication:
    header = _decode_header(fields[b"h"])
    return Publication(channel, fields[b"d"], int(entry_id.split(b"-")[0]), epoch, header.binary, header.key,
                       header.time)
