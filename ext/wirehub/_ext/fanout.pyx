# cython: freethreading_compatible = True
"""Outbound batching: the fan-out hot path.

A publication is framed once (``frame.build_frame``) into an immutable
``bytes``; ``fanout`` appends it to each subscriber's ``OutBatch``; the
loop-wide ``Flusher`` then writes every dirty batch once per event-loop
iteration. N subscribers cost N appends and at most N ``send()`` calls per
tick, however many publications arrived in that tick.

``fanout`` copies a frame once into the ``Flusher``'s shared chunk, and each
subscriber's batch records the byte range it must send (a *run*): a second
frame on the same channel in the same tick lands right after the first in the
chunk, so the run just grows. A subscriber of one busy channel is then written
straight from the chunk, with no copy of its own: 1,000 subscribers cost one
memcpy and 1,000 range updates per publication instead of 1,000 memcpys, and
the kernel copies the same few cache-hot kilobytes into every socket. A run
that can no longer grow (a reply, another channel's frame, a paused socket)
is copied into the connection's own buffer, which is what every frame cost
before. Frames of ``SHARE_ABOVE`` bytes or more are queued by reference so a
large publication is held in memory once, not once per subscriber.

A subscription whose channel has a ``slow_consumer`` policy other than
``disconnect``, or which asked for a ``max_rate``, gets a ``Hold`` on its
batch (``fanout_held``): while the socket does not drain (the transport
paused the batch), or until the rate allows the next delivery, its
publications wait there, bounded by ``max_queue_bytes``: the oldest dropped
(``DROP_OLDEST``) or only the latest per key kept (``CONFLATE``, and always
for ``max_rate``). When they go out, a ``lagged`` notice (built by the
caller's ``notice``) precedes them if any were dropped. A batch whose
subscriptions keep up never holds anything.

Reference twin: ``wirehub._pure.fanout``.
"""

import logging
import time
from collections import deque

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from libc.stdint cimport uint8_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcpy

from wirehub._ext.frame cimport header_size, write_header

cdef extern from "sys/socket.h" nogil:
    ssize_t send(int fd, const void* buf, size_t n, int flags)
    int MSG_NOSIGNAL
    int MSG_DONTWAIT

cdef enum:
    INITIAL_CAPACITY = 256      # bytes; first allocation, given back after a flush until outgrown
    SHRINK_ABOVE = 65536        # bytes; a buffer grown past this is freed after a flush
    SHARE_ABOVE = 16384         # bytes; frames this large are queued by reference
    WRITE_THROUGH = 65536       # bytes; a batch this full is written at once, not at tick end
    # bytes; one shared chunk of fanned-out frames. A fan-out round spans
    # several loop iterations (ROUND_SLICE), and publications that arrive
    # meanwhile go into the same chunk; when it fills, every subscriber
    # still holding a run in it copies that run. 64 KiB filled within a round
    # of 1 KiB publications (measured: docs/architecture.md, step 4).
    CHUNK_BYTES = 1048576

# A fan-out flush shorter than this does not delay the next one (Flusher).
cdef double PACE_ABOVE_S = 0.0002
# Frames per dirty batch at which a fan-out round is merged enough: it starts
# at once, without waiting out the pace (Flusher).
cdef Py_ssize_t MERGED_FRAMES_PER_BATCH = 8
MERGED_FRAMES = MERGED_FRAMES_PER_BATCH
# Batches a fan-out round writes per loop iteration (0.1-0.25 ms of send()s):
# between two slices the loop reads its sockets, so a publication waits at most
# one slice to be read and joins the round for every subscriber not written yet.
cdef Py_ssize_t ROUND_SLICE = 32

# Upper bounds, in seconds, of the fan-out round histogram (Flusher.round_histogram,
# wirehub_fanout_round_seconds on /metrics).
ROUND_BOUNDS_S = (0.0005, 0.001, 0.002, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5,
                  1.0, 2.5)
cdef double _ROUND_BOUNDS[ROUND_BUCKETS - 1]
_ROUND_BOUNDS[:] = ROUND_BOUNDS_S       # (a length other than ROUND_BUCKETS - 1 fails the import)

logger = logging.getLogger("wirehub.fanout")


