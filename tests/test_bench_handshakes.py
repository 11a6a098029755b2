"""``bench/handshakes.c``, the independent handshake client: it counts right.

Correctness only, not speed: a few connections against a gateway started
here, every one a 101 and no error; against a full gateway (503) every
connection an error of kind ``http_503``; and the close modes all count alike.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import connect_recording, running_gateway

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))
import handshakes  # noqa: E402  (bench/ is not a package)

pytestmark = pytest.mark.skipif(handshakes.find_compiler() is None,
                                reason="no C compiler (cc, gcc, clang or $CC) to build bench/handshakes.c")


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The client built from the current source (in a temporary directory)."""
    return handshakes.build_client(tmp_path_factory.mktemp("handshakes"))


async def run_client(binary: Path, port: int, **kwargs: object) -> dict:
    """The client in a thread, so the gateway on this loop can answer it."""
    return await asyncio.to_thread(handshakes.run_client, binary, port, "/ws", timeout_s=30,
                                   **kwargs)


@pytest.mark.parametrize("close", ["hold", "frame", "tcp"])
async def test_counts_every_handshake(client, close):
    async with running_gateway(max_connections_per_ip=0, new_connections_per_ip_per_s=0) as gw:
        result = await run_client(client, gw.port, connections=25, concurrency=4, close=close)
    assert result["connections"] == 25 and result["handshakes"] == 25
    assert result["errors"] == 0 and result["error_kinds"] == {}
    assert result["close"] == close and result["concurrency"] == 4
    assert result["elapsed_s"] > 0
    assert result["handshakes_per_s"] == pytest.approx(25 / result["elapsed_s"], rel=1e-3)
    assert 0 < result["latency_us"]["p50"] <= result["latency_us"]["p99"] <= result["latency_us"]["max"]


async def test_counts_a_refusal_by_its_status(client):
    async with running_gateway(max_connections=1) as gw:
        held = await connect_recording(gw.port)        # the one connection allowed
        try:
            result = await run_client(client, gw.port, connections=5, concurrency=2)
        finally:
            held.transport.disconnect()
    assert result["handshakes"] == 0 and result["errors"] == 5
    assert result["error_kinds"] == {"http_503": 5}


async def test_counts_a_wrong_path_and_a_closed_port(client):
    async with running_gateway() as gw:
        wrong = await asyncio.to_thread(handshakes.run_client, client, gw.port, "/nowhere",
                                        connections=3, concurrency=3, timeout_s=30)
        port = gw.port
    assert wrong["error_kinds"] == {"http_404": 3}
    refused = await run_client(client, port, connections=2, concurrency=1)
    assert refused["error_kinds"] == {"connect_refused": 2} and refused["handshakes"] == 0


async def test_reports_the_servers_cpu(client):
    """``--server-pid``: the server's CPU over the window; this process is the server here.
    (Read from the scheduler's nanosecond counters and printed to the microsecond, so
    50 handshakes never round to 0 s, however fast the machine.)"""
    async with running_gateway(max_connections_per_ip=0, new_connections_per_ip_per_s=0) as gw:
        result = await run_client(client, gw.port, connections=50, concurrency=10,
                                  server_pid=os.getpid())
    assert result["handshakes"] == 50
    assert result["server"]["cpu_s"] > 0 and result["server"]["handshakes_per_cpu_s"] > 0


def test_build_is_skipped_when_up_to_date(tmp_path):
    first = handshakes.build_client(tmp_path)
    mtime = first.stat().st_mtime_ns
    assert handshakes.build_client(tmp_path) == first and first.stat().st_mtime_ns == mtime


def test_bad_usage_exits_2(client):
    proc = subprocess.run([str(client), "--port", "0"], capture_output=True, text=True,
                          timeout=10, check=False)
    assert proc.returncode == 2 and "usage" in proc.stderr
    proc = subprocess.run([str(client), "--help"], capture_output=True, text=True,
                          timeout=10, check=False)
    assert proc.returncode == 0 and "--concurrency" in proc.stdout


async def test_busy_poll_counts_the_same(client):
    async with running_gateway(max_connections_per_ip=0, new_connections_per_ip_per_s=0) as gw:
        result = await run_client(client, gw.port, connections=20, concurrency=5, busy_poll=True)
    assert result["handshakes"] == 20 and result["errors"] == 0 and result["busy_poll"] is True


def test_ratios_compare_servers_within_an_instrument_and_instruments_per_server():
    def entry(rate: float, per_cpu: float) -> dict:
        return {"median": {"handshakes_per_s": rate, "handshakes_per_cpu_s": per_cpu}}
    table = {"c-hold": {"wirehub": entry(9000, 10000), "ws": entry(6000, 8000)},
             "loadgen": {"wirehub": entry(8100, 9000), "ws": {"failed": "boom"}}}
    ratios = handshakes.ratios(table)
    assert ratios["to_ws"]["c-hold"]["wirehub"] == {"handshakes_per_s": 1.5,
                                                     "handshakes_per_cpu_s": 1.25}
    assert "loadgen" not in ratios["to_ws"]             # no ws figure to compare with
    assert ratios["loadgen_to_c"] == {"c-hold": {"wirehub": 0.9}}
