"""Client-side hot path of the wirehub load generator.

picows calls ``on_ws_frame`` of a cdef ``WSListener`` subclass through its
vtable, so every received frame here is counted, parsed (offset, sequence,
publisher timestamp) and recorded in the latency histogram without a single
Python call. Python is only entered for rare frames (``welcome``,
``subscribed``, errors) through the ``control`` hook, and once per connection
when it is lost. Once set up, a connection's socket is read by a
``SocketReader`` instead of picows: one epoll set for all of them, frames
parsed in place, no Python call per read.

The protocol knowledge that is not per-frame (how a publish or ping frame
looks) stays in Python: ``tools/loadgen/payload.py`` builds a frame template
and tells the sender where the fixed-width fields sit, and this module only
rewrites those bytes. The pure-Python twin is ``tools/loadgen/_pure.py``; both
must keep the same API and the same histogram bucket layout.

Payload header (ASCII, so it fits text frames and JSON strings), 40 bytes::

    [publisher id: 8 hex][sequence: 16 hex][timestamp: 16 hex, CLOCK_MONOTONIC ns]
"""

from cpython.bytearray cimport PyByteArray_AS_STRING
from libc.errno cimport EAGAIN, EINTR, errno
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memchr, memcmp, memcpy, memmove, memset
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

from picows.picows cimport WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport


cdef extern from "<string.h>" nogil:
    # GNU extension; Python.h defines _GNU_SOURCE on Linux.
    void* memmem(const void* haystack, size_t hlen, const void* needle, size_t nlen)


cdef extern from *:
    int __builtin_clzll(unsigned long long) nogil


cdef extern from "<sys/epoll.h>" nogil:
    ctypedef union epoll_data_t:
        void* ptr
    struct epoll_event:
        uint32_t events
        epoll_data_t data
    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event* event)
    int epoll_wait(int epfd, epoll_event* events, int maxevents, int timeout)
    enum:
        EPOLL_CTL_ADD
        EPOLL_CTL_DEL
        EPOLLIN
        EPOLL_CLOEXEC


cdef extern from "<unistd.h>" nogil:
    ssize_t read(int fd, void* buf, size_t count)
    int close(int fd)


# Histogram layout: values below 2**SUB_BITS_PLUS_ONE are exact, above that
# each power of two is split into 128 buckets (< 0.8 % relative error), like
# HdrHistogram with 2 significant digits. Mirrored in tools/loadgen/histogram.py.
cdef enum:
    SUB_BITS = 7
    SUB_HALF = 128
    SUB_COUNT = 256
    MAX_SHIFT = 33             # largest value ~2**41 ns = 36 min
    N_BUCKETS = (MAX_SHIFT + 1) * SUB_HALF + SUB_COUNT
    HEADER_SIZE = 40
    HEADROOM = 14              # picows writes the frame header in front of the payload
    WINDOW_BITS = 64           # duplicate / late-arrival detection window

cdef enum Kind:
    RAW = 0                    # plain echo/broadcast server: payload is the message
    WIREHUB_JSON = 1
    WIREHUB_TLV = 2

KIND_RAW = RAW
KIND_WIREHUB_JSON = WIREHUB_JSON
KIND_WIREHUB_TLV = WIREHUB_TLV
HISTOGRAM_BUCKETS = N_BUCKETS
IMPLEMENTATION = "cython"

cdef const char* HEX_DIGITS = b"0123456789abcdef"
# The gateway's JSON ``message`` envelope, field by field (msgspec keeps the
# Struct's order: tag first).
cdef const char* MSG_PREFIX = b'{"type":"message","channel":"'
cdef const char* OFFSET_KEY = b'","offset":'
cdef const char* DATA_KEY = b',"data":"'
cdef enum:
    MSG_PREFIX_LEN = 29
    OFFSET_KEY_LEN = 11
    DATA_KEY_LEN = 9


cdef inline uint64_t now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <uint64_t>ts.tv_sec * 1000000000 + <uint64_t>ts.tv_nsec


cdef inline void put_hex(char* p, uint64_t v, int width) noexcept nogil:
    cdef int i
    for i in range(width - 1, -1, -1):
        p[i] = HEX_DIGITS[v & 15]
        v >>= 4


cdef uint8_t HEX_VALUE[256]           # digit value, or 0x10 for "not a hex digit"


cdef void _fill_hex_value() noexcept:
    cdef int i
    memset(HEX_VALUE, 0x10, sizeof(HEX_VALUE))
    for i in range(16):
        HEX_VALUE[<uint8_t>HEX_DIGITS[i]] = <uint8_t>i


