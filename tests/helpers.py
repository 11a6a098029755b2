"""Test helpers: gateways on loopback and the clients that talk to them.

``JsonClient`` wraps `websockets` for readable protocol tests;
``RecordingClient`` is a picows client that records raw frames, for what
`websockets` will not send (invalid UTF-8, reserved bits, no pong) and for
many cheap connections.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import websockets

from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

from wirehub import Config, Gateway


class RecordingClient(WSListener):  # type: ignore[misc]
    """Collect every frame; ``close_code`` is set when the server's CLOSE arrives."""

    def __init__(self) -> None:
        self.transport: WSTransport | None = None
        self.messages: asyncio.Queue[tuple[int, bytes]] = asyncio.Queue()
        self.close_code: int | None = None
        self.close_reason = ""
        self.closed = asyncio.get_running_loop().create_future()

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.CLOSE:
            self.close_code = int(frame.get_close_code())
            self.close_reason = frame.get_close_reason()
            transport.send_close(frame.get_close_code())
            transport.disconnect()
        elif frame.msg_type in (WSMsgType.TEXT, WSMsgType.BINARY):
            self.messages.put_nowait((frame.msg_type, frame.get_payload_as_bytes()))

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if not self.closed.done():
            self.closed.set_result(self.close_code)

    def send_json(self, **msg: Any) -> None:
        self.transport.send(WSMsgType.TEXT, json.dumps(msg).encode())

    async def recv_json(self, timeout: float = 5.0) -> Any:
        opcode, payload = await asyncio.wait_for(self.messages.get(), timeout)
        assert opcode == WSMsgType.TEXT
        return json.loads(payload)

    async def wait_closed(self, timeout: float = 5.0) -> int | None:
        return await asyncio.wait_for(asyncio.shield(self.closed), timeout)


async def connect_recording(port: int, path: str = "/ws", **kwargs: Any) -> RecordingClient:
    kwargs.setdefault("enable_auto_pong", True)
    _, client = await ws_connect(RecordingClient, f"ws://127.0.0.1:{port}{path}", **kwargs)
    return client


@contextlib.asynccontextmanager
async def running_gateway(impl_name: str = "ext", gateway: Gateway | None = None,
                          **config: Any) -> AsyncIterator[Gateway]:
    """Start a gateway on 127.0.0.1 with a free port; stop it afterwards."""
    config.setdefault("port", 0)
    gw = gateway or Gateway(Config(**config), implementation=impl_name)
    await gw.start()
    try:
        yield gw
    finally:
        await gw.stop(timeout_s=1.0)


class JsonClient:
    """A `websockets` client speaking wirehub JSON, for readable tests."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.welcome: dict[str, Any] = {}

    async def send(self, **msg: Any) -> None:
        await self.ws.send(json.dumps(msg))

    async def recv(self, timeout: float = 5.0) -> Any:
        raw = await asyncio.wait_for(self.ws.recv(), timeout)
        return json.loads(raw) if isinstance(raw, str) else raw

    async def request(self, **msg: Any) -> Any:
        await self.send(**msg)
        return await self.recv()

    async def subscribe(self, channel: str) -> dict[str, Any] | None:
        """Subscribe; return the channel's position the reply carries (None for a pattern)."""
        reply = await self.request(type="subscribe", channel=channel)
        return subscribed_position(reply, channel)

    async def expect_silence(self, seconds: float = 0.2) -> None:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(self.ws.recv(), seconds)


def subscribed_position(reply: dict[str, Any], channel: str, **fields: Any) -> dict[str, Any] | None:
    """Check a ``subscribed`` reply (``fields`` too) and return its position
    (an ``{offset, epoch}`` for a channel, None for a pattern)."""
    reply = dict(reply)
    position = reply.pop("position", None)
    assert reply == {"type": "subscribed", "channel": channel, **fields}, reply
    if "*" in channel:
        assert position is None
    else:
        assert isinstance(position["offset"], int) and isinstance(position["epoch"], str), position
    return position


def no_position(reply: dict[str, Any]) -> dict[str, Any]:
    """``reply`` without the ``position`` of a ``subscribed`` (compared on its own elsewhere)."""
    return {k: v for k, v in reply.items() if k != "position"}


