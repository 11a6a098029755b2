"""Docker log channels: lines/s through wirehub against the engine's own stream, pings meanwhile, and subscribe -> first line.

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

First line (``--first-line`` rounds): how soon a viewer sees a container
that never stops printing (a numbered line every 5 ms). Each round starts
such a container, waits until it has printed 50 lines, then times, from
the request to the first line of a 10-line tail:

  sdk      ``APIClient.logs(stream=True, follow=True, tail=10)`` (an
           ``inspect`` and the logs request, as the gateway makes);
  cli      ``docker logs -f --tail 10`` (process start included), if the
           ``docker`` CLI is installed;
  wirehub  ``subscribe`` with ``tail: 10`` on ``logs:<id>`` through the same
           ``wirehub serve --docker`` process (a fresh engine stream each
           round: a new container): the ``subscribed`` reply and the first
           line. The viewer also checks the join: 10 consecutive numbers,
           then the next 200 lines live, none missing or repeated.

Reported: the median, min and max of the rounds, in ms.

The engine: DOCKER_HOST if it answers, else the one
tests/engine/start-engine.sh starts (installing docker.io on first use),
stopped again at the end.

    python bench/docker_logs.py                      # 200,000 lines, 5 rounds, then 7 first-line rounds
    python bench/docker_logs.py --lines 50000 --repeat 3
    python bench/docker_logs.py --only first-line --first-line 9   # ~30 s

See docs/benchmarks.md, "Docker log channels".
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
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
# First line: a container that never stops printing, a tail of 10 (as ``docker logs -f --tail 10``).
PRINT_EVERY_5MS = "i=1; while true; do echo $i; i=$((i+1)); sleep 0.005; done"
FIRST_TAIL = 10
PRINTED_BEFORE = 50   # lines the container has printed before the request (the tail is full)
LIVE_CHECKED = 200    # live lines after the tail checked for a gap or a duplicate
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


# -- subscribe -> first line ------------------------------------------------------------


def wait_printed(api: Any, cid: str, count: int) -> None:
    """Wait until the container has printed line ``count``."""
    deadline = time.monotonic() + 30
    while True:
        last = api.logs(cid, tail=1).split()
        if last and int(last[-1]) >= count:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the container did not print {count} lines within 30 s")
        time.sleep(0.02)


def sdk_first_line(host: str, cid: str) -> float:
    """Seconds from ``APIClient.logs(follow=True, tail=10)`` to its first line (the client, and its
    API version negotiation, made before the clock starts)."""
    api = docker.APIClient(base_url=host, version="auto")
    try:
        start = time.perf_counter()
        stream = api.logs(cid, stream=True, follow=True, tail=FIRST_TAIL)  # inspect, then the request
        try:
            next(stream)
            return time.perf_counter() - start
        finally:
            stream.close()
    finally:
        api.close()


def cli_first_line(cli: str, host: str, cid: str) -> float:
    """Seconds from starting ``docker logs -f --tail 10`` to its first line on stdout."""
    start = time.perf_counter()
    proc = subprocess.Popen([cli, "-H", host, "logs", "-f", "--tail", str(FIRST_TAIL), cid],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        if not proc.stdout.readline():
            raise RuntimeError("docker logs printed nothing")
        return time.perf_counter() - start
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


class FirstLines(WSListener):  # type: ignore[misc]
    """Subscribes with a tail; notes when the reply and the first line came, checks the join."""

    def __init__(self) -> None:
        self.transport: Any = None
        self.sent_at = self.subscribed_at = self.first_at = 0.0
        self.position = -1
        self.lines: list[tuple[int, int]] = []   # (offset, number)
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_ws_connected(self, transport: Any) -> None:
        self.transport = transport

    def subscribe(self, channel: str) -> None:
        self.sent_at = time.perf_counter()
        self.transport.send(WSMsgType.TEXT, json.dumps(
            {"type": "subscribe", "channel": channel, "tail": FIRST_TAIL}).encode())

    def on_ws_frame(self, transport: Any, frame: Any) -> None:
        if frame.msg_type != WSMsgType.TEXT or self.done.done():
            return
        msg = _decode(frame.get_payload_as_bytes())
        if msg["type"] == "subscribed":
            self.subscribed_at = time.perf_counter()
            self.position = msg["position"]["offset"]
        elif msg["type"] == "message":
            if not self.lines:
                self.first_at = time.perf_counter()
            self.lines.append((msg["offset"], int(msg["data"]["line"])))
            if len(self.lines) == FIRST_TAIL + LIVE_CHECKED:
                self.done.set_result(None)
        elif msg["type"] == "error":
            self.done.set_exception(RuntimeError(f"the subscribe failed: {msg}"))

    def on_ws_disconnected(self, transport: Any) -> None:
        if not self.done.done():
            self.done.set_exception(ConnectionError("the gateway closed the viewer's connection"))

    def errors(self) -> list[str]:
        """What is wrong with the join: the tail is the 10 lines before the first live one,
        each line once, none missing."""
        tail = [number for offset, number in self.lines if offset <= self.position]
        numbers = [number for _, number in self.lines]
        errors = []
        if len(tail) != FIRST_TAIL:
            errors.append(f"a tail of {len(tail)} lines, not {FIRST_TAIL}")
        if numbers != list(range(numbers[0], numbers[0] + len(numbers))):
            errors.append(f"not consecutive: {numbers[:20]}...")
        return errors


async def wirehub_first_line(port: int, cid: str) -> dict[str, Any]:
    transport, viewer = await ws_connect(FirstLines, f"ws://127.0.0.1:{port}/ws")
    try:
        viewer.subscribe(f"logs:{cid}")
        await asyncio.wait_for(viewer.done, 60)
    finally:
        transport.disconnect()
    return {"subscribed_s": viewer.subscribed_at - viewer.sent_at, "first_line_s": viewer.first_at - viewer.sent_at,
            "errors": viewer.errors()}


def first_line_rounds(host: str, opts: argparse.Namespace, server_cores: set[int] | None) -> dict[str, Any]:
    """``opts.first_line`` rounds of subscribe -> first line, each with a container of its own."""
    cli = shutil.which("docker")
    wirehub = next(s for s in servers(sys.executable) if s.name == "wirehub").commands["broadcast"]
    server = Running([*wirehub, "--docker", "--docker-host", host], server_cores)
    rounds = []
    api = docker.APIClient(base_url=host, version="auto")
    try:
        with containers(api, f"bench-{uuid.uuid4().hex[:12]}") as made:
            for r in range(opts.first_line):
                cid = made.create(PRINT_EVERY_5MS)
                wait_printed(api, cid, PRINTED_BEFORE)
                run: dict[str, Any] = {}
                # The order alternates: whichever reads second finds the engine warmed up by the first.
                order = ["wirehub", "sdk", "cli"] if r % 2 == 0 else ["cli", "sdk", "wirehub"]
                for name in order:
                    if name == "wirehub":
                        run.update(uvloop.run(wirehub_first_line(server.port, cid)))
                    elif name == "sdk":
                        run["sdk_s"] = sdk_first_line(host, cid)
                    elif cli is not None:
                        run["cli_s"] = cli_first_line(cli, host, cid)
                api.remove_container(cid, force=True)
                rounds.append(run)
                print(f"first line, round {r + 1}/{opts.first_line}: sdk {run['sdk_s'] * 1e3:.1f} ms"
                      + (f", cli {run['cli_s'] * 1e3:.1f} ms" if "cli_s" in run else "")
                      + f", wirehub subscribed {run['subscribed_s'] * 1e3:.1f} ms, first line "
                      f"{run['first_line_s'] * 1e3:.1f} ms", file=sys.stderr, flush=True)
    finally:
        api.close()
        server.stop()

    def figures(key: str) -> dict[str, float]:
        values = [run[key] * 1e3 for run in rounds if key in run]
        return {"median_ms": statistics.median(values), "min_ms": min(values), "max_ms": max(values)}

    keys = ["sdk_s", "cli_s", "subscribed_s", "first_line_s"] if cli else ["sdk_s", "subscribed_s", "first_line_s"]
    return {"rounds": opts.first_line, "figures": {key[:-2]: figures(key) for key in keys},
            "hot_path": server.hot_path,
            "errors": [f"first line round {i + 1}: {error}" for i, run in enumerate(rounds) for error in run["errors"]]}


def rate_rounds(host: str, opts: argparse.Namespace, server_cores: set[int] | None) -> dict[str, Any]:
    rounds = []
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


def main_rounds(opts: argparse.Namespace) -> dict[str, Any]:
    server_cores, client_cores = split_cores()
    if client_cores:
        os.sched_setaffinity(0, client_cores)
    result: dict[str, Any] = {}
    with engine() as host:
        if opts.only in (None, "rate"):
            result["rate"] = rate_rounds(host, opts, server_cores)
        if opts.only in (None, "first-line") and opts.first_line:
            result["first_line"] = first_line_rounds(host, opts, server_cores)
    result["errors"] = [error for part in ("rate", "first_line") for error in result.get(part, {}).get("errors", [])]
    return result


def print_rate(result: dict[str, Any]) -> None:
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


FIRST_LINE_ROWS = {
    "sdk": "docker SDK logs(tail=10): first line",
    "cli": "docker logs -f --tail 10: first line",
    "subscribed": "wirehub subscribe: subscribed",
    "first_line": "wirehub subscribe tail 10: first line",
}


def print_first_line(result: dict[str, Any]) -> None:
    print(f"subscribe -> first line, a container printing a line every 5 ms, {result['rounds']} rounds; "
          f"wirehub's {result['hot_path']} hot path:")
    print(f"{'':<40} {'median':>9} {'min':>9} {'max':>9}")
    for key, label in FIRST_LINE_ROWS.items():
        if key in result["figures"]:
            f = result["figures"][key]
            print(f"{label:<40} {f['median_ms']:>6.1f} ms {f['min_ms']:>6.1f} ms {f['max_ms']:>6.1f} ms")
    print(f"the tail then {LIVE_CHECKED} live lines, each once, in every round" if not result["errors"]
          else "JOIN WRONG:\n  " + "\n  ".join(result["errors"]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=200_000, help="lines per container (default 200,000)")
    parser.add_argument("--repeat", type=int, default=5, help="rounds; medians (default 5)")
    parser.add_argument("--first-line", type=int, default=7, metavar="ROUNDS",
                        help="rounds of subscribe -> first line (default 7; 0: none)")
    parser.add_argument("--only", choices=["rate", "first-line"], help="one of the two measurements")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    opts = parser.parse_args(argv)
    if opts.lines < 2 or opts.repeat < 1 or opts.first_line < 0:
        parser.error("--lines must be >= 2, --repeat >= 1, --first-line >= 0")
    if opts.only == "first-line" and not opts.first_line:
        parser.error("--only first-line needs --first-line >= 1")
    result = main_rounds(opts)
    if opts.json:
        print(json.dumps(result, indent=2))
    else:
        if "rate" in result:
            print_rate(result["rate"])
        if "first_line" in result:
            print_first_line(result["first_line"])
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
