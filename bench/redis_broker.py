"""Shared broker: what does Redis between publisher and gateway cost?

``wirehub serve --broker redis://...`` sends each publication through Redis
(one Lua script per publication, pipelined) and gets it back on the pub/sub
channel the gateway SUBSCRIBEd once, then fans it out locally. This runs
four loads against ``wirehub serve`` with the in-memory broker (``memory``,
no ``--broker``, the reference of every ratio) and with a private
``redis-server`` (``redis``), in interleaved rounds:

* ``window-1k``: 1 publisher, 32 publications in flight -> 1,000 subscribers;
* ``rate-1k``: 1,000 publications/s -> 1,000 subscribers;
* ``channels-100``: 10 publishers, 32 in flight each, over 100 channels of
  10 subscribers (1,000 subscribers);
* ``channels-99``: the same over 99 channels. A Redis gateway with 100 or
  more channels going live at once (one ``ENSURE`` script each, each on its
  own pooled connection) runs out of redis-py's connection pool (100 in the
  redis-py 8.2 installed here), takes the ``Too many connections`` for Redis
  being down, subscribes every channel again and runs out again:
  ``channels-100`` fails on it in most runs, and this load measures the
  same thing just below the limit until that is fixed.

Reported, as medians over the rounds that lost nothing and had no errors:
deliveries/s, the gateway's CPU share, deliveries per gateway CPU-second
and CPU per publication, redis-server's CPU share and CPU per publication,
deliveries per (gateway + redis-server) CPU-second, p99 publish-to-receive
latency, and ratios redis/memory of the same round; a run that lost
anything or had errors is printed as it happens and makes the exit status 1:

    python bench/redis_broker.py                         # 3 rounds, ~5 min
    python bench/redis_broker.py --repeat 5 --duration 8
    python bench/redis_broker.py --load rate-1k --json reports/redis-broker.json

The gateway and redis-server share one core, the load generator has the
other (as run_e2e.py); Redis is started here (``--save "" --appendonly no``,
in a temporary directory, ``FLUSHALL`` before every run) and stopped at the
end. Redis's CPU is read the way the loadgen reads the gateway's
(``tools.loadgen.server_cpu.cpu_seconds``, /proc/PID/task/*/schedstat), but
over the whole loadgen run, since the loadgen probes one PID: its share of
the measured window is that CPU times the window's share of the run's
publications (Redis works per publication; its idle share, measured during
the ``memory`` runs, is reported beside it). See docs/benchmarks.md,
"Shared broker (Redis)".
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from run_e2e import ROOT, WIREHUB_HOT_PATHS, Running, run_loadgen, servers, split_cores

sys.path.insert(0, str(ROOT))
from tools.loadgen.server_cpu import cpu_seconds  # noqa: E402

LOADS = {
    "window-1k": ["--subscribers", "1000", "--window", "32"],
    "rate-1k": ["--subscribers", "1000", "--rate", "1000"],
    "channels-100": ["--channels", "100", "--publishers", "10", "--subscribers", "1000",
                     "--window", "32"],
    "channels-99": ["--channels", "99", "--publishers", "10", "--subscribers", "1000",
                    "--window", "32"],
}
REFERENCE = "memory"
# Figures whose ratio redis/memory is reported.
RATIOS = ("deliveries_per_s", "gateway_cpu_percent", "deliveries_per_gateway_cpu_s",
          "deliveries_per_total_cpu_s", "p99_ms")


def variants(redis_url: str) -> dict[str, list[str]]:
    """Gateway commands by name: the same ``serve`` options, the broker aside."""
    serve = next(s for s in servers(sys.executable) if s.name == "wirehub").commands["broadcast"]
    return {REFERENCE: serve, "redis": serve + ["--broker", redis_url]}


class RedisServer:
    """A private redis-server on a free port, pinned to ``cores``, in a temporary directory."""

    def __init__(self, cores: set[int] | None) -> None:
        exe = shutil.which("redis-server")
        if exe is None or shutil.which("redis-cli") is None:
            raise RuntimeError("redis-server / redis-cli not found on PATH")
        self.dir = tempfile.mkdtemp(prefix="wirehub-bench-redis-")
        try:
            self.running = Running([exe, "--port", "{port}", "--bind", "127.0.0.1", "--save", "",
                                    "--appendonly", "no", "--dir", self.dir], cores)
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise
        self.port = self.running.port
        self.pid = self.running.proc.pid
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def cli(self, *args: str) -> str:
        proc = subprocess.run(["redis-cli", "-p", str(self.port), *args], capture_output=True,
                              text=True, timeout=30, check=False)
        if proc.returncode != 0 or proc.stdout.startswith("ERR"):
            raise RuntimeError(f"redis-cli {' '.join(args)}: {proc.stdout}{proc.stderr}".strip())
        return proc.stdout

    def stats(self) -> dict[str, int]:
        """The counters of ``INFO stats`` (bytes in and out, commands)."""
        out = {}
        for line in self.cli("INFO", "stats").splitlines():
            key, _, value = line.strip().partition(":")
            if value.isdigit():
                out[key] = int(value)
        return out

    def stop(self) -> None:
        self.running.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def run_once(command: list[str], args: list[str], redis: RedisServer, uses_redis: bool,
             cores: tuple[set[int] | None, set[int] | None], opts: argparse.Namespace
             ) -> tuple[dict[str, float], dict[str, Any]]:
    """One loadgen run against a fresh gateway: its figures, and the loadgen's result."""
    server_cores, client_cores = cores
    redis.cli("FLUSHALL")
    gateway = Running(command, server_cores)
    try:
        stats_before, t0, redis_before = redis.stats(), time.monotonic(), cpu_seconds(redis.pid)
        result = run_loadgen(
            ["fanout", *args, "--url", f"ws://127.0.0.1:{gateway.port}/ws", "--json",
             "--no-progress", "--duration", str(opts.duration), "--warmup", "1",
             "--server-pid", str(gateway.proc.pid)], client_cores, timeout_s=600)
        redis_cpu_s, wall_s = cpu_seconds(redis.pid) - redis_before, time.monotonic() - t0
        stats_after = redis.stats()
    finally:
        gateway.stop()
    server = result.get("server") or {}
    if "cpu_s" not in server:
        raise RuntimeError(f"the loadgen measured no gateway CPU: {server}")
    delivered = result["throughput"]["deliveries_per_s"]
    published_per_s = result["throughput"]["published_per_s"]
    published = result["delivery"]["published"]          # over the whole run, warm-up included
    gateway_cpu = server["cpu_percent"]
    # Redis works per publication: its share of the measured window is its CPU
    # per publication times the window's publications (module docstring).
    redis_cpu = (100 * redis_cpu_s / published * published_per_s
                 if uses_redis and published else 0.0)
    total_cpu = gateway_cpu + redis_cpu
    stat = {k: stats_after.get(k, 0) - stats_before.get(k, 0)
            for k in ("total_net_input_bytes", "total_net_output_bytes", "total_commands_processed")}
    row = {
        "deliveries_per_s": delivered,
        "published_per_s": published_per_s,
        "gateway_cpu_percent": gateway_cpu,
        "deliveries_per_gateway_cpu_s": delivered / (gateway_cpu / 100) if gateway_cpu else 0.0,
        "redis_cpu_percent": redis_cpu,
        "deliveries_per_total_cpu_s": delivered / (total_cpu / 100) if total_cpu else 0.0,
        "redis_cpu_us_per_publication": 1e6 * redis_cpu_s / published if uses_redis and published else 0.0,
        # The memory runs leave Redis idle: its share then is the bias of the estimate above.
        "redis_idle_cpu_percent": 0.0 if uses_redis else 100 * redis_cpu_s / wall_s,
        "redis_in_bytes_per_publication": stat["total_net_input_bytes"] / published if published else 0.0,
        "redis_out_bytes_per_publication": stat["total_net_output_bytes"] / published if published else 0.0,
        # (no latency at all when nothing was delivered)
        "p50_ms": result["latency_us"].get("p50", 0) / 1000,
        "p99_ms": result["latency_us"].get("p99", 0) / 1000,
        # Above 90 % the loadgen's core, not the gateway's, may have been the limit.
        "client_cpu_percent": max((c["cpu_percent"] for c in result["client"]["processes"]), default=0.0),
        "lost": result["delivery"]["missing"],
        "errors": result.get("error_count", sum(result["errors"].values())),
    }
    return row, result


