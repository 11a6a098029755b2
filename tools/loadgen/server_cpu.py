"""The server's CPU use over the measured window, read from ``/proc``.

A load generator that saturates before the server reports the client's
ceiling, not the server's. Knowing how busy the server was during the same
window tells the two apart, and deliveries per server CPU-second is the
server's capacity even when the client is the limit (``--server-pid``).
"""

from __future__ import annotations

import os
import threading
import time

_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (all its threads)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    # Fields after the command name, which is in parentheses and may hold spaces.
    fields = stat[stat.rindex(b")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS_PER_S


class ServerCpuProbe:
    """Sample a process's CPU time at the start and end of the measured window.

    A thread sleeps until each instant (``CLOCK_MONOTONIC`` ns, the clock the
    workers time the window with) and reads ``/proc/<pid>/stat``.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._samples: list[tuple[float, float]] = []
        self._error: str | None = None
        self._thread: threading.Thread | None = None

    def start(self, window_start_ns: int, window_end_ns: int) -> None:
        self._thread = threading.Thread(target=self._run, args=(window_start_ns, window_end_ns),
                                        name="server-cpu-probe", daemon=True)
        self._thread.start()

    def _run(self, *instants_ns: int) -> None:
        for at_ns in instants_ns:
            delay = (at_ns - time.monotonic_ns()) / 1e9
            if delay > 0:
                time.sleep(delay)
            try:
                self._samples.append((time.monotonic(), cpu_seconds(self.pid)))
            except (OSError, ValueError, IndexError) as exc:
                self._error = f"cannot read /proc/{self.pid}/stat: {exc}"
                return

    def result(self, timeout_s: float = 1.0) -> dict[str, object]:
        """``{"pid", "cpu_s", "cpu_percent"}`` over the window, or ``{"pid", "error"}``."""
        if self._thread is not None:
            self._thread.join(timeout_s)
        if len(self._samples) < 2:
            return {"pid": self.pid, "error": self._error or "the window did not end"}
        (t0, c0), (t1, c1) = self._samples[:2]
        cpu_s = c1 - c0
        return {"pid": self.pid, "cpu_s": round(cpu_s, 3),
                "cpu_percent": round(100 * cpu_s / (t1 - t0), 1) if t1 > t0 else 0.0}
