"""Fan-out latency on the memory broker and on Redis, by an independent C client and by the loadgen.

Why: issue #21 asks for a publish-to-receive p99 of at most 10 ms at 1,000
publications/s to 1,000 subscribers on the Redis broker. Every figure for
it so far came from the bundled loadgen, a Python client reading 1,000
sockets at a million messages a second on one core, whose own delays are
part of what it reports. ``bench/fanout_latency.c`` is a small C client
(libc, epoll, a timerfd; see its top comment) that runs the same load, so
the two instruments can be compared against the same servers in the same
run, and the server's share of the latency told from the client's.

Servers: ``wirehub serve`` on the memory broker (``memory``) and with
``--broker`` on a private redis-server (``redis``), a fresh one per run,
started as ``bench/redis_broker.py`` starts them: the gateway and
redis-server share one core, the client has the other. Instruments: ``c``
(the C client) and ``loadgen`` (``tools.loadgen fanout --subscribers N
--rate R``). Both stamp each publication with its intended send time, so
a late send counts as latency. Reported, as medians over ``--repeat``
interleaved rounds: p50, p99, p99.9, the gateway's and Redis's CPU share,
the client's, and anything lost (any loss makes the exit status 1).

    python bench/fanout_latency.py                  # 1,000/s -> 1,000 subscribers, 3 rounds, ~2 min
    python bench/fanout_latency.py --repeat 5 --json reports/fanout_latency.json
    python bench/fanout_latency.py --server redis --instrument c --rate 500

The C client alone: ``.cache/bench-fanout-latency/fanout_latency --port P
--subscribers 1000 --rate 1000`` (``--help``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from handshakes import build_client, find_compiler, run_c
from redis_broker import Gateway, RedisServer, run_loadgen, variants
from run_e2e import WIREHUB_HOT_PATHS, split_cores
from wirehub import openfiles

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "bench" / "fanout_latency.c"
BUILD_DIR = ROOT / ".cache" / "bench-fanout-latency"
SERVERS = ("memory", "redis")
INSTRUMENTS = ("c", "loadgen")
FIGURES = ("p50_ms", "p99_ms", "p999_ms", "gateway_cpu_percent", "redis_cpu_percent", "client_cpu_percent",
           "deliveries_per_s")
TARGET_P99_MS = 10.0  # issue #21, on the Redis broker


def run_client(binary: Path, port: int, subscribers: int, rate: float, duration_s: float, warmup_s: float,
               server_pids: list[int], cores: set[int] | None = None, timeout_s: float = 300,
               path: str = "/ws") -> dict[str, Any]:
    """Run the C client once; its JSON result (exit status 1 only means something was lost)."""
    args = ["--port", str(port), "--path", path, "--subscribers", str(subscribers), "--rate", str(rate),
            "--duration", str(duration_s), "--warmup", str(warmup_s)]
    for pid in server_pids:
        args += ["--server-pid", str(pid)]
    return run_c(binary, args, cores, timeout_s)


def run_once(binary: Path, server: str, instrument: str, redis: RedisServer, opts: argparse.Namespace,
             cores: tuple[set[int] | None, set[int] | None]) -> dict[str, float]:
    """One run against a fresh gateway: its figures."""
    command, workers, _ = variants([redis])[server]
    server_cores, client_cores = cores
    redis.cli("FLUSHALL")
    gateway = Gateway(command, workers, server_cores)
    try:
        if instrument == "c":
            result = run_client(binary, gateway.port, opts.subscribers, opts.rate, opts.duration, 1.0,
                                [gateway.proc.pid, redis.pid], client_cores)
            cpu = {s["pid"]: s["cpu_percent"] for s in result["servers"]}
            latency = result["latency_us"]
            figures = {"p50_ms": latency["p50"] / 1e3, "p99_ms": latency["p99"] / 1e3,
                       "p999_ms": latency["p999"] / 1e3, "gateway_cpu_percent": cpu[gateway.proc.pid],
                       "redis_cpu_percent": cpu[redis.pid],
                       "client_cpu_percent": 100 * result["client_cpu_s"] / result["duration_s"],
                       "deliveries_per_s": result["deliveries_per_s"],
                       "lost": result["missing"] + result["duplicates"] + result["out_of_order"]}
        else:
            result = run_loadgen(
                ["fanout", "--subscribers", str(opts.subscribers), "--rate", str(opts.rate), "--url",
                 f"ws://127.0.0.1:{gateway.port}/ws", "--json", "--no-progress", "--duration",
                 str(opts.duration), "--warmup", "1"],
                {"gateway": gateway.pids, "redis": [redis.pid]}, client_cores, timeout_s=300)
            groups = result["server"]["groups"]
            latency = result["latency_us"]
            figures = {"p50_ms": latency["p50"] / 1e3, "p99_ms": latency["p99"] / 1e3,
                       "p999_ms": latency["p99.9"] / 1e3, "gateway_cpu_percent": groups["gateway"]["cpu_percent"],
                       "redis_cpu_percent": groups["redis"]["cpu_percent"],
                       "client_cpu_percent": max(c["cpu_percent"] for c in result["client"]["processes"]),
                       "deliveries_per_s": result["throughput"]["deliveries_per_s"],
                       "lost": result["delivery"]["missing"] + result["delivery"]["duplicates"]
                       + result["delivery"]["out_of_order"]}
    finally:
        gateway.stop()
        gateway.log.close()
    return {k: float(v) for k, v in figures.items()}


def measure(binary: Path, opts: argparse.Namespace) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Medians per (instrument, server) over the rounds, and a line per run that lost something."""
    cores = split_cores()
    redis = RedisServer(cores[0])
    runs: dict[tuple[str, str], list[dict[str, float]]] = {}
    problems: list[str] = []
    try:
        print(f"C client {binary}; gateway and redis-server on core(s) {sorted(cores[0] or [])}, clients on "
              f"{sorted(cores[1] or [])}; {opts.rate:g}/s -> {opts.subscribers} subscribers", file=sys.stderr)
        for round_no in range(1, opts.repeat + 1):
            for instrument in opts.instrument:
                for server in opts.server:
                    figures = run_once(binary, server, instrument, redis, opts, cores)
                    runs.setdefault((instrument, server), []).append(figures)
                    print(f"round {round_no}/{opts.repeat} {instrument:<8} {server:<7} p50 "
                          f"{figures['p50_ms']:6.2f} ms  p99 {figures['p99_ms']:6.2f} ms  gateway "
                          f"{figures['gateway_cpu_percent']:3.0f} %  redis {figures['redis_cpu_percent']:3.0f} %  "
                          f"client {figures['client_cpu_percent']:3.0f} %  lost {figures['lost']:.0f}",
                          file=sys.stderr, flush=True)
                    if figures["lost"]:
                        problems.append(f"round {round_no} {instrument} {server}: {figures['lost']:.0f} lost")
    finally:
        redis.stop()
    table: dict[str, dict[str, Any]] = {}
    for (instrument, server), rounds in runs.items():
        table.setdefault(instrument, {})[server] = {
            "median": {f: statistics.median(r[f] for r in rounds) for f in FIGURES},
            "p99_ms_rounds": [r["p99_ms"] for r in rounds]}
    return table, problems


