"""Microbenchmarks of each hot-path module, Cython against its pure-Python twin."""

from __future__ import annotations

import json

import pytest
from ci_workloads import NullLoop, NullTransport  # bench/ is on sys.path under pytest

CHANNEL = b"telemetry.node-17.cpu"
DATA_64 = json.dumps({"seq": 123456, "t": 1732600000.123456, "v": "x" * 20}).encode()[:64]


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


@pytest.mark.benchmark(group="reply to each of 100 batches + flush")
def test_replies(benchmark, impl):
    # The echo/ping pattern: every connection gets one small frame a tick, and
    # each batch takes and gives back its buffer (the Flusher keeps spares).
    flusher = impl.fanout.Flusher(NullLoop())
    batches = [impl.fanout.OutBatch(flusher, NullTransport(), 1 << 30, lambda: None) for _ in range(100)]
    pong = b'{"type":"pong","id":"' + DATA_64 + b'"}'

    def reply_and_flush():
        for batch in batches:
            batch.push_frame(1, pong)
        flusher.flush()

    benchmark(reply_and_flush)


@pytest.mark.benchmark(group="bucket.consume x1000")
def test_bucket(benchmark, impl):
    bucket = impl.bucket.TokenBucket(1e9, 1e9, 0.0)

    def consume_many():
        now = 1.0
        for _ in range(1000):
            bucket.consume(1.0, now)
            now += 1e-6

    benchmark(consume_many)


JSON_1K = json.dumps([{"host": f"node-{i}", "cpu": i * 1.5, "state": "running"}
                      for i in range(24)]).encode()[:1024]


@pytest.mark.benchmark(group="deflate.compress 1 KiB JSON (no context takeover)")
def test_deflate_compress(benchmark, impl):
    deflater = impl.deflate.Deflater(no_context_takeover=True)
    benchmark(deflater.compress, JSON_1K)


@pytest.mark.benchmark(group="deflate.inflate 1 KiB JSON (no context takeover)")
def test_deflate_inflate(benchmark, impl):
    compressed = impl.deflate.Deflater(no_context_takeover=True).compress(JSON_1K)
    inflater = impl.deflate.Inflater(no_context_takeover=True, max_message_bytes=1 << 20)
    benchmark(inflater.feed, compressed, True)


@pytest.mark.benchmark(group="frame.build_frame (130 B message)")
def test_build_frame(benchmark, impl):
    payload = b'{"type":"message","channel":"c","offset":1,"data":' + DATA_64 + b"}"
    benchmark(impl.frame.build_frame, 1, payload)


class _PicowsStandIn:
    """The guard's inner protocol: hands out one read buffer, drops what is read.

    ``listener`` is set, as picows sets it once the upgrade request is
    answered: the guard's first read is the request, every later one is scanned.
    """

    listener = object()

    def __init__(self, size):
        self.buffer = bytearray(size)

    def get_buffer(self, size_hint):
        return memoryview(self.buffer)

    def buffer_updated(self, nbytes):
        pass


@pytest.mark.benchmark(group="readahead scan of a 65 KiB read (500 masked frames)")
def test_readahead_scan(benchmark, impl):
    # 500 masked 125-byte text frames: what a busy publisher's read looks like.
    frame = bytes([0x81, 0x80 | 125]) + b"\x00\x00\x00\x00" + b"x" * 125
    data = frame * 500
    inner = _PicowsStandIn(len(data))
    inner.buffer[:] = data
    guard = impl.readahead.ReadAheadGuard(inner, 1 << 20)
    guard.get_buffer(-1)
    guard.buffer_updated(0)  # "the upgrade request"

    def read():
        guard.get_buffer(-1)
        guard.buffer_updated(len(data))

    benchmark(read)
