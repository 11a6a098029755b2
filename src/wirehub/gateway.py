"""The embedding API: a gateway inside an existing asyncio program.

::

    gateway = Gateway(Config(port=8080))
    gateway.use(reject_spam)                 # middleware: raise Rejected to refuse

    @gateway.on("whoami")                    # application message type
    def whoami(conn, msg):
        return {"type": "you_are", "client_id": conn.client_id}

    await gateway.start()
    gateway.publish("prices.btc", {"bid": 101.5})
    ...
    await gateway.stop()

``wirehub serve`` is a thin layer over this class.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import ssl
from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import Any
from urllib.parse import urlsplit

import msgspec
from picows import WSAutoPingStrategy, WSUpgradeRequest, WSUpgradeResponse, WSUpgradeResponseWithListener
from picows.picows import WSProtocol

from . import _speedups, openfiles, static_files, workers
from .__version__ import __version__
from .admission import Admission, RefusalReason
from .auth import Principal, TokenVerifier, accepted_subprotocol, token_from_request
from .broker.base import Broker, HistoryPage, Published
from .broker.memory import MemoryBroker
from .clock import Clock
from .config import Config
from .connection import Connection, EchoConnection
from .delivery import ChannelPolicies
from .files import CHUNK_OVERHEAD_BYTES, FileStore, StoredFile
from .garbage import PauseWatch
from .http_api import HttpApi
from .hub import TAKEOVER, Hub
from .metrics import Metrics, histogram_lines
from .protocol.codec import JsonCodec, TlvCodec
from .protocol.errors import AuthError, CloseCode
from .protocol.messages import AuthFailed, Command, CustomMessage, StreamPosition
from .protocol.permessage_deflate import DeflateOptions, DeflateParams, NegotiationError, negotiate
from .sources.base import Source
from .sources.metrics import MetricsSource

logger = logging.getLogger("wirehub.gateway")

Middleware = Callable[[Connection, "Command | CustomMessage"], None]
Handler = Callable[[Connection, dict[str, Any]], Any]
Hook = Callable[[Connection], Any]

RESERVED_TYPES = frozenset({"subscribe", "unsubscribe", "publish", "ping", "auth", "history",
                            "file_begin", "file_chunk", "file_end"})
# Connections a sweep over all of them (heartbeat, shutdown) handles before
# it lets the loop run: ~1 ms of work, so 100,000 connections never hold the
# loop for 100 ms in one go.
SWEEP_BATCH = 1000


class _PicowsLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """picows's logger: peer protocol errors become counted INFO records.

    picows closes the connection itself (1002/1009) when its frame parser
    rejects the peer's bytes and logs that at ERROR; a misbehaving client is
    not a server error, but it must show in ``wirehub_closes_total``. (An
    adapter rather than a ``Logger`` also stops picows from creating a child
    logger per connection.)
    """

    def __init__(self, logger: logging.Logger, metrics: Metrics) -> None:
        super().__init__(logger, {})
        self._metrics = metrics

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        if msg == "WS parser error: %s, initiate disconnect" and args and isinstance(args[0], tuple):
            self._metrics.closes_total[int(args[0][0])] += 1
            level = logging.INFO
        super().log(level, msg, *args, **kwargs)


class SwitchingProtocols(WSUpgradeResponse):
    """A 101 answer followed, in the same write, by the connection's first
    frame (its ``welcome``): one ``send()`` per handshake instead of two, and
    no outbound buffer taken for it. Once a server has sent its handshake,
    the connection is open and it may send frames (RFC 6455 §4.2.2).

    picows adds ``Sec-WebSocket-Accept`` to ``headers`` and calls
    ``to_bytes()``, which writes the constant part of the head without
    picows's per-header formatting.
    """

    _HEAD = b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n"

    def __init__(self, headers: dict[str, str], frames: bytes) -> None:
        self.version = b"HTTP/1.1"
        self.status = HTTPStatus.SWITCHING_PROTOCOLS
        self.headers = headers
        self.body = None
        self._frames = frames

    def to_bytes(self) -> bytearray:
        out = bytearray(self._HEAD)
        for name, value in self.headers.items():
            out += b"%s: %s\r\n" % (name.encode("latin-1"), value.encode("latin-1"))
        out += b"\r\n"
        out += self._frames
        return out


class Gateway:
    """A WebSocket pub/sub gateway.

    Args:
        config: limits and listen address; defaults to ``Config()``.
        broker: where publications travel; defaults to the in-memory broker.
        implementation: ``"ext"`` (Cython) or ``"pure"`` (the Python
            references); defaults to ext unless ``WIREHUB_NO_EXTENSIONS=1``.
        sources: producers of channels the gateway runs itself
            (``sources/base.py``); ``config.docker`` adds the Docker ones, and
            ``$sys:metrics`` (``sources/metrics.py``) is always there.
        clock: where every timeout, token expiry and the heartbeat read time
            (``wirehub.clock``); tests pass a ``ManualClock``.
        files: where uploads go; defaults to a ``FileStore`` in
            ``config.file_dir`` when it is set (file transfer is off otherwise).

    Raises:
        ValueError, OSError: an unusable key or key file (``jwt_*``, ``jwks``).
    """

    def __init__(self, config: Config | None = None, *, broker: Broker | None = None,
                 implementation: str | None = None, sources: Iterable[Source] = (),
                 clock: Clock | None = None, files: FileStore | None = None) -> None:
        self.config = config or Config()
        self.clock = clock or Clock()
        self.impl = _speedups.load(implementation) if implementation else _speedups.implementation()
        if self.impl.fallback:
            logger.warning("the compiled hot path did not import (%s): running on the pure-Python "
                           "twins, several times slower; reinstall wirehub to build it", self.impl.fallback)
        self.server_name = f"wirehub/{__version__}"
        self.metrics = Metrics()
        self.handlers: dict[str, Handler] = {}
        self.permissions: dict[str, str] = {}
        self.middleware: list[Middleware] = []
        self._hooks: dict[str, list[Hook]] = {"connect": [], "disconnect": []}
        self.json_codec = JsonCodec(self.handlers.keys())
        self.tlv_codec = TlvCodec(self.impl.tlv, self.handlers.keys())
        cfg = self.config
        self.deflate_options = DeflateOptions(
            enabled=cfg.deflate, level=cfg.deflate_level, mem_level=cfg.deflate_mem_level,
            server_max_window_bits=cfg.deflate_server_max_window_bits,
            client_max_window_bits=cfg.deflate_client_max_window_bits,
            server_no_context_takeover=cfg.deflate_server_no_context_takeover,
            client_no_context_takeover=cfg.deflate_client_no_context_takeover,
            threshold_bytes=cfg.deflate_threshold_bytes)
        # Compressors without context takeover are stateless between messages:
        # one per window size serves every connection (and every fan-out).
        self._shared_compressors: dict[int, Any] = {}
        if broker is None and cfg.broker not in (None, "memory"):
            from .broker.redis import RedisBroker, check_urls
            from .broker.shards import ShardedBroker
            urls = check_urls(cfg.broker)
            broker = RedisBroker(urls[0], idempotency_window_s=cfg.idempotency_window_s) if len(urls) == 1 else \
                ShardedBroker(urls, idempotency_window_s=cfg.idempotency_window_s)

        def memory_broker() -> MemoryBroker:
            return MemoryBroker(max_history_bytes=cfg.history_max_bytes, clock=self.clock.monotonic,
                                idempotency_window_s=cfg.idempotency_window_s,
                                idempotency_max_keys=cfg.idempotency_max_keys)

        self.broker = broker or memory_broker()
        # With a shared broker, sources' channels ($sys:metrics, logs:*) stay in a local one.
        self.local_broker = self.broker if isinstance(self.broker, MemoryBroker) else memory_broker()
        self.policies = ChannelPolicies(cfg.channels)
        self.hub = Hub(self.broker, self.impl, self.json_codec, self.tlv_codec, self.metrics,
                       max_channel_length=cfg.max_channel_length,
                       max_subscriptions=cfg.max_subscriptions_per_connection,
                       shared_compressors=self._shared_compressors,
                       compress_threshold_bytes=cfg.deflate_threshold_bytes,
                       policies=self.policies, recovery_held_bytes=cfg.high_water_bytes,
                       local_broker=self.local_broker)
        self.verifier = _verifier(cfg, self.clock)
        if files is None and cfg.file_dir is not None:
            files = FileStore(cfg.file_dir, max_bytes=cfg.file_max_bytes, quota_bytes=cfg.file_quota_bytes,
                              partial_ttl_s=cfg.file_partial_ttl_s,
                              max_chunk_bytes=cfg.max_payload_bytes - CHUNK_OVERHEAD_BYTES, clock=self.clock)
        self.files = files   # file transfer (files.py), None when off
        if files is not None:
            files.publish = self.publish
            self.metrics.collectors.append(files.metric_lines)
        # Shared, immutable principals: no per-connection cost when auth is off.
        self._open_principal = Principal.open_gateway()
        self._anonymous = self.verifier.anonymous() if self.verifier is not None else None
        self.admission = Admission(cfg, self.metrics, openfiles.limit(), self.clock)
        self.flusher: Any = None
        self.metrics.collectors.append(self._fanout_metrics)
        self.metrics.collectors.append(self.hub.metric_lines)
        self.metrics.collectors.append(self._history_metrics)
        broker_lines = getattr(self.broker, "metric_lines", None)
        if broker_lines is not None:
            self.metrics.collectors.append(broker_lines)
        if hasattr(self.broker, "node_figures"):
            self.broker.node_figures = self._node_figures
        build = f'wirehub_build_info{{hot_path="{self.impl.name}",version="{__version__}"}} 1'
        self.metrics.collectors.append(lambda: ["# TYPE wirehub_build_info gauge", build])
        self.gc_watch = PauseWatch()
        self.static_files = static_files.load_all(cfg.ws_path)
        self.metrics.collectors.append(self.gc_watch.metric_lines)
        self._server: asyncio.Server | None = None
        self._heartbeat_task: asyncio.Task[None] | None = None
        self.http_api: HttpApi | None = None  # with config.api_port: the HTTP publish API (http_api.py)
        self.echo_connections: set[EchoConnection] = set()
        self.sources: list[Source] = []
        self.metrics_source = MetricsSource(self, interval_s=cfg.metrics_interval_s)  # $sys:metrics
        self.add_source(self.metrics_source)
        for source in sources:
            self.add_source(source)
        if cfg.docker:
            try:
                from .sources.docker import DockerSources
            except ImportError as exc:
                raise ValueError(f"docker needs the docker SDK: pip install 'wirehub[docker]' ({exc})") from None
            DockerSources.from_config(cfg).install(self)

    # -- application API ------------------------------------------------------

    def use(self, middleware: Middleware) -> Middleware:
        """Add ``middleware(conn, message)`` to the chain run before every message.

        It refuses a message by raising ``wirehub.Rejected`` (the client gets an
        ``error`` with that code); it must not block.
        """
        self.middleware.append(middleware)
        return middleware

    def on(self, msg_type: str, handler: Handler | None = None, *,
           permission: str | None = None) -> Any:
        """Register ``handler(conn, message_dict)`` for an application message type.

        Usable as a decorator. The handler may be sync or async; a non-None
        return value is sent back to the client as JSON (a dict gets the
        message's ``id`` when it has none, for clients that match answers
        to requests). Raising a
        ``WirehubError`` answers with that error; any other exception answers
        ``internal_error`` and is logged. With ``permission``, only clients
        whose token lists it (or ``admin``) get through; the others get
        ``forbidden``. A connection may have ``max_pending_handlers_per_connection``
        async handlers running; more are answered ``rate_limited``. An async
        handler runs to the end even if its client leaves (its answer is dropped).
        """
        if msg_type in RESERVED_TYPES:
            raise ValueError(f"{msg_type!r} is a built-in message type")

        def register(fn: Handler) -> Handler:
            self.handlers[msg_type] = fn
            if permission is not None:
                self.permissions[msg_type] = permission
            else:
                self.permissions.pop(msg_type, None)
            return fn

        return register(handler) if handler is not None else register

    def on_file(self, callback: Callable[[StoredFile], Any]) -> Callable[[StoredFile], Any]:
        """Call ``callback(stored)`` (sync or async) for each upload that
        completes, with its ``path`` under ``file_dir`` and its metadata
        (``files.StoredFile``): the application decides what to do with it
        (move it, read it, leave it to be downloaded). A file moved away is
        no longer downloadable and no longer counts against its uploader's quota.

        Raises:
            ValueError: file transfer is off (no ``file_dir``).
        """
        if self.files is None:
            raise ValueError("file transfer is off: set file_dir (--file-dir)")
        self.files.callbacks.append(callback)
        return callback

    def on_connect(self, hook: Hook) -> Hook:
        """Call ``hook(conn)`` after each client's ``welcome``."""
        self._hooks["connect"].append(hook)
        return hook

    def on_disconnect(self, hook: Hook) -> Hook:
        """Call ``hook(conn)`` after each client is gone."""
        self._hooks["disconnect"].append(hook)
        return hook

    def run_hooks(self, event: str, conn: Connection) -> list[asyncio.Future[Any]]:
        """Call the ``event`` hooks; return the tasks of those that are coroutines."""
        running = []
        for hook in self._hooks[event]:
            try:
                result = hook(conn)
                if asyncio.iscoroutine(result):
                    running.append(asyncio.ensure_future(result))
            except Exception:
                logger.exception("%s hook failed", event)
        return running

    def publish(self, channel: str, data: Any, key: str | None = None) -> Published:
        """Publish from Python: ``bytes`` go out as a binary message, anything
        else is JSON-encoded. ``key``: conflation and ``max_rate`` keep the
        latest publication per key. Returns the publication's position; with
        a shared broker (``--broker redis://``), a future of it that
        resolves once Redis has the publication (await it).

        Raises:
            InvalidChannel: the name is not a valid channel name.
            Forbidden: a source's channel.
            Unavailable: the shared broker cannot take it now.
        """
        if isinstance(data, (bytes, bytearray, memoryview)):
            return self.hub.publish(channel, bytes(data), binary=True, key=key)
        return self.hub.publish(channel, msgspec.json.encode(data), key=key)

    async def subscribers(self, channel: str) -> int:
        """How many connections are subscribed to ``channel``: here, or on
        every gateway of the cluster with a shared broker (the others' counts
        as of their last heartbeat, a second ago at most).

        Raises:
            InvalidChannel: the name is not a valid channel name.
            Unavailable: the shared broker does not answer.
        """
        self.hub.check_channel(channel)
        return await self.broker.subscribers(channel)

    def _node_figures(self) -> dict[str, Any]:
        """What this gateway tells the others (``broker/nodes.py``)."""
        metrics = self.metrics
        return {"connections": metrics.connections_current, "subscriptions": self.hub.subscription_count,
                "channels": len(self.hub.channels), "publications_total": metrics.publications_total,
                "deliveries_total": metrics.deliveries_total,
                "messages_received_total": metrics.messages_received_total,
                "errors_total": sum(metrics.errors_total.values()), "pid": os.getpid(),
                "worker": "" if (index := workers.worker_index()) is None else index}

    async def history(self, channel: str, since: StreamPosition | None = None, limit: int = 100,
                      reverse: bool = False) -> HistoryPage:
        """The publications ``channel`` keeps after ``since`` (oldest first), or
        before it with ``reverse`` (newest first), at most ``limit``; and its
        position (docs/delivery.md).

        Raises:
            InvalidChannel: the name is not a valid channel name.
        """
        self.hub.check_channel(channel)
        return await self.hub.history(channel, since, limit, reverse)

    def add_source(self, source: Source) -> None:
        """Let ``source`` produce the channels it owns; it starts and stops with the gateway."""
        self.hub.add_source(source)
        self.sources.append(source)

    def compression(self, params: DeflateParams | None) -> tuple[Any, int | None, Any]:
        """For agreed permessage-deflate ``params``: the compressor to send with,
        the connection's fan-out group and a factory for its inflater."""
        if params is None:
            return None, None, None
        deflate = self.impl.deflate
        inflater_kwargs = dict(params.inflater_kwargs(), max_message_bytes=self.config.max_payload_bytes,
                               max_ratio=self.config.deflate_max_ratio)
        inflater_factory = functools.partial(deflate.Inflater, **inflater_kwargs)
        deflater_kwargs = params.deflater_kwargs(self.deflate_options)
        if not params.server_no_context_takeover:
            return deflate.Deflater(**deflater_kwargs), TAKEOVER, inflater_factory
        window_bits = params.server_max_window_bits
        compressor = self._shared_compressors.get(window_bits)
        if compressor is None:
            compressor = self._shared_compressors[window_bits] = deflate.Deflater(**deflater_kwargs)
        return compressor, window_bits, inflater_factory

    @property
    def connections(self) -> list[Connection]:
        return list(self.hub.clients.values())

    # -- lifecycle --------------------------------------------------------------

    @property
    def port(self) -> int:
        """The bound port (useful with ``port=0``)."""
        assert self._server is not None, "call start() first"
        return self._server.sockets[0].getsockname()[1]

    async def start(self) -> None:
        """Bind and start accepting connections."""
        loop = asyncio.get_running_loop()
        cfg = self.config
        connect = getattr(self.broker, "start", None)  # a shared broker connects first
        if connect is not None:
            await connect()
        self.flusher = self.impl.fanout.Flusher(loop, max_pace_s=cfg.fanout_pace_max_s)
        picows_logger = _PicowsLog(logging.getLogger("wirehub.picows"), self.metrics)
        guard = self.impl.readahead.ReadAheadGuard

        def protocol_factory() -> Any:
            # What picows.ws_create_server builds, behind the read-ahead guard.
            # uvloop's own transports (not aiofastnet's) cost ~5 KiB less per
            # idle connection; one gateway-wide timer replaces picows's
            # per-connection auto-ping task (see _heartbeat).
            inner = WSProtocol(
                None, None, False, self._route, picows_logger,
                True,                          # disconnect_on_exception
                None,                          # handshake timeout: Admission's, on the gateway clock
                False, 0, 0, WSAutoPingStrategy.PING_WHEN_IDLE,  # picows auto-ping off
                False,                         # auto-pong off: FrameListener answers PINGs
                cfg.max_payload_bytes,         # max_frame_size
                None,                          # extra_headers
                cfg.read_buffer_bytes,
            )
            return guard(inner, cfg.max_payload_bytes, admission)

        admission = self.admission
        tls = _tls_context(cfg) if cfg.tls_cert else None
        self._server = await loop.create_server(protocol_factory, cfg.host, cfg.port, ssl=tls,
                                                backlog=cfg.listen_backlog, reuse_port=cfg.reuse_port or None)
        self._heartbeat_task = loop.create_task(self._heartbeat())
        if self.files is not None:
            self.files.start()
        if cfg.api_port is not None:
            self.http_api = HttpApi(self)
            await self.http_api.start(tls)
        self.gc_watch.install()
        for source in self.sources:
            await source.start()
        logger.info("listening", extra={"host": cfg.host, "port": self.port, "tls": tls is not None,
                                        "implementation": self.impl.name})

    def _history_metrics(self) -> list[str]:
        kept = getattr(self.broker, "history_bytes", None)  # a broker that keeps history here
        held = sum(conn.batch.held_bytes() for conn in self.hub.clients.values() if conn.batch is not None)
        lines = ["# TYPE wirehub_held_bytes gauge", f"wirehub_held_bytes {held}"]
        if kept is not None:
            lines += ["# TYPE wirehub_history_bytes gauge", f"wirehub_history_bytes {kept}"]
        return lines

    def _fanout_metrics(self) -> list[str]:
        if self.flusher is None:
            return []
        counts, seconds = self.flusher.round_histogram()
        return histogram_lines("wirehub_fanout_round_seconds", self.impl.fanout.ROUND_BOUNDS_S,
                               counts, seconds)

    async def stop(self, timeout_s: float | None = None) -> None:
        """Stop accepting, close every client with 1001, wait up to the
        shutdown timeout, then drop whoever is left."""
        if self._server is None:
            return
        self._server.close()
        if self.http_api is not None:
            await self.http_api.stop()
        self._heartbeat_task.cancel()
        self.gc_watch.uninstall()
        listeners = [c.listener for c in self.hub.clients.values()]
        listeners += [c.listener for c in self.echo_connections]
        for i, listener in enumerate(listeners, 1):
            listener.close(CloseCode.GOING_AWAY, "server shutting down")
            if i % SWEEP_BATCH == 0:
                await asyncio.sleep(0)  # let the closes already queued go out
        deadline = asyncio.get_running_loop().time() + (timeout_s or self.config.shutdown_timeout_s)
        while any(not l.transport.is_disconnected for l in listeners):
            if asyncio.get_running_loop().time() >= deadline:
                break
            await asyncio.sleep(0.01)
        for listener in listeners:
            if not listener.transport.is_disconnected:
                listener.transport.disconnect(False)
        for source in self.sources:
            await source.close()
        if self.files is not None:
            self.files.stop()
        await self.broker.close()
        if self.local_broker is not self.broker:
            await self.local_broker.close()
        self._server = None

    async def _heartbeat(self) -> None:
        """Ping idle clients and close those that stop answering (one timer for all)."""
        interval_s, timeout_s = self.config.ping_interval_s, self.config.ping_timeout_s
        clock = self.clock
        while True:
            await clock.sleep(max(0.05, min(interval_s, timeout_s) / 2))
            self.admission.sweep()
            for i, conn in enumerate([*self.hub.clients.values(), *self.echo_connections]):
                if i % SWEEP_BATCH == 0:
                    if i:
                        await asyncio.sleep(0)
                    now = clock.monotonic()
                try:
                    conn.listener.heartbeat(now, interval_s, timeout_s)
                except Exception:  # one broken connection must not stop the sweep
                    logger.exception("heartbeat failed")

    async def __aenter__(self) -> Gateway:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # -- HTTP routing -----------------------------------------------------------

    def _route(self, request: WSUpgradeRequest) -> Any:
        path = urlsplit(request.path.decode("latin-1")).path
        if path == self.config.ws_path or (path == "/echo" and self.config.echo):
            return self._upgrade(request, path)
        if path == "/healthz":
            trouble = self.broker.health()
            if trouble is not None:
                return self._http(HTTPStatus.SERVICE_UNAVAILABLE, f"unavailable: {trouble}\n".encode())
            return self._http(HTTPStatus.OK, b"ok\n")
        if path == "/metrics":
            body = self.metrics.render(self.hub.subscription_count, len(self.hub.channels))
            return self._http(HTTPStatus.OK, body.encode(), "text/plain; version=0.0.4")
        if path == "/api" or path.startswith(("/api/", "/files/")):
            return self._api_elsewhere()
        static = self.static_files.get(path)
        if static is not None:
            response = static.response(request.headers.get("If-None-Match"))
            self.metrics.http_requests_total[int(response.status)] += 1
            return WSUpgradeResponseWithListener(response, None)
        return self._http(HTTPStatus.NOT_FOUND, b"not found\n")

    def _upgrade(self, request: WSUpgradeRequest, path: str) -> Any:
        headers = request.headers
        allowed_origins = self.config.allowed_origins
        if allowed_origins and "Origin" in headers and headers["Origin"] not in allowed_origins:
            self.metrics.refusals_total[RefusalReason.ORIGIN] += 1
            return self._http(HTTPStatus.FORBIDDEN, b"origin not allowed\n")
        try:
            agreed = negotiate(headers.getall("Sec-WebSocket-Extensions", []), self.deflate_options)
        except NegotiationError as exc:
            return self._http(HTTPStatus.BAD_REQUEST, f"{exc}\n".encode())
        params, extension_header = agreed if agreed is not None else (None, None)
        response_headers = {}
        if extension_header is not None:
            response_headers["Sec-WebSocket-Extensions"] = extension_header
        if path == self.config.ws_path:
            try:
                principal, subprotocol = self._authenticate(request)
            except AuthError as exc:
                return self._unauthorized(exc)
            if subprotocol is not None:
                response_headers["Sec-WebSocket-Protocol"] = subprotocol
            conn = Connection(self, request, params, principal)
            return WSUpgradeResponseWithListener(SwitchingProtocols(response_headers, conn.welcome_frame()),
                                                 conn.listener)
        listener = EchoConnection(self, params).listener
        if not response_headers:
            return listener
        return WSUpgradeResponseWithListener(WSUpgradeResponse.create_101_response(response_headers), listener)

    def _authenticate(self, request: WSUpgradeRequest) -> tuple[Principal | None, str | None]:
        """The principal of a new connection (``None``: it must send ``auth``)
        and the subprotocol to accept.

        Raises:
            AuthError: the request carries a token that does not verify.
        """
        subprotocol = accepted_subprotocol(request.headers)
        if self.verifier is None:
            return self._open_principal, subprotocol
        token = token_from_request(request.path.decode("latin-1"), request.headers)
        if token is not None:
            return self.verifier.verify(token), subprotocol
        return self._anonymous if self.config.allow_anonymous else None, subprotocol

    def _unauthorized(self, exc: AuthError) -> Any:
        self.metrics.refusals_total[RefusalReason.UNAUTHORIZED] += 1
        self.metrics.auth_failures_total[exc.code] += 1
        self.metrics.http_requests_total[HTTPStatus.UNAUTHORIZED] += 1
        body = self.json_codec.encode(AuthFailed(exc.code, exc.message)) + b"\n"
        challenge = f'Bearer error="invalid_token", error_description="{exc.code}"'
        response = WSUpgradeResponse.create_error_response(
            HTTPStatus.UNAUTHORIZED, body, {"WWW-Authenticate": challenge, "Content-Type": "application/json"})
        return WSUpgradeResponseWithListener(response, None)

    def _api_elsewhere(self) -> Any:
        """``/api/...`` and ``/files/...`` (downloads) on the WebSocket port:
        404, saying where the HTTP listener is."""
        api = self.http_api
        where = (f"it listens on {self.config.api_host}:{api.port} (--api-port)" if api is not None
                 else "it is off: start the gateway with --api-port")
        body = msgspec.json.encode({"code": "not_found",
                                   "error": f"the HTTP API and downloads have a port of their own: {where}"})
        self.metrics.http_requests_total[HTTPStatus.NOT_FOUND] += 1
        return WSUpgradeResponseWithListener(WSUpgradeResponse.create_error_response(
            HTTPStatus.NOT_FOUND, body, {"Content-Type": "application/json"}), None)

    def _http(self, status: HTTPStatus, body: bytes, content_type: str = "text/plain") -> Any:
        self.metrics.http_requests_total[int(status)] += 1
        if status == HTTPStatus.OK:
            response = WSUpgradeResponse.create_ok_response(body, {"Content-Type": content_type})
        else:
            response = WSUpgradeResponse.create_error_response(status, body)
        return WSUpgradeResponseWithListener(response, None)


def _verifier(cfg: Config, clock: Clock) -> TokenVerifier | None:
    """The token verifier ``cfg`` asks for, or None for an open gateway."""
    if not cfg.auth_enabled:
        return None
    public_key = jwks = None
    if cfg.jwt_public_key:
        with open(cfg.jwt_public_key, "rb") as f:
            public_key = f.read()
    if cfg.jwks:
        with open(cfg.jwks, encoding="utf-8") as f:
            jwks = f.read()
    return TokenVerifier(
        secret=cfg.jwt_secret, public_key_pem=public_key, jwks_json=jwks, algorithms=cfg.jwt_algorithms,
        audience=cfg.jwt_audience, issuer=cfg.jwt_issuer, leeway_s=cfg.jwt_leeway_s,
        default_subscribe=cfg.default_subscribe, default_publish=cfg.default_publish, clock=clock)


def _tls_context(cfg: Config) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cfg.tls_cert, cfg.tls_key)
    return context
