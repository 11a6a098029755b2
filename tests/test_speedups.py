"""The Cython hot path against its pure-Python references: one suite, both builds."""

from __future__ import annotations

import asyncio
import random
import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import msgspec

from wirehub import _speedups
from wirehub.protocol.codec import JsonCodec, Tag, TlvCodec
from wirehub.protocol.messages import Message

EXT = _speedups.load("ext")
PURE = _speedups.load("pure")
BOUNDARY_SIZES = [0, 1, 125, 126, 127, 65535, 65536, 70000]


class TestTlv:
    def test_round_trip(self, impl):
        records = [(1, b"publish"), (2, b"chan"), (3, b"\x00\xff" * 10), (255, b"")]
        assert impl.tlv.decode(impl.tlv.encode(records)) == records

    def test_empty_message_has_no_records(self, impl):
        assert impl.tlv.decode(b"") == []

    @pytest.mark.parametrize("size", BOUNDARY_SIZES)
    def test_value_sizes(self, impl, size):
        value = bytes(range(256)) * (size // 256) + bytes(size % 256)
        encoded = impl.tlv.encode([(3, value)])
        assert encoded[:5] == b"\x03" + struct.pack(">I", size)
        assert impl.tlv.decode(encoded) == [(3, value)]

    @pytest.mark.parametrize("data, error", [
        (b"\x01\x00\x00", "truncated TLV header at byte 0"),
        (b"\x01\x00\x00\x00\x05abc", "TLV record at byte 0 declares 5 bytes, 3 remain"),
        (b"\x01\x00\x00\x00\x00\x02", "truncated TLV header at byte 5"),
        (b"\x01\xff\xff\xff\xff", "TLV record at byte 0 declares 4294967295 bytes, 0 remain"),
    ])
    def test_malformed_input_is_refused(self, impl, data, error):
        with pytest.raises(ValueError) as exc:
            impl.tlv.decode(data)
        assert str(exc.value) == error

    def test_record_count_is_limited(self, impl):
        with pytest.raises(ValueError, match="more than 4 TLV records"):
            impl.tlv.decode(b"\x01\x00\x00\x00\x00" * 5, 4)

    def test_tag_must_fit_a_byte(self, impl):
        with pytest.raises(ValueError, match="does not fit in one byte"):
            impl.tlv.encode([(256, b"")])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=300)), max_size=20))
def test_tlv_implementations_agree_on_round_trips(records):
    encoded = EXT.tlv.encode(records)
    assert encoded == PURE.tlv.encode(records)
    assert EXT.tlv.decode(encoded) == PURE.tlv.decode(encoded) == records


def _decode_outcome(tlv, data: bytes):
    try:
        return ("ok", tlv.decode(data))
    except ValueError as exc:
        return ("error", str(exc))


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=64))
def test_tlv_implementations_refuse_the_same_inputs(data):
    assert _decode_outcome(EXT.tlv, data) == _decode_outcome(PURE.tlv, data)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=40)), min_size=1, max_size=8),
       st.integers(0, 10_000), st.binary(min_size=1, max_size=3))
def test_tlv_implementations_agree_on_mutations(records, position, noise):
    data = bytearray(EXT.tlv.encode(records))
    pos = position % len(data)
    data[pos:pos + len(noise)] = noise
    assert _decode_outcome(EXT.tlv, bytes(data)) == _decode_outcome(PURE.tlv, bytes(data))


class TestUtf8:
    @pytest.mark.parametrize("data", [
        b"", b"ascii only", "héllo wörld".encode(), "𝄞 and ☃".encode(), "\U0010ffff".encode(),
        b"x" * 1000 + "é".encode(),
    ])
    def test_valid(self, impl, data):
        assert impl.frame.is_utf8(data)

    @pytest.mark.parametrize("data", [
        b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xe2\x82", b"abc\x80",
        b"x" * 17 + b"\xc3",
    ])
    def test_invalid(self, impl, data):
        assert not impl.frame.is_utf8(data)

    def test_fails_fast_on_an_impossible_prefix(self, impl):
        validator = impl.frame.Utf8Validator()
        assert validator.feed(b"ok so far")
        assert not validator.feed(b"\xf4\x90")  # above U+10FFFF: no continuation can fix it

    def test_sequence_split_across_fragments(self, impl):
        validator = impl.frame.Utf8Validator()
        snowman = "☃".encode()
        assert validator.feed(snowman[:1]) and validator.feed(snowman[1:2])
        assert validator.feed(snowman[2:]) and validator.finish()

    def test_truncated_at_the_end_fails_finish(self, impl):
        validator = impl.frame.Utf8Validator()
        assert validator.feed("☃".encode()[:2])
        assert not validator.finish()
        assert validator.feed(b"fresh") and validator.finish()  # finish() resets


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=40))
def test_utf8_validators_agree_with_python(data):
    try:
        data.decode("utf-8")
        expected = True
    except UnicodeDecodeError:
        expected = False
    assert EXT.frame.is_utf8(data) == PURE.frame.is_utf8(data) == expected


