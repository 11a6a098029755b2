"""A resilient asyncio client: reconnects, resumes, queues, and says when it cannot.

::

    async with wirehub.connect("ws://127.0.0.1:8080/ws", token=token) as client:
        sub = await client.subscribe("prices.btc")
        position = await client.publish("prices.btc", {"bid": 101.5})
        async for msg in sub:            # msg.channel, msg.offset, msg.data
            ...

What it does for the application (docs/clients.md has the state table):

* **Reconnects** with exponential backoff and full jitter (a delay drawn
  from 0 to ``min(max_reconnect_interval_s, reconnect_interval_s *
  reconnect_decay ** attempt)``), the attempt count reset once a connection
  has stayed up for ``max_reconnect_interval_s``; it stops on an
  authentication failure and on close codes that say retrying cannot help.
* **Resumes** every subscription with ``since`` = the last offset it
  received into the subscription's buffer (which survives reconnects), so
  the application sees every offset once and in order; what the server
  cannot give back (``recovered: false``, ``lagged``) reaches the
  application as a ``Gap`` (``Subscription.on_gap`` and the ``"gap"``
  event), never silently.
* **Queues** publishes made while disconnected (bounded in count and bytes)
  and sends them in order once resubscribed; every publish carries an
  ``idempotency_key``, so one sent again after a lost answer is not
  published twice (docs/delivery.md, "Retried publishes").
* **Refreshes tokens** through ``get_token`` on ``token_expiring`` and
  before reconnecting; concurrent needs share one call.
* **Uploads files** (``upload``) chunk by chunk, resumed after a reconnect
  by sending only what the gateway does not hold (``client_files``).
* **Keeps to the wire's rules** through ``client_wire.ClientWire``
  (fragments, UTF-8, limits, closing; permessage-deflate offered and used
  both ways), which Autobahn's fuzzingserver checks (docs/conformance.md);
  ``bytes`` data is published as TLV on a binary frame and arrives as bytes.

Time and randomness are injectable (``wirehub.clock``), so the backoff is
tested without waiting.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
import logging
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Self

import msgspec
from picows import WSHandshakeError, WSMsgType, WSTransport

from . import _speedups, client_wire
from .client_files import DEFAULT_CHUNK_BYTES, Progress, Source, Upload, UploadResult
from .client_wire import DEFAULT_MAX_MESSAGE_BYTES, ClientWire, ExtensionRejected
from .clock import Clock
from .protocol.codec import TlvCodec
from .protocol.errors import WirehubError
from .protocol.messages import StreamPosition
from .protocol.patterns import is_pattern

logger = logging.getLogger("wirehub.client")

CONNECTING, CONNECTED, DISCONNECTED, CLOSED = "connecting", "connected", "disconnected", "closed"
# The server closed for a reason reconnecting cannot fix: the client's own
# protocol errors and unsupported data (RFC 6455 §7.4.1).
TERMINAL_CLOSE_CODES = frozenset({1002, 1003, 1007, 1009, 1010})
POLICY_VIOLATION = 1008
RECENT_MESSAGES = 1000  # kept for ``wait_for`` to look at first
WELCOME_TIMEOUT_S = 10.0  # a server that upgrades but never says welcome is not a wirehub gateway


class ClientError(Exception):
    """Base of the client's errors."""


class ClientClosed(ClientError):
    """The client is closed: by the application, or after an error it cannot retry."""


class QueueFull(ClientError):
    """A publish while disconnected found the offline queue full."""


class ConnectionLost(ClientError):
    """A request was sent, and the connection dropped before its answer: it may have run."""


