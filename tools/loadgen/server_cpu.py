"""The server's CPU use over the measured window, read from ``/proc``.

A load generator that saturates before the server reports the client's
ceiling, not the server's. Knowing how busy the server was during the same
window tells the two apart, and the work done per server CPU-second is the
server's capacity even when the client is the limit (``--server-pid``).
"""

from __future__ import annotations

import bisect
import os
import threading
import time

SAMPLE_INTERVAL_S = 0.01


def cpu_seconds(pid: int) -> float:
    """CPU seconds process ``pid`` has run so far, all its threads.

    From ``/proc/<pid>/task/*/schedstat``, whose first field is the
    scheduler's run time in nanoseconds; ``/proc/<pid>/stat`` has the same
    total in 10 ms ticks, coarse against the second or so of CPU a server
    uses in a measured window.
    """
    total_ns = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat", "rb") as f:
                total_ns += int(f.read().split()[0])
        except OSError:
            pass  # a thread that just exited
    return total_ns / 1e9


class ServerCpuProbe:
    """Sample a process's CPU time every 10 ms, for any window read afterwards.

    The window is not always known in advance (``connect`` mode ends when the
    last handshake does), so a thread records ``(CLOCK_MONOTONIC ns, CPU
    seconds)`` pairs and ``result`` interpolates at the window's edges.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._times: list[int] = []
        self._cpu: list[float] = []
        self._error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="server-cpu-probe", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(1.0)

    def _run(self) -> None:
        while True:
            try:
                cpu = cpu_seconds(self.pid)
            except (OSError, ValueError) as exc:
                self._error = f"cannot read /proc/{self.pid}/task: {exc}"
                return
            self._times.append(time.monotonic_ns())
            self._cpu.append(cpu)
            if self._stop.wait(SAMPLE_INTERVAL_S):
                return

    def _at(self, t_ns: int) -> float | None:
        i = bisect.bisect_left(self._times, t_ns)
        if i == 0 or i == len(self._times):
            return None  # outside what was sampled
        t0, t1 = self._times[i - 1], self._times[i]
        c0, c1 = self._cpu[i - 1], self._cpu[i]
        return c0 + (c1 - c0) * (t_ns - t0) / (t1 - t0)

    def result(self, start_ns: int, end_ns: int) -> dict[str, object]:
        """``{"pid", "cpu_s", "cpu_percent"}`` over the window, or ``{"pid", "error"}``."""
        start, end = self._at(start_ns), self._at(end_ns)
        if start is None or end is None or end_ns <= start_ns:
            return {"pid": self.pid, "error": self._error or "the window was not sampled"}
        cpu_s = end - start
        return {"pid": self.pid, "cpu_s": round(cpu_s, 3),
                "cpu_percent": round(100 * cpu_s * 1e9 / (end_ns - start_ns), 1)}
