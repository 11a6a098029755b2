"""File transfer: upload throughput against ``cp``, and what file traffic costs fan-out latency.

``wirehub serve`` runs in a subprocess on a core of its own, with
``--file-dir`` in a scratch directory (``--dir``, default a new one under
/tmp), ``--file-window 16``, ``--max-payload-bytes 2097152`` and the
inbound byte limit lifted (``--rate-limit-bytes-per-s 0``: the default
64 MiB/s per connection would cap an upload, and ``Client.upload`` paces
itself to 90 % of whatever ``file_ready`` announces). Everything else
(``cp``, the uploading client, the load generator) runs on the other core.
A test file of ``--size-mib`` random bytes is written to the scratch
directory first, on the same disk as the gateway's files.

**Copy part**, ``--repeat`` rounds, the kinds alternating order round by
round, each output deleted and ``sync`` run (untimed) before the next:

* ``cp``: ``cp SRC DST`` in the same directory: wall time (into the page cache);
* ``cp+fsync``: the same, then ``fsync`` of the copy and of its directory,
  which is what the gateway does once at the end of an upload;
* ``upload``: ``Client.upload(SRC, chunk_size=256 KiB)`` on a ``wirehub.Client``
  with its defaults (permessage-deflate agreed; chunks go uncompressed);
* ``upload-raw``: the same on a ``Client(..., compression=False)``.

An upload's time is ``Client.upload``'s, end to end: the client's SHA-256 of
the file, ``file_begin``, every chunk acknowledged once written, ``file_end``,
and the gateway's ``fsync`` and SHA-256 before ``file_done``; the
acknowledgements (``on_progress``) split it into those phases. Reported: MB/s
(10^6 bytes), the gateway's CPU seconds per GB (10^9 bytes; its process,
every thread, from /proc/<pid>/stat) and the bench process's (the client's)
likewise, and the gateway's read pauses (its connection stopped being read
because more than ``window`` chunks waited for the disk).

**Fan-out part**, ``--repeat`` rounds: the bundled load generator
(``python -m tools.loadgen fanout``, one process) publishes ``--rate``
timestamped 64-byte messages a second to one channel with ``--subscribers``
subscribers, for ``--duration`` seconds after ``--warmup``: ``alone``, with
nothing else running; ``+upload`` and ``+upload-raw``, while this process
uploads the test file back to back on another connection with the client of
that name above (each upload deleted once done); and two controls,
``+cpu(upload)`` and ``+cpu(upload-raw)``, where a thread of this process
burns the share of the client core that uploader used in its last run, with
no traffic at all: the loadgen shares its core with the uploader, and the
controls say how much of the latency comes from that rather than from the
gateway. Reported: the loadgen's p50/p99/p99.9 publish-to-receive latency
(from each message's intended send time), the gateway's, the loadgen's and
this process's CPU share, the upload rate meanwhile, and the p50 and p99
ratios to ``alone``, medians of the rounds' ratios::

    python bench/file_upload.py                          # 256 MiB, 5 rounds, ~4 min
    python bench/file_upload.py --size-mib 32 --repeat 1 --duration 3   # a smoke test
    python bench/file_upload.py --part copy --repeat 9 --json reports/file-upload.json
    python bench/file_upload.py --part fanout --subscribers 1000 --dir /var/tmp/wh-bench

See docs/benchmarks.md, "File transfer".
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import uvloop

from wirehub import Client

ROOT = Path(__file__).resolve().parent.parent
MB = 1e6
GB = 1e9
COPY_KINDS = ("cp", "cp+fsync", "upload", "upload-raw")
UPLOADERS = {"upload": True, "upload-raw": False}   # kind -> Client(compression=...)
FANOUT_KINDS = ("alone", "+upload", "+cpu(upload)", "+upload-raw", "+cpu(upload-raw)")
FANOUT_UPLOADER = {"+upload": "upload", "+upload-raw": "upload-raw"}
# Controls: the client CPU its uploader's last run used, burnt without any traffic.
FANOUT_CONTROL = {"+cpu(upload)": "+upload", "+cpu(upload-raw)": "+upload-raw"}


def server_cpu_s(pid: int) -> float:
    """utime + stime of a process, all its threads (live and exited) included."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def metric(port: int, name: str) -> float:
    """One unlabelled metric from the gateway's /metrics (0 when absent)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith((name + " ", name + "{")):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def hot_path(port: int) -> str:
    """Which hot path the running gateway uses (``wirehub_build_info`` on /metrics)."""
    prefix = 'wirehub_build_info{hot_path="'
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(prefix):
                return line[len(prefix):].split('"', 1)[0]
    return "?"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# -- the test file and cp --------------------------------------------------------------

def make_file(path: Path, size: int) -> None:
    block = 8 << 20
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(block, left)
            f.write(os.urandom(n))
            left -= n
        f.flush()
        os.fsync(f.fileno())


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def time_cp(src: Path, dst: Path, fsync: bool) -> float:
    t0 = time.perf_counter()
    subprocess.run(["cp", str(src), str(dst)], check=True)
    if fsync:
        fsync_path(dst)
        fsync_path(dst.parent)
    wall = time.perf_counter() - t0
    dst.unlink()
    return wall


def settle() -> None:
    """Between measurements: write back whatever the last one left dirty."""
    os.sync()
    time.sleep(0.2)


# -- uploads ---------------------------------------------------------------------------

def forget(file_dir: Path, file_id: str) -> None:
    for suffix in (".data", ".json", ".part", ".chunks"):
        (file_dir / (file_id + suffix)).unlink(missing_ok=True)


async def upload_once(client: Client, src: Path, opts: argparse.Namespace, file_dir: Path) -> dict[str, Any]:
    """One upload; when its first and last chunk were acknowledged (perf_counter)."""
    acks: list[float] = []

    def progress(acked: int, total: int) -> None:
        now = time.perf_counter()
        if not acks:
            acks.append(now)
        if acked == total:
            acks.append(now)

    result = await asyncio.wait_for(client.upload(src, name="bench.bin", chunk_size=opts.chunk_kib * 1024,
                                                  on_progress=progress), timeout=opts.upload_timeout)
    forget(file_dir, result.file_id)
    expected = -(-result.size // (opts.chunk_kib * 1024))
    if result.attempts != 1 or result.chunks_sent != expected:
        log(f"  note: {result.attempts} attempts, {result.chunks_sent} chunks sent for {expected}")
    return {"attempts": result.attempts, "chunks_sent": result.chunks_sent, "first_ack": acks[0],
            "last_ack": acks[-1]}


async def measure_upload(client: Client, src: Path, size: int, opts: argparse.Namespace, file_dir: Path,
                         pid: int, port: int) -> dict[str, Any]:
    pauses0 = metric(port, "wirehub_file_read_pauses_total")
    cpu0, own0, t0 = server_cpu_s(pid), time.process_time(), time.perf_counter()
    extra = await upload_once(client, src, opts, file_dir)
    end = time.perf_counter()
    wall = end - t0
    cpu, own = server_cpu_s(pid) - cpu0, time.process_time() - own0
    first, last = extra.pop("first_ack"), extra.pop("last_ack")
    # The phases: the client's SHA-256, file_begin and the first chunk; the
    # chunks streaming (first ack to last); file_end (the gateway's fsync and SHA-256).
    return {"wall_s": wall, "mb_per_s": size / wall / MB, "gateway_cpu_s_per_gb": cpu / size * GB,
            "client_cpu_s_per_gb": own / size * GB, "to_first_ack_s": first - t0,
            "stream_mb_per_s": size / (last - first) / MB if last > first else 0.0, "end_s": end - last,
            "read_pauses": metric(port, "wirehub_file_read_pauses_total") - pauses0, **extra}


# -- fan-out under file traffic ----------------------------------------------------------

def burn(src: Path, share: float, stop: threading.Event) -> None:
    """Use ``share`` of a core's CPU time (hashing 64 KiB blocks) until ``stop``:
    the uploader's client CPU without its traffic. It chases its CPU time, not
    the wall clock, so that time it waits for the core is not counted as
    used; it never runs more than 10 ms behind."""
    with open(src, "rb") as f:
        data = f.read(64 * 1024)
    t0, c0 = time.perf_counter(), time.thread_time()
    while not stop.is_set():
        ahead = (time.thread_time() - c0) / share - (time.perf_counter() - t0)
        if ahead > 0:
            time.sleep(min(ahead, 0.01))
        elif ahead < -0.01:
            c0 += (-ahead - 0.01) * share   # forgive what is beyond 10 ms behind
        else:
            hashlib.sha256(data)


async def fanout_run(opts: argparse.Namespace, port: int, pid: int, client_cores: set[int] | None,
                     uploader: Client | None, src: Path, size: int, file_dir: Path,
                     burn_share: float = 0.0) -> dict[str, Any]:
    """One loadgen run; with ``uploader``, uploads back to back until it ends;
    with ``burn_share``, a thread keeps that share of the client core busy."""
    cmd = [sys.executable, "-m", "tools.loadgen", "fanout", "--url", f"ws://127.0.0.1:{port}/ws",
           "--subscribers", str(opts.subscribers), "--rate", str(opts.rate), "--size", "64",
           "--duration", str(opts.duration), "--warmup", str(opts.warmup), "--procs", "1",
           "--server-pid", str(pid), "--json", "--no-progress", "--max-errors", "1000000000"]
    # Pinned by taskset rather than a preexec_fn: this process has threads by now.
    pin = ["taskset", "-c", ",".join(map(str, sorted(client_cores)))] if client_cores else []
    proc = await asyncio.create_subprocess_exec(
        *pin, *cmd, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    finished = asyncio.ensure_future(proc.communicate())
    uploads, t0, own0 = 0, time.perf_counter(), time.process_time()
    stop = threading.Event()
    burner = threading.Thread(target=burn, args=(src, burn_share, stop), daemon=True) if burn_share else None
    if burner is not None:
        burner.start()
    if uploader is not None:
        while not finished.done():
            await upload_once(uploader, src, opts, file_dir)
            uploads += 1
    out, err = await finished
    stop.set()
    if burner is not None:
        burner.join()
    wall, own = time.perf_counter() - t0, time.process_time() - own0
    try:
        report = json.loads(out)
    except ValueError:
        raise RuntimeError(f"loadgen failed ({proc.returncode}): {err.decode().strip()[-400:]}") from None
    lat = report["latency_us"]
    delivery = report["delivery"]
    return {"p50_ms": lat["p50"] / 1e3, "p99_ms": lat["p99"] / 1e3, "p999_ms": lat["p99.9"] / 1e3,
            "max_ms": lat["max"] / 1e3,
            "deliveries_per_s": report["throughput"]["deliveries_per_s"],
            "gateway_cpu_percent": report.get("server", {}).get("cpu_percent", 0.0),
            "loadgen_cpu_percent": max(p["cpu_percent"] for p in report["client"]["processes"]),
            "loadgen_saturated": report["client"]["saturated"],
            "loadgen_timer_lag_ms": report["client"].get("timer_lag_s", 0.0) * 1e3,
            "lost": delivery["missing"] + delivery["duplicates"] + delivery["out_of_order"],
            "errors": report["error_count"],
            "uploads": uploads, "upload_mb_per_s": uploads * size / wall / MB if uploads else 0.0,
            "bench_cpu_percent": own / wall * 100}


# -- the run ---------------------------------------------------------------------------

async def measure(opts: argparse.Namespace, port: int, pid: int, client_cores: set[int] | None,
                  work: Path, src: Path, size: int) -> dict[str, dict[str, list[dict[str, Any]]]]:
    file_dir = work / "files"
    clients = {kind: Client(f"ws://127.0.0.1:{port}/ws", compression=comp) for kind, comp in UPLOADERS.items()}
    for client in clients.values():
        await client.start()
    copy: dict[str, list[dict[str, Any]]] = {kind: [] for kind in COPY_KINDS}
    fanout: dict[str, list[dict[str, Any]]] = {kind: [] for kind in FANOUT_KINDS}
    try:
        for r in range(opts.repeat):
            if "copy" in opts.part:
                order = COPY_KINDS if r % 2 == 0 else tuple(reversed(COPY_KINDS))
                for kind in order:
                    if kind in UPLOADERS:
                        row = await measure_upload(clients[kind], src, size, opts, file_dir, pid, port)
                        log(f"round {r + 1}/{opts.repeat} {kind}: {row['mb_per_s']:,.0f} MB/s "
                            f"({row['wall_s']:.2f} s), gateway {row['gateway_cpu_s_per_gb']:.2f} CPU-s/GB, "
                            f"client {row['client_cpu_s_per_gb']:.2f} CPU-s/GB, "
                            f"{row['read_pauses']:.0f} read pauses")
                    else:
                        wall = time_cp(src, work / "copy.bin", fsync=kind == "cp+fsync")
                        row = {"wall_s": wall, "mb_per_s": size / wall / MB}
                        log(f"round {r + 1}/{opts.repeat} {kind}: {row['mb_per_s']:,.0f} MB/s ({wall:.2f} s)")
                    copy[kind].append(row)
                    settle()
            if "fanout" in opts.part:
                order = FANOUT_KINDS if r % 2 == 0 else tuple(reversed(FANOUT_KINDS))
                for kind in order:
                    uploader = clients[FANOUT_UPLOADER[kind]] if kind in FANOUT_UPLOADER else None
                    share = 0.0
                    if kind in FANOUT_CONTROL:
                        if not fanout[FANOUT_CONTROL[kind]]:
                            continue   # its uploader has not run yet (a --repeat 1 in reverse order)
                        share = min(1.0, fanout[FANOUT_CONTROL[kind]][-1]["bench_cpu_percent"] / 100)
                    row = await fanout_run(opts, port, pid, client_cores, uploader, src, size, file_dir, share)
                    log(f"round {r + 1}/{opts.repeat} fan-out {kind}: p50 {row['p50_ms']:.2f} ms, "
                        f"p99 {row['p99_ms']:.2f} ms, p99.9 {row['p999_ms']:.2f} ms, gateway "
                        f"{row['gateway_cpu_percent']:.0f} % CPU, loadgen {row['loadgen_cpu_percent']:.0f} %, "
                        f"bench process {row['bench_cpu_percent']:.0f} %"
                        + (f" (target {share * 100:.0f} %)" if share else "")
                        + (f", {row['uploads']} uploads at {row['upload_mb_per_s']:,.0f} MB/s" if uploader else "")
                        + (f", {row['lost']} lost" if row["lost"] else "")
                        + (f", {row['errors']} errors" if row["errors"] else ""))
                    fanout[kind].append(row)
                    settle()
    finally:
        for client in clients.values():
            await client.close()
    return {"copy": copy, "fanout": fanout}


def medians(rows: list[dict[str, Any]]) -> dict[str, float]:
    keys = [k for k, v in rows[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return {k: statistics.median(row[k] for row in rows) for k in keys}


def ratio(a: list[dict[str, Any]], b: list[dict[str, Any]], key: str) -> float:
    """Median of the rounds' ratios a/b."""
    return statistics.median(x[key] / y[key] for x, y in zip(a, b, strict=True))


