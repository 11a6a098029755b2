"""A client connection's wire: frames in, whole messages out (RFC 6455, RFC 7692).

``ClientWire`` does for a client what the gateway's ``FrameListener``
(``wirehub._ext.listener``) does for a server, on top of a compiled
per-frame fast path (``client_frames.FramePath``: whole plain messages never
reach Python code here) and with the gateway's own parts: ``Utf8Validator``/``is_utf8`` (``frame``),
``Inflater``/``Deflater`` (``deflate``), both through ``wirehub._speedups``,
the negotiation's grammar (``protocol.permessage_deflate.accept_response``)
and the close-code rule (``protocol.errors.is_valid_close_code``).

* **Messages**: fragments are reassembled, up to ``max_message_bytes``
  (over it: close 1009); a text message is checked as UTF-8 fragment by
  fragment (close 1007 at the first fragment that cannot be); a
  continuation without a message, or a new message before the last one
  ended, is a protocol error (1002), and so are reserved bits no extension
  gave a meaning to. ``on_message(opcode, payload)`` gets each whole message.
* **Compression**: :func:`connect` offers permessage-deflate
  (``CLIENT_OFFER``) and fails the connection on an answer it cannot accept;
  compressed messages are inflated with the server's agreed window and
  context takeover; :meth:`ClientWire.send` compresses messages of
  ``compress_threshold_bytes`` or more with the window the server allowed
  (uncompressed when that is 8 bits, which zlib cannot compress with).
* **Closing**: a CLOSE is answered with its code (1000 for none) and the
  connection dropped; an invalid code is answered 1002. After the client
  fails the connection (:meth:`ClientWire.fail`) it ignores everything but
  the server's CLOSE, and drops the connection after ``CLOSE_TIMEOUT_S``
  without one. ``closed`` resolves with the code and reason that ended it:
  the server's, or the client's own when it failed the connection first.
* **Reads**: :func:`connect` puts picows's protocol behind the gateway's
  read-ahead guard in client mode (``ReadAheadGuard(..., client=True)``):
  picows parses one frame ahead, and a frame it refuses (a second CLOSE, a
  reserved opcode) is answered only once the frames before it in the same
  read were delivered.
* What picows checks itself is not repeated: opcodes, masking, control
  frame sizes and fragmentation, close frames of one byte, close reasons
  that are not UTF-8 (1007). Pings are answered here (reserved bits
  checked first, nothing after a CLOSE), not by picows's auto-pong.

``wirehub.Client`` subclasses it (its ``_Listener`` decodes the messages
and wants a ``welcome``), and so does the Autobahn echo agent
(``tools/autobahn/client_echo.py``): the fuzzingserver run tests this code.
Close through :meth:`ClientWire.close` and :meth:`ClientWire.fail`, which
keep its state; a CLOSE sent on the transport directly is not known here.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import ssl
from collections.abc import Awaitable
from types import SimpleNamespace
from typing import Any, TypeVar

from picows import WSAutoPingStrategy, WSFrame, WSMsgType, WSTransport
from picows.picows import WSProtocol
from picows.url import parse_url

from . import _speedups
from .protocol.errors import CloseCode, is_valid_close_code
from .protocol.permessage_deflate import (
    CLIENT_OFFER,
    DeflateParams,
    NegotiationError,
    accept_response,
)

DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
COMPRESS_THRESHOLD_BYTES = 1024  # like the gateway's deflate_threshold_bytes
# zlib's fastest level: on 128 KiB of Autobahn's JSON, 3.4x level 6's speed
# for 18 % more bytes (6.7 KiB against 5.7), and half the echo agent's CPU.
COMPRESS_LEVEL = 1
CLOSE_TIMEOUT_S = 5.0            # after our CLOSE, how long the server has to answer it
HANDSHAKE_TIMEOUT_S = 5.0        # ws_connect's default
# picows refuses (1009) a frame over its max_frame_size before we see it; a
# compressed frame of a message at the limit may be a little larger than
# the message, so picows gets this much room and ``ClientWire`` checks the rest.
_FRAME_SLACK_BYTES = 64 * 1024
# The zlib window a Deflater can really compress with (see _pure/deflate.py).
_MIN_COMPRESS_WINDOW_BITS = 9
_NO_STATUS = 1005  # RFC 6455 §7.1.5: a CLOSE without a code
_TEXT, _BINARY, _CLOSE = WSMsgType.TEXT, WSMsgType.BINARY, WSMsgType.CLOSE


class ExtensionRejected(ConnectionError):
    """The server's ``Sec-WebSocket-Extensions`` answer is one the client
    must fail the connection on (RFC 6455 §4.1, RFC 7692 §5)."""


@functools.cache
def default_implementation() -> SimpleNamespace:
    """``wirehub._speedups.implementation()``, loaded once."""
    return _speedups.implementation()


Wire = TypeVar("Wire", bound="ClientWire")


def listener_class(wire: type[Wire], impl: SimpleNamespace) -> type[Wire]:
    """``wire`` (a ``ClientWire`` subclass) on ``impl``'s per-frame fast path
    (``client_frames.FramePath``, a picows listener): the class ``connect``
    instantiates. The fast path is a base class, not a helper, so that picows
    calls it in C for every frame (``cpdef on_ws_frame``) and only the frames
    it does not take reach Python."""
    return _on_frame_path(wire, impl.client_frames.FramePath)


@functools.cache
def _on_frame_path(wire: type[Wire], frame_path: type) -> type[Wire]:
    return type(wire.__name__, (wire, frame_path),
                {"__module__": wire.__module__, "__doc__": wire.__doc__, "__qualname__": wire.__qualname__})


class ClientWire:
    """One client connection's receive path; override :meth:`on_message`.

    A picows listener once ``connect`` puts it on the fast path
    (``listener_class``): ``FramePath`` takes the whole plain messages in C
    and hands this class the rest (``on_other_frame``).

    Args:
        deflate: the agreed permessage-deflate parameters (``connect`` passes
            them), or None.
        max_message_bytes: the largest message accepted, after inflating.
        compress_threshold_bytes: outgoing messages this long or longer are
            compressed when permessage-deflate was agreed.
        compress_level: their zlib level, 1 (fastest) to 9.
        impl: the ``_speedups`` namespace (compiled or pure).
    """

    def __init__(self, deflate: DeflateParams | None = None, *,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 compress_threshold_bytes: int = COMPRESS_THRESHOLD_BYTES,
                 compress_level: int = COMPRESS_LEVEL, impl: SimpleNamespace | None = None) -> None:
        super().__init__()
        impl = impl or default_implementation()
        self.deflate = deflate
        self.max_message_bytes = max_message_bytes
        self.transport: WSTransport | None = None
        self.close_code: int | None = None   # what ended the connection, once known
        self.close_reason = ""
        self.failed = False                  # this side failed the connection
        self.closed: asyncio.Future[tuple[int, str]] = asyncio.get_running_loop().create_future()
        self._impl = impl
        self._closing = False    # a CLOSE was sent or received: only a CLOSE matters now
        self.plain = True       # neither a fragmented message open nor closing: the fast path
        self._abort_timer: asyncio.TimerHandle | None = None
        # The message being reassembled: its opcode (0: none), whether it is
        # compressed, its parts so far and their size.
        self._opcode = 0
        self._compressed = False
        self._parts: list[bytes] = []
        self._size = 0
        self._utf8: Any = None       # a Utf8Validator, made for the first fragmented text
        self._inflater: Any = None   # made for the first compressed message
        self._deflater: Any = None
        self._compress_threshold = compress_threshold_bytes
        self._compress_level = compress_level
        self._compress_out = deflate is not None and deflate.client_max_window_bits >= _MIN_COMPRESS_WINDOW_BITS

    # -- for subclasses ----------------------------------------------------------------

    def on_message(self, opcode: int, payload: bytes) -> None:
        """A whole message: ``WSMsgType.TEXT`` (valid UTF-8) or ``BINARY``."""

    # -- sending -----------------------------------------------------------------------

    def send(self, opcode: int, payload: bytes | bytearray | memoryview, compress: bool = True) -> None:
        """Send one message, compressed when agreed and long enough (never
        with ``compress=False``: data deflate cannot shrink, such as file
        chunks, which RFC 7692 lets go uncompressed between compressed
        messages); nothing once closing."""
        transport = self.transport
        if transport is None or self._closing:
            return
        if compress and self._compress_out and len(payload) >= self._compress_threshold:
            if self._deflater is None:
                self._deflater = self._impl.deflate.Deflater(
                    level=self._compress_level, window_bits=self.deflate.client_max_window_bits,  # type: ignore[union-attr]
                    no_context_takeover=self.deflate.client_no_context_takeover)  # type: ignore[union-attr]
            transport.send(opcode, self._deflater.compress(payload), rsv1=True)
        else:
            transport.send(opcode, payload)

    def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Start the closing handshake: send CLOSE, drop the connection when the
        server answers (or after ``CLOSE_TIMEOUT_S``)."""
        transport = self.transport
        if transport is None or self._closing or transport.is_disconnected:
            return
        self._closing, self.plain = True, False
        self._ended_by(code, reason)
        transport.send_close(code, reason.encode()[:123])
        self._abort_timer = asyncio.get_running_loop().call_later(CLOSE_TIMEOUT_S, self._abort)

    def fail(self, code: int, reason: str) -> None:
        """Fail the connection (RFC 6455 §7.1.7): close with ``code``, remember it as the cause."""
        if not self._closing:
            self.failed = True
        self.close(code, reason)

    # -- picows callbacks --------------------------------------------------------------

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if self._abort_timer is not None:
            self._abort_timer.cancel()
        handshake = transport.close_handshake
        if self.close_code is None and handshake is not None and handshake.sent is not None:
            # picows failed the connection itself (a bad opcode, a masked
            # frame, a bad close reason, ...): its code is the cause.
            self.failed = True
            self._ended_by(int(handshake.sent.code), handshake.sent.reason or "")
        self._ended_by(1006, "connection lost")
        self._parts = []
        if not self.closed.done():
            self.closed.set_result((self.close_code, self.close_reason))
        # picows hands the exception that made it disconnect (its own parser's,
        # or one raised by on_message) to wait_disconnected(); take it, or
        # asyncio logs it as never retrieved. It is in close_code/picows's log.
        asyncio.ensure_future(_consume(transport.wait_disconnected()))

    def on_other_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        """Every frame the fast path (``FramePath.on_ws_frame``) does not take:
        a fragment, a compressed or control frame, anything while closing."""
        if self._closing or transport.is_close_frame_sent:
            if frame.msg_type == WSMsgType.CLOSE:
                transport.disconnect()  # the answer to our CLOSE, or a second one
        else:
            self._on_other_frame(frame)

    # -- the rest of RFC 6455 ----------------------------------------------------------

    def _on_other_frame(self, frame: WSFrame) -> None:
        opcode = frame.msg_type
        if frame.rsv2 or frame.rsv3 or (frame.rsv1 and opcode >= 8):
            self.fail(CloseCode.PROTOCOL_ERROR, "reserved bits set without a negotiated extension")
        elif opcode == WSMsgType.CLOSE:
            self._on_close_frame(frame)
        elif opcode == WSMsgType.PING:
            # Here, not by picows's auto-pong, which answers before any check
            # (a PING with reserved bits set) and even after a CLOSE.
            self.transport.send(WSMsgType.PONG, frame.get_payload_as_bytes())  # type: ignore[union-attr]
        elif opcode == WSMsgType.PONG:
            return  # nothing to say (RFC 6455 §5.5.3)
        elif opcode == WSMsgType.CONTINUATION:
            if not self._opcode:
                self.fail(CloseCode.PROTOCOL_ERROR, "continuation frame without a message to continue")
            elif frame.rsv1:
                self.fail(CloseCode.PROTOCOL_ERROR, "RSV1 set on a continuation frame")
            else:
                self._add_fragment(frame)
        elif self._opcode:
            self.fail(CloseCode.PROTOCOL_ERROR, "new message started before the fragmented one finished")
        elif frame.rsv1 and self.deflate is None:
            self.fail(CloseCode.PROTOCOL_ERROR, "RSV1 set without permessage-deflate")
        else:
            self._opcode, self.plain = opcode, False
            self._compressed = bool(frame.rsv1)
            self._size = 0
            self._add_fragment(frame)

    def _add_fragment(self, frame: WSFrame) -> None:
        chunk = frame.get_payload_as_bytes()
        if self._compressed:
            if self._inflater is None:
                self._inflater = self._impl.deflate.Inflater(
                    window_bits=self.deflate.server_max_window_bits,  # type: ignore[union-attr]
                    no_context_takeover=self.deflate.server_no_context_takeover,  # type: ignore[union-attr]
                    max_message_bytes=self.max_message_bytes)
            try:
                chunk = self._inflater.feed(chunk, frame.fin)
            except self._impl.deflate.MessageTooBig:
                self.fail(CloseCode.MESSAGE_TOO_BIG, "message inflates past max_message_bytes")
                return
            except self._impl.deflate.InvalidData:
                self.fail(CloseCode.PROTOCOL_ERROR, "invalid compressed data")
                return
        elif self._size + len(chunk) > self.max_message_bytes:
            self.fail(CloseCode.MESSAGE_TOO_BIG, "message exceeds max_message_bytes")
            return
        self._size += len(chunk)
        text = self._opcode == WSMsgType.TEXT
        if text:
            if self._utf8 is None:
                self._utf8 = self._impl.frame.Utf8Validator()
            if not self._utf8.feed(chunk):  # fail fast, before the message ends
                self.fail(CloseCode.INVALID_TEXT, "text message is not valid UTF-8")
                return
        self._parts.append(chunk)
        if not frame.fin:
            return
        opcode, self._opcode, self.plain = self._opcode, 0, True
        parts, self._parts = self._parts, []
        if text and not self._utf8.finish():
            self.fail(CloseCode.INVALID_TEXT, "text message is not valid UTF-8")
            return
        self.on_message(opcode, parts[0] if len(parts) == 1 else b"".join(parts))

    def _on_close_frame(self, frame: WSFrame) -> None:
        transport = self.transport
        assert transport is not None
        code = _NO_STATUS
        if frame.payload_size >= 2:
            code = int(frame.get_close_code())
            if not is_valid_close_code(code):
                self.fail(CloseCode.PROTOCOL_ERROR, "invalid close code")
                transport.disconnect()  # the server sent its CLOSE: it will not answer ours
                return
        self._closing, self.plain = True, False
        self._ended_by(code, (frame.get_close_reason() or "") if frame.payload_size > 2 else "")
        # Echo the code (RFC 6455 §5.5.1); a CLOSE without one is answered 1000.
        transport.send_close(code if code != _NO_STATUS else CloseCode.NORMAL)
        transport.disconnect()

    def _ended_by(self, code: int, reason: str) -> None:
        if self.close_code is None:
            self.close_code, self.close_reason = code, reason

    def _abort(self) -> None:
        if self.transport is not None and not self.transport.is_disconnected:
            self.transport.disconnect(False)


