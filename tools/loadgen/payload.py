"""Message templates: the only place that knows how loadgen frames look.

A sender (``Sender`` in ``wirehub._ext.loadgen_client`` or ``_pure``) sends
one template per message and rewrites fixed-width ASCII fields in place, so
every field here has a fixed width and a known offset:

* the 40-byte header ``[pub: 8 hex][seq: 16 hex][ts: 16 hex]``;
* an optional request ``id`` (16 hex) so wirehub answers with ``published``;
* an optional 6-digit channel suffix that the sender rotates.

``size`` is the size of what the server forwards untouched: the JSON ``data``
value including its quotes, the TLV ``data`` bytes, the ping ``id`` value, or
the whole frame for a raw peer server.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

HEADER_SIZE = 40
ID_SIZE = 16
CHANNEL_DIGITS = 6
PAD = b"x"

TLV_TYPE = 0x01
TLV_CHANNEL = 0x02
TLV_DATA = 0x03
TLV_ID = 0x04
TLV_OFFSET = 0x05


@dataclass(frozen=True)
class Template:
    """A frame payload plus where a sender rewrites its fields (-1: absent)."""

    payload: bytes
    binary: bool
    header_offset: int
    id_offset: int = -1
    channel_offset: int = -1


def header(pub: int, seq: int, ts_ns: int) -> bytes:
    """Encode the 40-byte header (used by tests and peer servers)."""
    return b"%08x%016x%016x" % (pub, seq, ts_ns)


def parse_header(buf: bytes) -> tuple[int, int, int] | None:
    """Return ``(pub, seq, ts_ns)`` or None when ``buf`` has no valid header."""
    if len(buf) < HEADER_SIZE:
        return None
    try:
        text = buf[:HEADER_SIZE].decode("ascii")
        if not all(c in "0123456789abcdef" for c in text):
            return None
        return int(text[:8], 16), int(text[8:24], 16), int(text[24:], 16)
    except UnicodeDecodeError:
        return None


def channel_name(prefix: str, index: int) -> str:
    """Channel names end in a fixed-width number so a sender can rotate them."""
    return f"{prefix}.{index:0{CHANNEL_DIGITS}d}"


def min_size(protocol: str, codec: str) -> int:
    """Smallest ``size`` that still holds the header."""
    return HEADER_SIZE + (2 if protocol == "wirehub" and codec == "json" else 0)


def _filler(size: int) -> bytes:
    return bytes(HEADER_SIZE) + PAD * (size - HEADER_SIZE)


def raw_message(size: int, binary: bool) -> Template:
    """A peer-server message: the header at offset 0, padded to ``size``."""
    return Template(_filler(size), binary, 0)


def tlv_record(tag: int, value: bytes) -> bytes:
    """One ``[tag u8][length u32 BE][value]`` record (docs/protocol.md)."""
    return struct.pack(">BI", tag, len(value)) + value


def _tlv(records: list[tuple[int, bytes]]) -> tuple[bytes, dict[int, int]]:
    out = bytearray()
    value_at = {}
    for tag, value in records:
        value_at[tag] = len(out) + 5
        out += tlv_record(tag, value)
    return bytes(out), value_at


def wirehub_publish(channel: str, size: int, codec: str) -> Template:
    """A ``publish`` with an ``id`` (so the server acks it) and a padded ``data``."""
    ident = b"0" * ID_SIZE
    chan = channel.encode()
    if codec == "tlv":
        payload, at = _tlv([(TLV_TYPE, b"publish"), (TLV_CHANNEL, chan), (TLV_ID, ident),
                            (TLV_DATA, _filler(size))])
        return Template(payload, True, at[TLV_DATA], at[TLV_ID],
                        at[TLV_CHANNEL] + len(chan) - CHANNEL_DIGITS)
    head = b'{"type":"publish","channel":"' + chan + b'","id":"'
    middle = ident + b'","data":"'
    payload = head + middle + _filler(size - 2) + b'"}'
    return Template(payload, False, len(head) + len(middle), len(head),
                    len(head) - len(b'","id":"') - CHANNEL_DIGITS)


def wirehub_ping(size: int, codec: str) -> Template:
    """A ``ping`` whose ``id`` carries the header; the ``pong`` echoes it back."""
    if codec == "tlv":
        payload, at = _tlv([(TLV_TYPE, b"ping"), (TLV_ID, _filler(size))])
        return Template(payload, True, at[TLV_ID])
    head = b'{"type":"ping","id":"'
    return Template(head + _filler(size - 2) + b'"}', False, len(head))


def wirehub_subscribe(channel: str, codec: str) -> tuple[bytes, bool]:
    """The ``subscribe`` request as ``(payload, binary)``."""
    if codec == "tlv":
        payload, _ = _tlv([(TLV_TYPE, b"subscribe"), (TLV_CHANNEL, channel.encode())])
        return payload, True
    return json.dumps({"type": "subscribe", "channel": channel}, separators=(",", ":")).encode(), False


def decode_control(payload: bytes, binary: bool) -> dict[str, object]:
    """Decode a rare (non hot-path) wirehub frame into a dict; ``{}`` if malformed."""
    if not binary:
        try:
            msg = json.loads(payload)
        except ValueError:
            return {}
        return msg if isinstance(msg, dict) else {}
    names = {TLV_TYPE: "type", TLV_CHANNEL: "channel", 0x07: "code", 0x08: "error",
             0x09: "client_id", TLV_ID: "id"}
    fields: dict[str, object] = {}
    pos = 0
    while pos + 5 <= len(payload):
        tag, length = struct.unpack_from(">BI", payload, pos)
        value = payload[pos + 5:pos + 5 + length]
        if len(value) != length:
            return {}
        if tag in names:
            fields[names[tag]] = value.decode("utf-8", "replace")
        pos += 5 + length
    return fields if pos == len(payload) else {}
