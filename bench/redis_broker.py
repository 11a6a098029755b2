"""Shared broker: what do Redis and ``--workers`` cost per delivery?

``wirehub serve --broker redis://...`` sends each publication through Redis
(one Lua script per publication, pipelined) and gets it back on the pub/sub
channel the gateway SUBSCRIBEd once, then fans it out locally; with
``--workers N`` the serve process is a supervisor that starts N such
gateways on one port (SO_REUSEPORT), each getting from Redis every
publication of a channel it has subscribers to. Server variants:

* ``memory``: ``wirehub serve`` on the in-memory broker (no ``--broker``),
  the reference of every ratio;
* ``redis``: the same with ``--broker`` on a private ``redis-server``;
* ``redis-2w``: the same with ``--workers 2`` (on ``window-1k`` and
  ``channels-100`` only); compared with ``redis`` as well;
* ``redis-unix``, ``redis-unix-2w``: ``redis`` and ``redis-2w`` through
  Redis's unix socket (``unix://...``; on ``channels-100`` only), compared
  with ``redis`` and ``redis-unix``: what loopback TCP costs each side;
* ``redis-2s``: ``redis`` with the channels spread over two redis-servers
  (``--broker URL1,URL2``, broker/shards.py; on ``channels-100`` only),
  compared with ``redis``: how the Redis work divides between shards.

Loads (``tools.loadgen fanout``, 64-byte publications):

* ``window-1k``: 1 publisher, 32 publications in flight -> 1,000 subscribers;
* ``rate-1k``: 1,000 publications/s -> 1,000 subscribers;
* ``channels-100``: 10 publishers, 32 in flight each, over 100 channels of
  10 subscribers (1,000 subscribers).

Reported, as medians over the rounds that lost nothing and had no errors:
deliveries/s, the gateway's CPU share (both workers' for ``redis-2w``),
deliveries per gateway CPU-second and CPU per publication, redis-server's
CPU share and CPU per publication, deliveries per (gateway + redis-server)
CPU-second, p99 publish-to-receive latency, and medians of the per-round
ratios to ``memory`` (and of ``redis-2w`` to ``redis``); a run that lost
anything or had errors is printed as it happens, with the gateway's log,
and makes the exit status 1:

    python bench/redis_broker.py                         # 3 rounds, ~3 min
    python bench/redis_broker.py --repeat 5              # docs/benchmarks.md, ~5 min
    python bench/redis_broker.py --load channels-100 --variant redis --variant redis-2w

The gateway (all its workers) and redis-server share one core, the load
generator has the other (as run_e2e.py); Redis is started here (``--save ""
--appendonly no``, in a temporary directory, ``FLUSHALL`` before every run)
and stopped at the end. Every CPU figure is taken over the loadgen's
measured window by the loadgen itself: it runs here with its server probe
(``tools.loadgen.server_cpu``, /proc/PID/task/*/schedstat every 10 ms)
replaced by one that reads several processes (``GroupProbe``): the gateway,
or each worker (found as the supervisor's children in /proc/*/stat), summed;
redis-server; and the supervisor, reported apart. See docs/benchmarks.md,
"Shared broker (Redis)".
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from run_e2e import (
    ROOT,
    WIREHUB_HOT_PATHS,
    Running,
    free_port,
    hot_path,
    servers,
    split_cores,
)

sys.path.insert(0, str(ROOT))
from tools.loadgen.server_cpu import ServerCpuProbe

LOADS = {
    "window-1k": ["--subscribers", "1000", "--window", "32"],
    "rate-1k": ["--subscribers", "1000", "--rate", "1000"],
    "channels-100": ["--channels", "100", "--publishers", "10", "--subscribers", "1000",
                     "--window", "32"],
}
REFERENCE = "memory"
# Server variants: (extra serve options, workers, the loads they run (None: all)).
VARIANTS: dict[str, tuple[list[str], int, tuple[str, ...] | None]] = {
    REFERENCE: ([], 1, None),
    "redis": (["--broker", "{redis}"], 1, None),
    "redis-2w": (["--broker", "{redis}", "--workers", "2"], 2, ("window-1k", "channels-100")),
    # The same Redis through its unix socket: no loopback TCP on either side.
    "redis-unix": (["--broker", "{redis_unix}"], 1, ("channels-100",)),
    "redis-unix-2w": (["--broker", "{redis_unix}", "--workers", "2"], 2, ("channels-100",)),
    # Two Redis servers, each channel on one of them.
    "redis-2s": (["--broker", "{redis_shards}"], 1, ("channels-100",)),
}
# Variants also compared with another one, round by round.
COMPARE = {"redis-2w": "redis", "redis-unix": "redis", "redis-unix-2w": "redis-unix", "redis-2s": "redis"}
# Figures whose ratio to the reference is reported.
RATIOS = ("deliveries_per_s", "gateway_cpu_percent", "deliveries_per_gateway_cpu_s",
          "deliveries_per_total_cpu_s", "p99_ms")
# The processes GroupProbe reads, by group: {"gateway": [pid, ...], "redis": [pid], ...}.
CPU_GROUPS_ENV = "WIREHUB_BENCH_CPU_GROUPS"


class GroupProbe:
    """``ServerCpuProbe`` for several processes in groups (``CPU_GROUPS_ENV``):
    ``result`` is the ``gateway`` group's sum, the loadgen's ``server``
    figures, with every group's in ``groups`` and every process's in ``pids``."""

    def __init__(self, pid: int) -> None:
        groups: dict[str, list[int]] = json.loads(os.environ[CPU_GROUPS_ENV])
        self.pid = pid
        self.probes = {name: [ServerCpuProbe(p) for p in pids] for name, pids in groups.items()}

    def start(self) -> None:
        for probes in self.probes.values():
            for probe in probes:
                probe.start()

    def stop(self) -> None:
        for probes in self.probes.values():
            for probe in probes:
                probe.stop()

    def result(self, start_ns: int, end_ns: int) -> dict[str, object]:
        groups: dict[str, dict[str, Any]] = {}
        pids: dict[str, Any] = {}
        for name, probes in self.probes.items():
            parts = [probe.result(start_ns, end_ns) for probe in probes]
            pids.update({str(part["pid"]): part.get("cpu_s", part.get("error")) for part in parts})
            errors = [str(part["error"]) for part in parts if "error" in part]
            groups[name] = ({"error": "; ".join(errors)} if errors else
                            {"cpu_s": round(sum(float(p["cpu_s"]) for p in parts), 3),  # type: ignore[arg-type]
                             "cpu_percent": round(sum(float(p["cpu_percent"]) for p in parts), 1)})  # type: ignore[arg-type]
        return {"pid": self.pid, **groups["gateway"], "groups": groups, "pids": pids}


def loadgen_main(argv: list[str]) -> int:
    """``python -m tools.loadgen`` with ``GroupProbe`` as its server probe."""
    import tools.loadgen.runner
    from tools.loadgen.cli import main

    tools.loadgen.runner.ServerCpuProbe = GroupProbe  # type: ignore[misc,assignment]
    return main(argv)


def run_loadgen(args: list[str], groups: dict[str, list[int]], cores: set[int] | None,
                timeout_s: float) -> dict[str, Any]:
    """The loadgen's result, its server CPU read by ``GroupProbe`` over ``groups``."""
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import redis_broker; "
            f"sys.exit(redis_broker.loadgen_main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", code, *args, "--server-pid", str(groups["gateway"][0])],
                          cwd=ROOT, capture_output=True, text=True, check=False, timeout=timeout_s,
                          env=dict(os.environ, **{CPU_GROUPS_ENV: json.dumps(groups)}),
                          preexec_fn=(lambda: os.sched_setaffinity(0, cores)) if cores else None)
    try:
        return json.loads(proc.stdout)
    except ValueError:
        raise RuntimeError(f"loadgen failed ({proc.returncode}): {proc.stderr.strip()[-400:]}") from None


