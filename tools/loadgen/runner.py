"""Start the worker processes, walk them through the phases, collect reports.

See ``worker.py`` for the phase protocol. The runner never touches a socket:
it keeps the schedule, adds up what the publishers sent so that every
subscriber knows what it should have received, and draws the progress line.
"""

from __future__ import annotations

import multiprocessing
import sys
import threading
import time
from multiprocessing.connection import Connection, wait
from typing import Any, TextIO

from wirehub import openfiles

from .config import Config, publisher_channels
from .report import aggregate
from .server_cpu import ServerCpuProbe
from .worker import worker_main

START_DELAY_S = 0.3          # lets every worker be asleep before the first send
PHASE_SLACK_S = 10.0         # on top of the time a phase should take


class Runner:
    """Drives ``cfg.procs`` workers; ``run()`` returns the aggregated result dict."""

    def __init__(self, cfg: Config, progress: TextIO | None = None) -> None:
        self.cfg = cfg
        self.progress = progress
        self.pipes: dict[int, Connection] = {}
        self.procs: dict[int, multiprocessing.process.BaseProcess] = {}
        self.latest: dict[int, dict[str, Any]] = {}
        self.failures: list[str] = []
        self._last_line: tuple[float, dict[str, float]] | None = None
        self._t0 = time.monotonic()

    def run(self) -> dict[str, Any]:
        openfiles.lift()  # inherited by the workers
        # fork starts a worker in milliseconds; only a threaded parent needs spawn.
        method = "fork" if threading.active_count() == 1 else "spawn"
        ctx = multiprocessing.get_context(method)
        for i in range(self.cfg.procs):
            parent_end, child_end = ctx.Pipe()
            proc = ctx.Process(  # type: ignore[attr-defined]
                target=worker_main, args=(self.cfg, i, child_end), daemon=True)
            proc.start()
            child_end.close()
            self.pipes[i], self.procs[i] = parent_end, proc
        try:
            return self._phases()
        finally:
            for proc in self.procs.values():
                proc.join(timeout=3)
                if proc.is_alive():
                    proc.kill()
            self._clear_line()

    def _phases(self) -> dict[str, Any]:
        cfg = self.cfg
        setup_s = cfg.connect_timeout_s * 2 + (cfg.senders + cfg.receivers) / 500
        self._gather("ready", setup_s + PHASE_SLACK_S)
        start_ns = time.monotonic_ns() + int(START_DELAY_S * 1e9)
        warmup_end_ns = start_ns + int(cfg.warmup_s * 1e9)
        go = {"start_ns": start_ns, "warmup_end_ns": warmup_end_ns,
              "end_ns": warmup_end_ns + int(cfg.duration_s * 1e9)}
        probe = ServerCpuProbe(cfg.server_pid) if cfg.server_pid else None
        if probe is not None:
            probe.start()
        self._broadcast(("go", go))
        run_s = (cfg.connect_timeout_s * 2 + cfg.connections / 200 + cfg.hold_s
                 if cfg.mode == "connect" else cfg.warmup_s + cfg.duration_s)
        stopped = self._gather("stopped", START_DELAY_S + run_s + PHASE_SLACK_S)
        self._broadcast(("expect", self._expected(stopped)))
        reports = self._gather("report", cfg.drain_s + PHASE_SLACK_S)
        server = None
        if probe is not None:
            probe.stop()
            if cfg.mode == "connect":  # the window is the handshakes
                connect_s = max((r.get("connect_s", 0.0) for r in reports.values()), default=0.0)
                server = probe.result(start_ns, start_ns + int(connect_s * 1e9))
            else:
                server = probe.result(warmup_end_ns, go["end_ns"])
        return aggregate(cfg, reports, self.failures, server=server)

    def _expected(self, stopped: dict[int, dict[int, list[int]]]) -> dict[str, list[int]]:
        """Messages sent per channel (wirehub) and per publisher (raw broadcast)."""
        cfg = self.cfg
        per_channel = [0] * cfg.channels
        per_publisher = [0] * max(cfg.senders, 1)
        for sent in stopped.values():
            for pub, counts in sent.items():
                per_publisher[pub] = sum(counts)
                if cfg.mode == "fanout":
                    for ch, n in zip(publisher_channels(cfg, pub), counts):
                        per_channel[ch] += n
        return {"channels": per_channel, "publishers": per_publisher}

    def _broadcast(self, msg: tuple[Any, ...]) -> None:
        for i, pipe in list(self.pipes.items()):
            try:
                pipe.send(msg)
            except OSError:
                self._lose(i, "pipe closed")

    def _lose(self, index: int, why: str) -> None:
        self.pipes.pop(index, None)
        code = self.procs[index].exitcode
        self.failures.append(f"worker {index} stopped ({why}, exit code {code})")

    def _gather(self, phase: str, timeout_s: float) -> dict[int, Any]:
        """Wait for ``phase`` from every live worker, handling progress meanwhile."""
        got: dict[int, Any] = {}
        deadline = time.monotonic() + timeout_s
        while set(self.pipes) - set(got):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                for i in set(self.pipes) - set(got):
                    self.procs[i].kill()
                    self._lose(i, f"no {phase!r} within {timeout_s:.0f} s")
                break
            # A worker that already answered may exit (EOF): only wait on the others.
            waiting = [p for i, p in self.pipes.items() if i not in got]
            for ready in wait(waiting, timeout=min(remaining, 0.5)):
                index = next(i for i, p in self.pipes.items() if p is ready)
                try:
                    msg: tuple[Any, ...] = self.pipes[index].recv()
                except (EOFError, OSError):
                    self._lose(index, "exited")
                    continue
                kind = msg[0]
                if kind == phase:
                    got[index] = msg[2]
                elif kind == "progress":
                    self.latest[index] = msg[2]
                elif kind == "fatal":
                    sys.stderr.write(f"loadgen worker {index} failed:\n{msg[2]}")
                    self._lose(index, "internal error")
            self._draw(phase)
        return got

    def _draw(self, phase: str) -> None:
        if self.progress is None or not self.latest:
            return
        now = time.monotonic()
        totals = {k: float(sum(c[k] for c in self.latest.values()))
                  for k in ("received", "acked", "sent", "open", "errors", "cpu_s", "malformed")}
        if self._last_line is None or now - self._last_line[0] < 0.45:
            if self._last_line is None:
                self._last_line = (now, totals)
            return
        t_prev, prev = self._last_line
        dt = now - t_prev
        rate = {k: (totals[k] - prev[k]) / dt for k in ("received", "acked", "sent", "cpu_s")}
        cpu = 100 * rate["cpu_s"] / max(len(self.latest), 1)
        target = self.cfg.senders + self.cfg.receivers or self.cfg.connections
        line = (f"[{now - self._t0:6.1f}s] {phase:<8} recv {_si(rate['received'])}/s  "
                f"acked {_si(rate['acked'])}/s  sent {_si(rate['sent'])}/s  "
                f"conns {int(totals['open'])}/{target}  "
                f"errors {int(totals['errors'] + totals['malformed'])}  client cpu {cpu:3.0f}%")
        self.progress.write("\r" + line[:160].ljust(120))
        self.progress.flush()
        self._last_line = (now, totals)

    def _clear_line(self) -> None:
        if self.progress is not None and self._last_line is not None:
            self.progress.write("\r" + " " * 120 + "\r")
            self.progress.flush()


def _si(value: float) -> str:
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:6.2f}{unit}"
    return f"{value:7.0f}"
