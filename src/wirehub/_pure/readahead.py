"""Keep picows from answering frame N+1 before frame N is delivered
(reference of ``_ext.readahead``; see its docstring for the why, and for
``client=True``)."""

from __future__ import annotations

import asyncio
from typing import Any

MAX_READ_BYTES = 256 * 1024  # the most one read hands picows (see the compiled twin)


class ReadAheadGuard(asyncio.BufferedProtocol):
    """The loop's protocol; forwards to ``inner`` and splits reads before risky frames."""

    def __init__(self, inner: Any, max_frame_size: int, admission: Any = None, client: bool = False) -> None:
        self._inner = inner
        self._client = client
        self._head_state = 0  # client: how much of the response's CR LF CR LF was seen (4: all)
        self._head_pos = 0    # client: response bytes seen
        self._not_101 = False  # client: the response's status is not 101
        self._max_frame_size = max_frame_size
        self._admission = admission
        self._peer: str | None = None
        self._refusal: bytes | None = None
        self._refused = False  # admission counts this socket among those it answers
        self._head_bytes = 0
        self._discard = False
        self._view: memoryview | None = None
        self._skip = 0
        self._header = bytearray()
        self._upgraded = False

    def connection_made(self, transport: Any) -> None:
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

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._upgraded and self._admission is not None:
            self._admission.handshake_ended(self)
        if self._peer is not None:
            self._admission.release(self._peer)
            self._peer = None
        elif self._refused:
            self._admission.release_refused()
            self._refused = False
        self._inner.connection_lost(exc)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def handshake_timed_out(self) -> None:
        """Admission's handshake timeout: close, and ignore what still arrives."""
        self._discard = True
        self._inner.transport.disconnect()

    def get_buffer(self, sizehint: int) -> memoryview:
        self._view = self._inner.get_buffer(sizehint)[:MAX_READ_BYTES]
        return self._view

    def buffer_updated(self, nbytes: int) -> None:
        if not self._upgraded and self._client:
            self._feed_response(nbytes)
            self._view = None
            return
        if not self._upgraded:
            if self._discard:
                return
            if self._refusal is not None:  # refused at accept: answer now the request is here
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
        while True:
            data = bytes(self._view[:nbytes])
            split = self._find_split(data)
            if split <= 0:
                self._view = None  # not kept between reads (idle memory)
                self._inner.buffer_updated(nbytes)
                return
            tail = data[split:]
            self._inner.buffer_updated(split)
            batch = getattr(self._inner.listener, "batch", None)
            if batch is not None:
                batch.flush()
            self._view = self._inner.get_buffer(-1)
            self._view[:len(tail)] = tail
            nbytes = len(tail)

    def _feed_response(self, nbytes: int) -> None:
        """A client's reads until the upgrade: a 101's head alone to picows,
        then what followed it in the same read through the scan; any other
        status goes through whole (see the compiled twin)."""
        end = 0
        data = bytes(self._view[:nbytes])
        if self._head_state < 4:
            for i, byte in enumerate(data):
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
        tail = data[end:] if 0 < end < nbytes and not self._not_101 else b""
        if not tail:
            self._inner.buffer_updated(nbytes)
            self._upgraded = self._inner.listener is not None
            return
        self._inner.buffer_updated(end)
        self._upgraded = self._inner.listener is not None
        self._view = self._inner.get_buffer(-1)
        self._view[:len(tail)] = tail
        if self._upgraded:
            self.buffer_updated(len(tail))
        else:
            self._inner.buffer_updated(len(tail))

    def _find_split(self, data: bytes) -> int:
        pos, n = 0, len(data)
        while pos < n:
            if self._skip:
                take = min(n - pos, self._skip)
                pos += take
                self._skip -= take
                continue
            header_start = pos - len(self._header)
            while len(self._header) < 2 and pos < n:
                self._header.append(data[pos])
                pos += 1
            if len(self._header) < 2:
                return 0
            b0, b1 = self._header[0], self._header[1]
            opcode, flag = b0 & 0x0F, b1 & 0x7F
            if self._risky_start(b0, b1) and header_start > 0:
                return self._split_at(header_start)
            need = 2 + {126: 2, 127: 8}.get(flag, 0) + (4 if b1 & 0x80 else 0)
            while len(self._header) < need and pos < n:
                self._header.append(data[pos])
                pos += 1
            if len(self._header) < need:
                return 0
            if flag == 126:
                length = int.from_bytes(self._header[2:4], "big")
                invalid = length < 126
            elif flag == 127:
                length = int.from_bytes(self._header[2:10], "big")
                invalid = length >> 63 or length < 65536
            else:
                length, invalid = flag, False
            if (invalid or (length > self._max_frame_size and opcode < 8)) and header_start > 0:
                return self._split_at(header_start)
            self._header.clear()
            self._skip = length
        return 0

    def _risky_start(self, b0: int, b1: int) -> bool:
        opcode = b0 & 0x0F
        if bool(b1 & 0x80) == self._client:
            return True  # a masked server frame, an unmasked client frame (RFC 6455 §5.1)
        if opcode in (0, 1, 2):
            return False
        if opcode in (9, 10):
            return not b0 & 0x80 or (b1 & 0x7F) > 125
        return True

    def _split_at(self, header_start: int) -> int:
        self._header.clear()
        self._skip = 0
        return header_start
