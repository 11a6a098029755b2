# cython: freethreading_compatible = True
"""Keep picows from answering frame N+1 before frame N is delivered.

picows's parser reads one frame ahead: after parsing frame N it parses the
header of frame N+1 before calling the listener with N. When N+1 is a
protocol error (reserved opcode, unmasked or oversized frame, a bad or second
CLOSE), picows sends CLOSE 1002/1009 first and the reply to N arrives after
it, or never (Autobahn 4.1.3–4.2.4, 5.x, 7.1.x).

``ReadAheadGuard`` sits between the event loop and picows's ``WSProtocol``.
The loop still reads straight into picows's buffer (zero copy); the guard
scans the frame headers of each read and, when a frame picows might refuse
starts *after* other bytes of the same read, splits the read there: picows
gets the bytes before it, the listener's outbound batch is flushed, then the
rest is fed as a second read. Reads without such a frame pass through
untouched, so the guard costs one header scan per read.

With ``client=True`` it guards a client's ``WSProtocol`` (``wirehub.client_wire``):
server frames are unmasked, so a *masked* frame is the risky one, and the
upgrade response may share a read with the first frames (a server may send
them at once): picows gets the response head alone, the rest is scanned.

It is also where admission control runs (``wirehub.admission``): the
guard asks ``admission.admit(transport)`` at accept, answers a refused socket
once its request arrives (or drops it at once when too many refused sockets
already wait for theirs), and answers 431 when the request head outgrows
``admission.max_header_bytes`` -- all before picows parses a byte. Until the
upgrade, the socket is under admission's handshake timeout.

It also caps each read at ``MAX_READ_BYTES``: picows doubles its read
buffer whenever a read fills it, so a peer sending faster than the gateway
parses (an uploader ignoring its window) would grow that buffer without
bound -- 32 MiB was seen -- and every frame of such a read is handled
before a ``pause_reading`` can take effect.

Reference twin: ``wirehub._pure.readahead``.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from libc.stdint cimport uint8_t, uint64_t
from libc.string cimport memcpy

# The most one read hands picows (see the module docstring).
MAX_READ_BYTES = 256 * 1024


cdef class ReadAheadGuard:
    """The loop's protocol; forwards everything to ``inner`` (a picows WSProtocol).

    Args:
        inner: the picows ``WSProtocol`` for this connection.
        max_frame_size: picows's ``max_frame_size`` (a larger frame is one it refuses).
        admission: a ``wirehub.admission.Admission``, or None for no limits.
        client: ``inner`` is a client's protocol (see the module docstring).
    """

    cdef object _inner
    cdef object _admission
    cdef object _peer            # admission's key for this socket, once admitted
    cdef object _refusal         # response bytes for a refused socket, until sent
    cdef bint _refused           # admission counts this socket among those it answers
    cdef Py_ssize_t _head_bytes  # request-head bytes seen before the upgrade
    cdef bint _discard           # answered with an error: ignore what still arrives
    cdef object _view
    cdef uint64_t _skip          # payload bytes of the current frame still to come
    cdef uint8_t _header[14]     # a header split across reads
    cdef int _header_len
    cdef uint64_t _max_frame_size
    cdef bint _upgraded
    cdef bint _client
    cdef int _head_state         # client: how much of the response's CR LF CR LF was seen (4: all)
    cdef Py_ssize_t _head_pos    # client: response bytes seen
    cdef bint _not_101           # client: the response's status is not 101

    def __init__(self, inner, uint64_t max_frame_size, admission=None, bint client=False):
        self._inner = inner
        self._max_frame_size = max_frame_size
        self._admission = admission
        self._client = client

    # asyncio protocol interface, forwarded
    def connection_made(self, transport):
        drop = False
        if self._admission is not None:
            decision = self._admission.admit(transport)
            if decision is None:
                drop = True  # refused, with too many others waiting for an answer
            elif isinstance(decision, bytes):
                self._refusal = decision
                self._refused = True
            else:
                self._peer = decision
        self._inner.connection_made(transport)
        if drop:
            self._discard = True
            transport.abort()
        elif self._admission is not None:
            self._admission.handshake_started(self)

    def connection_lost(self, exc):
        if not self._upgraded and self._admission is not None:
            self._admission.handshake_ended(self)
        if self._peer is not None:
            self._admission.release(self._peer)
            self._peer = None
        elif self._refused:
            self._admission.release_refused()
            self._refused = False
        self._inner.connection_lost(exc)

    def eof_received(self):
        return self._inner.eof_received()

    def pause_writing(self):
        self._inner.pause_writing()

    def resume_writing(self):
        self._inner.resume_writing()

    def handshake_timed_out(self):
        """Admission's handshake timeout: close, and ignore what still arrives."""
        self._discard = True
        self._inner.transport.disconnect()

    def get_buffer(self, Py_ssize_t size_hint):
        view = self._inner.get_buffer(size_hint)
        if len(view) > MAX_READ_BYTES:
            view = view[:MAX_READ_BYTES]
        self._view = view
        return view

    def buffer_updated(self, Py_ssize_t nbytes):
        if not self._upgraded and self._client:
            self._feed_response(nbytes)
            self._view = None
            return
        if not self._upgraded:
            # The HTTP upgrade request: picows's concern, once admitted.
            if self._discard:
                return
            if self._refusal is not None:
                self._discard = True
                self._admission.refuse(self._inner.transport.underlying_transport, self._refusal)
                self._refusal = None
                return
            self._head_bytes += nbytes
            if self._admission is not None and self._head_bytes > self._admission.max_header_bytes:
                self._discard = True
                self._admission.refuse_header(self._inner.transport.underlying_transport)
                return
            self._view = None
            self._inner.buffer_updated(nbytes)
            if self._inner.listener is not None:
                self._upgraded = True
                if self._admission is not None:
                    self._admission.handshake_ended(self)
            return
        self._feed(nbytes)
        # The loop asks for a new buffer before every read; keeping this one
        # until then would hold a memoryview and its buffer (~300 bytes) on
        # every idle connection.
        self._view = None

    cdef _feed_response(self, Py_ssize_t nbytes):
        """A client's reads until the upgrade: a 101's head alone to picows,
        then what followed it in the same read through ``_feed``. Any other
        status goes through whole (picows fails the handshake on it and
        keeps the body that came with the head for the error)."""
        cdef Py_buffer view
        cdef Py_ssize_t end = 0, i
        cdef bytes tail = None
        cdef const uint8_t* p
        cdef uint8_t byte
        if self._head_state < 4:
            PyObject_GetBuffer(self._view, &view, PyBUF_SIMPLE)
            try:
                p = <const uint8_t*>view.buf
                for i in range(nbytes):
                    byte = p[i]
                    if 9 <= self._head_pos <= 11 and byte != b"101"[self._head_pos - 9]:
                        self._not_101 = True  # "HTTP/1.1 101": the status is bytes 9-11
                    self._head_pos += 1
                    if byte == (10 if self._head_state & 1 else 13):  # CR LF CR LF
                        self._head_state += 1
                        if self._head_state == 4:
                            end = i + 1
                            break
                    else:
                        self._head_state = 1 if byte == 13 else 0
                if 0 < end < nbytes and not self._not_101:
                    tail = (<char*>view.buf)[end:nbytes]
            finally:
                PyBuffer_Release(&view)
        if tail is None:
            self._inner.buffer_updated(nbytes)
            self._upgraded = self._inner.listener is not None
            return
        self._inner.buffer_updated(end)
        self._upgraded = self._inner.listener is not None
        self._view = self._inner.get_buffer(-1)
        PyObject_GetBuffer(self._view, &view, PyBUF_SIMPLE)
        try:
            if view.len < len(tail):  # cannot happen: the tail fit before
                raise RuntimeError("picows read buffer shrank below the unread tail")
            memcpy(view.buf, <char*>tail, len(tail))
        finally:
            PyBuffer_Release(&view)
        if self._upgraded:
            self._feed(len(tail))
        else:
            self._inner.buffer_updated(len(tail))

    cdef _feed(self, Py_ssize_t nbytes):
        cdef Py_buffer view
        cdef Py_ssize_t split
        cdef bytes tail
        while True:
            PyObject_GetBuffer(self._view, &view, PyBUF_SIMPLE)
            try:
                split = self._find_split(<const uint8_t*>view.buf, nbytes)
                if split <= 0:
                    tail = None
                else:
                    tail = (<char*>view.buf)[split:nbytes]
            finally:
                PyBuffer_Release(&view)
            if tail is None:
                self._inner.buffer_updated(nbytes)
                return
            self._inner.buffer_updated(split)
            self._flush_listener()
            self._view = self._inner.get_buffer(-1)
            nbytes = len(tail)
            PyObject_GetBuffer(self._view, &view, PyBUF_SIMPLE)
            try:
                if view.len < nbytes:  # cannot happen: the tail fit before
                    raise RuntimeError("picows read buffer shrank below the unread tail")
                memcpy(view.buf, <char*>tail, nbytes)
            finally:
                PyBuffer_Release(&view)

    cdef _flush_listener(self):
        listener = self._inner.listener
        batch = getattr(listener, "batch", None)
        if batch is not None:
            batch.flush()

    cdef Py_ssize_t _find_split(self, const uint8_t* p, Py_ssize_t n):
        """Scan headers in ``p[0:n]``; return where a risky frame starts (> 0), else 0.

        State carried across reads: ``_skip`` (payload still to pass) and a
        partial header. A returned split leaves the state at that frame's
        start, which is where the re-fed tail begins.
        """
        cdef Py_ssize_t pos = 0, take, header_start
        cdef int need, flag, i
        cdef uint64_t length
        cdef uint8_t b0, b1, opcode
        while pos < n:
            if self._skip:
                take = <Py_ssize_t>min(<uint64_t>(n - pos), self._skip)
                pos += take
                self._skip -= take
                continue
            header_start = pos - self._header_len
            # Collect the 2-byte base header.
            while self._header_len < 2 and pos < n:
                self._header[self._header_len] = p[pos]
                self._header_len += 1
                pos += 1
            if self._header_len < 2:
                return 0
            b0 = self._header[0]
            b1 = self._header[1]
            opcode = b0 & 0x0F
            flag = b1 & 0x7F
            if self._risky_start(b0, b1) and header_start > 0:
                return self._split_at(header_start)
            need = 2 + (2 if flag == 126 else 8 if flag == 127 else 0) + (4 if b1 & 0x80 else 0)
            while self._header_len < need and pos < n:
                self._header[self._header_len] = p[pos]
                self._header_len += 1
                pos += 1
            if self._header_len < need:
                return 0
            if flag == 126:
                length = (<uint64_t>self._header[2] << 8) | self._header[3]
                if length < 126 and header_start > 0:
                    return self._split_at(header_start)
            elif flag == 127:
                length = 0
                for i in range(8):
                    length = (length << 8) | self._header[2 + i]
                if (length >> 63 or length < 65536) and header_start > 0:
                    return self._split_at(header_start)
            else:
                length = flag
            if length > self._max_frame_size and opcode < 8 and header_start > 0:
                return self._split_at(header_start)
            self._header_len = 0
            self._skip = length
        return 0

    cdef inline bint _risky_start(self, uint8_t b0, uint8_t b1) noexcept:
        cdef uint8_t opcode = b0 & 0x0F
        if (b1 & 0x80) == (0x80 if self._client else 0):
            return True  # a masked server frame, an unmasked client frame (RFC 6455 §5.1)
        if opcode == 0 or opcode == 1 or opcode == 2:
            return False
        if opcode == 9 or opcode == 10:
            return not (b0 & 0x80) or (b1 & 0x7F) > 125
        return True  # CLOSE (maybe invalid or a second one) or a reserved opcode

    cdef inline Py_ssize_t _split_at(self, Py_ssize_t header_start) noexcept:
        self._header_len = 0
        self._skip = 0
        return header_start
