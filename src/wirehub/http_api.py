"""The HTTP publish API: producers that hold no WebSocket (docs/operations.md, "HTTP API").

One job: HTTP/1.1 requests in, publications out through the gateway. It
listens on a port of its own (``api_port``, on ``api_host``, loopback by
default), because the WebSocket port is served by picows, which reads no
request bodies. ::

    POST /api/publish    {"channel", "data", "key"?, "idempotency_key"?}
                         -> {"channel", "offset", "epoch", "delivered", "duplicate"?}
    POST /api/broadcast  {"channels": [...], "data", "key"?, "idempotency_key"?} -> {"results": [...]}
    POST /api/batch      {"publishes": [{...}, ...]}                           -> {"results": [...]}
    GET  /api/channels?pattern=P                     -> {"channels": [{"channel", "subscribers"}]}
    GET  /api/history?channel=C&since=N&epoch=E&limit=L  -> {"channel", "position", "publications", "more"}
    GET  /files/<file_id>        an uploaded file (with file_dir), ``Range`` answered 206 (``_download``)

A publish takes the path a WebSocket ``publish`` takes (``Connection._handle``
and ``_publish``): ``Hub.check_channel``, the principal's ``can_publish``,
then ``Hub.publish_checked`` or, with an ``idempotency_key``,
``Hub.publish_once``, which refuse the channels only the gateway writes and
count the publication. ``delivered`` is the number of this process's
subscribers the publication reached: the in-memory broker delivers before
``publish`` returns, so it is the change of ``deliveries_total`` across the call.

HTTP is parsed by h11, not by hand: what h11 refuses (a bad request line,
a bad or conflicting ``Content-Length``, an unknown transfer coding) is
answered 400 (501 for the coding) and the connection closed. On top of it:
a request with both ``Content-Length`` and ``Transfer-Encoding`` is refused
(h11 would let the coding win; RFC 9112 §6.3 says to treat it as an error,
it is the shape of request smuggling), a head over ``max_header_bytes`` gets
431, a body over ``max_payload_bytes`` 413 (before it is read, when
``Content-Length`` says so), and two timeouts on the gateway's clock bound
a slow client: ``api_request_timeout_s`` from a request's first byte to its
last (a slowloris head), ``api_idle_timeout_s`` between two requests of a
keep-alive connection.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import os
import re
import time
from dataclasses import dataclass
from collections import Counter
from collections.abc import Coroutine
from email.utils import formatdate
from http import HTTPStatus
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import parse_qs, quote

import h11
import msgspec

from .auth import Principal
from .protocol.errors import (
    AuthCode,
    AuthError,
    ErrorCode,
    Forbidden,
    InvalidField,
    InvalidMessage,
    NotAuthenticated,
    RateLimited,
    WirehubError,
)
from .protocol.messages import (
    MAX_HISTORY_LIMIT,
    MAX_KEY_LENGTH,
    HistoryEntry,
    StreamPosition,
)
from .protocol.patterns import PatternError, compile_pattern

if TYPE_CHECKING:
    import ssl

    from .gateway import Gateway

logger = logging.getLogger("wirehub.http_api")

# Publications one broadcast or batch request may carry: each is published
# in the same event-loop turn, so this bounds how long one request holds it.
MAX_ITEMS = 1000
# Peers (API keys, token subjects, client IPs) whose rate-limit buckets are
# kept; past this the least recently seen is forgotten (a full bucket again).
MAX_BUCKETS = 10_000
# A bearer credential longer than this is neither an API key nor a token we verify.
MAX_CREDENTIAL_BYTES = 8192

Key = Annotated[str, msgspec.Meta(max_length=MAX_KEY_LENGTH)] | None
IdempotencyKey = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_KEY_LENGTH)] | None


# -- request and answer bodies -------------------------------------------------
# The same field rules as the WebSocket ``publish`` (protocol/messages.py).

class PublishRequest(msgspec.Struct, forbid_unknown_fields=True):
    channel: str
    data: msgspec.Raw  # forwarded byte for byte, never decoded and re-encoded
    key: Key = None
    idempotency_key: IdempotencyKey = None


class BroadcastRequest(msgspec.Struct, forbid_unknown_fields=True):
    channels: Annotated[list[str], msgspec.Meta(min_length=1, max_length=MAX_ITEMS)]
    data: msgspec.Raw
    key: Key = None
    idempotency_key: IdempotencyKey = None


class BatchRequest(msgspec.Struct, forbid_unknown_fields=True):
    publishes: Annotated[list[PublishRequest], msgspec.Meta(min_length=1, max_length=MAX_ITEMS)]


class Published(msgspec.Struct, omit_defaults=True, gc=False):
    channel: str
    offset: int
    epoch: str
    delivered: int
    duplicate: bool = False


class Failure(msgspec.Struct, gc=False):
    code: str
    error: str


class FailedItem(msgspec.Struct, gc=False):
    channel: str
    error: Failure


class Results(msgspec.Struct, gc=False):
    results: list[Published | FailedItem]


class ChannelCount(msgspec.Struct, gc=False):
    channel: str
    subscribers: int


class HistoryAnswer(msgspec.Struct, gc=False):
    channel: str
    position: StreamPosition
    publications: list[HistoryEntry]
    more: bool


# -- statuses and codes ----------------------------------------------------------

# The WebSocket protocol's codes (docs/protocol.md "Errors", and the 401
# bodies' auth codes), with the HTTP status each one gets.
STATUS = {
    ErrorCode.INVALID_MESSAGE: 400, ErrorCode.INVALID_FIELD: 400, ErrorCode.INVALID_CHANNEL: 400,
    ErrorCode.UNKNOWN_TYPE: 400, ErrorCode.NOT_AUTHENTICATED: 401, AuthCode.INVALID_TOKEN: 401,
    AuthCode.TOKEN_EXPIRED: 401, ErrorCode.FORBIDDEN: 403, ErrorCode.RATE_LIMITED: 429, ErrorCode.UNAVAILABLE: 503,
}


class HttpCode:
    """Codes for what only HTTP has (no WebSocket message gets them)."""

    BAD_REQUEST = "bad_request"              # 400: not HTTP/1.1 as h11 (or RFC 9112) reads it
    NOT_FOUND = "not_found"                  # 404: no such endpoint, or the API is off
    METHOD_NOT_ALLOWED = "method_not_allowed"  # 405
    REQUEST_TIMEOUT = "request_timeout"      # 408: the request did not arrive within api_request_timeout_s
    PAYLOAD_TOO_LARGE = "payload_too_large"  # 413: body over max_payload_bytes
    HEADER_TOO_LARGE = "header_too_large"    # 431: head over max_header_bytes
    NOT_IMPLEMENTED = "not_implemented"      # 501: a transfer coding other than chunked
    RANGE_NOT_SATISFIABLE = "range_not_satisfiable"  # 416: a download's Range starts past the file


class OverRate(RateLimited):
    """``rate_limited``, with the seconds after which the request would pass."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class HttpError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


