"""TLV records ``[tag u8][length u32 big-endian][value]`` (reference of ``_ext.tlv``)."""

from __future__ import annotations

import struct
from collections.abc import Iterable

_HEADER = struct.Struct(">BI")


def decode(data: bytes | bytearray | memoryview, max_records: int = 64) -> list[tuple[int, bytes]]:
    """Split ``data`` into ``[(tag, value), ...]``; raise ``ValueError`` if malformed."""
    view = memoryview(data).cast("B")
    records: list[tuple[int, bytes]] = []
    pos, n = 0, len(view)
    while pos < n:
        if len(records) >= max_records:
            raise ValueError(f"more than {max_records} TLV records")
        if n - pos < _HEADER.size:
            raise ValueError(f"truncated TLV header at byte {pos}")
        tag, length = _HEADER.unpack_from(view, pos)
        remaining = n - pos - _HEADER.size
        if length > remaining:
            raise ValueError(f"TLV record at byte {pos} declares {length} bytes, {remaining} remain")
        start = pos + _HEADER.size
        records.append((tag, bytes(view[start : start + length])))
        pos = start + length
    return records


def encode(records: Iterable[tuple[int, bytes | bytearray | memoryview]]) -> bytes:
    """Serialize ``(tag, value)`` pairs."""
    out = bytearray()
    for tag, value in records:
        if not 0 <= tag <= 255:
            raise ValueError(f"TLV tag {tag} does not fit in one byte")
        out += _HEADER.pack(tag, len(memoryview(value)))
        out += value
    return bytes(out)
