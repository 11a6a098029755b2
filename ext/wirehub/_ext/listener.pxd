from picows.picows cimport WSFrame, WSListener, WSTransport

from wirehub._ext.bucket cimport TokenBucket
from wirehub._ext.fanout cimport Flusher, OutBatch
from wirehub._ext.frame cimport Utf8Validator


cdef class FrameListener(WSListener):
    cdef readonly WSTransport transport
    cdef readonly OutBatch batch
    cdef readonly Py_ssize_t max_message_bytes
    cdef Flusher _flusher
    cdef object _sink
    cdef object _inflater_factory
    cdef object _inflater
    cdef bint _compressed
    cdef Utf8Validator _utf8
    cdef TokenBucket _messages
    cdef TokenBucket _bytes
    cdef TokenBucket _violations
    cdef bytearray _fragments
    cdef int _fragmented_opcode
    cdef Py_ssize_t _fragment_count
    cdef Py_ssize_t _max_fragments
    cdef Py_ssize_t _high_water_bytes
    cdef double _close_timeout_s
    cdef bint _close_received
    cdef double _frame_at        # the last frame's arrival: the rate limiter's clock
    cdef bint _seen              # a frame arrived since the last heartbeat sweep
    cdef double _idle_since      # heartbeat clock: the sweep that last saw activity
    cdef double _ping_sent_at    # heartbeat clock; 0: no ping outstanding

    cdef _add_fragment(self, WSFrame frame)
    cdef _deliver(self, int opcode, bytes payload)
    cdef _on_close_frame(self, WSFrame frame)
    cpdef close(self, int code, str reason)
    cpdef int heartbeat(self, double now, double interval_s, double timeout_s)
