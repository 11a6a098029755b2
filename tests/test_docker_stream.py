"""The engine's log wire formats, decoded without I/O, at every byte boundary.

Each decoder is fed the same bytes split in every way that matters (one
byte at a time, at random points, all at once); the output must not depend
on where a read ended.
"""

from __future__ import annotations

import random
import struct
import threading
import time

import pytest

from wirehub.sources.base import Handoff
from wirehub.sources.docker_stream import (ENGINE_SPLIT_BYTES, MAX_LINE_BYTES, ChunkedDecoder,
                                           EngineStreamError, FrameParser, LogDecoder, LogLine,
                                           StreamFormatError)

TS1 = "2026-11-26T17:44:52.869125634Z"
TS2 = "2026-11-26T17:44:52.870039935Z"
TS3 = "2026-11-26T17:44:53.000000001Z"


def frame(stream: int, payload: bytes) -> bytes:
    return struct.pack(">BxxxL", stream, len(payload)) + payload


def message(ts: str, content: bytes, newline: bool = True) -> bytes:
    return ts.encode() + b" " + content + (b"\n" if newline else b"")


def engine_messages(ts: str, line: bytes, tty: bool = False) -> list[bytes]:
    """A line as the engine writes it: 16 KiB parts without newline, each with a timestamp."""
    end = b"\r\n" if tty else b"\n"
    body = line + (b"\r" if tty else b"")  # the TTY's \r belongs to the content
    parts = [body[i:i + ENGINE_SPLIT_BYTES] for i in range(0, len(body), ENGINE_SPLIT_BYTES)] or [b""]
    if len(parts[-1]) == ENGINE_SPLIT_BYTES:
        parts.append(b"")  # a line of exactly 16 KiB: the newline comes as its own message
    out = [message(ts, part, newline=False) for part in parts[:-1]]
    out.append(ts.encode() + b" " + parts[-1] + b"\n")
    return out


def splits(data: bytes, seed: int) -> list[list[bytes]]:
    """The same bytes cut in several ways: per byte, at random points, whole."""
    rng = random.Random(seed)
    ways = [[data[i:i + 1] for i in range(len(data))]] if len(data) < 5000 else []
    for _ in range(3):
        cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(1, 40)))) if len(data) > 1 else []
        bounds = [0, *cuts, len(data)]
        ways.append([data[a:b] for a, b in zip(bounds, bounds[1:])])
    ways.append([data])
    return ways


def decode(data: bytes, pieces: list[bytes], tty: bool) -> list[LogLine]:
    decoder = LogDecoder(tty)
    out: list[LogLine] = []
    for piece in pieces:
        out += decoder.feed(piece)
    return out + decoder.finish()


class TestChunkedDecoder:
    BODY = b"4\r\nWiki\r\n7;ext=1\r\npedia i\r\nB\r\nn \r\nchunks.\r\n0\r\nTrailer: x\r\n\r\nGARBAGE"

    @pytest.mark.parametrize("seed", range(5))
    def test_any_boundaries(self, seed):
        for pieces in splits(self.BODY, seed):
            decoder = ChunkedDecoder()
            out = b"".join(decoder.feed(p) for p in pieces)
            assert out == b"Wikipedia in \r\nchunks."
            assert decoder.done

    def test_not_done_before_the_last_chunk(self):
        decoder = ChunkedDecoder()
        assert decoder.feed(b"3\r\nabc\r\n") == b"abc"
        assert not decoder.done
        decoder.feed(b"0\r\n")
        assert not decoder.done  # the trailer section is not over yet
        decoder.feed(b"\r\n")
        assert decoder.done

    @pytest.mark.parametrize("bad", [b"zz\r\n", b"3\r\nabcXY", b"x" * 2000])
    def test_malformed(self, bad):
        with pytest.raises(StreamFormatError):
            ChunkedDecoder().feed(bad)


class TestFrameParser:
    def test_frames_at_any_boundary(self):
        data = frame(1, b"hello\n") + frame(2, b"oops\n") + frame(1, b"") + frame(1, b"x" * 70000)
        for pieces in splits(data, 1):
            parser = FrameParser()
            frames = [f for p in pieces for f in parser.feed(p)]
            assert frames == [(1, b"hello\n"), (2, b"oops\n"), (1, b""), (1, b"x" * 70000)]
            assert parser.buffered == 0

    def test_incomplete_frame_waits(self):
        parser = FrameParser()
        assert parser.feed(frame(1, b"abcdef")[:10]) == []
        assert parser.buffered == 10

    @pytest.mark.parametrize("bad", [b"\x05\x00\x00\x00\x00\x00\x00\x01x", b"\x01\x00\x07\x00\x00\x00\x00\x01x",
                                     b"2026-11-26T17:44:52Z hello"])
    def test_not_a_multiplexed_stream(self, bad):
        with pytest.raises(StreamFormatError):
            FrameParser().feed(bad)

    def test_frame_size_limit(self):
        with pytest.raises(StreamFormatError, match="exceeds"):
            FrameParser(max_frame_bytes=100).feed(struct.pack(">BxxxL", 1, 101))


