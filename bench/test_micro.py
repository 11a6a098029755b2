"""Microbenchmarks of each hot-path module, Cython against its pure-Python twin."""

from __future__ import annotations

import json

import pytest

CHANNEL = b"telemetry.node-17.cpu"
DATA_64 = json.dumps({"seq": 123456, "t": 1732600000.123456, "v": "x" * 20}).encode()[:64]


class NullLoop:
    def call_soon(self, fn, *args):
        pass


class NullTransport:
    """Accepts writes and discards them (measures batching, not the kernel)."""

    def write(self, data):
        pass

    def writelines(self, chunks):
        pass

    def get_write_buffer_size(self):
        return 0

    def get_extra_info(self, name, default=None):
        return default


@pytest.mark.benchmark(group="tlv.encode message (64 B data)")
def test_tlv_encode(benchmark, impl):
    records = [(1, b"message"), (2, CHANNEL), (5, b"\x00" * 8), (3, DATA_64)]
    benchmark(impl.tlv.encode, records)


@pytest.mark.benchmark(group="tlv.decode publish (64 B data)")
def test_tlv_decode(benchmark, impl):
    payload = impl.tlv.encode([(1, b"publish"), (2, CHANNEL), (3, DATA_64), (4, b"req-1")])
    benchmark(impl.tlv.decode, payload)


@pytest.mark.benchmark(group="frame.is_utf8 (4 KiB mixed text)")
def test_utf8(benchmark, impl):
    text = ("telemetry ✓ " * 400).encode()[:4096]
    benchmark(impl.frame.is_utf8, text)


@pytest.mark.benchmark(group="fanout 1 frame -> 1,000 batches + flush")
def test_fanout(benchmark, impl):
    flusher = impl.fanout.Flusher(NullLoop())
    batches = [impl.fanout.OutBatch(flusher, NullTransport(), 1 << 30, lambda: None) for _ in range(1000)]
    frame = impl.frame.build_frame(1, b'{"type":"message","channel":"c","offset":1,"data":' + DATA_64 + b"}")

    def publish_and_flush():
        impl.fanout.fanout(batches, frame)
        flusher.flush()

    benchmark(publish_and_flush)


@pytest.mark.benchmark(group="fanout 32 frames -> 1,000 batches, 1 flush")
def test_fanout_batched(benchmark, impl):
    flusher = impl.fanout.Flusher(NullLoop())
    batches = [impl.fanout.OutBatch(flusher, NullTransport(), 1 << 30, lambda: None) for _ in range(1000)]
    frame = impl.frame.build_frame(1, b'{"type":"message","channel":"c","offset":1,"data":' + DATA_64 + b"}")

    def burst():
        for _ in range(32):
            impl.fanout.fanout(batches, frame)
        flusher.flush()

    benchmark(burst)


@pytest.mark.benchmark(group="bucket.consume x1000")
def test_bucket(benchmark, impl):
    bucket = impl.bucket.TokenBucket(1e9, 1e9, 0.0)

    def consume_many():
        now = 1.0
        for _ in range(1000):
            bucket.consume(1.0, now)
            now += 1e-6

    benchmark(consume_many)
