"""End-to-end benchmark: wirehub and its peers driven by the same load generator.

Each server (wirehub, raw picows naive and batched, Python ``websockets`` on
uvloop, Node ``ws``) is started in turn on 127.0.0.1, pinned to its own
core(s), and driven by ``python -m tools.loadgen`` pinned to the others. Every
scenario runs ``--repeat`` rounds of one run per server (interleaved, see
``measure_interleaved``); each median is reported together with its
ratio to ``ws`` measured in the same run (ratio > 1 means better than ws, for
latencies and memory too).

    python bench/run_e2e.py --quick                  # a few minutes
    python bench/run_e2e.py --scenario fanout-1k     # substring filter
    python bench/run_e2e.py --check bench/baseline.json --tolerance 0.3

See docs/benchmarks.md for how to read the output.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wirehub import openfiles

ROOT = Path(__file__).resolve().parent.parent
SERVERS = ROOT / "bench" / "servers"
NODE_CACHE = ROOT / ".cache" / "bench-node"
REFERENCE = "ws"


@dataclass(frozen=True)
class Scenario:
    """One loadgen invocation and the figures taken from its result."""

    name: str
    kind: str                          # echo | fanout | idle | handshake
    args: tuple[str, ...]
    metrics: tuple[str, ...]
    quick: bool = True


@dataclass(frozen=True)
class Server:
    name: str
    protocol: str                      # wirehub | raw
    # command per server mode ("echo" / "broadcast"), {port} substituted
    commands: dict[str, list[str]] = field(default_factory=dict)
    path: str = "/"


# Metric name -> (path in the loadgen result, higher_is_better)
METRICS: dict[str, tuple[tuple[str, ...], bool]] = {
    "round_trips_per_s": (("throughput", "round_trips_per_s"), True),
    "deliveries_per_s": (("throughput", "deliveries_per_s"), True),
    "p50_us": (("latency_us", "p50"), False),
    "p99_us": (("latency_us", "p99"), False),
    "handshakes_per_s": (("connect", "handshakes_per_s"), True),
    # The server's capacity whether or not the client saturated (--server-pid).
    "deliveries_per_cpu_s": (("server", "deliveries_per_cpu_s"), True),
    "handshakes_per_cpu_s": (("server", "handshakes_per_cpu_s"), True),
    "round_trips_per_cpu_s": (("server", "round_trips_per_cpu_s"), True),
    "server_cpu_percent": (("server", "cpu_percent"), False),
    "rss_kib_per_conn": ((), False),          # measured here, from /proc
    # wirehub only: its own fan-out rounds (wirehub_fanout_round_seconds on
    # /metrics), the latency the server adds before the client's share.
    "server_round_p50_us": ((), False),
    "server_round_p99_us": ((), False),
}


def scenarios() -> list[Scenario]:
    out = [Scenario("echo-100", "echo", ("echo", "--connections", "100", "--inflight", "1"),
                    ("round_trips_per_s", "round_trips_per_cpu_s", "p50_us", "p99_us"))]
    for subs, label in ((100, "100"), (1000, "1k"), (10000, "10k")):
        for size, slabel in ((64, "64"), (1024, "1k")):
            out.append(Scenario(
                f"fanout-{label}-{slabel}", "fanout",
                ("fanout", "--publishers", "1", "--subscribers", str(subs), "--size", str(size),
                 "--window", "4" if subs >= 10000 else "32"),
                ("deliveries_per_s", "deliveries_per_cpu_s", "p50_us", "p99_us"),
                quick=not (subs == 10000 and size == 1024)))
    # Window mode above measures capacity, so its latency is mostly queueing;
    # these compare latency at a fixed rate: 20 publications/s x 1000 is a load
    # every peer sustains, 1,000/s x 1000 (1 M deliveries/s) is the issue's
    # latency target (p99 <= 10 ms, nothing lost).
    for rate in (20, 1000):
        out.append(Scenario(f"latency-1k-r{rate}", "fanout",
                            ("fanout", "--publishers", "1", "--subscribers", "1000",
                             "--rate", str(rate)),
                            ("deliveries_per_s", "p50_us", "p99_us", "server_round_p50_us",
                             "server_round_p99_us", "server_cpu_percent")))
    out.append(Scenario("idle-10k", "idle", ("connect", "--connections", "10000",
                                             "--concurrency", "500", "--hold", "2"),
                        ("rss_kib_per_conn",)))
    out.append(Scenario("handshake-2k", "handshake", ("connect", "--connections", "2000",
                                                      "--concurrency", "100"),
                        ("handshakes_per_s", "handshakes_per_cpu_s")))
    return out


def servers(python: str) -> list[Server]:
    picows = [python, str(SERVERS / "picows_server.py"), "--port", "{port}", "--mode"]
    wsockets = [python, str(SERVERS / "websockets_server.py"), "--port", "{port}", "--mode"]
    node = ["node", str(SERVERS / "ws_server.js"), "--port", "{port}", "--mode"]
    # Rate and connection limits off: the peers have none, a window-mode
    # publisher exceeds the default 10k messages/s per connection, and every
    # load-generator connection comes from one IP, faster than the default
    # 1,000 new connections/s per IP.
    wirehub = [str(Path(python).parent / "wirehub"), "serve", "--port", "{port}",
               "--rate-limit-messages-per-s", "0", "--rate-limit-bytes-per-s", "0",
               "--max-connections-per-ip", "0", "--new-connections-per-ip-per-s", "0"]
    return [
        Server("wirehub", "wirehub", {"echo": wirehub, "broadcast": wirehub}, "/ws"),
        Server("picows-batched", "raw", {"echo": picows + ["echo"],
                                         "broadcast": picows + ["broadcast-batched"]}),
        Server("picows-naive", "raw", {"echo": picows + ["echo"],
                                       "broadcast": picows + ["broadcast"]}),
        Server("websockets", "raw", {"echo": wsockets + ["echo"],
                                     "broadcast": wsockets + ["broadcast"]}),
        Server(REFERENCE, "raw", {"echo": node + ["echo"], "broadcast": node + ["broadcast"]}),
    ]


# -- environment ------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def split_cores() -> tuple[set[int] | None, set[int] | None]:
    """Server gets one core, the client the rest; no pinning on a 1-core machine."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return None, None
    return {cores[0]}, set(cores[1:])


