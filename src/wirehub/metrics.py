"""Counters and gauges, rendered in the Prometheus text format on ``/metrics``.

Plain integer attributes: the hot path increments them without locks or
label lookups (each worker is one thread); labelled counters are dicts that
only the rare paths (errors, closes) touch.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence


class Metrics:
    __slots__ = ("connections_total", "connections_current", "messages_received_total",
                 "publications_total", "deliveries_total", "errors_total", "closes_total",
                 "http_requests_total", "refusals_total", "auth_failures_total", "dropped_total",
                 "lagged_total", "recoveries_total", "duplicate_publishes_total", "received_bytes_total",
                 "delivered_bytes_total", "collectors")

    def __init__(self) -> None:
        self.connections_total = 0
        self.connections_current = 0
        self.messages_received_total = 0
        self.publications_total = 0
        self.deliveries_total = 0
        self.errors_total: Counter[str] = Counter()
        self.closes_total: Counter[int] = Counter()
        self.http_requests_total: Counter[int] = Counter()
        self.refusals_total: Counter[str] = Counter()
        self.auth_failures_total: Counter[str] = Counter()
        self.dropped_total = 0      # publications a slow-consumer policy or max_rate did not deliver
        self.lagged_total = 0       # ``lagged`` notices sent
        self.duplicate_publishes_total = 0  # publishes dropped as retries of an accepted idempotency key
        self.recoveries_total: Counter[str] = Counter()  # subscribes with ``since``, by result
        # Counted where the size is at hand, never per byte or per subscriber:
        # the payloads of the messages clients sent (as the listener hands
        # them over, inflated), and the frames of the publications delivered
        # (counted once per fan-out group: a frame's size times the batches
        # it reached). Replies, pings and handshakes are not counted.
        self.received_bytes_total = 0
        self.delivered_bytes_total = 0
        # Callables returning more exposition lines (sources add theirs).
        self.collectors: list[Callable[[], list[str]]] = []

    def render(self, subscriptions: int, channels: int) -> str:
        """Return the Prometheus exposition text."""
        lines = [
            "# TYPE wirehub_connections_total counter",
            f"wirehub_connections_total {self.connections_total}",
            "# TYPE wirehub_connections gauge",
            f"wirehub_connections {self.connections_current}",
            "# TYPE wirehub_subscriptions gauge",
            f"wirehub_subscriptions {subscriptions}",
            "# TYPE wirehub_channels gauge",
            f"wirehub_channels {channels}",
            "# TYPE wirehub_messages_received_total counter",
            f"wirehub_messages_received_total {self.messages_received_total}",
            "# TYPE wirehub_publications_total counter",
            f"wirehub_publications_total {self.publications_total}",
            "# TYPE wirehub_deliveries_total counter",
            f"wirehub_deliveries_total {self.deliveries_total}",
            "# TYPE wirehub_received_bytes_total counter",
            f"wirehub_received_bytes_total {self.received_bytes_total}",
            "# TYPE wirehub_delivered_bytes_total counter",
            f"wirehub_delivered_bytes_total {self.delivered_bytes_total}",
            "# TYPE wirehub_dropped_total counter",
            f"wirehub_dropped_total {self.dropped_total}",
            "# TYPE wirehub_lagged_total counter",
            f"wirehub_lagged_total {self.lagged_total}",
            "# TYPE wirehub_duplicate_publishes_total counter",
            f"wirehub_duplicate_publishes_total {self.duplicate_publishes_total}",
            "# TYPE wirehub_errors_total counter",
        ]
        lines += [f'wirehub_errors_total{{code="{code}"}} {n}' for code, n in sorted(self.errors_total.items())]
        lines.append("# TYPE wirehub_recoveries_total counter")
        lines += [f'wirehub_recoveries_total{{result="{r}"}} {n}'
                  for r, n in sorted(self.recoveries_total.items())]
        lines.append("# TYPE wirehub_closes_total counter")
        lines += [f'wirehub_closes_total{{code="{code}"}} {n}' for code, n in sorted(self.closes_total.items())]
        lines.append("# TYPE wirehub_http_requests_total counter")
        lines += [f'wirehub_http_requests_total{{status="{s}"}} {n}'
                  for s, n in sorted(self.http_requests_total.items())]
        lines.append("# TYPE wirehub_refusals_total counter")
        lines += [f'wirehub_refusals_total{{reason="{r}"}} {n}' for r, n in sorted(self.refusals_total.items())]
        lines.append("# TYPE wirehub_auth_failures_total counter")
        lines += [f'wirehub_auth_failures_total{{code="{c}"}} {n}'
                  for c, n in sorted(self.auth_failures_total.items())]
        for collect in self.collectors:
            lines += collect()
        return "\n".join(lines) + "\n"


def histogram_lines(name: str, bounds: Sequence[float], counts: Sequence[int], total: float) -> list[str]:
    """A Prometheus histogram from per-bucket counts.

    ``counts[i]`` counts the observations in ``(bounds[i - 1], bounds[i]]``,
    and the one extra last entry those above every bound; the exposition
    format wants them cumulative, ending with ``le="+Inf"``.
    """
    lines = [f"# TYPE {name} histogram"]
    seen = 0
    for bound, n in zip([*map(repr, bounds), "+Inf"], counts, strict=True):
        seen += n
        lines.append(f'{name}_bucket{{le="{bound}"}} {seen}')
    lines += [f"{name}_sum {total!r}", f"{name}_count {seen}"]
    return lines
