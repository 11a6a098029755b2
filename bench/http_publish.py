"""Publishes per second over the HTTP API's keep-alive connections, against WebSocket publishes.

``wirehub serve`` runs in a subprocess on a core of its own with the HTTP
API on (``--api-port``, an API key, no rate limits); this process, on the
other core, publishes for ``--duration`` seconds per measurement, request
after answer (one publish in flight per connection), over:

* ``http x1``: one keep-alive connection, ``POST /api/publish`` with ``X-API-Key``;
* ``http xN``: ``--connections`` of them at once;
* ``batch x1``: one connection, ``POST /api/batch`` with ``--batch`` publishes each;
* ``ws x1`` / ``ws xN``: the baseline, WebSocket ``publish`` messages with an
  ``id``, each waiting for its ``published`` answer (the same request/answer
  shape as HTTP).

Both clients are lean raw-socket ones on uvloop (prebuilt request bytes,
answers parsed by their length), so that the figures are the gateway's
rather than a client library's. One WebSocket subscriber receives every
publication (``delivered: 1``). Reported as medians of ``--repeat``
rounds, the kinds interleaved within each round: publishes/s and the
server's CPU µs per publish (from /proc), and HTTP over WebSocket::

    python bench/http_publish.py                  # 5 rounds of 2 s per kind, ~1 min
    python bench/http_publish.py --repeat 9 --duration 3 --connections 8 --json out.json

See docs/benchmarks.md, "HTTP publish API".
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import statistics
import struct
import subprocess
import sys
import time
from typing import Any

import uvloop

API_KEY = "bench-key"
CHANNEL = "bench.http"


def server_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def data(size: int) -> dict[str, Any]:
    return {"v": "x" * max(0, size - 8)}


# -- HTTP ---------------------------------------------------------------------------

def http_request(size: int, batch: int = 0) -> bytes:
    """A publish, or with ``batch`` a ``/api/batch`` of that many."""
    if batch:
        path = b"/api/batch"
        body = json.dumps({"publishes": [{"channel": CHANNEL, "data": data(size)}] * batch}).encode()
    else:
        path = b"/api/publish"
        body = json.dumps({"channel": CHANNEL, "data": data(size)}).encode()
    return (b"POST %s HTTP/1.1\r\nHost: bench\r\nX-API-Key: %s\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (path, API_KEY.encode(), len(body), body))


async def http_publisher(port: int, request: bytes, stop_at: float, per_request: int = 1) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    loop = asyncio.get_running_loop()
    done = 0
    try:
        while loop.time() < stop_at:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            start = head.index(b"Content-Length: ") + 16
            body = await reader.readexactly(int(head[start:head.index(b"\r\n", start)]))
            if done == 0:
                assert head.startswith(b"HTTP/1.1 200 "), head + body
                answer = json.loads(body)
                assert (answer["results"][-1] if per_request > 1 else answer)["delivered"] == 1, body
            done += 1
    finally:
        writer.close()
    return done * per_request


# -- WebSocket ------------------------------------------------------------------------

MASK = b"\x00\x00\x00\x00"   # a fixed mask (all zeros): the bench's frames are prebuilt


def client_frame(payload: bytes) -> bytes:
    n = len(payload)
    head = b"\x81" + (bytes([0x80 | n]) if n < 126 else b"\xfe" + struct.pack(">H", n))
    return head + MASK + payload


async def ws_connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16))
    writer.write(b"GET /ws HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n" % key)
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), head
    await read_frame(reader)   # welcome
    return reader, writer


async def read_frame(reader: asyncio.StreamReader) -> bytes:
    _, b1 = await reader.readexactly(2)
    n = b1 & 0x7F
    if n == 126:
        n = struct.unpack(">H", await reader.readexactly(2))[0]
    elif n == 127:
        n = struct.unpack(">Q", await reader.readexactly(8))[0]
    return await reader.readexactly(n)


async def ws_publisher(port: int, frame: bytes, stop_at: float) -> int:
    reader, writer = await ws_connect(port)
    loop = asyncio.get_running_loop()
    done = 0
    try:
        while loop.time() < stop_at:
            writer.write(frame)
            answer = await read_frame(reader)
            if done == 0:
                assert json.loads(answer)["type"] == "published", answer
            done += 1
    finally:
        writer.close()
    return done


async def subscriber(port: int, ready: asyncio.Future[None]) -> None:
    """One subscriber of the channel, reading and dropping everything."""
    reader, writer = await ws_connect(port)
    writer.write(client_frame(json.dumps({"type": "subscribe", "channel": CHANNEL}).encode()))
    await read_frame(reader)
    ready.set_result(None)
    try:
        while await reader.read(1 << 16):
            pass
    finally:
        writer.close()


# -- the run ---------------------------------------------------------------------------

async def measure(opts: argparse.Namespace, port: int, api_port: int, pid: int) -> dict[str, list[tuple[float, float]]]:
    ready = asyncio.get_running_loop().create_future()
    listening = asyncio.ensure_future(subscriber(port, ready))
    await ready
    request = http_request(opts.size)
    batch = http_request(opts.size, opts.batch)
    frame = client_frame(json.dumps({"type": "publish", "channel": CHANNEL, "data": data(opts.size),
                                     "id": 1}).encode())
    n = opts.connections
    kinds = {
        "http x1": lambda stop: [http_publisher(api_port, request, stop)],
        f"http x{n}": lambda stop: [http_publisher(api_port, request, stop) for _ in range(n)],
        "batch x1": lambda stop: [http_publisher(api_port, batch, stop, opts.batch)],
        "ws x1": lambda stop: [ws_publisher(port, frame, stop)],
        f"ws x{n}": lambda stop: [ws_publisher(port, frame, stop) for _ in range(n)],
    }
    runs: dict[str, list[tuple[float, float]]] = {kind: [] for kind in kinds}
    loop = asyncio.get_running_loop()
    for r in range(opts.repeat):
        order = list(kinds) if r % 2 == 0 else list(reversed(kinds))
        for kind in order:
            cpu0, t0 = server_cpu_s(pid), time.perf_counter()
            counts = await asyncio.gather(*kinds[kind](loop.time() + opts.duration))
            wall, cpu = time.perf_counter() - t0, server_cpu_s(pid) - cpu0
            total = sum(counts)
            runs[kind].append((total / wall, cpu / total * 1e6))
            print(f"round {r + 1}/{opts.repeat} {kind}: {total / wall:,.0f} publishes/s, "
                  f"{cpu / total * 1e6:.1f} µs server CPU each", file=sys.stderr, flush=True)
    listening.cancel()
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=2.0, help="seconds per kind per round (default 2)")
    parser.add_argument("--repeat", type=int, default=5, help="rounds (default 5)")
    parser.add_argument("--connections", type=int, default=4, help="connections of the xN kinds (default 4)")
    parser.add_argument("--size", type=int, default=64, help="bytes of data per publication (default 64)")
    parser.add_argument("--batch", type=int, default=100, help="publishes per /api/batch request of the "
                        "'batch x1' kind (default 100)")
    parser.add_argument("--json", metavar="FILE", help="also write the medians here")
    opts = parser.parse_args(argv)
    cores = sorted(os.sched_getaffinity(0))
    port, api_port = 20000 + os.getpid() % 20000, 40000 + os.getpid() % 20000
    server = subprocess.Popen(
        [sys.executable, "-m", "wirehub", "serve", "--port", str(port), "--api-port", str(api_port),
         "--api-key", API_KEY, "--api-rate-limit-per-s", "0", "--rate-limit-messages-per-s", "0",
         "--rate-limit-bytes-per-s", "0",
         # The subscriber shares the publishers' core (batches must not get it closed as
         # slow) and drops what it reads, pings included (it must not be closed as gone).
         "--high-water-bytes", str(1 << 30), "--ping-interval-s", "3600", "--ping-timeout-s", "3600"],
        stderr=subprocess.PIPE, text=True)
    try:
        if len(cores) > 1:
            os.sched_setaffinity(server.pid, {cores[-1]})
        assert server.stderr is not None
        line = server.stderr.readline()
        assert "listening on" in line, line + server.stderr.read()
        while "HTTP API" not in line:
            line = server.stderr.readline()
        if len(cores) > 1:
            os.sched_setaffinity(0, {cores[0]})
        runs = uvloop.run(measure(opts, port, api_port, server.pid))
    finally:
        server.kill()
        server.wait()
    table = {kind: {"publishes_per_s": statistics.median(r for r, _ in rounds),
                    "server_cpu_us_per_publish": statistics.median(c for _, c in rounds)}
             for kind, rounds in runs.items()}
    n = opts.connections
    print(f"{opts.size} B data, 1 subscriber, medians of {opts.repeat} rounds of {opts.duration:g} s, "
          f"server on one core ({'pinned' if len(cores) > 1 else 'unpinned'}):")
    for kind, row in table.items():
        print(f"{kind:<10} {row['publishes_per_s']:>10,.0f} publishes/s {row['server_cpu_us_per_publish']:>8.1f} "
              f"µs server CPU/publish")
    for c in (1, n):
        ratio = statistics.median(h[0] / w[0] for h, w in zip(runs[f"http x{c}"], runs[f"ws x{c}"]))
        print(f"http/ws x{c}: {ratio:.2f} (median of the rounds' ratios)")
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump({"options": vars(opts), "medians": table}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