class ServerError(ClientError):
    """The server answered ``error``: ``code`` (docs/protocol.md) and its text."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


class Message(msgspec.Struct, frozen=True, gc=False, tag="message", tag_field="type"):
    """A publication delivered to a subscription.

    A msgspec struct tagged like the server's ``message``, so that a
    publication's frame decodes straight into the object the application
    gets: no dict, no second object (``_Listener.on_message``). Not tracked
    by the cyclic collector (``gc=False``): a frozen record of decoded JSON
    cannot be part of a cycle, and a buffer of many thousands of them would
    otherwise make every collection longer.
    """

    channel: str
    offset: int
    data: Any = None


@dataclass(frozen=True, slots=True)
class Gap:
    """Publications of ``channel`` the application will not see: offsets
    ``first`` to ``last`` when the server knows them. ``reason``: the
    server's (``epoch_changed``, ``history_trimmed``, ``no_history``) or
    ``lagged`` (a slow-consumer policy or ``max_rate`` skipped them)."""

    channel: str
    reason: str
    first: int | None = None
    last: int | None = None


class Subscription:
    """One channel's publications, in offset order: ``async for msg in sub``.

    The buffer holds at most ``max_buffered`` messages. Past it the client
    stops buffering and, once the application has caught up, resumes the
    channel from history (``since``): a slow application costs the server
    history reads, not this process unbounded memory.
    """

    def __init__(self, client: Client, channel: str, max_rate: float | None, max_buffered: int) -> None:
        self.channel = channel
        self.max_rate = max_rate
        self.on_gap: Callable[[Gap], None] | None = None
        # The last offset received and its epoch (``position``), kept as
        # plain values: they change with every message. A fresh subscription
        # starts one below its ``subscribed`` position, since a source's
        # snapshot comes at that offset (``initial_state`` on ``runners``,
        # docs/docker.md); ``_floor`` keeps a resume from asking for less.
        self._offset = -1
        self._floor = -1
        self._epoch: str | None = None
        self._client = client
        self._buffer: collections.deque[Message] = collections.deque()
        self._max_buffered = max_buffered
        self._behind = False  # buffering stopped at max_buffered; resume once drained
        self._waiter: asyncio.Future[None] | None = None  # __anext__ waits on it, when the buffer is empty
        self._ended = False
        self._ready: asyncio.Future[Any] | None = None  # the application's subscribe() waits on it

    @property
    def position(self) -> StreamPosition | None:
        """The last offset received, and its epoch (None before the first ``subscribed``)."""
        return StreamPosition(max(self._offset, self._floor), self._epoch) if self._epoch is not None else None

    @position.setter
    def position(self, position: StreamPosition) -> None:
        self._offset = self._floor = position.offset
        self._epoch = position.epoch

    def _start_at(self, offset: int, epoch: str) -> None:
        """A fresh ``subscribed``: the publications after ``offset`` follow, and
        perhaps a source's snapshot at ``offset`` itself."""
        self._offset, self._floor, self._epoch = offset - 1, offset, epoch

    def __aiter__(self) -> AsyncIterator[Message]:
        return self

    async def __anext__(self) -> Message:
        buffer = self._buffer
        while not buffer:
            if self._ended:
                raise StopAsyncIteration
            if self._behind:
                self._behind = False
                self._client._resume(self)
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        return buffer.popleft()

    async def unsubscribe(self) -> None:
        """Stop the subscription; iteration ends once the buffer is read."""
        await self._client._unsubscribe(self)

    # -- fed by the client ------------------------------------------------------

    def _take(self, msg: Message) -> None:
        if msg.offset <= self._offset:
            return  # already received: sent again by a resume
        if self._behind or len(self._buffer) >= self._max_buffered:
            self._behind = True
            return
        self._offset = msg.offset
        self._buffer.append(msg)
        waiter = self._waiter   # _wake, inline: this runs for every message
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _gap(self, gap: Gap) -> None:
        if self.on_gap is not None:
            self.on_gap(gap)
        self._client._emit("gap", gap)

    def _end(self) -> None:
        self._ended = True
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)


_TEXT = WSMsgType.TEXT
_decode_json = msgspec.json.Decoder().decode
_decode_message = msgspec.json.Decoder(Message).decode
# How the gateway's ``message`` frames start (``JsonCodec.encode_message``):
# the frames that take the typed decoder.
_MESSAGE_PREFIX = b'{"type":"message",'


