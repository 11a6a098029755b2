"""Docker log channels: lines/s through wirehub against the engine's own stream, and pings meanwhile.

Each round runs two busybox containers (tests/engine's image, no network)
that wait for a flag, then write ``seq 1 <--lines>`` as fast as they can:

  direct   the docker SDK follows the first one's logs from the engine
           (``APIClient.logs(stream=True, follow=True, timestamps=True)``):
           the baseline, what a Python client reading the engine itself gets;
  wirehub  a viewer follows the second one's ``logs:<id>`` through
           ``wirehub serve --docker``, pinned to one core (the viewer on the
           others, as in run_e2e.py), while a second connection pings the
           gateway every 10 ms: 100 pings before the lines start (idle), then
           until the last line.

The two alternate which goes first. Reported, as medians of the rounds:
lines/s at the reader from its first line to its last, wirehub's as a ratio
to the direct read of the same round; the pings' round trips while the lines
stream (median, p99, max) against the same gateway idle. Every line must
arrive once, in order, in both: otherwise the run fails (status 1).

The engine: DOCKER_HOST if it answers, else the one
tests/engine/start-engine.sh starts (installing docker.io on first use),
stopped again at the end.

    python bench/docker_logs.py                      # 200,000 lines, 5 rounds, ~2 min
    python bench/docker_logs.py --lines 50000 --repeat 3

See docs/benchmarks.md, "Docker log channels".
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import docker
import msgspec
import uvloop
from picows import WSListener, WSMsgType, ws_connect

from run_e2e import Running, servers, split_cores
from send_floor import percentile

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from docker_engine import Containers, containers, ping, run_script, wait_for  # noqa: E402

PING_INTERVAL_S = 0.01
IDLE_PINGS = 100
TIMEOUT_S = 300.0   # for one reader's lines: a stalled stream fails the run instead of hanging it
_decode = msgspec.json.Decoder().decode


@contextlib.contextmanager
def engine() -> Iterator[str]:
    """DOCKER_HOST if it answers, else a private engine from tests/engine/, stopped afterwards."""
    host = os.environ.get("DOCKER_HOST", "")
    if host and ping(host):
        yield host
        return
    print("starting a Docker engine (tests/engine/start-engine.sh)", file=sys.stderr, flush=True)
    host = run_script("start-engine.sh")
    try:
        yield host
    finally:
        run_script("stop-engine.sh")


class Lines:
    """Checks that line numbers arrive as 1, 2, 3, ...; notes when the first and the last came."""

    def __init__(self) -> None:
        self.expected = 1
        self.errors: list[str] = []
        self.first_at = self.last_at = 0.0

    def add(self, line: int) -> None:
        self.last_at = time.perf_counter()
        if self.expected == 1:
            self.first_at = self.last_at
        if line != self.expected and len(self.errors) < 5:
            self.errors.append(f"expected line {self.expected}, got {line}")
        self.expected += 1

    def result(self, total: int) -> dict[str, Any]:
        """lines/s from the first line to the last, and what went wrong (nothing, if all ``total`` came)."""
        errors = list(self.errors)
        if self.expected != total + 1:
            errors.append(f"{self.expected - 1} lines of {total}")
        span = self.last_at - self.first_at
        return {"lines_per_s": (self.expected - 2) / span if span > 0 else 0.0, "errors": errors}


def read_direct(host: str, made: Containers, cid: str, total: int) -> dict[str, Any]:
    """Follow ``cid``'s logs with the docker SDK (a client of its own: ``made``'s signals
    the container from another thread meanwhile) while it writes its lines."""
    api = docker.APIClient(base_url=host, version="auto")
    stream = api.logs(cid, stream=True, follow=True, timestamps=True)  # the request is made here
    threading.Thread(target=made.signal, args=(cid,), daemon=True).start()
    lines = Lines()
    try:
        for message in stream:  # one engine message, b"<timestamp> <line>\n", per item
            lines.add(int(message.split(b" ", 1)[1]))
    finally:
        stream.close()
        api.close()
    return lines.result(total)


class Viewer(WSListener):  # type: ignore[misc]
    """Subscribes to a ``logs:`` channel and checks its lines as they arrive."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.lines = Lines()
        self.subscribed: asyncio.Future[None] = loop.create_future()
        self.started: asyncio.Future[None] = loop.create_future()
        self.done: asyncio.Future[None] = loop.create_future()

    def on_ws_frame(self, transport: Any, frame: Any) -> None:
        if frame.msg_type != WSMsgType.TEXT:
            return
        msg = _decode(frame.get_payload_as_bytes())
        if msg["type"] == "subscribed":
            self.subscribed.set_result(None)
        elif msg["type"] == "message":
            data = msg["data"]
            if data.get("type") == "stream_end":
                self.done.set_result(None)
                return
            self.lines.add(int(data["line"]))
            if not self.started.done():
                self.started.set_result(None)

    def on_ws_disconnected(self, transport: Any) -> None:
        for future in (self.subscribed, self.started, self.done):
            if not future.done():
                future.set_exception(ConnectionError("the gateway closed the viewer's connection"))