class ApiMode:
    """How the API authenticates callers, as ``wirehub serve`` says at start."""

    OPEN = "open"        # the gateway has no key and no API key is set: anyone who reaches the port
    KEYS = "keys"        # API keys, and with api_jwt the gateway's tokens
    JWT = "jwt"          # the gateway's tokens only (api_jwt)
    OFF = "off"          # a gateway with a key, but no API key and no api_jwt: every request is 404


Answer = tuple[int, bytes, tuple[tuple[str, str], ...]]

FILES_PREFIX = "/files/"
_FILE_ID = re.compile(r"[0-9a-f]{32}")
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")
FILE_BLOCK_BYTES = 256 * 1024   # read from disk and written to the socket at a time


@dataclass(frozen=True, slots=True)
class FileBody:
    """A download's answer: ``length`` bytes of ``path`` from ``start``,
    streamed (``_ApiProtocol._send_file``), never read whole into memory."""

    status: int
    path: str
    start: int
    length: int
    headers: tuple[tuple[str, str], ...]
    head_only: bool


class HttpApi:
    """The API of one gateway: its listener, its connections, its counters."""

    def __init__(self, gateway: Gateway) -> None:
        cfg = gateway.config
        self.gateway = gateway
        self.config = cfg
        self.hub = gateway.hub
        self.metrics = gateway.metrics
        self.clock = gateway.clock
        self._keys = [key.encode() for key in cfg.api_key]
        self._verifier = gateway.verifier if cfg.api_jwt else None
        if self._keys:
            self.mode = ApiMode.KEYS
        elif self._verifier is not None:
            self.mode = ApiMode.JWT
        elif gateway.verifier is None:
            self.mode = ApiMode.OPEN
        else:
            self.mode = ApiMode.OFF
        self._unrestricted = Principal.open_gateway()
        self._bucket = gateway.impl.bucket.TokenBucket
        self._buckets: dict[str, Any] = {}
        self._routes = {
            "/api/publish": ("POST", self._publish),
            "/api/broadcast": ("POST", self._broadcast),
            "/api/batch": ("POST", self._batch),
            "/api/channels": ("GET", self._channels),
            "/api/history": ("GET", self._history),
        }
        self.connections: set[_ApiProtocol] = set()
        self.connections_total = 0
        self.requests_total: Counter[tuple[str, int]] = Counter()   # (endpoint, status)
        self.errors_total: Counter[str] = Counter()                 # by code
        self.timeouts_total: Counter[str] = Counter()               # request, idle
        self._server: asyncio.Server | None = None
        self._date = (0, b"")
        self._heads: dict[tuple[int, int, tuple[tuple[str, str], ...]], h11.Response] = {}

    # -- lifecycle ---------------------------------------------------------------

    async def start(self, tls: ssl.SSLContext | None = None) -> None:
        loop = asyncio.get_running_loop()
        cfg = self.config
        try:
            self._server = await loop.create_server(lambda: _ApiProtocol(self), cfg.api_host, cfg.api_port,
                                                    ssl=tls, backlog=cfg.listen_backlog,
                                                    reuse_port=cfg.reuse_port or None)
        except OSError as exc:  # say which listener: the gateway has two
            raise OSError(exc.errno, f"{exc.strerror} (the HTTP API's {cfg.api_host}:{cfg.api_port})") from None
        self.metrics.collectors.append(self.metric_lines)
        logger.info("HTTP API listening", extra={"host": cfg.api_host, "port": self.port, "mode": self.mode})

    @property
    def port(self) -> int:
        assert self._server is not None, "call start() first"
        return self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for conn in list(self.connections):
            conn.close()
        self._server = None

    def describe(self) -> str:
        """One line for ``wirehub serve``: where the API is and who may use it."""
        cfg = self.config
        where = f"http{'s' if cfg.tls_cert else ''}://{cfg.api_host}:{self.port}/api/"
        if self.mode == ApiMode.OFF:
            return (f"HTTP API OFF on {where}: the gateway has a key, so the API needs --api-key or "
                    f"--api-jwt; every request is answered 404")
        if self.mode == ApiMode.OPEN:
            return (f"WARNING: HTTP API on {where} is OPEN: no key is configured, anyone who reaches "
                    f"it may publish anywhere (--api-key to require one)")
        how = (f"{len(self._keys)} API key(s)" if self._keys else "") + \
              (" and " if self._keys and self._verifier else "") + \
              ("tokens whose publish claims cover the channel" if self._verifier else "")
        return f"HTTP API on {where}: {how}"

    def metric_lines(self) -> list[str]:
        lines = ["# TYPE wirehub_api_connections gauge", f"wirehub_api_connections {len(self.connections)}",
                 "# TYPE wirehub_api_connections_total counter",
                 f"wirehub_api_connections_total {self.connections_total}",
                 "# TYPE wirehub_api_requests_total counter"]
        lines += [f'wirehub_api_requests_total{{endpoint="{e}",status="{s}"}} {n}'
                  for (e, s), n in sorted(self.requests_total.items())]
        lines.append("# TYPE wirehub_api_errors_total counter")
        lines += [f'wirehub_api_errors_total{{code="{c}"}} {n}' for c, n in sorted(self.errors_total.items())]
        lines.append("# TYPE wirehub_api_timeouts_total counter")
        lines += [f'wirehub_api_timeouts_total{{phase="{p}"}} {n}' for p, n in sorted(self.timeouts_total.items())]
        return lines

    def http_date(self) -> bytes:
        now = int(time.time())
        if self._date[0] != now:
            self._date = (now, formatdate(now, usegmt=True).encode())
            self._heads.clear()
        return self._date[1]

    def head(self, status: int, length: int, extra: tuple[tuple[str, str], ...]) -> h11.Response:
        """The ``h11.Response`` of an answer: kept for the second it is dated,
        since building one (h11 checks every header) is ~10 % of a publish,
        and answers of one length and status repeat."""
        date = self.http_date()
        key = (status, length, extra)
        head = self._heads.get(key)
        if head is None:
            headers = [(b"Content-Type", b"application/json"), (b"Content-Length", b"%d" % length),
                       (b"Date", date), *((name.encode(), value.encode()) for name, value in extra)]
            head = h11.Response(status_code=status, headers=headers, reason=_REASONS[status])
            if len(self._heads) < 64:
                self._heads[key] = head
        return head

    # -- one request ---------------------------------------------------------------

    def endpoint(self, path: str) -> str:
        """The ``endpoint`` label of a path (bounded: unknown paths are ``other``)."""
        if path in self._routes:
            return path
        return "/files" if path.startswith(FILES_PREFIX) else "other"

    def answer(self, method: bytes, path: str, query: str, headers: dict[bytes, bytes], body: bytes,
               peer: str) -> Answer | Any:
        """The answer to one complete request: ``(status, JSON body, headers)``,
        or a coroutine that returns it."""
        try:
            if path.startswith(FILES_PREFIX):
                return self._download(method, path[len(FILES_PREFIX):], headers, peer)
            route = self._routes.get(path)
            if route is None or self.mode == ApiMode.OFF:
                raise HttpError(404, HttpCode.NOT_FOUND, self._not_found(path))
            allowed, handler = route
            if method != allowed.encode():
                raise HttpError(405, HttpCode.METHOD_NOT_ALLOWED, f"{path} takes {allowed}",
                                (("Allow", allowed),))
            principal, bucket_key = self._authenticate(headers, peer)
            result = handler(principal, bucket_key, body, query)
        except WirehubError as exc:
            extra: tuple[tuple[str, str], ...] = ()
            if isinstance(exc, OverRate):
                extra = (("Retry-After", str(exc.retry_after_s)),)
            elif exc.code == ErrorCode.NOT_AUTHENTICATED:
                extra = (("WWW-Authenticate", 'Bearer realm="wirehub"'),)   # RFC 9110: a 401 carries one
            return self.failure(STATUS.get(exc.code, 500), exc.code, exc.message, extra)
        except AuthError as exc:
            challenge = f'Bearer error="invalid_token", error_description="{exc.code}"'
            return self.failure(401, exc.code, exc.message, (("WWW-Authenticate", challenge),))
        except HttpError as exc:
            return self.failure(exc.status, exc.code, exc.message, exc.headers)
        if isinstance(result, bytes):
            return 200, result, ()
        return self._later(result)

    async def _later(self, coroutine: Any) -> Answer:
        try:
            return 200, await coroutine, ()
        except WirehubError as exc:
            return self.failure(STATUS.get(exc.code, 500), exc.code, exc.message)

    def failure(self, status: int, code: str, message: str,
                headers: tuple[tuple[str, str], ...] = ()) -> Answer:
        self.errors_total[code] += 1
        return status, msgspec.json.encode(Failure(code, message)), headers

    def _not_found(self, path: str) -> str:
        if self.mode == ApiMode.OFF and path in self._routes:
            return ("the HTTP API is off: this gateway has a key, so the API needs --api-key or --api-jwt "
                    "(docs/operations.md)")
        return f"no endpoint {path[:64]!r}: POST /api/publish, /api/broadcast, /api/batch; " \
               f"GET /api/channels, /api/history"

    def _authenticate(self, headers: dict[bytes, bytes], peer: str) -> tuple[Principal, str]:
        """Who sends the request, and whose rate-limit bucket it draws on.

        Raises:
            NotAuthenticated: no credentials where the API needs some.
            AuthError: an unknown API key, or a token that does not verify.
        """
        if self.mode == ApiMode.OPEN:
            return self._unrestricted, f"ip:{peer}"
        api_key = headers.get(b"x-api-key")
        if api_key is not None:
            index = self._key_index(api_key)
            if index is None:
                raise AuthError("unknown API key")
            return self._unrestricted, f"key:{index}"
        authorization = headers.get(b"authorization")
        if authorization is None:
            raise NotAuthenticated("send an API key (X-API-Key, or Authorization: Bearer)"
                                   + (" or a token (Authorization: Bearer)" if self._verifier else ""))
        scheme, _, credentials = authorization.partition(b" ")
        credentials = credentials.strip()
        if scheme.lower() != b"bearer" or not credentials:
            raise AuthError("Authorization header must be 'Bearer <API key or token>'")
        index = self._key_index(credentials)
        if index is not None:
            return self._unrestricted, f"key:{index}"
        if self._verifier is None or len(credentials) > MAX_CREDENTIAL_BYTES:
            raise AuthError("unknown API key")
        principal = self._verifier.verify(credentials.decode("latin-1"))
        return principal, f"sub:{principal.sub}"

    def _key_index(self, given: bytes) -> int | None:
        # Every key is compared, in constant time: the answer's timing says
        # nothing of how close a guess was, nor of which key it matched.
        found = None
        for i, key in enumerate(self._keys):
            if hmac.compare_digest(given, key):
                found = i
        return found

    def _take(self, bucket_key: str, amount: int) -> None:
        """Draw ``amount`` publications from the caller's bucket.

        Raises:
            OverRate: not enough (``rate_limited``).
        """
        cfg = self.config
        if not cfg.api_rate_limit_per_s:
            return
        now = self.clock.monotonic()
        buckets = self._buckets
        bucket = buckets.pop(bucket_key, None)
        if bucket is None:
            bucket = self._bucket(cfg.api_rate_limit_per_s, cfg.api_rate_limit_burst, now)
            if len(buckets) >= MAX_BUCKETS:
                del buckets[next(iter(buckets))]
        buckets[bucket_key] = bucket   # now the most recently seen
        if not bucket.consume(amount, now):
            if amount > bucket.burst:
                raise OverRate(f"{amount} publications in one request is over the burst of "
                               f"{bucket.burst:g} (api_rate_limit_burst): split it", 1)
            wait = max(1, math.ceil((amount - bucket.tokens) / bucket.rate))
            raise OverRate(f"over the rate limit of {cfg.api_rate_limit_per_s:g} publications/s "
                           f"(burst {cfg.api_rate_limit_burst:g}); nothing was published", wait)

    # -- endpoints -----------------------------------------------------------------

    def _publish_one(self, principal: Principal, channel: str, data: Any, key: str | None,
                     idempotency_key: str | None) -> Published | Coroutine[Any, Any, Published]:
        """One publish, as ``Connection._handle`` and ``_publish`` do it for a
        WebSocket client; with a shared broker, a coroutine that answers once
        Redis has it."""
        hub = self.hub
        hub.check_channel(channel)
        if not principal.can_publish(channel):
            raise Forbidden(f"not allowed to publish to {channel[:64]!r}")
        metrics = self.metrics
        before = metrics.deliveries_total
        if idempotency_key is None:
            result = hub.publish_checked(channel, data, key=key)
        else:
            result = hub.publish_once(channel, data, idempotency_key, key=key)
        if isinstance(result, asyncio.Future):
            return _acknowledged(channel, result)
        position, duplicate = result if type(result) is tuple else (result, False)
        return Published(channel, position.offset, position.epoch, metrics.deliveries_total - before, duplicate)

    def _publish(self, principal: Principal, bucket_key: str, body: bytes, query: str) -> bytes | Any:
        request = _decode(body, PublishRequest)
        self._take(bucket_key, 1)
        # ``data`` keeps a view of the body: the body is little more than the data.
        published = self._publish_one(principal, request.channel, request.data, request.key,
                                      request.idempotency_key)
        if isinstance(published, Published):
            return msgspec.json.encode(published)
        return _encoded(published)

    def _broadcast(self, principal: Principal, bucket_key: str, body: bytes, query: str) -> bytes:
        request = _decode(body, BroadcastRequest)
        self._take(bucket_key, len(request.channels))
        data = bytes(request.data)  # one copy, shared by every channel's publication
        return self._results([self._item(principal, channel, data, request.key, request.idempotency_key)
                              for channel in request.channels])

    def _batch(self, principal: Principal, bucket_key: str, body: bytes, query: str) -> bytes:
        request = _decode(body, BatchRequest)
        self._take(bucket_key, len(request.publishes))
        # Each data copied out of the body, so that history keeps no whole batch per publication.
        return self._results([self._item(principal, p.channel, bytes(p.data), p.key, p.idempotency_key)
                              for p in request.publishes])

    def _item(self, principal: Principal, channel: str, data: bytes, key: str | None,
              idempotency_key: str | None) -> Published | FailedItem | Coroutine[Any, Any, Published | FailedItem]:
        try:
            published = self._publish_one(principal, channel, data, key, idempotency_key)
        except WirehubError as exc:
            return self._failed(channel, exc)
        return published if isinstance(published, Published) else self._item_later(channel, published)

    async def _item_later(self, channel: str, published: Coroutine[Any, Any, Published]) -> Published | FailedItem:
        try:
            return await published
        except WirehubError as exc:
            return self._failed(channel, exc)

    def _failed(self, channel: str, exc: WirehubError) -> FailedItem:
        self.errors_total[exc.code] += 1
        return FailedItem(channel, Failure(exc.code, exc.message))

    def _results(self, items: list[Any]) -> bytes | Any:
        """A broadcast's or a batch's answer; once every item is acknowledged, with a shared broker."""
        if all(isinstance(item, (Published, FailedItem)) for item in items):
            return msgspec.json.encode(Results(items))

        async def gathered() -> bytes:
            done = [item if isinstance(item, (Published, FailedItem)) else await item for item in items]
            return msgspec.json.encode(Results(done))
        return gathered()

    def _channels(self, principal: Principal, bucket_key: str, body: bytes, query: str) -> bytes:
        params = parse_qs(query)
        pattern = _param(params, "pattern")
        matcher = None
        if pattern is not None:
            try:
                matcher = compile_pattern(pattern)
            except PatternError as exc:
                raise InvalidField(f"pattern: {exc}") from None
        self._take(bucket_key, 1)
        found = [ChannelCount(name, len(channel.members)) for name, channel in self.hub.channels.items()
                 if (matcher is None or matcher.fullmatch(name) is not None) and principal.can_subscribe(name)]
        found.sort(key=lambda c: (-c.subscribers, c.channel))
        return msgspec.json.encode({"channels": found})

    def _history(self, principal: Principal, bucket_key: str, body: bytes, query: str) -> Any:
        params = parse_qs(query)
        channel = _param(params, "channel")
        if channel is None:
            raise InvalidField("missing query parameter `channel`")
        since_offset = _int_param(params, "since", 0, None)
        epoch = _param(params, "epoch")
        limit = _int_param(params, "limit", 0, MAX_HISTORY_LIMIT)
        if since_offset is not None and epoch is None:
            raise InvalidField("`since` needs the `epoch` of the offset (both from a publish's answer)")
        self.hub.check_channel(channel)
        if not principal.can_subscribe(channel):
            raise Forbidden(f"not allowed to read the history of {channel[:64]!r}")
        self._take(bucket_key, 1)
        since = StreamPosition(since_offset, epoch) if since_offset is not None else None
        return self._read_history(channel, since, 100 if limit is None else limit)

    def _download(self, method: bytes, file_id: str, headers: dict[bytes, bytes], peer: str) -> FileBody:
        """``GET /files/<file_id>``: for the uploader, for whoever may
        subscribe to the file's channel, with an API key, or anyone on an open
        gateway; one ``Range`` answered 206 (several: the whole file, as RFC
        9110 allows), an unsatisfiable one 416.

        Raises:
            HttpError, WirehubError, AuthError: answered with their status.
        """
        store = self.gateway.files
        if store is None:
            raise HttpError(404, HttpCode.NOT_FOUND, "file transfer is off on this gateway (no file_dir)")
        if method not in (b"GET", b"HEAD"):
            raise HttpError(405, HttpCode.METHOD_NOT_ALLOWED, "files take GET or HEAD", (("Allow", "GET, HEAD"),))
        principal, bucket_key = self._download_principal(headers, peer)
        stored = store.stored(file_id) if _FILE_ID.fullmatch(file_id) else None
        if stored is None:
            raise HttpError(404, HttpCode.NOT_FOUND, f"no complete file {file_id[:64]!r}")
        if not (principal.unrestricted or (principal.sub is not None and principal.sub == stored.owner)
                or (stored.channel is not None and principal.can_subscribe(stored.channel))):
            raise Forbidden(f"file {file_id} is readable by its uploader and by subscribers of its channel")
        self._take(bucket_key, 1)
        size = stored.size
        common = (("Content-Type", "application/octet-stream"), ("Accept-Ranges", "bytes"),
                  ("ETag", f'"{stored.sha256}"'),
                  ("Content-Disposition", f"attachment; filename*=UTF-8''{quote(stored.name, safe='')}"))
        wanted = _byte_range(headers.get(b"range"), size)
        if wanted is None:
            return FileBody(200, str(stored.path), 0, size, common, method == b"HEAD")
        start, end = wanted
        if start >= size:
            raise HttpError(416, HttpCode.RANGE_NOT_SATISFIABLE, f"the file has {size} bytes",
                            (("Content-Range", f"bytes */{size}"),))
        return FileBody(206, str(stored.path), start, end - start + 1,
                        (*common, ("Content-Range", f"bytes {start}-{end}/{size}")), method == b"HEAD")

    def _download_principal(self, headers: dict[bytes, bytes], peer: str) -> tuple[Principal, str]:
        """Who asks for a file: an API key, or a token the gateway accepts
        (``api_jwt`` or not: downloads follow the WebSocket's rules), or on
        an open gateway anyone."""
        api_key = headers.get(b"x-api-key")
        authorization = headers.get(b"authorization")
        if api_key is None and authorization is not None:
            scheme, _, credentials = authorization.partition(b" ")
            if scheme.lower() != b"bearer" or not credentials.strip():
                raise AuthError("Authorization header must be 'Bearer <API key or token>'")
            api_key = credentials.strip()
        verifier = self.gateway.verifier
        if api_key is None:
            if verifier is None:
                return self._unrestricted, f"ip:{peer}"
            raise NotAuthenticated("send a token (Authorization: Bearer) or an API key (X-API-Key)")
        index = self._key_index(api_key)
        if index is not None:
            return self._unrestricted, f"key:{index}"
        if verifier is None or len(api_key) > MAX_CREDENTIAL_BYTES:
            raise AuthError("unknown API key")
        principal = verifier.verify(api_key.decode("latin-1"))
        return principal, f"sub:{principal.sub}"

    async def _read_history(self, channel: str, since: StreamPosition | None, limit: int) -> bytes:
        page = await self.gateway.history(channel, since, limit)
        entries = [HistoryEntry(pub.offset, data_b64=_b64(pub.data), key=pub.key) if pub.binary
                   else HistoryEntry(pub.offset, data=pub.data if isinstance(pub.data, msgspec.Raw)
                                     else msgspec.Raw(pub.data), key=pub.key)
                   for pub in page.publications]
        return msgspec.json.encode(HistoryAnswer(channel, page.position, entries, page.more))


