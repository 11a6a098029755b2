"""The Prometheus exposition helpers (``wirehub.metrics``); /metrics itself is
tested through a running gateway in ``test_gateway.py``."""

from __future__ import annotations

from wirehub.metrics import histogram_lines


def test_histogram_lines_are_cumulative():
    assert histogram_lines("h_seconds", (0.001, 0.5), [2, 0, 3], 4.25) == [
        "# TYPE h_seconds histogram",
        'h_seconds_bucket{le="0.001"} 2',
        'h_seconds_bucket{le="0.5"} 2',
        'h_seconds_bucket{le="+Inf"} 5',
        "h_seconds_sum 4.25",
        "h_seconds_count 5",
    ]
