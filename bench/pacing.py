"""Fan-out pacing: does waiting before a flush buy anything, and what does it cost?

The Flusher may wait before a fan-out round so that publications arriving
meanwhile share one ``send()`` per subscriber (``_ext/fanout.pyx``,
``Flusher``). That saves CPU when the rate is fixed and moderate, and costs
throughput and latency when a publisher keeps a window in flight (the load
adapts to the server, and a waiting server is an idle one). This runs the
three loads that show both against ``wirehub serve`` started with pacing
off (``--fanout-pace-max-s 0``, the reference of every ratio) and with the
default, in interleaved rounds:

* ``window-100``: 1 publisher, 32 publications in flight -> 100 subscribers;
* ``window-1k``: the same -> 1,000 subscribers;
* ``rate-1k``: 1,000 publications/s -> 1,000 subscribers.

Reported, as medians: deliveries/s, the server's CPU share, deliveries per
server CPU-second, p99 publish-to-receive latency, and each as a ratio to
the unpaced server of the same round. ``--baseline-src DIR`` adds a third
server run from another checkout's ``src`` (built in place), e.g. the code
before a change to the pacing:

    python bench/pacing.py                        # 3 rounds, ~4 min
    python bench/pacing.py --repeat 5 --duration 8
    python bench/pacing.py --load window-100 --load rate-1k
    python bench/pacing.py --baseline-src /tmp/wh-before/src --json reports/pacing.json

Server on one core, the load generator on the other (as run_e2e.py). See
docs/benchmarks.md, "Fan-out pacing".
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from typing import Any

from run_e2e import WIREHUB_HOT_PATHS, Running, run_loadgen, servers, split_cores

LOADS = {
    "window-100": ["--subscribers", "100", "--window", "32"],
    "window-1k": ["--subscribers", "1000", "--window", "32"],
    "rate-1k": ["--subscribers", "1000", "--rate", "1000"],
}
REFERENCE = "unpaced"


def variants(baseline_src: str | None) -> dict[str, list[str]]:
    """Server commands by name; the options after ``serve`` are the same for all."""
    serve = next(s for s in servers(sys.executable) if s.name == "wirehub").commands["broadcast"]
    options = serve[serve.index("serve") + 1:]
    commands = {REFERENCE: serve + ["--fanout-pace-max-s", "0"], "default": serve}
    if baseline_src:
        commands["baseline"] = ["env", f"PYTHONPATH={baseline_src}", sys.executable, "-m", "wirehub",
                                "serve", *options]
    return commands


def figures(result: dict[str, Any]) -> dict[str, float]:
    server = result.get("server") or {}
    delivered = result["throughput"]["deliveries_per_s"]
    cpu = server.get("cpu_percent") or 0.0
    return {
        "deliveries_per_s": delivered,
        "server_cpu_percent": cpu,
        "deliveries_per_cpu_s": delivered / (cpu / 100) if cpu else 0.0,
        "p99_ms": result["latency_us"]["p99"] / 1000,
        "lost": result["delivery"]["missing"],
    }


def measure(opts: argparse.Namespace) -> dict[str, dict[str, dict[str, float]]]:
    server_cores, client_cores = split_cores()
    commands = variants(opts.baseline_src)
    loads = {name: LOADS[name] for name in opts.load or LOADS}
    runs: dict[str, dict[str, list[dict[str, float]]]] = {
        load: {name: [] for name in commands} for load in loads}
    for r in range(opts.repeat):
        for load, args in loads.items():
            for name, command in commands.items():
                server = Running(command, server_cores)
                try:
                    result = run_loadgen(
                        ["fanout", *args, "--url", f"ws://127.0.0.1:{server.port}/ws", "--json",
                         "--no-progress", "--duration", str(opts.duration), "--warmup", "1",
                         "--server-pid", str(server.proc.pid)], client_cores, timeout_s=600)
                finally:
                    server.stop()
                row = figures(result)
                runs[load][name].append(row)
                print(f"round {r + 1}/{opts.repeat} {load} {name}: {row['deliveries_per_s']:,.0f}/s, "
                      f"server {row['server_cpu_percent']:.0f} %, p99 {row['p99_ms']:.2f} ms, "
                      f"lost {row['lost']:.0f}", file=sys.stderr, flush=True)
    table: dict[str, dict[str, dict[str, float]]] = {}
    for load, by_name in runs.items():
        table[load] = {}
        for name, rounds in by_name.items():
            row = {m: statistics.median(run[m] for run in rounds) for m in rounds[0] if m != "lost"}
            for m in ("deliveries_per_s", "deliveries_per_cpu_s", "p99_ms"):
                row[f"{m}_ratio"] = statistics.median(
                    run[m] / ref[m] if ref[m] else 0.0 for run, ref in zip(rounds, by_name[REFERENCE]))
            row["lost"] = sum(run["lost"] for run in rounds)
            table[load][name] = row
    return table


def print_table(table: dict[str, dict[str, dict[str, float]]], opts: argparse.Namespace) -> None:
    print(f"medians of {opts.repeat} rounds, {opts.duration:g} s each; wirehub's "
          f"{', '.join(sorted(WIREHUB_HOT_PATHS))} hot path (from its /metrics); ratios to '{REFERENCE}':")
    print(f"{'load':<11} {'server':<9} {'deliveries/s':>13} {'ratio':>6} {'CPU %':>6} {'per CPU-s':>11} "
          f"{'ratio':>6} {'p99 ms':>7} {'ratio':>6} {'lost':>5}")
    for load, by_name in table.items():
        for name, row in by_name.items():
            print(f"{load:<11} {name:<9} {row['deliveries_per_s']:>13,.0f} {row['deliveries_per_s_ratio']:>5.2f}x "
                  f"{row['server_cpu_percent']:>6.0f} {row['deliveries_per_cpu_s']:>11,.0f} "
                  f"{row['deliveries_per_cpu_s_ratio']:>5.2f}x {row['p99_ms']:>7.2f} "
                  f"{row['p99_ms_ratio']:>5.2f}x {row['lost']:>5.0f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 3)[3],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds per run (default 5)")
    parser.add_argument("--load", action="append", choices=list(LOADS),
                        help="run only this load (repeatable; default: all)")
    parser.add_argument("--baseline-src", help="also run a server from this checkout's src directory")
    parser.add_argument("--json", help="write the table to this file")
    opts = parser.parse_args(argv)
    table = measure(opts)
    print_table(table, opts)
    if opts.json:
        with open(opts.json, "w", encoding="utf-8") as f:
            json.dump({"hot_path": sorted(WIREHUB_HOT_PATHS), "table": table}, f, indent=2)
    lost = sum(row["lost"] for by_name in table.values() for row in by_name.values())
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
