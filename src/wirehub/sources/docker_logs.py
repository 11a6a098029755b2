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
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import datetime
import email.utils
import logging
import select
import socket
import ssl
import threading
import time
from typing import Any

import msgspec

from ..protocol.errors import Forbidden, InvalidChannel, InvalidField, TooManySubscriptions, WirehubError
from ..protocol.messages import Error, Subscribe, Subscribed
from .base import Answer, Handoff, SourceHost, Subscriber
from .docker_engine import Engine
from .docker_stream import ChunkedDecoder, EngineStreamError, LogDecoder, StreamFormatError

logger = logging.getLogger("wirehub.sources.docker_logs")

PREFIX = "logs:"
# Channels no longer followed whose last line is remembered (``DockerLogsSource._seen``).
SEEN_CHANNELS = 4096
RESOLVED, CAUGHT_UP, END, ERROR = "resolved", "caught_up", "end", "error"
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

    __slots__ = ("container", "container_id", "handoff", "reader", "channels", "caught_up", "running")

    def __init__(self, container: str) -> None:
        self.container = container              # as the first channel named it
        self.container_id: str | None = None    # once claimed
        self.handoff: Handoff | None = None
        self.reader: _Reader | None = None
        self.channels: list[_LogChannel] = []
        self.caught_up = False
        self.running = False


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


