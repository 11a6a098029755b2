"""The receive path (reference of ``_ext.listener``): frames in, messages out."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport

from .bucket import TokenBucket
from .deflate import Inflater, InvalidData, MessageTooBig
from .fanout import Flusher, OutBatch
from .frame import Utf8Validator

def _is_valid_close_code(code: int) -> bool:
    """RFC 6455 §7.4.1/§7.4.2: the codes a peer may put on the wire."""
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


class FrameListener(WSListener):  # type: ignore[misc]
    """Reassemble, validate and rate-limit messages; send through an ``OutBatch``.

    See ``wirehub._ext.listener.FrameListener`` for the contract.
    """

    def __init__(self, flusher: Flusher, limits: Any, sink: Any,
                 inflater_factory: Callable[[], Inflater] | None = None) -> None:
        self._flusher = flusher
        self._sink = sink
        self._inflater_factory = inflater_factory
        self._inflater: Inflater | None = None
        self._compressed = False
        # Created on first use: an idle connection holds neither.
        self._utf8: Utf8Validator | None = None
        self._fragments: bytearray | None = None
        self._fragmented_opcode = 0
        self._fragment_count = 0
        self._close_received = False
        self._frame_at = 0.0     # the last frame's arrival: the rate limiter's clock
        self._seen = False       # a frame arrived since the last heartbeat sweep
        self._idle_since = 0.0   # heartbeat clock: the sweep that last saw activity
        self._ping_sent_at = 0.0  # heartbeat clock; 0: no ping outstanding
        self.max_message_bytes = limits.max_payload_bytes
        self._max_fragments = limits.max_fragments
        self._high_water_bytes = limits.high_water_bytes
        self._close_timeout_s = limits.close_timeout_s
        now = time.monotonic()
        self._messages = TokenBucket(limits.rate_limit_messages_per_s, limits.rate_limit_burst_messages, now)
        self._bytes = TokenBucket(limits.rate_limit_bytes_per_s, limits.rate_limit_burst_bytes, now)
        self._violations = TokenBucket(
            limits.rate_limit_violations_per_s, limits.rate_limit_burst_violations, now)
        self.transport: WSTransport | None = None
        self.batch: OutBatch | None = None

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        self._frame_at = time.monotonic()
        self._seen = True
        self.batch = OutBatch(self._flusher, transport.underlying_transport,
                              self._high_water_bytes, self._on_overflow)
        self._sink.on_open()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if self.batch is not None:
            self.batch.close()
        self._sink.on_close()

    def pause_writing(self) -> None:
        self.batch.pause()

    def resume_writing(self) -> None:
        self.batch.resume()

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        opcode = frame.msg_type
        self._frame_at = time.monotonic()
        self._seen = True
        if self._close_received:
            return  # RFC 6455 §5.5.1
        if self.transport.is_close_frame_sent and opcode != WSMsgType.CLOSE:
            self.batch.close()  # nothing may follow our CLOSE
            return
        if frame.rsv2 or frame.rsv3 or (frame.rsv1 and opcode >= 8):
            self.close(WSCloseCode.PROTOCOL_ERROR, "reserved bits set without a negotiated extension")
        elif opcode == WSMsgType.CLOSE:
            self._on_close_frame(frame)
        elif opcode == WSMsgType.PING:
            # Through the batch, so a peer that pings without reading meets
            # high_water_bytes like any slow consumer.
            self.batch.push_frame(WSMsgType.PONG, frame.get_payload_as_bytes())
        elif opcode == WSMsgType.PONG:
            return  # unsolicited or an answer to our heartbeat: nothing to say (§5.5.3)
        elif opcode == WSMsgType.CONTINUATION:
            if not self._fragmented_opcode:
                self.close(WSCloseCode.PROTOCOL_ERROR, "continuation frame without a message to continue")
            elif frame.rsv1:
                self.close(WSCloseCode.PROTOCOL_ERROR, "RSV1 set on a continuation frame")
            else:
                self._add_fragment(frame)
        elif self._fragmented_opcode:
            self.close(WSCloseCode.PROTOCOL_ERROR, "new message started before the fragmented one finished")
        elif frame.rsv1 and self._inflater_factory is None:
            self.close(WSCloseCode.PROTOCOL_ERROR, "reserved bits set without a negotiated extension")
        else:
            self._compressed = bool(frame.rsv1)
            self._fragmented_opcode = opcode
            self._fragment_count = 0
            if self._utf8 is None:
                self._utf8 = Utf8Validator()
            self._add_fragment(frame)

    def _add_fragment(self, frame: WSFrame) -> None:
        self._fragment_count += 1
        if self._fragment_count > self._max_fragments:
            self.close(WSCloseCode.POLICY_VIOLATION, "message has too many fragments")
            return
        if self._compressed:
            if self._inflater is None:
                self._inflater = self._inflater_factory()
            try:
                chunk = self._inflater.feed(frame.get_payload_as_bytes(), frame.fin)
            except MessageTooBig:
                self.close(WSCloseCode.MESSAGE_TOO_BIG, "message inflates past max_payload_bytes")
                return
            except InvalidData:
                self.close(WSCloseCode.INVALID_TEXT, "invalid compressed data")
                return
        else:
            if len(self._fragments or b"") + frame.payload_size > self.max_message_bytes:
                self.close(WSCloseCode.MESSAGE_TOO_BIG, "message exceeds max_payload_bytes")
                return
            chunk = frame.get_payload_as_bytes()
        if self._fragmented_opcode == WSMsgType.TEXT and not self._utf8.feed(chunk):
            self.close(WSCloseCode.INVALID_TEXT, "text message is not valid UTF-8")
            return
        if self._fragments is None:
            self._fragments = bytearray()
        self._fragments += chunk
        if not frame.fin:
            return
        opcode, self._fragmented_opcode = self._fragmented_opcode, 0
        if opcode == WSMsgType.TEXT and not self._utf8.finish():
            self.close(WSCloseCode.INVALID_TEXT, "text message is not valid UTF-8")
            return
        payload, self._fragments = bytes(self._fragments), None
        self._deliver(opcode, payload)

    def _deliver(self, opcode: int, payload: bytes) -> None:
        now = self._frame_at
        if not (self._messages.consume(1.0, now) and self._bytes.consume(len(payload), now)):
            if not self._violations.consume(1.0, now):
                self.close(WSCloseCode.POLICY_VIOLATION, "rate limit exceeded")
            else:
                self._sink.on_refused(opcode == WSMsgType.BINARY, payload)
            return
        if opcode == WSMsgType.TEXT:
            self._sink.on_text(payload)
        else:
            self._sink.on_binary(payload)

    def _on_close_frame(self, frame: WSFrame) -> None:
        self._close_received = True
        code = WSCloseCode.OK
        if frame.payload_size >= 2:
            code = frame.get_close_code()
            if not _is_valid_close_code(code):
                self.close(WSCloseCode.PROTOCOL_ERROR, "invalid close code")
                self.transport.disconnect()
                return
        if not self.transport.is_close_frame_sent:
            self.batch.flush()
            self.transport.send_close(code)
        self.batch.close()
        self.transport.disconnect()

    def close(self, code: int, reason: str) -> None:
        """Send CLOSE with ``code``/``reason``; abort if the peer does not answer."""
        if self.transport.is_close_frame_sent or self.transport.is_disconnected:
            return
        self._sink.on_closing(code)
        self.batch.flush()
        self.batch.close()
        self.transport.send_close(WSCloseCode(code), reason.encode())
        self._flusher.loop.call_later(self._close_timeout_s, self._abort)

    def heartbeat(self, now: float, interval_s: float, timeout_s: float) -> int:
        """Ping an idle peer; close one that did not answer in time (1001).
        Idleness is measured on the sweep's clock (see the compiled twin)."""
        if self.transport is None or self.transport.is_close_frame_sent:
            return 0
        self.batch.trim()
        if self._seen:
            self._seen = False
            self._idle_since = now
            self._ping_sent_at = 0.0
        elif self._ping_sent_at:
            if now - self._ping_sent_at >= timeout_s:
                self.close(WSCloseCode.GOING_AWAY, "no answer to ping")
                return 2
            return 0
        if now - self._idle_since >= interval_s:
            self.batch.push_frame(WSMsgType.PING, b"")
            self._ping_sent_at = now
            return 1
        return 0

    def _abort(self) -> None:
        if not self.transport.is_disconnected:
            self.transport.disconnect(False)

    def _on_overflow(self) -> None:
        if self.transport.is_close_frame_sent or self.transport.is_disconnected:
            return
        self._sink.on_slow_consumer()
        self.close(WSCloseCode.TRY_AGAIN_LATER, "slow consumer: pending outbound bytes passed high_water_bytes")
