"""Outbound batching (reference of ``_ext.fanout``).

Same behaviour as the compiled module, written for reading: frames go into a
per-connection ``bytearray`` (or a segment list for large frames) and the
loop-wide ``Flusher`` writes each dirty batch once per loop iteration.

A subscription with a slow-consumer policy or a ``max_rate`` gets a ``Hold``
on its batch: while the socket does not drain, or until the rate allows the
next delivery, its channel's frames wait there, bounded by
``max_queue_bytes`` (the oldest dropped, or only the latest per key kept),
and a ``lagged`` notice precedes them when they go out if any were dropped.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import enum
import logging
import time
from collections.abc import Callable, Hashable
from typing import Any

from .frame import build_frame

SHARE_ABOVE = 16384  # bytes; frames this large are queued by reference
WRITE_THROUGH = 65536  # bytes; a batch this full is written at once, not at tick end
PACE_ABOVE_S = 0.0002  # a fan-out flush shorter than this does not delay the next one
MERGED_FRAMES = 8  # frames per dirty batch at which a fan-out round starts without waiting out the pace
ROUND_SLICE = 32  # batches a fan-out round writes per loop iteration
# Upper bounds (seconds) of the fan-out round histogram (see _ext.fanout).
ROUND_BOUNDS_S = (0.0005, 0.001, 0.002, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5,
                  1.0, 2.5)

logger = logging.getLogger("wirehub.fanout")


class SlowConsumer(enum.IntEnum):
    """What a subscription's publications become while its socket does not drain."""

    DISCONNECT = 0   # queued until high_water_bytes, then the connection is closed (1013)
    DROP_OLDEST = 1  # held up to max_queue_bytes, the oldest dropped past it
    CONFLATE = 2     # only the latest per publication key held


Notice = Callable[[int, int, int, int], bytes]


class Flusher:
    """Write every dirty ``OutBatch`` once, on the next event-loop iteration;
    batches holding a direct reply first, fan-out traffic paced while that
    merges publications (fewer than ``MERGED_FRAMES`` queued per dirty batch)
    and written ``ROUND_SLICE`` batches per iteration, each round's duration
    measured with ``clock`` (see ``_ext.fanout.Flusher``)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, max_pace_s: float = 0.001,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.loop = loop
        self.max_pace_s = max_pace_s
        self._urgent: list[OutBatch] = []
        self._dirty: list[OutBatch] = []
        self._scheduled = False
        self._paced: asyncio.TimerHandle | None = None
        self._not_before = 0.0
        self.queued_frames = 0  # fan-out frames queued since the last round started
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
        if (self.max_pace_s > 0 and now < self._not_before
                and self.queued_frames < MERGED_FRAMES * len(self._dirty)):
            self._paced = self.loop.call_at(self._not_before, self._on_paced)
            return
        self.queued_frames = 0
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
        self._holds: dict[str, Hold] = {}
        self._drain_waiters: list[asyncio.Future[None]] = []

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
        self._flusher.queued_frames += 1
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
        if not self.paused:
            self._wake_drained()

    def trim(self) -> None:
        """Give back the buffer if nothing is pending (see ``_ext.fanout``)."""
        if not self.pending_bytes:
            self._buf = bytearray()

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        """Write again: what is pending on the next tick, then what holds kept."""
        self.paused = False
        for hold in list(self._holds.values()):
            if hold.active and not self.paused and not self.closed:  # a release may fill the socket again
                hold.resume()
        if self.closed:
            return
        if self.pending_bytes and not self._dirty:
            self._dirty = True
            self._flusher.mark(self, False)
        elif not self.pending_bytes:
            self._wake_drained()

    def close(self) -> None:
        """Drop pending frames and refuse new ones."""
        self.closed = True
        self._release()
        self._drop_holds()
        self._wake_drained()

    def drained(self) -> asyncio.Future[None]:
        """Done once nothing is pending and the socket drains, or the batch closed."""
        future = self._flusher.loop.create_future()
        if self.closed or (not self.pending_bytes and not self.paused):
            future.set_result(None)
        else:
            self._drain_waiters.append(future)
        return future

    def _wake_drained(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for future in waiters:
            if not future.done():
                future.set_result(None)

    def push_many(self, frames: list[bytes]) -> int:
        """Queue frames in order; how many were taken."""
        taken = 0
        for frame in frames:
            if not self.push(frame):
                break
            taken += 1
        return taken

    def hold(self, channel: str, policy: int, max_queue_bytes: int, interval_s: float,
             notice: Notice) -> Hold:
        """Make the ``Hold`` of this connection's subscription to ``channel`` (see ``_ext.fanout``)."""
        previous = self._holds.get(channel)
        if previous is not None:
            previous.cancel()
        hold = self._holds[channel] = Hold(self, policy, max_queue_bytes, interval_s, notice)
        return hold

    def unhold(self, channel: str) -> None:
        hold = self._holds.pop(channel, None)
        if hold is not None:
            hold.cancel()

    def held_bytes(self) -> int:
        """Bytes of frames this connection's holds keep back."""
        return sum(hold.held_bytes for hold in self._holds.values())

    def _drop_holds(self) -> None:
        for hold in self._holds.values():
            hold.cancel()
        self._holds = {}

    def _release(self) -> None:
        self._buf = bytearray()
        self._segments = []
        self.pending_bytes = 0

    def _overflow(self) -> None:
        self.overflowed = self.closed = True
        self._release()
        self._drop_holds()
        self._wake_drained()
        self._flusher.loop.call_soon(self._on_overflow)


