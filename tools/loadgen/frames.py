"""The header of a frame from the server, as the loadgen's Python clients read it.

Both the pure ``SocketReader`` (the reference twin of the Cython reader) and
``connect`` mode's ``Holder`` parse frames out of their own read buffers, and
both must refuse the same frames with the same CLOSE codes.
"""

from __future__ import annotations


class FrameRefused(Exception):
    """A server frame the client must answer with CLOSE ``code``."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(text)
        self.code = code


def server_frame_header(buf: bytearray, pos: int, max_frame: int) -> tuple[int, int] | None:
    """``(header size, payload length)`` of the frame at ``buf[pos:]``, or None
    while its header is incomplete.

    Raises:
        FrameRefused: 1002 for RSV bits (no extension is negotiated), a masked
            frame (servers never mask, RFC 6455 §5.1) or a 64-bit length with
            its top bit set (§5.2); 1009 for a payload above ``max_frame``.
    """
    available = len(buf) - pos
    if available < 2:
        return None
    b0, b1 = buf[pos], buf[pos + 1]
    if b0 & 0x70 or b1 & 0x80:
        raise FrameRefused(1002, "masked frame or RSV bits from the server")
    length, header = b1 & 0x7F, 2
    if length == 126:
        if available < 4:
            return None
        length, header = int.from_bytes(buf[pos + 2:pos + 4], "big"), 4
    elif length == 127:
        if available < 10:
            return None
        length, header = int.from_bytes(buf[pos + 2:pos + 10], "big"), 10
        if length >> 63:
            raise FrameRefused(1002, "64-bit length with its top bit set")
    if length > max_frame:
        raise FrameRefused(1009, f"frame of {length} bytes")
    return header, length