_fill_hex_value()


cdef inline bint get_hex(const char* p, int width, uint64_t* out) noexcept nogil:
    # Table lookup without a branch per digit: this runs three times for every
    # received frame, several million times a second.
    cdef uint64_t v = 0
    cdef uint8_t d, bad = 0
    cdef int i
    for i in range(width):
        d = HEX_VALUE[<uint8_t>p[i]]
        bad |= d
        v = (v << 4) | (d & 15)
    out[0] = v
    return (bad & 0x10) == 0


cdef inline bint parse_header(const char* p, Py_ssize_t n, uint64_t* pub,
                              uint64_t* seq, uint64_t* ts) noexcept nogil:
    if n < HEADER_SIZE:
        return False
    return get_hex(p, 8, pub) and get_hex(p + 8, 16, seq) and get_hex(p + 24, 16, ts)


cdef inline const char* find(const char* p, Py_ssize_t n, bytes needle) noexcept:
    return <const char*>memmem(p, <size_t>n, <const char*>needle, <size_t>len(needle))


cdef inline const char* json_uint(const char* p, const char* end, uint64_t* out) noexcept nogil:
    """Parse the unsigned decimal that starts at p (after optional spaces).

    Returns where the number ends, or NULL when there is none.
    """
    cdef uint64_t v = 0
    while p < end and p[0] == c' ':
        p += 1
    if p >= end or not (c'0' <= p[0] <= c'9'):
        return NULL
    while p < end and c'0' <= p[0] <= c'9':
        v = v * 10 + <uint64_t>(p[0] - c'0')
        p += 1
    out[0] = v
    return p


cdef inline const char* json_message_fast(const char* p, Py_ssize_t n, uint64_t* offset) noexcept nogil:
    """Parse a ``message`` in the order the gateway encodes it; NULL if it is not.

    ``{"type":"message","channel":"<name>","offset":<n>,"data":"<header>...``:
    three fixed-prefix compares and one ``memchr`` instead of a ``memmem``
    per field (which cost the client half its CPU at 4 M deliveries/s).
    Returns where the ``data`` string's contents start.
    """
    cdef const char* end = p + n
    cdef const char* q
    if n < MSG_PREFIX_LEN or memcmp(p, MSG_PREFIX, MSG_PREFIX_LEN) != 0:
        return NULL
    q = <const char*>memchr(p + MSG_PREFIX_LEN, c'"', <size_t>(n - MSG_PREFIX_LEN))
    if q == NULL or end - q < OFFSET_KEY_LEN or memcmp(q, OFFSET_KEY, OFFSET_KEY_LEN) != 0:
        return NULL
    q = json_uint(q + OFFSET_KEY_LEN, end, offset)
    if q == NULL or end - q < DATA_KEY_LEN or memcmp(q, DATA_KEY, DATA_KEY_LEN) != 0:
        return NULL
    return q + DATA_KEY_LEN


cdef inline uint64_t load_be64(const uint8_t* p) noexcept nogil:
    cdef uint64_t v = 0
    cdef int i
    for i in range(8):
        v = (v << 8) | p[i]
    return v


cdef struct TLV:
    const char* type_ptr
    Py_ssize_t type_len
    const char* data_ptr
    Py_ssize_t data_len
    const char* id_ptr
    Py_ssize_t id_len
    uint64_t offset
    bint has_offset


cdef inline bint parse_tlv(const char* p, Py_ssize_t n, TLV* out) noexcept nogil:
    """Split a binary message into its records (docs/protocol.md, TLV)."""
    cdef Py_ssize_t pos = 0
    cdef uint8_t tag
    cdef Py_ssize_t length
    memset(out, 0, sizeof(TLV))
    while pos < n:
        if n - pos < 5:
            return False
        tag = <uint8_t>p[pos]
        length = <Py_ssize_t>(
            (<uint64_t><uint8_t>p[pos + 1] << 24) | (<uint64_t><uint8_t>p[pos + 2] << 16)
            | (<uint64_t><uint8_t>p[pos + 3] << 8) | <uint64_t><uint8_t>p[pos + 4])
        pos += 5
        if length > n - pos:
            return False
        if tag == 0x01:
            out.type_ptr = p + pos
            out.type_len = length
        elif tag == 0x03:
            out.data_ptr = p + pos
            out.data_len = length
        elif tag == 0x04:
            out.id_ptr = p + pos
            out.id_len = length
        elif tag == 0x05:
            if length != 8:
                return False
            out.offset = load_be64(<const uint8_t*>(p + pos))
            out.has_offset = True
        pos += length
    return out.type_ptr != NULL


