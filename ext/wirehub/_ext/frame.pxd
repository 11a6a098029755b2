from libc.stdint cimport uint8_t, uint64_t


cdef enum:
    # RFC 6455 §5.2: 2 bytes, +2 for 16-bit lengths, +8 for 64-bit lengths.
    # Server frames are never masked, so no mask key.
    MAX_HEADER_BYTES = 10


cdef inline Py_ssize_t header_size(Py_ssize_t payload_len) noexcept:
    if payload_len < 126:
        return 2
    if payload_len < 65536:
        return 4
    return 10


cdef inline Py_ssize_t write_header(uint8_t* out, int opcode, Py_ssize_t payload_len,
                                    bint rsv1) noexcept:
    """Write an unmasked FIN frame header (RFC 6455 §5.2); return its size."""
    cdef uint64_t n = <uint64_t>payload_len
    cdef int i
    out[0] = 0x80 | (0x40 if rsv1 else 0) | (opcode & 0x0F)
    if payload_len < 126:
        out[1] = <uint8_t>payload_len
        return 2
    if payload_len < 65536:
        out[1] = 126
        out[2] = <uint8_t>(n >> 8)
        out[3] = <uint8_t>n
        return 4
    out[1] = 127
    for i in range(8):
        out[2 + i] = <uint8_t>(n >> (56 - 8 * i))
    return 10


cdef class Utf8Validator:
    cdef unsigned int _state

    cpdef bint feed(self, object data)
    cpdef bint finish(self)
    cpdef reset(self)
    cdef bint feed_ptr(self, const uint8_t* p, Py_ssize_t n) noexcept