@contextlib.asynccontextmanager
async def json_client(gw: Gateway | int, path: str = "/ws", **kwargs: Any) -> AsyncIterator[JsonClient]:
    """A ``JsonClient`` of a gateway (or of ``wirehub serve`` on that port) that has read its welcome."""
    kwargs.setdefault("max_size", None)
    kwargs.setdefault("ping_interval", None)
    port = gw if isinstance(gw, int) else gw.port
    async with websockets.connect(f"ws://127.0.0.1:{port}{path}", **kwargs) as ws:
        client = JsonClient(ws)
        client.welcome = await client.recv()
        yield client


async def until(condition: Callable[[], object], timeout_s: float = 10.0, what: str = "condition") -> None:
    """Wait for state that changes without a message to await (a counter, a thread ending):
    poll every 10 ms, fail after ``timeout_s``. A generous timeout rather than a sleep
    sized for this machine, so a slower one waits longer instead of failing."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what} not met within {timeout_s} s"
        await asyncio.sleep(0.01)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def metrics_text(port: int) -> str:
    """GET /metrics from a gateway on 127.0.0.1; the exposition text."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        return (await asyncio.wait_for(reader.read(), 5)).decode()
    finally:
        writer.close()


@contextlib.contextmanager
def start_server(*args: str, preexec_fn: Callable[[], None] | None = None,
                 env: dict[str, str] | None = None) -> Iterator[tuple[subprocess.Popen, int]]:
    """Run ``wirehub serve`` in a subprocess (for RSS, signal and process-limit tests,
    and a server on a core of its own)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "wirehub", "serve", "--port", str(port), *args],
                            stderr=subprocess.PIPE, text=True, preexec_fn=preexec_fn, env=env)
    drain = threading.Thread(target=proc.stderr.read, daemon=True)
    try:
        line = proc.stderr.readline()
        assert "listening on" in line, line + proc.stderr.read()
        # Keep draining stderr so a chatty server never blocks on a full pipe.
        drain.start()
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if drain.is_alive():
            drain.join(5)
        proc.stderr.close()


def rss_kib(pid: int) -> int:
    """The resident set of process ``pid``, KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def client_frame(opcode: int, payload: bytes = b"", *, fin: bool = True, masked: bool = True,
                 rsv: int = 0) -> bytes:
    head = bytes([(0x80 if fin else 0) | rsv << 4 | opcode])
    n = len(payload)
    mask_bit = 0x80 if masked else 0
    if n < 126:
        head += bytes([mask_bit | n])
    elif n < 65536:
        head += bytes([mask_bit | 126]) + struct.pack(">H", n)
    else:
        head += bytes([mask_bit | 127]) + struct.pack(">Q", n)
    if not masked:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def close_frame(code: int, reason: bytes = b"") -> bytes:
    return client_frame(0x8, struct.pack(">H", code) + reason)


class RawClient:
    """Hand-made frames on a raw socket, for what no WebSocket library sends on purpose."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.handshake = ""
        self.last_rsv1 = False

    @classmethod
    async def connect(cls, port: int, path: str = "/echo", extensions: str | None = None) -> "RawClient":
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        key = base64.b64encode(os.urandom(16)).decode()
        extra = f"Sec-WebSocket-Extensions: {extensions}\r\n" if extensions else ""
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        client = cls(reader, writer)
        client.handshake = head.decode("latin-1")
        return client

    async def frame(self, timeout: float = 3.0) -> tuple[int, bytes]:
        """The next frame's opcode and payload (RSV1 is kept in ``last_rsv1``)."""
        async def read() -> tuple[int, bytes]:
            b0, b1 = await self.reader.readexactly(2)
            self.last_rsv1 = bool(b0 & 0x40)
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack(">H", await self.reader.readexactly(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", await self.reader.readexactly(8))[0]
            return b0 & 0x0F, await self.reader.readexactly(n)
        return await asyncio.wait_for(read(), timeout)

    async def close_code(self) -> int:
        """Read the server's CLOSE, answer it like a polite client, return its code."""
        opcode, payload = await self.frame()
        assert opcode == 0x8, (opcode, payload)
        self.writer.write(client_frame(0x8, payload[:2]))
        return struct.unpack(">H", payload[:2])[0]
