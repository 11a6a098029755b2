"""Server frame building and incremental UTF-8 checks (reference of ``_ext.frame``)."""

from __future__ import annotations

import codecs
import struct


class Utf8Validator:
    """Validate a text message fragment by fragment (RFC 6455 §8.1)."""

    __slots__ = ("_decoder", "_failed")

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self._failed = False

    def feed(self, data: bytes | bytearray | memoryview) -> bool:
        """Feed one fragment; return False as soon as the bytes cannot be UTF-8."""
        if not self._failed:
            try:
                self._decoder.decode(data)
            except UnicodeDecodeError:
                self._failed = True
        return not self._failed

    def finish(self) -> bool:
        """Return whether the message ended on a character boundary; reset."""
        ok = not self._failed
        if ok:
            try:
                self._decoder.decode(b"", final=True)
            except UnicodeDecodeError:
                ok = False
        self.reset()
        return ok

    def reset(self) -> None:
        self._decoder.reset()
        self._failed = False


def is_utf8(data: bytes | bytearray | memoryview) -> bool:
    """Return whether ``data`` is complete, valid UTF-8."""
    validator = Utf8Validator()
    return validator.feed(data) and validator.finish()


def build_frame(opcode: int, payload: bytes | bytearray | memoryview, rsv1: bool = False) -> bytes:
    """Return one unmasked FIN frame (RFC 6455 §5.2) as immutable bytes."""
    n = len(memoryview(payload))
    first = 0x80 | (0x40 if rsv1 else 0) | (opcode & 0x0F)
    if n < 126:
        header = struct.pack(">BB", first, n)
    elif n < 65536:
        header = struct.pack(">BBH", first, 126, n)
    else:
        header = struct.pack(">BBQ", first, 127, n)
    return header + bytes(payload)


def build_message_frame(opcode: int, head: bytes, body: bytes | bytearray | memoryview, tail: bytes) -> bytes:
    """One unmasked FIN frame whose payload is ``head + body + tail`` (the
    compiled twin copies ``body`` once, straight into the frame)."""
    return build_frame(opcode, b"".join((head, body, tail)))


def frame_payload(frame: bytes) -> memoryview:
    """The payload of an unmasked frame from ``build_frame``, without a copy."""
    length = frame[1] & 0x7F
    return memoryview(frame)[2 if length < 126 else 4 if length == 126 else 10:]