class TestBuildFrame:
    @pytest.mark.parametrize("size, header", [
        (0, b"\x81\x00"), (125, b"\x81\x7d"), (126, b"\x81\x7e\x00\x7e"),
        (65535, b"\x81\x7e\xff\xff"), (65536, b"\x81\x7f" + struct.pack(">Q", 65536)),
    ])
    def test_header_lengths(self, impl, size, header):
        payload = b"a" * size
        assert impl.frame.build_frame(1, payload) == header + payload

    def test_binary_and_rsv1(self, impl):
        assert impl.frame.build_frame(2, b"\x00", True) == b"\xc2\x01\x00"

    @pytest.mark.parametrize("size", [0, 100, 125 - 60, 70_000])
    def test_a_message_frame_is_its_parts_framed_and_its_payload_a_view(self, impl, size):
        data = msgspec.Raw(b'{"k":"' + b"v" * size + b'"}')
        frame = impl.frame.build_message_frame(1, b"<head>", data, b"<tail>")
        assert frame == impl.frame.build_frame(1, b"<head>" + bytes(data) + b"<tail>")
        payload = impl.frame.frame_payload(frame)
        assert payload.obj is frame and payload == b"<head>" + bytes(data) + b"<tail>"


class TestMessageEnds:
    """The fan-out frames a publication from the codec's two ends around its
    data; they must give exactly what encoding the whole ``message`` with
    the general encoders gives (msgspec's ``Message``, TLV records)."""

    @given(channel=st.text(min_size=1, max_size=40), offset=st.integers(0, 2**63 - 1),
           data=st.sampled_from([b"1", b'{"a":[1,2]}', b'"\\u00e9\\n"', b"null"]))
    def test_json(self, channel, offset, data):
        head, tail = JsonCodec().message_ends(channel, offset)
        assert head + data + tail == msgspec.json.encode(Message(channel, offset, msgspec.Raw(data)))

    @given(channel=st.text(min_size=1, max_size=40), offset=st.integers(0, 2**63 - 1),
           data=st.binary(max_size=300))
    def test_tlv(self, channel, offset, data):
        records = [(Tag.TYPE, b"message"), (Tag.CHANNEL, channel.encode()), (Tag.OFFSET, struct.pack(">Q", offset)),
                   (Tag.DATA, data)]
        for impl in (EXT, PURE):
            head, tail = TlvCodec(impl.tlv).message_ends(channel, offset, len(data))
            assert head + data + tail == impl.tlv.encode(records)


class TestTokenBucket:
    def test_burst_then_refill(self, impl):
        bucket = impl.bucket.TokenBucket(10.0, 3.0, 100.0)
        assert [bucket.consume(1, 100.0) for _ in range(4)] == [True, True, True, False]
        # 0.25 s at 10/s refills 2.5 tokens
        assert [bucket.consume(1, 100.25) for _ in range(3)] == [True, True, False]

    def test_never_exceeds_burst(self, impl):
        bucket = impl.bucket.TokenBucket(1000.0, 5.0, 0.0)
        assert bucket.consume(5, 3600.0)
        assert not bucket.consume(1, 3600.0)

    def test_amount_larger_than_burst_is_refused(self, impl):
        bucket = impl.bucket.TokenBucket(100.0, 50.0, 0.0)
        assert not bucket.consume(51, 10.0)

    def test_zero_rate_is_unlimited(self, impl):
        bucket = impl.bucket.TokenBucket(0.0, 0.0, 0.0)
        assert all(bucket.consume(1e9, 0.0) for _ in range(100))

    def test_invalid_parameters(self, impl):
        with pytest.raises(ValueError):
            impl.bucket.TokenBucket(-1.0, 1.0)
        with pytest.raises(ValueError):
            impl.bucket.TokenBucket(1.0, 0.0)

    def test_implementations_agree_on_a_random_schedule(self):
        rng = random.Random(20261126)
        ext, pure = EXT.bucket.TokenBucket(50.0, 20.0, 0.0), PURE.bucket.TokenBucket(50.0, 20.0, 0.0)
        now = 0.0
        for _ in range(5000):
            now += rng.random() * 0.05
            amount = rng.choice([1, 1, 2, 5])
            assert ext.consume(amount, now) == pure.consume(amount, now)


class FakeTimer:
    def __init__(self, when, fn, args):
        self.when, self.fn, self.args, self.cancelled = when, fn, args, False

    def cancel(self):
        self.cancelled = True


class FakeLoop:
    """Collects ``call_soon`` callbacks so a test decides when a tick ends.

    Its clock only moves when a test says so (``advance``), so pacing is
    tested without sleeping.
    """

    def __init__(self):
        self.callbacks = []
        self.timers = []
        self.now = 100.0

    def call_soon(self, fn, *args):
        handle = FakeTimer(self.now, fn, args)
        self.callbacks.append(handle)
        return handle

    def time(self):
        return self.now

    def call_at(self, when, fn, *args):
        timer = FakeTimer(when, fn, args)
        self.timers.append(timer)
        return timer

    def advance(self, seconds):
        """Move the clock, run the timers that came due, then one tick."""
        self.now += seconds
        due = [t for t in self.timers if t.when <= self.now]
        self.timers = [t for t in self.timers if t.when > self.now]
        for timer in due:
            if not timer.cancelled:
                timer.fn(*timer.args)
        self.run_tick()

    def run_tick(self):
        callbacks, self.callbacks = self.callbacks, []
        for handle in callbacks:
            if not handle.cancelled:
                handle.fn(*handle.args)


