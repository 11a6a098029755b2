# cython: freethreading_compatible = True
"""Frame-level helpers: server frame building and incremental UTF-8 checks.

Reference twin: ``wirehub._pure.frame``.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.stdint cimport uint8_t, uint64_t
from libc.string cimport memcpy

cdef enum:
    UTF8_ACCEPT = 0
    UTF8_REJECT = 12

# Bjoern Hoehrmann's UTF-8 DFA ("Flexible and Economical UTF-8 Decoder"):
# 256 byte -> character-class entries, then the state transition table.
# It rejects overlongs, surrogates and code points above U+10FFFF at the first
# byte that makes the sequence impossible, which is what RFC 6455 §8.1 and
# Autobahn 6.x ("fail fast") ask for.
cdef uint8_t[364] UTF8D = [
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9,
    7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,
    8, 8, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2,
    10, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 4, 3, 3, 11, 6, 6, 6, 5, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8,
    0, 12, 24, 36, 60, 96, 84, 12, 12, 12, 48, 72, 12, 12, 12, 12, 12, 12, 12, 12, 12, 12, 12, 12, 12, 0, 12, 12, 12, 12, 12, 0,
    12, 0, 12, 12, 12, 24, 12, 12, 12, 12, 12, 24, 12, 24, 12, 12, 12, 12, 12, 12, 12, 12, 12, 24, 12, 12, 12, 12, 12, 24, 12, 12,
    12, 12, 12, 12, 12, 24, 12, 12, 12, 12, 12, 12, 12, 12, 12, 36, 12, 36, 12, 12, 12, 36, 12, 12, 12, 12, 12, 36, 12, 36, 12, 12,
    12, 36, 12, 12, 12, 12, 12, 12, 12, 12, 12, 12,]


cdef class Utf8Validator:
    """Validate a text message fragment by fragment (RFC 6455 §5.6, §8.1).

    Call ``feed`` with each fragment and ``finish`` after the last one; a
    ``False`` from either means the message is not UTF-8 (close with 1007).
    """

    def __cinit__(self):
        self._state = UTF8_ACCEPT

    cdef bint feed_ptr(self, const uint8_t* p, Py_ssize_t n) noexcept:
        cdef unsigned int state = self._state
        cdef Py_ssize_t i = 0
        cdef uint64_t word
        while i < n:
            if state == UTF8_ACCEPT:
                # ASCII fast path: eight bytes at a time while no high bit is set.
                while i + 8 <= n:
                    memcpy(&word, p + i, 8)
                    if word & 0x8080808080808080ULL:
                        break
                    i += 8
                if i >= n:
                    break
            state = UTF8D[256 + state + UTF8D[p[i]]]
            if state == UTF8_REJECT:
                self._state = state
                return False
            i += 1
        self._state = state
        return True

    cpdef bint feed(self, object data):
        """Feed one fragment; return False as soon as the bytes cannot be UTF-8."""
        cdef Py_buffer view
        if self._state == UTF8_REJECT:
            return False
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            return self.feed_ptr(<const uint8_t*>view.buf, view.len)
        finally:
            PyBuffer_Release(&view)

    cpdef bint finish(self):
        """Return whether the message ended on a character boundary; reset."""
        cdef bint ok = self._state == UTF8_ACCEPT
        self._state = UTF8_ACCEPT
        return ok

    cpdef reset(self):
        self._state = UTF8_ACCEPT


def is_utf8(data) -> bool:
    """Return whether ``data`` (bytes-like) is complete, valid UTF-8."""
    cdef Utf8Validator v = Utf8Validator()
    return v.feed(data) and v.finish()


cpdef bytes build_frame(int opcode, object payload, bint rsv1=False):
    """Return one unmasked FIN frame (header + payload) as immutable bytes.

    This is the encode-once step of fan-out: the result is shared by every
    recipient of a publication.
    """
    cdef Py_buffer view
    cdef bytes out
    cdef uint8_t* w
    cdef Py_ssize_t h
    PyObject_GetBuffer(payload, &view, PyBUF_SIMPLE)
    try:
        h = header_size(view.len)
        out = PyBytes_FromStringAndSize(NULL, h + view.len)
        w = <uint8_t*>PyBytes_AS_STRING(out)
        write_header(w, opcode, view.len, rsv1)
        memcpy(w + h, view.buf, view.len)
    finally:
        PyBuffer_Release(&view)
    return out


cpdef bytes build_message_frame(int opcode, object head, object body, object tail):
    """One unmasked FIN frame whose payload is ``head + body + tail``.

    A publication's ``message`` is framed here in one allocation: the
    envelope's two ends are a few dozen bytes, and the publication's data
    (any buffer, such as the ``msgspec.Raw`` the decoder left pointing into
    the received message) is copied once, straight to its place in the
    frame. Encoding the envelope, then framing it, copied the data twice.
    """
    cdef Py_buffer hv, bv, tv
    cdef bytes out
    cdef uint8_t* w
    cdef Py_ssize_t n
    PyObject_GetBuffer(head, &hv, PyBUF_SIMPLE)
    try:
        PyObject_GetBuffer(body, &bv, PyBUF_SIMPLE)
        try:
            PyObject_GetBuffer(tail, &tv, PyBUF_SIMPLE)
            try:
                n = hv.len + bv.len + tv.len
                out = PyBytes_FromStringAndSize(NULL, header_size(n) + n)
                w = <uint8_t*>PyBytes_AS_STRING(out)
                w += write_header(w, opcode, n, False)
                memcpy(w, hv.buf, hv.len)
                memcpy(w + hv.len, bv.buf, bv.len)
                memcpy(w + hv.len + bv.len, tv.buf, tv.len)
            finally:
                PyBuffer_Release(&tv)
        finally:
            PyBuffer_Release(&bv)
    finally:
        PyBuffer_Release(&hv)
    return out


cpdef memoryview frame_payload(bytes frame):
    """The payload of an unmasked frame from ``build_frame``, without a copy."""
    cdef uint8_t length = (<const uint8_t*>PyBytes_AS_STRING(frame))[1] & 0x7F
    return memoryview(frame)[2 if length < 126 else 4 if length == 126 else 10:]
