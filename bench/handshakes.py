"""Handshakes/s of wirehub, Node ws and raw picows, measured by an independent C client.

Why: issue #24 item 5. The handshake figure in docs/benchmarks.md comes from
the bundled loadgen (``python -m tools.loadgen connect``, through
``bench/run_e2e.py``'s ``handshake-2k``), a Python client whose own costs and
habits are part of what it reports. ``bench/handshakes.c`` is a small C
client (libc, epoll, non-blocking sockets, a few µs of CPU per handshake)
that does the same thing to every server, so its figure is the servers'.
Both instruments run here against the same freshly started servers, so the
loadgen's figure can be checked against the C client's in the same run.

Each run starts the server anew, pinned to one core (``taskset -c 1``; the
clients get core 0), warms it up with ``--warmup`` handshakes from the C
client (closed afterwards; Node's JIT and wirehub's caches are then warm, as
on a server that has been up for a while), waits until it is idle, then
measures. Instruments:

* ``c-hold``: the C client, every upgraded connection held open until the
  last handshake, then closed with a CLOSE frame. What the loadgen's
  ``connect`` mode does, so this is the one the loadgen is compared to.
* ``c-busy``: ``c-hold`` with ``--busy-poll``: the client never sleeps, so
  a server's write does not pay for waking it (see bench/handshakes.c; on a
  2-vCPU VM that wake-up cost the servers ~22 % of their CPU per handshake).
  The loadgen, ~70 % busy, is between the two.
* ``c-churn``: the C client, each connection sent a CLOSE frame and closed
  right after its 101 (``--close frame``): the server's teardown is in the
  window too.
* ``loadgen``: ``python -m tools.loadgen connect --connections N
  --concurrency C`` (one process, on the client core).

Every instrument runs ``--repeat`` rounds of one run per server
(interleaved, as ``run_e2e.measure_interleaved``); reported are medians,
each server's ratio to ``ws`` for every instrument, and each server's
loadgen/c-hold and loadgen/c-busy ratios (the loadgen's error).

    python bench/handshakes.py                      # 10,000 connections, 100 at a time, 3 rounds
    python bench/handshakes.py --quick              # 2,000 connections, 1 round, about a minute
    python bench/handshakes.py --server wirehub --instrument c-hold --repeat 5
    python bench/handshakes.py --warmup 0 --connections 2000   # cold servers, as run_e2e's handshake-2k
    python bench/handshakes.py --json reports/handshakes.json
    python bench/handshakes.py --baseline-src /tmp/wh-before/src   # and wirehub before a change

The C client alone: ``.cache/bench-handshakes/handshakes --port P --path /ws``
(built here with ``cc -O2``; ``--help`` and the comment at the top of
bench/handshakes.c say what it does).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from run_e2e import (REFERENCE, WIREHUB_HOT_PATHS, Running, ensure_node, run_loadgen, servers,
                     wirehub_available)
from wirehub import openfiles

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tools.loadgen.server_cpu import cpu_seconds  # noqa: E402

SOURCE = ROOT / "bench" / "handshakes.c"
BUILD_DIR = ROOT / ".cache" / "bench-handshakes"
SERVER_NAMES = ("wirehub", "ws", "picows")
BASELINE = "baseline"  # --baseline-src: wirehub from another checkout
INSTRUMENTS = ("c-hold", "c-busy", "c-churn", "loadgen")
# C-client instrument -> (--close, --busy-poll)
C_MODES = {"c-hold": ("hold", False), "c-busy": ("hold", True), "c-churn": ("frame", False)}
FIGURES = ("handshakes_per_s", "handshakes_per_cpu_s", "p50_us", "p99_us", "client_cpu_percent",
           "server_cpu_percent")
# A server below this share of its core during a C-client run was waiting or
# shared its core with other work: that run measured the machine too.
BUSY_SERVER_PERCENT = 85


# -- the C client -------------------------------------------------------------

def find_compiler() -> str | None:
    """``$CC``, else cc, gcc or clang on PATH; None when there is none."""
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def build_client(out_dir: Path = BUILD_DIR, source: Path = SOURCE) -> Path:
    """Compile ``source`` (bench/handshakes.c by default; ``cc -O2``) into
    ``out_dir``/<its stem> unless the binary is newer than it and the headers beside it."""
    binary = out_dir / source.stem
    newest = max(path.stat().st_mtime for path in (source, *source.parent.glob("*.h")))
    if binary.exists() and binary.stat().st_mtime >= newest:
        return binary
    cc = find_compiler()
    if cc is None:
        raise RuntimeError("no C compiler (cc, gcc, clang or $CC) found")
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = binary.with_suffix(f".tmp{os.getpid()}")
    proc = subprocess.run([cc, "-O2", "-Wall", "-o", str(tmp), str(source)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{cc} -O2 {source.name} failed: {proc.stderr.strip()[-800:]}")
    tmp.replace(binary)                  # atomic: a parallel build never sees half a file
    return binary


def run_client(binary: Path, port: int, path: str = "/", connections: int = 100,
               concurrency: int = 100, close: str = "hold", server_pid: int = 0,
               cores: set[int] | None = None, timeout_s: float = 300,
               busy_poll: bool = False) -> dict[str, Any]:
    """Run the C client once; its JSON result (exit status 1 only means errors were counted)."""
    args = ["--port", str(port), "--path", path, "--connections", str(connections),
            "--concurrency", str(concurrency), "--close", close]
    if server_pid:
        args += ["--server-pid", str(server_pid)]
    if busy_poll:
        args.append("--busy-poll")
    return run_c(binary, args, cores, timeout_s)


def run_c(binary: Path, args: list[str], cores: set[int] | None, timeout_s: float) -> dict[str, Any]:
    """Run one of bench/'s C clients, pinned to ``cores``; its JSON result
    (its exit status 1 only means it counted errors or losses)."""
    proc = subprocess.run([str(binary), *args], capture_output=True, text=True, check=False, timeout=timeout_s,
                          preexec_fn=(lambda: os.sched_setaffinity(0, cores)) if cores else None)
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"C client failed ({proc.returncode}): {proc.stderr.strip()[-400:]}")
    return json.loads(proc.stdout)


# -- servers and runs -----------------------------------------------------------

def pick_cores() -> tuple[set[int] | None, set[int] | None]:
    """Server on the last core of this process's affinity, clients on the first
    (``taskset -c 1`` / ``-c 0`` on a 2-core machine); no pinning on one core."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return None, None
    return {cores[-1]}, {cores[0]}