class RecordingTransport:
    """An in-memory transport: no socket, so every write goes through ``write``."""

    def __init__(self):
        self.writes = []
        self.buffered = 0

    def write(self, data):
        self.writes.append(bytes(data))

    def writelines(self, chunks):
        self.writes.append(b"".join(bytes(c) for c in chunks))

    def get_write_buffer_size(self):
        return self.buffered

    def get_extra_info(self, name, default=None):
        return default


class SlowTransport(RecordingTransport):
    """Every write takes ``seconds`` of the fake loop's clock (a busy kernel)."""

    def __init__(self, loop, seconds):
        super().__init__()
        self.loop, self.seconds = loop, seconds

    def write(self, data):
        self.loop.now += self.seconds
        super().write(data)


class TestFlusherPacing:
    """A fan-out flush that took t delays the next one until min(t, max_pace_s) after it."""

    def make(self, impl, write_s, max_pace_s=0.002, n=2):
        loop = FakeLoop()
        flusher = impl.fanout.Flusher(loop, max_pace_s=max_pace_s)
        transports = [SlowTransport(loop, write_s) for _ in range(n)]
        batches = [impl.fanout.OutBatch(flusher, t, 1 << 20, lambda: None) for t in transports]
        return loop, flusher, transports, batches

    def test_publications_during_the_wait_share_one_write(self, impl):
        loop, _, transports, batches = self.make(impl, write_s=0.0005)
        a, b, c = (impl.frame.build_frame(1, m) for m in (b"a", b"b", b"c"))
        impl.fanout.fanout(batches, a)
        loop.run_tick()                       # the first flush is not delayed; it takes 1 ms
        assert [t.writes for t in transports] == [[a], [a]]
        impl.fanout.fanout(batches, b)
        loop.run_tick()
        impl.fanout.fanout(batches, c)
        loop.run_tick()
        loop.advance(0.0009)                  # 1 ms after the flush ended: not yet
        assert [t.writes for t in transports] == [[a], [a]]
        loop.advance(0.0002)
        assert [t.writes for t in transports] == [[a, b + c], [a, b + c]]

    def test_a_round_already_merged_enough_does_not_wait(self, impl):
        """Waiting pays only while it merges publications: with
        ``MERGED_FRAMES`` queued per dirty batch, work is queued and the
        round starts at once; one frame fewer, and it waits out the pace."""
        for queued, written_at_once in ((impl.fanout.MERGED_FRAMES - 1, False), (impl.fanout.MERGED_FRAMES, True)):
            loop, _, transports, batches = self.make(impl, write_s=0.0005)
            frame = impl.frame.build_frame(1, b"x")
            impl.fanout.fanout(batches, frame)
            loop.run_tick()                   # took 1 ms: the next round may wait 1 ms
            for _ in range(queued):
                impl.fanout.fanout(batches, frame)
            loop.run_tick()
            assert [len(t.writes) for t in transports] == [2 if written_at_once else 1] * 2
            loop.advance(0.0011)
            assert [t.writes[1] for t in transports] == [frame * queued] * 2

    def test_the_wait_is_capped(self, impl):
        loop, _, transports, batches = self.make(impl, write_s=0.005, max_pace_s=0.002)
        frame = impl.frame.build_frame(1, b"x")
        impl.fanout.fanout(batches, frame)
        loop.run_tick()                       # took 10 ms
        impl.fanout.fanout(batches, frame)
        loop.run_tick()
        loop.advance(0.0021)
        assert [len(t.writes) for t in transports] == [2, 2]

    def test_replies_are_not_paced(self, impl):
        loop, _, transports, batches = self.make(impl, write_s=0.0005)
        frame = impl.frame.build_frame(1, b"x")
        impl.fanout.fanout(batches, frame)
        loop.run_tick()
        impl.fanout.fanout(batches, frame)    # paced...
        batches[0].push_frame(1, b"ack")      # ...but a reply goes now, with what its batch holds
        loop.run_tick()
        assert transports[0].writes == [frame, frame + impl.frame.build_frame(1, b"ack")]
        assert transports[1].writes == [frame]

    def test_quick_flushes_are_not_paced(self, impl):
        loop, _, transports, batches = self.make(impl, write_s=0.00001)
        frame = impl.frame.build_frame(1, b"x")
        for _ in range(3):
            impl.fanout.fanout(batches, frame)
            loop.run_tick()
        assert [len(t.writes) for t in transports] == [3, 3]

    @pytest.mark.parametrize("max_pace_s", [0.0, 0.002])
    def test_flush_writes_everything_now(self, impl, max_pace_s):
        loop, flusher, transports, batches = self.make(impl, write_s=0.0005, max_pace_s=max_pace_s)
        frame = impl.frame.build_frame(1, b"x")
        impl.fanout.fanout(batches, frame)
        loop.run_tick()
        impl.fanout.fanout(batches, frame)
        loop.run_tick()
        expected = 2 if max_pace_s == 0 else 1
        assert [len(t.writes) for t in transports] == [expected, expected]
        flusher.flush()
        loop.advance(0.01)                    # a cancelled wait writes nothing twice
        assert [len(t.writes) for t in transports] == [2, 2]