cdef class SharedChunk:
    """Fanned-out frames stored once, for every batch whose run points into them.

    ``users`` counts the batches holding a run here; when it is back to 0
    (every such batch flushed or copied its run) the ``Flusher`` writes the
    next frames from the start again, so a steady stream reuses one chunk.
    """

    def __dealloc__(self):
        free(self.data)


cdef class Flusher:
    """Write every dirty ``OutBatch`` once, on the next event-loop iteration.

    Batches that received a direct reply (``push_frame``: acks, pongs,
    errors) are written before those that only received fan-out traffic: a
    publisher gets its ``published`` acks before the gateway spends the tick
    writing to every subscriber, so it can send its next publications while
    that happens and the next tick has a full batch to fan out. (Measured: 1
    publisher, 1,000 subscribers, window 32, acks last: ~1.0M deliveries/s.)

    Fan-out writes are paced, but only while waiting merges publications:
    after a fan-out flush that took ``t`` seconds (``t`` >= ``PACE_ABOVE_S``),
    the next one waits until ``min(t, max_pace_s)`` after it ended, unless
    the frames queued already average ``MERGED_FRAMES_PER_BATCH`` per dirty
    batch. Writing to 1,000 sockets costs one ``send()`` each, almost all of
    it in the kernel, whether a socket gets one frame or twenty; a server that
    starts a flush for every publication as it arrives spends its whole core
    on ``send()`` at ~1 M deliveries/s. Waiting as long as the last flush took
    puts the publications that arrive meanwhile into the same ``send()``:
    at a steady 1,000 publications/s to 1,000 subscribers it cuts the
    server's CPU by about a quarter. Once a round already carries several
    frames per socket, though, more merging saves little, and the wait only
    idles the server while work is queued: a publisher that keeps a window
    of publications in flight (the load adapts to the server) got half the
    throughput, paced. So a round that is merged enough starts at once; a
    quiet channel (a flush long ago) is written at once too. Replies are
    never paced.

    A fan-out flush (a *round*) is written ``ROUND_SLICE`` batches at a
    time, one slice per loop iteration, so the loop reads sockets in between:
    replies (a publisher's acks) go out mid-round, and a publication that
    arrives during the round still reaches, in this round, every subscriber
    not written yet. Without slices a publication that arrived just after a
    round started waited for the whole round, the pace, and the next round
    before reaching the last subscriber (two rounds and a pace; one round and
    a pace with slices).

    Every round's duration, from its first write to its last, goes into a
    histogram (``round_histogram``): a publication reaches the last of its
    subscribers' sockets about one round after it arrives, so the rounds are
    the delivery latency the server itself adds, apart from the network and
    the clients.

    Args:
        loop: the event loop.
        max_pace_s: longest wait between fan-out flushes; 0 disables pacing.
        clock: seconds, for the round histogram. Pacing schedules with
            ``loop.call_at`` and so uses the loop's clock, which in uvloop
            moves in 1 ms steps, once per iteration: too coarse for rounds.
    """

    def __init__(self, loop, double max_pace_s=0.001, clock=time.monotonic):
        self._urgent = []
        self._dirty = []
        self._scheduled = False
        self._paced = None
        self._not_before = 0.0
        self.max_pace_s = max_pace_s
        self.loop = loop
        self._call_soon = loop.call_soon
        self._call_at = loop.call_at
        self._time = loop.time
        self._run = self.tick
        self._run_paced = self._on_paced
        self._run_slice = self._on_slice
        self._chunk = None
        self._round = None
        self._round_pos = 0
        self._round_started = 0.0
        self._slice_handle = None
        self._nspare = 0
        self._clock = clock
        self._queued_frames = 0

    def __dealloc__(self):
        while self._nspare:
            self._nspare -= 1
            free(self._spare[self._nspare])

    # A batch that gets a few small frames a tick (replies, pings, an echo)
    # takes a first buffer and gives it back after its flush, so idle
    # connections hold none. Through malloc that is a malloc/free pair per
    # connection per tick, and with ~100 of them per tick they overflow
    # glibc's per-thread cache into its arena (_int_malloc, _int_free): ~2.5 %
    # of the server's CPU in the echo benchmark. The Flusher keeps the freed
    # buffers instead.

    cdef char* _take_small(self) noexcept:
        """An ``INITIAL_CAPACITY`` buffer (NULL when out of memory)."""
        if self._nspare:
            self._nspare -= 1
            return self._spare[self._nspare]
        return <char*>malloc(INITIAL_CAPACITY)

    cdef void _give_small(self, char* buf) noexcept:
        """Take back a buffer from ``_take_small`` (kept, or freed past SPARE_BUFFERS)."""
        if self._nspare < SPARE_BUFFERS:
            self._spare[self._nspare] = buf
            self._nspare += 1
        else:
            free(buf)

    cdef SharedChunk _share(self, const char* frame, Py_ssize_t n):
        """Copy ``frame`` into the current chunk (a new one when it is full)."""
        cdef SharedChunk chunk = self._chunk
        if chunk is not None and chunk.users == 0:
            chunk.len = 0
        if chunk is None or chunk.len + n > CHUNK_BYTES:
            chunk = SharedChunk.__new__(SharedChunk)
            chunk.data = <char*>malloc(CHUNK_BYTES)
            if chunk.data == NULL:
                raise MemoryError()
            self._chunk = chunk
        memcpy(chunk.data + chunk.len, frame, n)
        chunk.len += n
        return chunk

    cdef void mark(self, OutBatch batch, bint urgent) except *:
        if urgent:
            self._urgent.append(batch)
        else:
            self._dirty.append(batch)
        if not self._scheduled and (urgent or (self._paced is None and self._round is None)):
            self._scheduled = True
            self._call_soon(self._run)

    cpdef tick(self):
        """Write replies now; start a fan-out round unless one runs or must wait (the loop calls this)."""
        cdef list batches = self._urgent
        cdef double now
        self._urgent = []
        self._scheduled = False
        self._write(batches)
        if not self._dirty or self._paced is not None or self._round is not None:
            return
        now = self._time()
        if (self.max_pace_s > 0 and now < self._not_before
                and self._queued_frames < MERGED_FRAMES_PER_BATCH * len(self._dirty)):
            self._paced = self._call_at(self._not_before, self._run_paced)
            return
        self._queued_frames = 0
        self._round, self._dirty = self._dirty, []
        self._round_pos = 0
        self._round_started = now
        self._round_clock_started = self._clock()
        self._write_slice()

    def _on_paced(self):
        self._paced = None
        self.tick()

    def _on_slice(self):
        self._slice_handle = None
        self._write_slice()

    cdef void _write_slice(self) except *:
        cdef list batches = self._round
        cdef Py_ssize_t end = min(self._round_pos + ROUND_SLICE, len(batches))
        cdef double took
        self._write(batches[self._round_pos:end])
        self._round_pos = end
        if end < len(batches):
            self._slice_handle = self._call_soon(self._run_slice)
            return
        self._round = None
        self._record_round(self._clock() - self._round_clock_started)
        took = self._time() - self._round_started
        self._not_before = (self._round_started + took + min(took, self.max_pace_s)
                            if took >= PACE_ABOVE_S and self.max_pace_s > 0 else 0.0)
        if self._dirty and not self._scheduled:
            # Batches that got frames after their slice was written.
            self._scheduled = True
            self._call_soon(self._run)

    cdef void _record_round(self, double seconds) noexcept:
        cdef int i = 0
        while i < ROUND_BUCKETS - 1 and seconds > _ROUND_BOUNDS[i]:
            i += 1
        self._round_counts[i] += 1
        self._round_seconds_sum += seconds

    def round_histogram(self):
        """The fan-out rounds so far, as ``(counts, seconds)``.

        ``counts[i]`` is the number of rounds that took more than
        ``ROUND_BOUNDS_S[i - 1]`` and at most ``ROUND_BOUNDS_S[i]`` seconds
        (the last entry: more than every bound); ``seconds`` is their sum.
        A round cut short by ``flush()`` is not counted.
        """
        return [self._round_counts[i] for i in range(ROUND_BUCKETS)], self._round_seconds_sum

    cpdef flush(self):
        """Write every dirty batch now, paced or not (shutdown, tests)."""
        cdef list batches = self._urgent
        if self._paced is not None:
            self._paced.cancel()
            self._paced = None
        if self._round is not None:
            if self._slice_handle is not None:
                self._slice_handle.cancel()
                self._slice_handle = None
            batches.extend(self._round[self._round_pos:])
            self._round = None
        batches.extend(self._dirty)
        self._urgent = []
        self._dirty = []
        self._scheduled = False
        self._write(batches)

    cdef void _write(self, list batches) except *:
        cdef OutBatch batch
        for obj in batches:
            batch = <OutBatch>obj
            batch._dirty = False
            batch._urgent = False
            try:
                batch.flush()
            except Exception:
                # One broken transport must not stop the others' flush.
                logger.exception("flush failed; closing that connection's batch")
                batch.close()