class Hold:
    """One subscription's publications held back: while its batch is paused
    (unless the policy is ``SlowConsumer.DISCONNECT``), or until ``interval_s`` has passed
    since its last delivery."""

    def __init__(self, batch: OutBatch, policy: int, max_queue_bytes: int, interval_s: float,
                 notice: Notice) -> None:
        self.batch = batch
        self.policy = policy
        self.max_queue_bytes = max_queue_bytes
        self.interval_s = interval_s
        self._notice = notice
        # Oldest first: a queue (DROP_OLDEST), or the latest per key (CONFLATE
        # and max_rate), a replaced key moving to the end.
        self._fifo: collections.deque[tuple[int, bytes]] | None = (
            collections.deque() if policy == SlowConsumer.DROP_OLDEST and interval_s == 0 else None)
        self._latest: dict[Hashable, tuple[int, bytes]] = {}
        self.held_bytes = 0
        self.dropped = self.first_dropped = self.last_dropped = 0
        self._next_due = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self.active = False  # something is held: new frames wait behind it

    def _now(self) -> float:
        return self.batch._flusher.loop.time()

    def _waits(self) -> bool:
        if self.active or (self.batch.paused and self.policy != SlowConsumer.DISCONNECT):
            return True
        return self.interval_s > 0 and self._now() < self._next_due

    def offer(self, frame: bytes, offset: int, key: Hashable) -> bool:
        """Push ``frame`` now (True) or hold it (False)."""
        if not self._waits():
            if self.interval_s > 0:
                self._next_due = self._now() + self.interval_s
            return self.batch.push(frame)
        self.active = True
        self._store(frame, offset, key)
        waits_for_resume = self.batch.paused and self.policy != SlowConsumer.DISCONNECT
        if self.interval_s > 0 and self._timer is None and not waits_for_resume:
            self._timer = self.batch._flusher.loop.call_at(self._next_due, self._on_due)
        return False

    def _store(self, frame: bytes, offset: int, key: Hashable) -> None:
        if self._fifo is not None:
            self._fifo.append((offset, frame))
            self.held_bytes += len(frame)
            while self.held_bytes > self.max_queue_bytes and len(self._fifo) > 1:
                self._drop(*self._fifo.popleft())
            return
        replaced = self._latest.pop(key, None)
        if replaced is not None:
            self._drop(*replaced)
        self._latest[key] = (offset, frame)
        self.held_bytes += len(frame)
        while self.held_bytes > self.max_queue_bytes and len(self._latest) > 1:
            self._drop(*self._latest.pop(next(iter(self._latest))))

    def _drop(self, offset: int, frame: bytes) -> None:
        self.held_bytes -= len(frame)
        self.first_dropped = offset if not self.dropped else min(self.first_dropped, offset)
        self.last_dropped = offset if not self.dropped else max(self.last_dropped, offset)
        self.dropped += 1

    def release(self) -> None:
        """Send what is held, after a ``lagged`` notice if some were dropped."""
        held = self._fifo if self._fifo is not None else self._latest.values()
        frames = [frame for _, frame in held]
        self._clear()
        if self.interval_s > 0:
            self._next_due = self._now() + self.interval_s
        if self.dropped:
            opcode = frames[0][0] & 0x0F if frames else 0x1  # the encoding of what follows
            self.batch.push_frame(opcode, self._notice(self.dropped, self.first_dropped,
                                                       self.last_dropped, opcode))
            self.dropped = 0
        self.batch.push_many(frames)

    def _on_due(self) -> None:
        self._timer = None
        if self.batch.closed or not self.active:
            return
        if self.batch.paused and self.policy != SlowConsumer.DISCONNECT:
            return  # OutBatch.resume releases it
        self.release()

    def resume(self) -> None:
        if self.interval_s > 0 and self._now() < self._next_due:
            if self._timer is None:
                self._timer = self.batch._flusher.loop.call_at(self._next_due, self._on_due)
            return
        self.release()

    def _clear(self) -> None:
        if self._fifo is not None:
            self._fifo.clear()
        self._latest.clear()
        self.active = False
        self.held_bytes = 0

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._clear()


def fanout(batches: list[OutBatch], frame: bytes, exclude: OutBatch | None = None) -> int:
    """Queue ``frame`` on every batch except ``exclude``; return how many took it."""
    return sum(1 for batch in batches if batch is not exclude and batch.push(frame))


def fanout_held(batches: list[OutBatch], frame: bytes, exclude: OutBatch | None, channel: str, offset: int,
                key: Hashable, policy: int, max_queue_bytes: int, notice: Notice) -> int:
    """``fanout`` for a channel whose subscribers may hold its publications
    (see ``_ext.fanout.fanout_held``); held frames are not counted."""
    delivered = 0
    for batch in batches:
        if batch is exclude or batch.closed:
            continue
        hold = batch._holds.get(channel)
        if hold is None:
            if policy == SlowConsumer.DISCONNECT or not batch.paused:
                delivered += batch.push(frame)
                continue
            hold = batch.hold(channel, policy, max_queue_bytes, 0.0, notice)
        delivered += hold.offer(frame, offset, key)
    return delivered
