"""``logs:<container>`` channels: one engine log stream per container, however many viewers.

The first subscriber to ``logs:web`` starts a reader thread that resolves the
container (``inspect``), asks the loop whether another channel already
follows that container id, and if not follows its logs
(``follow=1&timestamps=1&tail=<ring size>``), decodes them
(``docker_stream``) and hands whole lines to the loop in batches through a
``Handoff``. On the loop, each line is published on the channel, which
keeps it in its history (the ``logs:**`` channel default: ``ring_lines``
lines), so a later subscriber's ``tail`` or ``since`` comes from there,
not from a second engine request.

Aliases: ``logs:web``, ``logs:<id>`` and ``logs:<id prefix>`` name one
container. When a reader finds its container already followed, it ends
without a logs request and its channel *attaches* to that stream: every line
is then published on every attached channel. Channels are independent in
the hub, so each keeps its own offsets and its own ring of (offset, line)
(the line's bytes are shared). An attaching channel is seeded by publishing
the stream's ring on it before anyone has joined it, exactly the backlog a
stream of its own would have started with; from then on its ring holds the
same lines as the others', with its own offsets. (The ring exists for this
seeding; subscribers are served from the history.)

Joining without a gap or a duplicate: subscribers wait (``pending``) until
the engine's backlog has been read. The engine sends the backlog and the
live lines on one response with no marker in between, but every line
carries the engine's timestamp, and the backlog is the lines written before
the logs request: the reader notes the wall clock just before it makes the
request and puts ``CAUGHT_UP`` in the handoff right before the first line
stamped at or after that instant (``_first_live``). For a container that
keeps printing, subscribers are admitted as soon as the tail has arrived
and the next line follows it. The fallback is the old rule: the engine has
been quiet for ``quiet_s`` (50 ms: a container that prints nothing new), or
``catch_up_max_s`` (1 s) have passed. It is the only rule when the engine's
clock cannot be the gateway's: its ``Date`` header (``_clocks_agree``) is
off by more than a second from the time the request was made (a remote
engine with a skewed clock). Admission is then either one loop callback
(``subscribed``, the join) or, with ``tail`` or ``since``, the hub's
recovery (``wirehub.recovery``): the asked lines from the history with
their original offsets, then the join, so every live line after them
reaches the subscriber exactly once — wherever the boundary falls, since
every line is published once and admission is one callback between two
lines; the boundary only decides which lines count as the tail.

A channel detaches ``stop_grace_s`` after its last subscriber left (a viewer
reloading a page does not restart anything); the stream stops when its last
channel detaches and starts afresh on the next subscribe. The fresh stream's
engine backlog holds lines the channel published before: they are skipped
by timestamp (``_seen``), so the history keeps each line once and a viewer
resuming with ``since`` gets what it missed, not what it had. When the
container stops, the engine ends the stream and every attached channel
publishes ``{"type": "stream_end", "exit_code": ...}``; later subscribers
of those channels get that ``stream_end`` (and with ``tail`` the lines
before it). An ended stream takes no new aliases: another name for the
container starts a fresh stream.

Backpressure: the handoff holds at most ``queue_lines`` lines /
``queue_bytes`` bytes; past that the reader thread blocks, stops reading
its socket, and the engine waits (it reads the log file, so the container
itself is never slowed).

In a cluster (a shared broker with ``leases``): the channels go through
the shared broker, and one gateway follows each, the holder of its lease
in Redis (``broker/leases.py``). A gateway whose first subscriber arrives
takes the lease if it is free and follows the container as above, with
lines stamped at or before the last line the channel's history holds
skipped; otherwise it keeps the subscribers pending until the lease says
the holder has read the backlog (``live``), and from then on its
subscribers get the holder's lines through Redis. Every admission is a
recovery by the hub, which finds where the live stream starts on the
shared broker; the holder admits its own pending subscribers once the
broker has acknowledged the backlog. Every ``lease_s / 3`` a gateway renews
the leases it holds and, for the channels it watches but does not follow,
says it wants them and takes any lease that expired (its holder died):
the stream goes on within ``lease_s`` plus a third, from the last line the
history has, so nothing is lost that the engine still has in its last
``ring_lines``. A holder keeps following while another gateway wants the
channel, and stops ``stop_grace_s`` after the last want expired. A line
the shared broker refuses (Redis down) stops the stream; the channel is
taken again, and the backlog read again, once Redis answers.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import datetime
import email.utils
import functools
import logging
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

import msgspec

from ..protocol.errors import (Forbidden, InvalidChannel, InvalidField, TooManySubscriptions, Unavailable,
                               WirehubError)
from ..protocol.messages import Error, StreamPosition, Subscribe, Subscribed
from .base import Answer, Handoff, SourceHost, Subscriber
from .docker_engine import Engine
from .docker_stream import ChunkedDecoder, EngineStreamError, LogDecoder, StreamFormatError

if TYPE_CHECKING:
    from ..broker.leases import Leases

logger = logging.getLogger("wirehub.sources.docker_logs")

PREFIX = "logs:"
# Channels no longer followed whose last line is remembered (``DockerLogsSource._seen``).
SEEN_CHANNELS = 4096
RESOLVED, CAUGHT_UP, END, ERROR = "resolved", "caught_up", "end", "error"
# In a cluster, what a channel's lease says of it: its holder is reading
# the engine's backlog, follows it live, or saw the stream end.
STARTING, LIVE, ENDED = "starting", "live", "ended"
# The stream_end of a channel another gateway follows: only known to be there.
ENDED_ELSEWHERE: tuple[int | None, bytes] = (None, b"")
# How often a gateway waiting for another's stream to catch up looks again.
HOLDER_POLL_S = 0.05
# Publications read back to find the last line a channel has (``DockerLogsSource._take``).
LAST_LINES = 8
LINE_START = b'{"ts":"'
# How far the engine's ``Date`` header may be outside the interval in which
# the gateway made the request before the clocks count as disagreeing.
CLOCK_TOLERANCE_NS = 250_000_000
_skew_warned: set[str] = set()   # engines whose clock skew was logged (once each)


class StreamEnd(msgspec.Struct, tag_field="type", tag="stream_end", omit_defaults=True, gc=False):
    """Published on ``logs:<container>`` when the engine ended the stream."""

    container: str
    exit_code: int | None
    status: str | None
    reason: str                  # "exited", "engine_unavailable", "engine_error"
    error: str | None = None


class LogStats:
    """Counters for ``/metrics``."""

    __slots__ = ("streams_started", "streams_stopped", "lines", "running")

    def __init__(self) -> None:
        self.streams_started = 0
        self.streams_stopped = 0
        self.lines = 0
        self.running = 0


def _body_socket(response: Any) -> tuple[socket.socket, bytes]:
    """The socket under a streaming response, and the body bytes already buffered above it.

    http.client reads the status line and headers through a BufferedReader
    that may have read past them; those bytes are drained here (without
    blocking) so the rest can be read straight from the socket, where
    ``select`` tells whether the engine is quiet.
    """
    fp = response.raw._fp.fp
    sock = fp.raw._sock
    sock.settimeout(0)
    parts = []
    try:
        while True:
            data = fp.read1(65536)
            if not data:
                break
            parts.append(data)
    except (BlockingIOError, ssl.SSLWantReadError):
        pass
    finally:
        sock.settimeout(None)
    return sock, b"".join(parts)


def ts_ns(ts: str) -> int | None:
    """Nanoseconds since the epoch of an engine timestamp (RFC 3339:
    ``2026-11-26T17:44:52.869125634Z``, or with a ``+hh:mm`` offset; the
    fraction may have trailing zeros trimmed), or None if ``ts`` is not one."""
    if len(ts) < 20 or ts[10] not in "Tt":
        return None
    pos, fraction = 19, 0
    if ts[19] == ".":
        pos = 20
        while pos < len(ts) and ts[pos].isdigit():
            pos += 1
        digits = ts[20:pos]
        if not digits:
            return None
        fraction = int(digits[:9].ljust(9, "0"))
    zone = ts[pos:]
    if zone in ("Z", "z"):
        zone = "+00:00"
    try:
        seconds = datetime.datetime.fromisoformat(ts[:19] + zone)
    except ValueError:
        return None
    if seconds.tzinfo is None:
        return None
    return int(seconds.timestamp()) * 1_000_000_000 + fraction


def _first_live(lines: list[Any], live_from_ns: int) -> int | None:
    """The index of the first of ``lines`` (``LogLine``s) stamped at or after
    ``live_from_ns``, or None. Lines without a timestamp are passed over."""
    for i, line in enumerate(lines):
        ns = ts_ns(line.ts)
        if ns is not None and ns >= live_from_ns:
            return i
    return None


def _clocks_agree(date: str | None, sent_ns: int, received_ns: int,
                  tolerance_ns: int = CLOCK_TOLERANCE_NS) -> bool:
    """Whether the engine's clock can be the gateway's: its ``Date`` header
    (whole seconds, read at some moment between ``sent_ns`` and
    ``received_ns`` on the gateway's clock) falls in that interval, give or
    take ``tolerance_ns``. A skew under about a second cannot be told."""
    if not date:
        return False
    try:
        engine = email.utils.parsedate_to_datetime(date)
    except (TypeError, ValueError):
        return False
    if engine.tzinfo is None:
        return False
    engine_ns = int(engine.timestamp()) * 1_000_000_000
    return (engine_ns <= received_ns + tolerance_ns
            and sent_ns - tolerance_ns < engine_ns + 1_000_000_000)


def _readable(sock: socket.socket, timeout_s: float) -> bool:
    pending = getattr(sock, "pending", None)   # TLS: decrypted bytes select cannot see
    if pending is not None and pending():
        return True
    return bool(select.select([sock], [], [], timeout_s)[0])


class _Reader:
    """The worker thread following one container's logs into a ``Handoff``."""

    def __init__(self, engine: Engine, container: str, handoff: Handoff, *, engine_tail: int,
                 quiet_s: float, catch_up_max_s: float, read_bytes: int = 32768) -> None:
        self._engine = engine
        self._container = container
        self._handoff = handoff
        self._engine_tail = engine_tail
        self._quiet_s = quiet_s
        self._catch_up_max_s = catch_up_max_s
        self._read_bytes = read_bytes
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._claim: concurrent.futures.Future[bool] | None = None
        self.thread = threading.Thread(target=self._run, name=f"wirehub-logs-{container[:32]}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """Stop following (any thread): wake the reader wherever it blocks."""
        self._stopped.set()
        self._handoff.close()
        with self._lock:
            if self._claim is not None:
                self._claim.cancel()
            if self._sock is not None:
                try:
                    self._sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _put(self, items: list[tuple[Any, int]]) -> bool:
        return not self._stopped.is_set() and self._handoff.put(items)

    def _claimed(self, container_id: str) -> bool:
        """Whether to follow ``container_id``: the loop answers False when
        another channel's stream already follows it (this channel attached to
        that stream), and ``stop`` cancels the question."""
        claim: concurrent.futures.Future[bool] = concurrent.futures.Future()
        with self._lock:
            if self._stopped.is_set():
                return False
            self._claim = claim
        if not self._put([((RESOLVED, (container_id, claim)), 0)]):
            return False
        try:
            return claim.result()
        except concurrent.futures.CancelledError:
            return False

    def _run(self) -> None:
        client = None
        response = None
        try:
            try:
                client = self._engine.client()
                info = client.inspect_container(self._container)
                container_id, tty = info["Id"], bool(info["Config"].get("Tty"))
                if not self._claimed(container_id):
                    return
                params = {"stdout": 1, "stderr": 1, "timestamps": 1, "follow": 1, "tail": self._engine_tail}
                # The backlog is what was written before this instant.
                requested_ns = time.time_ns()
                response = client._get(client._url("/containers/{0}/logs", container_id),
                                       params=params, stream=True)
                client._raise_for_status(response)
                live_from = self._live_from(response.headers.get("Date"), requested_ns, time.time_ns())
                sock, leftover = _body_socket(response)
            except Exception as exc:
                if not self._stopped.is_set():
                    self._put([((ERROR, self._engine.describe(exc, self._container)), 0)])
                return
            with self._lock:
                if self._stopped.is_set():
                    return
                self._sock = sock
            chunked = response.headers.get("Transfer-Encoding", "").lower() == "chunked"
            end = self._follow(sock, leftover, ChunkedDecoder() if chunked else None, LogDecoder(tty),
                               container_id, live_from)
            if end is None:
                return
            if end.reason == "exited":
                end.exit_code, end.status = self._exit_status(client, container_id)
            self._put([((END, msgspec.json.encode(end)), 0)])
        except Exception:  # a bug here must not kill the thread silently
            logger.exception("log reader for %s failed", self._container)
            self._put([((END, msgspec.json.encode(StreamEnd(self._container, None, None, "engine_error",
                                                              "internal error; see the server log"))), 0)])
        finally:
            with self._lock:
                self._sock = None
            if response is not None:
                response.close()
            if client is not None:
                client.close()

    def _live_from(self, date: str | None, sent_ns: int, received_ns: int) -> int | None:
        """The first instant whose lines are live (``sent_ns``), or None when the
        engine's clock disagrees with ours (``_clocks_agree``): then only the
        quiet rule ends the backlog."""
        if _clocks_agree(date, sent_ns, received_ns):
            return sent_ns
        address = self._engine.address
        if address not in _skew_warned:
            _skew_warned.add(address)
            logger.warning("the Docker engine's clock (Date: %s) differs from the gateway's by more than "
                           "a second, or cannot be read: its log timestamps are not used, a stream's "
                           "backlog ends when the engine is quiet for %.0f ms (or after %.1f s)",
                           date, self._quiet_s * 1e3, self._catch_up_max_s)
        return None

    def _follow(self, sock: socket.socket, data: bytes, dechunk: ChunkedDecoder | None,
                decoder: LogDecoder, container_id: str, live_from: int | None = None) -> StreamEnd | None:
        """Read until the engine ends the stream; None when stopped by us.

        The backlog has been read (``CAUGHT_UP``) just before the first line
        stamped at or after ``live_from`` (ns since the epoch, None: no such
        rule), when the engine has been quiet for ``quiet_s``, or after
        ``catch_up_max_s``, whichever comes first.
        """
        encode = msgspec.json.encode
        caught_up = False
        deadline = time.monotonic() + self._catch_up_max_s
        reason, error = "exited", None
        try:
            while True:
                if not data:
                    if not caught_up and (not _readable(sock, self._quiet_s) or time.monotonic() >= deadline):
                        # The engine paused: its backlog is in; pending subscribers may join.
                        caught_up = True
                        if not self._put([((CAUGHT_UP, None), 0)]):
                            return None
                    data = sock.recv(self._read_bytes)
                    if not data:
                        break
                body = dechunk.feed(data) if dechunk is not None else data
                data = b""
                lines = decoder.feed(body)
                if lines:
                    items = []
                    for line in lines:
                        encoded = encode(line)
                        items.append((encoded, len(encoded)))
                    if not caught_up and live_from is not None:
                        first = _first_live(lines, live_from)
                        if first is not None:
                            # The lines before it are the backlog: pending subscribers join there.
                            caught_up = True
                            items.insert(first, ((CAUGHT_UP, None), 0))
                    if not self._put(items):
                        return None
                if dechunk is not None and dechunk.done:
                    break
        except (StreamFormatError, EngineStreamError) as exc:
            reason, error = "engine_error", str(exc)
        except OSError as exc:
            if self._stopped.is_set():
                return None
            reason, error = "engine_unavailable", f"the engine connection failed: {exc}"
        if self._stopped.is_set():
            return None
        items = [(encoded, len(encoded)) for encoded in map(encode, decoder.finish())]
        if items and not self._put(items):
            return None
        return StreamEnd(container_id, None, None, reason, error)

    def _exit_status(self, client: Any, container_id: str) -> tuple[int | None, str | None]:
        # The engine ends the log stream as the container exits, a moment
        # before it records the exit: wait for that.
        try:
            code = client.wait(container_id, timeout=10, condition="not-running").get("StatusCode")
            status = client.inspect_container(container_id)["State"].get("Status")
            return code, status
        except Exception as exc:
            error = self._engine.describe(exc, container_id)
            return None, "removed" if error.code == "container_not_found" else None


class _Stream:
    """One engine log stream (one reader thread) and the channels it feeds.

    A stream starts for one channel and resolves its container; it is
    *claimed* (followed, counted in ``LogStats.running``) unless another
    stream already follows that container, in which case it is dropped and
    its channel attaches to that one.
    """

    __slots__ = ("container", "container_id", "handoff", "reader", "channels", "caught_up", "catching_up",
                 "running", "last_publish")

    def __init__(self, container: str) -> None:
        self.container = container              # as the first channel named it
        self.container_id: str | None = None    # once claimed
        self.handoff: Handoff | None = None
        self.reader: _Reader | None = None
        self.channels: list[_LogChannel] = []
        self.caught_up = False
        self.catching_up = False
        self.running = False
        # In a cluster, the shared broker's answer to the latest line published.
        self.last_publish: asyncio.Future[StreamPosition] | None = None


def ts_key(line: bytes) -> bytes:
    """The timestamp of an encoded ``LogLine`` (its first field), in a form that
    sorts by time: the engine trims trailing zeros of the fraction, so it is
    padded back to nanoseconds."""
    ts = line[7:line.find(b'"', 7)]  # after b'{"ts":"'
    if not ts.endswith(b"Z"):
        return ts
    dot = ts.find(b".")
    seconds, fraction = (ts[:-1], b"") if dot < 0 else (ts[:dot], ts[dot + 1:-1])
    return seconds + b"." + fraction.ljust(9, b"0")


Pending = dict[str, tuple[Subscriber, Subscribe, Answer]]
"""Subscribers waiting for a stream to catch up, by client id."""


class _LogChannel:
    """One ``logs:<container>`` channel: its own offsets, ring and pending subscribers."""

    __slots__ = ("name", "stream", "ring", "ring_bytes", "pending", "end", "stop_timer", "after", "last",
                 "wanted")

    def __init__(self, name: str, stream: _Stream, after: bytes | None = None) -> None:
        self.name = name
        self.stream = stream
        self.ring: collections.deque[bytes] = collections.deque()
        self.ring_bytes = 0
        self.pending: Pending = {}
        # The stream_end published (offset, data); the offset is None when a
        # shared broker assigned it.
        self.end: tuple[int | None, bytes] | None = None
        self.stop_timer: asyncio.TimerHandle | None = None
        self.wanted = False  # in a cluster: another gateway has subscribers (``Lease.wanted``)
        # A channel followed before (its history has those lines): lines
        # stamped at or before ``after`` (``ts_key``) are not published again.
        self.after = after
        self.last: bytes | None = None  # the last line published

    def is_new(self, line: bytes) -> bool:
        """Whether ``line`` is newer than what an earlier stream of this channel published."""
        if self.after is None:
            return True
        if ts_key(line) <= self.after:
            return False
        self.after = None  # the engine's lines come in order: no more to skip
        return True

    def keep(self, line: bytes, max_lines: int, max_bytes: int) -> None:
        """Add a published line to the ring; the oldest go past either limit."""
        ring = self.ring
        ring.append(line)
        self.ring_bytes += len(line)
        while len(ring) > max_lines or self.ring_bytes > max_bytes:
            self.ring_bytes -= len(ring.popleft())

    def word(self) -> str:
        """What the lease tells the cluster about this channel."""
        return ENDED if self.end is not None else LIVE if self.stream.caught_up else STARTING


class _Remote:
    """In a cluster: a channel with subscribers here that another gateway
    follows (or nobody yet, when it has just died)."""

    __slots__ = ("name", "pending", "state", "task")

    def __init__(self, name: str, pending: Pending | None = None) -> None:
        self.name = name
        self.pending: Pending = pending or {}
        self.state = ""  # the holder's word at the last look
        self.task: asyncio.Task[None] | None = None  # ``_take_or_wait``, while it runs


class DockerLogsSource:
    """The ``logs:<container>`` channels (a ``Source``).

    Args:
        engine: the Docker engine.
        ring_lines: lines kept per container for late joiners; also the
            largest ``tail`` a subscriber may ask for, and the backlog asked
            of the engine when a stream starts.
        ring_bytes: bytes kept per container (older lines go first).
        max_streams: containers followed at once.
        stop_grace_s: how long a stream outlives its last subscriber.
        quiet_s, catch_up_max_s: when the engine's backlog counts as read
            if no line stamped after the logs request has come first (a
            quiet container; an engine whose clock disagrees with ours).
        queue_lines, queue_bytes: handoff bounds (backpressure to the reader).
        batch_lines: lines published per loop callback. A socket read, a ping,
            a flush can run between two slices: at 128 lines (about 1 ms with
            one subscriber) a ping's round trip stayed at 2 ms median / 17 ms
            p99 while 50,000 lines/s streamed; 1024 lines gave 5 / 45 ms.
        leases: the shared broker's leases (``--broker redis://``): the
            channels then go through the shared broker, and one gateway of the
            cluster follows each (module docstring, "In a cluster").
        lease_s: how long a lease outlives its holder; it is renewed every third of it.
    """

    def __init__(self, engine: Engine, *, ring_lines: int = 1000, ring_bytes: int = 8 << 20,
                 max_streams: int = 256, stop_grace_s: float = 0.5, quiet_s: float = 0.05,
                 catch_up_max_s: float = 1.0, queue_lines: int = 8192, queue_bytes: int = 8 << 20,
                 batch_lines: int = 128, leases: Leases | None = None, lease_s: float = 3.0) -> None:
        self.engine = engine
        self.ring_lines = ring_lines
        self.ring_bytes = ring_bytes
        self.max_streams = max_streams
        self.stop_grace_s = stop_grace_s
        self.quiet_s = quiet_s
        self.catch_up_max_s = catch_up_max_s
        self.queue_lines = queue_lines
        self.queue_bytes = queue_bytes
        self.batch_lines = batch_lines
        self.stats = LogStats()
        self.channels: dict[str, _LogChannel] = {}
        self.streams: set[_Stream] = set()        # starting, followed, or ended with viewers
        self._by_id: dict[str, _Stream] = {}      # container id -> the stream following it
        self._host: SourceHost | None = None
        self._threads: list[threading.Thread] = []
        # Channels no longer followed -> the timestamp of the last line they
        # published (at most SEEN_CHANNELS, oldest forgotten first): when one is
        # followed again, the engine's backlog it already has is skipped, so
        # its history (and a ``since`` resume) holds each line once.
        self._seen: dict[str, bytes] = {}
        # In a cluster: the channels watched here that another gateway follows.
        self.leases = leases
        self.lease_s = lease_s
        self.remote: dict[str, _Remote] = {}
        self._keeper: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False

    # -- Source ---------------------------------------------------------------

    def owns(self, channel: str) -> bool:
        return channel.startswith(PREFIX)

    def shares(self, channel: str) -> bool:
        return self.leases is not None

    def bind(self, host: SourceHost) -> None:
        self._host = host

    async def start(self) -> None:
        # Streams start with their first subscriber; in a cluster, leases are kept from now.
        if self.leases is not None:
            self._keeper = asyncio.ensure_future(self._keep())

    async def close(self) -> None:
        self._closing = True
        tasks = [task for task in (self._keeper, *self._tasks) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        held = list(self.channels)
        for stream in list(self.streams):
            self._stop(stream, release=False)
        if self.leases is not None and held:
            try:  # the next gateway need not wait for them to expire
                await self.leases.release(held)
            except Unavailable:
                pass
        threads, self._threads = self._threads, []
        # Readers wake up at once (their sockets are shut down); one stuck in
        # a request to a hung engine is a daemon thread and is left behind.
        deadline = time.monotonic() + 2.0
        while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    def subscribe(self, conn: Subscriber, channel: str, request: Subscribe, answer: Answer) -> bool:
        tail = request.tail or 0
        if tail > self.ring_lines:
            raise InvalidField(f"tail must be at most {self.ring_lines} "
                               f"(the gateway keeps that many lines per container)")
        state = self.channels.get(channel)
        if state is None:
            if len(channel) == len(PREFIX):
                raise InvalidChannel("logs:<container> needs a container id or name")
            if self.leases is not None:
                self._subscribe_remote(conn, channel, request, answer)
                return False
            # A new name may turn out to be an alias, but only the engine can
            # tell: it takes a place (and a thread) while it is resolved.
            self._check_room()
            state = self.channels[channel] = self._start(channel, self._seen.pop(channel, None))
        if state.stop_timer is not None:
            state.stop_timer.cancel()
            state.stop_timer = None
        if state.stream.caught_up:
            self._admit(state.name, state.end, conn, request, answer)
        else:
            state.pending[conn.client_id] = (conn, request, answer)
        return False

    def cancel(self, conn: Subscriber, channel: str) -> bool:
        remote = self.remote.get(channel)
        if remote is not None:
            return remote.pending.pop(conn.client_id, None) is not None
        state = self.channels.get(channel)
        if state is None or state.pending.pop(conn.client_id, None) is None:
            return False
        self._release(state)
        return True

    def forget(self, conn: Subscriber) -> None:
        for remote in self.remote.values():
            remote.pending.pop(conn.client_id, None)
        for state in list(self.channels.values()):
            if state.pending.pop(conn.client_id, None) is not None:
                self._release(state)

    def vacated(self, channel: str) -> None:
        state = self.channels.get(channel)
        if state is not None:
            self._release(state)

    # -- streams and channels --------------------------------------------------

    def _check_room(self) -> None:
        if len(self.streams) >= self.max_streams:
            raise TooManySubscriptions(f"the gateway follows at most {self.max_streams} containers at once")

    def _start(self, name: str, after: bytes | None) -> _LogChannel:
        """A channel with a stream of its own, whose reader resolves the container;
        lines stamped at or before ``after`` (``ts_key``) are not published again."""
        stream = _Stream(name[len(PREFIX):])
        state = _LogChannel(name, stream, after)
        stream.channels.append(state)
        stream.handoff = Handoff(asyncio.get_running_loop(), lambda items: self._deliver(stream, items),
                                 max_items=self.queue_lines, max_bytes=self.queue_bytes,
                                 batch_items=self.batch_lines)
        stream.reader = _Reader(self.engine, stream.container, stream.handoff, engine_tail=self.ring_lines,
                                quiet_s=self.quiet_s, catch_up_max_s=self.catch_up_max_s)
        self.streams.add(stream)
        self._threads = [t for t in self._threads if t.is_alive()]
        self._threads.append(stream.reader.thread)
        stream.reader.start()
        return state

    def _resolved(self, stream: _Stream, container_id: str, claim: concurrent.futures.Future[bool]) -> None:
        """The reader found its container: follow it, or attach to the stream that does."""
        other = self._by_id.get(container_id)
        if other is None:
            stream.container_id = container_id
            self._by_id[container_id] = stream
            stream.running = True
            self.stats.streams_started += 1
            self.stats.running += 1
            claim.set_result(True)
            logger.info("following logs of %s (%s)", stream.container, container_id)
            return
        claim.set_result(False)  # its reader ends without a logs request
        stream.reader = None
        self.streams.discard(stream)
        for state in stream.channels:
            self._attach(state, other)

    def _attach(self, state: _LogChannel, stream: _Stream) -> None:
        """Make ``state`` an alias of ``stream``: give it the lines the others
        have (published on it, nobody has joined it yet), then the live ones."""
        state.stream = stream
        name = state.name
        for line in stream.channels[0].ring:
            if state.is_new(line):
                self._emit(stream, name, line)
                state.keep(line, self.ring_lines, self.ring_bytes)
                state.last = line
        stream.channels.append(state)
        if stream.caught_up:
            self._admit_pending(state)
        logger.info("%s is an alias of %s (%s)", name, stream.channels[0].name, stream.container_id)

    def _finished(self, stream: _Stream) -> None:
        """The engine stream is over (ended or stopped): no longer counted nor aliased."""
        if stream.running:
            stream.running = False
            self.stats.streams_stopped += 1
            self.stats.running -= 1
        if stream.container_id is not None and self._by_id.get(stream.container_id) is stream:
            del self._by_id[stream.container_id]

    def _stop(self, stream: _Stream, release: bool = True) -> None:
        """Stop the stream and forget its channels (in a cluster, give up their
        leases unless ``release`` is false)."""
        self.streams.discard(stream)
        names = []
        for state in stream.channels:
            if self.channels.get(state.name) is state:
                del self.channels[state.name]
                self._remember(state)
                names.append(state.name)
            if state.stop_timer is not None:
                state.stop_timer.cancel()
                state.stop_timer = None
        if stream.reader is not None:
            stream.reader.stop()
            stream.reader = None
        self._finished(stream)
        if release:
            self._give_up(names)
        logger.info("stopped following logs of %s", stream.container)

    def _release(self, state: _LogChannel) -> None:
        """A subscriber left: detach the channel after the grace period if it was the last."""
        if state.stop_timer is None and not state.pending and self._host.viewers(state.name) == 0:
            state.stop_timer = asyncio.get_running_loop().call_later(
                self.stop_grace_s, self._detach_if_unwatched, state)

    def _detach_if_unwatched(self, state: _LogChannel) -> None:
        """Forget an unwatched channel; the stream stops with its last channel.
        In a cluster, a channel another gateway wants is kept (``_renew`` looks again)."""
        state.stop_timer = None
        if state.pending or self._host.viewers(state.name) != 0 or state.wanted:
            return
        stream = state.stream
        if len(stream.channels) == 1:
            self._stop(stream)
            return
        del self.channels[state.name]
        self._remember(state)
        stream.channels.remove(state)
        self._give_up([state.name])

    def _remember(self, state: _LogChannel) -> None:
        if state.last is not None:
            self._seen.pop(state.name, None)
            self._seen[state.name] = ts_key(state.last)
            while len(self._seen) > SEEN_CHANNELS:
                del self._seen[next(iter(self._seen))]

    def _admit(self, name: str, end: tuple[int | None, bytes] | None, conn: Subscriber, request: Subscribe,
               answer: Answer) -> None:
        """Subscribe ``conn`` now; ``end`` is the channel's stream_end, if it has one."""
        if not self._host.allowed(conn, name):
            answer(Error(Forbidden.code, f"not allowed to subscribe to {name[:64]!r}", request.id))
            return
        if self.leases is not None and end is not None and request.since is None and not request.tail:
            # The stream_end is the channel's last publication.
            request = msgspec.structs.replace(request, tail=1)
        if request.since is not None or request.tail or self.leases is not None:
            # The lines are in the channel's history too (the ``logs:**``
            # default DockerSources installs), with the offsets they were
            # published at, across restarts of the stream: the hub's recovery
            # sends the asked ones and joins the live stream to them. On a
            # shared broker it also finds where the live stream starts.
            try:
                self._host.recover(conn, name, request, answer)
            except WirehubError as exc:
                answer(Error(exc.code, exc.message, request.id))
            return
        # One callback: the reply, the end of an ended stream, the join.
        answer(Subscribed(name, request.id))
        if end is not None:
            self._host.send_history(conn, name, [end])
        self._host.join(conn, name, request.max_rate)

    def _admit_pending(self, state: _LogChannel) -> None:
        pending, state.pending = state.pending, {}
        for conn, request, answer in pending.values():
            self._admit(state.name, state.end, conn, request, answer)

    def _catch_up(self, stream: _Stream) -> None:
        """The engine's backlog is in: admit the pending subscribers (in a
        cluster, once the shared broker has the backlog)."""
        if stream.caught_up or stream.catching_up:
            return
        stream.catching_up = True
        self._when_published(stream, lambda: self._caught_up(stream))

    def _caught_up(self, stream: _Stream) -> None:
        if stream not in self.streams:
            return
        stream.caught_up = True
        for state in stream.channels:
            self._admit_pending(state)
        self._announce(stream)

    def _deliver(self, stream: _Stream, items: list[Any]) -> None:
        if stream not in self.streams:
            return  # stopped while these were queued
        channels = stream.channels
        max_lines, max_bytes = self.ring_lines, self.ring_bytes
        lines = 0
        try:
            for item in items:
                if type(item) is bytes:
                    for state in channels:
                        if state.after is None or state.is_new(item):
                            self._emit(stream, state.name, item)
                            state.keep(item, max_lines, max_bytes)
                            state.last = item
                    lines += 1
                    continue
                kind, value = item
                if kind == RESOLVED:
                    self._resolved(stream, *value)
                elif kind == CAUGHT_UP:
                    self._catch_up(stream)
                elif kind == END:
                    if self.leases is None:
                        self._catch_up(stream)  # pending subscribers get the end live
                    for state in channels:
                        state.end = (self._emit(stream, state.name, value), value)
                    # In a cluster, subscribers still pending are admitted with the end as their tail.
                    self._catch_up(stream)
                    if stream.caught_up:
                        self._when_published(stream, lambda: self._announce(stream))
                    stream.reader = None
                    self._finished(stream)
                    for state in channels:
                        self._release(state)
                elif kind == ERROR:
                    self._fail(stream, value)
        except Unavailable as exc:
            self._broken(stream, exc)
        self.stats.lines += lines

    def _fail(self, stream: _Stream, error: WirehubError) -> None:
        """The stream could not start: answer the waiting subscribers and forget its channels."""
        stream.reader = None
        self._stop(stream)
        for state in stream.channels:
            pending, state.pending = state.pending, {}
            for _, request, answer in pending.values():
                answer(Error(error.code, error.message, request.id))

    # -- in a cluster --------------------------------------------------------------

    def _emit(self, stream: _Stream, name: str, line: bytes) -> int | None:
        """Publish ``line`` on ``name``: its offset, or None when the shared broker assigns it.

        Raises:
            Unavailable: the shared broker cannot take it (``_deliver`` stops following).
        """
        published = self._host.emit(name, line)
        if type(published) is StreamPosition:
            return published.offset
        stream.last_publish = published
        published.add_done_callback(functools.partial(self._published, stream))
        return None

    def _published(self, stream: _Stream, future: asyncio.Future[StreamPosition]) -> None:
        exc = future.exception() if not future.cancelled() else Unavailable("the gateway is stopping")
        if exc is not None:
            self._broken(stream, exc)

    def _when_published(self, stream: _Stream, callback: Callable[[], None]) -> None:
        """Call ``callback`` once the shared broker has every line published so far (now, on a local one)."""
        last = stream.last_publish
        if last is None or last.done():
            callback()
        else:
            last.add_done_callback(lambda _: callback())

    def _broken(self, stream: _Stream, exc: BaseException) -> None:
        """A line could not be published: stop following here, and follow
        again, from the last line the broker has, once it answers."""
        if stream not in self.streams:
            return
        logger.warning("stopped following logs of %s: %s; following again when the broker answers",
                       stream.container, exc)
        self._hand_over(stream)

    def _hand_over(self, stream: _Stream) -> None:
        """Stop following ``stream`` here; its channels' subscribers stay, fed
        by whichever gateway follows it next (this one, if it takes the lease)."""
        watched = [(state.name, state.pending) for state in stream.channels
                   if self.channels.get(state.name) is state]
        self._stop(stream)
        for name, pending in watched:
            if pending or self._host.viewers(name):
                remote = self.remote[name] = _Remote(name, pending)
                self._look(remote)

    def _subscribe_remote(self, conn: Subscriber, name: str, request: Subscribe, answer: Answer) -> None:
        remote = self.remote.get(name)
        if remote is None:
            remote = self.remote[name] = _Remote(name)
        if remote.state in (LIVE, ENDED):
            self._admit(name, ENDED_ELSEWHERE if remote.state == ENDED else None, conn, request, answer)
        else:
            remote.pending[conn.client_id] = (conn, request, answer)
            self._look(remote)

    def _look(self, remote: _Remote) -> None:
        if remote.task is None and not self._closing:
            remote.task = self._spawn(self._take_or_wait(remote))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None] | None:
        if self._closing:  # ``close`` releases the leases itself
            work.close()
            return None
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _take_or_wait(self, remote: _Remote) -> None:
        """Take the channel's lease and follow it here, or admit the pending
        subscribers once its holder has read the engine's backlog."""
        name = remote.name
        try:
            while self.remote.get(name) is remote:
                [lease] = await self.leases.hold([(name, STARTING, True)], self.lease_s)
                if self.remote.get(name) is not remote:
                    if lease.mine:
                        self._give_up([name])
                    return
                if lease.mine:
                    await self._take(remote)
                    return
                remote.state = lease.state
                if lease.state in (LIVE, ENDED):
                    pending, remote.pending = remote.pending, {}
                    end = ENDED_ELSEWHERE if lease.state == ENDED else None
                    for conn, request, answer in pending.values():
                        self._admit(name, end, conn, request, answer)
                    return
                if not remote.pending:
                    return
                await asyncio.sleep(HOLDER_POLL_S)  # its holder is reading the backlog
        except Unavailable as exc:
            pending, remote.pending = remote.pending, {}
            for _, request, answer in pending.values():
                answer(Error(exc.code, exc.message, request.id))
        finally:
            remote.task = None

    async def _take(self, remote: _Remote) -> None:
        """Follow a channel whose lease this gateway now holds, from the last line its history has."""
        name = remote.name
        try:
            page = await self._host.history(name, limit=LAST_LINES, reverse=True)
        except BaseException:
            self._give_up([name])
            raise
        if self.remote.get(name) is not remote:
            self._give_up([name])
            return
        try:
            self._check_room()
        except WirehubError as exc:  # the next beat tries again, if anyone still watches
            self._give_up([name])
            pending, remote.pending = remote.pending, {}
            for _, request, answer in pending.values():
                answer(Error(exc.code, exc.message, request.id))
            return
        del self.remote[name]
        after = next((ts_key(line) for line in (bytes(pub.data) for pub in page.publications)
                      if line.startswith(LINE_START)), None)
        state = self.channels[name] = self._start(name, after)
        state.pending = remote.pending
        if not state.pending and not self._host.viewers(name):
            self._release(state)
        logger.info("took the lease of %s", name)

    def _announce(self, stream: _Stream) -> None:
        """Tell the cluster what the stream's channels are now (``_LogChannel.word``)."""
        if self.leases is None:
            return
        claims = [(state.name, state.word(), False) for state in stream.channels
                  if self.channels.get(state.name) is state]
        if claims:
            self._spawn(self._hold_quietly(claims))

    async def _hold_quietly(self, claims: list[tuple[str, str, bool]]) -> None:
        try:
            await self.leases.hold(claims, self.lease_s)
        except Unavailable as exc:  # ``_keep`` tries again
            logger.debug("lease update failed: %s", exc)

    def _give_up(self, names: list[str]) -> None:
        if self.leases is not None and names:
            self._spawn(self._release_quietly(names))

    async def _release_quietly(self, names: list[str]) -> None:
        try:
            await self.leases.release(names)
        except Unavailable as exc:  # they expire by themselves
            logger.debug("lease release failed: %s", exc)

    async def _keep(self) -> None:
        # Until ``close``, not only until cancelled: a lease call's timeout
        # expiring as the task is cancelled would swallow the cancellation.
        while not self._closing:
            await asyncio.sleep(self.lease_s / 3)
            try:
                await self._renew()
            except Unavailable as exc:  # the broker's supervisor reports outages
                logger.debug("lease renewal failed: %s", exc)
            except Exception:  # a bug here must not stop the renewals
                logger.exception("lease renewal failed")

    async def _renew(self) -> None:
        """Renew the leases held here, stop what nobody watches, and look for
        channels watched here whose holder has gone."""
        held = list(self.channels.values())
        leases = await self.leases.hold([(state.name, state.word(), False) for state in held],
                                         self.lease_s) if held else []
        for state, lease in zip(held, leases, strict=True):
            if self.channels.get(state.name) is not state:
                continue
            if not lease.mine:
                logger.warning("%s is followed by gateway %s now", state.name, lease.holder)
                self._hand_over(state.stream)
                continue
            state.wanted = lease.wanted
            if state.stop_timer is None and not lease.wanted:
                self._release(state)
        for name, remote in list(self.remote.items()):
            if remote.pending or self._host.viewers(name):
                self._look(remote)
            elif remote.task is None:
                del self.remote[name]

    def metrics_lines(self) -> list[str]:
        s = self.stats
        return [
            "# TYPE wirehub_docker_log_streams gauge",
            f"wirehub_docker_log_streams {s.running}",
            "# TYPE wirehub_docker_log_streams_started_total counter",
            f"wirehub_docker_log_streams_started_total {s.streams_started}",
            "# TYPE wirehub_docker_log_streams_stopped_total counter",
            f"wirehub_docker_log_streams_stopped_total {s.streams_stopped}",
            "# TYPE wirehub_docker_log_lines_total counter",
            f"wirehub_docker_log_lines_total {s.lines}",
            "# TYPE wirehub_docker_log_channels_elsewhere gauge",
            f"wirehub_docker_log_channels_elsewhere {len(self.remote)}",
        ]