cdef inline bint tlv_type_is(TLV* t, bytes name) noexcept:
    return t.type_len == len(name) and memcmp(t.type_ptr, <const char*>name, t.type_len) == 0


cdef class Recorder:
    """Process-wide counters and latency histogram shared by all listeners.

    The runner snapshots it for the progress line and the final report; the
    histogram counts are exported raw so that processes can be merged
    (``tools/loadgen/histogram.py``).
    """

    cdef uint64_t* _counts
    cdef readonly uint64_t hist_total
    cdef readonly uint64_t hist_min
    cdef readonly uint64_t hist_max
    cdef readonly double hist_sum
    # Traffic, summed over every connection of this process.
    cdef readonly uint64_t received        # data frames delivered to subscribers
    cdef readonly uint64_t received_bytes
    cdef readonly uint64_t other_received  # frames a sender got that are not its acks
    cdef readonly uint64_t sent
    cdef readonly uint64_t acked
    cdef readonly uint64_t malformed
    cdef readonly uint64_t error_replies
    cdef readonly uint64_t server_closes

    def __cinit__(self):
        self._counts = <uint64_t*>calloc(N_BUCKETS, sizeof(uint64_t))
        if self._counts == NULL:
            raise MemoryError()
        self.hist_min = <uint64_t>-1

    def __dealloc__(self):
        free(self._counts)

    cdef inline void record(self, uint64_t value) noexcept:
        cdef int shift
        cdef Py_ssize_t idx
        if value < SUB_COUNT:
            idx = <Py_ssize_t>value
        else:
            shift = 63 - __builtin_clzll(value) - SUB_BITS
            if shift > MAX_SHIFT:
                shift = MAX_SHIFT
                idx = N_BUCKETS - 1
            else:
                idx = shift * SUB_HALF + <Py_ssize_t>(value >> shift)
        self._counts[idx] += 1
        self.hist_total += 1
        self.hist_sum += <double>value
        if value < self.hist_min:
            self.hist_min = value
        if value > self.hist_max:
            self.hist_max = value

    cpdef record_ns(self, uint64_t value):
        """Record one latency sample in nanoseconds (used by tests and tools)."""
        self.record(value)

    cpdef bytes histogram_counts(self):
        """Return the bucket counts as native-endian uint64 (array('Q'))."""
        return (<char*>self._counts)[:N_BUCKETS * sizeof(uint64_t)]

    cpdef reset_histogram(self):
        """Forget latency samples (end of warm-up); counters are kept."""
        memset(self._counts, 0, N_BUCKETS * sizeof(uint64_t))
        self.hist_total = 0
        self.hist_sum = 0
        self.hist_min = <uint64_t>-1
        self.hist_max = 0


cdef class _Conn(WSListener):
    """Common listener state: transport, close handling, Python hooks.

    ``control(listener, msg_type, payload)`` gets every frame the hot path
    does not recognise; ``lost(listener)`` is called once on disconnect.
    """

    cdef readonly WSTransport transport
    cdef readonly Recorder recorder
    cdef readonly int kind
    cdef readonly int close_code           # -1 until the server sends CLOSE
    cdef readonly bint disconnected
    cdef public object control
    cdef public object lost
    cdef uint64_t _now                     # cached per read batch
    cdef bint _now_valid

    def __init__(self, int kind, Recorder recorder):
        self.kind = kind
        self.recorder = recorder
        self.close_code = -1

    cpdef on_ws_connected(self, WSTransport transport):
        self.transport = transport

    cpdef on_ws_disconnected(self, WSTransport transport):
        self.disconnected = True
        if self.lost is not None:
            self.lost(self)

    cpdef on_ws_frame(self, WSTransport transport, WSFrame frame):
        cdef WSMsgType t = frame.msg_type
        if t == WSMsgType.TEXT or t == WSMsgType.BINARY:
            if frame.fin:
                self._on_data(t, frame.payload_ptr, frame.payload_size)
            else:
                self.recorder.malformed += 1   # fragmented messages are not used by any peer
        elif t == WSMsgType.CLOSE:
            self._on_close(frame.get_close_code())
        elif t == WSMsgType.CONTINUATION:
            self.recorder.malformed += 1
        # The clock is read once per batch of frames that arrived together:
        # they were all received at the same instant (one read() call).
        if frame.last_in_buffer:
            self._now_valid = False

    cdef inline uint64_t now(self) noexcept:
        if not self._now_valid:
            self._now = now_ns()
            self._now_valid = True
        return self._now

    cdef void _on_data(self, WSMsgType msg_type, const char* p, Py_ssize_t n) except *:
        pass

    cdef void _on_close(self, int code) except *:
        """The server sent CLOSE: answer it and let the connection go."""
        self.close_code = code
        self.recorder.server_closes += 1
        self.transport.send_close(<WSCloseCode>code)
        self.transport.disconnect()

    cdef inline void _control(self, WSMsgType msg_type, const char* p, Py_ssize_t n) except *:
        if self.control is not None:
            self.control(self, msg_type, p[:n])


