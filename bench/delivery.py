"""History, recovery and slow-consumer policies: what they cost, measured against plain fan-out.

``fanout`` runs the bundled loadgen (1 publisher -> ``--subscribers``,
window 32) against ``wirehub serve`` started four ways, in interleaved
rounds: no channel options (the baseline), ``history_size=100000``,
``slow_consumer=conflate`` and ``slow_consumer=drop_oldest`` on every
channel, with nobody slow. Reported: deliveries/s and deliveries per server
CPU-second, medians, and each as a ratio to the baseline of the same round.

``instructions`` counts, under callgrind, what ``fanout_held`` (the path of a
channel with a policy, nobody slow) and history add to plain fan-out and to
the publish path (``bench/delivery_workloads.py``): exact counts, so the
ratios repeat where the timed runs above move by 10 %.

``storm`` is a recovery storm: ``--clients`` subscribers on one channel with
history leave, ``--missed`` publications of ``--size`` bytes are published,
and all come back at once with ``since``; reported: the time until every
one has caught up, and the server's deliveries per CPU-second during it,
against the same clients receiving the same number of publications live
(published while they are connected), measured on the same server.

    python bench/delivery.py fanout                 # 5 interleaved rounds, ~4 min
    python bench/delivery.py instructions           # ~20 s, needs valgrind
    python bench/delivery.py storm                  # 1,000 clients x 10,000 missed, 3 rounds
    python bench/delivery.py storm --clients 200 --missed 2000 --repeat 1

Server on one core, clients on the others (as run_e2e.py). See
docs/benchmarks.md, "History, recovery, policies".
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import statistics
import sys
import time
from multiprocessing.connection import Connection as Pipe
from pathlib import Path
from typing import Any

import uvloop
from picows import WSListener, WSMsgType, ws_connect

from run_e2e import METRICS, WIREHUB_HOT_PATHS, Running, run_loadgen, servers, split_cores
from wirehub import openfiles

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tools.loadgen.server_cpu import cpu_seconds  # noqa: E402

VARIANTS = {
    "plain": [],
    "history": ["--channel", "**:history_size=100000"],
    "conflate": ["--channel", "**:slow_consumer=conflate"],
    "drop_oldest": ["--channel", "**:slow_consumer=drop_oldest"],
}
MESSAGE_PREFIX = b'{"type":"message"'


def wirehub_command(extra: list[str]) -> list[str]:
    return next(s for s in servers(sys.executable) if s.name == "wirehub").commands["broadcast"] + extra


# -- fanout ---------------------------------------------------------------------------

def fanout_main(opts: argparse.Namespace) -> dict[str, Any]:
    server_cores, client_cores = split_cores()
    procs = len(client_cores) if client_cores else 1
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in VARIANTS}
    for r in range(opts.repeat):
        for name, extra in VARIANTS.items():
            server = Running(wirehub_command(extra), server_cores)
            try:
                result = run_loadgen(
                    ["fanout", "--publishers", "1", "--subscribers", str(opts.subscribers), "--size",
                     str(opts.size), "--window", "32", "--url", f"ws://127.0.0.1:{server.port}/ws",
                     "--procs", str(procs), "--json", "--no-progress", "--duration", str(opts.duration),
                     "--warmup", "1", "--server-pid", str(server.proc.pid)], client_cores, timeout_s=600)
            finally:
                server.stop()
            figures = {metric: _figure(result, metric) for metric in ("deliveries_per_s", "deliveries_per_cpu_s")}
            figures["lost"] = result["errors"].get("missing", 0) + result["errors"].get("gaps", 0)
            runs[name].append(figures)
            print(f"round {r + 1}/{opts.repeat} {name}: {figures['deliveries_per_s']:,.0f} deliveries/s, "
                  f"{figures['deliveries_per_cpu_s']:,.0f} per server CPU-second", file=sys.stderr, flush=True)
    table = {}
    for name, rounds in runs.items():
        row = {m: statistics.median(run[m] for run in rounds) for m in ("deliveries_per_s", "deliveries_per_cpu_s")}
        for m in ("deliveries_per_s", "deliveries_per_cpu_s"):
            row[f"{m}_ratio"] = statistics.median(run[m] / base[m] for run, base in zip(rounds, runs["plain"]))
        row["lost"] = sum(run["lost"] for run in rounds)
        row["hot_path"] = sorted(WIREHUB_HOT_PATHS)
        table[name] = row
    return table


def _figure(result: dict[str, Any], metric: str) -> float:
    value: Any = result
    for key in METRICS[metric][0]:
        value = value.get(key, 0) if isinstance(value, dict) else 0
    return float(value or 0)


def print_fanout(table: dict[str, Any], opts: argparse.Namespace) -> None:
    hot = ", ".join(next(iter(table.values()))["hot_path"])
    print(f"1 publisher -> {opts.subscribers} subscribers, {opts.size} B, window 32 (medians of {opts.repeat}; "
          f"wirehub's {hot} hot path, from its /metrics):")
    print(f"{'variant':<12} {'deliveries/s':>14} {'ratio':>7} {'per CPU-s':>12} {'ratio':>7} {'lost':>5}")
    for name, row in table.items():
        print(f"{name:<12} {row['deliveries_per_s']:>14,.0f} {row['deliveries_per_s_ratio']:>6.2f}x "
              f"{row['deliveries_per_cpu_s']:>12,.0f} {row['deliveries_per_cpu_s_ratio']:>6.2f}x {row['lost']:>5}")


# -- instructions ----------------------------------------------------------------------

def instructions_main() -> dict[str, Any]:
    import shutil
    import subprocess
    import tempfile

    from ci import BRACKET, callgrind_total

    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind not found (apt-get install valgrind)")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "cg.out"
        cmd = ["valgrind", "--tool=callgrind", "--collect-atstart=no", f"--toggle-collect={BRACKET}",
               f"--dump-after={BRACKET}", f"--callgrind-out-file={out}", sys.executable,
               str(ROOT / "bench" / "delivery_workloads.py")]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False,
                              env=dict(os.environ, PYTHONHASHSEED="0"))
        if proc.returncode != 0:
            raise SystemExit(f"callgrind run failed: {proc.stderr.strip()[-400:]}")
        labels = json.loads(proc.stdout)
        counts = {label: callgrind_total(Path(f"{out}.{i}").read_text()) for i, label in enumerate(labels, 1)}
    return {"instructions": counts,
            "fanout_held / fanout": counts["fanout_held"] / counts["fanout"],
            "publish_history / publish": counts["publish_history"] / counts["publish"]}


# -- storm ------------------------------------------------------------------------------

class Counter(WSListener):  # type: ignore[misc]
    """Counts ``message`` frames without parsing them; keeps the first reply."""

    def __init__(self) -> None:
        self.transport: Any = None
        self.messages = 0
        self.reply: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def on_ws_connected(self, transport: Any) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: Any, frame: Any) -> None:
        if frame.msg_type != WSMsgType.TEXT:
            return
        if frame.get_payload_as_memoryview()[:len(MESSAGE_PREFIX)] == MESSAGE_PREFIX:
            self.messages += 1
        elif not self.reply.done() and b'"subscribed"' in frame.get_payload_as_bytes():
            self.reply.set_result(frame.get_payload_as_bytes())


async def _worker(url: str, count: int, pipe: Pipe) -> None:
    """Hold ``count`` subscribers; obey the parent's commands, one at a time."""
    loop = asyncio.get_running_loop()
    clients: list[Counter] = []
    while True:
        command, arg = await loop.run_in_executor(None, pipe.recv)
        if command == "subscribe":     # arg: the subscribe message (``since`` in it or not)
            clients = [(await ws_connect(Counter, url))[1] for _ in range(count)]
            for client in clients:
                client.transport.send(WSMsgType.TEXT, arg)
            replies = [json.loads(await client.reply) for client in clients]
            pipe.send(replies[0]["position"])
        elif command == "wait":       # arg: messages each client must have
            while any(client.messages < arg for client in clients):
                await asyncio.sleep(0.001)
            pipe.send(time.monotonic())
        elif command == "leave":
            for client in clients:
                client.transport.disconnect()
            clients = []
            pipe.send(None)
        else:
            return