async def _consume(waiting: Awaitable[None]) -> None:
    with contextlib.suppress(Exception):
        await waiting


class _PicowsLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """picows's logger (``picows.client``, ws_connect's), with its write
    flow control at DEBUG: picows warns each time the write buffer crosses
    its high-water mark and again when it drains, which for a client that
    streams (an upload's chunks) is its normal pace, twice per chunk."""

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        if isinstance(msg, str) and msg.startswith("Protocol writing "):
            level = logging.DEBUG
        super().log(level, msg, *args, **kwargs)


_PICOWS_LOGGER = _PicowsLog(logging.getLogger("picows.client"), {})


async def connect(url: str, wire: type[Wire] = ClientWire, *, compression: bool = True,
                  max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, impl: SimpleNamespace | None = None,
                  extra_headers: dict[str, str] | None = None, ssl_context: ssl.SSLContext | None = None,
                  handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S, **wire_options: Any) -> tuple[WSTransport, Wire]:
    """Open a connection whose listener is a ``wire`` (on ``impl``'s fast
    path, ``listener_class``) made with ``deflate=..., max_message_bytes=...,
    impl=...`` and ``wire_options``: permessage-deflate offered when
    ``compression`` (``CLIENT_OFFER``) and the answer checked.

    What ``picows.ws_connect`` builds (no proxies, no redirects), behind the
    read-ahead guard in client mode (``impl.readahead``): picows parses one
    frame ahead, and a frame it refuses (a second CLOSE, a reserved opcode)
    would otherwise be answered before the frame in front of it was
    delivered; the guard gives it the reads split before such frames.

    Raises:
        ExtensionRejected: the server's extension answer is not acceptable
            (the TCP connection is closed; RFC 6455 §4.1).
        ConnectionError: the connection closed before the upgrade's answer.
        picows.WSHandshakeError, OSError, asyncio.TimeoutError: no upgrade.
    """
    impl = impl or default_implementation()
    parsed = parse_url(url)
    headers = dict(extra_headers or {})
    if compression:
        headers["Sec-WebSocket-Extensions"] = CLIENT_OFFER

    def factory(request: Any, response: Any) -> Wire:
        try:
            agreed = accept_response(response.headers.getall("Sec-WebSocket-Extensions", []), compression)
        except NegotiationError as exc:
            # Not a TypeError: picows would call the factory again without arguments.
            raise ExtensionRejected(f"the server's permessage-deflate answer is not acceptable: {exc}") from None
        return listener_class(wire, impl)(deflate=agreed, max_message_bytes=max_message_bytes, impl=impl,
                                          **wire_options)

    max_frame_size = max_message_bytes + _FRAME_SLACK_BYTES
    inner = WSProtocol(
        parsed.netloc, parsed.resource_name, True, factory, _PICOWS_LOGGER,
        True,                                       # disconnect_on_exception
        handshake_timeout_s,
        False, 10, 10, WSAutoPingStrategy.PING_WHEN_IDLE,  # auto-ping off
        False,                                      # auto-pong off: ClientWire answers PINGs
        max_frame_size,
        headers or None,
        16 * 1024,                                  # read_buffer_init_size, ws_connect's
    )
    tls = (ssl_context or True) if parsed.is_secure else None
    loop = asyncio.get_running_loop()
    await loop.create_connection(lambda: impl.readahead.ReadAheadGuard(inner, max_frame_size, client=True),
                                 parsed.host, parsed.port, ssl=tls)
    try:
        await inner.wait_until_handshake_complete()
    except asyncio.CancelledError:
        inner.transport.disconnect(False)
        raise
    if inner.listener is None:  # the connection was lost before the upgrade's answer
        raise ConnectionError(f"{url}: the connection closed during the handshake")
    return inner.transport, inner.listener
