"""Pure-Python twin of ``wirehub._ext.loadgen_client``.

Used when the extension is not built (or ``WIREHUB_NO_EXTENSIONS=1``). Same
classes, same counters, same results; roughly 10x slower per frame, which the
report makes visible through the client's CPU use. See the Cython module for
the reasoning behind each piece; this file only mirrors it.
"""

from __future__ import annotations

import json
import os
import select
import time
from collections.abc import Callable
from typing import Any

from picows import WSFrame, WSListener, WSMsgType, WSTransport

from .frames import FrameRefused, server_frame_header
from .histogram import N_BUCKETS, Histogram
from .payload import HEADER_SIZE, TLV_DATA, TLV_ID, TLV_OFFSET, TLV_TYPE, parse_header

KIND_RAW = 0
KIND_WIREHUB_JSON = 1
KIND_WIREHUB_TLV = 2
HISTOGRAM_BUCKETS = N_BUCKETS
IMPLEMENTATION = "python"
WINDOW_BITS = 64
_MASK64 = (1 << 64) - 1


class Recorder:
    """Process-wide counters and latency histogram (see the Cython docstring)."""

    def __init__(self) -> None:
        self._hist = Histogram()
        self.received = self.received_bytes = self.other_received = 0
        self.sent = self.acked = self.malformed = self.error_replies = self.server_closes = 0

    hist_total = property(lambda self: self._hist.total)
    hist_min = property(lambda self: self._hist.min if self._hist.total else _MASK64)
    hist_max = property(lambda self: self._hist.max)
    hist_sum = property(lambda self: self._hist.sum)

    def record_ns(self, value: int) -> None:
        self._hist.record(value)

    def histogram_counts(self) -> bytes:
        return self._hist.counts.tobytes()

    def reset_histogram(self) -> None:
        self._hist = Histogram()


def _tlv(payload: bytes) -> dict[int, bytes] | None:
    records: dict[int, bytes] = {}
    pos = 0
    while pos < len(payload):
        if len(payload) - pos < 5:
            return None
        tag = payload[pos]
        length = int.from_bytes(payload[pos + 1:pos + 5], "big")
        value = payload[pos + 5:pos + 5 + length]
        if len(value) != length:
            return None
        records[tag] = value
        pos += 5 + length
    return records if TLV_TYPE in records else None


def _json(payload: bytes) -> dict[str, Any] | None:
    try:
        msg = json.loads(payload)
    except ValueError:
        return None
    return msg if isinstance(msg, dict) else None


class _Conn(WSListener):  # type: ignore[misc]
    def __init__(self, kind: int, recorder: Recorder) -> None:
        super().__init__()
        self.kind = kind
        self.recorder = recorder
        self.close_code = -1
        self.disconnected = False
        self.transport: WSTransport | None = None
        self.control: Callable[..., None] | None = None
        self.lost: Callable[..., None] | None = None

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.disconnected = True
        if self.lost is not None:
            self.lost(self)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        t = frame.msg_type
        if t in (WSMsgType.TEXT, WSMsgType.BINARY):
            if frame.fin:
                self._on_data(t, frame.get_payload_as_bytes())
            else:
                self.recorder.malformed += 1
        elif t == WSMsgType.CLOSE:
            self._on_close(int(frame.get_close_code()))  # type: ignore[call-overload]
        elif t == WSMsgType.CONTINUATION:
            self.recorder.malformed += 1

    def _on_data(self, msg_type: WSMsgType, payload: bytes) -> None:
        raise NotImplementedError

    def _on_close(self, code: int) -> None:
        self.close_code = code
        self.recorder.server_closes += 1
        assert self.transport is not None
        self.transport.send_close(code)
        self.transport.disconnect()

    def _control(self, msg_type: WSMsgType, payload: bytes) -> None:
        if self.control is not None:
            self.control(self, msg_type, payload)