class _Listener(ClientWire):
    """One connection's messages, decoded and handed to the client: JSON
    text, TLV binary (``client_wire.ClientWire`` reassembles, validates,
    inflates and closes). ``closed`` resolves with (code, reason)."""

    def __init__(self, client: Client, **wire_options: Any) -> None:
        super().__init__(**wire_options)
        self._client = client
        self.welcome: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()

    def on_message(self, opcode: int, payload: bytes) -> None:
        # What the frame path did not take: a compressed or fragmented
        # publication goes to its subscription the same way, once whole.
        if opcode is _TEXT and self.publications is not None and self.take_publication(payload):
            return
        if opcode is _TEXT:
            try:
                msg = _decode_json(payload)
            except msgspec.DecodeError:
                logger.warning("undecodable message from the server")
                return
        else:
            try:
                msg = self._client._tlv.decode_fields(payload)
            except WirehubError as exc:
                logger.warning("undecodable binary message from the server: %s", exc)
                return
            msg_id = msg.get("id")
            if isinstance(msg_id, str) and msg_id.isascii() and msg_id.isdigit():
                msg["id"] = int(msg_id)  # TLV ids are text; the client's are integers
        if not isinstance(msg, dict):
            logger.warning("a message from the server that is not an object")
        elif not self.welcome.done():
            self.welcome.set_result(msg)
            # From now on the frame path hands publications to their
            # subscriptions itself (client_frames.FramePath); what it does not
            # take (compressed or fragmented ones, say) still comes here.
            self.publications = self._client._subscriptions
            self.decode_publication = _decode_message
            self.publication_prefix = _MESSAGE_PREFIX
        else:
            self._client._dispatch(msg)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        super().on_ws_disconnected(transport)
        if not self.welcome.done():
            self.welcome.set_exception(ConnectionError(
                f"closed before welcome: {self.close_code} {self.close_reason}".rstrip()))


PUBLISH, SUBSCRIBE, REQUEST, CONTROL = "publish", "subscribe", "request", "control"


@dataclass(slots=True)
class _Outgoing:
    """A message waiting to be sent, or sent and waiting for its answer.

    What a reconnect does with it depends on ``kind``: a publish is sent
    again (its idempotency key makes that safe), a subscribe is redone by
    the resubscription, a request fails with ``ConnectionLost`` (it may have
    run), a control message (an unsubscribe, a token refresh) is dropped.
    """

    msg: dict[str, Any]
    kind: str
    answer: asyncio.Future[Any] | None
    size: int = 0
    binary: bool = False  # sent as TLV on a binary frame (a publish of bytes)


