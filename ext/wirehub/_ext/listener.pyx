# cython: freethreading_compatible = True
"""The receive path: picows frames in, whole validated messages out.

``FrameListener`` owns everything RFC 6455 leaves to the application on top
of picows (which parses frames, unmasks and checks opcodes/lengths): PONGs,
fragment reassembly with limits, UTF-8 validation of text, reserved bits, the
closing handshake, and the per-connection token buckets. What a
message *means* is decided upstairs, by the ``sink`` it calls
(``wirehub.connection.Connection``). Reference twin:
``wirehub._pure.listener``.
"""

from cpython.mem cimport PyMem_Free
from picows.picows cimport MemoryBuffer, WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

from wirehub._ext.bucket cimport TokenBucket
from wirehub._ext.fanout cimport Flusher, OutBatch
from wirehub._ext.deflate import InvalidData, MessageTooBig
from wirehub._ext.frame cimport Utf8Validator

cdef inline double _monotonic() noexcept:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef inline bint _is_valid_close_code(int code) noexcept:
    # RFC 6455 §7.4.1/§7.4.2 and the IANA registry: codes a peer may send.
    return (1000 <= code <= 1003 or 1007 <= code <= 1014) or 3000 <= code <= 4999


cdef inline void _drop_handshake_state(WSTransport transport) noexcept:
    # picows keeps, for the connection's lifetime, the upgrade request and the
    # 101 response on the transport (~1 KiB with their header dicts) and a 1 KiB
    # write buffer that only its own send path uses. A server never reads the
    # first two again (the sink keeps what the application may ask for), and
    # wirehub sends everything but CLOSE through the OutBatch. picows (pinned
    # to 2.3.1) resizes that buffer before every use and only points into it
    # while a send is in progress (a frame of at most 8 KiB is copied out or
    # sent before ``_send`` returns; our control frames are at most 125
    # bytes), so an empty buffer is regrown when needed.
    cdef MemoryBuffer buf = transport._write_buffer
    transport.request = None
    transport.response = None
    if buf is not None and buf.data != NULL:
        PyMem_Free(buf.data)
        buf.data = NULL
        buf.capacity = 0
        buf.size = 0


