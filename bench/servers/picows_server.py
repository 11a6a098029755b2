"""Minimal picows peer server: the floor of what a picows-based gateway costs.

Modes:

* ``echo``: every data frame goes back to its sender.
* ``broadcast``: every data frame goes to every connection (sender included),
  one ``transport.send`` per recipient: the naive loop.
* ``broadcast-batched``: each message is framed once; per event-loop
  iteration, every connection gets all pending frames in a single socket
  write. This is the cheapest fan-out picows allows and the reference the
  loadgen's own ceiling is measured against.

Usage: ``python bench/servers/picows_server.py --port 9001 --mode echo``.
Prints ``READY <port>`` on stdout once listening (used by the bench runner).
"""

from __future__ import annotations

import argparse
import asyncio
import struct

import uvloop
from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_create_server


def frame_header(msg_type: WSMsgType, size: int) -> bytes:
    """Server-to-client frame header (no mask), RFC 6455 section 5.2."""
    first = 0x80 | int(msg_type)
    if size < 126:
        return struct.pack("!BB", first, size)
    if size < 1 << 16:
        return struct.pack("!BBH", first, 126, size)
    return struct.pack("!BBQ", first, 127, size)


class Hub:
    """Connected transports plus the batching state of ``broadcast-batched``."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.clients: set[WSTransport] = set()
        self.pending: list[bytes] = []
        self.loop = asyncio.get_running_loop()

    def publish(self, msg_type: WSMsgType, payload: bytes) -> None:
        if self.mode == "broadcast":
            for t in self.clients:
                t.send(msg_type, payload)
            return
        if not self.pending:
            self.loop.call_soon(self.flush)
        self.pending.append(frame_header(msg_type, len(payload)) + payload)

    def flush(self) -> None:
        data = b"".join(self.pending)
        self.pending.clear()
        for t in self.clients:
            t.underlying_transport.write(data)


class Peer(WSListener):  # type: ignore[misc]
    def __init__(self, hub: Hub) -> None:
        super().__init__()
        self.hub = hub

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.hub.clients.add(transport)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.hub.clients.discard(transport)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        t = frame.msg_type
        if t == WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code())
            transport.disconnect()
        elif t in (WSMsgType.TEXT, WSMsgType.BINARY):
            if self.hub.mode == "echo":
                transport.send(t, frame.get_payload_as_memoryview())
            else:
                self.hub.publish(t, frame.get_payload_as_bytes())


async def serve(port: int, mode: str) -> None:
    hub = Hub(mode)
    server = await ws_create_server(lambda _request: Peer(hub), "127.0.0.1", port,
                                    enable_auto_pong=True, backlog=4096)
    print(f"READY {server.sockets[0].getsockname()[1]}", flush=True)
    await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=9001, help="0 picks a free port")
    parser.add_argument("--mode", choices=("echo", "broadcast", "broadcast-batched"),
                        default="echo")
    args = parser.parse_args()
    uvloop.run(serve(args.port, args.mode))


if __name__ == "__main__":
    main()
