"""Python ``websockets`` (asyncio implementation) on uvloop: the peer to beat.

``echo`` sends every message back; ``broadcast`` sends it to every connection
(sender included) with ``websockets.broadcast``, the library's own fan-out.
Prints ``READY <port>`` once listening.
"""

from __future__ import annotations

import argparse
import asyncio

import uvloop
import websockets
from websockets.asyncio.server import ServerConnection, broadcast, serve


async def main(port: int, mode: str) -> None:
    clients: set[ServerConnection] = set()

    async def handler(ws: ServerConnection) -> None:
        clients.add(ws)
        try:
            async for message in ws:
                if mode == "echo":
                    await ws.send(message)
                else:
                    broadcast(clients, message)
        except websockets.ConnectionClosed:
            pass
        finally:
            clients.discard(ws)

    async with serve(handler, "127.0.0.1", port, compression=None, max_size=None,
                     ping_interval=None, backlog=4096) as server:
        print(f"READY {server.sockets[0].getsockname()[1]}", flush=True)
        await asyncio.Future()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=9011, help="0 picks a free port")
    parser.add_argument("--mode", choices=("echo", "broadcast"), default="echo")
    args = parser.parse_args()
    uvloop.run(main(args.port, args.mode))