cdef class Subscriber(_Conn):
    """Count deliveries and check their order per stream.

    A stream is one channel for wirehub (sequence = server ``offset``) and one
    publisher for a raw broadcast server (sequence = publisher ``seq``); both
    start at 1. ``missing`` counts skipped sequence numbers (a late arrival
    inside the 64-message window gives one back), ``duplicates`` repeats,
    ``out_of_order`` arrivals below the highest sequence seen.
    """

    cdef readonly uint64_t received
    cdef readonly int64_t missing
    cdef readonly uint64_t duplicates
    cdef readonly uint64_t out_of_order
    cdef readonly Py_ssize_t streams
    cdef uint64_t* _next                   # per stream: highest sequence seen + 1
    cdef uint64_t* _seen                   # per stream: bit i = (highest - i) was seen

    def __init__(self, int kind, Recorder recorder, Py_ssize_t streams=1):
        _Conn.__init__(self, kind, recorder)
        if streams < 1:
            raise ValueError("streams must be >= 1")
        self.streams = streams
        self._next = <uint64_t*>calloc(streams, sizeof(uint64_t))
        self._seen = <uint64_t*>calloc(streams, sizeof(uint64_t))
        if self._next == NULL or self._seen == NULL:
            raise MemoryError()
        for i in range(streams):
            self._next[i] = 1

    def __dealloc__(self):
        free(self._next)
        free(self._seen)

    cpdef uint64_t highest(self, Py_ssize_t stream):
        """Highest sequence number received on ``stream`` (0 if none)."""
        return self._next[stream] - 1

    cpdef finish(self, list expected):
        """Add what never arrived: ``expected[s]`` messages were sent on stream s."""
        cdef Py_ssize_t s
        cdef uint64_t e
        for s in range(self.streams):
            e = expected[s]
            if e > self._next[s] - 1:
                self.missing += <int64_t>(e - (self._next[s] - 1))
                self._next[s] = e + 1

    cdef inline void _track(self, uint64_t stream, uint64_t seq) noexcept:
        cdef uint64_t nxt = self._next[stream]
        cdef uint64_t gap, behind
        if seq == nxt:
            self._seen[stream] = (self._seen[stream] << 1) | 1
            self._next[stream] = seq + 1
        elif seq > nxt:
            gap = seq - nxt
            self.missing += <int64_t>gap
            self._seen[stream] = ((self._seen[stream] << (gap + 1)) if gap < WINDOW_BITS - 1 else 0) | 1
            self._next[stream] = seq + 1
        else:
            behind = nxt - 1 - seq
            if behind < WINDOW_BITS and (self._seen[stream] >> behind) & 1:
                self.duplicates += 1
            else:
                self.out_of_order += 1
                if behind < WINDOW_BITS:
                    self._seen[stream] |= (<uint64_t>1) << behind
                    self.missing -= 1

    cdef void _on_data(self, WSMsgType msg_type, const char* p, Py_ssize_t n) except *:
        cdef const char* hdr = NULL
        cdef const char* q
        cdef Py_ssize_t hdr_len = 0
        cdef uint64_t stream = 0, seq = 0, pub, pseq, ts, now
        cdef TLV tlv

        if self.kind == RAW:
            hdr = p
            hdr_len = n
        elif self.kind == WIREHUB_JSON:
            if msg_type != WSMsgType.TEXT:
                self._control(msg_type, p, n)
                return
            hdr = json_message_fast(p, n, &seq)
            if hdr == NULL:
                # Not the gateway's own field order: search for each field.
                if find(p, n, b'"type":"message"') == NULL:
                    self._control(msg_type, p, n)
                    return
                q = find(p, n, b'"offset":')
                if q == NULL or json_uint(q + 9, p + n, &seq) == NULL:
                    self.recorder.malformed += 1
                    return
                q = find(p, n, b'"data":"')
                if q == NULL:
                    self.recorder.malformed += 1
                    return
                hdr = q + 8
            hdr_len = n - (hdr - p)
        else:
            if msg_type != WSMsgType.BINARY:
                self._control(msg_type, p, n)
                return
            if not parse_tlv(p, n, &tlv):
                self.recorder.malformed += 1
                return
            if not tlv_type_is(&tlv, b"message"):
                self._control(msg_type, p, n)
                return
            if not tlv.has_offset or tlv.data_ptr == NULL:
                self.recorder.malformed += 1
                return
            seq = tlv.offset
            hdr = tlv.data_ptr
            hdr_len = tlv.data_len

        if not parse_header(hdr, hdr_len, &pub, &pseq, &ts):
            self.recorder.malformed += 1
            return
        if self.kind == RAW:
            if pub >= <uint64_t>self.streams:
                self.recorder.malformed += 1
                return
            stream = pub
            seq = pseq
        self.received += 1
        self.recorder.received += 1
        self.recorder.received_bytes += <uint64_t>n
        self._track(stream, seq)
        now = self.now()
        self.recorder.record(now - ts if now > ts else 0)


