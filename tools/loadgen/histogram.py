"""Log-bucketed latency histogram that merges across processes.

Same layout as ``Recorder`` in ``wirehub._ext.loadgen_client`` (keep them in
sync): values below 256 ns are exact; above, every power of two is split into
128 buckets, so a reported value is at most 0.8 % above the true one
(HdrHistogram with 2 significant digits). Percentiles report a bucket's
highest value, as HdrHistogram's ``value_at_percentile`` does, capped by the
exact maximum.
"""

from __future__ import annotations

import math
from array import array
from typing import Any

SUB_BITS = 7
SUB_HALF = 1 << SUB_BITS
SUB_COUNT = 2 * SUB_HALF
MAX_SHIFT = 33
N_BUCKETS = (MAX_SHIFT + 1) * SUB_HALF + SUB_COUNT
PERCENTILES = (50.0, 90.0, 99.0, 99.9)


def bucket_index(value: int) -> int:
    """Bucket of a non-negative value in nanoseconds."""
    if value < SUB_COUNT:
        return value
    shift = value.bit_length() - SUB_BITS - 1
    if shift > MAX_SHIFT:
        return N_BUCKETS - 1
    return shift * SUB_HALF + (value >> shift)


def bucket_high(index: int) -> int:
    """Highest value that falls in bucket ``index``."""
    if index < SUB_COUNT:
        return index
    shift = index // SUB_HALF - 1
    sub = index - shift * SUB_HALF
    return ((sub + 1) << shift) - 1


class Histogram:
    """Counts per bucket plus exact count/min/max/sum."""

    __slots__ = ("counts", "max", "min", "sum", "total")

    def __init__(self) -> None:
        self.counts = array("Q", bytes(8 * N_BUCKETS))
        self.total = 0
        self.min = 0
        self.max = 0
        self.sum = 0.0

    def record(self, value: int) -> None:
        """Add one sample (ns); negative values count as 0."""
        value = max(value, 0)
        self.counts[bucket_index(value)] += 1
        self.min = value if self.total == 0 else min(self.min, value)
        self.max = max(self.max, value)
        self.total += 1
        self.sum += value

    def merge(self, other: Histogram) -> None:
        """Add ``other``'s samples to this histogram."""
        if other.total == 0:
            return
        for i, c in enumerate(other.counts):
            if c:
                self.counts[i] += c
        self.min = other.min if self.total == 0 else min(self.min, other.min)
        self.max = max(self.max, other.max)
        self.total += other.total
        self.sum += other.sum

    def value_at(self, percentile: float) -> int:
        """Smallest bucket value with ``percentile`` % of samples at or below it."""
        if self.total == 0:
            return 0
        rank = max(1, math.ceil(percentile / 100.0 * self.total))
        seen = 0
        for i, c in enumerate(self.counts):
            seen += c
            if seen >= rank:
                return min(bucket_high(i), self.max)
        return self.max

    def summary_us(self) -> dict[str, float]:
        """Percentiles, mean and max in microseconds (what reports print)."""
        if self.total == 0:
            return {"count": 0}
        out: dict[str, float] = {"count": self.total}
        for p in PERCENTILES:
            out[f"p{p:g}"] = self.value_at(p) / 1e3
        out["max"] = self.max / 1e3
        out["mean"] = self.sum / self.total / 1e3
        return out

    def to_wire(self) -> dict[str, Any]:
        """Picklable snapshot for the pipe between worker and runner."""
        return {"counts": self.counts.tobytes(), "total": self.total, "min": self.min,
                "max": self.max, "sum": self.sum}

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> Histogram:
        """Inverse of ``to_wire``; also accepts a recorder snapshot."""
        h = cls()
        h.counts = array("Q", wire["counts"])
        if len(h.counts) != N_BUCKETS:
            raise ValueError("histogram layout mismatch between client builds")
        h.total, h.min, h.max, h.sum = wire["total"], wire["min"], wire["max"], wire["sum"]
        return h