class _LogChannel:
    """One ``logs:<container>`` channel: its own offsets, ring and pending subscribers."""

    __slots__ = ("name", "stream", "ring", "ring_bytes", "pending", "end", "stop_timer", "after", "last")

    def __init__(self, name: str, stream: _Stream, after: bytes | None = None) -> None:
        self.name = name
        self.stream = stream
        self.ring: collections.deque[tuple[int, bytes]] = collections.deque()
        self.ring_bytes = 0
        self.pending: dict[str, tuple[Subscriber, Subscribe, Answer]] = {}
        self.end: tuple[int, bytes] | None = None
        self.stop_timer: asyncio.TimerHandle | None = None
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

    def keep(self, offset: int, line: bytes, max_lines: int, max_bytes: int) -> None:
        """Add a published line to the ring; the oldest go past either limit."""
        ring = self.ring
        ring.append((offset, line))
        self.ring_bytes += len(line)
        while len(ring) > max_lines or self.ring_bytes > max_bytes:
            self.ring_bytes -= len(ring.popleft()[1])


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
    """

    def __init__(self, engine: Engine, *, ring_lines: int = 1000, ring_bytes: int = 8 << 20,
                 max_streams: int = 256, stop_grace_s: float = 0.5, quiet_s: float = 0.05,
                 catch_up_max_s: float = 1.0, queue_lines: int = 8192, queue_bytes: int = 8 << 20,
                 batch_lines: int = 128) -> None:
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

    # -- Source ---------------------------------------------------------------

    def owns(self, channel: str) -> bool:
        return channel.startswith(PREFIX)

    def bind(self, host: SourceHost) -> None:
        self._host = host

    async def start(self) -> None:
        pass  # streams start with their first subscriber

    async def close(self) -> None:
        for stream in list(self.streams):
            self._stop(stream)
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
            # A new name may turn out to be an alias, but only the engine can
            # tell: it takes a place (and a thread) while it is resolved.
            if len(self.streams) >= self.max_streams:
                raise TooManySubscriptions(f"the gateway follows at most {self.max_streams} containers at once")
            state = self.channels[channel] = self._start(channel)
        if state.stop_timer is not None:
            state.stop_timer.cancel()
            state.stop_timer = None
        if state.stream.caught_up:
            self._admit(state, conn, request, answer)
        else:
            state.pending[conn.client_id] = (conn, request, answer)
        return False

    def cancel(self, conn: Subscriber, channel: str) -> bool:
        state = self.channels.get(channel)
        if state is None or state.pending.pop(conn.client_id, None) is None:
            return False
        self._release(state)
        return True

    def forget(self, conn: Subscriber) -> None:
        for state in list(self.channels.values()):
            if state.pending.pop(conn.client_id, None) is not None:
                self._release(state)

    def vacated(self, channel: str) -> None:
        state = self.channels.get(channel)
        if state is not None:
            self._release(state)

    # -- streams and channels --------------------------------------------------

    def _start(self, name: str) -> _LogChannel:
        """A channel with a stream of its own, whose reader resolves the container."""
        stream = _Stream(name[len(PREFIX):])
        state = _LogChannel(name, stream, self._seen.pop(name, None))
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
        emit, name = self._host.emit, state.name
        for _, line in stream.channels[0].ring:
            if state.is_new(line):
                state.keep(emit(name, line), line, self.ring_lines, self.ring_bytes)
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

    def _stop(self, stream: _Stream) -> None:
        """Stop the stream and forget its channels."""
        self.streams.discard(stream)
        for state in stream.channels:
            if self.channels.get(state.name) is state:
                del self.channels[state.name]
                self._remember(state)
            if state.stop_timer is not None:
                state.stop_timer.cancel()
                state.stop_timer = None
        if stream.reader is not None:
            stream.reader.stop()
            stream.reader = None
        self._finished(stream)
        logger.info("stopped following logs of %s", stream.container)

    def _release(self, state: _LogChannel) -> None:
        """A subscriber left: detach the channel after the grace period if it was the last."""
        if state.stop_timer is None and not state.pending and self._host.viewers(state.name) == 0:
            state.stop_timer = asyncio.get_running_loop().call_later(
                self.stop_grace_s, self._detach_if_unwatched, state)

    def _detach_if_unwatched(self, state: _LogChannel) -> None:
        """Forget an unwatched channel; the stream stops with its last channel."""
        state.stop_timer = None
        if state.pending or self._host.viewers(state.name) != 0:
            return
        stream = state.stream
        if len(stream.channels) == 1:
            self._stop(stream)
            return
        del self.channels[state.name]
        self._remember(state)
        stream.channels.remove(state)

    def _remember(self, state: _LogChannel) -> None:
        if state.last is not None:
            self._seen.pop(state.name, None)
            self._seen[state.name] = ts_key(state.last)
            while len(self._seen) > SEEN_CHANNELS:
                del self._seen[next(iter(self._seen))]

    def _admit(self, state: _LogChannel, conn: Subscriber, request: Subscribe, answer: Answer) -> None:
        if not self._host.allowed(conn, state.name):
            answer(Error(Forbidden.code, f"not allowed to subscribe to {state.name[:64]!r}", request.id))
            return
        if request.since is not None or request.tail:
            # The lines are in the channel's history too (the ``logs:**``
            # default DockerSources installs), with the offsets they were
            # published at, across restarts of the stream: the hub's recovery
            # sends the asked ones and joins the live stream to them.
            try:
                self._host.recover(conn, state.name, request, answer)
            except WirehubError as exc:
                answer(Error(exc.code, exc.message, request.id))
            return
        # One callback: the reply, the end of an ended stream, the join.
        answer(Subscribed(state.name, request.id))
        if state.end is not None:
            self._host.send_history(conn, state.name, [state.end])
        self._host.join(conn, state.name, request.max_rate)

    def _admit_pending(self, state: _LogChannel) -> None:
        pending, state.pending = state.pending, {}
        for conn, request, answer in pending.values():
            self._admit(state, conn, request, answer)

    def _catch_up(self, stream: _Stream) -> None:
        if stream.caught_up:
            return
        stream.caught_up = True
        for state in stream.channels:
            self._admit_pending(state)

    def _deliver(self, stream: _Stream, items: list[Any]) -> None:
        if stream not in self.streams:
            return  # stopped while these were queued
        emit = self._host.emit
        channels = stream.channels
        max_lines, max_bytes = self.ring_lines, self.ring_bytes
        lines = 0
        for item in items:
            if type(item) is bytes:
                for state in channels:
                    if state.after is None or state.is_new(item):
                        state.keep(emit(state.name, item), item, max_lines, max_bytes)
                        state.last = item
                lines += 1
                continue
            kind, value = item
            if kind == RESOLVED:
                self._resolved(stream, *value)
            elif kind == CAUGHT_UP:
                self._catch_up(stream)
            elif kind == END:
                self._catch_up(stream)
                for state in channels:
                    state.end = (emit(state.name, value), value)
                stream.reader = None
                self._finished(stream)
                for state in channels:
                    self._release(state)
            elif kind == ERROR:
                self._fail(stream, value)
        self.stats.lines += lines

    def _fail(self, stream: _Stream, error: WirehubError) -> None:
        """The stream could not start: answer the waiting subscribers and forget its channels."""
        stream.reader = None
        self._stop(stream)
        for state in stream.channels:
            pending, state.pending = state.pending, {}
            for _, request, answer in pending.values():
                answer(Error(error.code, error.message, request.id))

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
        ]
