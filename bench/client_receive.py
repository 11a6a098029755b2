"""How fast a Python application can take publications: ``wirehub.Client``
(``async for msg in sub``) against a ``websockets`` client doing the same
(``json.loads`` of every frame), on one core each, in the same run.

A sender in a subprocess (pinned to its own core) speaks just enough of
the gateway's protocol (welcome, subscribed) and answers a ``burst``
request with ``--messages`` pre-encoded ``message`` frames of ``--size``
bytes, written in large chunks: it cannot be the bottleneck, so what is
measured is the client. Each client subscribes, asks for a burst, and
counts until it has them all. Reported: messages per second at the client
and client CPU microseconds per message (medians of ``--repeat`` rounds,
the two clients alternating), and wirehub's ratio to ``websockets``.

    python bench/client_receive.py                  # 200,000 x 64 B, 5 rounds
    python bench/client_receive.py --messages 50000 --repeat 3

See docs/clients.md, "How fast".
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import uvloop
import websockets

import wirehub

ROOT = Path(__file__).resolve().parent.parent
SERVER = r"""
# A sender that cannot be the bottleneck: enough of a wirehub gateway for a
# subscriber (welcome, subscribed, and a burst of pre-encoded `message`
# frames written in large chunks), so that what is measured is the client.
import asyncio, base64, hashlib, json, sys, uvloop

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

def frame(payload):
    n = len(payload)
    if n < 126:
        return bytes([0x81, n]) + payload
    if n < 65536:
        return bytes([0x81, 126]) + n.to_bytes(2, "big") + payload
    return bytes([0x81, 127]) + n.to_bytes(8, "big") + payload

class Blaster(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport, self.buf, self.upgraded = transport, b"", False

    def data_received(self, data):
        self.buf += data
        if not self.upgraded:
            head, sep, rest = self.buf.partition(b"\r\n\r\n")
            if not sep:
                return
            key = next(line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")
                       if line.lower().startswith(b"sec-websocket-key:"))
            accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
            self.transport.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                                 b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
                                 + frame(b'{"type":"welcome","client_id":"bench","server":"blaster"}'))
            self.upgraded, self.buf = True, rest
        while len(self.buf) >= 6:  # client frames: masked, small
            size = self.buf[1] & 0x7F
            at = 2
            if size == 126:
                size, at = int.from_bytes(self.buf[2:4], "big"), 4
            if len(self.buf) < at + 4 + size:
                return
            mask, payload = self.buf[at:at + 4], self.buf[at + 4:at + 4 + size]
            self.buf = self.buf[at + 4 + size:]
            text = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            try:
                self.handle(json.loads(text))
            except ValueError:
                return  # a close or a binary frame: nothing to answer

    def handle(self, msg):
        if msg.get("type") == "subscribe":
            self.transport.write(frame(json.dumps({"type": "subscribed", "channel": msg["channel"],
                "id": msg.get("id"), "position": {"offset": 0, "epoch": "e"}}).encode()))
        elif msg.get("type") == "burst":
            channel, data = msg["channel"], json.dumps({"p": "x" * int(msg["size"])})
            template = '{"type":"message","channel":"%s","offset":%%d,"data":%s}' % (channel, data)
            for first in range(1, int(msg["count"]) + 1, 4096):
                last = min(first + 4096, int(msg["count"]) + 1)
                self.transport.write(b"".join(frame((template % n).encode()) for n in range(first, last)))
            self.transport.write(frame(json.dumps({"type": "burst_done", "id": msg.get("id")}).encode()))

async def main():
    await asyncio.get_running_loop().create_server(Blaster, "127.0.0.1", int(sys.argv[1]))
    print("ready", flush=True)
    await asyncio.Event().wait()

uvloop.run(main())
"""


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def with_wirehub(url: str, channel: str, count: int, size: int) -> tuple[float, float]:
    async with wirehub.connect(url, max_buffered=count) as client:
        sub = await client.subscribe(channel)
        started, cpu = time.perf_counter(), cpu_s()
        # Ask, and take the messages as they come (as the websockets client does).
        asked = asyncio.ensure_future(client.request(
            {"type": "burst", "channel": channel, "count": count, "size": size}, timeout_s=600))
        seen = 0
        async for _ in sub:
            seen += 1
            if seen == count:
                break
        elapsed, used = time.perf_counter() - started, cpu_s() - cpu
        await asked
        return elapsed, used


async def with_websockets(url: str, channel: str, count: int, size: int) -> tuple[float, float]:
    async with websockets.connect(url, max_size=None, max_queue=None) as ws:
        await ws.recv()  # welcome
        await ws.send(json.dumps({"type": "subscribe", "channel": channel, "id": 1}))
        await ws.recv()  # subscribed
        started, cpu = time.perf_counter(), cpu_s()
        await ws.send(json.dumps({"type": "burst", "channel": channel, "count": count, "size": size, "id": 2}))
        seen = 0
        async for raw in ws:
            if json.loads(raw)["type"] == "message":
                seen += 1
                if seen == count:
                    break
        return time.perf_counter() - started, cpu_s() - cpu


async def measure(opts: argparse.Namespace, url: str) -> dict[str, list[tuple[float, float]]]:
    runs: dict[str, list[tuple[float, float]]] = {"wirehub.Client": [], "websockets": []}
    clients = {"wirehub.Client": with_wirehub, "websockets": with_websockets}
    for r in range(opts.repeat):
        order = list(clients) if r % 2 == 0 else list(reversed(clients))
        for name in order:
            wall, cpu = await clients[name](url, f"bench.{name}.{r}", opts.messages, opts.size)
            runs[name].append((opts.messages / wall, cpu / opts.messages * 1e6))
            print(f"round {r + 1}/{opts.repeat} {name}: {opts.messages / wall:,.0f} messages/s, "
                  f"{cpu / opts.messages * 1e6:.2f} µs CPU per message", file=sys.stderr, flush=True)
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 3)[3],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=200_000, help="publications per burst (default 200,000)")
    parser.add_argument("--size", type=int, default=64, help="payload bytes (default 64)")
    parser.add_argument("--repeat", type=int, default=5, help="rounds (default 5)")
    opts = parser.parse_args(argv)
    cores = sorted(os.sched_getaffinity(0))
    port = 20000 + os.getpid() % 20000
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(port)], stdout=subprocess.PIPE, text=True,
                              preexec_fn=(lambda: os.sched_setaffinity(0, {cores[-1]})) if len(cores) > 1 else None)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        if len(cores) > 1:
            os.sched_setaffinity(0, {cores[0]})
        runs = uvloop.run(measure(opts, f"ws://127.0.0.1:{port}/ws"))
    finally:
        server.kill()
        server.wait()
    table: dict[str, Any] = {name: {"messages_per_s": statistics.median(r for r, _ in rounds),
                                    "cpu_us_per_message": statistics.median(c for _, c in rounds)}
                             for name, rounds in runs.items()}
    ratio = statistics.median(w[0] / s[0] for w, s in zip(runs["wirehub.Client"], runs["websockets"]))
    print(f"{opts.messages:,} x {opts.size} B, medians of {opts.repeat} rounds, each client on one core:")
    for name, row in table.items():
        print(f"{name:<16} {row['messages_per_s']:>12,.0f} messages/s {row['cpu_us_per_message']:>8.2f} µs CPU/message")
    print(f"wirehub.Client / websockets: {ratio:.2f}x (median of the rounds' ratios)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