def server_table(baseline_src: str | None = None) -> dict[str, tuple[list[str], str, str]]:
    """name -> (command with {port}, path, loadgen protocol); run_e2e's commands:
    wirehub with per-IP and rate limits off (every connection comes from
    127.0.0.1, faster than the default 1,000 new connections/s per IP).
    ``baseline``: the same wirehub command run from another checkout's ``src``."""
    by_name = {s.name: s for s in servers(sys.executable)}
    wirehub = by_name["wirehub"].commands["echo"]
    table = {"wirehub": (wirehub, by_name["wirehub"].path, "wirehub"),
             REFERENCE: (by_name[REFERENCE].commands["echo"], by_name[REFERENCE].path, "raw"),
             "picows": (by_name["picows-naive"].commands["echo"], by_name["picows-naive"].path, "raw")}
    if baseline_src:
        options = wirehub[wirehub.index("serve"):]
        table[BASELINE] = (["env", f"PYTHONPATH={baseline_src}", sys.executable, "-m", "wirehub", *options],
                           by_name["wirehub"].path, "wirehub")
    return table


def settle(pid: int, timeout_s: float = 5.0) -> None:
    """Wait until the server has been idle (< 5 % CPU) for 100 ms."""
    deadline = time.monotonic() + timeout_s
    last = cpu_seconds(pid)
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = cpu_seconds(pid)
        if now - last < 0.005:
            return
        last = now