cdef class OutBatch:
    """One connection's outbound frames, written at most once per tick.

    Args:
        flusher: the loop-wide ``Flusher``.
        transport: the connection's asyncio transport (frames are already
            complete WebSocket frames, so they bypass picows's send path).
        high_water_bytes: pending bytes past which the connection is a slow
            consumer: the batch drops what it holds, stops accepting frames
            and calls ``on_overflow()`` on the next loop iteration.
        on_overflow: zero-argument callable, called once.
    """

    def __init__(self, Flusher flusher not None, transport, Py_ssize_t high_water_bytes, on_overflow):
        self._flusher = flusher
        self._write = transport.write
        self._writelines = transport.writelines
        self._transport_buffered = transport.get_write_buffer_size
        self._on_overflow = on_overflow
        self._call_soon = flusher._call_soon
        self.high_water_bytes = high_water_bytes
        self._segments = None    # created when a large frame is queued
        self._holds = None
        self._drain_waiters = None
        # Raw send() is only safe on a plain TCP socket; TLS goes through the transport.
        sock = transport.get_extra_info("socket")
        if sock is not None and transport.get_extra_info("ssl_object") is None:
            self._fd = sock.fileno()
        else:
            self._fd = -1

    def __dealloc__(self):
        free(self._buf)

    cdef int _reserve(self, Py_ssize_t extra) except -1:
        cdef Py_ssize_t need = self._len + extra
        cdef Py_ssize_t cap = self._cap
        cdef char* buf
        if need <= cap:
            return 0
        if cap == 0 and need <= INITIAL_CAPACITY:
            buf = self._flusher._take_small()
            cap = INITIAL_CAPACITY
        else:
            if cap < INITIAL_CAPACITY:
                cap = INITIAL_CAPACITY
            while cap < need:
                cap *= 2
            buf = <char*>realloc(self._buf, cap)
        if buf == NULL:
            raise MemoryError()
        self._buf = buf
        self._cap = cap
        return 0

    cdef int _append(self, const char* data, Py_ssize_t n) except -1:
        self._reserve(n)
        memcpy(self._buf + self._len, data, n)
        self._len += n
        return 0

    cdef bint _admit(self, Py_ssize_t n) except -1:
        # Whether n more bytes may be queued; past high_water_bytes the
        # connection is a slow consumer.
        if self.closed:
            return False
        if self.pending_bytes + n > self.high_water_bytes:
            self._overflow()
            return False
        return True

    cdef int _seal(self) except -1:
        # Move the contiguous small-frame bytes into the segment list so that
        # a by-reference frame queued next keeps its place in the order.
        self._spill()
        if self._len:
            if self._segments is None:
                self._segments = []
            self._segments.append(PyBytes_FromStringAndSize(self._buf, self._len))
            self._len = 0
        return 0

    # Pending bytes are, in order: ``_segments``, ``_buf[:_len]``, then the
    # run ``_run.data[_run_start:_run_end]``. Anything queued other than a
    # frame that extends the run first spills the run into ``_buf``.

    cdef int _spill(self) except -1:
        """Copy the open run into the connection's own buffer and close it."""
        if self._run is None:
            return 0
        self._append(self._run.data + self._run_start, self._run_end - self._run_start)
        self._drop_run()
        return 0

    cdef void _drop_run(self) noexcept:
        if self._run is not None:
            self._run.users -= 1
            self._run = None

    cdef bint _push_shared(self, SharedChunk chunk, Py_ssize_t start, Py_ssize_t n) except -1:
        """Queue the frame at ``chunk.data[start:start + n]`` (see ``fanout``)."""
        if not self._admit(n):
            return False
        if self._run is chunk and self._run_end == start:
            self._run_end += n
        else:
            self._spill()
            if self.paused:
                # A socket that does not drain must not pin chunks.
                self._append(chunk.data + start, n)
            else:
                self._run = chunk
                chunk.users += 1
                self._run_start = start
                self._run_end = start + n
        self.pending_bytes += n
        self._queued()
        return True

    cdef bint _push(self, bytes frame) except -1:
        cdef Py_ssize_t n = PyBytes_GET_SIZE(frame)
        if not self._admit(n):
            return False
        if n >= SHARE_ABOVE:
            self._seal()
            if self._segments is None:
                self._segments = []
            self._segments.append(frame)
        else:
            self._spill()
            self._append(PyBytes_AS_STRING(frame), n)
        self.pending_bytes += n
        self._queued()
        return True

    cdef int _queued(self) except -1:
        # After fan-out traffic was queued: write through or mark dirty.
        self._flusher._queued_frames += 1
        if not self.paused:
            if self.pending_bytes >= WRITE_THROUGH:
                # One read of a bursty publisher can produce more than
                # high_water_bytes for every subscriber before the tick ends;
                # only a socket that does not drain (pause_writing) may make
                # a connection a slow consumer.
                self.flush()
            elif not self._dirty:
                self._dirty = True
                self._flusher.mark(self, False)
        return 0

    cpdef bint push(self, bytes frame):
        """Queue a complete frame; return False if the batch refused it."""
        return self._push(frame)

    cpdef bint push_frame(self, int opcode, object payload, bint rsv1=False):
        """Frame ``payload`` straight into the buffer (for per-connection replies).

        ``rsv1`` marks a permessage-deflate compressed payload (RFC 7692 §6).
        """
        cdef Py_buffer view
        cdef Py_ssize_t h, total
        if self.closed:
            return False
        PyObject_GetBuffer(payload, &view, PyBUF_SIMPLE)
        try:
            h = header_size(view.len)
            total = h + view.len
            if total >= SHARE_ABOVE:
                if not self._push(_frame_bytes(opcode, &view, h, rsv1)):
                    return False
                self._mark_urgent()
                return True
            if not self._admit(total):
                return False
            self._spill()
            self._reserve(total)
            write_header(<uint8_t*>self._buf + self._len, opcode, view.len, rsv1)
            memcpy(self._buf + self._len + h, view.buf, view.len)
            self._len += total
            self.pending_bytes += total
        finally:
            PyBuffer_Release(&view)
        if self.pending_bytes >= WRITE_THROUGH and not self.paused:
            self.flush()
        else:
            self._mark_urgent()
        return True

    cdef void _mark_urgent(self) except *:
        # A reply: have it written before fan-out traffic (see Flusher).
        if not self.paused and not self._urgent:
            self._urgent = True
            self._flusher.mark(self, True)

    cdef int _write_out(self, char* ptr, Py_ssize_t n) except -1:
        cdef ssize_t sent
        if self._fd >= 0 and not self._transport_buffered():
            # Same trick as picows's _fast_write: try the socket directly and
            # hand the transport only what the kernel did not take.
            sent = send(self._fd, ptr, <size_t>n, MSG_NOSIGNAL | MSG_DONTWAIT)
            if sent == n:
                return 0
            if sent > 0:
                ptr += sent
                n -= sent
        self._write(PyBytes_FromStringAndSize(ptr, n))
        return 0

    cpdef flush(self):
        """Write everything pending now, unless paused or closed."""
        cdef SharedChunk chunk
        cdef Py_ssize_t start
        if self.closed or self.paused or self.pending_bytes == 0:
            return
        if self._segments is not None:
            self._seal()
            segments = self._segments
            self._segments = None
            self._writelines(segments)
        elif self._len == 0:
            # Only channel traffic: straight from the shared chunk. The run is
            # closed first: the write may call pause() (which spills a run).
            chunk = self._run
            start = self._run_start
            self._drop_run()
            self._write_out(chunk.data + start, self.pending_bytes)
        else:
            self._spill()
            self._write_out(self._buf, self._len)
            self._len = 0
        self.pending_bytes = 0
        # A buffer that never grew past its first allocation serves a
        # connection that gets a few small frames a tick (the welcome, replies,
        # pings): give it back, so idle connections hold none. A grown one
        # serves fan-out traffic and is kept for the next tick, up to SHRINK_ABOVE.
        if self._cap > SHRINK_ABOVE or self._cap <= INITIAL_CAPACITY:
            self._free_buf()
        if self._drain_waiters is not None and not self.paused:
            self._wake_drained()

    cpdef trim(self):
        """Give back the buffer if nothing is pending (for connections gone quiet).

        A buffer that grew for fan-out traffic is kept between flushes; the
        gateway's heartbeat sweep calls this so that a subscriber whose
        channels went quiet does not hold its peak buffer (up to 64 KiB).
        """
        if self.pending_bytes == 0 and self._buf != NULL:
            self._free_buf()
            self._len = 0

    cpdef pause(self):
        """Stop writing (the transport passed its own high-water mark)."""
        self.paused = True
        self._spill()

    cpdef resume(self):
        """Start writing again; pending frames go out on the next tick, then
        what the holds kept while the socket did not drain."""
        cdef Hold hold
        self.paused = False
        if self._holds is not None and not self.closed:
            for obj in list(self._holds.values()):
                hold = <Hold>obj
                if hold._active and not self.paused:  # a release may fill the socket again
                    hold._resume()
        if self.closed:
            return
        if self.pending_bytes and not self._dirty:
            self._dirty = True
            self._flusher.mark(self, False)
        elif not self.pending_bytes and self._drain_waiters is not None:
            self._wake_drained()

    cpdef close(self):
        """Drop pending frames and refuse new ones (the connection is closing)."""
        self.closed = True
        self._release()
        self._drop_holds()
        if self._drain_waiters is not None:
            self._wake_drained()

    def drained(self):
        """A future done once nothing is pending and the socket drains (or the
        batch closed): what a producer of many frames (a recovery) awaits
        between two slices, so it never queues more than a slice."""
        future = self._flusher.loop.create_future()
        if self.closed or (not self.pending_bytes and not self.paused):
            future.set_result(None)
        else:
            if self._drain_waiters is None:
                self._drain_waiters = []
            self._drain_waiters.append(future)
        return future

    cdef void _wake_drained(self) except *:
        waiters, self._drain_waiters = self._drain_waiters, None
        for future in waiters:
            if not future.done():
                future.set_result(None)

    cpdef Py_ssize_t push_many(self, list frames) except -1:
        """Queue complete frames in order; return how many were taken (all of
        them unless the batch closed or overflowed)."""
        cdef Py_ssize_t taken = 0
        for frame in frames:
            if not self._push(<bytes>frame):
                break
            taken += 1
        return taken

    cpdef Hold hold(self, str channel, int policy, Py_ssize_t max_queue_bytes, double interval_s,
                    object notice):
        """The ``Hold`` of this connection's subscription to ``channel``, made now.

        Args:
            policy: a ``SlowConsumer`` value.
            max_queue_bytes: most bytes of frames held (at least one frame is).
            interval_s: least time between two deliveries (``1 / max_rate``); 0 for none.
            notice: ``notice(dropped, first, last, opcode)`` returns the payload of
                the ``lagged`` message sent, with ``opcode``, before held frames
                when some were dropped.
        """
        cdef Hold hold = Hold.__new__(Hold)
        hold.batch = self
        hold.policy = policy
        hold.max_queue_bytes = max_queue_bytes
        hold.interval_s = interval_s
        hold._notice = notice
        hold._latest = {}
        if policy == DROP_OLDEST and interval_s == 0:
            hold._fifo = deque()
        if self._holds is None:
            self._holds = {}
        previous = self._holds.get(channel)
        if previous is not None:
            (<Hold>previous)._cancel()
        self._holds[channel] = hold
        return hold

    cpdef unhold(self, str channel):
        """Forget the hold of ``channel`` and what it kept (the subscription ended)."""
        if self._holds is not None:
            hold = self._holds.pop(channel, None)
            if hold is not None:
                (<Hold>hold)._cancel()

    cpdef Py_ssize_t held_bytes(self):
        """Bytes of frames this connection's holds keep back (each at most its max_queue_bytes)."""
        cdef Py_ssize_t total = 0
        if self._holds is not None:
            for hold in self._holds.values():
                total += (<Hold>hold).held_bytes
        return total

    cdef void _drop_holds(self) except *:
        if self._holds is not None:
            for hold in self._holds.values():
                (<Hold>hold)._cancel()
            self._holds = None

    cdef void _free_buf(self) noexcept:
        if self._cap == INITIAL_CAPACITY:
            self._flusher._give_small(self._buf)
        else:
            free(self._buf)
        self._buf = NULL
        self._cap = 0

    cdef void _release(self) noexcept:
        self._drop_run()
        self._free_buf()
        self._len = 0
        self._segments = None
        self.pending_bytes = 0

    cdef int _overflow(self) except -1:
        self.overflowed = True
        self.closed = True
        self._release()
        self._drop_holds()
        if self._drain_waiters is not None:
            self._wake_drained()
        # Deferred: we are usually inside a fan-out loop over a subscriber list.
        self._call_soon(self._on_overflow)
        return 0


