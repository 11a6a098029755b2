"""This host's floor for fan-out latency: nothing but ``send()`` to N sockets.

A fan-out round writes each subscriber's socket once, and on loopback most of
that is the kernel's work: the TCP send, and the receive path that runs in the
sender's context. This script measures that part alone, so that a latency
figure from ``run_e2e.py`` can be read against what any single-threaded
server could do on the same host.

One process, pinned to the server's core as ``run_e2e.py`` pins servers,
writes one WebSocket text frame of ``--size`` bytes to each of
``--connections`` loopback TCP sockets per round, ``--rate`` rounds a second,
and does nothing else: no parsing, no framing, no event loop. A receiver
process on the other cores (uvloop, discarding what it reads) stands in for
the clients. Per measurement window it reports:

* delivery: when each ``send()`` returned, counted from the start of its
  round, over every send. This is the latency a server adds before the
  client's share, if it did nothing but write.
* round: from the round's start to its last ``send()``. Compare it with
  wirehub's ``wirehub_fanout_round_seconds``.
* CPU per send, and the kernel's share of it.

    python bench/send_floor.py                        # 1,000 sockets, 20 rounds/s, 3 x 5 s
    python bench/send_floor.py --rate 100 --repeat 5
    python bench/send_floor.py --json > floor.json

See docs/benchmarks.md ("This host's floor").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import resource
import socket
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from multiprocessing.synchronize import Event

import uvloop

from run_e2e import split_cores
from wirehub import openfiles

FIGURES = ("delivery_p50_us", "delivery_p99_us", "round_p50_us", "round_p99_us", "round_max_us",
           "cpu_us_per_send", "kernel_share", "late_rounds")


def text_frame(size: int) -> bytes:
    """An unmasked server-to-client text frame with ``size`` bytes of payload."""
    if size < 126:
        header = bytes((0x81, size))
    elif size < 1 << 16:
        header = bytes((0x81, 126)) + size.to_bytes(2, "big")
    else:
        raise ValueError("--size must be below 65,536")
    return header + b"x" * size


def receive(port: int, connections: int, ready: Event, cores: set[int] | None) -> None:
    """The clients: connect, then read and discard until the sender closes."""
    if cores:
        os.sched_setaffinity(0, cores)

    class Discard(asyncio.Protocol):
        def __init__(self, lost: Callable[[], None]) -> None:
            self.lost = lost

        def data_received(self, data: bytes) -> None:
            pass

        def connection_lost(self, exc: Exception | None) -> None:
            self.lost()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        all_closed = loop.create_future()
        left = connections

        def lost() -> None:
            nonlocal left
            left -= 1
            if not left:
                all_closed.set_result(None)

        for _ in range(connections):
            await loop.create_connection(lambda: Discard(lost), "127.0.0.1", port)
        ready.set()
        await all_closed

    uvloop.run(main())


def percentile(ordered: Sequence[int], q: float) -> int:
    """The nearest-rank percentile of an already sorted sequence."""
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def measure(sockets: list[socket.socket], frame: bytes, rate: float,
            duration_s: float) -> dict[str, float]:
    """Write ``frame`` to every socket once per round for ``duration_s``; the figures."""
    sends = [sock.sendall for sock in sockets]
    clock = time.perf_counter_ns
    period_ns = int(1e9 / rate)
    deliveries: list[int] = []
    rounds: list[int] = []
    late = 0
    # CPU time from the scheduler's nanosecond count (CLOCK_PROCESS_CPUTIME_ID),
    # not os.times(), whose 10 ms tick rounds a short run to zero; getrusage
    # only splits that time between user and kernel.
    cpu_before_ns = time.process_time_ns()
    usage_before = resource.getrusage(resource.RUSAGE_SELF)
    due = clock() + period_ns
    end = due + int(duration_s * 1e9)
    while due < end:
        wait_ns = due - clock()
        if wait_ns > 0:
            time.sleep(wait_ns / 1e9)
        else:
            late += 1   # the previous round overran its period: the host cannot keep this rate
        start = clock()
        for send in sends:
            send(frame)
            deliveries.append(clock() - start)
        rounds.append(deliveries[-1])
        due += period_ns
    cpu_s = (time.process_time_ns() - cpu_before_ns) / 1e9
    usage_after = resource.getrusage(resource.RUSAGE_SELF)
    user = usage_after.ru_utime - usage_before.ru_utime
    kernel = usage_after.ru_stime - usage_before.ru_stime
    deliveries.sort()
    rounds.sort()
    return {
        "rounds": len(rounds),
        "delivery_p50_us": percentile(deliveries, 0.50) / 1e3,
        "delivery_p99_us": percentile(deliveries, 0.99) / 1e3,
        "round_p50_us": percentile(rounds, 0.50) / 1e3,
        "round_p99_us": percentile(rounds, 0.99) / 1e3,
        "round_max_us": rounds[-1] / 1e3,
        "cpu_us_per_send": cpu_s / len(deliveries) * 1e6,
        "kernel_share": kernel / (user + kernel) if user + kernel else 0.0,
        "late_rounds": late,
    }


def connect_pairs(connections: int, client_cores: set[int] | None
                  ) -> tuple[list[socket.socket], multiprocessing.Process]:
    """``connections`` accepted sockets, their peers held by a receiver process."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=connections)
    ready = multiprocessing.Event()
    receiver = multiprocessing.Process(target=receive, daemon=True, args=(
        listener.getsockname()[1], connections, ready, client_cores))
    receiver.start()
    sockets = []
    with listener:
        for _ in range(connections):
            sock, _ = listener.accept()
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sockets.append(sock)
    if not ready.wait(30):
        raise RuntimeError("the receiver did not connect within 30 s")
    return sockets, receiver


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=1000,
                        help="sockets written per round (default 1,000, as latency-1k)")
    parser.add_argument("--rate", type=float, default=20.0,
                        help="rounds per second (default 20, as latency-1k-r20)")
    parser.add_argument("--size", type=int, default=128,
                        help="payload bytes per frame (default 128: a `message` envelope "
                             "carrying 64 bytes)")
    parser.add_argument("--duration", type=float, default=5.0,
                        help="seconds per measurement window (default 5)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="measurement windows; medians reported (default 3)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    opts = parser.parse_args(argv)
    if opts.connections < 1 or opts.rate <= 0 or opts.duration <= 0 or opts.repeat < 1:
        parser.error("--connections and --repeat must be >= 1, --rate and --duration > 0")

    openfiles.lift()
    server_cores, client_cores = split_cores()
    if server_cores:
        os.sched_setaffinity(0, server_cores)
    frame = text_frame(opts.size)
    sockets, receiver = connect_pairs(opts.connections, client_cores)
    windows = []
    try:
        for n in range(opts.repeat):
            windows.append(measure(sockets, frame, opts.rate, opts.duration))
            w = windows[-1]
            print(f"window {n + 1}/{opts.repeat}: delivery p50 {w['delivery_p50_us']:,.0f} µs, "
                  f"p99 {w['delivery_p99_us']:,.0f} µs; round p50 {w['round_p50_us']:,.0f} µs, "
                  f"p99 {w['round_p99_us']:,.0f} µs; {w['cpu_us_per_send']:.1f} µs CPU per send, "
                  f"{w['kernel_share']:.0%} in the kernel", file=sys.stderr, flush=True)
    finally:
        for sock in sockets:
            sock.close()
        receiver.join(10)
    result = {"connections": opts.connections, "rate": opts.rate, "size": opts.size,
              "pinned": server_cores is not None, "windows": windows,
              **{name: statistics.median(w[name] for w in windows) for name in FIGURES}}
    if opts.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{opts.connections} sockets, {opts.rate:g} rounds/s, medians of {opts.repeat} windows:")
        for name in FIGURES:
            value = result[name]
            shown = f"{value:.0%}" if name == "kernel_share" else f"{value:,.1f}"
            print(f"  {name:<16} {shown:>10}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