class TestFanoutRounds:
    """A fan-out flush writes ROUND_SLICE batches per loop iteration."""

    def make(self, impl, n, max_pace_s=0.0):
        loop = FakeLoop()
        flusher = impl.fanout.Flusher(loop, max_pace_s=max_pace_s)
        transports = [RecordingTransport() for _ in range(n)]
        batches = [impl.fanout.OutBatch(flusher, t, 1 << 20, lambda: None) for t in transports]
        return loop, flusher, transports, batches

    def test_a_publication_during_a_round_reaches_the_rest_of_it(self, impl):
        slice_ = PURE.fanout.ROUND_SLICE                 # the compiled module uses the same
        loop, _, transports, batches = self.make(impl, 3 * slice_)
        a, b = impl.frame.build_frame(1, b"a"), impl.frame.build_frame(1, b"b")
        impl.fanout.fanout(batches, a)
        loop.run_tick()                                   # slice 1 of the round
        assert [len(t.writes) for t in transports] == [1] * slice_ + [0] * 2 * slice_
        impl.fanout.fanout(batches, b)                    # arrives mid-round
        loop.run_tick()                                   # slice 2: a and b in one write
        loop.run_tick()                                   # slice 3
        assert all(t.writes == [a + b] for t in transports[slice_:])
        assert all(t.writes == [a] for t in transports[:slice_])
        loop.run_tick()                                   # next round: b for slice 1
        assert all(t.writes == [a, b] for t in transports[:slice_])
        loop.run_tick()
        assert all(len(t.writes) == 1 for t in transports[slice_:])

    def test_replies_go_out_mid_round(self, impl):
        loop, _, transports, batches = self.make(impl, 300)
        impl.fanout.fanout(batches, impl.frame.build_frame(1, b"x"))
        loop.run_tick()
        batches[-1].push_frame(1, b"ack")
        loop.run_tick()                                   # the reply's batch is written now
        assert transports[-1].writes == [impl.frame.build_frame(1, b"x") + impl.frame.build_frame(1, b"ack")]

    def test_flush_mid_round_writes_the_rest_once(self, impl):
        loop, flusher, transports, batches = self.make(impl, 300, max_pace_s=0.002)
        frame = impl.frame.build_frame(1, b"x")
        impl.fanout.fanout(batches, frame)
        loop.run_tick()
        flusher.flush()
        for _ in range(5):
            loop.advance(0.01)
        assert all(t.writes == [frame] for t in transports)


class TestRoundHistogram:
    """Every fan-out round's duration, first write to last, lands in one bucket."""

    def make(self, impl, n, write_s):
        loop = FakeLoop()
        flusher = impl.fanout.Flusher(loop, max_pace_s=0.0, clock=loop.time)
        transports = [SlowTransport(loop, write_s) for _ in range(n)]
        batches = [impl.fanout.OutBatch(flusher, t, 1 << 20, lambda: None) for t in transports]
        return loop, flusher, batches

    def bucket(self, impl, seconds):
        return next((i for i, bound in enumerate(impl.fanout.ROUND_BOUNDS_S) if seconds <= bound),
                    len(impl.fanout.ROUND_BOUNDS_S))

    def test_a_round_over_several_slices_counts_once_with_its_whole_duration(self, impl):
        slices = 3
        loop, flusher, batches = self.make(impl, slices * PURE.fanout.ROUND_SLICE, write_s=0.0001)
        assert flusher.round_histogram() == ([0] * (len(impl.fanout.ROUND_BOUNDS_S) + 1), 0.0)
        impl.fanout.fanout(batches, impl.frame.build_frame(1, b"x"))
        for _ in range(slices):
            loop.run_tick()
        counts, seconds = flusher.round_histogram()
        took = len(batches) * 0.0001                      # 9.6 ms
        assert seconds == pytest.approx(took)
        assert counts == [int(i == self.bucket(impl, took)) for i in range(len(counts))]

    def test_each_round_in_its_bucket_and_the_slowest_above_every_bound(self, impl):
        loop, flusher, _ = self.make(impl, 0, write_s=0.0)
        frame = impl.frame.build_frame(1, b"x")
        durations = [0.0, 0.0002, 0.0008, 0.012, 3.0]
        for write_s in durations:                         # one round each, one batch that takes write_s
            batch = impl.fanout.OutBatch(flusher, SlowTransport(loop, write_s), 1 << 20, lambda: None)
            batch.push(frame)
            loop.run_tick()
        counts, seconds = flusher.round_histogram()
        expected = [0] * len(counts)
        for took in durations:
            expected[self.bucket(impl, took)] += 1
        assert counts == expected and expected[-1] == 1 and expected[0] == 2
        assert seconds == pytest.approx(sum(durations))

    def test_both_twins_have_the_same_buckets(self, impl):
        assert impl.fanout.ROUND_BOUNDS_S == PURE.fanout.ROUND_BOUNDS_S
        assert list(impl.fanout.ROUND_BOUNDS_S) == sorted(set(impl.fanout.ROUND_BOUNDS_S))

    def test_a_round_cut_short_by_flush_is_not_counted(self, impl):
        loop, flusher, batches = self.make(impl, 3 * PURE.fanout.ROUND_SLICE, write_s=0.0001)
        impl.fanout.fanout(batches, impl.frame.build_frame(1, b"x"))
        loop.run_tick()
        flusher.flush()
        assert sum(flusher.round_histogram()[0]) == 0


