"""``bench/send_floor.py``: a short real run on loopback, and its frame."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))
import send_floor  # noqa: E402  (bench/ is not a package)


@pytest.mark.parametrize("size, header", [(0, b"\x81\x00"), (125, b"\x81\x7d"),
                                          (126, b"\x81\x7e\x00\x7e"), (65535, b"\x81\x7e\xff\xff")])
def test_text_frame_header(size, header):
    frame = send_floor.text_frame(size)
    assert frame[:len(header)] == header and len(frame) == len(header) + size


def test_text_frame_refuses_what_needs_a_64_bit_length():
    with pytest.raises(ValueError):
        send_floor.text_frame(65536)


def test_percentile_is_nearest_rank():
    ordered = list(range(1, 101))
    assert [send_floor.percentile(ordered, q) for q in (0.0, 0.5, 0.99, 1.0)] == [1, 50, 99, 100]


def test_a_short_run_reports_every_send():
    proc = subprocess.run([sys.executable, str(BENCH / "send_floor.py"), "--connections", "20",
                           "--rate", "50", "--duration", "0.4", "--repeat", "2", "--json"],
                          capture_output=True, text=True, timeout=60, check=True)
    result = json.loads(proc.stdout)
    assert result["connections"] == 20 and len(result["windows"]) == 2
    assert proc.stderr.count("window ") == 2        # progress, one line per window
    for window in result["windows"]:
        assert 10 <= window["rounds"] <= 21         # 50 rounds/s for 0.4 s
        # A round ends with its last send, so it bounds every delivery in it. (A send may
        # take less than the clock's resolution: 0 is a valid median.)
        assert 0 <= window["delivery_p50_us"] <= window["delivery_p99_us"] <= window["round_max_us"]
        assert window["round_p50_us"] <= window["round_p99_us"] <= window["round_max_us"]
        assert window["cpu_us_per_send"] > 0 and 0 <= window["kernel_share"] <= 1


def test_bad_arguments_are_refused():
    proc = subprocess.run([sys.executable, str(BENCH / "send_floor.py"), "--connections", "0"],
                          capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 2 and "--connections" in proc.stderr
