"""``bench/fanout_latency.c``, the independent fan-out latency client: it counts right.

Correctness only, not speed: against a gateway started here, every
publication reaches every subscriber once and in order, the counts add up,
the latency quantiles are ordered; a wrong path and bad usage are refused.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import running_gateway

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))
import fanout_latency  # noqa: E402  (bench/ is not a package)
import handshakes  # noqa: E402

pytestmark = pytest.mark.skipif(handshakes.find_compiler() is None,
                                reason="no C compiler (cc, gcc, clang or $CC) to build bench/fanout_latency.c")


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The client built from the current source (in a temporary directory)."""
    return handshakes.build_client(tmp_path_factory.mktemp("fanout-latency"), fanout_latency.SOURCE)


async def test_every_publication_reaches_every_subscriber_once_in_order(client):
    async with running_gateway() as gw:
        result = await asyncio.to_thread(fanout_latency.run_client, client, gw.port, subscribers=20, rate=200,
                                         duration_s=0.5, warmup_s=0.2, server_pids=[os.getpid()], timeout_s=60)
    published = result["published"]
    assert published == 140                              # 200/s over 0.2 + 0.5 s, on a fixed schedule
    assert result["expected"] == result["received"] == published * 20
    assert result["missing"] == result["duplicates"] == result["out_of_order"] == result["server_closes"] == 0
    assert result["published_per_s"] == pytest.approx(200, abs=2)   # 100 of them in the 0.5 s window
    latency = result["latency_us"]
    assert latency["samples"] == 100 * 20 and latency["over_1s"] == 0
    assert latency["p50"] <= latency["p99"] <= latency["p999"] <= latency["max"] + 1
    # The server's CPU over the window: this process, read from the scheduler's
    # nanosecond counters and printed to the microsecond, so 2,000 deliveries
    # never round to 0 s, however fast the machine.
    [server] = result["servers"]
    assert server["pid"] == os.getpid() and server["cpu_s"] > 0


async def test_a_refused_upgrade_exits_2(client):
    async with running_gateway() as gw:
        proc = await asyncio.to_thread(subprocess.run, [str(client), "--port", str(gw.port), "--path", "/nowhere",
                                                        "--subscribers", "2"], capture_output=True, text=True,
                                       timeout=30, check=False)
    assert proc.returncode == 2 and "upgrade refused: HTTP/1.1 404" in proc.stderr


def test_bad_usage_exits_2(client):
    proc = subprocess.run([str(client), "--port", "0"], capture_output=True, text=True, timeout=10, check=False)
    assert proc.returncode == 2 and "usage" in proc.stderr
    proc = subprocess.run([str(client), "--help"], capture_output=True, text=True, timeout=10, check=False)
    assert proc.returncode == 0 and "--subscribers" in proc.stdout