def _run_worker(url: str, count: int, pipe: Pipe, cores: set[int] | None) -> None:
    if cores:
        os.sched_setaffinity(0, cores)
    uvloop.run(_worker(url, count, pipe))


class Workers:
    """Client processes holding the subscribers, driven in lockstep."""

    def __init__(self, url: str, clients: int, procs: int, cores: set[int] | None) -> None:
        self.pipes, self.procs = [], []
        for i in range(procs):
            parent, child = multiprocessing.Pipe()
            share = clients // procs + (1 if i < clients % procs else 0)
            proc = multiprocessing.Process(target=_run_worker, args=(url, share, child, cores), daemon=True)
            proc.start()
            self.pipes.append(parent)
            self.procs.append(proc)

    def all(self, command: str, arg: Any = None) -> list[Any]:
        for pipe in self.pipes:
            pipe.send((command, arg))
        return [pipe.recv() for pipe in self.pipes]

    def stop(self) -> None:
        for pipe in self.pipes:
            pipe.send(("stop", None))
        for proc in self.procs:
            proc.join(10)


async def _publish(url: str, channel: str, count: int, size: int) -> None:
    """Publish ``count`` publications and wait for the last one's ack."""
    class Acks(WSListener):  # type: ignore[misc]
        def __init__(self) -> None:
            self.done = asyncio.get_running_loop().create_future()

        def on_ws_frame(self, transport: Any, frame: Any) -> None:
            if b'"published"' in frame.get_payload_as_bytes() and not self.done.done():
                self.done.set_result(None)

    transport, acks = await ws_connect(Acks, url)
    pad = "x" * max(0, size - 2)
    body = json.dumps(pad)
    for i in range(count):
        last = i == count - 1
        transport.send(WSMsgType.TEXT, (f'{{"type":"publish","channel":"{channel}","data":{body}'
                                        + (',"id":1}' if last else "}")).encode())
        if i % 1000 == 999:
            await asyncio.sleep(0)
    await asyncio.wait_for(acks.done, 120)
    transport.disconnect()


