"""``$sys:metrics``: the gateway's own numbers, live, for whoever may read them.

A subscriber (with the ``sys:metrics`` permission, ``admin``, or any
connection of an open gateway) gets ``subscribed``, then at once a
``metrics_snapshot``, then a ``metrics_update`` every ``interval_s`` for as
long as the channel has a subscriber. Both are ``message``s on the channel
whose ``data`` is::

    {"type": "metrics_update", "ts": 1767225600.0,
     "metrics": {"interval_s": 5.0,
                 "nodes": [{"node": "web-1/4242", "window_s": 5.0, "connections": 2, ...}],
                 "total": {"connections": 2, ...}}}

one entry per node (one process today) and their sum in ``total``, so that
several workers or nodes extend the list without changing the shape. Every
field is described in docs/operations.md.

**The snapshot** is published on the channel right after the subscriber is
joined, so it takes the next offset: the channel's offsets stay consecutive
(a client that drops offsets at or below the ``subscribed`` position gets it),
and viewers already there receive it too, as one more sample.

**Rates** are counter deltas over a *window*, divided by its length
(``window_s``), on the gateway's clock. A window starts at start-up, with
each update, and with the snapshot of a first viewer (the timer starts
then), so an update covers exactly one interval; the snapshot of a later
viewer covers the running window so far and leaves it running. The
channel's own publications and deliveries are counted in no window. The
snapshot of a first viewer therefore averages over the time since the
channel was last watched (or since start): ``window_s`` says how long.

**The timer** runs only while the channel has viewers: the first subscribe
starts it and ``vacated`` (the last viewer left) cancels it; nothing is
sampled or published while nobody watches.

The gateway is duck-typed (this layer imports neither it nor the hub): the
source reads ``gateway.metrics``, ``gateway.hub`` (subscriptions, channels,
patterns), ``gateway.gc_watch`` (collector pauses), ``gateway.clock`` (time
and timers) and ``gateway.sources`` (Docker log streams, when installed).
"""

from __future__ import annotations

import heapq
import logging
import os
import socket
from operator import attrgetter, itemgetter
from typing import Any

import msgspec

from ..protocol.errors import (
    CloseCode,
    ErrorCode,
    Forbidden,
    InvalidChannel,
    InvalidField,
)
from ..protocol.messages import Subscribe, Subscribed
from ..protocol.patterns import METRICS_CHANNEL
from .base import Answer, SourceHost, Subscriber

logger = logging.getLogger("wirehub.sources.metrics")

PREFIX = "$sys:"
SNAPSHOT, UPDATE = "metrics_snapshot", "metrics_update"

# Per-second rates: the field, and the counter of ``Metrics`` it is the rate of.
RATES = (
    ("publications_per_s", "publications_total"),
    ("deliveries_per_s", "deliveries_total"),
    ("messages_in_per_s", "messages_received_total"),
    ("bytes_in_per_s", "received_bytes_total"),
    ("bytes_out_per_s", "delivered_bytes_total"),
)
RATE_DIGITS = 3
PER_NODE = frozenset({"node", "uptime_s", "window_s"})
TOP_CHANNELS = 10  # entries of ``top_channels``
_members, _count = attrgetter("members"), itemgetter(1)


def top_channels(counts: Any) -> list[dict[str, Any]]:
    """The ``TOP_CHANNELS`` largest of ``(channel, subscribers)`` pairs, most
    subscribers first (ties in the order given): one pass, a heap of ten."""
    busiest = heapq.nlargest(TOP_CHANNELS, counts, key=_count)
    return [{"channel": name, "subscribers": subscribers} for name, subscribers in busiest]


def total(nodes: list[dict[str, Any]]) -> dict[str, Any]:
    """The sum of the nodes' entries: every count, gauge and rate adds up
    (``node``, ``uptime_s`` and ``window_s`` describe one node and are left out);
    ``top_channels`` are merged, a channel's subscribers summed over the nodes."""
    summed: dict[str, Any] = {}
    merged: dict[str, int] | None = None
    for node in nodes:
        for name, value in node.items():
            if name == "top_channels":
                merged = {} if merged is None else merged
                for entry in value:
                    merged[entry["channel"]] = merged.get(entry["channel"], 0) + entry["subscribers"]
            elif name not in PER_NODE:
                summed[name] = summed.get(name, 0) + value
    for name, value in summed.items():
        if isinstance(value, float):
            summed[name] = round(value, RATE_DIGITS if name.endswith("_per_s") else 6)
    if merged is not None:
        summed["top_channels"] = top_channels(merged.items())
    return summed