def measure(opts: argparse.Namespace) -> tuple[dict[str, dict[str, dict[str, Any]]], list[str]]:
    """The table of medians, and a line per run that lost something or had errors."""
    cores = split_cores()
    loads = {name: LOADS[name] for name in opts.load or LOADS}
    problems: list[str] = []
    redis = RedisServer(cores[0])
    try:
        version = redis.cli("INFO", "server").split("redis_version:", 1)[1].split()[0]
        print(f"redis-server {version} pid {redis.pid} port {redis.port}, gateway and redis on "
              f"core(s) {sorted(cores[0] or [])}, loadgen on {sorted(cores[1] or [])}",
              file=sys.stderr, flush=True)
        commands = variants(redis.url)
        runs: dict[str, dict[str, list[dict[str, float]]]] = {
            load: {name: [] for name in commands} for load in loads}
        for r in range(opts.repeat):
            for load, args in loads.items():
                for name, command in commands.items():
                    row, result = run_once(command, args, redis, name != REFERENCE, cores, opts)
                    runs[load][name].append(row)
                    print(f"round {r + 1}/{opts.repeat} {load} {name}: {row['deliveries_per_s']:,.0f}/s, "
                          f"gateway {row['gateway_cpu_percent']:.0f} %, redis {row['redis_cpu_percent']:.0f} %"
                          f" ({row['redis_cpu_us_per_publication']:.1f} us/pub), "
                          f"p99 {row['p99_ms']:.2f} ms, loadgen {row['client_cpu_percent']:.0f} %, "
                          f"lost {row['lost']:.0f}, errors {row['errors']:.0f}",
                          file=sys.stderr, flush=True)
                    if row["lost"] or row["errors"]:
                        d = result["delivery"]
                        problem = (f"round {r + 1} {load} {name}: missing {d['missing']}, duplicates "
                                   f"{d['duplicates']}, out of order {d['out_of_order']}, "
                                   f"subscribers with anomalies {d['subscribers_with_anomalies']}, "
                                   f"errors {result['errors']}, samples {result.get('error_samples')}, "
                                   f"worst {d['worst_subscribers'][:3]}")
                        problems.append(problem)
                        print(f"!!! LOST OR ERRORS: {problem}", file=sys.stderr, flush=True)
    finally:
        redis.stop()
    return summarize(runs), problems


