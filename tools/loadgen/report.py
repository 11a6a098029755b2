"""Merge worker reports into one result and print it as text or JSON.

Rates are computed over the measured window only (after warm-up, before the
drain); counts of missing/duplicate/out-of-order messages cover the whole run
including the drain, since one lost message anywhere is a failure.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict
from typing import Any

from .config import Config
from .histogram import Histogram

# Above this, a worker process was probably the bottleneck, not the server.
SATURATED_CPU_PERCENT = 90.0
# ... or when its measurement window started/ended this late (fraction of --duration).
MAX_TIMER_LAG_FRACTION = 0.1


def aggregate(cfg: Config, reports: dict[int, dict[str, Any]], failures: list[str],
              server: dict[str, Any] | None = None) -> dict[str, Any]:
    """Combine per-worker reports (``worker.Worker._report``) into the result dict.

    ``server``: the server's CPU over the window (``ServerCpuProbe.result``).
    """
    hist = Histogram()
    errors: Counter[str] = Counter()
    samples: list[str] = []
    delta: Counter[str] = Counter()
    total: Counter[str] = Counter()
    subs: Counter[str] = Counter()
    worst: list[dict[str, Any]] = []
    cpu = []
    window_s = 0.0
    for index in sorted(reports):
        rep = reports[index]
        hist.merge(Histogram.from_wire(rep["histogram"]))
        errors.update(rep["errors"])
        samples += rep["error_samples"]
        delta.update(rep["delta"])
        total.update(rep["total"])
        for key in ("count", "missing", "duplicates", "out_of_order", "with_anomalies"):
            subs[key] += rep["subscribers"][key]
        worst += rep["subscribers"]["worst"]
        window_s = max(window_s, rep["window_s"])
        c = rep["cpu"]
        busy = c["user_s"] + c["sys_s"]
        cpu.append({"worker": index, "pid": rep["pid"],
                    "cpu_percent": round(100 * busy / c["wall_s"], 1) if c["wall_s"] else 0.0,
                    "user_s": round(c["user_s"], 3), "sys_s": round(c["sys_s"], 3),
                    "max_rss_mb": round(c["max_rss_mb"], 1)})
    if total["malformed"]:
        errors["malformed_frames"] += total["malformed"]
    if total["error_replies"]:
        errors["error_replies"] += total["error_replies"]
    if failures:
        errors["worker_failures"] += len(failures)
        samples += failures

    established = sum(rep["open"] for rep in reports.values())
    targets = cfg.connections if cfg.mode in ("echo", "connect") else cfg.publishers + cfg.subscribers
    per_s = (lambda n: n / window_s) if window_s > 0 else (lambda n: 0.0)
    result: dict[str, Any] = {
        "mode": cfg.mode,
        "protocol": cfg.protocol,
        "codec": cfg.codec if cfg.protocol == "wirehub" else ("binary" if cfg.binary else "text"),
        "implementation": next((r["implementation"] for r in reports.values()), None),
        "config": asdict(cfg),
        "window_s": round(window_s, 3),
        "connections": {"target": targets, "open_at_end": established},
        "latency_us": hist.summary_us(),
    }
    if cfg.mode == "echo":
        result["throughput"] = {"round_trips_per_s": per_s(delta["acked"]),
                                "sent_per_s": per_s(delta["sent"])}
    elif cfg.mode == "fanout":
        result["throughput"] = {"deliveries_per_s": per_s(delta["received"]),
                                "published_per_s": per_s(delta["sent"]),
                                "acked_per_s": per_s(delta["acked"]),
                                "mbytes_per_s": per_s(delta["received_bytes"]) / 1e6}
        missing = max(subs["missing"], 0)
        result["delivery"] = {
            "published": total["sent"],
            "received": total["received"],
            "missing": subs["missing"],
            "duplicates": subs["duplicates"],
            "out_of_order": subs["out_of_order"],
            "subscribers": subs["count"],
            "subscribers_with_anomalies": subs["with_anomalies"],
            "worst_subscribers": sorted(
                worst, key=lambda s: -(abs(s["missing"]) + s["duplicates"] + s["out_of_order"])
            )[:20],
        }
        for key, n in (("missing", missing), ("duplicates", subs["duplicates"]),
                       ("out_of_order", subs["out_of_order"])):
            if n:
                errors[key] += n
    else:
        connect_s = max((r.get("connect_s", 0.0) for r in reports.values()), default=0.0)
        result["connect"] = {
            "established": hist.total,
            "connect_s": round(connect_s, 3),
            "handshakes_per_s": hist.total / connect_s if connect_s else 0.0,
            "hold_s": cfg.hold_s,
        }
    result["errors"] = dict(errors)
    result["error_count"] = sum(errors.values())
    result["error_samples"] = samples[:10]
    busy_s = sum(c["user_s"] + c["sys_s"] for c in cpu)
    events = delta["received"] + delta["acked"] + delta["other_received"]
    lag_s = max((r["timer_lag_s"] for r in reports.values()), default=0.0)
    result["client"] = {
        "processes": cpu,
        "timer_lag_s": round(lag_s, 3),
        "saturated": any(c["cpu_percent"] >= SATURATED_CPU_PERCENT for c in cpu)
        or lag_s > MAX_TIMER_LAG_FRACTION * cfg.duration_s,
        # Frames the client handled per second of its own CPU: its ceiling per core.
        "frames_per_cpu_s": round(events / busy_s) if busy_s > 0 else 0,
    }
    if server is not None:
        result["server"] = dict(server)
        if server.get("cpu_s"):
            # The server's capacity, whether or not the client saturated.
            for key, value in result.get("throughput", {}).items():
                if key in ("deliveries_per_s", "round_trips_per_s"):
                    per_cpu_s = key.replace("_per_s", "_per_cpu_s")
                    result["server"][per_cpu_s] = round(value * window_s / server["cpu_s"])
            if "connect" in result:
                result["server"]["handshakes_per_cpu_s"] = round(
                    result["connect"]["established"] / server["cpu_s"])
    result["ok"] = result["error_count"] <= cfg.max_errors
    return result


def _fmt_rate(value: float) -> str:
    return f"{value:,.0f}"


def format_text(result: dict[str, Any]) -> str:
    """Human-readable summary of ``aggregate``'s result."""
    cfg = result["config"]
    lines = [f"mode {result['mode']}  protocol {result['protocol']} ({result['codec']})  "
             f"url {cfg['url']}  client {result['implementation']} x{cfg['procs']}",
             f"connections {result['connections']['open_at_end']}/{result['connections']['target']}"
             f"  window {result['window_s']} s"]
    for key, value in result.get("throughput", {}).items():
        lines.append(f"  {key:<22} {_fmt_rate(value) if 'mbytes' not in key else f'{value:.1f}'}")
    if "delivery" in result:
        d = result["delivery"]
        lines.append(f"  published {d['published']:,}  received {d['received']:,}  "
                     f"missing {d['missing']:,}  duplicates {d['duplicates']:,}  "
                     f"out-of-order {d['out_of_order']:,}  "
                     f"subscribers with anomalies {d['subscribers_with_anomalies']}/{d['subscribers']}")
    if "connect" in result:
        c = result["connect"]
        lines.append(f"  established {c['established']:,} in {c['connect_s']} s  "
                     f"handshakes/s {_fmt_rate(c['handshakes_per_s'])}  held {c['hold_s']} s")
    lat = result["latency_us"]
    if lat.get("count"):
        label = "handshake" if result["mode"] == "connect" else (
            "round trip" if result["mode"] == "echo" else "publish→receive")
        lines.append(f"  latency ({label}, us)  p50 {lat['p50']:.0f}  p90 {lat['p90']:.0f}  "
                     f"p99 {lat['p99']:.0f}  p99.9 {lat['p99.9']:.0f}  max {lat['max']:.0f}  "
                     f"({lat['count']:,} samples)")
    procs = result["client"]["processes"]
    lines.append("  client cpu " + "  ".join(f"{p['cpu_percent']:.0f}%" for p in procs)
                 + f"  ({result['client']['frames_per_cpu_s']:,} frames per client cpu-second)"
                 + ("  (SATURATED: the client may be the bottleneck)"
                    if result["client"]["saturated"] else ""))
    server = result.get("server")
    if server:
        lines.append(f"  server pid {server['pid']}: " + (
            server["error"] if "error" in server else
            f"cpu {server['cpu_percent']:.0f}%" + "".join(
                f"  {_fmt_rate(v)} {k.replace('_per_cpu_s', '')} per server cpu-second"
                for k, v in server.items() if k.endswith("_per_cpu_s"))))
    if result["errors"]:
        lines.append("errors " + ", ".join(f"{k}={v}" for k, v in sorted(result["errors"].items())))
        lines += [f"  - {s}" for s in result["error_samples"]]
    lines.append("OK" if result["ok"] else
                 f"FAILED: {result['error_count']} errors > --max-errors {cfg['max_errors']}")
    return "\n".join(lines)