def ensure_node() -> str | None:
    """npm-install ``ws`` into .cache/bench-node; return why Node is unusable, or None."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        return "node/npm not found"
    if not (NODE_CACHE / "node_modules" / "ws").is_dir():
        NODE_CACHE.mkdir(parents=True, exist_ok=True)
        shutil.copy(SERVERS / "package.json", NODE_CACHE / "package.json")
        proc = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--silent"],
                              cwd=NODE_CACHE, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            return f"npm install failed: {proc.stderr.strip()[-200:]}"
    return None


def wirehub_available(server: Server) -> str | None:
    exe = server.commands["echo"][0]
    if not Path(exe).exists():
        return f"{exe} not installed"
    proc = subprocess.run([exe, "serve", "--help"], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return f"`wirehub serve --help` failed: {proc.stderr.strip()[-300:]}"
    return None


def rss_kib(pid: int) -> int:
    """VmRSS of ``pid`` plus its children (a server may fork workers)."""
    total = 0
    pids = [pid] + [int(p) for p in _children(pid)]
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def _children(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []


# The hot paths the wirehub servers of this run reported (``Running.hot_path``).
WIREHUB_HOT_PATHS: set[str] = set()


def hot_path(port: int) -> str:
    """Which hot path a running wirehub uses, as its ``wirehub_build_info`` on /metrics says."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    prefix = 'wirehub_build_info{hot_path="'
    for line in text.splitlines():
        if line.startswith(prefix):
            return line[len(prefix):].split('"', 1)[0]
    raise RuntimeError("no wirehub_build_info on /metrics")


class Running:
    """A started server process, pinned and reachable.

    A wirehub server is asked which hot path it runs (``hot_path``), so every
    figure says what it measured, whatever the environment claimed.
    """

    def __init__(self, cmd: list[str], cores: set[int] | None) -> None:
        self.port = free_port()
        argv = [part.replace("{port}", str(self.port)) for part in cmd]
        env = dict(os.environ, NODE_PATH=str(NODE_CACHE / "node_modules"))
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
            preexec_fn=(lambda: os.sched_setaffinity(0, cores)) if cores else None)
        deadline = time.monotonic() + 15
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                err = self.proc.stderr.read().decode()[-400:] if self.proc.stderr else ""
                self.stop()
                raise RuntimeError(f"server {argv[:3]} did not start: {err}")
            time.sleep(0.05)
        time.sleep(0.2)  # let the server settle (e.g. Node JIT warm-up of startup code)
        self.hot_path = hot_path(self.port) if "serve" in argv else None
        if self.hot_path is not None:
            WIREHUB_HOT_PATHS.add(self.hot_path)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# -- running ----------------------------------------------------------------

