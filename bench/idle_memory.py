"""Where an idle connection's bytes go: tracemalloc and an object census.

Runs a ``Gateway`` in this process (uvloop, like ``wirehub serve``), opens
``--connections`` idle connections with the loadgen (``connect`` mode, another
process), and once they are all upgraded reports, per connection:

* the server's VmRSS growth (run with ``--no-trace`` for a figure without
  tracemalloc's own bookkeeping, which inflates RSS),
* tracemalloc's growth, grouped by the Python line that was running when the
  memory was allocated (compiled code — uvloop, picows, our Cython — has no
  frames of its own, so its allocations land on the nearest Python caller),
* the Python objects that appeared, by type: count per connection and
  ``sys.getsizeof`` bytes per connection.

    python bench/idle_memory.py --connections 5000
    python bench/idle_memory.py --connections 10000 --no-trace     # RSS only
    WIREHUB_NO_EXTENSIONS=1 python bench/idle_memory.py            # pure-Python twins

See docs/benchmarks.md ("Idle memory per connection").
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import subprocess
import sys
import time
import tracemalloc
from collections import Counter
from pathlib import Path

from wirehub import openfiles

ROOT = Path(__file__).resolve().parent.parent


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def census() -> tuple[Counter, Counter]:
    counts: Counter = Counter()
    sizes: Counter = Counter()
    objects = gc.get_objects()
    for obj in objects:
        if obj is objects:
            continue
        cls = type(obj)
        module = cls.__dict__.get("__module__", "")
        name = f"{module}.{cls.__qualname__}" if isinstance(module, str) else cls.__qualname__
        counts[name] += 1
        sizes[name] += sys.getsizeof(obj)
    return counts, sizes


async def measure(opts: argparse.Namespace) -> dict:
    from wirehub import Config, Gateway

    # Every load-generator connection comes from 127.0.0.1: the per-IP
    # admission limits would refuse most of them.
    overrides = {"max_connections_per_ip": 0, "new_connections_per_ip_per_s": 0,
                 **json.loads(opts.config)}
    gateway = Gateway(Config(port=0, **overrides))
    await gateway.start()
    await asyncio.sleep(0.2)
    gc.collect()
    counts0, sizes0 = census() if opts.census else (Counter(), Counter())
    snap0 = tracemalloc.take_snapshot() if tracemalloc.is_tracing() else None
    rss0 = rss_kib()
    traced0 = tracemalloc.get_traced_memory()[0] if tracemalloc.is_tracing() else 0

    n = opts.connections
    cmd = [sys.executable, "-m", "tools.loadgen", "connect", "--connections", str(n),
           "--concurrency", str(opts.concurrency), "--hold", str(opts.hold),
           "--url", f"ws://127.0.0.1:{gateway.port}/ws", "--json", "--no-progress",
           "--max-errors", "1000000000"]
    client = await asyncio.create_subprocess_exec(*cmd, cwd=ROOT, stdout=subprocess.PIPE,
                                                  stderr=subprocess.PIPE)
    deadline = time.monotonic() + opts.hold + 60
    while len(gateway.hub.clients) < n and time.monotonic() < deadline:
        if client.returncode is not None:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)           # let the last welcomes flush
    held = len(gateway.hub.clients)
    if held == 0:
        _, err = await client.communicate()
        raise SystemExit(f"no connection was established: {err.decode()[-400:]}")
    gc.collect()
    rss1 = rss_kib()
    result = {"connections": held, "hot_path": gateway.impl.name,
              "rss_kib_per_conn": (rss1 - rss0) / max(held, 1)}
    if opts.census:
        counts1, sizes1 = census()
        result["objects"] = sorted(
            ({"type": t, "per_conn": (counts1[t] - counts0[t]) / held,
              "bytes_per_conn": (sizes1[t] - sizes0[t]) / held}
             for t in counts1 if counts1[t] - counts0[t] >= held // 2),
            key=lambda r: -r["bytes_per_conn"])
    if snap0 is not None:
        traced1 = tracemalloc.get_traced_memory()[0]
        snap1 = tracemalloc.take_snapshot()
        result["traced_bytes_per_conn"] = (traced1 - traced0) / max(held, 1)
        stats = snap1.compare_to(snap0, "traceback" if opts.frames > 1 else "lineno")
        rows = []
        for st in stats[:opts.top]:
            if st.size_diff <= 0:
                continue
            frames = [f"{Path(f.filename).name}:{f.lineno}" for f in st.traceback]
            rows.append({"bytes_per_conn": st.size_diff / held, "blocks_per_conn": st.count_diff / held,
                         "where": " < ".join(frames[:opts.frames])})
        result["tracemalloc"] = rows
    out, err = await client.communicate()
    if client.returncode not in (0, 1):
        raise RuntimeError(f"loadgen failed: {err.decode()[-400:]}")
    await gateway.stop()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=500)
    parser.add_argument("--hold", type=float, default=20.0,
                        help="seconds the client holds the connections (an upper bound)")
    parser.add_argument("--frames", type=int, default=1, help="traceback depth to group by")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--no-trace", action="store_true", help="RSS only, without tracemalloc")
    parser.add_argument("--census", action=argparse.BooleanOptionalAction, default=True,
                        help="count the Python objects that appeared, by type")
    parser.add_argument("--config", default="{}", help="Config overrides as JSON")
    parser.add_argument("--json", action="store_true")
    opts = parser.parse_args(argv)
    openfiles.lift()
    if not opts.no_trace:
        tracemalloc.start(opts.frames)
    import uvloop

    result = uvloop.run(measure(opts))
    if opts.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{result['connections']} idle connections, {result['hot_path']} hot path (the gateway's own)")
    print(f"VmRSS growth: {result['rss_kib_per_conn'] * 1024:,.0f} B per connection"
          + ("" if opts.no_trace else " (inflated by tracemalloc; use --no-trace)"))
    if "traced_bytes_per_conn" in result:
        print(f"tracemalloc:  {result['traced_bytes_per_conn']:,.0f} B per connection")
        for row in result["tracemalloc"]:
            print(f"  {row['bytes_per_conn']:8,.0f} B {row['blocks_per_conn']:5.2f} blocks  {row['where']}")
    if "objects" in result:
        print("Python objects that appeared (sys.getsizeof, per connection):")
        for row in result["objects"]:
            print(f"  {row['bytes_per_conn']:8,.0f} B {row['per_conn']:5.2f}x  {row['type']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
