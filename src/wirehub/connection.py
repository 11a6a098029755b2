"""One WebSocket client: decoded messages in, replies and publications out.

``Connection`` is the sink of a ``FrameListener`` (the compiled receive path):
the listener hands it whole, validated, rate-limited messages; it decodes
them with the codec of the frame they came in, runs the middleware chain and
dispatches. Everything it sends goes through the connection's ``OutBatch``,
so replies and publications reach the client in the order they were queued.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from .auth import Principal
from .clock import Timer
from .hub import OP_BINARY, OP_TEXT
from .protocol.codec import JsonCodec, TlvCodec
from .protocol.errors import (AuthCode, AuthError, CloseCode, ErrorCode, FileCode, FileError, Forbidden,
                              NotAuthenticated, RateLimited, WirehubError)
from .protocol.messages import (Auth, Authenticated, AuthFailed, CustomMessage, Error, FileAck, FileBegin,
                                FileChunk, FileDone, FileEnd, FileReady, HistoryRequest, Ping, Pong, Publish,
                                Published, Reply, StreamPosition, Subscribe, Subscribed, TokenExpiring,
                                Unsubscribe, Unsubscribed, Welcome)
from .protocol.patterns import is_pattern

if TYPE_CHECKING:
    from picows import WSUpgradeRequest

    from .files import FileStore

    from .protocol.permessage_deflate import DeflateParams

    from .gateway import Gateway

logger = logging.getLogger("wirehub.connection")

_NO_SUBSCRIPTIONS: frozenset[str] = frozenset()
# The permission claim a token needs to upload files.
FILES_UPLOAD = "files:upload"


def _error(exc: WirehubError, msg_id: Any) -> Error:
    """The ``error`` reply for ``exc``; a file transfer's names its file and chunk."""
    if isinstance(exc, FileError):
        return Error(exc.code, exc.message, msg_id, exc.file_id, exc.index)
    return Error(exc.code, exc.message, msg_id)


def _answering(result: Any, msg: Any) -> Any:
    """A handler's dict answer carries the request's ``id`` (unless it set
    one), so that clients match answers to requests without the handler's help."""
    msg_id = getattr(msg, "id", None)
    if msg_id is not None and isinstance(result, dict) and "id" not in result:
        return {**result, "id": msg_id}
    return result


class _ClientIds:
    """Unguessable client ids, 8 random bytes each, drawn from one
    ``os.urandom`` call per ``IDS_PER_DRAW`` ids: a ``getrandom`` system call
    per connection (``secrets.token_hex``) was ~7 % of a handshake."""

    IDS_PER_DRAW = 512

    def __init__(self) -> None:
        self._pool = b""
        self._next = 0

    def next(self) -> str:
        start = self._next
        if start == len(self._pool):
            self._pool, start = os.urandom(8 * self.IDS_PER_DRAW), 0
        self._next = start + 8
        return self._pool[start:start + 8].hex()


_client_ids = _ClientIds()
os.register_at_fork(after_in_child=_client_ids.__init__)  # a forked worker draws its own