def run_loadgen(args: list[str], cores: set[int] | None, timeout_s: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "tools.loadgen", *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False,
                          timeout=timeout_s,
                          preexec_fn=(lambda: os.sched_setaffinity(0, cores)) if cores else None)
    try:
        return json.loads(proc.stdout)
    except ValueError:
        raise RuntimeError(f"loadgen failed ({proc.returncode}): {proc.stderr.strip()[-400:]}")


def run_once(server: Server, sc: Scenario, opts: argparse.Namespace,
             cores: tuple[set[int] | None, set[int] | None]) -> tuple[dict[str, float], dict[str, int]]:
    """Run one scenario once against a fresh server: its figures and error counts."""
    server_cores, client_cores = cores
    mode = "broadcast" if sc.kind == "fanout" else "echo"
    procs = len(client_cores) if client_cores else 1
    srv = Running(server.commands[mode], server_cores)
    try:
        args = [*sc.args, "--url", f"ws://127.0.0.1:{srv.port}{server.path}",
                "--protocol", server.protocol, "--procs", str(procs), "--json",
                "--no-progress", "--max-errors", "1000000000"]
        if sc.kind in ("echo", "fanout"):
            args += ["--duration", str(opts.duration), "--warmup", str(opts.warmup)]
        if sc.kind != "idle":
            args += ["--server-pid", str(srv.proc.pid)]
        base = peak = rss_kib(srv.proc.pid)
        rounds = "server_round_p99_us" in sc.metrics and server.name == "wirehub"
        rounds_before = fanout_rounds(srv.port) if rounds else []

        def sample_rss() -> None:
            nonlocal peak
            peak = max(peak, rss_kib(srv.proc.pid))

        if sc.kind == "idle":
            result = run_loadgen_sampled(args, client_cores, sample_rss)
        else:
            result = run_loadgen(args, client_cores, timeout_s=600)
        rounds_after = fanout_rounds(srv.port) if rounds else []
    finally:
        srv.stop()
    figures = {}
    for metric in sc.metrics:
        if metric == "rss_kib_per_conn":
            n = max(result["connect"]["established"], 1)
            figures[metric] = (peak - base) / n
        elif metric in ("server_round_p50_us", "server_round_p99_us"):
            during = [(le, after - before)
                      for (le, after), (_, before) in zip(rounds_after, rounds_before)]
            q = 0.5 if metric == "server_round_p50_us" else 0.99
            figures[metric] = histogram_quantile(q, during) * 1e6   # 0 for other servers
        else:
            value: Any = result
            for key in METRICS[metric][0]:
                value = value.get(key, 0) if isinstance(value, dict) else 0
            figures[metric] = float(value or 0)
    figures["client_cpu_max"] = max(
        (p["cpu_percent"] for p in result["client"]["processes"]), default=0.0)
    return figures, result["errors"]


