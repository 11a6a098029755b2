# cython: freethreading_compatible = True
"""TLV records: ``[tag u8][length u32 big-endian][value]``, repeated.

The binary twin of the JSON codec (see docs/protocol.md). This module only
frames records; what the tags mean is decided in ``wirehub.protocol.codec``.
Its readable reference is ``wirehub._pure.tlv``; both raise ``ValueError``
with the same text for the same malformed input.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.stdint cimport uint8_t, uint32_t
from libc.string cimport memcpy

cdef enum:
    HEADER_BYTES = 5


cdef inline uint32_t _read_u32be(const uint8_t* p) noexcept:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | <uint32_t>p[3]


cdef inline void _write_u32be(uint8_t* p, uint32_t v) noexcept:
    p[0] = <uint8_t>(v >> 24)
    p[1] = <uint8_t>(v >> 16)
    p[2] = <uint8_t>(v >> 8)
    p[3] = <uint8_t>v


cpdef list decode(object data, Py_ssize_t max_records=64):
    """Split ``data`` into ``[(tag, value_bytes), ...]``.

    Raises:
        ValueError: a record is truncated, or there are more than
            ``max_records`` records (a limit on what one message may cost).
    """
    cdef Py_buffer view
    cdef list records = []
    cdef const uint8_t* p
    cdef Py_ssize_t pos = 0, n
    cdef uint32_t length
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        p = <const uint8_t*>view.buf
        n = view.len
        while pos < n:
            if len(records) >= max_records:
                raise ValueError(f"more than {max_records} TLV records")
            if n - pos < HEADER_BYTES:
                raise ValueError(f"truncated TLV header at byte {pos}")
            length = _read_u32be(p + pos + 1)
            if <Py_ssize_t>length > n - pos - HEADER_BYTES:
                raise ValueError(
                    f"TLV record at byte {pos} declares {length} bytes, "
                    f"{n - pos - HEADER_BYTES} remain")
            records.append((p[pos], PyBytes_FromStringAndSize(
                <const char*>p + pos + HEADER_BYTES, length)))
            pos += HEADER_BYTES + length
    finally:
        PyBuffer_Release(&view)
    return records


cpdef bytes encode(object records):
    """Serialize an iterable of ``(tag, value)`` pairs (value: bytes-like)."""
    cdef list items = list(records)
    cdef Py_ssize_t total = 0
    cdef Py_buffer view
    cdef object tag, value
    cdef list sizes = []
    for tag, value in items:
        if not 0 <= tag <= 255:
            raise ValueError(f"TLV tag {tag} does not fit in one byte")
        total += HEADER_BYTES + len(memoryview(value))
    cdef bytes out = PyBytes_FromStringAndSize(NULL, total)
    cdef uint8_t* w = <uint8_t*>PyBytes_AS_STRING(out)
    for tag, value in items:
        PyObject_GetBuffer(value, &view, PyBUF_SIMPLE)
        try:
            if view.len > 0xFFFFFFFF:
                raise ValueError("TLV value longer than 2**32-1 bytes")
            w[0] = <uint8_t>tag
            _write_u32be(w + 1, <uint32_t>view.len)
            memcpy(w + HEADER_BYTES, view.buf, view.len)
            w += HEADER_BYTES + view.len
        finally:
            PyBuffer_Release(&view)
    return out