class Connection:
    """A connected client, as the application sees it (hooks, handlers, middleware).

    Attributes:
        client_id: unique id, sent to the client in ``welcome``.
        subscriptions: names of the channels (and patterns) it is subscribed to.
        request: the HTTP upgrade request (path, headers), for the connect
            hooks; ``None`` once they have returned (coroutine hooks: once
            they have finished). Copy what you need from the headers there:
            a browser's upgrade request costs 1-3 KiB per connection.
        path: the path the client connected to (kept; see ``query``).
        query: the upgrade request's query string, parsed with
            ``urllib.parse.parse_qs`` (kept).
        remote_address: ``(host, port)`` of the peer.
        principal: who it is and what its token allows (``wirehub.auth``);
            ``None`` until it authenticates.
    """

    __slots__ = ("client_id", "subscriptions", "request", "principal", "listener",
                 "batch", "compressor", "fanout_group", "_target", "_threshold", "_gateway", "_hub",
                 "_json", "_tlv", "_middleware", "_metrics", "_timer", "_handlers", "_remote_address",
                 "_chunks_writing", "_reading_paused", "__weakref__")

    def __init__(self, gateway: Gateway, request: WSUpgradeRequest,
                 deflate: DeflateParams | None = None, principal: Principal | None = None) -> None:
        self.client_id = _client_ids.next()
        self.principal = principal
        self._timer: Timer | None = None
        # Running async handlers (Gateway.on): referenced here so they are not
        # collected mid-run, and counted against a per-connection limit.
        self._handlers: set[asyncio.Future[Any]] | None = None
        # Hub.subscribe makes it a set: idle connections share this empty one.
        self.subscriptions: set[str] | frozenset[str] = _NO_SUBSCRIPTIONS
        self.request: WSUpgradeRequest | None = request
        self._target: bytes = request.path
        self._remote_address: tuple[str, int] | None = None
        self._gateway = gateway
        self._hub = gateway.hub
        self._json: JsonCodec = gateway.json_codec
        self._tlv: TlvCodec = gateway.tlv_codec
        self._middleware = gateway.middleware
        self._metrics = gateway.metrics
        self.compressor, self.fanout_group, inflater_factory = gateway.compression(deflate)
        self._threshold = gateway.config.deflate_threshold_bytes
        self.listener = gateway.impl.listener.FrameListener(
            gateway.flusher, gateway.config, self, inflater_factory)
        self.batch: Any = None
        self._chunks_writing = 0     # file chunks taken and not yet on disk
        self._reading_paused = False

    def push(self, opcode: int, payload: bytes) -> bool:
        """Queue one message, compressed when permessage-deflate was agreed and
        it is not below the threshold."""
        compressor = self.compressor
        if compressor is not None and len(payload) >= self._threshold:
            return self.batch.push_frame(opcode, compressor.compress(payload), True)
        return self.batch.push_frame(opcode, payload)

    def welcome_frame(self) -> bytes:
        """The framed ``welcome``, which the gateway sends in the same write
        as its 101 answer (``gateway.SwitchingProtocols``)."""
        return self._gateway.impl.frame.build_frame(
            OP_TEXT, self._json.encode(Welcome(self.client_id, self._gateway.server_name)))

    # -- public API -----------------------------------------------------------

    @property
    def remote_address(self) -> tuple[str, int] | None:
        """``(host, port)`` of the peer (asked of the socket on first use)."""
        if self._remote_address is None and self.listener.transport is not None:
            peer = self.listener.transport.underlying_transport.get_extra_info("peername")
            self._remote_address = tuple(peer[:2]) if peer else None
        return self._remote_address

    @property
    def path(self) -> str:
        """The path of the upgrade request, without the query string."""
        return urlsplit(self._target.decode("latin-1")).path

    @property
    def query(self) -> dict[str, list[str]]:
        """The upgrade request's query parameters (``urllib.parse.parse_qs``)."""
        return parse_qs(urlsplit(self._target.decode("latin-1")).query)

    def send(self, obj: Any) -> bool:
        """Send ``obj`` (a reply Struct, or anything msgspec encodes) as a JSON text frame."""
        return self.push(OP_TEXT, self._json.encode(obj))

    def send_bytes(self, data: bytes) -> bool:
        """Send ``data`` as one binary frame."""
        return self.push(OP_BINARY, data)

    def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Start the closing handshake (queued frames are flushed first)."""
        self.listener.close(code, reason)

    # -- listener sink --------------------------------------------------------

    def on_open(self) -> None:
        self.batch = self.listener.batch
        self._hub.clients[self.client_id] = self
        self._metrics.connections_total += 1
        self._metrics.connections_current += 1
        if self.principal is None:
            self._timer = self._gateway.clock.call_later(self._gateway.config.auth_timeout_s, self._auth_timeout)
        else:
            self._watch_expiry()
        running = self._gateway.run_hooks("connect", self)
        if running:
            self._release_request_after(running)
        else:
            self.request = None

    def _release_request_after(self, hooks: list[asyncio.Future[Any]]) -> None:
        left = len(hooks)

        def done(_: object) -> None:
            nonlocal left
            left -= 1
            if not left:
                self.request = None

        for hook in hooks:
            hook.add_done_callback(done)

    def on_close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._hub.drop(self)
        self._metrics.connections_current -= 1
        self._gateway.run_hooks("disconnect", self)

    def on_text(self, payload: bytes) -> None:
        metrics = self._metrics
        metrics.messages_received_total += 1
        metrics.received_bytes_total += len(payload)
        self._handle(payload, self._json, OP_TEXT)

    def on_binary(self, payload: bytes) -> None:
        metrics = self._metrics
        metrics.messages_received_total += 1
        metrics.received_bytes_total += len(payload)
        self._handle(payload, self._tlv, OP_BINARY)

    def on_refused(self, binary: bool, payload: bytes) -> None:
        """A message over the connection's rate: answered ``rate_limited``
        with its ``id`` (a chunk's ``file_id`` and ``index``), so that the
        client knows which request failed rather than waiting for an answer.
        Decoding it costs what a processed message would; refusals are few
        (``rate_limit_violations_per_s``, then the connection is closed)."""
        self._metrics.errors_total[ErrorCode.RATE_LIMITED] += 1
        codec, opcode = (self._tlv, OP_BINARY) if binary else (self._json, OP_TEXT)
        try:
            msg: Any = codec.decode(payload)
        except WirehubError as exc:
            msg = exc   # its id, when it got that far
        text = "rate limit exceeded; message not processed"
        if type(msg) is FileChunk:
            error = Error(ErrorCode.RATE_LIMITED, text, None, msg.file_id, msg.index)
        else:
            error = Error(ErrorCode.RATE_LIMITED, text, getattr(msg, "id", None), getattr(msg, "file_id", None))
        self.push(opcode, codec.encode(error))

    def on_slow_consumer(self) -> None:
        logger.warning("closing slow consumer", extra={"client_id": self.client_id,
                                                       "remote": self.remote_address})

    def on_closing(self, code: int) -> None:
        self._metrics.closes_total[code] += 1

    # -- dispatch -------------------------------------------------------------

    def _handle(self, payload: bytes, codec: JsonCodec | TlvCodec, opcode: int) -> None:
        msg: Any = None
        try:
            msg = codec.decode(payload)
            kind = type(msg)
            if kind is Auth:
                self._authenticate(msg, codec, opcode)
                return
            principal = self.principal
            if principal is None:
                raise NotAuthenticated('authenticate first: {"type":"auth","token":"<JWT>"}')
            for middleware in self._middleware:
                middleware(self, msg)
            # Names are validated before the permission check, whose cache
            # must only ever hold names of bounded length.
            if kind is Publish:
                self._hub.check_channel(msg.channel)
                if not principal.can_publish(msg.channel):
                    raise Forbidden(f"not allowed to publish to {msg.channel[:64]!r}")
                self._publish(msg, codec, opcode)
            elif kind is Ping:
                self.push(opcode, codec.encode(Pong(msg.id)))
            elif kind is Subscribe:
                self._subscribe(msg, principal, codec, opcode)
            elif kind is Unsubscribe:
                self._hub.unsubscribe(self, msg.channel)
                self._reply(Unsubscribed(msg.channel, msg.id), codec, opcode)
            elif kind is HistoryRequest:
                self._history(msg, principal, codec, opcode)
            elif kind is FileChunk:
                self._file_chunk(msg, principal, codec, opcode)
            elif kind is FileBegin or kind is FileEnd:
                self._file_request(msg, principal, codec, opcode)
            else:
                self._custom(msg, codec, opcode)
        except WirehubError as exc:
            msg_id = exc.id if exc.id is not None else getattr(msg, "id", None)
            self._metrics.errors_total[exc.code] += 1
            self._reply(_error(exc, msg_id), codec, opcode)

    def _subscribe(self, msg: Subscribe, principal: Principal, codec: JsonCodec | TlvCodec,
                   opcode: int) -> None:
        """A method of its own because its reply callback is a closure: inline in
        ``_handle``, Python would create the closure's cells for every message,
        pings and publications too (~10 % of a ping's cost in-process)."""
        # A pattern is authorized per concrete channel as publications arrive.
        if not is_pattern(msg.channel):
            self._hub.check_channel(msg.channel)
            if not principal.can_subscribe(msg.channel):
                raise Forbidden(f"not allowed to subscribe to {msg.channel[:64]!r}")
        # A source channel (logs:*, runners) is answered by its source, maybe later.
        if self._hub.subscribe(self, msg.channel, msg, lambda r: self._reply(r, codec, opcode)):
            self._reply(Subscribed(msg.channel, msg.id, self._hub.position(msg.channel)), codec, opcode)

    def _publish(self, msg: Publish, codec: JsonCodec | TlvCodec, opcode: int) -> None:
        # msg.data stays the decoder's view into the received message: the
        # data is copied next into the frame every subscriber shares (hub).
        origin = self.client_id if msg.exclude_self else None
        if msg.idempotency_key is None:
            result = self._hub.publish_checked(msg.channel, msg.data, binary=opcode == OP_BINARY,
                                               origin=origin, key=msg.key)
        else:
            result = self._hub.publish_once(msg.channel, msg.data, msg.idempotency_key,
                                            binary=opcode == OP_BINARY, origin=origin, key=msg.key)
        kind = type(result)
        if kind is StreamPosition:
            if msg.id is not None:
                self._reply(Published(msg.channel, result.offset, msg.id, result.epoch), codec, opcode)
        elif kind is tuple:
            if msg.id is not None:
                position, duplicate = result
                self._reply(Published(msg.channel, position.offset, msg.id, position.epoch, duplicate or None),
                            codec, opcode)
        else:  # a shared broker answers once Redis has it
            result.add_done_callback(lambda done: self._published(done, msg, codec, opcode))

    def _published(self, done: Any, msg: Publish, codec: JsonCodec | TlvCodec, opcode: int) -> None:
        """A shared broker's answer to a publish: ``published``, or the
        error (without an ``id`` too: a publish that failed is never silent)."""
        if done.cancelled() or self.batch.closed:
            return
        exc = done.exception()
        if exc is not None:
            self._failed(exc, msg, codec, opcode)
        elif msg.id is not None:
            result = done.result()
            position, duplicate = result if type(result) is tuple else (result, False)
            self._reply(Published(msg.channel, position.offset, msg.id, position.epoch, duplicate or None),
                        codec, opcode)

    def _history(self, msg: HistoryRequest, principal: Principal, codec: JsonCodec | TlvCodec,
                 opcode: int) -> None:
        """A ``history`` request: read by a task (the broker answers
        asynchronously), counted with the async handlers against
        ``max_pending_handlers_per_connection``."""
        self._hub.check_channel(msg.channel)
        if not principal.can_subscribe(msg.channel):
            raise Forbidden(f"not allowed to read the history of {msg.channel[:64]!r}")
        self._check_running()

        async def read() -> bytes:
            page = await self._hub.history(msg.channel, msg.since, msg.limit, msg.reverse)
            return codec.encode_history(msg.channel, page.position, page.publications, page.more, msg.id)

        self._run(read(), msg, codec, opcode)

    def _reply(self, reply: Reply, codec: JsonCodec | TlvCodec, opcode: int) -> None:
        self.push(opcode, codec.encode(reply))

    # -- file transfer (files.py, docs/protocol.md "File transfer") ---------------

    def _file_store(self, principal: Principal, file_id: str, index: int | None = None) -> FileStore:
        store = self._gateway.files
        if store is None:
            raise FileError(FileCode.FILES_DISABLED, "file transfer is off on this gateway (no file_dir)",
                            file_id=file_id, index=index)
        if not (principal.unrestricted or principal.has_permission(FILES_UPLOAD)):
            raise FileError(ErrorCode.FORBIDDEN, f"uploads need the {FILES_UPLOAD!r} permission",
                            file_id=file_id, index=index)
        return store

    def _file_request(self, msg: FileBegin | FileEnd, principal: Principal, codec: JsonCodec | TlvCodec,
                      opcode: int) -> None:
        """``file_begin`` or ``file_end``: answered by a task (they wait for
        the disk), counted with the async handlers."""
        store = self._file_store(principal, msg.file_id)
        owner = principal.sub or ""
        self._check_running()
        if type(msg) is FileEnd:
            async def end() -> bytes:
                done = await store.end(owner, msg.file_id)
                return codec.encode(FileDone(done.file_id, done.name, done.size, done.sha256, msg.id,
                                             done.channel))

            self._run(end(), msg, codec, opcode)
            return
        if msg.channel is not None:
            self._hub.check_channel(msg.channel)
            if not principal.can_publish(msg.channel):
                raise FileError(ErrorCode.FORBIDDEN, f"not allowed to publish to {msg.channel[:64]!r}",
                                file_id=msg.file_id)
        cfg = self._gateway.config

        async def begin() -> bytes:
            upload, meta = await store.begin(owner, msg.file_id, msg.name, msg.size, msg.sha256, msg.chunk_size,
                                             msg.channel)
            count = meta.chunk_count
            have = upload.have() if upload is not None else [(0, count - 1)] if count else []
            return codec.encode(FileReady(msg.file_id, have, count, cfg.file_window,
                                          int(cfg.rate_limit_bytes_per_s), int(cfg.rate_limit_burst_bytes),
                                          msg.id))

        self._run(begin(), msg, codec, opcode)

    def _file_chunk(self, msg: FileChunk, principal: Principal, codec: JsonCodec | TlvCodec,
                    opcode: int) -> None:
        """Hand a chunk to the store; acknowledge it once it is on disk. Past
        ``file_window`` chunks waiting for the disk, stop reading the
        connection: its next chunks wait in the kernel, not here."""
        store = self._file_store(principal, msg.file_id, msg.index)
        written = store.chunk(principal.sub or "", msg.file_id, msg.index, msg.count, msg.data)
        self._chunks_writing += 1
        if self._chunks_writing > self._gateway.config.file_window and not self._reading_paused:
            self._reading_paused = True
            store.metrics["read_pauses"] += 1
            self.listener.transport.underlying_transport.pause_reading()
        written.add_done_callback(lambda done: self._chunk_written(done, msg, codec, opcode))

    def _chunk_written(self, done: Any, msg: FileChunk, codec: JsonCodec | TlvCodec, opcode: int) -> None:
        self._chunks_writing -= 1
        if done.cancelled():
            return   # the gateway is stopping
        exc = done.exception()
        if self.batch.closed:
            return
        if self._reading_paused and self._chunks_writing <= self._gateway.config.file_window // 2:
            self._reading_paused = False
            self.listener.transport.underlying_transport.resume_reading()
        if exc is None:
            self._reply(FileAck(msg.file_id, msg.index), codec, opcode)
        elif isinstance(exc, WirehubError):
            self._metrics.errors_total[exc.code] += 1
            self._reply(_error(exc, None), codec, opcode)
        else:
            logger.error("writing a file chunk failed", exc_info=exc, extra={"client_id": self.client_id})

    # -- authentication -------------------------------------------------------

    def _authenticate(self, msg: Auth, codec: JsonCodec | TlvCodec, opcode: int) -> None:
        """First authentication, or a token refresh on an authenticated connection."""
        verifier = self._gateway.verifier
        if verifier is None:
            self._metrics.auth_failures_total[AuthCode.AUTH_NOT_CONFIGURED] += 1
            self._reply(AuthFailed(AuthCode.AUTH_NOT_CONFIGURED, "this gateway has no key configured: "
                                   "it is open to every connection", msg.id), codec, opcode)
            return
        try:
            principal = verifier.verify(msg.token)
            previous = self.principal
            if previous is not None and previous.sub is not None and previous.sub != principal.sub:
                raise AuthError("a refreshed token must be for the same subject",
                                AuthCode.SUBJECT_CHANGED)
        except AuthError as exc:
            self._metrics.auth_failures_total[exc.code] += 1
            self._reply(AuthFailed(exc.code, exc.message, msg.id), codec, opcode)
            self.close(CloseCode.POLICY_VIOLATION, exc.message.encode()[:120].decode(errors="ignore"))
            return
        self.principal = principal
        for name in self._hub.revoke(self):
            self._reply(Unsubscribed(name, reason=ErrorCode.FORBIDDEN), codec, opcode)
        self._watch_expiry()
        self._reply(Authenticated(principal.sub, msg.id, principal.exp), codec, opcode)

    def _watch_expiry(self) -> None:
        """Ask for a fresh token ``token_expiring_notice_s`` ahead of ``exp``;
        close with 1008 once it has passed (plus leeway)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        exp = self.principal.exp
        if exp is None:
            return
        clock = self._gateway.clock
        notice_in = exp - self._gateway.config.token_expiring_notice_s - clock.wall()
        if notice_in > 0:
            self._timer = clock.call_later(notice_in, self._token_expiring)
        else:
            self._token_expiring()

    def _token_expiring(self) -> None:
        exp = self.principal.exp
        self.send(TokenExpiring(exp))
        clock = self._gateway.clock
        expires_in = exp + self._gateway.config.jwt_leeway_s - clock.wall()
        self._timer = clock.call_later(max(0.0, expires_in), self._token_expired)

    def _token_expired(self) -> None:
        self._timer = None
        self._metrics.auth_failures_total[AuthCode.TOKEN_EXPIRED] += 1
        self.close(CloseCode.POLICY_VIOLATION, "token expired")

    def _auth_timeout(self) -> None:
        self._timer = None
        self._metrics.auth_failures_total["authentication_timeout"] += 1
        self.close(CloseCode.POLICY_VIOLATION, "authentication timeout")

    # -- application messages -------------------------------------------------

    def _custom(self, msg: CustomMessage, codec: JsonCodec | TlvCodec, opcode: int) -> None:
        permission = self._gateway.permissions.get(msg.type)
        if permission is not None and not self.principal.has_permission(permission):
            raise Forbidden(f"{msg.type!r} needs permission {permission!r}")
        handler = self._gateway.handlers[msg.type]
        self._check_running()
        try:
            result = handler(self, msg.body)
        except WirehubError:
            raise
        except Exception:
            self._internal_error(msg, codec, opcode)
            return
        if inspect.isawaitable(result):
            self._run(result, msg, codec, opcode)
        elif result is not None:
            self.send(_answering(result, msg))

    def _check_running(self) -> None:
        """Refuse another task past ``max_pending_handlers_per_connection``."""
        limit = self._gateway.config.max_pending_handlers_per_connection
        if self._handlers is not None and len(self._handlers) >= limit:
            raise RateLimited(f"{limit} requests of this connection are still running; "
                              f"message not processed")

    def _run(self, awaitable: Any, msg: Any, codec: JsonCodec | TlvCodec, opcode: int) -> None:
        """Run an async handler (or a ``history`` read) as a task; its result,
        bytes in ``codec`` or anything to send as JSON, is the answer."""
        running = self._handlers
        task = asyncio.ensure_future(awaitable)
        if running is None:
            running = self._handlers = set()
        running.add(task)
        task.add_done_callback(lambda t: self._task_done(t, msg, codec, opcode))

    def _task_done(self, task: asyncio.Future, msg: Any, codec: JsonCodec | TlvCodec, opcode: int) -> None:
        running = self._handlers
        if running is not None:
            running.discard(task)
            if not running:
                self._handlers = None
        if task.cancelled() or self.batch.closed:
            return
        exc = task.exception()
        if exc is not None:
            self._failed(exc, msg, codec, opcode)
        elif isinstance(task.result(), bytes):
            self.push(opcode, task.result())
        elif task.result() is not None:
            self.send(_answering(task.result(), msg))

    def _failed(self, exc: BaseException, msg: Any, codec: JsonCodec | TlvCodec, opcode: int) -> None:
        """Answer a request whose task (or broker future) failed: with its
        error, or ``internal_error`` for anything else."""
        if isinstance(exc, WirehubError):
            self._metrics.errors_total[exc.code] += 1
            self._reply(_error(exc, msg.id), codec, opcode)
        else:
            self._internal_error(msg, codec, opcode, exc)

    def _internal_error(self, msg: Any, codec: JsonCodec | TlvCodec, opcode: int,
                        exc: BaseException | None = None) -> None:
        # A custom message names its type; a built-in one (a history read, a publish) its class.
        logger.error("handling %r failed", getattr(msg, "type", type(msg).__name__), exc_info=exc or True,
                     extra={"client_id": self.client_id})
        self._metrics.errors_total[ErrorCode.INTERNAL_ERROR] += 1
        self._reply(Error(ErrorCode.INTERNAL_ERROR, "internal error; see the server log", msg.id),
                    codec, opcode)


class EchoConnection:
    """The ``/echo`` diagnostics endpoint: every message comes back unchanged.

    It runs the production receive and send paths (reassembly, UTF-8 checks,
    rate limits, outbound batching), which is what a conformance run should
    exercise.
    """

    __slots__ = ("listener", "compressor", "_threshold", "_live", "_metrics", "__weakref__")

    def __init__(self, gateway: Gateway, deflate: DeflateParams | None = None) -> None:
        self._metrics = gateway.metrics
        self._live = gateway.echo_connections
        self.compressor, _, inflater_factory = gateway.compression(deflate)
        self._threshold = gateway.config.deflate_threshold_bytes
        self.listener = gateway.impl.listener.FrameListener(
            gateway.flusher, gateway.config, self, inflater_factory)

    push = Connection.push

    def on_open(self) -> None:
        self._live.add(self)
        self._metrics.connections_current += 1

    def on_close(self) -> None:
        self._live.discard(self)
        self._metrics.connections_current -= 1

    @property
    def batch(self) -> Any:
        return self.listener.batch

    def on_text(self, payload: bytes) -> None:
        self.push(OP_TEXT, payload)

    def on_binary(self, payload: bytes) -> None:
        self.push(OP_BINARY, payload)

    def on_refused(self, binary: bool, payload: bytes) -> None:
        self._metrics.errors_total[ErrorCode.RATE_LIMITED] += 1

    def on_slow_consumer(self) -> None:
        pass

    def on_closing(self, code: int) -> None:
        self._metrics.closes_total[code] += 1