def fanout_rounds(port: int) -> list[tuple[float, int]]:
    """wirehub's fan-out round histogram from /metrics: cumulative (le, count) pairs."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    prefix = 'wirehub_fanout_round_seconds_bucket{le="'
    return [(float(line[len(prefix):].split('"', 1)[0]), int(line.rsplit(" ", 1)[1]))
            for line in text.splitlines() if line.startswith(prefix)]


def histogram_quantile(q: float, buckets: list[tuple[float, int]]) -> float:
    """The ``q`` quantile of cumulative (le, count) buckets, interpolated
    linearly inside its bucket (as Prometheus's ``histogram_quantile``); a
    quantile in the +Inf bucket is reported as the highest finite bound."""
    total = buckets[-1][1] if buckets else 0
    if not total:
        return 0.0
    rank, lower, below = q * total, 0.0, 0
    for le, count in buckets:
        if count >= rank:
            if le == float("inf"):
                return lower
            return lower + (le - lower) * (rank - below) / (count - below)
        lower, below = le, count
    return lower


def summarize(runs: list[dict[str, float]], errors: list[dict[str, int]]) -> dict[str, Any]:
    """The medians of a server's runs of one scenario, with every run kept."""
    return {"median": {k: statistics.median(r[k] for r in runs) for k in runs[0]},
            "runs": runs, "errors": errors}


def measure_interleaved(servers: list[Server], sc: Scenario, opts: argparse.Namespace,
                        cores: tuple[set[int] | None, set[int] | None]) -> dict[str, dict[str, Any]]:
    """Run one scenario against every server in turn, ``opts.repeat`` rounds.

    Round-robin rather than one server's repeats back to back: on a shared VM
    the speed of the whole machine drifts by 10-20 % over minutes, and a drift
    then lands on every server's median alike instead of on whichever server
    ran during it, so the ratios stay comparable. A server that fails is
    reported as failed and left out of the rounds that follow.
    """
    runs: dict[str, list[dict[str, float]]] = {s.name: [] for s in servers}
    errors: dict[str, list[dict[str, int]]] = {s.name: [] for s in servers}
    failed: dict[str, dict[str, str]] = {}
    for round_no in range(1, opts.repeat + 1):
        for server in servers:
            if server.name in failed:
                continue
            print(f"{sc.name:<16} {server.name:<16} {round_no}/{opts.repeat}", end=" ",
                  file=sys.stderr, flush=True)
            try:
                figures, errs = run_once(server, sc, opts, cores)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                failed[server.name] = {"skipped": "failed", "error": str(exc)}
                print(f"failed: {exc}", file=sys.stderr)
                continue
            runs[server.name].append(figures)
            errors[server.name].append(errs)
            print(json.dumps({k: round(v, 1) for k, v in figures.items()}), file=sys.stderr)
    return {s.name: failed.get(s.name) or summarize(runs[s.name], errors[s.name])
            for s in servers}


def run_loadgen_sampled(args: list[str], cores: set[int] | None, sample: Callable[[], None],
                        interval_s: float = 0.1) -> dict[str, Any]:
    """Run the loadgen in the background, calling ``sample()`` every ``interval_s``
    meanwhile (to watch the server's memory from outside)."""
    cmd = [sys.executable, "-m", "tools.loadgen", *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True,
                            preexec_fn=(lambda: os.sched_setaffinity(0, cores)) if cores else None)
    while proc.poll() is None:
        sample()
        time.sleep(interval_s)
    out, err = proc.communicate()
    try:
        return json.loads(out)
    except ValueError:
        raise RuntimeError(f"loadgen failed ({proc.returncode}): {err.strip()[-400:]}")


def with_ratios(table: dict[str, dict[str, Any]]) -> None:
    """Add, per scenario and server, each figure's ratio to ws (> 1: better)."""
    for per_server in table.values():
        ref = per_server.get(REFERENCE, {}).get("median")
        for entry in per_server.values():
            entry["ratio"] = {}
            if not ref or "median" not in entry:
                continue
            for metric, value in entry["median"].items():
                if metric not in METRICS or not ref.get(metric) or not value:
                    continue
                higher_better = METRICS[metric][1]
                ratio = value / ref[metric] if higher_better else ref[metric] / value
                entry["ratio"][metric] = round(ratio, 3)


def _cell(entry: dict[str, Any], metric: str) -> str:
    if "median" not in entry:
        return "skipped" if entry else "-"
    v, r = entry["median"][metric], entry["ratio"].get(metric)
    if metric.startswith("server_round_") and not v:
        return "-"                                # only wirehub reports its rounds
    cell = f"{v:,.0f}" if v >= 100 else f"{v:.1f}"
    if any(sum(errs.values()) for errs in entry["errors"]):
        cell = "!" + cell  # some run had errors: see the JSON report
    return cell + (f" ({r:.2f}x)" if r else "")


def _rows(table: dict[str, dict[str, Any]], names: list[str]) -> list[list[str]]:
    rows = []
    for sc, per_server in table.items():
        metrics = next((list(e["median"]) for e in per_server.values() if "median" in e), [])
        for metric in (m for m in metrics if m in METRICS):
            rows.append([sc, metric] + [_cell(per_server.get(n, {}), metric) for n in names])
    return rows


def format_table(table: dict[str, dict[str, Any]], names: list[str], markdown: bool) -> str:
    """The results as aligned text, or as a Markdown table for docs/benchmarks.md."""
    legend = "ratio to ws from the same run, > 1 is better; ! = a run had errors"
    if markdown:
        lines = ["| scenario | metric | " + " | ".join(names) + " |",
                 "|---|---|" + "---:|" * len(names)]
        lines += ["| " + " | ".join(row) + " |" for row in _rows(table, names)]
        return "\n".join(lines + ["", f"({legend})"])
    header = f"{'scenario':<18}{'metric':<22}" + "".join(f"{n:>22}" for n in names)
    lines = [header, "-" * len(header)]
    lines += [f"{row[0]:<18}{row[1]:<22}" + "".join(f"{c:>22}" for c in row[2:])
              for row in _rows(table, names)]
    return "\n".join(lines + [f"({legend})"])


# p99 of a few-second run on a shared 2-core machine moved by 2-3x between
# identical runs, so it is reported but not checked.
UNCHECKED_METRICS = {"p99_us"}


def check(table: dict[str, dict[str, Any]], baseline_path: Path, tolerance: float) -> list[str]:
    """Ratios that fell more than ``tolerance`` below the committed baseline."""
    baseline = json.loads(baseline_path.read_text())["ratios"]
    failures = []
    for sc, per_server in baseline.items():
        for name, ratios in per_server.items():
            now = table.get(sc, {}).get(name, {}).get("ratio", {})
            for metric, base in ratios.items():
                if metric in UNCHECKED_METRICS:
                    continue
                if metric in now and now[metric] < base * (1 - tolerance):
                    failures.append(f"{sc} {name} {metric}: ratio {now[metric]:.2f} < "
                                    f"baseline {base:.2f} - {tolerance:.0%}")
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="shorter runs, 1 repeat, skips fanout-10k-1k (a few minutes)")
    parser.add_argument("--scenario", action="append", default=[],
                        help="run scenarios whose name contains this (repeatable)")
    parser.add_argument("--server", action="append", default=[],
                        help="run only these servers (repeatable; ws is always kept for ratios)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="rounds per scenario, servers interleaved; medians reported (default 3)")
    parser.add_argument("--duration", type=float, default=5.0,
                        help="seconds measured per run (default 5)")
    parser.add_argument("--warmup", type=float, default=1.0,
                        help="seconds of load before measuring (default 1)")
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "bench-e2e.json",
                        help="where the JSON report goes (default reports/bench-e2e.json)")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    parser.add_argument("--from-json", type=Path,
                        help="print the table of an earlier report instead of running")
    parser.add_argument("--check", type=Path, help="baseline JSON to compare ratios against")
    parser.add_argument("--tolerance", type=float, default=0.3,
                        help="with --check: the fraction a ratio may fall below the baseline (default 0.3)")
    parser.add_argument("--write-baseline", type=Path,
                        help="save this run's ratios into a baseline file (per scenario)")
    opts = parser.parse_args(argv)
    if opts.quick:
        opts.repeat, opts.duration, opts.warmup = 1, 2.0, 0.5

    if opts.from_json:
        earlier = json.loads(opts.from_json.read_text())["scenarios"]
        print(format_table(earlier, list(next(iter(earlier.values()), {})), opts.markdown))
        return 0
    openfiles.lift()
    cores = split_cores()
    chosen = [s for s in scenarios() if (not opts.quick or s.quick)
              and (not opts.scenario or any(f in s.name for f in opts.scenario))]
    all_servers = servers(sys.executable)
    if opts.server:
        all_servers = [s for s in all_servers if s.name in opts.server or s.name == REFERENCE]
    skipped: dict[str, str] = {}
    for srv in all_servers:
        if srv.name == "wirehub":
            why = wirehub_available(srv)
            if why:  # the benchmark of wirehub without wirehub is no benchmark
                print(f"wirehub cannot run: {why}", file=sys.stderr)
                return 2
        elif srv.name == REFERENCE and (why := ensure_node()):
            skipped[srv.name] = why
            print(f"skipping {srv.name}: {why}", file=sys.stderr)

    table: dict[str, dict[str, Any]] = {}
    for sc in chosen:
        running = [srv for srv in all_servers if srv.name not in skipped]
        table[sc.name] = measure_interleaved(running, sc, opts, cores)
        table[sc.name].update({name: {"skipped": why} for name, why in skipped.items()})
    with_ratios(table)
    names = [s.name for s in all_servers]
    print(format_table(table, names, opts.markdown))

    if WIREHUB_HOT_PATHS:
        print(f"wirehub ran on its {', '.join(sorted(WIREHUB_HOT_PATHS))} hot path (its /metrics)",
              file=sys.stderr)
    machine = {"cpus": os.cpu_count(), "affinity": sorted(os.sched_getaffinity(0)),
               "wirehub_hot_path": sorted(WIREHUB_HOT_PATHS),
               "server_cores": sorted(cores[0] or []), "client_cores": sorted(cores[1] or []),
               "platform": platform.platform(), "python": platform.python_version()}
    report = {"machine": machine, "options": {k: str(v) for k, v in vars(opts).items()},
              "scenarios": table,
              "ratios": {sc: {n: e["ratio"] for n, e in per.items() if e.get("ratio")}
                         for sc, per in table.items()}}
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {opts.out}", file=sys.stderr)
    if opts.write_baseline:
        # Merge per scenario, so a --scenario run refreshes only its own entries.
        ratios = (json.loads(opts.write_baseline.read_text())["ratios"]
                  if opts.write_baseline.exists() else {})
        ratios.update(report["ratios"])
        opts.write_baseline.write_text(json.dumps(
            {"machine": machine, "ratios": ratios}, indent=2) + "\n")
    if opts.check:
        failures = check(table, opts.check, opts.tolerance)
        for f in failures:
            print(f"REGRESSION {f}", file=sys.stderr)
        return 1 if failures else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