class TestOutBatch:
    def make(self, impl, high_water=1 << 20):
        loop, transport, overflows = FakeLoop(), RecordingTransport(), []
        flusher = impl.fanout.Flusher(loop)
        batch = impl.fanout.OutBatch(flusher, transport, high_water, lambda: overflows.append(1))
        return loop, transport, batch, overflows

    def test_one_write_per_tick(self, impl):
        loop, transport, batch, _ = self.make(impl)
        frames = [impl.frame.build_frame(1, b"m%d" % i) for i in range(100)]
        for frame in frames:
            assert batch.push(frame)
        assert transport.writes == []
        loop.run_tick()
        assert transport.writes == [b"".join(frames)]
        assert batch.pending_bytes == 0

    def test_large_frames_keep_their_order(self, impl):
        loop, transport, batch, _ = self.make(impl)
        small, large = impl.frame.build_frame(2, b"s"), impl.frame.build_frame(2, b"L" * 70000)
        for frame in (small, large, small):
            batch.push(frame)
        loop.run_tick()
        assert b"".join(transport.writes) == small + large + small

    @pytest.mark.parametrize("size", BOUNDARY_SIZES)
    def test_push_frame_matches_build_frame(self, impl, size):
        loop, transport, batch, _ = self.make(impl)
        batch.push_frame(1, b"x" * size)
        loop.run_tick()
        assert b"".join(transport.writes) == impl.frame.build_frame(1, b"x" * size)

    def test_a_burst_larger_than_high_water_is_written_through(self, impl):
        # A bursty publisher can queue more than high_water_bytes for a
        # subscriber within one tick; a socket that drains is not a slow consumer.
        loop, transport, batch, overflows = self.make(impl, high_water=80_000)
        frame = impl.frame.build_frame(2, b"x" * 1000)
        assert all(batch.push(frame) for _ in range(200))
        assert b"".join(transport.writes) == frame * (200 - batch.pending_bytes // len(frame))
        loop.run_tick()
        assert b"".join(transport.writes) == frame * 200
        assert overflows == [] and not batch.overflowed

    def test_paused_batch_holds_frames_until_resumed(self, impl):
        loop, transport, batch, _ = self.make(impl)
        batch.pause()
        batch.push(b"\x81\x01a")
        loop.run_tick()
        assert transport.writes == []
        batch.resume()
        loop.run_tick()
        assert transport.writes == [b"\x81\x01a"]

    def test_overflow_drops_pending_and_reports_once(self, impl):
        loop, transport, batch, overflows = self.make(impl, high_water=100)
        batch.pause()
        frame = impl.frame.build_frame(1, b"x" * 40)
        assert batch.push(frame) and batch.push(frame)
        assert not batch.push(frame)  # 3 * 42 > 100
        assert batch.overflowed and batch.closed and batch.pending_bytes == 0
        assert not batch.push(frame)
        loop.run_tick()
        assert overflows == [1]
        assert transport.writes == []

    def test_trim_keeps_pending_frames_and_the_batch_usable(self, impl):
        loop, transport, batch, _ = self.make(impl)
        big = impl.frame.build_frame(1, b"x" * 1000)   # grows the buffer past its first size
        batch.push(big)
        batch.trim()                                   # pending: nothing is given back
        loop.run_tick()
        batch.trim()                                   # idle: the buffer goes
        batch.push(b"\x81\x01a")
        loop.run_tick()
        assert transport.writes == [big, b"\x81\x01a"]

    def test_reused_reply_buffers_never_mix_connections(self, impl):
        # Each flush gives a small buffer back for another batch to take
        # (more batches than the Flusher keeps spares); one batch outgrows
        # its buffer mid-tick, one is closed with a reply pending.
        loop = FakeLoop()
        flusher = impl.fanout.Flusher(loop)
        transports = [RecordingTransport() for _ in range(1100)]
        batches = [impl.fanout.OutBatch(flusher, t, 1 << 20, lambda: None) for t in transports]
        expected = [b""] * len(batches)
        for tick in range(3):
            for i, batch in enumerate(batches):
                payload = b"%d:%d" % (tick, i) * (100 if i == 7 and tick == 1 else 1)
                if batch.push_frame(1, payload):
                    expected[i] += impl.frame.build_frame(1, payload)
            if tick == 1:
                batches[9].close()
                expected[9] = expected[9][:len(b"".join(transports[9].writes))]
            loop.run_tick()
        assert [b"".join(t.writes) for t in transports] == expected

    def test_closed_batch_refuses_frames(self, impl):
        loop, transport, batch, _ = self.make(impl)
        batch.close()
        assert not batch.push(b"\x81\x00")
        loop.run_tick()
        assert transport.writes == []

    def test_fanout_skips_excluded_and_counts(self, impl):
        loop = FakeLoop()
        flusher = impl.fanout.Flusher(loop)
        transports = [RecordingTransport() for _ in range(5)]
        batches = [impl.fanout.OutBatch(flusher, t, 1 << 20, lambda: None) for t in transports]
        frame = impl.frame.build_frame(1, b"pub")
        assert impl.fanout.fanout(batches, frame, batches[2]) == 4
        loop.run_tick()
        assert [t.writes for t in transports] == [[frame], [frame], [], [frame], [frame]]


def run_schedule(impl, ops, n_batches=4, high_water=200_000):
    """Play ``ops`` on ``n_batches`` batches; return each transport's byte stream and state."""
    loop = FakeLoop()
    flusher = impl.fanout.Flusher(loop, max_pace_s=0.0)
    transports = [RecordingTransport() for _ in range(n_batches)]
    overflows = []
    batches = [impl.fanout.OutBatch(flusher, t, high_water, lambda i=i: overflows.append(i))
               for i, t in enumerate(transports)]
    for op, arg in ops:
        if op == "fanout":
            members, exclude, size, tag = arg
            frame = impl.frame.build_frame(1, bytes([tag]) * size)
            impl.fanout.fanout([batches[i] for i in members], frame,
                               batches[exclude] if exclude is not None else None)
        elif op == "reply":
            i, size = arg
            batches[i].push_frame(1, b"r" * size)
        elif op == "push":
            i, size = arg
            batches[i].push(impl.frame.build_frame(2, b"p" * size))
        elif op in ("pause", "resume", "trim", "close"):
            getattr(batches[arg], op)()
        elif op == "tick":
            loop.run_tick()
        elif op == "flush":
            flusher.flush()
    flusher.flush()
    return ([b"".join(t.writes) for t in transports],
            [(b.pending_bytes, b.closed, b.overflowed) for b in batches], sorted(overflows))


SIZES = st.sampled_from([1, 60, 125, 126, 3000, 17000, 40000])
OPS = st.lists(st.one_of(
    st.tuples(st.just("fanout"), st.tuples(
        st.lists(st.integers(0, 3), min_size=1, max_size=4, unique=True),
        st.one_of(st.none(), st.integers(0, 3)), SIZES, st.integers(65, 90))),
    st.tuples(st.just("reply"), st.tuples(st.integers(0, 3), SIZES)),
    st.tuples(st.just("push"), st.tuples(st.integers(0, 3), SIZES)),
    st.tuples(st.sampled_from(["pause", "resume", "trim", "close"]), st.integers(0, 3)),
    st.tuples(st.sampled_from(["tick", "flush"]), st.none()),
), max_size=60)


class TestSharedRuns:
    """``fanout`` stores a frame once and batches send byte ranges of it (ext only);
    whatever the interleaving, every connection gets what the reference sends."""

    @settings(max_examples=300, deadline=None)
    @given(OPS)
    def test_implementations_agree_on_any_schedule(self, ops):
        assert run_schedule(EXT, ops) == run_schedule(PURE, ops)

    def test_a_run_survives_a_full_chunk(self, impl):
        # The shared chunk (1 MiB) is reused once no batch points into it, and
        # a batch is written through once it holds 64 KiB. Batch 1 starts 33
        # frames ahead, so it writes through at other times than batches 0 and
        # 2, some run always pins the chunk, and ~1.1 MB in one tick overflows it.
        lead = [("fanout", ([1], None, 1000, 64)) for _ in range(33)]
        ops = [("fanout", ([0, 1, 2], None, 1000, 65 + i % 26)) for i in range(1100)]
        streams, _, _ = run_schedule(impl, lead + ops + [("tick", None)])
        frames = b"".join(impl.frame.build_frame(1, bytes([65 + i % 26]) * 1000) for i in range(1100))
        ahead = impl.frame.build_frame(1, b"@" * 1000) * 33
        assert streams[:3] == [frames, ahead + frames, frames]


class SocketTransport(RecordingTransport):
    """A real socket, so ``OutBatch`` sends straight to it; what the kernel
    refuses comes to ``write`` (like a uvloop transport's buffer)."""

    def __init__(self, sock):
        super().__init__()
        self.sock = sock

    def get_extra_info(self, name, default=None):
        return self.sock if name == "socket" else default

    def get_write_buffer_size(self):
        return sum(map(len, self.writes))


class TestSocketWrites:
    def make(self, impl, n, sndbuf=None):
        loop = FakeLoop()
        flusher = impl.fanout.Flusher(loop, max_pace_s=0.0)
        pairs = [socket.socketpair() for _ in range(n)]
        for ours, _ in pairs:
            ours.setblocking(False)
            if sndbuf:
                ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        transports = [SocketTransport(ours) for ours, _ in pairs]
        batches = [impl.fanout.OutBatch(flusher, t, 1 << 24, lambda: None) for t in transports]
        return loop, pairs, transports, batches

    @staticmethod
    def read_all(sock, transport):
        sock.setblocking(False)
        out = bytearray()
        while True:
            try:
                chunk = sock.recv(1 << 20)
            except BlockingIOError:
                break
            if not chunk:
                break
            out += chunk
        return bytes(out) + b"".join(transport.writes)

    def test_channel_traffic_and_replies_arrive_in_order(self, impl):
        loop, pairs, transports, batches = self.make(impl, 3)
        frames = [impl.frame.build_frame(1, b"m%03d" % i) for i in range(6)]
        reply = impl.frame.build_frame(1, b"ack")
        expected = [b"", b"", b""]
        for tick in range(3):                  # the chunk is reused from the start each tick
            for i, frame in enumerate(frames):
                impl.fanout.fanout(batches, frame, batches[2] if i == 3 else None)
                for j in range(3):
                    if not (i == 3 and j == 2):
                        expected[j] += frame
                if i == 1:
                    batches[1].push_frame(1, b"ack")
                    expected[1] += reply
            loop.run_tick()
        for (ours, theirs), transport, want in zip(pairs, transports, expected):
            assert self.read_all(theirs, transport) == want
            ours.close()
            theirs.close()

    def test_what_the_kernel_refuses_is_copied_before_the_chunk_is_reused(self, impl):
        loop, pairs, transports, batches = self.make(impl, 2, sndbuf=4096)
        sent = b""
        for tick in range(4):
            for i in range(40):
                frame = impl.frame.build_frame(2, bytes([tick * 40 + i]) * 500)
                impl.fanout.fanout(batches, frame)
                sent += frame
            loop.run_tick()
        assert any(t.writes for t in transports)     # the socket buffer did fill up
        for (ours, theirs), transport in zip(pairs, transports):
            assert self.read_all(theirs, transport) == sent
            ours.close()
            theirs.close()


def frames_of(data: bytes) -> list[tuple[int, bytes]]:
    """Split a server-to-client byte stream (unmasked frames) into (opcode, payload)."""
    out, pos = [], 0
    while pos < len(data):
        opcode, n = data[pos] & 0x0F, data[pos + 1] & 0x7F
        pos += 2
        if n == 126:
            n, pos = struct.unpack(">H", data[pos:pos + 2])[0], pos + 2
        elif n == 127:
            n, pos = struct.unpack(">Q", data[pos:pos + 8])[0], pos + 8
        out.append((opcode, data[pos:pos + n]))
        pos += n
    return out


class TestHolds:
    """Slow-consumer policies and max_rate (``Hold``, ``fanout_held``), both builds."""

    def make(self, impl, n=2, high_water=1 << 20):
        loop = FakeLoop()
        flusher = impl.fanout.Flusher(loop)
        transports = [RecordingTransport() for _ in range(n)]
        batches = [impl.fanout.OutBatch(flusher, t, high_water, lambda: None) for t in transports]
        return loop, transports, batches

    @staticmethod
    def notice(dropped, first, last, opcode):
        return b"lagged %d %d-%d" % (dropped, first, last)

    def publish(self, impl, batches, offset, key=None, policy=None, size=100, max_queue=350, binary=False):
        policy = impl.fanout.SlowConsumer.DROP_OLDEST if policy is None else policy
        frame = impl.frame.build_frame(2 if binary else 1, b"%d" % offset + b"." * (size - 2 - len(b"%d" % offset)))
        return impl.fanout.fanout_held(batches, frame, None, "c", offset, key, policy, max_queue, self.notice)

    @staticmethod
    def offsets(transport):
        return [p if p.startswith(b"lagged") else int(p.rstrip(b".")) for _, p in frames_of(b"".join(transport.writes))]

    def test_drop_oldest_keeps_the_newest_and_says_what_it_dropped(self, impl):
        loop, (slow_t, fast_t), (slow, fast) = self.make(impl)
        slow.pause()
        for offset in range(1, 11):
            self.publish(impl, [slow, fast], offset)
        loop.run_tick()
        assert self.offsets(fast_t) == list(range(1, 11))   # the healthy one gets everything
        assert slow_t.writes == [] and slow.pending_bytes == 0
        slow.resume()
        loop.run_tick()
        assert self.offsets(slow_t) == [b"lagged 7 1-7", 8, 9, 10]
        assert not slow.closed and not slow.overflowed

    def test_conflate_keeps_the_latest_per_key_in_offset_order(self, impl):
        loop, (slow_t,), (slow,) = self.make(impl, n=1)
        policy = impl.fanout.SlowConsumer.CONFLATE
        slow.pause()
        for offset, key in [(1, "a"), (2, "b"), (3, "a"), (4, "b"), (5, "a"), (6, None)]:
            self.publish(impl, [slow], offset, key, policy=policy, max_queue=1 << 20)
        slow.resume()
        loop.run_tick()
        assert self.offsets(slow_t) == [b"lagged 3 1-3", 4, 5, 6]

    @pytest.mark.parametrize("policy", ["DROP_OLDEST", "CONFLATE"])
    def test_held_bytes_stay_under_max_queue_bytes(self, impl, policy):
        loop, (t,), (slow,) = self.make(impl, n=1)
        hold = slow.hold("c", impl.fanout.SlowConsumer[policy], 1000, 0.0, self.notice)
        slow.pause()
        for offset in range(1, 1001):                 # every publication its own key
            self.publish(impl, [slow], offset, key=offset, policy=impl.fanout.SlowConsumer[policy])
            assert hold.held_bytes <= 1000
        slow.resume()
        loop.run_tick()
        assert self.offsets(t) == [b"lagged 990 1-990", *range(991, 1001)]

    def test_frames_queued_before_the_pause_go_first(self, impl):
        loop, (t,), (batch,) = self.make(impl, n=1)
        self.publish(impl, [batch], 1)
        batch.pause()
        self.publish(impl, [batch], 2)
        batch.resume()
        loop.run_tick()
        assert self.offsets(t) == [1, 2]

    def test_disconnect_policy_queues_until_high_water_then_closes(self, impl):
        loop, _, (batch,) = self.make(impl, n=1, high_water=1000)
        batch.pause()
        policy = impl.fanout.SlowConsumer.DISCONNECT
        taken = [self.publish(impl, [batch], offset, policy=policy) for offset in range(1, 20)]
        assert taken[:9] == [1] * 9 and batch.overflowed and batch.closed

    def test_the_notice_takes_the_encoding_of_what_follows(self, impl):
        loop, (t,), (batch,) = self.make(impl, n=1)
        batch.pause()
        for offset in range(1, 6):
            self.publish(impl, [batch], offset, binary=True)
        batch.resume()
        loop.run_tick()
        assert [opcode for opcode, _ in frames_of(b"".join(t.writes))] == [2, 2, 2, 2]

    def test_max_rate_delivers_at_most_one_per_interval_and_always_the_last(self, impl):
        loop, (t,), (batch,) = self.make(impl, n=1)
        batch.hold("c", impl.fanout.SlowConsumer.DISCONNECT, 1 << 20, 0.1, self.notice)
        policy = impl.fanout.SlowConsumer.DISCONNECT
        written_at = []                              # the fake clock at each write of a publication

        def note_writes(step):
            before = len(t.writes)
            step()
            if len(t.writes) > before:
                written_at.append(loop.now)

        for offset in range(1, 51):                  # a publication every 10 ms for 0.5 s
            self.publish(impl, [batch], offset, policy=policy)
            note_writes(loop.run_tick)               # pushed at once: written this tick
            note_writes(lambda: loop.advance(0.01))  # released by the rate timer
        note_writes(lambda: loop.advance(0.2))       # the last one arrives within the interval
        got = [o for o in self.offsets(t) if isinstance(o, int)]
        assert got[-1] == 50 and got == sorted(got)
        assert all(b - a >= 0.1 - 1e-9 for a, b in zip(written_at, written_at[1:])), written_at
        assert len(got) == len(written_at) == 6      # at 0, 0.1, ..., 0.5 s
        notices = [o for o in self.offsets(t) if isinstance(o, bytes)]
        assert sum(int(n.split()[1]) for n in notices) == 50 - len(got)   # every skipped one counted

    def test_max_rate_keeps_the_latest_per_key(self, impl):
        loop, (t,), (batch,) = self.make(impl, n=1)
        batch.hold("c", impl.fanout.SlowConsumer.DISCONNECT, 1 << 20, 1.0, self.notice)
        policy = impl.fanout.SlowConsumer.DISCONNECT
        for offset, key in [(1, "a"), (2, "a"), (3, "b"), (4, "a"), (5, "b")]:
            self.publish(impl, [batch], offset, key, policy=policy)
        loop.advance(1.0)
        assert self.offsets(t) == [1, b"lagged 2 2-3", 4, 5]

    def test_unhold_and_close_forget_what_was_held(self, impl):
        loop, (t,), (batch,) = self.make(impl, n=1)
        batch.pause()
        self.publish(impl, [batch], 1)
        batch.unhold("c")
        batch.resume()
        loop.run_tick()
        assert t.writes == []
        batch.hold("c", impl.fanout.SlowConsumer.DISCONNECT, 1 << 20, 1.0, self.notice)
        self.publish(impl, [batch], 2, policy=impl.fanout.SlowConsumer.DISCONNECT)
        loop.run_tick()
        self.publish(impl, [batch], 3, policy=impl.fanout.SlowConsumer.DISCONNECT)
        batch.close()
        loop.advance(2.0)                             # the rate timer finds the batch closed
        assert self.offsets(t) == [2]


async def test_drained_resolves_once_the_batch_is_written(impl):
    loop = asyncio.get_running_loop()
    flusher = impl.fanout.Flusher(loop)
    transport = RecordingTransport()
    batch = impl.fanout.OutBatch(flusher, transport, 1 << 20, lambda: None)
    assert batch.drained().done()                    # nothing pending
    batch.push(b"\x81\x01a")
    waiting = batch.drained()
    assert not waiting.done()
    await asyncio.wait_for(waiting, 5)
    assert transport.writes == [b"\x81\x01a"]
    batch.pause()
    paused = batch.drained()
    await asyncio.sleep(0)
    assert not paused.done()
    batch.resume()
    await asyncio.wait_for(paused, 5)
    closing = (batch.push(b"\x81\x01b"), batch.drained())[1]
    batch.close()
    assert closing.done()


def test_the_policy_names_map_to_the_fanout_values(impl):
    from wirehub.delivery import SLOW_CONSUMER
    assert SLOW_CONSUMER == {name: int(impl.fanout.SlowConsumer[name.upper()]) for name in SLOW_CONSUMER}