cdef bytes _frame_bytes(int opcode, Py_buffer* view, Py_ssize_t h, bint rsv1):
    cdef bytes out = PyBytes_FromStringAndSize(NULL, h + view.len)
    cdef uint8_t* w = <uint8_t*>PyBytes_AS_STRING(out)
    write_header(w, opcode, view.len, rsv1)
    memcpy(w + h, view.buf, view.len)
    return out


cpdef Py_ssize_t fanout(list batches, bytes frame, OutBatch exclude=None) except -1:
    """Queue ``frame`` on every batch except ``exclude``; return how many took it."""
    cdef Py_ssize_t delivered = 0
    cdef Py_ssize_t n = PyBytes_GET_SIZE(frame)
    cdef Py_ssize_t start
    cdef OutBatch batch
    cdef SharedChunk chunk
    if n < SHARE_ABOVE and len(batches) > 1:
        chunk = (<OutBatch>batches[0])._flusher._share(PyBytes_AS_STRING(frame), n)
        start = chunk.len - n
        for obj in batches:
            batch = <OutBatch>obj
            if batch is not exclude and batch._push_shared(chunk, start, n):
                delivered += 1
        return delivered
    for obj in batches:
        batch = <OutBatch>obj
        if batch is not exclude and batch._push(frame):
            delivered += 1
    return delivered


