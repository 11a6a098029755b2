"""How fast a Python application can take publications: ``wirehub.Client``
(``async for msg in sub``) against a ``websockets`` client doing the same
(``json.loads`` of every frame), on one core each, in the same run.

A gateway in a subprocess (pinned to its own core) has a ``burst`` message
type that publishes ``--messages`` publications of ``--size`` bytes on the
channel as fast as it can; each client subscribes, asks for a burst, and
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
SERVER = """
import asyncio, sys, uvloop
from wirehub import ChannelOptions, Config, Gateway

async def main():
    gw = Gateway(Config(port=int(sys.argv[1]), channels=[ChannelOptions(pattern="**", history_size=1_000_000)],
                        max_connections_per_ip=0, new_connections_per_ip_per_s=0, rate_limit_messages_per_s=0,
                        rate_limit_bytes_per_s=0, high_water_bytes=1 << 30))  # nobody is a slow consumer here

    @gw.on("burst")
    async def burst(conn, msg):
        data = {"p": "x" * int(msg["size"])}
        for n in range(int(msg["count"])):
            gw.publish(msg["channel"], data)
            if n % 256 == 255:
                await asyncio.sleep(0)
        return {"type": "burst_done", "id": msg.get("id")}

    await gw.start()
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
        await client.request({"type": "burst", "channel": channel, "count": count, "size": size}, timeout_s=600)
        seen = 0
        async for _ in sub:
            seen += 1
            if seen == count:
                break
        return time.perf_counter() - started, cpu_s() - cpu


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