cdef class FrameListener(WSListener):
    """Reassemble, validate and rate-limit messages; send through an ``OutBatch``.

    Args:
        flusher: the loop-wide ``Flusher`` shared by all connections.
        limits: any object with the attributes ``max_payload_bytes``,
            ``max_fragments``, ``high_water_bytes``, ``rate_limit_messages_per_s``,
            ``rate_limit_burst_messages``, ``rate_limit_bytes_per_s``,
            ``rate_limit_burst_bytes``, ``rate_limit_violations_per_s``,
            ``rate_limit_burst_violations`` and ``close_timeout_s``
            (``wirehub.config.Config`` is one).
        sink: the object told what happens, through ``on_open()``,
            ``on_text(payload)``, ``on_binary(payload)``, ``on_refused(binary, payload)``
            (a message the rate limit dropped), ``on_slow_consumer()``,
            ``on_closing(code)`` (we are sending CLOSE) and ``on_close()``.
            Payloads are ``bytes`` the sink may keep.
        inflater_factory: when permessage-deflate was negotiated, a callable
            returning this connection's ``deflate.Inflater``; called on the
            first compressed message, so idle connections hold no zlib state.
    """

    def __init__(self, Flusher flusher, limits, sink, inflater_factory=None):
        self._flusher = flusher
        self._sink = sink
        self._inflater_factory = inflater_factory
        # The UTF-8 validator and the reassembly buffer are created on first
        # use: an idle connection holds neither.
        self.max_message_bytes = limits.max_payload_bytes
        self._max_fragments = limits.max_fragments
        self._high_water_bytes = limits.high_water_bytes
        self._close_timeout_s = limits.close_timeout_s
        now = _monotonic()
        self._messages = TokenBucket(limits.rate_limit_messages_per_s,
                                     limits.rate_limit_burst_messages, now)
        self._bytes = TokenBucket(limits.rate_limit_bytes_per_s,
                                  limits.rate_limit_burst_bytes, now)
        self._violations = TokenBucket(limits.rate_limit_violations_per_s,
                                       limits.rate_limit_burst_violations, now)

    # -- picows callbacks ---------------------------------------------------

    cpdef on_ws_connected(self, WSTransport transport):
        self.transport = transport
        _drop_handshake_state(transport)
        self._frame_at = _monotonic()
        self._seen = True
        self.batch = OutBatch(self._flusher, transport.underlying_transport,
                              self._high_water_bytes, self._on_overflow)
        self._sink.on_open()

    cpdef on_ws_disconnected(self, WSTransport transport):
        if self.batch is not None:
            self.batch.close()
        self._sink.on_close()

    cpdef pause_writing(self):
        self.batch.pause()

    cpdef resume_writing(self):
        self.batch.resume()

    cpdef on_ws_frame(self, WSTransport transport, WSFrame frame):
        cdef WSMsgType opcode = frame.msg_type
        self._frame_at = _monotonic()
        self._seen = True
        if self._close_received:
            return  # RFC 6455 §5.5.1: no data is processed after a CLOSE.
        if self.transport.is_close_frame_sent and opcode != WSMsgType.CLOSE:
            # We (or picows's parser, on a protocol error) already sent CLOSE:
            # only the peer's CLOSE still matters, and nothing may follow ours.
            self.batch.close()
            return
        if frame.rsv2 or frame.rsv3 or (frame.rsv1 and opcode >= 8):
            # §5.2; permessage-deflate only ever sets RSV1, and never on control frames.
            self.close(WSCloseCode.PROTOCOL_ERROR, "reserved bits set without a negotiated extension")
            return
        if opcode == WSMsgType.CLOSE:
            self._on_close_frame(frame)
            return
        if opcode == WSMsgType.PING:
            # Answered here rather than by picows's auto-pong, which wrote
            # straight to the transport: through the batch, a peer that pings
            # without reading meets high_water_bytes like any slow consumer.
            self.batch.push_frame(WSMsgType.PONG, frame.get_payload_as_bytes())
            return
        if opcode == WSMsgType.PONG:
            return  # unsolicited or an answer to our heartbeat: nothing to say (§5.5.3)
        if opcode == WSMsgType.CONTINUATION:
            if self._fragmented_opcode == 0:
                self.close(WSCloseCode.PROTOCOL_ERROR, "continuation frame without a message to continue")
                return
            if frame.rsv1:
                self.close(WSCloseCode.PROTOCOL_ERROR, "RSV1 set on a continuation frame")  # RFC 7692 §6.1
                return
            self._add_fragment(frame)
            return
        # TEXT or BINARY (picows already refused reserved opcodes).
        if self._fragmented_opcode != 0:
            self.close(WSCloseCode.PROTOCOL_ERROR, "new message started before the fragmented one finished")
            return
        if frame.rsv1 and self._inflater_factory is None:
            self.close(WSCloseCode.PROTOCOL_ERROR, "reserved bits set without a negotiated extension")
            return
        self._compressed = frame.rsv1
        if frame.fin and not self._compressed:
            # The common case: one uncompressed frame, validated in place.
            if opcode == WSMsgType.TEXT:
                if self._utf8 is None:
                    self._utf8 = Utf8Validator()
                if not self._utf8.feed_ptr(<const unsigned char*>frame.payload_ptr, frame.payload_size) \
                        or not self._utf8.finish():
                    self._utf8.reset()
                    self.close(WSCloseCode.INVALID_TEXT, "text message is not valid UTF-8")
                    return
            self._deliver(opcode, frame.get_payload_as_bytes())
            return
        self._fragmented_opcode = opcode
        self._fragment_count = 0
        if self._utf8 is None:
            self._utf8 = Utf8Validator()
        self._add_fragment(frame)

    # -- message assembly ---------------------------------------------------

    cdef _add_fragment(self, WSFrame frame):
        cdef object chunk
        self._fragment_count += 1
        if self._fragment_count > self._max_fragments:
            self.close(WSCloseCode.POLICY_VIOLATION, "message has too many fragments")
            return
        if self._compressed:
            # RFC 7692 §7.2.2; the inflater stops at max_payload_bytes (and at
            # its ratio limit) without ever allocating past it.
            if self._inflater is None:
                self._inflater = self._inflater_factory()
            try:
                chunk = self._inflater.feed(frame.get_payload_as_memoryview(), frame.fin)
            except MessageTooBig:
                self.close(WSCloseCode.MESSAGE_TOO_BIG, "message inflates past max_payload_bytes")
                return
            except InvalidData:
                self.close(WSCloseCode.INVALID_TEXT, "invalid compressed data")
                return
        else:
            if ((len(self._fragments) if self._fragments is not None else 0)
                    + frame.payload_size > self.max_message_bytes):
                self.close(WSCloseCode.MESSAGE_TOO_BIG, "message exceeds max_payload_bytes")
                return
            chunk = frame.get_payload_as_memoryview()
        # Validate text as it arrives so a bad message fails fast (§8.1).
        if self._fragmented_opcode == WSMsgType.TEXT and not self._utf8.feed(chunk):
            self.close(WSCloseCode.INVALID_TEXT, "text message is not valid UTF-8")
            return
        if frame.fin and (self._fragments is None or not self._fragments) and type(chunk) is bytes:
            payload = chunk  # a single compressed frame: the inflated bytes are the message
        else:
            if self._fragments is None:
                self._fragments = bytearray()
            self._fragments += chunk
            if not frame.fin:
                return
            payload = bytes(self._fragments)
            # Give back the reassembly buffer instead of keeping its peak size.
            self._fragments = None
        cdef int opcode = self._fragmented_opcode
        self._fragmented_opcode = 0
        if opcode == WSMsgType.TEXT and not self._utf8.finish():
            self.close(WSCloseCode.INVALID_TEXT, "text message is not valid UTF-8")
            return
        self._deliver(opcode, payload)

    cdef _deliver(self, int opcode, bytes payload):
        cdef double now = self._frame_at
        if not (self._messages.consume(1.0, now) and self._bytes.consume(len(payload), now)):
            if not self._violations.consume(1.0, now):
                self.close(WSCloseCode.POLICY_VIOLATION, "rate limit exceeded")
                return
            self._sink.on_refused(opcode == WSMsgType.BINARY, payload)
            return
        if opcode == WSMsgType.TEXT:
            self._sink.on_text(payload)
        else:
            self._sink.on_binary(payload)

    # -- closing ------------------------------------------------------------

    cdef _on_close_frame(self, WSFrame frame):
        cdef int code = WSCloseCode.OK
        self._close_received = True
        if frame.payload_size >= 2:
            code = frame.get_close_code()
            if not _is_valid_close_code(code):
                # picows lets 0, 1005 and 1006 through; §7.4.1 forbids them on the wire.
                self.close(WSCloseCode.PROTOCOL_ERROR, "invalid close code")
                self.transport.disconnect()  # the peer has already closed its side
                return
        if not self.transport.is_close_frame_sent:
            # Echo the peer's code (§5.5.1); an empty CLOSE is answered with 1000.
            self.batch.flush()
            self.transport.send_close(<WSCloseCode>code)
        self.batch.close()
        # The server closes TCP first (§7.1.1).
        self.transport.disconnect()

    cpdef close(self, int code, str reason):
        """Send CLOSE with ``code``/``reason`` and drop the TCP connection soon after.

        Frames already queued are flushed first; nothing is sent after the
        CLOSE. The connection is aborted if the peer does not answer within
        ``close_timeout_s``.
        """
        if self.transport.is_close_frame_sent or self.transport.is_disconnected:
            return
        self._sink.on_closing(code)
        self.batch.flush()
        self.batch.close()
        self.transport.send_close(<WSCloseCode>code, reason.encode())
        self._flusher.loop.call_later(self._close_timeout_s, self._abort)

    cpdef int heartbeat(self, double now, double interval_s, double timeout_s):
        """Ping an idle peer; close one that did not answer in time (1001).

        Called for every connection by one gateway-wide timer, instead of one
        picows auto-ping task per connection (a task and a timer handle cost
        about 2 KiB per idle connection). Any frame from the peer counts as an
        answer. A frame only raises a flag; the sweep stamps it with its own
        ``now``, so idleness is measured entirely on the gateway's clock
        (``wirehub.clock``), to the sweep's resolution. Also gives back the
        outbound buffer when nothing is pending (``OutBatch.trim``). Returns
        1 if a ping was sent, 2 if the connection was closed.
        """
        if self.transport is None or self.transport.is_close_frame_sent:
            return 0
        self.batch.trim()
        if self._seen:
            self._seen = False
            self._idle_since = now
            self._ping_sent_at = 0
        elif self._ping_sent_at:
            if now - self._ping_sent_at >= timeout_s:
                self.close(WSCloseCode.GOING_AWAY, "no answer to ping")
                return 2
            return 0
        if now - self._idle_since >= interval_s:
            # Through the batch rather than picows's send_ping, which would
            # regrow the write buffer _drop_handshake_state gave back.
            self.batch.push_frame(WSMsgType.PING, b"")
            self._ping_sent_at = now
            return 1
        return 0

    def _abort(self):
        if not self.transport.is_disconnected:
            self.transport.disconnect(False)

    def _on_overflow(self):
        if self.transport.is_close_frame_sent or self.transport.is_disconnected:
            return
        self._sink.on_slow_consumer()
        self.close(WSCloseCode.TRY_AGAIN_LATER, "slow consumer: pending outbound bytes passed high_water_bytes")
