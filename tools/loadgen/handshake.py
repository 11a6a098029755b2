"""The ``connect`` mode's client: one HTTP upgrade, then a quiet WebSocket.

``connect`` measures how many upgrades a server completes per second, so the
client's share of each one must be small: through picows's ``ws_connect`` the
loadgen spent ~400 µs of CPU per handshake (URL parsing, the response parsed
into header objects, a handshake timer and futures per connection) and
saturated its core before any server it measured. ``Holder`` writes one
request assembled from a prefix built once, checks the status line and
``Sec-WebSocket-Accept``, and from then on does what an idle client must:
answer PING with PONG and CLOSE with CLOSE, and hand data frames (wirehub's
``welcome``) to a callback. That costs ~200 µs per handshake, most of it the
kernel's and uvloop's connect.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from picows import WSMsgType

from .frames import FrameRefused, server_frame_header

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MAX_RESPONSE_HEAD = 16 * 1024
# An idle client expects only small frames (welcome, pings); anything larger is
# refused like picows's default max_frame_size would.
MAX_FRAME = 1 << 20

CLOSE_NO_STATUS = 1005


class HandshakeFailed(Exception):
    """The server did not upgrade; ``kind`` is the error counter to bump."""

    def __init__(self, kind: str, text: str) -> None:
        super().__init__(text)
        self.kind = kind


@dataclass(frozen=True)
class Target:
    """Where to connect and the request head every connection sends."""

    host: str
    port: int
    ssl: ssl.SSLContext | None
    request_head: bytes            # ends just before the Sec-WebSocket-Key value

    @classmethod
    def from_url(cls, url: str) -> Target:
        parts = urlsplit(url)
        if parts.scheme not in ("ws", "wss") or not parts.hostname:
            raise ValueError(f"not a ws:// or wss:// URL: {url!r}")
        secure = parts.scheme == "wss"
        resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        host_header = parts.netloc.rpartition("@")[2]
        head = (f"GET {resource} HTTP/1.1\r\nHost: {host_header}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: ")
        return cls(parts.hostname, parts.port or (443 if secure else 80),
                   ssl.create_default_context() if secure else None, head.encode("latin-1"))

    async def connect(self, protocol: Holder) -> None:
        """Open the TCP (and TLS) connection; ``protocol`` then sends its upgrade."""
        loop = asyncio.get_running_loop()
        await loop.create_connection(lambda: protocol, self.host, self.port, ssl=self.ssl,
                                     server_hostname=self.host if self.ssl else None)


def accept_value(key: bytes) -> bytes:
    """The ``Sec-WebSocket-Accept`` a server must answer ``key`` with (RFC 6455 4.2.2)."""
    return base64.b64encode(hashlib.sha1(key + GUID).digest())


def check_upgrade(head: bytes, accept: bytes) -> HandshakeFailed | None:
    """What is wrong with a response head (without its blank line), or None."""
    lines = head.split(b"\r\n")
    status = lines[0].split(b" ", 2)
    if len(status) < 2 or not status[0].startswith(b"HTTP/1."):
        return HandshakeFailed("handshake_failed", f"handshake: not an HTTP response: {lines[0][:80]!r}")
    if status[1] != b"101":
        return HandshakeFailed(f"handshake_http_{status[1].decode('latin-1')[:3]}",
                               f"handshake: {lines[0].decode('latin-1')[:80]}")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    if headers.get(b"upgrade", b"").lower() != b"websocket":
        return HandshakeFailed("handshake_failed", "handshake: 101 without Upgrade: websocket")
    if headers.get(b"sec-websocket-accept") != accept:
        return HandshakeFailed("handshake_failed", "handshake: wrong Sec-WebSocket-Accept")
    return None


def client_frame(opcode: int, payload: bytes) -> bytes:
    """One masked, unfragmented frame with a payload of at most 125 bytes (control frames)."""
    mask = os.urandom(4)
    n = len(payload)
    keystream = (mask * (n // 4 + 1))[:n]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(keystream, "big")).to_bytes(n, "big")
    return bytes((0x80 | opcode, 0x80 | n)) + mask + masked


class Holder(asyncio.Protocol):
    """One connection: upgrade, then stay open until ``close()`` or the server ends it.

    Args:
        target: where it connects (gives the request head).
        on_message: called with ``(holder, WSMsgType, payload)`` per data frame.
        on_error: called with ``(kind, text)`` for malformed frames.

    ``upgraded`` resolves when the server answered 101 with the right accept
    value, or fails with ``HandshakeFailed`` / ``ConnectionResetError``.
    After that, ``lost(holder)`` (set by the owner) is called once when the
    connection ends; ``close_code`` is the code of the server's CLOSE, or -1
    when it sent none.
    """

    __slots__ = ("_buf", "_accept", "_request", "closing", "close_code", "disconnected", "is_open",
                 "lost", "on_error", "on_message", "transport", "upgraded")

    def __init__(self, target: Target, on_message: Callable[[Holder, WSMsgType, bytes], Any],
                 on_error: Callable[[str, str], Any]) -> None:
        key = base64.b64encode(os.urandom(16))
        self._request = target.request_head + key + b"\r\n\r\n"
        self._accept = accept_value(key)
        self._buf = bytearray()
        self.on_message = on_message
        self.on_error = on_error
        self.lost: Callable[[Holder], Any] | None = None
        self.transport: asyncio.Transport | None = None
        self.upgraded: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.close_code = -1
        self.is_open = False               # the server answered 101
        self.closing = False
        self.disconnected = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self._request)  # type: ignore[attr-defined]
        self._request = b""

    def data_received(self, data: bytes) -> None:
        if not self.is_open and self.upgraded.done():
            return  # a failed or abandoned (timed-out) handshake
        self._buf += data
        if not self.is_open:
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buf) > MAX_RESPONSE_HEAD:
                    self._fail(HandshakeFailed("handshake_failed", "handshake: response head over 16 KiB"))
                return
            problem = check_upgrade(bytes(self._buf[:end]), self._accept)
            del self._buf[:end + 4]
            if problem is not None:
                self._fail(problem)
                return
            self.is_open = True
            self.upgraded.set_result(None)
        self._read_frames()

    def connection_lost(self, exc: Exception | None) -> None:
        self.disconnected = True
        if not self.upgraded.done():
            self.upgraded.set_exception(ConnectionResetError("connection lost during the handshake"))
        elif self.is_open and self.lost is not None:
            self.lost(self)

    def close(self, code: int | None = 1000) -> None:
        """Send CLOSE (with ``code``; None: without a status) and close the
        transport once it is written."""
        if self.transport is None or self.disconnected or self.closing:
            return
        self.closing = True
        if self.is_open:
            self.transport.write(client_frame(WSMsgType.CLOSE,
                                              b"" if code is None else code.to_bytes(2, "big")))
        self.transport.close()

    def abort(self) -> None:
        """Drop the connection at once (a failed or timed-out handshake)."""
        if self.transport is not None:
            self.transport.abort()

    def _fail(self, problem: HandshakeFailed) -> None:
        self.upgraded.set_exception(problem)
        self.abort()

    def _read_frames(self) -> None:
        buf = self._buf
        while not self.closing:
            try:
                parsed = server_frame_header(buf, 0, MAX_FRAME)
            except FrameRefused as exc:
                self.on_error("malformed", f"malformed frame: {exc}")
                self.close(exc.code)
                return
            if parsed is None:
                return
            header, length = parsed
            if len(buf) < header + length:
                return
            b0 = buf[0]
            payload = bytes(buf[header:header + length])
            del buf[:header + length]
            self._on_frame(b0 & 0x80, b0 & 0x0F, payload)

    def _on_frame(self, fin: int, opcode: int, payload: bytes) -> None:
        if opcode == WSMsgType.PING:
            assert self.transport is not None
            self.transport.write(client_frame(WSMsgType.PONG, payload))
        elif opcode == WSMsgType.CLOSE:
            code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
            self.close_code = CLOSE_NO_STATUS if code is None else code
            self.close(code)  # the usual answer echoes the server's code
        elif opcode in (WSMsgType.TEXT, WSMsgType.BINARY) and fin:
            self.on_message(self, WSMsgType(opcode), payload)
        elif opcode != WSMsgType.PONG:
            # Fragmented messages are not part of any protocol the loadgen speaks.
            self.on_error("malformed", f"unexpected frame: opcode {opcode}, fin {bool(fin)}")
