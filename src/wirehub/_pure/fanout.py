"""Outbound batching (reference of ``_ext.fanout``).

Same behaviour as the compiled module, written for reading: frames go into a
per-connection ``bytearray`` (or a segment list for large frames) and the
loop-wide ``Flusher`` writes each dirty batch once per loop iteration.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import time
from collections.abc import Callable
from typing import Any

from .frame import build_frame

SHARE_ABOVE = 16384  # bytes; frames this large are queued by reference
WRITE_THROUGH = 65536  # bytes; a batch this full is written at once, not at tick end
PACE_ABOVE_S = 0.0002  # a fan-out flush shorter than this does not delay the next one
ROUND_SLICE = 32  # batches a fan-out round writes per loop iteration
# Upper bounds (seconds) of the fan-out round histogram (see _ext.fanout).
ROUND_BOUNDS_S = (0.0005, 0.001, 0.002, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5,
                  1.0, 2.5)

logger = logging.getLogger("wirehub.fanout")


class Flusher:
    """Write every dirty ``OutBatch`` once, on the next event-loop iteration;
    batches holding a direct reply first, fan-out traffic paced and written
    ``ROUND_SLICE`` batches per iteration, each round's duration measured
    with ``clock`` (see ``_ext.fanout.Flusher``)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, max_pace_s: float = 0.001,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.loop = loop
        self.max_pace_s = max_pace_s
        self._urgent: list[OutBatch] = []
        self._dirty: list[OutBatch] = []
        self._scheduled = False
        self._paced: asyncio.TimerHandle | None = None
        self._not_before = 0.0
        self._round: list[OutBatch] | None = None  # the fan-out round being written
        self._round_pos = 0
        self._round_started = 0.0
        self._slice_handle: asyncio.Handle | None = None
        self._clock = clock
        self._round_clock_started = 0.0
        self._round_counts = [0] * (len(ROUND_BOUNDS_S) + 1)
        self._round_seconds_sum = 0.0

    def mark(self, batch: OutBatch, urgent: bool) -> None:
        (self._urgent if urgent else self._dirty).append(batch)
        if not self._scheduled and (urgent or (self._paced is None and self._round is None)):
            self._scheduled = True
            self.loop.call_soon(self.tick)

    def tick(self) -> None:
        batches, self._urgent = self._urgent, []
        self._scheduled = False
        self._write(batches)
        if not self._dirty or self._paced is not None or self._round is not None:
            return
        now = self.loop.time()
        if self.max_pace_s > 0 and now < self._not_before:
            self._paced = self.loop.call_at(self._not_before, self._on_paced)
            return
        self._round, self._dirty = self._dirty, []
        self._round_pos = 0
        self._round_started = now
        self._round_clock_started = self._clock()
        self._write_slice()

    def _on_paced(self) -> None:
        self._paced = None
        self.tick()

    def _on_slice(self) -> None:
        self._slice_handle = None
        self._write_slice()

    def _write_slice(self) -> None:
        batches = self._round
        assert batches is not None
        end = min(self._round_pos + ROUND_SLICE, len(batches))
        self._write(batches[self._round_pos:end])
        self._round_pos = end
        if end < len(batches):
            self._slice_handle = self.loop.call_soon(self._on_slice)
            return
        self._round = None
        seconds = self._clock() - self._round_clock_started
        self._round_counts[bisect.bisect_left(ROUND_BOUNDS_S, seconds)] += 1
        self._round_seconds_sum += seconds
        took = self.loop.time() - self._round_started
        self._not_before = (self._round_started + took + min(took, self.max_pace_s)
                            if took >= PACE_ABOVE_S and self.max_pace_s > 0 else 0.0)
        if self._dirty and not self._scheduled:
            self._scheduled = True
            self.loop.call_soon(self.tick)

    def round_histogram(self) -> tuple[list[int], float]:
        """Rounds per bucket of ``ROUND_BOUNDS_S`` (the last: above them all), and their total seconds."""
        return list(self._round_counts), self._round_seconds_sum

    def flush(self) -> None:
        if self._paced is not None:
            self._paced.cancel()
            self._paced = None
        batches = self._urgent
        if self._round is not None:
            if self._slice_handle is not None:
                self._slice_handle.cancel()
                self._slice_handle = None
            batches += self._round[self._round_pos:]
            self._round = None
        batches += self._dirty
        self._urgent, self._dirty = [], []
        self._scheduled = False
        self._write(batches)

    @staticmethod
    def _write(batches: list[OutBatch]) -> None:
        for batch in batches:
            batch._dirty = batch._urgent = False
            try:
                batch.flush()
            except Exception:
                logger.exception("flush failed; closing that connection's batch")
                batch.close()