def summarize(runs: dict[str, dict[str, list[dict[str, float]]]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Medians per load and broker over the rounds that lost nothing and had
    no errors (``ok`` of ``rounds``; ``lost`` and ``errors`` sum them all), and
    the medians of the per-round ratios to the reference over the rounds where
    both were clean. A broker with no clean round has only its counts."""
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for load, by_name in runs.items():
        table[load] = {}
        clean = {name: [not (run["lost"] or run["errors"]) for run in rounds]
                 for name, rounds in by_name.items()}
        for name, rounds in by_name.items():
            good = [run for run, ok in zip(rounds, clean[name]) if ok]
            row: dict[str, Any] = {}
            if good:
                row = {m: statistics.median(run[m] for run in good) for m in good[0]
                       if m not in ("lost", "errors")}
                pairs = [(run, ref) for run, ref, ok, ref_ok
                         in zip(rounds, by_name[REFERENCE], clean[name], clean[REFERENCE]) if ok and ref_ok]
                for m in RATIOS:
                    row[f"{m}_ratio"] = (statistics.median(run[m] / ref[m] if ref[m] else 0.0
                                                           for run, ref in pairs) if pairs else 0.0)
            row.update(ok=len(good), rounds=len(rounds), lost=sum(run["lost"] for run in rounds),
                       errors=sum(run["errors"] for run in rounds), runs=rounds)
            table[load][name] = row
    return table


def print_table(table: dict[str, dict[str, dict[str, Any]]], opts: argparse.Namespace) -> None:
    print(f"medians of the clean rounds (ok) of {opts.repeat}, {opts.duration:g} s each; wirehub's "
          f"{', '.join(sorted(WIREHUB_HOT_PATHS))} hot path (from its /metrics); ratios to '{REFERENCE}' "
          f"of the same round; us/pub: CPU microseconds per publication:")
    print(f"{'load':<13} {'broker':<7} {'deliveries/s':>13} {'ratio':>6} {'gw CPU':>7} "
          f"{'per gw CPU-s':>13} {'ratio':>6} {'gw us/pub':>9} {'redis':>6} {'us/pub':>7} "
          f"{'per gw+redis CPU-s':>19} {'ratio':>6} {'p99 ms':>7} {'ratio':>6} {'ok':>4} {'lost':>9} {'err':>9}")
    for load, by_name in table.items():
        for name, row in by_name.items():
            counts = f"{row['ok']:>2}/{row['rounds']} {row['lost']:>9,.0f} {row['errors']:>9,.0f}"
            if not row["ok"]:
                print(f"{load:<13} {name:<7} {'(no clean round)':<129} {counts}")
                continue
            gw_us = 1e4 * row["gateway_cpu_percent"] / row["published_per_s"] if row["published_per_s"] else 0.0
            print(f"{load:<13} {name:<7} {row['deliveries_per_s']:>13,.0f} {row['deliveries_per_s_ratio']:>5.2f}x "
                  f"{row['gateway_cpu_percent']:>6.0f}% "
                  f"{row['deliveries_per_gateway_cpu_s']:>13,.0f} {row['deliveries_per_gateway_cpu_s_ratio']:>5.2f}x "
                  f"{gw_us:>9.1f} {row['redis_cpu_percent']:>5.0f}% {row['redis_cpu_us_per_publication']:>7.1f} "
                  f"{row['deliveries_per_total_cpu_s']:>19,.0f} {row['deliveries_per_total_cpu_s_ratio']:>5.2f}x "
                  f"{row['p99_ms']:>7.2f} {row['p99_ms_ratio']:>5.2f}x {counts}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 3)[3],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds per run (default 5)")
    parser.add_argument("--load", action="append", choices=list(LOADS),
                        help="run only this load (repeatable; default: all)")
    parser.add_argument("--json", help="write the table to this file")
    opts = parser.parse_args(argv)
    table, problems = measure(opts)
    print_table(table, opts)
    if opts.json:
        with open(opts.json, "w", encoding="utf-8") as f:
            json.dump({"hot_path": sorted(WIREHUB_HOT_PATHS), "options": vars(opts), "table": table,
                       "problems": problems}, f, indent=2)
    if problems:
        print(f"\nFAILED: {len(problems)} run(s) lost messages or had errors:", file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