def run_once(binary: Path, server: str, instrument: str, opts: argparse.Namespace,
             cores: tuple[set[int] | None, set[int] | None]) -> tuple[dict[str, float], dict[str, int]]:
    """One measurement against a freshly started, warmed-up server: figures and error counts."""
    command, path, protocol = server_table(opts.baseline_src)[server]
    server_cores, client_cores = cores
    srv = Running(command, server_cores)
    try:
        pid = srv.proc.pid
        if opts.warmup:
            run_client(binary, srv.port, path, opts.warmup, opts.concurrency, "frame", 0, client_cores)
        settle(pid)
        if instrument == "loadgen":
            result = run_loadgen(
                ["connect", "--connections", str(opts.connections), "--concurrency",
                 str(opts.concurrency), "--url", f"ws://127.0.0.1:{srv.port}{path}", "--protocol",
                 protocol, "--procs", "1", "--json", "--no-progress", "--max-errors", "1000000000",
                 "--server-pid", str(pid)], client_cores, timeout_s=300)
            proc0 = result["client"]["processes"][0] if result["client"]["processes"] else {}
            server = result.get("server", {})
            figures = {"handshakes_per_s": result["connect"]["handshakes_per_s"],
                       "handshakes_per_cpu_s": server.get("handshakes_per_cpu_s", 0),
                       "server_cpu_percent": server.get("cpu_percent", 0),
                       "p50_us": result["latency_us"]["p50"], "p99_us": result["latency_us"]["p99"],
                       "client_cpu_percent": proc0.get("cpu_percent", 0.0)}
            errors = result["errors"]
        else:
            close, busy = C_MODES[instrument]
            result = run_client(binary, srv.port, path, opts.connections, opts.concurrency,
                                close, pid, client_cores, busy_poll=busy)
            figures = {"handshakes_per_s": result["handshakes_per_s"],
                       "handshakes_per_cpu_s": result["server"]["handshakes_per_cpu_s"],
                       "server_cpu_percent": result["server"]["cpu_percent"],
                       "p50_us": result["latency_us"]["p50"], "p99_us": result["latency_us"]["p99"],
                       "client_cpu_percent": 100 * result["client_cpu_s"] / result["elapsed_s"]
                       if result["elapsed_s"] else 0.0}
            errors = result["error_kinds"]
    finally:
        srv.stop()
    figures = {k: float(v or 0) for k, v in figures.items()}
    figures["load_average_1m"] = os.getloadavg()[0]
    return figures, errors


def measure(binary: Path, names: list[str], instruments: list[str], opts: argparse.Namespace,
            cores: tuple[set[int] | None, set[int] | None]) -> dict[str, dict[str, Any]]:
    """``opts.repeat`` rounds; in each, every instrument against every server in turn.

    Interleaved rather than back to back: the speed of a shared VM drifts over
    minutes, and a drift then lands on every server and instrument alike.
    """
    runs: dict[tuple[str, str], list[dict[str, float]]] = {}
    errors: dict[tuple[str, str], list[dict[str, int]]] = {}
    failed: dict[tuple[str, str], str] = {}
    for round_no in range(1, opts.repeat + 1):
        for instrument in instruments:
            for server in names:
                if instrument == "loadgen" and server not in opts.loadgen_servers:
                    continue
                key = (instrument, server)
                if key in failed:
                    continue
                print(f"{instrument:<8} {server:<8} {round_no}/{opts.repeat} ", end="",
                      file=sys.stderr, flush=True)
                try:
                    figures, errs = run_once(binary, server, instrument, opts, cores)
                except (RuntimeError, subprocess.TimeoutExpired, KeyError, ValueError) as exc:
                    failed[key] = str(exc)
                    print(f"failed: {exc}", file=sys.stderr)
                    continue
                runs.setdefault(key, []).append(figures)
                errors.setdefault(key, []).append(errs)
                print(f"{figures['handshakes_per_s']:>8,.0f}/s  {figures['handshakes_per_cpu_s']:>7,.0f}"
                      f" per server CPU-s  p50 {figures['p50_us'] / 1e3:5.1f} ms  server CPU "
                      f"{figures['server_cpu_percent']:3.0f}%  client CPU "
                      f"{figures['client_cpu_percent']:3.0f}%  load {figures['load_average_1m']:.1f}"
                      f"  errors {sum(errs.values())}"
                      + (f"  (server below {BUSY_SERVER_PERCENT} % CPU)" if instrument != "loadgen"
                         and figures["server_cpu_percent"] < BUSY_SERVER_PERCENT else ""),
                      file=sys.stderr, flush=True)
    table: dict[str, dict[str, Any]] = {}
    for instrument in instruments:
        for server in names:
            key = (instrument, server)
            if key in failed:
                table.setdefault(instrument, {})[server] = {"failed": failed[key]}
            elif key in runs:
                rs = runs[key]
                table.setdefault(instrument, {})[server] = {
                    "median": {f: statistics.median(r[f] for r in rs) for f in FIGURES},
                    "runs": rs, "errors": errors[key]}
    return table


