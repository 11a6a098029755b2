"""permessage-deflate codec (RFC 7692 §7.2) on zlib's ``z_stream``.

The compiled twin of ``wirehub._pure.deflate``: same API, same tests
(``tests/test_deflate.py``). zlib writes straight into C buffers; the only
Python object made per call is the result ``bytes``.

Memory per connection (zlib's own accounting, ``zconf.h``):

* a :class:`Deflater` holds ``(1 << (window_bits + 2)) + (1 << (mem_level + 9))``
  bytes of deflate state, plus about 6 KiB: 256 KiB at the defaults
  (``window_bits=15``, ``mem_level=8``), 4 KiB + 64 KiB at
  ``window_bits=10, mem_level=7``. That is why the fan-out path shares one
  compressor with no context takeover instead of one per connection.
* an :class:`Inflater` holds ``1 << window_bits`` bytes of window plus about
  7 KiB of inflate state: 39 KiB at ``window_bits=15``.

A call also allocates its output buffer for the duration of the call:
``deflateBound(len(payload))`` to compress, and for inflating a buffer that
doubles from ``4 * len(fragment)`` but never past what the message may still
inflate to plus one byte.

Neither class is thread-safe, and neither releases the GIL: each belongs to
one connection (or, for a shared no-context-takeover compressor, to one
event loop).
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from libc.string cimport memcmp, memset

__all__ = ["Deflater", "Inflater", "MessageTooBig", "InvalidData", "ZLIB_RUNTIME_VERSION"]

ZLIB_RUNTIME_VERSION = zlibVersion().decode("ascii")

# RFC 7692 §7.2.1: the four octets a Z_SYNC_FLUSH ends with, removed from
# each compressed message and appended again before inflating it (§7.2.2).
cdef const unsigned char* _TAIL = <const unsigned char*>b"\x00\x00\xff\xff"

# max_ratio only trips once a message has inflated past this many bytes, so
# small, very compressible messages (a run of spaces, zeroed structs) pass.
RATIO_FLOOR_BYTES = 1024 * 1024
cdef Py_ssize_t _RATIO_FLOOR_BYTES = RATIO_FLOOR_BYTES

# avail_in/avail_out are 32-bit: feed and drain zlib in slices of at most this.
cdef size_t _MAX_SLICE = 1 << 30


class MessageTooBig(Exception):
    """A compressed message inflates past ``max_message_bytes`` or ``max_ratio``.

    The connection must be failed with close code 1009 (RFC 6455 §7.4.1).
    """


class InvalidData(Exception):
    """The compressed data is not a valid raw deflate stream.

    The connection must be failed; RFC 7692 names no close code, websockets
    uses 1002 (protocol error).
    """


cdef inline int _check_window_bits(int window_bits) except -1:
    if not 8 <= window_bits <= 15:
        raise ValueError(f"window_bits must be between 8 and 15, got {window_bits}")
    return 0


cdef inline int _zlib_window_bits(int window_bits) noexcept:
    # zlib rejects a raw deflate window of 8 bits (256 bytes) since 1.2.9 and
    # silently used 9 before that, so 9 is the smallest window zlib can
    # *compress* with; and an inflater sized 8 would reject the 512-byte
    # distances such a "window 8" peer (or an old zlib) really emits. Both
    # sides therefore run 8 as 9, like zlib itself did; the negotiation
    # (wirehub.protocol.permessage_deflate) never agrees to compress with 8.
    return window_bits if window_bits > 9 else 9


cdef inline object _zlib_error(z_stream* strm, int ret, str what):
    if ret == Z_MEM_ERROR:
        return MemoryError(f"zlib {what}: out of memory")
    msg = strm.msg.decode("ascii", "replace") if strm.msg != NULL else f"error {ret}"
    return InvalidData(f"zlib {what}: {msg}")


cdef class Deflater:
    """Compress whole messages for permessage-deflate (RFC 7692 §7.2.1).

    Args:
        level: zlib level, 0 (store) to 9, or -1 for zlib's default (6).
        mem_level: 1 to 9; memory for the match finder, see the module docstring.
        window_bits: 8 to 15, the agreed ``*_max_window_bits`` for our side
            (8 is run as 9, see ``_zlib_window_bits``).
        no_context_takeover: reset the LZ77 window after every message
            (the agreed ``*_no_context_takeover`` for our side).
    """

    def __cinit__(self):
        memset(&self._strm, 0, sizeof(z_stream))
        self._ready = False

    def __init__(self, *, int level=6, int mem_level=8, int window_bits=15,
                 bint no_context_takeover=False):
        if not -1 <= level <= 9:
            raise ValueError(f"level must be between -1 and 9, got {level}")
        if not 1 <= mem_level <= 9:
            raise ValueError(f"mem_level must be between 1 and 9, got {mem_level}")
        _check_window_bits(window_bits)
        if self._ready:  # __init__ called twice
            deflateEnd(&self._strm)
            self._ready = False
        self.level = level
        self.mem_level = mem_level
        self.window_bits = _zlib_window_bits(window_bits)
        self.no_context_takeover = no_context_takeover
        cdef int ret = deflateInit2(&self._strm, level, Z_DEFLATED, -self.window_bits,
                                    mem_level, Z_DEFAULT_STRATEGY)
        if ret != Z_OK:
            raise _zlib_error(&self._strm, ret, "deflateInit2")
        self._ready = True

    def __dealloc__(self):
        if self._ready:
            deflateEnd(&self._strm)

    cpdef bytes compress(self, payload):
        """Compress one whole message; return the payload for its frame(s).

        Send the result with RSV1 set on the first frame (RFC 7692 §6). The
        stream is flushed with Z_SYNC_FLUSH and the trailing ``00 00 ff ff``
        removed (§7.2.1), so the result may be split into frames anywhere.

        Args:
            payload: the message, any bytes-like object.

        Returns:
            The compressed payload (never empty: at least one byte).
        """
        cdef Py_buffer view
        if not self._ready:
            raise ValueError("Deflater.__init__ was not called")
        PyObject_GetBuffer(payload, &view, PyBUF_SIMPLE)
        try:
            return self._compress(<const unsigned char*>view.buf, <size_t>view.len)
        finally:
            PyBuffer_Release(&view)

    cdef bytes _compress(self, const unsigned char* data, size_t size):
        cdef:
            z_stream* strm = &self._strm
            size_t cap = deflateBound(strm, <uLong>size) + 16
            size_t produced = 0
            size_t remaining = size
            size_t slice_in, room
            unsigned char* out
            unsigned char* grown
            int flush, ret
            bytes result

        out = <unsigned char*>PyMem_Malloc(cap)
        if out == NULL:
            raise MemoryError()
        try:
            # Like zlib.compressobj().compress() + .flush(Z_SYNC_FLUSH), so both
            # twins emit identical bytes: consume the input with Z_NO_FLUSH,
            # then flush with no input. (A lone Z_SYNC_FLUSH right after the
            # previous message's would return Z_BUF_ERROR and emit nothing.)
            strm.next_in = data
            strm.avail_in = 0
            flush = Z_NO_FLUSH
            while True:
                if strm.avail_in == 0 and remaining > 0:
                    slice_in = remaining if remaining < _MAX_SLICE else _MAX_SLICE
                    strm.avail_in = <uInt>slice_in
                    remaining -= slice_in
                if produced == cap:  # deflateBound was short: grow
                    grown = <unsigned char*>PyMem_Realloc(out, cap * 2)
                    if grown == NULL:
                        raise MemoryError()
                    out = grown
                    cap *= 2
                room = cap - produced
                if room > _MAX_SLICE:
                    room = _MAX_SLICE
                strm.next_out = out + produced
                strm.avail_out = <uInt>room
                ret = deflate(strm, flush)
                produced += room - strm.avail_out
                if ret != Z_OK and ret != Z_BUF_ERROR:
                    raise _zlib_error(strm, ret, "deflate")
                # A phase is done once zlib has consumed all input and still
                # had room left (so nothing is pending).
                if strm.avail_out != 0 and strm.avail_in == 0 and remaining == 0:
                    if flush == Z_SYNC_FLUSH:
                        break
                    flush = Z_SYNC_FLUSH
            # Z_SYNC_FLUSH always ends with an empty stored block (§7.2.1).
            if produced >= 4 and memcmp(out + produced - 4, _TAIL, 4) == 0:
                produced -= 4
            result = PyBytes_FromStringAndSize(<char*>out, <Py_ssize_t>produced)
        finally:
            PyMem_Free(out)
            strm.next_in = NULL
            strm.next_out = NULL
        if self.no_context_takeover:
            # §7.2.1: with *_no_context_takeover, start each message afresh.
            deflateReset(strm)
        return result


cdef class Inflater:
    """Inflate permessage-deflate messages, frame by frame, within limits (RFC 7692 §7.2.2).

    Call :meth:`feed` once per frame of a compressed message (the first
    frame had RSV1 set), with ``fin`` of that frame; join the returned pieces.

    Args:
        window_bits: 8 to 15, the agreed ``*_max_window_bits`` of the peer.
        no_context_takeover: the peer resets its window after each message,
            so ours is reset too.
        max_message_bytes: the largest inflated message accepted. Output
            never grows past it: zlib is stopped as soon as it is exceeded.
        max_ratio: when above 0, also reject a message whose output exceeds
            ``max_ratio`` times its compressed input once it is past
            ``RATIO_FLOOR_BYTES`` (1 MiB), i.e. a decompression bomb.

    After :class:`MessageTooBig` or :class:`InvalidData` the stream is in an
    unknown state: fail the connection and drop the Inflater.
    """

    def __cinit__(self):
        memset(&self._strm, 0, sizeof(z_stream))
        self._ready = False

    def __init__(self, *, int window_bits=15, bint no_context_takeover=False,
                 Py_ssize_t max_message_bytes, Py_ssize_t max_ratio=0):
        _check_window_bits(window_bits)
        if max_message_bytes < 0:
            raise ValueError(f"max_message_bytes must be >= 0, got {max_message_bytes}")
        if max_ratio < 0:
            raise ValueError(f"max_ratio must be >= 0, got {max_ratio}")
        if self._ready:  # __init__ called twice
            inflateEnd(&self._strm)
            self._ready = False
        self.window_bits = _zlib_window_bits(window_bits)
        self.no_context_takeover = no_context_takeover
        self.max_message_bytes = max_message_bytes
        self.max_ratio = max_ratio
        self._out_bytes = 0
        self._in_bytes = 0
        self._broken = False
        cdef int ret = inflateInit2(&self._strm, -self.window_bits)
        if ret != Z_OK:
            raise _zlib_error(&self._strm, ret, "inflateInit2")
        self._ready = True

    def __dealloc__(self):
        if self._ready:
            inflateEnd(&self._strm)

    cdef Py_ssize_t _allowance(self):
        """How many more bytes the current message may inflate to."""
        cdef Py_ssize_t limit = self.max_message_bytes
        cdef Py_ssize_t by_ratio
        if self.max_ratio > 0:
            if self._in_bytes > (<Py_ssize_t>1 << 62) // self.max_ratio:
                by_ratio = limit  # the product would overflow: no tighter bound
            else:
                by_ratio = self.max_ratio * self._in_bytes
            if by_ratio < _RATIO_FLOOR_BYTES:
                by_ratio = _RATIO_FLOOR_BYTES
            if by_ratio < limit:
                limit = by_ratio
        return limit - self._out_bytes

    cdef object _too_big(self):
        self._broken = True
        if self._out_bytes > self.max_message_bytes or self.max_ratio == 0:
            return MessageTooBig(
                f"message inflates past max_message_bytes={self.max_message_bytes}"
            )
        return MessageTooBig(
            f"message inflates past max_ratio={self.max_ratio} times its "
            f"{self._in_bytes} compressed bytes"
        )

    cpdef bytes feed(self, fragment, bint fin):
        """Inflate the payload of one frame of a compressed message.

        Args:
            fragment: the frame's payload (bytes-like), as received.
            fin: the frame's FIN bit; ``00 00 ff ff`` is appended (§7.2.2)
                and the per-message limits are reset after it.

        Returns:
            The bytes this frame inflated to (possibly empty).

        Raises:
            MessageTooBig: the message so far exceeds ``max_message_bytes``,
                or ``max_ratio`` (fail the connection with 1009).
            InvalidData: the data is not valid deflate (fail the connection).
        """
        cdef Py_buffer view
        if not self._ready:
            raise ValueError("Inflater.__init__ was not called")
        if self._broken:
            raise InvalidData("the inflater failed earlier; the connection must be closed")
        PyObject_GetBuffer(fragment, &view, PyBUF_SIMPLE)
        try:
            self._in_bytes += view.len
            return self._inflate(<const unsigned char*>view.buf, <size_t>view.len, fin)
        finally:
            PyBuffer_Release(&view)

    cdef bytes _inflate(self, const unsigned char* data, size_t size, bint fin):
        cdef:
            z_stream* strm = &self._strm
            Py_ssize_t allowance = self._allowance()
            # One byte past the allowance is enough to know it is exceeded;
            # the buffer never grows beyond that (no "inflate all, then check").
            size_t cap_limit = <size_t>allowance + 1
            size_t cap = size * 4 + 256
            size_t produced = 0
            size_t remaining = size
            size_t slice_in, room
            bint tail_fed = False
            bint out_full = False
            unsigned char* out
            unsigned char* grown
            int ret
            bytes result

        if cap > cap_limit:
            cap = cap_limit
        out = <unsigned char*>PyMem_Malloc(cap)
        if out == NULL:
            raise MemoryError()
        try:
            strm.next_in = data
            strm.avail_in = 0
            while True:
                # Pending output (out_full) must be drained before moving on:
                # zlib may hold the rest of a long match with no input left.
                if strm.avail_in == 0 and not out_full:
                    if remaining > 0:
                        slice_in = remaining if remaining < _MAX_SLICE else _MAX_SLICE
                        strm.avail_in = <uInt>slice_in
                        remaining -= slice_in
                    elif fin and not tail_fed:
                        # §7.2.2: append 00 00 ff ff to the message's payload.
                        strm.next_in = _TAIL
                        strm.avail_in = 4
                        tail_fed = True
                    else:
                        break
                if produced == cap:
                    # Only reachable while cap < cap_limit: reaching cap_limit
                    # means produced > allowance, raised below.
                    cap = cap * 2 if cap * 2 < cap_limit else cap_limit
                    grown = <unsigned char*>PyMem_Realloc(out, cap)
                    if grown == NULL:
                        raise MemoryError()
                    out = grown
                room = cap - produced
                if room > _MAX_SLICE:
                    room = _MAX_SLICE
                strm.next_out = out + produced
                strm.avail_out = <uInt>room
                ret = inflate(strm, Z_SYNC_FLUSH)
                produced += room - strm.avail_out
                out_full = strm.avail_out == 0
                if ret != Z_OK and ret != Z_BUF_ERROR and ret != Z_STREAM_END:
                    # Invalid data wins over size, as in Python's zlib (the
                    # twin): the output of a failing call is never looked at.
                    self._broken = True
                    raise _zlib_error(strm, ret, "inflate")
                if <Py_ssize_t>produced > allowance:
                    self._out_bytes += produced
                    raise self._too_big()
                if ret == Z_STREAM_END:
                    # The peer ended its stream with a BFINAL block (§7.2.3.4)
                    # and must start a new one for whatever follows (it had to
                    # reset its compressor too). The 00 00 ff ff we append
                    # (§7.2.2) is no block on its own: drop what is left of it.
                    inflateReset(strm)
                    if tail_fed:
                        strm.avail_in = 0
                    elif strm.avail_in == 0 and remaining == 0:
                        tail_fed = True
                elif ret == Z_BUF_ERROR and strm.avail_in != 0 and not out_full:
                    # Z_BUF_ERROR otherwise only means "no progress possible"
                    # (no input or no room), which the loop resolves.
                    self._broken = True  # input and room, yet no progress
                    raise InvalidData("zlib inflate: no progress")
            result = PyBytes_FromStringAndSize(<char*>out, <Py_ssize_t>produced)
        finally:
            PyMem_Free(out)
            strm.next_in = NULL
            strm.next_out = NULL
        if fin:
            self._out_bytes = 0
            self._in_bytes = 0
            if self.no_context_takeover:
                inflateReset(strm)
        else:
            self._out_bytes += produced
        return result