class Pinger(WSListener):  # type: ignore[misc]
    """Pings through the gateway; a round trip ends when its pong arrives."""

    def __init__(self) -> None:
        self.transport: Any = None
        self.sent: dict[int, float] = {}
        self.rtts: list[float] = []
        self._next = 0

    def on_ws_connected(self, transport: Any) -> None:
        self.transport = transport

    def ping(self) -> None:
        self._next += 1
        self.sent[self._next] = time.perf_counter()
        self.transport.send(WSMsgType.TEXT, b'{"type":"ping","id":%d}' % self._next)

    def on_ws_frame(self, transport: Any, frame: Any) -> None:
        if frame.msg_type == WSMsgType.TEXT:
            msg = _decode(frame.get_payload_as_bytes())
            if msg["type"] == "pong":
                self.rtts.append(time.perf_counter() - self.sent.pop(msg["id"]))

    async def answered(self) -> list[float]:
        """Wait for the pongs of every ping sent; the round trips, sorted, and start afresh."""
        deadline = time.monotonic() + 10
        while self.sent and time.monotonic() < deadline:
            await asyncio.sleep(PING_INTERVAL_S)
        if self.sent:
            raise RuntimeError(f"{len(self.sent)} pings unanswered after 10 s")
        rtts, self.rtts = sorted(self.rtts), []
        return rtts


def rtt_figures(rtts: list[float]) -> dict[str, float]:
    """Median, p99 and max of sorted round trips, in ms."""
    return {"median_ms": percentile(rtts, 0.5) * 1e3, "p99_ms": percentile(rtts, 0.99) * 1e3,
            "max_ms": rtts[-1] * 1e3}


async def read_wirehub(port: int, made: Containers, cid: str, total: int) -> dict[str, Any]:
    """Follow ``logs:<cid>`` through the gateway at ``port``, pinging it, while the container writes."""
    url = f"ws://127.0.0.1:{port}/ws"
    viewer_transport, viewer = await ws_connect(Viewer, url)
    pinger_transport, pinger = await ws_connect(Pinger, url)
    try:
        viewer_transport.send(WSMsgType.TEXT, json.dumps({"type": "subscribe", "channel": f"logs:{cid}"}).encode())
        await asyncio.wait_for(viewer.subscribed, 60)
        for _ in range(IDLE_PINGS):
            pinger.ping()
            await asyncio.sleep(PING_INTERVAL_S)
        idle = await pinger.answered()
        await asyncio.to_thread(made.signal, cid)
        await asyncio.wait_for(viewer.started, 60)
        deadline = time.monotonic() + TIMEOUT_S
        while not viewer.done.done():
            if time.monotonic() > deadline:
                raise RuntimeError(f"no stream_end within {TIMEOUT_S:.0f} s")
            pinger.ping()
            await asyncio.sleep(PING_INTERVAL_S)
        viewer.done.result()  # raises if the gateway closed the viewer
        streaming = await pinger.answered()
    finally:
        viewer_transport.disconnect()
        pinger_transport.disconnect()
    return {**viewer.lines.result(total), "ping_idle": rtt_figures(idle),
            "ping_streaming": rtt_figures(streaming), "pings": len(streaming)}