def ratios(table: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Each server's ratio to ws per instrument, and per server loadgen / c-hold
    (the same work for the server) and loadgen / c-busy."""
    out: dict[str, Any] = {"to_ws": {}, "loadgen_to_c": {}}
    for instrument, per_server in table.items():
        ref = per_server.get(REFERENCE, {}).get("median")
        for server, entry in per_server.items():
            if ref and "median" in entry:
                out["to_ws"].setdefault(instrument, {})[server] = {
                    f: round(entry["median"][f] / ref[f], 3) if ref[f] else None
                    for f in ("handshakes_per_s", "handshakes_per_cpu_s")}
    for server, entry in table.get("loadgen", {}).items():
        for instrument in ("c-hold", "c-busy"):
            c = table.get(instrument, {}).get(server, {}).get("median")
            if c and "median" in entry and c["handshakes_per_s"]:
                out["loadgen_to_c"].setdefault(instrument, {})[server] = round(
                    entry["median"]["handshakes_per_s"] / c["handshakes_per_s"], 3)
    return out


def format_table(table: dict[str, dict[str, Any]], rat: dict[str, Any], names: list[str],
                 opts: argparse.Namespace) -> str:
    lines = [(f"{opts.connections:,} connections, {opts.concurrency} at a time, warm-up "
              f"{opts.warmup:,}; medians of {opts.repeat} (ratio to ws in the same run)"),
             f"{'instrument':<10}{'figure':<22}" + "".join(f"{n:>20}" for n in names)]
    lines.append("-" * len(lines[-1]))
    for instrument, per_server in table.items():
        for figure in ("handshakes_per_s", "handshakes_per_cpu_s", "p50_us", "server_cpu_percent",
                       "client_cpu_percent"):
            cells = []
            for n in names:
                entry = per_server.get(n)
                if entry is None:
                    cells.append("-")
                    continue
                if "median" not in entry:
                    cells.append("failed")
                    continue
                v = entry["median"][figure]
                cell = f"{v:,.0f}"
                r = rat["to_ws"].get(instrument, {}).get(n, {}).get(figure)
                if r:
                    cell += f" ({r:.2f}x)"
                if any(sum(e.values()) for e in entry["errors"]):
                    cell = "!" + cell
                cells.append(cell)
            lines.append(f"{instrument:<10}{figure:<22}" + "".join(f"{c:>20}" for c in cells))
    lines.append("(! = a run had errors: see --json; server_cpu_percent well below 100 in a C-client "
                 "run: the server waited, or shared its core with other work)")
    for instrument in (i for i in ("c-hold", "c-busy", "c-churn") if i in rat["to_ws"]):
        r = rat["to_ws"][instrument].get("wirehub", {}).get("handshakes_per_s")
        if r:
            lines.append(f"wirehub / ws, {instrument}: {r:.2f}x (issue #24 target: >= 1.5x)")
    for instrument, per_server in rat["loadgen_to_c"].items():
        for server, r in per_server.items():
            lines.append(f"loadgen / {instrument} handshakes/s, {server}: {r:.2f}"
                         f" ({'within' if abs(r - 1) <= 0.10 else 'outside'} 10 %)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=10000,
                        help="handshakes per measured run (default %(default)s)")
    parser.add_argument("--concurrency", type=int, default=100,
                        help="handshakes in progress at once (default %(default)s)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="rounds, servers and instruments interleaved; medians reported (default 3)")
    parser.add_argument("--warmup", type=int, default=2000,
                        help="handshakes (C client, closed at once) before each measured run; "
                             "0: measure a cold server (default %(default)s)")
    parser.add_argument("--server", action="append", choices=SERVER_NAMES, default=[],
                        help="only these servers (repeatable; ws is always kept for the ratios)")
    parser.add_argument("--instrument", action="append", choices=INSTRUMENTS, default=[],
                        help="only these instruments (repeatable; default all)")
    parser.add_argument("--loadgen-server", dest="loadgen_servers", action="append",
                        choices=SERVER_NAMES, default=[],
                        help="servers the loadgen runs against (default: wirehub and ws)")
    parser.add_argument("--quick", action="store_true",
                        help="2,000 connections (after the 2,000 of warm-up), 1 round: about a minute")
    parser.add_argument("--baseline-src", metavar="DIR",
                        help="also measure wirehub run from this checkout's src (built in place), "
                             "e.g. the code before a change")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the results here")
    opts = parser.parse_args(argv)
    if opts.quick:
        # The full warm-up still: a ws whose JIT is cold makes every ratio look better.
        opts.connections, opts.warmup, opts.repeat = 2000, 2000, 1
    if opts.connections < 1 or opts.concurrency < 1 or opts.repeat < 1 or opts.warmup < 0:
        parser.error("--connections, --concurrency and --repeat must be >= 1, --warmup >= 0")
    opts.loadgen_servers = opts.loadgen_servers or ["wirehub", REFERENCE]
    names = [n for n in SERVER_NAMES if not opts.server or n in opts.server or n == REFERENCE]
    if opts.baseline_src:
        names.append(BASELINE)
    instruments = [i for i in INSTRUMENTS if not opts.instrument or i in opts.instrument]

    openfiles.lift()
    try:
        binary = build_client()
    except RuntimeError as exc:
        print(exc, file=sys.stderr)
        return 2
    if "wirehub" in names:
        wirehub = next(s for s in servers(sys.executable) if s.name == "wirehub")
        if why := wirehub_available(wirehub):
            print(f"wirehub cannot run: {why}", file=sys.stderr)
            return 2
    if why := ensure_node():
        print(f"Node ws cannot run ({why}): no reference for the ratios", file=sys.stderr)
        return 2
    cores = pick_cores()
    print(f"C client: {binary}; server on core(s) {sorted(cores[0] or [])}, clients on "
          f"{sorted(cores[1] or [])}", file=sys.stderr)

    table = measure(binary, names, instruments, opts, cores)
    rat = ratios(table)
    print(format_table(table, rat, names, opts))
    if WIREHUB_HOT_PATHS:
        print(f"wirehub ran on its {', '.join(sorted(WIREHUB_HOT_PATHS))} hot path (its /metrics)",
              file=sys.stderr)
    if opts.json:
        machine = {"cpus": os.cpu_count(), "server_cores": sorted(cores[0] or []),
                   "client_cores": sorted(cores[1] or []), "platform": platform.platform(),
                   "python": platform.python_version(), "load_average": os.getloadavg(),
                   "wirehub_hot_path": sorted(WIREHUB_HOT_PATHS)}
        opts.json.parent.mkdir(parents=True, exist_ok=True)
        opts.json.write_text(json.dumps(
            {"machine": machine, "options": {k: str(v) for k, v in vars(opts).items()},
             "instruments": table, "ratios": rat}, indent=2) + "\n")
        print(f"wrote {opts.json}", file=sys.stderr)
    failed = any("failed" in e for per in table.values() for e in per.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
