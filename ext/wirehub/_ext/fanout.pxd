cimport cython


cpdef enum SlowConsumer:
    # What a subscription's publications become while its socket does not
    # drain (the channel's ``slow_consumer`` option).
    DISCONNECT = 0      # queued until high_water_bytes, then the connection is closed (1013)
    DROP_OLDEST = 1     # held up to max_queue_bytes, the oldest dropped past it
    CONFLATE = 2        # only the latest per publication key held


cdef enum:
    # Small batch buffers the Flusher keeps for reuse (256 KiB at most).
    SPARE_BUFFERS = 1024
    # Buckets of the fan-out round histogram: len(ROUND_BOUNDS_S), plus one
    # for the rounds above every bound.
    ROUND_BUCKETS = 16


@cython.final
cdef class SharedChunk:
    cdef char* data
    cdef Py_ssize_t len
    cdef Py_ssize_t users               # batches with a run in this chunk


cdef class Flusher:
    cdef list _urgent
    cdef list _dirty
    cdef bint _scheduled
    cdef object _call_soon
    cdef object _call_at
    cdef object _time
    cdef object _run
    cdef object _run_paced
    cdef object _run_slice
    cdef list _round                    # batches of the fan-out round being written, or None
    cdef Py_ssize_t _round_pos          # next batch of the round to write
    cdef double _round_started
    cdef object _clock                  # the round histogram's clock
    cdef double _round_clock_started
    cdef unsigned long long _round_counts[ROUND_BUCKETS]
    cdef double _round_seconds_sum
    cdef object _slice_handle           # Handle of the round's next slice
    cdef object _paced                  # TimerHandle of a paced fan-out flush, or None
    cdef double _not_before             # loop time before which fan-out waits
    cdef Py_ssize_t _queued_frames      # fan-out frames queued since the last round started
    cdef readonly double max_pace_s
    cdef readonly object loop
    cdef SharedChunk _chunk             # where fanout() copies frames this tick
    cdef char* _spare[SPARE_BUFFERS]    # flushed small batch buffers, for reuse
    cdef int _nspare

    cdef SharedChunk _share(self, const char* frame, Py_ssize_t n)
    cdef char* _take_small(self) noexcept
    cdef void _give_small(self, char* buf) noexcept

    cdef void _record_round(self, double seconds) noexcept
    cdef void mark(self, OutBatch batch, bint urgent) except *
    cdef void _write(self, list batches) except *
    cdef void _write_slice(self) except *
    cpdef tick(self)
    cpdef flush(self)


cdef class Hold


@cython.final
cdef class OutBatch:
    cdef char* _buf
    cdef Py_ssize_t _len
    cdef Py_ssize_t _cap
    cdef list _segments
    cdef SharedChunk _run               # open run: _run.data[_run_start:_run_end]
    cdef Py_ssize_t _run_start
    cdef Py_ssize_t _run_end
    cdef readonly Py_ssize_t pending_bytes
    cdef readonly Py_ssize_t high_water_bytes
    cdef readonly bint paused
    cdef readonly bint closed
    cdef readonly bint overflowed
    cdef bint _dirty
    cdef bint _urgent
    cdef int _fd
    cdef Flusher _flusher
    cdef object _write
    cdef object _writelines
    cdef object _transport_buffered
    cdef object _on_overflow
    cdef object _call_soon
    cdef dict _holds                    # channel -> Hold, None until the first
    cdef list _drain_waiters            # futures of drained(), None until the first

    cdef bint _push(self, bytes frame) except -1
    cdef bint _push_shared(self, SharedChunk chunk, Py_ssize_t start, Py_ssize_t n) except -1
    cdef int _queued(self) except -1
    cdef int _spill(self) except -1
    cdef void _drop_run(self) noexcept
    cdef int _reserve(self, Py_ssize_t extra) except -1
    cdef int _append(self, const char* data, Py_ssize_t n) except -1
    cdef bint _admit(self, Py_ssize_t n) except -1
    cdef int _seal(self) except -1
    cdef int _write_out(self, char* ptr, Py_ssize_t n) except -1
    cdef void _free_buf(self) noexcept
    cdef void _release(self) noexcept
    cdef int _overflow(self) except -1
    cdef void _mark_urgent(self) except *
    cdef void _wake_drained(self) except *
    cdef void _drop_holds(self) except *
    cpdef bint push(self, bytes frame)
    cpdef bint push_frame(self, int opcode, object payload, bint rsv1=*)
    cpdef flush(self)
    cpdef trim(self)
    cpdef pause(self)
    cpdef resume(self)
    cpdef close(self)
    cpdef Py_ssize_t push_many(self, list frames) except -1
    cpdef Hold hold(self, str channel, int policy, Py_ssize_t max_queue_bytes, double interval_s, object notice)
    cpdef unhold(self, str channel)
    cpdef Py_ssize_t held_bytes(self)


@cython.final
cdef class Hold:
    cdef readonly OutBatch batch
    cdef readonly int policy
    cdef readonly Py_ssize_t max_queue_bytes
    cdef readonly double interval_s
    cdef readonly Py_ssize_t held_bytes
    cdef readonly long long dropped
    cdef readonly long long first_dropped
    cdef readonly long long last_dropped
    cdef object _notice                 # notice(dropped, first, last, opcode) -> payload
    cdef object _fifo                   # deque of (offset, frame) (DROP_OLDEST)
    cdef dict _latest                   # key -> (offset, frame), oldest first (CONFLATE, max_rate)
    cdef double _next_due               # loop time the next rate-limited delivery may go
    cdef object _timer
    cdef bint _active                   # something is held: new frames must wait behind it

    cdef bint _waits(self) noexcept
    cdef bint offer(self, bytes frame, long long offset, object key) except -1
    cdef void _store(self, bytes frame, long long offset, object key) except *
    cdef void _count_dropped(self, long long offset) noexcept
    cdef void _release(self) except *
    cdef void _resume(self) except *
    cdef void _cancel(self) except *


cpdef Py_ssize_t fanout(list batches, bytes frame, OutBatch exclude=*) except -1
cpdef Py_ssize_t fanout_held(list batches, bytes frame, OutBatch exclude, str channel, long long offset,
                             object key, int policy, Py_ssize_t max_queue_bytes, object notice) except -1