def one_round(api: Any, host: str, opts: argparse.Namespace, wirehub_first: bool,
              server_cores: set[int] | None) -> dict[str, Any]:
    """The direct read and the read through wirehub, each of a container of its own."""
    script = f"{wait_for()}; seq 1 {opts.lines}"
    result: dict[str, Any] = {}
    with containers(api, f"bench-{uuid.uuid4().hex[:12]}") as made:
        for name in ("wirehub", "direct") if wirehub_first else ("direct", "wirehub"):
            cid = made.create(script)
            if name == "direct":
                result["direct"] = read_direct(host, made, cid, opts.lines)
                continue
            wirehub = next(s for s in servers(sys.executable) if s.name == "wirehub").commands["broadcast"]
            server = Running([*wirehub, "--docker", "--docker-host", host, "--high-water-bytes", str(256 << 20)],
                             server_cores)
            try:
                result["wirehub"] = uvloop.run(read_wirehub(server.port, made, cid, opts.lines))
            finally:
                server.stop()
            result["hot_path"] = server.hot_path
    result["ratio"] = result["wirehub"]["lines_per_s"] / result["direct"]["lines_per_s"]
    return result


def main_rounds(opts: argparse.Namespace) -> dict[str, Any]:
    server_cores, client_cores = split_cores()
    if client_cores:
        os.sched_setaffinity(0, client_cores)
    rounds = []
    with engine() as host:
        api = docker.APIClient(base_url=host, version="auto")
        try:
            for r in range(opts.repeat):
                rounds.append(one_round(api, host, opts, r % 2 == 1, server_cores))
                run = rounds[-1]
                print(f"round {r + 1}/{opts.repeat}: direct {run['direct']['lines_per_s']:,.0f} lines/s, "
                      f"wirehub {run['wirehub']['lines_per_s']:,.0f} ({run['ratio']:.2f}x); ping p99 idle "
                      f"{run['wirehub']['ping_idle']['p99_ms']:.1f} ms, streaming "
                      f"{run['wirehub']['ping_streaming']['p99_ms']:.1f} ms", file=sys.stderr, flush=True)
        finally:
            api.close()

    def median(figure: Callable[[dict[str, Any]], float]) -> float:
        return statistics.median(figure(run) for run in rounds)

    pings = {f"{when}_{figure}": median(lambda run: run["wirehub"][f"ping_{when}"][figure])
             for when in ("idle", "streaming") for figure in ("median_ms", "p99_ms", "max_ms")}
    return {"lines": opts.lines, "repeat": opts.repeat, "hot_path": sorted({run["hot_path"] for run in rounds}),
            "direct_lines_per_s": median(lambda run: run["direct"]["lines_per_s"]),
            "wirehub_lines_per_s": median(lambda run: run["wirehub"]["lines_per_s"]),
            "ratio": median(lambda run: run["ratio"]),
            "ping_ms": pings,
            "ping_p99_ratio": median(lambda run: run["wirehub"]["ping_streaming"]["p99_ms"]
                                     / run["wirehub"]["ping_idle"]["p99_ms"]),
            "errors": [f"round {i + 1} {name}: {error}" for i, run in enumerate(rounds)
                       for name in ("direct", "wirehub") for error in run[name]["errors"]],
            "rounds": rounds}


def print_result(result: dict[str, Any]) -> None:
    p = result["ping_ms"]
    print(f"{result['lines']:,} lines (seq in a container), medians of {result['repeat']} rounds; "
          f"wirehub's {', '.join(result['hot_path'])} hot path:")
    print(f"{'reader':<34} {'lines/s':>10} {'ratio':>7}")
    print(f"{'engine -> docker SDK (baseline)':<34} {result['direct_lines_per_s']:>10,.0f} {1:>6.2f}x")
    print(f"{'engine -> wirehub -> viewer':<34} {result['wirehub_lines_per_s']:>10,.0f} {result['ratio']:>6.2f}x")
    print(f"{'ping round trip through wirehub':<34} {'median':>10} {'p99':>9} {'max':>9}")
    for when in ("idle", "streaming"):
        print(f"{when:<34} {p[when + '_median_ms']:>7.2f} ms {p[when + '_p99_ms']:>6.2f} ms "
              f"{p[when + '_max_ms']:>6.2f} ms")
    print(f"p99 while streaming: {result['ping_p99_ratio']:.1f}x idle")
    print("every line arrived once, in order, in every round" if not result["errors"]
          else "LINES LOST OR OUT OF ORDER:\n  " + "\n  ".join(result["errors"]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=200_000, help="lines per container (default 200,000)")
    parser.add_argument("--repeat", type=int, default=5, help="rounds; medians (default 5)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    opts = parser.parse_args(argv)
    if opts.lines < 2 or opts.repeat < 1:
        parser.error("--lines must be >= 2, --repeat >= 1")
    result = main_rounds(opts)
    if opts.json:
        print(json.dumps(result, indent=2))
    else:
        print_result(result)
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