cdef class Hold:
    """One subscription's publications held back (see the module docstring).

    Made by ``OutBatch.hold``; ``fanout_held`` offers it every frame of its
    channel for its batch.
    """

    cdef bint _waits(self) noexcept:
        # Whether a frame must be held now rather than pushed.
        if self._active:
            return True
        if self.batch.paused and self.policy != DISCONNECT:
            return True
        return self.interval_s > 0 and self.batch._flusher._time() < self._next_due

    cdef bint offer(self, bytes frame, long long offset, object key) except -1:
        """Push ``frame`` now (True) or hold it (False)."""
        if not self._waits():
            if self.interval_s > 0:
                self._next_due = self.batch._flusher._time() + self.interval_s
            return self.batch._push(frame)
        self._active = True
        self._store(frame, offset, key)
        if self.interval_s > 0 and self._timer is None and not (self.batch.paused and self.policy != DISCONNECT):
            self._timer = self.batch._flusher._call_at(self._next_due, self._on_due)
        return False

    cdef void _store(self, bytes frame, long long offset, object key) except *:
        cdef Py_ssize_t n = PyBytes_GET_SIZE(frame)
        cdef tuple oldest
        if self._fifo is not None:
            self._fifo.append((offset, frame))
            self.held_bytes += n
            while self.held_bytes > self.max_queue_bytes and len(self._fifo) > 1:
                oldest = self._fifo.popleft()
                self.held_bytes -= PyBytes_GET_SIZE(<bytes>oldest[1])
                self._count_dropped(<long long>oldest[0])
            return
        # Latest per key, kept in offset order: a replaced key moves to the end.
        oldest = self._latest.pop(key, None)
        if oldest is not None:
            self.held_bytes -= PyBytes_GET_SIZE(<bytes>oldest[1])
            self._count_dropped(<long long>oldest[0])
        self._latest[key] = (offset, frame)
        self.held_bytes += n
        while self.held_bytes > self.max_queue_bytes and len(self._latest) > 1:
            oldest = self._latest.pop(next(iter(self._latest)))
            self.held_bytes -= PyBytes_GET_SIZE(<bytes>oldest[1])
            self._count_dropped(<long long>oldest[0])

    cdef void _count_dropped(self, long long offset) noexcept:
        if not self.dropped or offset < self.first_dropped:
            self.first_dropped = offset
        if not self.dropped or offset > self.last_dropped:
            self.last_dropped = offset
        self.dropped += 1

    cdef void _release(self) except *:
        """Send what is held: the ``lagged`` notice first if some were dropped."""
        cdef list frames = [item[1] for item in (self._fifo if self._fifo is not None
                                                 else self._latest.values())]
        cdef int opcode
        if self._fifo is not None:
            self._fifo.clear()
        self._latest.clear()
        self._active = False
        self.held_bytes = 0
        if self.interval_s > 0:
            self._next_due = self.batch._flusher._time() + self.interval_s
        if self.dropped:
            # The notice goes in the encoding of the frames it precedes.
            opcode = (<bytes>frames[0])[0] & 0x0F if frames else 0x1
            self.batch.push_frame(opcode, self._notice(self.dropped, self.first_dropped,
                                                       self.last_dropped, opcode))
            self.dropped = 0
        self.batch.push_many(frames)

    def _on_due(self):
        self._timer = None
        if self.batch.closed or not self._active:
            return
        if self.batch.paused and self.policy != DISCONNECT:
            return  # OutBatch.resume releases it
        self._release()

    cdef void _resume(self) except *:
        if self.interval_s > 0 and self.batch._flusher._time() < self._next_due:
            if self._timer is None:
                self._timer = self.batch._flusher._call_at(self._next_due, self._on_due)
            return
        self._release()

    cdef void _cancel(self) except *:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._fifo is not None:
            self._fifo.clear()
        self._latest.clear()
        self._active = False
        self.held_bytes = 0