def _byte_range(header: bytes | None, size: int) -> tuple[int, int] | None:
    """The one byte range a ``Range`` header asks for, both ends included
    (``end`` capped at the last byte; ``start`` past it: unsatisfiable),
    or None for the whole file: no header, one that does not parse, or
    several ranges (RFC 9110 §14.2 lets a server ignore those)."""
    if header is None:
        return None
    match = _RANGE.fullmatch(header.decode("latin-1").strip())
    if match is None:
        return None
    first, last = match.groups()
    if not first:
        if not last:
            return None
        return max(0, size - int(last)), size - 1   # the last N bytes
    start = int(first)
    if last and int(last) < start:
        return None   # not a valid range: ignored
    return start, min(int(last) if last else size - 1, size - 1)


def _b64(data: Any) -> str:
    import base64

    return base64.b64encode(data).decode()


def _decode(body: bytes, kind: type) -> Any:
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        raise InvalidField(str(exc)) from None
    except msgspec.DecodeError as exc:
        raise InvalidMessage(f"invalid JSON: {exc}") from None
    except RecursionError:
        raise InvalidMessage("invalid JSON: nested too deeply") from None


def _param(params: dict[str, list[str]], name: str) -> str | None:
    values = params.get(name)
    return values[0] if values else None


def _int_param(params: dict[str, list[str]], name: str, low: int, high: int | None) -> int | None:
    text = _param(params, name)
    if text is None:
        return None
    if not text.isdigit() or len(text) > 19 or int(text) < low or (high is not None and int(text) > high):
        bound = f"{low} to {high}" if high is not None else f"{low} or more"
        raise InvalidField(f"`{name}` must be an integer, {bound}")
    return int(text)