class MetricsSource:
    """The ``$sys:metrics`` channel (a ``Source`` owning ``$sys:*``).

    Args:
        gateway: what the metrics are read from (duck-typed, see the module).
        interval_s: seconds between two ``metrics_update`` messages.
    """

    def __init__(self, gateway: Any, *, interval_s: float = 5.0) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be > 0")
        self.interval_s = interval_s
        self.node = f"{socket.gethostname()}/{os.getpid()}"
        self._gateway = gateway
        self._clock = gateway.clock
        self._host: SourceHost | None = None
        self._timer: Any = None
        self._started = self._clock.monotonic()
        # The window the rates cover: when it started, and the counters then.
        self._window_start = self._started
        self._baseline = self._read_counters()
        self._rates = dict.fromkeys((name for name, _ in RATES), 0.0)  # the last ones computed
        self.sent = 0  # snapshots and updates published

    @property
    def watching(self) -> bool:
        """Whether the timer runs (the channel has viewers)."""
        return self._timer is not None

    # -- Source ---------------------------------------------------------------

    def owns(self, channel: str) -> bool:
        return channel.startswith(PREFIX)

    def shares(self, channel: str) -> bool:
        return False  # each gateway describes itself

    def bind(self, host: SourceHost) -> None:
        self._host = host

    async def start(self) -> None:
        self._started = self._window_start = self._clock.monotonic()
        self._baseline = self._read_counters()

    async def close(self) -> None:
        self._stop()

    def subscribe(self, conn: Subscriber, channel: str, request: Subscribe, answer: Answer) -> bool:
        if channel != METRICS_CHANNEL:
            raise InvalidChannel(f"no such reserved channel: {channel[:64]!r} (there is {METRICS_CHANNEL})")
        if request.tail is not None:
            raise InvalidField(f"{METRICS_CHANNEL} keeps no history: a metrics_snapshot follows `subscribed`")
        if not self._host.allowed(conn, channel):
            raise Forbidden(f"not allowed to subscribe to {channel!r}: it needs the sys:metrics permission")
        # ``since`` is not refused (a reconnecting client sends it): the
        # snapshot replaces a recovery, and the reply carries no ``recovered``.
        answer(Subscribed(channel, request.id))
        self._host.join(conn, channel, request.max_rate)
        first = self._timer is None
        if first:
            self._timer = self._clock.call_later(self.interval_s, self._tick)
        # The first viewer's snapshot starts a window (the next update covers
        # one interval); a later viewer's leaves the running window alone.
        self._send(SNAPSHOT, new_window=first)
        return False

    def cancel(self, conn: Subscriber, channel: str) -> bool:
        return False  # answered at once: never pending

    def forget(self, conn: Subscriber) -> None:
        pass

    def vacated(self, channel: str) -> None:
        self._stop()

    # -- samples ----------------------------------------------------------------

    def _stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _tick(self) -> None:
        self._timer = None
        if not self._host.viewers(METRICS_CHANNEL):
            return
        self._timer = self._clock.call_later(self.interval_s, self._tick)
        self._send(UPDATE, new_window=True)

    def _send(self, kind: str, *, new_window: bool) -> None:
        now = self._clock.monotonic()
        before = self._read_counters()
        try:
            self._host.emit(METRICS_CHANNEL, msgspec.json.encode(self.message(kind)))
            self.sent += 1
        except Exception:
            logger.exception("%s failed", kind)
        # This message's own publication and deliveries are in no window.
        after = self._read_counters()
        if new_window:
            self._window_start, self._baseline = now, after
        else:
            self._baseline = {counter: self._baseline[counter] + after[counter] - before[counter]
                              for counter in after}

    def message(self, kind: str = SNAPSHOT) -> dict[str, Any]:
        """A ``metrics_snapshot`` or ``metrics_update`` as of now (no window changes)."""
        nodes = [self.sample()]
        return {"type": kind, "ts": round(self._clock.wall(), 3),
                "metrics": {"interval_s": self.interval_s, "nodes": nodes, "total": total(nodes)}}

    def sample(self) -> dict[str, Any]:
        """This node's entry: gauges now, rates over the window so far, totals since start."""
        gateway = self._gateway
        metrics, hub, watch = gateway.metrics, gateway.hub, gateway.gc_watch
        now = self._clock.monotonic()
        window_s = now - self._window_start
        if window_s > 0:
            counters, baseline = self._read_counters(), self._baseline
            self._rates = {name: round((counters[counter] - baseline[counter]) / window_s, RATE_DIGITS)
                           for name, counter in RATES}
        # else: a window that has just started repeats the last rates.
        return {
            "node": self.node,
            "uptime_s": round(now - self._started, 3),
            "window_s": round(window_s, 3),
            "connections": metrics.connections_current,
            "subscriptions": hub.subscription_count,
            "channels": len(hub.channels),
            "patterns": len(hub.patterns),
            **self._rates,
            "slow_consumer_closes_total": metrics.closes_total[CloseCode.TRY_AGAIN_LATER],
            "lagged_total": metrics.lagged_total,
            "dropped_total": metrics.dropped_total,
            "rate_limited_total": metrics.errors_total[ErrorCode.RATE_LIMITED],
            "forbidden_total": metrics.errors_total[ErrorCode.FORBIDDEN],
            "refused_connections_total": sum(metrics.refusals_total.values()),
            "gc_collections_total": sum(watch.collections),
            "gc_pause_seconds_total": round(watch.pause_seconds, 6),
            "docker_log_streams": self._log_streams(),
            # One pass in C over the channels (the length of each one's member
            # dict): about 0.2 µs a channel, once per sample.
            "top_channels": top_channels(zip(hub.channels, map(len, map(_members, hub.channels.values())))),
        }

    def _read_counters(self) -> dict[str, int]:
        metrics = self._gateway.metrics
        return {counter: getattr(metrics, counter) for _, counter in RATES}

    def _log_streams(self) -> int:
        """Container log streams followed now, by the Docker sources installed (0 without)."""
        running = 0
        for source in self._gateway.sources:
            stats = getattr(getattr(source, "logs", source), "stats", None)
            running += getattr(stats, "running", 0)
        return running