class Subscriber(_Conn):
    """Count deliveries and check their order per stream."""

    def __init__(self, kind: int, recorder: Recorder, streams: int = 1) -> None:
        super().__init__(kind, recorder)
        if streams < 1:
            raise ValueError("streams must be >= 1")
        self.streams = streams
        self.received = self.missing = self.duplicates = self.out_of_order = 0
        self._next = [1] * streams
        self._seen = [0] * streams

    def highest(self, stream: int) -> int:
        return self._next[stream] - 1

    def finish(self, expected: list[int]) -> None:
        for s in range(self.streams):
            if expected[s] > self._next[s] - 1:
                self.missing += expected[s] - (self._next[s] - 1)
                self._next[s] = expected[s] + 1

    def _track(self, stream: int, seq: int) -> None:
        nxt = self._next[stream]
        if seq == nxt:
            self._seen[stream] = ((self._seen[stream] << 1) | 1) & _MASK64
            self._next[stream] = seq + 1
        elif seq > nxt:
            gap = seq - nxt
            self.missing += gap
            seen = (self._seen[stream] << (gap + 1)) & _MASK64 if gap < WINDOW_BITS - 1 else 0
            self._seen[stream] = seen | 1
            self._next[stream] = seq + 1
        else:
            behind = nxt - 1 - seq
            if behind < WINDOW_BITS and (self._seen[stream] >> behind) & 1:
                self.duplicates += 1
            else:
                self.out_of_order += 1
                if behind < WINDOW_BITS:
                    self._seen[stream] |= 1 << behind
                    self.missing -= 1

    def _on_data(self, msg_type: WSMsgType, payload: bytes) -> None:
        stream = 0
        if self.kind == KIND_RAW:
            data = payload
        elif self.kind == KIND_WIREHUB_JSON:
            if msg_type != WSMsgType.TEXT or b'"type":"message"' not in payload:
                self._control(msg_type, payload)
                return
            msg = _json(payload)
            if msg is None or not isinstance(msg.get("offset"), int) or not isinstance(
                    msg.get("data"), str):
                self.recorder.malformed += 1
                return
            seq = msg["offset"]
            data = msg["data"].encode()
        else:
            if msg_type != WSMsgType.BINARY:
                self._control(msg_type, payload)
                return
            rec = _tlv(payload)
            if rec is None:
                self.recorder.malformed += 1
                return
            if rec[TLV_TYPE] != b"message":
                self._control(msg_type, payload)
                return
            if len(rec.get(TLV_OFFSET, b"")) != 8 or TLV_DATA not in rec:
                self.recorder.malformed += 1
                return
            seq = int.from_bytes(rec[TLV_OFFSET], "big")
            data = rec[TLV_DATA]
        hdr = parse_header(data)
        if hdr is None:
            self.recorder.malformed += 1
            return
        pub, pseq, ts = hdr
        if self.kind == KIND_RAW:
            if pub >= self.streams:
                self.recorder.malformed += 1
                return
            stream, seq = pub, pseq
        self.received += 1
        self.recorder.received += 1
        self.recorder.received_bytes += len(payload)
        self._track(stream, seq)
        self.recorder.record_ns(time.monotonic_ns() - ts)


