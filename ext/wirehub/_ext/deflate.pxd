# permessage-deflate codec (RFC 7692 §7.2) on zlib's z_stream.
# The API for Cython callers (fanout.pyx cimports Deflater to compress a
# publication once); Python callers see the same methods through the .pyx.

cdef extern from "zlib.h" nogil:
    ctypedef unsigned char Bytef
    ctypedef unsigned int uInt
    ctypedef unsigned long uLong
    ctypedef void* voidpf

    ctypedef struct z_stream:
        const Bytef* next_in
        uInt avail_in
        uLong total_in
        Bytef* next_out
        uInt avail_out
        uLong total_out
        const char* msg
        voidpf zalloc
        voidpf zfree
        voidpf opaque
        int data_type
        uLong adler
        uLong reserved
    ctypedef z_stream* z_streamp

    int Z_OK
    int Z_STREAM_END
    int Z_NEED_DICT
    int Z_STREAM_ERROR
    int Z_DATA_ERROR
    int Z_MEM_ERROR
    int Z_BUF_ERROR
    int Z_NO_FLUSH
    int Z_SYNC_FLUSH
    int Z_DEFLATED
    int Z_DEFAULT_STRATEGY

    const char* zlibVersion()
    # deflateInit2/inflateInit2 are macros over the *_ versions.
    int deflateInit2(z_streamp strm, int level, int method, int windowBits,
                     int memLevel, int strategy)
    int deflate(z_streamp strm, int flush)
    int deflateReset(z_streamp strm)
    int deflateEnd(z_streamp strm)
    uLong deflateBound(z_streamp strm, uLong sourceLen)
    int inflateInit2(z_streamp strm, int windowBits)
    int inflate(z_streamp strm, int flush)
    int inflateReset(z_streamp strm)
    int inflateEnd(z_streamp strm)


cdef class Deflater:
    cdef:
        z_stream _strm
        bint _ready               # _strm was initialised and must be ended
        readonly int level
        readonly int mem_level
        readonly int window_bits  # the window zlib really uses (8 runs as 9)
        readonly bint no_context_takeover

    cpdef bytes compress(self, payload)
    cdef bytes _compress(self, const unsigned char* data, size_t size)


cdef class Inflater:
    cdef:
        z_stream _strm
        bint _ready
        bint _broken              # an error left the stream unusable
        readonly int window_bits
        readonly bint no_context_takeover
        readonly Py_ssize_t max_message_bytes
        readonly Py_ssize_t max_ratio
        Py_ssize_t _out_bytes     # inflated so far in the current message
        Py_ssize_t _in_bytes      # compressed bytes fed in the current message

    cpdef bytes feed(self, fragment, bint fin)
    cdef bytes _inflate(self, const unsigned char* data, size_t size, bint fin)
    cdef Py_ssize_t _allowance(self)
    cdef object _too_big(self)