_REASONS = {status.value: status.phrase.encode() for status in HTTPStatus}
# After an answer that closes the connection, what the peer still sends is
# read and dropped for up to this long (or until it closes), so that the
# answer is not lost to the reset a close with unread bytes sends (a client
# still sending the body that is answered 413 would read a reset instead).
LINGER_S = 2.0


class _ApiProtocol(asyncio.Protocol):
    """One HTTP/1.1 connection: h11 parses, ``HttpApi.answer`` answers, in order.

    Requests pipelined behind one another are answered in order, the answers
    of one read written together. A request answered asynchronously
    (``/api/history``) stops reading until its answer is written; so does a
    peer that does not read its answers (``pause_writing``).
    """

    def __init__(self, api: HttpApi) -> None:
        self._api = api
        cfg = api.config
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=cfg.max_header_bytes)
        self._max_head = cfg.max_header_bytes
        self._max_body = cfg.max_payload_bytes
        self._transport: asyncio.Transport | None = None
        self._peer = "?"
        self._request: h11.Request | None = None
        self._body: list[bytes] = []
        self._body_size = 0
        self._out: list[bytes] = []
        self._busy: asyncio.Future[Any] | None = None   # an answer being computed
        self._writing_paused = False
        self._drained: asyncio.Future[None] | None = None   # a download waits for the peer to read
        self._closed = False
        self._lingering = False
        self._in_request = False   # a request's first bytes are in, its last not yet
        self._deadline = 0.0
        self._timer: Any = None
        self._timer_due = 0.0

    # -- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        if peer:
            self._peer = str(peer[0])
        self._api.connections.add(self)
        self._api.connections_total += 1
        self._wait(self._api.config.api_idle_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._api.connections.discard(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._busy is not None:
            self._busy.cancel()

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return
        self._h11.receive_data(data)
        if self._busy is None:
            self._process()

    def eof_received(self) -> bool:
        if self._lingering:
            self.close()
            return True
        self._h11.receive_data(b"")
        if self._busy is None:
            self._process()
        return True   # closed by ``_process`` once the answers are written

    def pause_writing(self) -> None:
        self._writing_paused = True
        self._transport.pause_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        if self._busy is None and not self._closed:
            self._transport.resume_reading()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._transport.close()

    # -- requests ---------------------------------------------------------------------

    def _process(self) -> None:
        conn = self._h11
        try:
            while not self._closed:
                event = conn.next_event()
                kind = type(event)
                if event is h11.NEED_DATA:
                    self._note_progress()
                    break
                if kind is h11.Request:
                    if not self._start(event):
                        return
                elif kind is h11.Data:
                    self._body_size += len(event.data)
                    if self._body_size > self._max_body:
                        self._fail(413, HttpCode.PAYLOAD_TOO_LARGE, self._too_large())
                        return
                    self._body.append(event.data)
                elif kind is h11.EndOfMessage:
                    if not self._finish():
                        return   # answered later, or closed
                elif kind is h11.ConnectionClosed or event is h11.PAUSED:
                    self._flush()
                    self.close()
                    return
        except h11.RemoteProtocolError as exc:
            status = exc.error_status_hint
            code = {431: HttpCode.HEADER_TOO_LARGE, 501: HttpCode.NOT_IMPLEMENTED}.get(status, HttpCode.BAD_REQUEST)
            self._fail(status if status in _REASONS else 400, code, f"malformed HTTP request: {exc}")
            return
        self._flush()

    def _start(self, request: h11.Request) -> bool:
        """A request head is in: refuse what cannot be served before its body is read."""
        self._request = request
        if request.http_version not in (b"1.1", b"1.0"):
            self._fail(505, HttpCode.BAD_REQUEST, f"HTTP/{request.http_version.decode()} is not served here: "
                       f"HTTP/1.1 (or 1.0)")
            return False
        headers = request.headers
        size = len(request.method) + len(request.target) + 12 + sum(len(n) + len(v) + 4 for n, v in headers)
        if size > self._max_head:
            self._fail(431, HttpCode.HEADER_TOO_LARGE, f"request head over {self._max_head} bytes (max_header_bytes)")
            return False
        length = None
        chunked = False
        for name, value in headers:
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = True
        if chunked and length is not None:
            self._fail(400, HttpCode.BAD_REQUEST, "both Content-Length and Transfer-Encoding: refused "
                       "(RFC 9112 §6.3: the shape of request smuggling)")
            return False
        if length is not None and length > self._max_body:
            self._fail(413, HttpCode.PAYLOAD_TOO_LARGE, self._too_large())
            return False
        self._body = []
        self._body_size = 0
        if self._h11.they_are_waiting_for_100_continue:
            self._out.append(self._h11.send(h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue")))
        return True

    def _finish(self) -> bool:
        """The whole request is in: answer it. False when the answer comes later or the connection closed."""
        request = self._request
        self._request = None
        self._in_request = False
        target = request.target.decode("latin-1")
        path, _, query = target.partition("?")
        headers = {}
        for name, value in request.headers:
            headers[name] = value
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        self._body = []
        answer = self._api.answer(request.method, path, query, headers, body, self._peer)
        endpoint = self._api.endpoint(path)
        if isinstance(answer, tuple):
            return self._respond(endpoint, answer)
        if isinstance(answer, FileBody):
            return self._send_file(endpoint, answer)
        self._busy = asyncio.ensure_future(answer)
        self._busy.add_done_callback(lambda done: self._answered(endpoint, done))
        self._transport.pause_reading()
        self._flush()   # the answers of the requests before it
        return False

    def _answered(self, endpoint: str, done: asyncio.Future[Answer]) -> None:
        self._busy = None
        if self._closed or done.cancelled():
            return
        exc = done.exception()
        if exc is not None:
            logger.error("HTTP API request failed", exc_info=exc)
            answer = self._api.failure(500, ErrorCode.INTERNAL_ERROR, "internal error; see the server log")
        else:
            answer = done.result()
        if self._respond(endpoint, answer):
            if not self._writing_paused:
                self._transport.resume_reading()
            self._process()   # requests pipelined meanwhile
        else:
            self._flush()

    def _respond(self, endpoint: str, answer: Answer) -> bool:
        """Send one answer; start the next cycle (True) or close (False)."""
        status, body, extra = answer
        api = self._api
        api.requests_total[endpoint, status] += 1
        conn = self._h11
        out = self._out
        out.append(conn.send(api.head(status, len(body), extra)))
        out.append(conn.send(h11.Data(data=body)))
        out.append(conn.send(h11.EndOfMessage()))
        if conn.our_state is h11.MUST_CLOSE or conn.their_state is not h11.DONE:
            self._flush()
            self.close()
            return False
        conn.start_next_cycle()
        self._wait(api.config.api_idle_timeout_s)
        return True

    def _send_file(self, endpoint: str, body: FileBody) -> bool:
        """Answer a download: the head now, the bytes streamed by a task at
        the pace the peer reads them; requests behind it wait (reading paused)."""
        self._api.requests_total[endpoint, body.status] += 1
        headers = [(b"Content-Length", b"%d" % body.length), (b"Date", self._api.http_date()),
                   *((name.encode(), value.encode()) for name, value in body.headers)]
        self._out.append(self._h11.send(h11.Response(status_code=body.status, headers=headers,
                                                     reason=_REASONS[body.status])))
        self._flush()
        self._busy = asyncio.ensure_future(self._stream(body))
        self._busy.add_done_callback(self._streamed)
        self._transport.pause_reading()
        return False

    async def _stream(self, body: FileBody) -> None:
        if not body.head_only:
            loop = asyncio.get_running_loop()
            with open(body.path, "rb") as file:
                offset, left = body.start, body.length
                while left:
                    block = await loop.run_in_executor(None, os.pread, file.fileno(),
                                                       min(left, FILE_BLOCK_BYTES), offset)
                    if not block:
                        raise OSError(f"{body.path} is shorter than its metadata says")
                    self._transport.write(self._h11.send(h11.Data(data=block)))
                    offset, left = offset + len(block), left - len(block)
                    if self._writing_paused:
                        self._drained = loop.create_future()
                        await self._drained
                        self._drained = None
        self._transport.write(self._h11.send(h11.EndOfMessage()))

    def _streamed(self, done: asyncio.Future[None]) -> None:
        self._busy = None
        if self._closed or done.cancelled():
            return
        conn = self._h11
        if done.exception() is not None:
            # The head is out: closing is the only way left to say the body is not whole.
            logger.error("download failed", exc_info=done.exception())
            self.close()
        elif conn.our_state is h11.MUST_CLOSE or conn.their_state is not h11.DONE:
            self.close()
        else:
            conn.start_next_cycle()
            self._wait(self._api.config.api_idle_timeout_s)
            if not self._writing_paused:
                self._transport.resume_reading()
            self._process()

    def _fail(self, status: int, code: str, message: str) -> None:
        """Answer an unusable request and close: what follows it on the connection cannot be trusted."""
        api = self._api
        path = self._request.target.decode("latin-1").partition("?")[0] if self._request is not None else ""
        api.requests_total[api.endpoint(path), status] += 1
        _, body, _ = api.failure(status, code, message)
        self._out.append(b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                         b"Connection: close\r\nDate: %s\r\n\r\n%s"
                         % (status, _REASONS[status], len(body), api.http_date(), body))
        self._flush()
        self._linger()

    def _linger(self) -> None:
        """Close after the answer: half-close, drop what still comes, close at
        the peer's end or after ``LINGER_S`` (``_expire``)."""
        transport = self._transport
        if self._closed or not transport.can_write_eof():
            self.close()
            return
        self._lingering = True
        self._in_request = False
        transport.write_eof()
        if self._busy is None and not self._writing_paused:
            transport.resume_reading()
        self._wait(LINGER_S)

    def _too_large(self) -> str:
        return f"request body over {self._max_body} bytes (max_payload_bytes)"

    def _flush(self) -> None:
        if self._out:
            if not self._closed:
                self._transport.write(b"".join(self._out))
            self._out.clear()

    # -- timeouts on the gateway's clock ------------------------------------------------

    def _note_progress(self) -> None:
        """The parser wants more: if part of a request is in, its clock starts."""
        if self._in_request:
            return
        if self._h11.their_state is h11.SEND_BODY or self._h11.trailing_data[0]:
            self._in_request = True
            self._wait(self._api.config.api_request_timeout_s)

    def _wait(self, seconds: float) -> None:
        """Close the connection unless it makes progress within ``seconds``.

        One timer per connection, rearmed only when a deadline comes nearer
        than the one it was set for: a request that arrives whole moves the
        deadline with one clock read.
        """
        clock = self._api.clock
        now = clock.monotonic()
        self._deadline = now + seconds
        if self._timer is None or self._deadline < self._timer_due:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = clock.call_later(seconds, self._expire)
            self._timer_due = self._deadline

    def _expire(self) -> None:
        self._timer = None
        if self._closed:
            return
        clock = self._api.clock
        left = self._deadline - clock.monotonic()
        if self._lingering and left <= 0:
            self.close()
            return
        if left > 0 or self._busy is not None:
            self._timer = clock.call_later(max(left, 0.05), self._expire)
            self._timer_due = clock.monotonic() + max(left, 0.05)
            return
        if self._in_request:
            self._api.timeouts_total["request"] += 1
            self._fail(408, HttpCode.REQUEST_TIMEOUT,
                       f"the request did not arrive within {self._api.config.api_request_timeout_s:g} s "
                       f"(api_request_timeout_s)")
        else:
            self._api.timeouts_total["idle"] += 1
            self.close()


async def _acknowledged(channel: str, result: asyncio.Future[Any]) -> Published:
    """A shared broker's answer: each node delivers as it receives the
    publication from Redis, so none is counted here (``delivered`` 0)."""
    got = await result
    position, duplicate = got if type(got) is tuple else (got, False)
    return Published(channel, position.offset, position.epoch, 0, duplicate)


async def _encoded(published: Coroutine[Any, Any, Published]) -> bytes:
    return msgspec.json.encode(await published)
