"""What history and slow-consumer policies add to the publish path, counted by callgrind.

``bench/delivery.py instructions`` runs this file under valgrind exactly as
``bench/ci.py`` runs ``ci_workloads.py`` (every measured call goes through
``sys.call_tracing``, one dump per label printed), with the compiled build:

* ``fanout`` / ``fanout_held``: one frame to 1,000 batches, 16 a tick, 4 ticks,
  through ``fanout`` and through ``fanout_held`` with ``CONFLATE`` and
  nobody slow (the path every subscriber of a policy channel takes);
* ``publish`` / ``publish_history``: 64 publications through the hub and the
  memory broker to 1,000 subscribers, without and with ``history_size``.
"""

from __future__ import annotations

import gc
import json
import sys
from types import SimpleNamespace
from typing import Any

import ci_workloads
from ci_workloads import DATA_64, MESSAGE, NullLoop, NullTransport, Run

from wirehub import ChannelOptions, _speedups
from wirehub.broker.memory import MemoryBroker
from wirehub.delivery import ChannelPolicies
from wirehub.hub import Hub
from wirehub.metrics import Metrics
from wirehub.protocol.codec import JsonCodec, TlvCodec

SUBSCRIBERS = 1000


def _batches(impl: SimpleNamespace) -> tuple[Any, list[Any]]:
    flusher = impl.fanout.Flusher(NullLoop())
    return flusher, [impl.fanout.OutBatch(flusher, NullTransport(), 1 << 30, lambda: None)
                     for _ in range(SUBSCRIBERS)]


def fanout_held(impl: SimpleNamespace) -> Run:
    flusher, batches = _batches(impl)
    frame = impl.frame.build_frame(1, MESSAGE)
    conflate = impl.fanout.SlowConsumer.CONFLATE

    def run() -> None:
        for offset in range(4):
            for _ in range(16):
                impl.fanout.fanout_held(batches, frame, None, "c", offset, None, conflate, 1 << 20, None)
            flusher.flush()
    return run


class _Subscriber:
    """What the hub reads of a connection, with a real batch."""

    def __init__(self, n: int, batch: Any) -> None:
        self.client_id, self.batch, self.fanout_group = f"c{n}", batch, None
        self.subscriptions: set[str] | frozenset[str] = frozenset()


def _publishing(impl: SimpleNamespace, channels: list[ChannelOptions]) -> Run:
    flusher, batches = _batches(impl)
    hub = Hub(MemoryBroker(), impl, JsonCodec(), TlvCodec(impl.tlv), Metrics(), max_channel_length=255,
              max_subscriptions=128, shared_compressors={}, compress_threshold_bytes=1024,
              policies=ChannelPolicies(channels))
    for n, batch in enumerate(batches):
        hub.join(_Subscriber(n, batch), "telemetry")

    def run() -> None:
        for _ in range(4):
            for _ in range(16):
                hub.publish("telemetry", DATA_64)
            flusher.flush()
    return run


WORKLOADS = {
    "fanout": lambda impl: ci_workloads.fanout(impl, SUBSCRIBERS),
    "fanout_held": fanout_held,
    "publish": lambda impl: _publishing(impl, []),
    "publish_history": lambda impl: _publishing(impl, [ChannelOptions(pattern="**", history_size=100_000)]),
}


def main() -> None:
    labels = []
    impl = _speedups.load("ext")
    for name, make in WORKLOADS.items():
        run = make(impl)
        run()  # warm-up, not measured
        gc.collect()
        gc.disable()
        sys.call_tracing(run, ())
        gc.enable()
        labels.append(name)
    print(json.dumps(labels))


if __name__ == "__main__":
    main()