def variants(shards: list[RedisServer]) -> dict[str, tuple[list[str], int, tuple[str, ...] | None]]:
    """Gateway commands by name: the same ``serve`` options, broker and workers aside."""
    serve = next(s for s in servers(sys.executable) if s.name == "wirehub").commands["broadcast"]
    urls = {"{redis}": shards[0].url, "{redis_unix}": shards[0].unix_url,
            "{redis_shards}": ",".join(shard.url for shard in shards)}
    return {name: (serve + [urls.get(part, part) for part in extra], workers, loads)
            for name, (extra, workers, loads) in VARIANTS.items()}


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc/*/stat)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat[stat.rindex(b")") + 2:].split()[1]) == pid:
                out.append(int(entry))
    return sorted(out)


def listeners(port: int) -> int:
    """Sockets listening on TCP ``port`` (one per worker with SO_REUSEPORT)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table, encoding="ascii") as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                count += 1
    return count


class Gateway:
    """``wirehub serve`` on a free port, pinned to ``cores``, its log in a file:
    with ``workers`` > 1, started once every worker listens; ``pids`` are the
    processes that serve (the workers, or the gateway itself)."""

    def __init__(self, command: list[str], workers: int, cores: set[int] | None) -> None:
        self.port = free_port()
        # (closed by run_once, or below if the gateway does not start)
        self.log = tempfile.NamedTemporaryFile(prefix="wirehub-bench-gateway-", suffix=".log")  # noqa: SIM115
        argv = [part.replace("{port}", str(self.port)) for part in command]
        # (this process runs no threads: preexec_fn is safe)
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=self.log,
            preexec_fn=(lambda: os.sched_setaffinity(0, cores)) if cores else None)  # noqa: PLW1509
        self.pids = [self.proc.pid]
        deadline = time.monotonic() + 30
        while listeners(self.port) < workers or (workers > 1 and len(children(self.proc.pid)) < workers):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                log = self.tail()
                self.log.close()
                raise RuntimeError(f"{argv[:3]} did not start: {log}")
            time.sleep(0.05)
        if workers > 1:
            self.pids = children(self.proc.pid)
        time.sleep(0.2)
        WIREHUB_HOT_PATHS.add(hot_path(self.port))

    def tail(self, lines: int = 20) -> str:
        with open(self.log.name, encoding="utf-8", errors="replace") as f:
            return "".join(f.readlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM (the supervisor passes it on), and wait until every worker is gone."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        deadline = time.monotonic() + 15
        for pid in self.pids:
            while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
                time.sleep(0.05)
            if os.path.exists(f"/proc/{pid}"):
                os.kill(pid, signal.SIGKILL)


class RedisServer:
    """A private redis-server on a free port, pinned to ``cores``, in a temporary directory."""

    def __init__(self, cores: set[int] | None) -> None:
        exe = shutil.which("redis-server")
        if exe is None or shutil.which("redis-cli") is None:
            raise RuntimeError("redis-server / redis-cli not found on PATH")
        self.dir = tempfile.mkdtemp(prefix="wirehub-bench-redis-")
        try:
            self.running = Running([exe, "--port", "{port}", "--bind", "127.0.0.1", "--save", "",
                                    "--appendonly", "no", "--dir", self.dir,
                                    "--unixsocket", f"{self.dir}/redis.sock", "--unixsocketperm", "700"], cores)
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise
        self.port = self.running.port
        self.pid = self.running.proc.pid
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.unix_url = f"unix://{self.dir}/redis.sock?db=0"

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


def run_once(command: list[str], workers: int, args: list[str], redis: list[RedisServer], uses_redis: bool,
             cores: tuple[set[int] | None, set[int] | None], opts: argparse.Namespace
             ) -> tuple[dict[str, float], dict[str, Any], str]:
    """One loadgen run against a fresh gateway: its figures, the loadgen's result, the
    gateway's log. ``redis``: the redis-servers it uses (their CPU and counters summed)."""
    server_cores, client_cores = cores
    for shard in redis:
        shard.cli("FLUSHALL")
    gateway = Gateway(command, workers, server_cores)
    try:
        groups = {"gateway": gateway.pids, "redis": [shard.pid for shard in redis]}
        if workers > 1:
            groups["supervisor"] = [gateway.proc.pid]
        stats_before = [shard.stats() for shard in redis]
        result = run_loadgen(
            ["fanout", *args, "--url", f"ws://127.0.0.1:{gateway.port}/ws", "--json",
             "--no-progress", "--duration", str(opts.duration), "--warmup", "1"],
            groups, client_cores, timeout_s=600)
        stats_after = [shard.stats() for shard in redis]
    finally:
        gateway.stop()
        log = gateway.tail()
        gateway.log.close()
    server = result.get("server") or {}
    cpu = server.get("groups", {})
    if any("cpu_s" not in cpu.get(name, {}) for name in groups):
        raise RuntimeError(f"the loadgen measured no CPU for some of {groups}: {server}")
    delivered = result["throughput"]["deliveries_per_s"]
    published_per_s = result["throughput"]["published_per_s"]
    published = result["delivery"]["published"]          # over the whole run, warm-up included
    gateway_cpu = cpu["gateway"]["cpu_percent"]
    redis_cpu = cpu["redis"]["cpu_percent"] if uses_redis else 0.0
    total_cpu = gateway_cpu + redis_cpu
    stat = {k: sum(after.get(k, 0) - before.get(k, 0) for before, after in zip(stats_before, stats_after, strict=True))
            for k in ("total_net_input_bytes", "total_net_output_bytes", "total_commands_processed")}
    row = {
        "deliveries_per_s": delivered,
        "published_per_s": published_per_s,
        "gateway_cpu_percent": gateway_cpu,
        "deliveries_per_gateway_cpu_s": delivered / (gateway_cpu / 100) if gateway_cpu else 0.0,
        "gateway_cpu_us_per_publication": 1e4 * gateway_cpu / published_per_s if published_per_s else 0.0,
        "redis_cpu_percent": redis_cpu,
        "deliveries_per_total_cpu_s": delivered / (total_cpu / 100) if total_cpu else 0.0,
        "redis_cpu_us_per_publication": 1e4 * redis_cpu / published_per_s if published_per_s else 0.0,
        # The memory runs leave Redis idle: its share then is the noise under the figures above.
        "redis_idle_cpu_percent": 0.0 if uses_redis else cpu["redis"]["cpu_percent"],
        "supervisor_cpu_percent": cpu.get("supervisor", {}).get("cpu_percent", 0.0),
        # The busiest worker's share of the gateway's CPU (0.5: even).
        "busiest_worker_share": (max(float(s) for s in (server["pids"][str(p)] for p in gateway.pids))
                                 / cpu["gateway"]["cpu_s"] if workers > 1 and cpu["gateway"]["cpu_s"] else 1.0),
        # The busiest redis-server's share of Redis's CPU (with two shards, 0.5: even).
        "busiest_redis_share": (max(float(server["pids"][str(shard.pid)]) for shard in redis)
                                / cpu["redis"]["cpu_s"] if len(redis) > 1 and cpu["redis"]["cpu_s"] else 1.0),
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
    return row, result, log


def measure(opts: argparse.Namespace) -> tuple[dict[str, dict[str, dict[str, Any]]], list[str]]:
    """The table of medians, and a line per run that lost something or had errors."""
    cores = split_cores()
    loads = {name: LOADS[name] for name in opts.load or LOADS}
    problems: list[str] = []
    shards: list[RedisServer] = []
    try:
        shards += [RedisServer(cores[0]), RedisServer(cores[0])]  # the second for redis-2s only
        version = shards[0].cli("INFO", "server").split("redis_version:", 1)[1].split()[0]
        print(f"redis-server {version} pids {shards[0].pid}, {shards[1].pid} ports {shards[0].port}, "
              f"{shards[1].port}, gateway (all workers) and redis on core(s) {sorted(cores[0] or [])}, "
              f"loadgen on {sorted(cores[1] or [])}", file=sys.stderr, flush=True)
        commands = {name: spec for name, spec in variants(shards).items()
                    if name == REFERENCE or not opts.variant or name in opts.variant}
        runs: dict[str, dict[str, list[dict[str, float]]]] = {
            load: {name: [] for name, (_, _, only) in commands.items() if only is None or load in only}
            for load in loads}
        for r in range(opts.repeat):
            for load, args in loads.items():
                for name in runs[load]:
                    command, workers, _ = commands[name]
                    used = shards if "{redis_shards}" in VARIANTS[name][0] else shards[:1]
                    row, result, log = run_once(command, workers, args, used, name != REFERENCE, cores, opts)
                    runs[load][name].append(row)
                    print(f"round {r + 1}/{opts.repeat} {load} {name}: {row['deliveries_per_s']:,.0f}/s, "
                          f"gateway {row['gateway_cpu_percent']:.0f} %"
                          + (f" (busiest worker {100 * row['busiest_worker_share']:.0f} %, supervisor "
                             f"{row['supervisor_cpu_percent']:.1f} %)" if workers > 1 else "")
                          + f", redis {row['redis_cpu_percent']:.0f} % ({row['redis_cpu_us_per_publication']:.1f}"
                          f" us/pub" + (f", busiest shard {100 * row['busiest_redis_share']:.0f} %"
                                        if len(used) > 1 else "")
                          + f"), p99 {row['p99_ms']:.2f} ms, loadgen {row['client_cpu_percent']:.0f} %, "
                          f"lost {row['lost']:.0f}, errors {row['errors']:.0f}",
                          file=sys.stderr, flush=True)
                    if row["lost"] or row["errors"]:
                        d = result["delivery"]
                        problem = (f"round {r + 1} {load} {name}: missing {d['missing']}, duplicates "
                                   f"{d['duplicates']}, out of order {d['out_of_order']}, "
                                   f"subscribers with anomalies {d['subscribers_with_anomalies']}, "
                                   f"errors {result['errors']}, samples {result.get('error_samples')}, "
                                   f"worst {d['worst_subscribers'][:3]}; gateway log (end):\n{log}")
                        problems.append(problem)
                        print(f"!!! LOST OR ERRORS: {problem}", file=sys.stderr, flush=True)
    finally:
        for shard in shards:
            shard.stop()
    return summarize(runs), problems


def pair_ratios(rounds: list[dict[str, float]], others: list[dict[str, float]],
                metrics: tuple[str, ...]) -> dict[str, list[float]]:
    """Per-round ratios ``rounds / others`` of ``metrics`` over the rounds where both were clean."""
    pairs = [(run, ref) for run, ref in zip(rounds, others, strict=True)
             if not (run["lost"] or run["errors"] or ref["lost"] or ref["errors"])]
    return {m: [run[m] / ref[m] if ref[m] else 0.0 for run, ref in pairs] for m in metrics}


def summarize(runs: dict[str, dict[str, list[dict[str, float]]]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Medians per load and variant over the rounds that lost nothing and had
    no errors (``ok`` of ``rounds``; ``lost`` and ``errors`` sum them all), and
    the medians of the per-round ratios to the reference (and, in ``vs``, to
    the variant of ``COMPARE``, with every round's ratio) over the rounds where
    both were clean. A variant with no clean round has only its counts."""
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for load, by_name in runs.items():
        table[load] = {}
        for name, rounds in by_name.items():
            good = [run for run in rounds if not (run["lost"] or run["errors"])]
            row: dict[str, Any] = {}
            if good:
                row = {m: statistics.median(run[m] for run in good) for m in good[0]
                       if m not in ("lost", "errors")}
                for m, values in pair_ratios(rounds, by_name[REFERENCE], RATIOS).items():
                    row[f"{m}_ratio"] = statistics.median(values) if values else 0.0
                other = COMPARE.get(name)
                if other in by_name:
                    per_round = pair_ratios(rounds, by_name[other], RATIOS)
                    row["vs"] = {"variant": other, "rounds": per_round,
                                 **{m: statistics.median(v) if v else 0.0 for m, v in per_round.items()}}
            row.update(ok=len(good), rounds=len(rounds), lost=sum(run["lost"] for run in rounds),
                       errors=sum(run["errors"] for run in rounds), runs=rounds)
            table[load][name] = row
    return table


def print_table(table: dict[str, dict[str, dict[str, Any]]], opts: argparse.Namespace) -> None:
    print(f"medians of the clean rounds (ok) of {opts.repeat}, {opts.duration:g} s each; wirehub's "
          f"{', '.join(sorted(WIREHUB_HOT_PATHS))} hot path (from its /metrics); ratios to '{REFERENCE}' "
          f"of the same round; us/pub: CPU microseconds per publication:")
    print(f"{'load':<13} {'variant':<8} {'deliveries/s':>13} {'ratio':>6} {'gw CPU':>7} "
          f"{'per gw CPU-s':>13} {'ratio':>6} {'gw us/pub':>9} {'redis':>6} {'us/pub':>7} "
          f"{'per gw+redis CPU-s':>19} {'ratio':>6} {'p99 ms':>7} {'ratio':>6} {'ok':>4} {'lost':>9} {'err':>9}")
    for load, by_name in table.items():
        for name, row in by_name.items():
            counts = f"{row['ok']:>2}/{row['rounds']} {row['lost']:>9,.0f} {row['errors']:>9,.0f}"
            if not row["ok"]:
                print(f"{load:<13} {name:<8} {'(no clean round)':<128} {counts}")
                continue
            print(f"{load:<13} {name:<8} {row['deliveries_per_s']:>13,.0f} {row['deliveries_per_s_ratio']:>5.2f}x "
                  f"{row['gateway_cpu_percent']:>6.0f}% "
                  f"{row['deliveries_per_gateway_cpu_s']:>13,.0f} {row['deliveries_per_gateway_cpu_s_ratio']:>5.2f}x "
                  f"{row['gateway_cpu_us_per_publication']:>9.1f} {row['redis_cpu_percent']:>5.0f}% "
                  f"{row['redis_cpu_us_per_publication']:>7.1f} "
                  f"{row['deliveries_per_total_cpu_s']:>19,.0f} {row['deliveries_per_total_cpu_s_ratio']:>5.2f}x "
                  f"{row['p99_ms']:>7.2f} {row['p99_ms_ratio']:>5.2f}x {counts}")
    compared = [(load, name, row) for load, by_name in table.items() for name, row in by_name.items()
                if row.get("vs")]
    if compared:
        print("\nper-round ratios between variants (median; every clean pair of rounds):")
        for load, name, row in compared:
            vs = row["vs"]
            for m in ("deliveries_per_gateway_cpu_s", "deliveries_per_total_cpu_s", "deliveries_per_s"):
                rounds = " ".join(f"{v:.2f}" for v in vs["rounds"][m])
                print(f"  {load} {name}/{vs['variant']} {m}: {vs[m]:.2f}x  ({rounds})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds per run (default 5)")
    parser.add_argument("--load", action="append", choices=list(LOADS),
                        help="run only this load (repeatable; default: all)")
    parser.add_argument("--variant", action="append", choices=[v for v in VARIANTS if v != REFERENCE],
                        help=f"run only this server variant besides '{REFERENCE}', which always runs "
                             f"(repeatable; default: all)")
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