def format_table(table: dict[str, dict[str, Any]], opts: argparse.Namespace) -> str:
    lines = [f"{opts.rate:g} publications/s -> {opts.subscribers} subscribers, {opts.duration:g} s measured; "
             f"medians of {opts.repeat}",
             f"{'instrument':<11}{'server':<8}{'p50 ms':>8}{'p99 ms':>8}{'p99.9 ms':>10}{'gateway':>9}"
             f"{'redis':>7}{'client':>8}  p99 per round"]
    for instrument, per_server in table.items():
        for server, entry in per_server.items():
            m = entry["median"]
            rounds = " ".join(f"{v:.1f}" for v in entry["p99_ms_rounds"])
            lines.append(f"{instrument:<11}{server:<8}{m['p50_ms']:>8.2f}{m['p99_ms']:>8.2f}{m['p999_ms']:>10.2f}"
                         f"{m['gateway_cpu_percent']:>8.0f}%{m['redis_cpu_percent']:>6.0f}%"
                         f"{m['client_cpu_percent']:>7.0f}%  {rounds}")
    for instrument, per_server in table.items():
        if "redis" in per_server:
            p99 = per_server["redis"]["median"]["p99_ms"]
            lines.append(f"redis p99 by {instrument}: {p99:.2f} ms (issue #21 target: <= {TARGET_P99_MS:g} ms)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subscribers", type=int, default=1000, help="subscribers (default %(default)s)")
    parser.add_argument("--rate", type=float, default=1000, help="publications/s (default %(default)s)")
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds per run (default 5)")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--server", action="append", choices=SERVERS, help="only these (repeatable)")
    parser.add_argument("--instrument", action="append", choices=INSTRUMENTS, help="only these (repeatable)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the results here")
    opts = parser.parse_args(argv)
    opts.server = opts.server or list(SERVERS)
    opts.instrument = opts.instrument or list(INSTRUMENTS)
    if opts.subscribers < 1 or opts.rate <= 0 or opts.duration <= 0 or opts.repeat < 1:
        parser.error("--subscribers, --rate, --duration and --repeat must be positive")
    if find_compiler() is None:
        print("no C compiler (cc, gcc, clang or $CC) to build bench/fanout_latency.c", file=sys.stderr)
        return 2
    openfiles.lift()
    binary = build_client(BUILD_DIR, SOURCE)
    table, problems = measure(binary, opts)
    print(format_table(table, opts))
    print(f"wirehub ran on its {', '.join(sorted(WIREHUB_HOT_PATHS))} hot path (its /metrics)", file=sys.stderr)
    if opts.json:
        opts.json.parent.mkdir(parents=True, exist_ok=True)
        opts.json.write_text(json.dumps({"options": {k: str(v) for k, v in vars(opts).items()},
                                         "table": table, "problems": problems}, indent=2) + "\n")
    for problem in problems:
        print(f"LOST: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
