"""Test helpers: gateways on loopback and the clients that talk to them.

``JsonClient`` wraps `websockets` for readable protocol tests;
``RecordingClient`` is a picows client that records raw frames, for what
`websockets` will not send (invalid UTF-8, reserved bits, no pong) and for
many cheap connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
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

    async def subscribe(self, channel: str) -> None:
        reply = await self.request(type="subscribe", channel=channel)
        assert reply == {"type": "subscribed", "channel": channel}

    async def expect_silence(self, seconds: float = 0.2) -> None:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(self.ws.recv(), seconds)


@contextlib.asynccontextmanager
async def json_client(gw: Gateway, path: str = "/ws", **kwargs: Any) -> AsyncIterator[JsonClient]:
    kwargs.setdefault("max_size", None)
    kwargs.setdefault("ping_interval", None)
    async with websockets.connect(f"ws://127.0.0.1:{gw.port}{path}", **kwargs) as ws:
        client = JsonClient(ws)
        client.welcome = await client.recv()
        yield client


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def start_server(*args: str) -> Iterator[tuple[subprocess.Popen, int]]:
    """Run ``wirehub serve`` in a subprocess (for RSS and signal tests)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "wirehub", "serve", "--port", str(port), *args],
                            stderr=subprocess.PIPE, text=True)
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
