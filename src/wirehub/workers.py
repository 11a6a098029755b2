"""``wirehub serve --workers N``: N gateway processes on one port, kept running.

One gateway process uses one core. The supervisor (the ``wirehub serve``
process itself) starts N workers, each a whole gateway (``wirehub serve``
again, told it is worker ``i`` by ``WORKER_ENV``) listening on the same
port with ``SO_REUSEPORT``, so the kernel spreads new connections over
them. They share channels through the broker, which must therefore be a
shared one (``--broker redis://``): ``Config`` refuses workers on the
memory broker.

The supervisor serves nothing itself. It waits until every worker says it
listens (a line on a pipe, ``READY_FD_ENV``), restarts a worker that dies
(after a pause that grows if it keeps dying at once), and on SIGTERM or
SIGINT passes the signal on and waits for every worker to drain
(``shutdown_timeout_s``).
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

WORKER_ENV = "WIREHUB_WORKER_INDEX"
READY_FD_ENV = "WIREHUB_READY_FD"
# A worker that dies sooner than this after starting waits before its restart, longer each time.
STABLE_S = 2.0
MAX_RESTART_DELAY_S = 10.0
PR_SET_PDEATHSIG = 1


def worker_index() -> int | None:
    """This process's worker number when a supervisor started it, else None."""
    value = os.environ.get(WORKER_ENV)
    return int(value) if value is not None else None


def report_ready() -> None:
    """Tell the supervisor this worker listens (once; a no-op outside a supervisor)."""
    fd = os.environ.pop(READY_FD_ENV, None)
    if fd is not None:
        os.write(int(fd), f"{os.getpid()}\n".encode())
        os.close(int(fd))


def _say(message: str) -> None:
    print(f"wirehub: {message}", file=sys.stderr, flush=True)


@dataclass
class _Worker:
    index: int
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    restarts: int = 0
    delay_s: float = field(default=0.0)


class Supervisor:
    """Start ``count`` workers running ``argv`` (``wirehub serve`` flags) and keep them running.

    Args:
        argv: the arguments of ``wirehub serve`` (the workers get the same).
        count: workers.
        shutdown_timeout_s: how long a worker may take to drain on SIGTERM.
        start_timeout_s: how long the first start of all workers may take.
    """

    def __init__(self, argv: list[str], count: int, shutdown_timeout_s: float,
                 start_timeout_s: float = 30.0) -> None:
        self.argv = argv
        self.workers = [_Worker(i) for i in range(count)]
        self.shutdown_timeout_s = shutdown_timeout_s
        self.start_timeout_s = start_timeout_s
        self._stop = threading.Event()
        self._signal_name = ""

    def run(self, banner: str) -> int:
        """Run until SIGTERM or SIGINT; 0 after a clean drain, 1 otherwise."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        if not self._start_all():
            self._terminate_all()
            return 1
        print(banner, file=sys.stderr, flush=True)
        while not self._stop.wait(0.1):
            for worker in self.workers:
                if worker.proc is not None and worker.proc.poll() is not None:
                    self._restart(worker)
        _say(f"{self._signal_name}: stopping {len(self.workers)} workers")
        return self._terminate_all()

    def _on_signal(self, signum: int, frame: object) -> None:
        self._signal_name = signal.Signals(signum).name
        self._stop.set()

    def _spawn(self, worker: _Worker) -> int:
        """Start ``worker``; return the read end of its readiness pipe."""
        read_end, write_end = os.pipe()
        env = {**os.environ, WORKER_ENV: str(worker.index), READY_FD_ENV: str(write_end)}
        # A session of its own: a terminal's Ctrl-C reaches the supervisor
        # alone, which passes one SIGTERM on (two would stop a worker at once).
        worker.proc = subprocess.Popen([sys.executable, "-m", "wirehub", "serve", *self.argv], env=env,
                                       pass_fds=(write_end,), start_new_session=True,
                                       preexec_fn=_die_with_parent)
        worker.started = time.monotonic()
        os.close(write_end)
        return read_end

    def _start_all(self) -> bool:
        """Start every worker and wait for each to listen; False if one fails."""
        pending = {self._spawn(worker): worker for worker in self.workers}
        deadline = time.monotonic() + self.start_timeout_s
        while pending:
            if self._stop.is_set():
                return False
            ready, _, _ = select.select(list(pending), [], [], 0.1)
            for fd in ready:
                worker = pending.pop(fd)
                said = os.read(fd, 64)
                os.close(fd)
                if not said:
                    _say(f"worker {worker.index} exited before it listened "
                         f"(status {worker.proc.wait()}); see its messages above")
                    return False
            if time.monotonic() > deadline:
                _say(f"{len(pending)} workers did not listen within {self.start_timeout_s:g} s")
                return False
        return True

    def _restart(self, worker: _Worker) -> None:
        status = worker.proc.returncode
        how = f"signal {signal.Signals(-status).name}" if status < 0 else f"status {status}"
        lived = time.monotonic() - worker.started
        worker.delay_s = 0.0 if lived > STABLE_S else min(MAX_RESTART_DELAY_S, max(0.5, worker.delay_s * 2))
        worker.restarts += 1
        _say(f"worker {worker.index} (pid {worker.proc.pid}) exited with {how} after {lived:.1f} s; restarting"
             + (f" in {worker.delay_s:g} s" if worker.delay_s else ""))
        if worker.delay_s and self._stop.wait(worker.delay_s):
            worker.proc = None
            return
        fd = self._spawn(worker)
        # Its readiness is not waited for: the others serve meanwhile.
        threading.Thread(target=_drain_ready, args=(fd,), daemon=True).start()

    def _terminate_all(self) -> int:
        running = [w.proc for w in self.workers if w.proc is not None and w.proc.poll() is None]
        for proc in running:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.shutdown_timeout_s + 2.0
        clean = True
        for proc in running:
            try:
                # -SIGTERM: a worker still starting, with no handler yet and no clients.
                clean &= proc.wait(max(0.0, deadline - time.monotonic())) in (0, -signal.SIGTERM)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                clean = False
        return 0 if clean else 1


def _drain_ready(fd: int) -> None:
    try:
        os.read(fd, 64)
    finally:
        os.close(fd)


def _die_with_parent() -> None:
    """In the worker, before it runs: SIGTERM it if the supervisor dies (Linux's
    ``PR_SET_PDEATHSIG``), so that a killed supervisor leaves no workers behind."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the workers outlive a killed supervisor
        pass