class Client:
    """A wirehub connection that outlives its sockets. Use ``connect()``.

    Args:
        url: ``ws://`` or ``wss://`` address of the gateway's WebSocket path.
        token: a JWT, sent in the ``Authorization`` header.
        get_token: ``() -> str`` (or awaitable): a fresh token, asked on
            ``token_expiring`` and before each reconnect.
        reconnect_interval_s, max_reconnect_interval_s, reconnect_decay,
        max_reconnect_attempts: the backoff (None: retry for ever).
        max_queued, max_queued_bytes: the offline queue's bounds.
        max_buffered: messages one subscription buffers (``Subscription``).
        compression: offer permessage-deflate (RFC 7692).
        max_message_bytes: the largest message accepted from the server
            (after inflating); a larger one fails the connection with 1009.
        implementation: ``"ext"`` or ``"pure"`` hot-path modules for UTF-8
            checks, inflating and TLV (default: ``wirehub._speedups``' choice).
        clock, rng: time and randomness (tests inject them).
    """

    def __init__(self, url: str, *, token: str | None = None,
                 get_token: Callable[[], str | Awaitable[str]] | None = None,
                 reconnect_interval_s: float = 1.0, max_reconnect_interval_s: float = 30.0,
                 reconnect_decay: float = 1.5, max_reconnect_attempts: int | None = None,
                 max_queued: int = 1000, max_queued_bytes: int = 1 << 20, max_buffered: int = 10_000,
                 compression: bool = True, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 implementation: str | None = None,
                 clock: Clock | None = None, rng: random.Random | None = None) -> None:
        self.url = url
        self.state = DISCONNECTED
        self.close_code: int | None = None
        self.close_reason = ""
        self.client_id: str | None = None
        self.reconnect_interval_s = reconnect_interval_s
        self.max_reconnect_interval_s = max_reconnect_interval_s
        self.reconnect_decay = reconnect_decay
        self.max_reconnect_attempts = max_reconnect_attempts
        self.max_queued = max_queued
        self.max_queued_bytes = max_queued_bytes
        self._max_buffered = max_buffered
        self.compression = compression
        self.max_message_bytes = max_message_bytes
        self._impl = _speedups.load(implementation) if implementation else client_wire.default_implementation()
        self._tlv = TlvCodec(self._impl.tlv)
        self._token = token
        self._get_token = get_token
        self._token_call: asyncio.Future[str] | None = None
        self._clock = clock or Clock()
        self._rng = rng or random.Random()
        self._listeners: dict[str, list[Callable[..., Any]]] = collections.defaultdict(list)
        self._subscriptions: dict[str, Subscription] = {}
        self._uploads: dict[str, Upload] = {}   # by file id (hex)
        self._outbox: collections.deque[_Outgoing] = collections.deque()  # not sent yet
        self._outbox_bytes = 0
        self._in_flight: dict[int, _Outgoing] = {}                          # sent, unanswered
        self._next_id = 0
        self._recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=RECENT_MESSAGES)
        self._waiters: list[tuple[str, Callable[[dict[str, Any]], bool] | None, asyncio.Future[Any]]] = []
        self._transport: WSTransport | None = None
        self._wire: _Listener | None = None
        self._runner: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self._ever_connected = False
        self._error: BaseException | None = None  # why the last attempt failed, or why it stopped
        self._failed_here = False  # the last connection was failed by this client (bad data from the server)

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self, timeout_s: float | None = 10.0) -> None:
        """Start connecting; return once connected the first time.

        Raises:
            ClientClosed: the first connection failed for good (a bad token, or
                ``max_reconnect_attempts`` used up), or ``timeout_s`` passed.
        """
        if self._runner is not None:
            raise ClientError("start() was called already")
        self._runner = asyncio.ensure_future(self._run())
        waiting = asyncio.ensure_future(self._connected.wait())
        await asyncio.wait({waiting, self._runner}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        waiting.cancel()
        if not self._ever_connected:
            await self.close()
            raise ClientClosed(f"could not connect to {self.url}: {self._error or 'timed out'}")

    async def close(self) -> None:
        """Close the connection and end every subscription; queued publishes fail."""
        if self.state == CLOSED:
            return
        self._finish(ClientClosed("the client was closed"))
        if self._transport is not None and self._wire is not None:
            self._wire.close(1000)
            self._transport.disconnect()
        if self._runner is not None and self._runner is not asyncio.current_task():
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def on(self, event: str, callback: Callable[..., Any]) -> None:
        """``"state"``: ``callback(state, code, reason)`` on every change;
        ``"gap"``: ``callback(Gap)``; ``"message"``: ``callback(dict)`` for
        every server message but publications."""
        self._listeners[event].append(callback)

    # -- the application's calls ------------------------------------------------------

    async def subscribe(self, channel: str, *, max_rate: float | None = None) -> Subscription:
        """Subscribe (resumed by every reconnect); return the ``Subscription``.

        Raises:
            ValueError: already subscribed to ``channel``, or ``channel`` is a pattern.
            ServerError: the server refused (``forbidden``, ``invalid_channel``, ...).
        """
        self._check_open()
        if channel in self._subscriptions:
            raise ValueError(f"already subscribed to {channel!r}: use that Subscription")
        if is_pattern(channel):
            raise ValueError(f"{channel!r} is a pattern: this client subscribes to channels (a pattern "
                             "has no offsets to resume from)")
        sub = Subscription(self, channel, max_rate, self._max_buffered)
        self._subscriptions[channel] = sub
        sub._ready = asyncio.get_running_loop().create_future()
        if self.state == CONNECTED:
            self._transmit(_Outgoing(self._subscribe_msg(sub), SUBSCRIBE, sub._ready))
        # else: the next connection subscribes it (_on_connected)
        try:
            await sub._ready
        except BaseException:
            if self._subscriptions.get(channel) is sub:
                del self._subscriptions[channel]
            raise
        return sub

    async def publish(self, channel: str, data: Any, *, key: str | None = None) -> StreamPosition:
        """Publish ``data``; return its position once the server has it.
        Queued while disconnected.

        ``bytes``, ``bytearray`` or ``memoryview`` data goes as a binary
        publication (TLV on a binary frame, docs/protocol.md): subscribers
        get exactly these bytes as ``Message.data``. Anything else must be
        what msgspec encodes as JSON.

        Raises:
            TypeError: ``data`` cannot be encoded as JSON.
            QueueFull: disconnected, and the offline queue is full.
            ServerError: the server refused (``forbidden``, ``invalid_channel``, ...).
        """
        binary = isinstance(data, (bytes, bytearray, memoryview))
        msg: dict[str, Any] = {"type": "publish", "channel": channel,
                               "data": bytes(data) if binary else msgspec.Raw(_encode(data)),
                               "idempotency_key": uuid.uuid4().hex}
        if key is not None:
            msg["key"] = key
        reply = await self._send(msg, PUBLISH, binary)
        return StreamPosition(reply["offset"], reply.get("epoch") or "")

    async def upload(self, source: Source, *, name: str | None = None, channel: str | None = None,
                     file_id: bytes | None = None, chunk_size: int = DEFAULT_CHUNK_BYTES,
                     on_progress: Progress | None = None) -> UploadResult:
        """Upload ``source`` (bytes, or a file's path) to the gateway's
        ``file_dir``; return once the gateway has it complete and verified.

        It survives reconnects: each new connection resumes the upload,
        sending only the chunks the gateway does not hold. ``file_id`` (16
        bytes; random by default) names the upload: the same id resumes it
        from another client or process. ``on_progress(acknowledged_bytes,
        size)`` is called as chunks are acknowledged. With ``channel``, the
        gateway publishes a ``file`` message there once the file is complete.

        Raises:
            ServerError: the gateway refused it (``forbidden``, ``invalid_name``,
                ``file_too_large``, ``quota_exceeded``, ``checksum_mismatch``, ...;
                docs/protocol.md, "File transfer").
            ClientClosed: the client closed first.
            ValueError: the same ``file_id`` is being uploaded already.
        """
        self._check_open()
        upload = Upload(self, source, name=name, channel=channel, file_id=file_id, chunk_size=chunk_size,
                        on_progress=on_progress)
        key = upload.file_id.hex()
        if key in self._uploads:
            raise ValueError(f"file {key} is being uploaded already")
        self._uploads[key] = upload
        try:
            return await upload.run()
        finally:
            del self._uploads[key]

    async def request(self, message: dict[str, Any], timeout_s: float = 10.0) -> dict[str, Any]:
        """Send an application message (``Gateway.on``) and return the
        server's answer (matched by ``id``).

        Raises:
            ConnectionLost: sent, and the connection dropped before the answer.
            ServerError, asyncio.TimeoutError.
        """
        if "type" not in message:
            raise ValueError("a message needs a `type`")
        return await asyncio.wait_for(self._send(dict(message), REQUEST), timeout_s)

    async def wait_for(self, msg_type: str, timeout_s: float = 5.0,
                       predicate: Callable[[dict[str, Any]], bool] | None = None) -> dict[str, Any]:
        """The next server message of ``msg_type`` (that ``predicate``
        accepts), looking first at the last ones already received.

        Raises:
            asyncio.TimeoutError: none came within ``timeout_s``.
        """
        for msg in self._recent:
            if msg.get("type") == msg_type and (predicate is None or predicate(msg)):
                self._recent.remove(msg)
                return msg
        waiter: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        entry = (msg_type, predicate, waiter)
        self._waiters.append(entry)
        try:
            return await asyncio.wait_for(waiter, timeout_s)
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(entry)

    # -- the connection loop -----------------------------------------------------------

    async def _run(self) -> None:
        attempt = 0
        try:
            while True:
                self._set_state(CONNECTING)
                connected_at = None
                try:
                    connected_at, code, reason = await self._connect_once()
                except _Terminal as exc:
                    self._error = exc
                    self._finish(ClientClosed(str(exc)))
                    return
                except (TimeoutError, OSError, WSHandshakeError, ConnectionError) as exc:
                    self._error = exc
                    code, reason = None, str(exc)
                if connected_at is not None:
                    if self._clock.monotonic() - connected_at >= self.max_reconnect_interval_s:
                        attempt = 0
                    if code in TERMINAL_CLOSE_CODES or (code == POLICY_VIOLATION and not self._can_refresh(reason)):
                        by = "the client failed the connection" if self._failed_here else "closed by the server"
                        self._finish(ClientClosed(f"{by}: {code} {reason}"), code, reason)
                        return
                self._set_state(DISCONNECTED, code, reason)
                attempt += 1
                if self.max_reconnect_attempts is not None and attempt > self.max_reconnect_attempts:
                    self._error = ClientClosed(f"gave up after {attempt - 1} reconnect attempts: {reason}")
                    self._finish(self._error, code, reason)
                    return
                await self._clock.sleep(self.backoff_s(attempt))
        except asyncio.CancelledError:
            pass

    def backoff_s(self, attempt: int) -> float:
        """The delay before reconnect ``attempt`` (1, 2, ...): full jitter."""
        ceiling = min(self.max_reconnect_interval_s, self.reconnect_interval_s * self.reconnect_decay ** (attempt - 1))
        return self._rng.uniform(0, ceiling)

    async def _connect_once(self) -> tuple[float, int, str]:
        """One connection, from the handshake to its close: (connected at, code, reason)."""
        if self._get_token is not None and self.state != CLOSED:
            self._token = await self._fresh_token()
        headers = {"Authorization": f"Bearer {self._token}"} if self._token else None
        try:
            transport, listener = await client_wire.connect(
                self.url, _Listener, client=self, compression=self.compression,
                max_message_bytes=self.max_message_bytes, impl=self._impl, extra_headers=headers)
        except WSHandshakeError as exc:
            status = exc.response.status if exc.response is not None else None
            if status == 401 and self._get_token is None:
                raise _Terminal(f"the server refused the token: {(exc.raw_body or b'').decode()[:200]}") from exc
            raise
        except ExtensionRejected as exc:
            raise _Terminal(f"{exc} (compression=False does not offer it)") from exc
        self._transport, self._wire = transport, listener
        try:
            try:
                welcome = await asyncio.wait_for(listener.welcome, WELCOME_TIMEOUT_S)
            except TimeoutError:
                transport.disconnect()
                raise
            self.client_id = welcome.get("client_id")
            connected_at = self._clock.monotonic()
            self._on_connected()
            code, reason = await listener.closed
            self._failed_here = listener.failed
        finally:
            self._transport = self._wire = None
            self._connected.clear()
            self._on_disconnected()
        return connected_at, code, reason

    def _on_connected(self) -> None:
        """Resubscribe, then send what waited, in order: each subscription
        resumes before any queued publish can reach it."""
        for sub in self._subscriptions.values():
            answer = sub._ready if sub._ready is not None and not sub._ready.done() else None
            self._transmit(_Outgoing(self._subscribe_msg(sub), SUBSCRIBE, answer))
        while self._outbox:
            out = self._outbox.popleft()
            self._outbox_bytes -= out.size
            self._transmit(out)
        self._set_state(CONNECTED)
        self._ever_connected = True
        self._connected.set()

    def _on_disconnected(self) -> None:
        """Publishes in flight go back to the front of the queue, in order;
        requests in flight fail; subscribes are redone by the next connection;
        uploads begin again on it."""
        for upload in self._uploads.values():
            upload.interrupted()
        again = []
        for out in self._in_flight.values():
            if out.answer is None or out.answer.done():
                continue
            if out.kind == PUBLISH:
                again.append(out)
            elif out.kind == REQUEST:
                out.answer.set_exception(ConnectionLost("the connection dropped before the answer"))
        self._in_flight.clear()
        for out in reversed(again):
            self._outbox.appendleft(out)
            self._outbox_bytes += out.size

    # -- sending -----------------------------------------------------------------------

    async def _send(self, msg: dict[str, Any], kind: str, binary: bool = False) -> Any:
        """Send now, or queue until connected (bounded); return the answer."""
        self._check_open()
        out = _Outgoing(msg, kind, asyncio.get_running_loop().create_future(), binary=binary)
        if self.state == CONNECTED:
            self._transmit(out)
        else:
            out.size = len(self._tlv.encode_fields(msg) if binary else _encode(msg))
            if len(self._outbox) >= self.max_queued or self._outbox_bytes + out.size > self.max_queued_bytes:
                raise QueueFull(f"offline queue full ({len(self._outbox)} messages, {self._outbox_bytes} bytes)")
            self._outbox.append(out)
            self._outbox_bytes += out.size
        return await out.answer  # type: ignore[misc]

    def _register(self, out: _Outgoing) -> bytes:
        """Give ``out`` the next id, remember it until answered, encode it."""
        self._next_id += 1
        out.msg["id"] = self._next_id
        self._in_flight[self._next_id] = out
        return self._tlv.encode_fields(out.msg) if out.binary else _encode(out.msg)

    def _transmit(self, out: _Outgoing) -> None:
        """Register ``out`` and send it, as TLV on a binary frame or as JSON."""
        payload = self._register(out)
        self._write(payload, WSMsgType.BINARY if out.binary else WSMsgType.TEXT)

    async def _wait_connected(self) -> None:
        """Return once connected.

        Raises:
            ClientClosed: the client is (or gets) closed first.
        """
        while self.state != CONNECTED:
            self._check_open()
            waiting = asyncio.ensure_future(self._connected.wait())
            await asyncio.wait([waiting, *([self._runner] if self._runner is not None else [])],
                               return_when=asyncio.FIRST_COMPLETED)
            waiting.cancel()

    def _send_chunk(self, file_id: bytes, index: int, count: int, data: bytes | memoryview) -> None:
        """A file chunk, never compressed: files worth uploading are mostly
        compressed already (archives, images), and deflating them cost the
        client 24 CPU-s/GB, capping an upload at ~40 MB/s (bench/file_upload.py)."""
        assert self._wire is not None
        self._wire.send(WSMsgType.BINARY, self._tlv.encode_chunk(file_id, index, count, data), compress=False)

    def _write(self, payload: bytes, opcode: WSMsgType = WSMsgType.TEXT) -> None:
        assert self._wire is not None
        self._wire.send(opcode, payload)

    def _subscribe_msg(self, sub: Subscription) -> dict[str, Any]:
        msg: dict[str, Any] = {"type": "subscribe", "channel": sub.channel}
        if sub.position is not None and sub.position.epoch:
            msg["since"] = {"offset": sub.position.offset, "epoch": sub.position.epoch}
        if sub.max_rate is not None:
            msg["max_rate"] = sub.max_rate
        return msg

    def _resume(self, sub: Subscription) -> None:
        """A subscription that stopped buffering has caught up: resubscribe from where it is."""
        if self._transport is None:
            return  # the next connection resubscribes it anyway
        self._write(_encode({"type": "unsubscribe", "channel": sub.channel}))
        self._transmit(_Outgoing(self._subscribe_msg(sub), SUBSCRIBE, None))

    async def _unsubscribe(self, sub: Subscription) -> None:
        if self._subscriptions.get(sub.channel) is not sub:
            return
        del self._subscriptions[sub.channel]
        sub._end()
        if self.state == CONNECTED:
            self._transmit(_Outgoing({"type": "unsubscribe", "channel": sub.channel}, CONTROL, None))

    # -- receiving ---------------------------------------------------------------------

    def _dispatch(self, msg: dict[str, Any]) -> None:
        msg_type = msg.get("type")
        if msg_type == "file_ack":
            upload = self._uploads.get(msg.get("file_id"))
            if upload is not None:
                upload.acked(msg["index"])
            return
        if msg_type == "error" and msg.get("id") is None:
            self._upload_error(msg)
        if msg_type == "message":
            sub = self._subscriptions.get(msg["channel"])
            if sub is not None:
                sub._take(Message(sub.channel, msg["offset"], msg.get("data")))
            return
        if msg_type == "subscribed":
            self._subscribed(msg)
        elif msg_type == "lagged":
            sub = self._subscriptions.get(msg["channel"])
            if sub is not None:
                sub._gap(Gap(sub.channel, "lagged", msg.get("from"), msg.get("to")))
        elif msg_type == "unsubscribed" and msg.get("reason"):
            sub = self._subscriptions.pop(msg["channel"], None)
            if sub is not None:
                sub._end()
        elif msg_type == "token_expiring" and self._get_token is not None:
            asyncio.ensure_future(self._refresh_in_place())
        out = self._in_flight.pop(msg["id"], None) if isinstance(msg.get("id"), int) else None
        if out is not None:
            self._answered(out, msg)
        self._recent.append(msg)
        for waiter in list(self._waiters):
            wanted, predicate, future = waiter
            if wanted == msg_type and not future.done() and (predicate is None or predicate(msg)):
                future.set_result(msg)
                self._recent.remove(msg)
                break
        self._emit("message", msg)

    def _upload_error(self, msg: dict[str, Any]) -> None:
        """A chunk's error fails its upload, but ``duplicate_chunk`` (the
        gateway has it), ``rate_limited`` (the upload begins again after a
        pause, learning what is held) and ``unknown_file`` (the partial
        upload expired: beginning again starts it afresh). An older
        gateway's ``rate_limited`` names nothing: it may have been any
        upload's chunk."""
        upload = self._uploads.get(msg.get("file_id"))
        code = msg.get("code")
        if upload is not None:
            if code == "duplicate_chunk" and msg.get("index") is not None:
                upload.acked(msg["index"])
            elif code in ("rate_limited", "unknown_file"):
                upload.interrupted(refused=code == "rate_limited")
            else:
                upload.failed(ServerError(code or "?", msg.get("error", "")))
        elif code == "rate_limited" and msg.get("index") is None:
            for upload in self._uploads.values():
                upload.interrupted(refused=True)

    def _answered(self, out: _Outgoing, msg: dict[str, Any]) -> None:
        if msg.get("type") == "error":
            error = ServerError(msg.get("code", "?"), msg.get("error", ""))
            if out.kind == SUBSCRIBE and out.answer is None:
                # A resubscription refused (a refreshed token no longer covers it): end it.
                sub = self._subscriptions.pop(out.msg["channel"], None)
                if sub is not None:
                    logger.warning("resubscribing %r failed: %s", sub.channel, error)
                    sub._end()
            if out.answer is not None and not out.answer.done():
                out.answer.set_exception(error)
        elif out.answer is not None and not out.answer.done():
            out.answer.set_result(msg)

    def _subscribed(self, msg: dict[str, Any]) -> None:
        sub = self._subscriptions.get(msg["channel"])
        position = msg.get("position")
        if sub is None or position is None:
            return
        previous = sub.position
        if previous is None or "recovered" not in msg:
            sub._start_at(position["offset"], position["epoch"])
        elif msg["recovered"]:
            return
        else:
            reason = msg.get("reason", "not_recovered")
            missed = msg.get("missed") or {}
            sub._gap(Gap(sub.channel, reason, missed.get("from"), missed.get("to")))
            if position["epoch"] != previous.epoch:
                # A new stream: whatever it kept is sent from its first offset.
                sub.position = StreamPosition(0, position["epoch"])
            elif missed:
                sub.position = StreamPosition(missed["to"], position["epoch"])

    # -- tokens ------------------------------------------------------------------------

    async def _fresh_token(self) -> str:
        """``get_token()``, one call shared by everyone who needs it now."""
        assert self._get_token is not None
        if self._token_call is None or self._token_call.done():
            async def call() -> str:
                token = self._get_token()  # type: ignore[misc]
                return await token if inspect.isawaitable(token) else token
            self._token_call = asyncio.ensure_future(call())
        return await asyncio.shield(self._token_call)

    async def _refresh_in_place(self) -> None:
        try:
            self._token = await self._fresh_token()
        except Exception:
            logger.exception("get_token failed; the connection will close when the token expires")
            return
        if self._transport is not None:
            self._transmit(_Outgoing({"type": "auth", "token": self._token}, CONTROL, None))

    def _can_refresh(self, reason: str) -> bool:
        return self._get_token is not None and reason == "token expired"

    # -- state -------------------------------------------------------------------------

    def _set_state(self, state: str, code: int | None = None, reason: str = "") -> None:
        if state == self.state and code is None:
            return
        self.state, self.close_code, self.close_reason = state, code, reason
        self._emit("state", state, code, reason)

    def _emit(self, event: str, *args: Any) -> None:
        for callback in self._listeners.get(event, ()):
            try:
                callback(*args)
            except Exception:
                logger.exception("%s callback failed", event)

    def _check_open(self) -> None:
        if self.state == CLOSED:
            raise ClientClosed("the client is closed")

    def _finish(self, error: ClientError, code: int | None = None, reason: str = "") -> None:
        """Closed for good: fail what waits, end the subscriptions."""
        waiting = [out.answer for out in [*self._outbox, *self._in_flight.values()]]
        waiting += [sub._ready for sub in self._subscriptions.values()]
        for answer in waiting:
            if answer is not None and not answer.done():
                answer.set_exception(error)
        self._outbox.clear()
        self._outbox_bytes = 0
        self._in_flight.clear()
        for sub in self._subscriptions.values():
            sub._end()
        for upload in self._uploads.values():
            upload.failed(error)
        self._set_state(CLOSED, code, reason)


class _Terminal(Exception):
    """A connection failure that reconnecting cannot fix."""


def _encode(obj: Any) -> bytes:
    try:
        return msgspec.json.encode(obj)
    except TypeError as exc:
        raise TypeError(f"not JSON-serializable: {exc}") from None


@contextlib.asynccontextmanager
async def connect(url: str, **options: Any) -> AsyncIterator[Client]:
    """A started ``Client`` (see its arguments), closed on exit."""
    client = Client(url, **options)
    await client.start()
    try:
        yield client
    finally:
        await client.close()