class OutBatch:
    """One connection's outbound frames, written at most once per tick."""

    def __init__(self, flusher: Flusher, transport: Any, high_water_bytes: int,
                 on_overflow: Callable[[], object]) -> None:
        self._flusher = flusher
        self._transport = transport
        self._on_overflow = on_overflow
        self.high_water_bytes = high_water_bytes
        self._buf = bytearray()
        self._segments: list[bytes] = []
        self.pending_bytes = 0
        self.paused = self.closed = self.overflowed = False
        self._dirty = self._urgent = False

    def _queue(self, frame: bytes) -> bool:
        if self.closed:
            return False
        if self.pending_bytes + len(frame) > self.high_water_bytes:
            self._overflow()
            return False
        if len(frame) >= SHARE_ABOVE:
            self._seal()
            self._segments.append(frame)
        else:
            self._buf += frame
        self.pending_bytes += len(frame)
        return True

    def push(self, frame: bytes) -> bool:
        """Queue a complete frame; return False if the batch refused it."""
        if not self._queue(frame):
            return False
        if self.paused:
            return True
        if self.pending_bytes >= WRITE_THROUGH:
            self.flush()  # only a socket that does not drain makes a slow consumer
        elif not self._dirty:
            self._dirty = True
            self._flusher.mark(self, False)
        return True

    def push_frame(self, opcode: int, payload: bytes | bytearray | memoryview, rsv1: bool = False) -> bool:
        """Frame ``payload`` and queue it as a reply, written before fan-out
        traffic; ``rsv1`` marks a compressed payload."""
        if not self._queue(build_frame(opcode, payload, rsv1)):
            return False
        if self.paused:
            return True
        if self.pending_bytes >= WRITE_THROUGH:
            self.flush()
        elif not self._urgent:
            self._urgent = True
            self._flusher.mark(self, True)
        return True

    def _seal(self) -> None:
        if self._buf:
            self._segments.append(bytes(self._buf))
            self._buf = bytearray()

    def flush(self) -> None:
        """Write everything pending now, unless paused or closed."""
        if self.closed or self.paused or not self.pending_bytes:
            return
        if self._segments:
            self._seal()
            segments, self._segments = self._segments, []
            self._transport.writelines(segments)
        else:
            self._transport.write(bytes(self._buf))
            self._buf = bytearray()
        self.pending_bytes = 0

    def trim(self) -> None:
        """Give back the buffer if nothing is pending (see ``_ext.fanout``)."""
        if not self.pending_bytes:
            self._buf = bytearray()

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False
        if self.pending_bytes and not self._dirty and not self.closed:
            self._dirty = True
            self._flusher.mark(self, False)

    def close(self) -> None:
        """Drop pending frames and refuse new ones."""
        self.closed = True
        self._release()

    def _release(self) -> None:
        self._buf = bytearray()
        self._segments = []
        self.pending_bytes = 0

    def _overflow(self) -> None:
        self.overflowed = self.closed = True
        self._release()
        self._flusher.loop.call_soon(self._on_overflow)


def fanout(batches: list[OutBatch], frame: bytes, exclude: OutBatch | None = None) -> int:
    """Queue ``frame`` on every batch except ``exclude``; return how many took it."""
    return sum(1 for batch in batches if batch is not exclude and batch.push(frame))