class Sender(_Conn):
    """Send numbered messages from a template; see the Cython docstring."""

    def __init__(self, kind: int, recorder: Recorder, *, pub_id: int, template: bytes,
                 binary: bool, header_offset: int, id_offset: int = -1,
                 channel_offset: int = -1, channel_first: int = 0, channel_step: int = 1,
                 channel_count: int = 1, ack_type: bytes = b"", record_latency: bool = False,
                 window: int = 1, rate: float = 0.0) -> None:
        super().__init__(kind, recorder)
        if header_offset < 0 or header_offset + HEADER_SIZE > len(template):
            raise ValueError("header does not fit in the template")
        if window < 1 and rate <= 0:
            raise ValueError("window must be >= 1")
        self.pub_id = pub_id
        self._buf = bytearray(template)
        self._msg_type = WSMsgType.BINARY if binary else WSMsgType.TEXT
        self._hdr_off, self._id_off, self._chan_off = header_offset, id_offset, channel_offset
        self._chan = (channel_first, channel_step, channel_count)
        self._ack_type = ack_type
        self.record_latency = record_latency
        self.window = window
        self.rate = rate
        self._interval_ns = 1e9 / rate if rate > 0 else 0.0
        self.sent = self.acked = self.in_flight = 0
        self.running = False
        self._start_ns = 0

    def start(self, start_ns: int) -> None:
        self.running = True
        self._start_ns = start_ns
        if self.rate <= 0:
            self._fill()
        else:
            self.tick()

    def stop(self) -> None:
        self.running = False

    def tick(self) -> int:
        if not self.running or self.rate <= 0 or self.transport is None or self.disconnected:
            return 0
        now = time.monotonic_ns()
        if now < self._start_ns:
            return 0
        before = self.sent
        due = int((now - self._start_ns) / self._interval_ns) + 1
        while self.sent < due:
            self._send_one(self._start_ns + int(self.sent * self._interval_ns))
        return self.sent - before

    def channel_counts(self) -> list[int]:
        k = max(self._chan[2], 1)
        return [self.sent // k + (1 if i < self.sent % k else 0) for i in range(k)]

    def _fill(self) -> None:
        if self.transport is None:
            return
        while self.running and self.in_flight < self.window and not self.disconnected:
            self._send_one(time.monotonic_ns())

    def _send_one(self, ts: int) -> None:
        seq = self.sent + 1
        h = self._hdr_off
        self._buf[h:h + HEADER_SIZE] = b"%08x%016x%016x" % (self.pub_id, seq, ts)
        if self._id_off >= 0:
            self._buf[self._id_off:self._id_off + 16] = b"%016x" % seq
        first, step, count = self._chan
        if self._chan_off >= 0 and count > 1:
            chan = first + ((seq - 1) % count) * step
            self._buf[self._chan_off:self._chan_off + 6] = b"%06d" % chan
        assert self.transport is not None
        self.transport.send(self._msg_type, self._buf)
        self.sent += 1
        self.in_flight += 1
        self.recorder.sent += 1

    def _on_data(self, msg_type: WSMsgType, payload: bytes) -> None:
        hdr_src: bytes | None = None
        if self.kind == KIND_RAW:
            hdr_src = payload
        elif self.kind == KIND_WIREHUB_JSON:
            if msg_type != WSMsgType.TEXT:
                self.recorder.malformed += 1
                return
            msg = _json(payload)
            kind = msg.get("type") if msg else None
            if kind != self._ack_type.decode():
                if kind == "error":
                    self.recorder.error_replies += 1
                    if msg is not None and "id" in msg:
                        self._ack()
                elif kind == "message":
                    self.recorder.other_received += 1
                self._control(msg_type, payload)
                return
            if self.record_latency:
                ident = msg.get("id") if msg else None
                if not isinstance(ident, str):
                    self.recorder.malformed += 1
                    return
                hdr_src = ident.encode()
        else:
            if msg_type != WSMsgType.BINARY:
                self._control(msg_type, payload)
                return
            rec = _tlv(payload)
            if rec is None:
                self.recorder.malformed += 1
                return
            if rec[TLV_TYPE] != self._ack_type:
                if rec[TLV_TYPE] == b"error":
                    self.recorder.error_replies += 1
                    if TLV_ID in rec:
                        self._ack()
                elif rec[TLV_TYPE] == b"message":
                    self.recorder.other_received += 1
                self._control(msg_type, payload)
                return
            hdr_src = rec.get(TLV_ID)

        if hdr_src is not None and (self.record_latency or self.kind == KIND_RAW):
            hdr = parse_header(hdr_src)
            if hdr is None:
                self.recorder.malformed += 1
                return
            pub, _, ts = hdr
            if self.kind == KIND_RAW and pub != self.pub_id:
                self.recorder.other_received += 1
                return
            if self.record_latency:
                self.recorder.record_ns(time.monotonic_ns() - ts)
        self._ack()

    def _ack(self) -> None:
        self.acked += 1
        self.recorder.acked += 1
        if self.in_flight > 0:
            self.in_flight -= 1
        if self.rate <= 0 and self.running:
            self._fill()


_READ_CHUNK = 256 * 1024
_MAX_EVENTS = 256


class SocketReader:
    """Read the loadgen's sockets from one epoll set (see the Cython docstring)."""

    def __init__(self, max_frame: int = 16 * 1024 * 1024) -> None:
        if max_frame < 125:
            raise ValueError("max_frame must be >= 125")
        self.max_frame = max_frame
        self._epoll = select.epoll()
        self._sockets: dict[int, tuple[_Conn, bytearray]] = {}

    @property
    def connections(self) -> int:
        return len(self._sockets)

    def fileno(self) -> int:
        return self._epoll.fileno()

    def adopt(self, listener: _Conn, fd: int) -> None:
        self._epoll.register(fd, select.EPOLLIN)
        self._sockets[fd] = (listener, bytearray())

    def close(self) -> None:
        for fd in list(self._sockets):
            self._drop(fd)

    def on_ready(self) -> None:
        for fd, _ in self._epoll.poll(0, _MAX_EVENTS):
            if fd in self._sockets:
                try:
                    self._read(fd)
                except BaseException:
                    entry = self._sockets.get(fd)
                    if entry is not None:
                        self._drop(fd)
                        assert entry[0].transport is not None
                        entry[0].transport.disconnect()
                    raise

    def _read(self, fd: int) -> None:
        listener, pending = self._sockets[fd]
        try:
            data = os.read(fd, _READ_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop(fd)
            assert listener.transport is not None
            listener.transport.disconnect()
            return
        pending += data
        used = self._frames(fd, listener, pending)
        if used is not None:
            del pending[:used]

    def _frames(self, fd: int, listener: _Conn, buf: bytearray) -> int | None:
        """Hand over every whole frame; return the bytes used, None if the socket was dropped."""
        pos, size = 0, len(buf)
        while True:
            try:
                parsed = server_frame_header(buf, pos, self.max_frame)
            except FrameRefused as exc:
                return self._fail(fd, listener, exc.code)
            if parsed is None:
                break
            header, length = parsed
            if size - pos < header + length:
                break
            b0 = buf[pos]
            opcode = b0 & 0x0F
            payload = bytes(buf[pos + header:pos + header + length])
            if opcode in (0x1, 0x2):
                if b0 & 0x80:
                    listener._on_data(WSMsgType(opcode), payload)
                else:
                    listener.recorder.malformed += 1
            elif opcode == 0x0:
                listener.recorder.malformed += 1
            elif 0x8 <= opcode <= 0xA and b0 & 0x80 and length <= 125:
                if opcode == 0x8:
                    self._drop(fd)
                    listener._on_close(int.from_bytes(payload[:2], "big") if length >= 2 else 1005)
                    return None
                if opcode == 0x9:
                    assert listener.transport is not None
                    listener.transport.send(WSMsgType.PONG, payload)
            else:
                return self._fail(fd, listener, 1002)
            pos += header + length
            if fd not in self._sockets:
                return None
        return pos

    def _fail(self, fd: int, listener: _Conn, code: int) -> None:
        listener.recorder.malformed += 1
        self._drop(fd)
        assert listener.transport is not None
        listener.transport.send_close(code)
        listener.transport.disconnect()
        return None

    def _drop(self, fd: int) -> None:
        if self._sockets.pop(fd, None) is not None:
            try:
                self._epoll.unregister(fd)
            except OSError:  # closed by picows already: left the epoll set with it
                pass