cdef class Sender(_Conn):
    """Send numbered messages from a template and count their acknowledgements.

    Python builds ``template`` (a whole publish/ping/raw frame payload) and
    gives the offsets of the fixed-width fields this class rewrites per
    message: the 40-byte header, an optional 16-hex ``id`` and an optional
    6-digit channel suffix that rotates over ``channel_count`` channels
    (``channel_first + i * channel_step``).

    An ack is: the sender's own header coming back (raw echo or broadcast),
    a ``pong`` (wirehub echo) or a ``published`` reply (wirehub publish).
    ``record_latency`` makes acks record the round trip in the histogram.

    Two pacings:

    * window (``rate == 0``): keep ``window`` messages unacknowledged, send
      the next one as each ack arrives; the timestamp is the real send time.
    * fixed rate: ``tick()`` sends every message whose intended time has
      come. The timestamp is the *intended* send time, so a stalled client or
      server shows up as latency instead of silently lowering the rate
      (no coordinated omission).
    """

    cdef readonly uint64_t pub_id
    cdef readonly uint64_t sent
    cdef readonly uint64_t acked
    cdef readonly uint64_t in_flight
    cdef readonly uint64_t window
    cdef readonly double rate
    cdef readonly bint running
    cdef readonly bint record_latency
    cdef bytes _template
    cdef bytearray _buf                    # HEADROOM + template, masked in place by picows
    cdef WSMsgType _msg_type
    cdef Py_ssize_t _hdr_off, _id_off, _chan_off
    cdef uint64_t _chan_first, _chan_step, _chan_count
    cdef bytes _ack_json                   # b'"type":"published"' / b'"type":"pong"'
    cdef bytes _ack_tlv                    # b'published' / b'pong'
    cdef uint64_t _start_ns
    cdef double _interval_ns

    def __init__(self, int kind, Recorder recorder, *, uint64_t pub_id, bytes template,
                 bint binary, Py_ssize_t header_offset, Py_ssize_t id_offset=-1,
                 Py_ssize_t channel_offset=-1, uint64_t channel_first=0,
                 uint64_t channel_step=1, uint64_t channel_count=1, bytes ack_type=b"",
                 bint record_latency=False, uint64_t window=1, double rate=0.0):
        _Conn.__init__(self, kind, recorder)
        if header_offset < 0 or header_offset + HEADER_SIZE > len(template):
            raise ValueError("header does not fit in the template")
        if window < 1 and rate <= 0:
            raise ValueError("window must be >= 1")
        self.pub_id = pub_id
        self._template = template
        self._buf = bytearray(HEADROOM + len(template))
        self._msg_type = WSMsgType.BINARY if binary else WSMsgType.TEXT
        self._hdr_off = header_offset
        self._id_off = id_offset
        self._chan_off = channel_offset
        self._chan_first = channel_first
        self._chan_step = channel_step
        self._chan_count = channel_count
        self._ack_json = b'"type":"' + ack_type + b'"'
        self._ack_tlv = ack_type
        self.record_latency = record_latency
        self.window = window
        self.rate = rate
        self._interval_ns = 1e9 / rate if rate > 0 else 0.0

    cpdef start(self, uint64_t start_ns):
        """Begin sending; ``start_ns`` is the schedule origin (CLOCK_MONOTONIC)."""
        self.running = True
        self._start_ns = start_ns
        if self.rate <= 0:
            self._fill()
        else:
            self.tick()

    cpdef stop(self):
        """Send nothing more; acks still count."""
        self.running = False

    cpdef uint64_t tick(self):
        """Send what the fixed-rate schedule owes; returns how many were sent."""
        cdef uint64_t now, due, before = self.sent
        if not self.running or self.rate <= 0 or self.transport is None or self.disconnected:
            return 0
        now = now_ns()
        if now < self._start_ns:
            return 0
        due = <uint64_t>((now - self._start_ns) / self._interval_ns) + 1
        while self.sent < due:
            self._send_one(self._start_ns + <uint64_t>(self.sent * self._interval_ns))
        return self.sent - before

    cpdef list channel_counts(self):
        """How many messages went to each of this sender's channels, in order."""
        cdef uint64_t k = self._chan_count if self._chan_count > 0 else 1
        return [self.sent // k + (1 if i < self.sent % k else 0) for i in range(k)]

    cdef inline void _fill(self) except *:
        if self.transport is None:
            return
        while self.running and self.in_flight < self.window and not self.disconnected:
            self._send_one(now_ns())

    cdef void _send_one(self, uint64_t ts) except *:
        # picows masks the client payload in place and writes the frame header
        # into the HEADROOM bytes before it, so the template is copied afresh
        # for every message (a memcpy of at most a few KiB).
        cdef Py_ssize_t size = len(self._template)
        cdef char* buf = PyByteArray_AS_STRING(self._buf) + HEADROOM
        cdef char* h = buf + self._hdr_off
        memcpy(buf, <const char*>self._template, size)
        cdef uint64_t seq = self.sent + 1
        cdef uint64_t chan
        cdef int i
        put_hex(h, self.pub_id, 8)
        put_hex(h + 8, seq, 16)
        put_hex(h + 24, ts, 16)
        if self._id_off >= 0:
            put_hex(buf + self._id_off, seq, 16)
        if self._chan_off >= 0 and self._chan_count > 1:
            chan = self._chan_first + ((seq - 1) % self._chan_count) * self._chan_step
            for i in range(5, -1, -1):
                buf[self._chan_off + i] = <char>(c'0' + chan % 10)
                chan //= 10
        self.transport.send_reuse_external_buffer(self._msg_type, buf, size)
        self.sent += 1
        self.in_flight += 1
        self.recorder.sent += 1

    cdef void _on_data(self, WSMsgType msg_type, const char* p, Py_ssize_t n) except *:
        cdef const char* hdr = NULL
        cdef const char* q
        cdef Py_ssize_t hdr_len = 0
        cdef uint64_t pub, seq, ts, now
        cdef TLV tlv

        if self.kind == RAW:
            hdr = p
            hdr_len = n
        elif self.kind == WIREHUB_JSON:
            if msg_type != WSMsgType.TEXT:
                self.recorder.malformed += 1
                return
            if find(p, n, self._ack_json) == NULL:
                if find(p, n, b'"type":"error"') != NULL:
                    self.recorder.error_replies += 1
                    if find(p, n, b'"id":') != NULL:
                        self._ack()
                elif find(p, n, b'"type":"message"') != NULL:
                    self.recorder.other_received += 1
                self._control(msg_type, p, n)
                return
            if self.record_latency:
                q = find(p, n, b'"id":"')
                if q == NULL:
                    self.recorder.malformed += 1
                    return
                hdr = q + 6
                hdr_len = n - (hdr - p)
        else:
            if msg_type != WSMsgType.BINARY:
                self._control(msg_type, p, n)
                return
            if not parse_tlv(p, n, &tlv):
                self.recorder.malformed += 1
                return
            if not tlv_type_is(&tlv, self._ack_tlv):
                if tlv_type_is(&tlv, b"error"):
                    self.recorder.error_replies += 1
                    if tlv.id_ptr != NULL:
                        self._ack()
                elif tlv_type_is(&tlv, b"message"):
                    self.recorder.other_received += 1
                self._control(msg_type, p, n)
                return
            hdr = tlv.id_ptr
            hdr_len = tlv.id_len

        if hdr != NULL and (self.record_latency or self.kind == RAW):
            if not parse_header(hdr, hdr_len, &pub, &seq, &ts):
                self.recorder.malformed += 1
                return
            if self.kind == RAW and pub != self.pub_id:
                # A broadcast server also delivers the other publishers' messages.
                self.recorder.other_received += 1
                return
            if self.record_latency:
                now = self.now()
                self.recorder.record(now - ts if now > ts else 0)
        self._ack()

    cdef inline void _ack(self) except *:
        self.acked += 1
        self.recorder.acked += 1
        if self.in_flight > 0:
            self.in_flight -= 1
        if self.rate <= 0 and self.running:
            self._fill()


cdef enum:
    READ_CHUNK = 256 * 1024    # at most this much per read() of a ready socket
    MAX_EVENTS = 256           # ready sockets taken per epoll_wait()
    MAX_HEADER = 14            # a server frame's header: 2 + 8 bytes of length (no mask)


cdef class _Socket:
    """One adopted socket: its listener and the start of a frame not yet whole."""

    cdef int fd
    cdef _Conn listener
    cdef char* pending
    cdef Py_ssize_t pending_size
    cdef Py_ssize_t pending_capacity
    cdef Py_ssize_t partial_size           # bytes the unfinished frame needs (MAX_HEADER: not known yet)

    def __dealloc__(self):
        free(self.pending)


cdef class SocketReader:
    """Read the loadgen's sockets from one epoll set, frames parsed in place.

    Through picows every read costs uvloop's ``get_buffer``/``buffer_updated``
    calls, and every frame a ``WSFrame`` object and a callback; a subscriber
    receives many small frames per read, so at 1,000 subscribers that was
    half the client's user time (``perf``) and the client, not the server,
    set the fan-out rate. The worker hands each connection's socket here
    once it is set up and nothing is in flight to it, and pauses reading on
    the picows transport; the event loop watches
    this reader's epoll fd, and ``on_ready`` reads each ready socket once and
    feeds whole frames to the listener's hot path. Writes (PONG, CLOSE) still
    go through the listener's picows transport.

    A server frame the protocol forbids (masked, RSV bits, unknown opcode,
    fragmented control frame) is counted as malformed and answered with
    CLOSE 1002; a frame above ``max_frame`` bytes with CLOSE 1009.
    """

    cdef int _epfd
    cdef dict _sockets                     # fd -> _Socket
    cdef char* _buf
    cdef readonly Py_ssize_t max_frame
    cdef epoll_event _events[MAX_EVENTS]

    def __cinit__(self, Py_ssize_t max_frame=16 * 1024 * 1024):
        self._epfd = -1
        if max_frame < 125:
            raise ValueError("max_frame must be >= 125")
        self.max_frame = max_frame
        self._sockets = {}
        self._buf = <char*>malloc(READ_CHUNK)
        if self._buf == NULL:
            raise MemoryError()
        self._epfd = epoll_create1(EPOLL_CLOEXEC)
        if self._epfd < 0:
            raise OSError(errno, "epoll_create1 failed")

    def __dealloc__(self):
        if self._epfd >= 0:
            close(self._epfd)
        free(self._buf)

    @property
    def connections(self) -> int:
        """Sockets being read."""
        return len(self._sockets)

    def fileno(self) -> int:
        """The epoll fd, for ``loop.add_reader(reader.fileno(), reader.on_ready)``."""
        return self._epfd

    def adopt(self, _Conn listener, int fd):
        """Read ``fd`` (non-blocking) into ``listener``.

        The fd stays the listener's transport's: a ``dup`` would double the
        loadgen's file descriptors (10,000 subscribers hit a 20,000 limit).
        So the reader lets go of a socket before the transport closes it:
        every close it starts itself, and ``close()`` before the worker
        closes the rest. A socket picows closes on its own (a failed write)
        leaves the epoll set with its fd, before the number can be reused.
        """
        cdef _Socket sock = _Socket()
        cdef epoll_event ev
        sock.fd = fd
        sock.listener = listener
        ev.events = EPOLLIN
        ev.data.ptr = <void*>sock
        if epoll_ctl(self._epfd, EPOLL_CTL_ADD, fd, &ev) < 0:
            raise OSError(errno, "epoll_ctl failed")
        self._sockets[fd] = sock

    def close(self):
        """Stop reading every socket (their transports stay open)."""
        for sock in list(self._sockets.values()):
            self._drop(sock)

    def on_ready(self):
        """Read each socket that has data (called by the event loop)."""
        cdef int n = epoll_wait(self._epfd, self._events, MAX_EVENTS, 0)
        cdef int i
        cdef _Socket sock
        # References first: a listener's callback may close sockets of this batch.
        cdef list ready = [<_Socket>self._events[i].data.ptr for i in range(n)]
        for sock in ready:
            if sock.fd >= 0:
                try:
                    self._read(sock)
                except BaseException:
                    # The rest of the read is lost: end the connection so that
                    # it shows as lost, not as messages that never came (as
                    # picows's disconnect_on_exception does).
                    if sock.fd >= 0:
                        self._drop(sock)
                        sock.listener.transport.disconnect()
                    raise

    cdef void _read(self, _Socket sock) except *:
        cdef ssize_t got
        cdef Py_ssize_t used
        if sock.pending_size == 0:
            got = read(sock.fd, self._buf, READ_CHUNK)
            if got > 0:
                used = self._frames(sock, self._buf, got)
                if used >= 0 and used < got:
                    self._keep(sock, self._buf + used, got - used)
                return
        else:
            # The rest of a frame goes straight after its start: no copy of
            # what already arrived, however large the frame.
            got = read(sock.fd, sock.pending + sock.pending_size,
                       <size_t>(sock.pending_capacity - sock.pending_size))
            if got > 0:
                sock.pending_size += got
                used = self._frames(sock, sock.pending, sock.pending_size)
                if used > 0:
                    memmove(sock.pending, sock.pending + used, sock.pending_size - used)
                    sock.pending_size -= used
                if used < 0:
                    return
                if sock.pending_size == 0:
                    free(sock.pending)
                    sock.pending = NULL
                    sock.pending_capacity = 0
                elif sock.partial_size > sock.pending_capacity:
                    self._grow(sock, sock.partial_size)
                return
        if got < 0 and (errno == EAGAIN or errno == EINTR):
            return
        # End of stream or a socket error: the connection is gone.
        self._drop(sock)
        sock.listener.transport.disconnect()

    cdef Py_ssize_t _frames(self, _Socket sock, const char* data, Py_ssize_t size) except -2:
        """Hand over every whole frame; return the bytes used, -1 if the socket was dropped.

        ``sock.partial_size`` is left at the size of the frame that did not
        arrive whole (``MAX_HEADER`` while its header is not complete).
        """
        cdef const uint8_t* p
        cdef Py_ssize_t pos = 0, header, length
        cdef uint8_t opcode
        cdef _Conn listener = sock.listener
        listener._now_valid = False            # one read, one arrival time
        sock.partial_size = MAX_HEADER
        while size - pos >= 2:
            p = <const uint8_t*>(data + pos)
            opcode = p[0] & 0x0f
            if p[0] & 0x70 or p[1] & 0x80:
                return self._fail(sock, 1002)  # RSV bits, or a masked server frame
            length = p[1] & 0x7f
            header = 2
            if length == 126:
                if size - pos < 4:
                    break
                length = (<Py_ssize_t>p[2] << 8) | p[3]
                header = 4
            elif length == 127:
                if size - pos < 10:
                    break
                if p[2] & 0x80:
                    return self._fail(sock, 1002)  # §5.2: the top bit must be 0, so it fits
                length = <Py_ssize_t>load_be64(p + 2)
                header = 10
            if length > self.max_frame:
                return self._fail(sock, 1009)
            if size - pos < header + length:
                sock.partial_size = header + length
                break
            if opcode == 0x1 or opcode == 0x2:
                if p[0] & 0x80:
                    listener._on_data(<WSMsgType>opcode, <const char*>p + header, length)
                else:
                    listener.recorder.malformed += 1   # fragmented: not used by any peer
            elif opcode == 0x0:
                listener.recorder.malformed += 1
            elif opcode >= 0x8 and opcode <= 0xa and p[0] & 0x80 and length <= 125:
                if opcode == 0x8:
                    self._drop(sock)
                    listener._on_close(
                        ((<int>p[header] << 8) | p[header + 1]) if length >= 2 else 1005)
                    return -1
                if opcode == 0x9:
                    listener.transport.send(WSMsgType.PONG, (<const char*>p + header)[:length])
            else:
                return self._fail(sock, 1002)  # unknown opcode, or a bad control frame
            pos += header + length
            if sock.fd < 0:                    # a callback closed this reader
                return -1
        return pos

    cdef Py_ssize_t _fail(self, _Socket sock, int code) except -2:
        sock.listener.recorder.malformed += 1
        self._drop(sock)
        sock.listener.transport.send_close(<WSCloseCode>code)
        sock.listener.transport.disconnect()
        return -1

    cdef void _keep(self, _Socket sock, const char* data, Py_ssize_t size) except *:
        """Keep the start of a frame whose end has not arrived, with room for all of it."""
        self._grow(sock, size if size > sock.partial_size else sock.partial_size)
        memcpy(sock.pending, data, size)
        sock.pending_size = size

    cdef void _grow(self, _Socket sock, Py_ssize_t capacity) except *:
        cdef char* bigger = <char*>realloc(sock.pending, capacity)
        if bigger == NULL:
            raise MemoryError()
        sock.pending = bigger
        sock.pending_capacity = capacity

    cdef void _drop(self, _Socket sock) except *:
        if sock.fd < 0:
            return
        epoll_ctl(self._epfd, EPOLL_CTL_DEL, sock.fd, NULL)
        del self._sockets[sock.fd]
        sock.fd = -1