def report(runs: dict[str, dict[str, list[dict[str, Any]]]], opts: argparse.Namespace, size: int,
           work: Path, pinned: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    where = "gateway on one core, clients on the other" if pinned else "unpinned"
    if runs["copy"]["cp"]:
        copy = {kind: medians(rows) for kind, rows in runs["copy"].items()}
        base = runs["copy"]["cp+fsync"]
        print(f"copy: {size / (1 << 20):g} MiB of random bytes in {work} (same disk), "
              f"{opts.chunk_kib} KiB chunks, window {opts.window}, medians of {opts.repeat} rounds, {where}:")
        print(f"{'kind':<11} {'MB/s':>8} {'wall s':>7} {'x cp+fsync':>10} {'gateway CPU-s/GB':>17} "
              f"{'client CPU-s/GB':>16} {'to 1st ack s':>12} {'stream MB/s':>11} {'end s':>6} "
              f"{'read pauses':>11}")
        for kind, row in copy.items():
            row["vs_cp_fsync"] = ratio(runs["copy"][kind], base, "mb_per_s")
            more = (f"{row['gateway_cpu_s_per_gb']:>17.2f} {row['client_cpu_s_per_gb']:>16.2f} "
                    f"{row['to_first_ack_s']:>12.2f} {row['stream_mb_per_s']:>11,.0f} {row['end_s']:>6.2f} "
                    f"{row['read_pauses']:>11.0f}" if kind in UPLOADERS else "")
            print(f"{kind:<11} {row['mb_per_s']:>8,.0f} {row['wall_s']:>7.2f} {row['vs_cp_fsync']:>9.2f}x {more}")
        print("(an upload's phases: to 1st ack: the client's SHA-256, file_begin, the first chunk; stream: "
              "first to last ack; end: file_end, the gateway's fsync and SHA-256)")
        out["copy"] = copy
    if runs["fanout"]["alone"]:
        fan = {kind: medians(rows) for kind, rows in runs["fanout"].items() if rows}
        base = runs["fanout"]["alone"]
        print(f"fan-out: {opts.rate:,.0f} publications/s of 64 B to {opts.subscribers} subscribers, "
              f"{opts.duration:g} s runs, medians of {opts.repeat} rounds (ratios: medians of the rounds' "
              f"ratios to 'alone'):")
        print(f"{'kind':<17} {'p50 ms':>7} {'p99 ms':>7} {'p99.9 ms':>8} {'p50 x':>6} {'p99 x':>6} "
              f"{'gateway CPU':>11} {'loadgen CPU':>11} {'bench CPU':>9} {'upload MB/s':>11} {'lost':>5}")
        for kind, row in fan.items():
            row["p50_ratio"] = ratio(runs["fanout"][kind], base, "p50_ms")
            row["p99_ratio"] = ratio(runs["fanout"][kind], base, "p99_ms")
            up = f"{row['upload_mb_per_s']:>11,.0f}" if kind in FANOUT_UPLOADER else f"{'':>11}"
            print(f"{kind:<17} {row['p50_ms']:>7.2f} {row['p99_ms']:>7.2f} {row['p999_ms']:>8.2f} "
                  f"{row['p50_ratio']:>5.2f}x {row['p99_ratio']:>5.2f}x {row['gateway_cpu_percent']:>10.0f}% "
                  f"{row['loadgen_cpu_percent']:>10.0f}% {row['bench_cpu_percent']:>8.0f}% {up} "
                  f"{sum(r['lost'] for r in runs['fanout'][kind]):>5}")
        print("(bench CPU: this process's, the uploader's or, in the +cpu(...) controls, a thread burning the "
              "share its uploader used in its last run, with no traffic: what the shared client core costs)")
        out["fanout"] = fan
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=float, default=256, help="test file size in MiB (default 256)")
    parser.add_argument("--chunk-kib", type=int, default=256, help="upload chunk size in KiB (default 256)")
    parser.add_argument("--window", type=int, default=16, help="the gateway's --file-window (default 16)")
    parser.add_argument("--repeat", type=int, default=5, help="rounds (default 5)")
    parser.add_argument("--part", action="append", choices=("copy", "fanout"),
                        help="run only this part (repeatable; default both)")
    parser.add_argument("--dir", type=Path, help="scratch directory for the test file, the copies and the "
                        "gateway's --file-dir (default: a new one under /tmp, deleted afterwards)")
    parser.add_argument("--subscribers", type=int, default=100, help="fan-out subscribers (default 100)")
    parser.add_argument("--rate", type=float, default=1000, help="fan-out publications/s (default 1000)")
    parser.add_argument("--duration", type=float, default=5, help="measured seconds per fan-out run (default 5)")
    parser.add_argument("--warmup", type=float, default=1, help="fan-out warm-up seconds (default 1)")
    parser.add_argument("--upload-timeout", type=float, default=600, help="seconds one upload may take "
                        "(default 600)")
    parser.add_argument("--json", metavar="FILE", help="also write every round and the medians here")
    opts = parser.parse_args(argv)
    opts.part = opts.part or ["copy", "fanout"]
    size = int(opts.size_mib * (1 << 20))
    cores = sorted(os.sched_getaffinity(0))
    server_cores, client_cores = ({cores[-1]}, set(cores[:-1])) if len(cores) > 1 else (None, None)
    work = opts.dir if opts.dir else Path(tempfile.mkdtemp(prefix="wirehub-file-bench-", dir="/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    src = work / "source.bin"
    log(f"writing {size:,} random bytes to {src}")
    make_file(src, size)
    t0 = time.perf_counter()
    with open(src, "rb") as f:
        hashlib.file_digest(f, "sha256")
    hash_s = time.perf_counter() - t0
    log(f"SHA-256 of the file in this process (what Client.upload does first): {hash_s:.2f} s, "
        f"{size / hash_s / MB:,.0f} MB/s")
    port = free_port()
    server_log = open(work / "gateway.log", "w+")  # noqa: SIM115 (closed in the finally below)
    cmd = [sys.executable, "-m", "wirehub", "serve", "--port", str(port), "--file-dir", str(work / "files"),
           "--file-window", str(opts.window), "--max-payload-bytes", "2097152", "--file-quota-bytes", "0",
           "--rate-limit-bytes-per-s", "0", "--rate-limit-burst-bytes", str(1 << 40),
           "--rate-limit-messages-per-s", "0",
           "--max-connections-per-ip", "0", "--new-connections-per-ip-per-s", "0"]
    # Pinned before it starts, so that its writer threads inherit the core.
    pin = ["taskset", "-c", ",".join(map(str, sorted(server_cores)))] if server_cores else []
    server = subprocess.Popen(pin + cmd, stdout=subprocess.DEVNULL, stderr=server_log)
    try:
        deadline = time.monotonic() + 15
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if server.poll() is not None or time.monotonic() > deadline:
                server_log.seek(0)
                raise RuntimeError(f"wirehub serve did not start: {server_log.read()[-600:]}")
            time.sleep(0.05)
        path = hot_path(port)
        log(f"wirehub serve (pid {server.pid}, {path} hot path) on port {port}, "
            f"core {sorted(server_cores) if server_cores else 'any'}")
        if client_cores:
            os.sched_setaffinity(0, client_cores)
        runs = uvloop.run(measure(opts, port, server.pid, client_cores, work, src, size))
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        server_log.seek(0)
        complaints = [line.rstrip() for line in server_log
                      if ("ERROR" in line or "Traceback" in line or "WARNING" in line)
                      and "is OPEN" not in line]
        server_log.close()
        if complaints:
            log(f"the gateway logged {len(complaints)} warnings/errors, e.g.: " + " | ".join(complaints[:3]))
        if not opts.dir:
            shutil.rmtree(work, ignore_errors=True)
        else:
            src.unlink(missing_ok=True)
            shutil.rmtree(work / "files", ignore_errors=True)
    table = report(runs, opts, size, work, server_cores is not None)
    if opts.json:
        machine = {"cpus": os.cpu_count(), "affinity": cores, "server_cores": sorted(server_cores or []),
                   "wirehub_hot_path": path, "platform": platform.platform(),
                   "python": platform.python_version(), "load_average": os.getloadavg()}
        with open(opts.json, "w") as f:
            json.dump({"options": {k: str(v) for k, v in vars(opts).items()}, "machine": machine,
                       "size_bytes": size, "client_sha256_s": hash_s, "gateway_command": cmd,
                       "rounds": runs, "medians": table}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
