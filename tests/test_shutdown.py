"""SIGTERM and SIGINT end ``wirehub serve`` within ``shutdown_timeout_s``, stuck loop or not."""

from __future__ import annotations

import signal
import subprocess
import sys

from helpers import connect_recording, free_port, start_server

# ``wirehub serve`` whose event loop, once the gateway listens, runs a
# callback that never returns: the worst case of a long synchronous step.
STUCK_SERVE = """
import asyncio, sys
from wirehub import cli, gateway

start = gateway.Gateway.start

async def start_then_get_stuck(self):
    await start(self)
    def stuck():
        print("stuck", file=sys.stderr, flush=True)
        while True:
            pass
    asyncio.get_running_loop().call_later(0.05, stuck)

gateway.Gateway.start = start_then_get_stuck
sys.exit(cli.main(sys.argv[1:]))
"""


def test_sigterm_ends_a_stuck_loop_at_the_timeout_and_says_so():
    proc = subprocess.Popen([sys.executable, "-c", STUCK_SERVE, "serve", "--port", str(free_port()),
                             "--shutdown-timeout-s", "1"], stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        while "stuck" not in (line := proc.stderr.readline()):
            assert line, "".join(lines)
            lines.append(line)
        proc.send_signal(signal.SIGTERM)
        # Without the deadline the process spins forever and this times out.
        assert proc.wait(timeout=60) == 1
        assert "not stopped 1 s after SIGTERM" in proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()


async def test_a_second_signal_exits_without_waiting_for_clients():
    with start_server("--shutdown-timeout-s", "60") as (proc, port):
        client = await connect_recording(port)
        client.transport.underlying_transport.pause_reading()  # never answers the CLOSE
        proc.send_signal(signal.SIGTERM)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 1