def storm_once(opts: argparse.Namespace, server_cores: set[int] | None, client_cores: set[int] | None
               ) -> dict[str, float]:
    procs = len(client_cores) if client_cores else 1
    channel_options = ["--channel", f"storm:history_size={max(opts.missed, 1000)}"]
    server = Running(wirehub_command(channel_options), server_cores)
    url = f"ws://127.0.0.1:{server.port}/ws"
    workers = Workers(url, opts.clients, procs, client_cores)
    try:
        subscribe = json.dumps({"type": "subscribe", "channel": "storm"}).encode()
        position = workers.all("subscribe", subscribe)[0]
        # Live: the same publications reach connected subscribers.
        cpu0, t0 = cpu_seconds(server.proc.pid), time.monotonic()
        uvloop.run(_publish(url, "storm", opts.missed, opts.size))
        done = max(workers.all("wait", opts.missed))
        live_cpu, live_s = cpu_seconds(server.proc.pid) - cpu0, done - t0
        workers.all("leave")
        # Away: what they miss, then all back at once.
        uvloop.run(_publish(url, "storm", opts.missed, opts.size))
        since = {"offset": position["offset"] + opts.missed, "epoch": position["epoch"]}
        resume = json.dumps({"type": "subscribe", "channel": "storm", "since": since}).encode()
        cpu0, t0 = cpu_seconds(server.proc.pid), time.monotonic()
        workers.all("subscribe", resume)
        done = max(workers.all("wait", opts.missed))
        storm_cpu, storm_s = cpu_seconds(server.proc.pid) - cpu0, done - t0
    finally:
        workers.stop()
        server.stop()
    deliveries = opts.clients * opts.missed
    result = {"hot_path": server.hot_path, "storm_s": storm_s, "storm_per_cpu_s": deliveries / storm_cpu,
              "live_s": live_s, "live_per_cpu_s": deliveries / live_cpu}
    result["ratio_per_cpu_s"] = result["storm_per_cpu_s"] / result["live_per_cpu_s"]
    return result


def storm_main(opts: argparse.Namespace) -> dict[str, Any]:
    server_cores, client_cores = split_cores()
    runs = []
    for r in range(opts.repeat):
        runs.append(storm_once(opts, server_cores, client_cores))
        run = runs[-1]
        print(f"round {r + 1}/{opts.repeat}: storm caught up in {run['storm_s']:.2f} s, "
              f"{run['storm_per_cpu_s']:,.0f} deliveries per server CPU-second; live "
              f"{run['live_per_cpu_s']:,.0f} ({run['ratio_per_cpu_s']:.2f}x)", file=sys.stderr, flush=True)
    figures = [k for k in runs[0] if k != "hot_path"]
    return {"runs": runs, "hot_path": sorted({run["hot_path"] for run in runs}),
            **{k: statistics.median(run[k] for run in runs) for k in figures}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("fanout", "instructions", "storm"))
    parser.add_argument("--repeat", type=int, default=None, help="rounds; medians (default 5 fanout, 3 storm)")
    parser.add_argument("--subscribers", type=int, default=1000, help="fanout: subscribers (default 1,000)")
    parser.add_argument("--duration", type=float, default=5.0, help="fanout: measured seconds (default 5)")
    parser.add_argument("--clients", type=int, default=1000, help="storm: subscribers (default 1,000)")
    parser.add_argument("--missed", type=int, default=10_000, help="storm: publications missed (default 10,000)")
    parser.add_argument("--size", type=int, default=64, help="bytes of data per publication (default 64)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    opts = parser.parse_args(argv)
    opts.repeat = opts.repeat or (5 if opts.what == "fanout" else 3)
    if min(opts.repeat, opts.subscribers, opts.clients, opts.missed) < 1 or opts.duration <= 0:
        parser.error("--repeat, --subscribers, --clients and --missed must be >= 1, --duration > 0")
    openfiles.lift()
    if opts.what == "fanout":
        result = fanout_main(opts)
        if not opts.json:
            print_fanout(result, opts)
    elif opts.what == "instructions":
        result = instructions_main()
        if not opts.json:
            for name, count in result["instructions"].items():
                print(f"{name:<16} {count:>12,} instructions")
            for name in ("fanout_held / fanout", "publish_history / publish"):
                print(f"{name}: {result[name]:.3f}")
    else:
        result = storm_main(opts)
        if not opts.json:
            print(f"{opts.clients} clients x {opts.missed} missed publications of {opts.size} B "
                  f"({', '.join(result['hot_path'])} hot path; medians of {opts.repeat}): "
                  f"caught up in {result['storm_s']:.2f} s at "
                  f"{result['storm_per_cpu_s']:,.0f} deliveries per server CPU-second; live "
                  f"{result['live_per_cpu_s']:,.0f} in {result['live_s']:.2f} s: "
                  f"{result['ratio_per_cpu_s']:.2f}x")
    if opts.json:
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