cpdef Py_ssize_t fanout_held(list batches, bytes frame, OutBatch exclude, str channel, long long offset,
                             object key, int policy, Py_ssize_t max_queue_bytes, object notice) except -1:
    """``fanout`` for a channel whose subscribers may hold its publications.

    A batch with a ``Hold`` for ``channel`` (a ``max_rate``, or made by an
    earlier call) is offered the frame; a batch without one takes it as
    ``fanout`` gives it, unless it is paused and ``policy`` is not
    ``DISCONNECT``: then it gets a hold (``max_queue_bytes``, ``notice``) first.
    Returns how many batches took the frame now (held frames not counted).
    """
    cdef Py_ssize_t delivered = 0
    cdef Py_ssize_t n = PyBytes_GET_SIZE(frame)
    cdef Py_ssize_t start = 0
    cdef OutBatch batch
    cdef SharedChunk chunk = None
    if n < SHARE_ABOVE and len(batches) > 1:
        chunk = (<OutBatch>batches[0])._flusher._share(PyBytes_AS_STRING(frame), n)
        start = chunk.len - n
    # Two loops, so that the common case (nothing held on the connection, its
    # socket draining) costs what fanout's loop costs plus two loads: 1.02x
    # fanout's instructions to 1,000 subscribers (bench/delivery.py instructions).
    if chunk is not None:
        for obj in batches:
            batch = <OutBatch>obj
            if batch._holds is None and not batch.paused:
                if batch is not exclude and batch._push_shared(chunk, start, n):
                    delivered += 1
            elif batch is not exclude:
                delivered += _offer(batch, frame, channel, offset, key, policy, max_queue_bytes, notice)
    else:
        for obj in batches:
            batch = <OutBatch>obj
            if batch is exclude:
                continue
            if batch._holds is None and not batch.paused:
                delivered += batch._push(frame)
            else:
                delivered += _offer(batch, frame, channel, offset, key, policy, max_queue_bytes, notice)
    return delivered


cdef bint _offer(OutBatch batch, bytes frame, str channel, long long offset, object key, int policy,
                 Py_ssize_t max_queue_bytes, object notice) except -1:
    # A batch that holds something, or whose socket does not drain.
    hold = batch._holds.get(channel) if batch._holds is not None else None
    if hold is None:
        if policy == DISCONNECT or not batch.paused:
            return batch._push(frame)
        hold = batch.hold(channel, policy, max_queue_bytes, 0.0, notice)
    return (<Hold>hold).offer(frame, offset, key)