class TestLogDecoder:
    """Multiplexed (no TTY) and raw (TTY) streams give the same lines."""

    def stream(self, lines: list[tuple[int, str, bytes]], tty: bool, final: bytes | None = None) -> bytes:
        out = b""
        for stream, ts, line in lines:
            for msg in engine_messages(ts, line, tty):
                out += msg if tty else frame(stream, msg)
        if final is not None:
            msg = message(TS3, final, newline=False)
            out += msg if tty else frame(1, msg)
        return out

    @pytest.mark.parametrize("tty", [False, True], ids=["mux", "tty"])
    @pytest.mark.parametrize("seed", range(4))
    def test_lines_do_not_depend_on_boundaries(self, tty, seed):
        long = bytes(random.Random(seed).choice(b"abcdefgh ") for _ in range(40_000))
        lines = [(1, TS1, b"short"), (1, TS2, long), (1, TS2, b""), (1, TS3, b"x" * ENGINE_SPLIT_BYTES),
                 (1, TS3, b"y" * (2 * ENGINE_SPLIT_BYTES)), (1, TS1, b"after \xc3\xa9 the long ones")]
        if not tty:
            lines.insert(2, (2, TS2, b"on stderr"))
        data = self.stream(lines, tty, final=b"no newline at the end")
        expected = [LogLine(ts, "stderr" if s == 2 else "stdout", line.decode()) for s, ts, line in lines]
        expected.append(LogLine(TS3, "stdout", "no newline at the end"))
        for pieces in splits(data, seed):
            assert decode(data, pieces, tty) == expected

    @pytest.mark.parametrize("tty", [False, True], ids=["mux", "tty"])
    def test_multibyte_character_across_the_engine_split(self, tty):
        line = b"a" * (ENGINE_SPLIT_BYTES - 1) + "é€".encode() + b" end"
        data = self.stream([(1, TS1, line)], tty)
        for pieces in splits(data, 7):
            [decoded] = decode(data, pieces, tty)
            assert decoded.line == line.decode()
            assert decoded.ts == TS1

    @pytest.mark.parametrize("tty", [False, True], ids=["mux", "tty"])
    def test_invalid_utf8_is_replaced(self, tty):
        data = self.stream([(1, TS1, b"bad \xff\xfe end"), (1, TS2, b"\xc3")], tty)
        assert [l.line for l in decode(data, [data], tty)] == ["bad \ufffd\ufffd end", "\ufffd"]

    def test_stdout_and_stderr_interleaved_partials(self):
        # A long stdout line whose parts are interleaved with stderr lines.
        out_parts = engine_messages(TS1, b"o" * 20_000)
        data = frame(1, out_parts[0]) + frame(2, message(TS2, b"e1")) + frame(1, out_parts[1]) \
            + frame(2, message(TS3, b"e2"))
        lines = decode(data, [data], False)
        assert lines == [LogLine(TS2, "stderr", "e1"), LogLine(TS1, "stdout", "o" * 20_000),
                         LogLine(TS3, "stderr", "e2")]

    def test_tty_keeps_other_carriage_returns(self):
        data = message(TS1, b"50%\r100%\r")
        assert decode(data, [data], True) == [LogLine(TS1, "stdout", "50%\r100%")]

    def test_tty_line_without_timestamp_is_kept(self):
        data = b"no timestamp here\r\n" + message(TS1, b"ok\r")
        assert decode(data, [data], True) == [LogLine("", "stdout", "no timestamp here"),
                                              LogLine(TS1, "stdout", "ok")]

    def test_lines_longer_than_the_limit_are_truncated(self):
        line = b"z" * (MAX_LINE_BYTES + 50_000)
        data = self.stream([(1, TS1, line), (1, TS2, b"next")], False)
        first, second = decode(data, [data], False)
        assert first.truncated and len(first.line) == MAX_LINE_BYTES
        assert second == LogLine(TS2, "stdout", "next")

    def test_engine_error_in_band(self):
        data = frame(1, message(TS1, b"ok")) + frame(3, b"error from daemon in stream: bad\n")
        with pytest.raises(EngineStreamError, match="bad"):
            LogDecoder(False).feed(data)

    def test_json_shape(self):
        import msgspec
        assert msgspec.json.encode(LogLine(TS1, "stderr", "x")) == \
            f'{{"ts":"{TS1}","stream":"stderr","line":"x"}}'.encode()


class TestHandoff:
    """Thread → loop: ordered, batched wakeups, bounded with backpressure."""

    async def test_order_batching_and_bounds(self):
        import asyncio
        loop = asyncio.get_running_loop()
        got: list[int] = []
        calls: list[int] = []
        done = asyncio.Event()
        total = 20_000

        def deliver(items):
            calls.append(len(items))
            got.extend(items)
            if len(got) == total:
                done.set()

        handoff = Handoff(loop, deliver, max_items=1000, max_bytes=1 << 30, batch_items=256)

        def worker():
            for start in range(0, total, 50):
                assert handoff.put([(i, 10) for i in range(start, start + 50)])

        thread = threading.Thread(target=worker)
        thread.start()
        await asyncio.wait_for(done.wait(), 20)
        thread.join()
        assert got == list(range(total))
        assert max(calls) <= 256
        assert handoff.max_items_seen <= 1000 + 50
        assert handoff.wakeups < total / 50  # far fewer wakeups than puts

    async def test_put_blocks_until_the_loop_drains_and_close_releases_it(self):
        import asyncio
        loop = asyncio.get_running_loop()
        handoff = Handoff(loop, lambda items: None, max_items=10, max_bytes=100, batch_items=5)
        assert handoff.put([(i, 1) for i in range(10)])  # now full
        released = threading.Event()
        results = []

        def blocked_put():
            results.append(handoff.put([("late", 1)]))
            released.set()

        # The loop is not running while this test body runs synchronously:
        # block the loop thread, so the worker must wait for it.
        thread = threading.Thread(target=blocked_put)
        thread.start()
        time.sleep(0.1)
        assert not released.is_set() and handoff.blocked == 1
        handoff.close()
        thread.join(2)
        assert released.is_set() and results == [False]
