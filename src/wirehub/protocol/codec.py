"""Two codecs for one model: JSON on text frames, TLV on binary frames.

Both decode to the Structs in ``messages`` and raise the ``WirehubError``
subclasses from ``errors`` for bad input, so the connection answers a bad
JSON message and a bad TLV message the same way.
"""

from __future__ import annotations

import base64
import re
import struct
from collections.abc import Callable, Container
from types import SimpleNamespace
from typing import Any

import msgspec

from .errors import InvalidField, InvalidMessage, UnknownType
from .messages import (
    MAX_KEY_LENGTH,
    Auth,
    ClientMessage,
    Command,
    CustomMessage,
    FileBegin,
    FileChunk,
    FileEnd,
    History,
    HistoryEntry,
    HistoryRequest,
    Id,
    Ping,
    Publication,
    Publish,
    Range,
    Reply,
    StreamPosition,
    Subscribe,
    Unsubscribe,
)

_TYPE_PATH = re.compile(r"at `\$\.type`$")
# msgspec's decoders recurse per nesting level and stop at the interpreter's
# recursion limit, raising RecursionError rather than DecodeError.
_TOO_DEEP = "invalid JSON: nested too deeply"


def _best_effort_id(obj: Any) -> Id:
    """The ``id`` of a message that failed validation, so the error can carry it."""
    if isinstance(obj, dict):
        value = obj.get("id")
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            return value
    return None


class JsonCodec:
    """JSON objects on text frames.

    Args:
        custom_types: message types registered with ``Gateway.on``; a message
            whose ``type`` is one of these decodes to ``CustomMessage``.
    """

    def __init__(self, custom_types: Container[str] = ()) -> None:
        self._decoder = msgspec.json.Decoder(ClientMessage)
        self._generic = msgspec.json.Decoder()
        self._encoder = msgspec.json.Encoder()
        self._custom_types = custom_types
        # A reply Struct, or any value msgspec encodes (``Connection.send``).
        # msgspec's own method, not a wrapper: every reply goes through it.
        self.encode: Callable[[Reply | Any], bytes] = self._encoder.encode

    def decode(self, payload: bytes) -> Command | CustomMessage:
        """Decode one client message.

        Raises:
            InvalidMessage, UnknownType, InvalidField: see docs/protocol.md.
        """
        try:
            return self._decoder.decode(payload)
        except msgspec.ValidationError as exc:
            return self._decode_untyped(payload, str(exc))
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            # (Text frames are UTF-8 checked before they get here; the codec
            # does not rely on it.)
            raise InvalidMessage(f"invalid JSON: {exc}") from None
        except RecursionError:
            raise InvalidMessage(_TOO_DEEP) from None

    def _decode_untyped(self, payload: bytes, reason: str) -> CustomMessage:
        # The slow path, only for messages that failed typed decoding: either
        # an application-defined type, or an error to classify.
        try:
            obj = self._generic.decode(payload)
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            raise InvalidMessage(f"invalid JSON: {exc}") from None
        except RecursionError:
            raise InvalidMessage(_TOO_DEEP) from None
        msg_id = _best_effort_id(obj)
        if not isinstance(obj, dict):
            raise InvalidMessage("expected a JSON object", id=msg_id)
        if "type" not in obj:
            raise UnknownType("missing `type`", id=msg_id)
        msg_type = obj["type"]
        if not isinstance(msg_type, str):
            raise UnknownType("`type` must be a string", id=msg_id)
        if _TYPE_PATH.search(reason):
            if msg_type == "file_chunk":
                raise InvalidMessage("file chunks travel as TLV on binary frames (docs/protocol.md, "
                                     "\"File transfer\")", id=msg_id)
            if msg_type in self._custom_types:
                return CustomMessage(msg_type, obj, msg_id)
            raise UnknownType(f"unknown message type {msg_type!r}", id=msg_id)
        raise InvalidField(reason, id=msg_id)

    def encode_message(self, channel: str, offset: int, data: bytes) -> bytes:
        """The payload of a ``message`` for a JSON publication (``data`` is raw JSON)."""
        head, tail = self.message_ends(channel, offset)
        return b"".join((head, data, tail))

    def message_ends(self, channel: str, offset: int) -> tuple[bytes, bytes]:
        """What goes before and after a publication's data in its ``message``
        (msgspec's encoding of ``Message``, split around ``data``). The
        fan-out path frames the three in one copy (``build_message_frame``)."""
        return (b'{"type":"message","channel":%b,"offset":%d,"data":' % (self._encoder.encode(channel), offset),
                b"}")

    def encode_history(self, channel: str, position: StreamPosition, publications: list[Publication],
                       more: bool, msg_id: Id) -> bytes:
        """A ``history`` reply; a binary publication's bytes go as base64 in ``data_b64``."""
        entries = [HistoryEntry(pub.offset, data_b64=base64.b64encode(pub.data).decode(), key=pub.key)
                   if pub.binary else HistoryEntry(pub.offset, msgspec.Raw(pub.data), key=pub.key)
                   for pub in publications]
        return self._encoder.encode(History(channel, position, entries, more, msg_id))


class Tag:
    """TLV tags (docs/protocol.md)."""

    TYPE = 0x01
    CHANNEL = 0x02
    DATA = 0x03
    ID = 0x04
    OFFSET = 0x05
    EXCLUDE_SELF = 0x06
    CODE = 0x07
    ERROR = 0x08
    CLIENT_ID = 0x09
    SERVER = 0x0A
    # 0x10-0x1F: authentication
    TOKEN = 0x10
    SUB = 0x11
    EXP = 0x12
    REASON = 0x13
    # 0x20-0x2F: sources
    TAIL = 0x20
    # 0x30-0x3F: history, recovery, delivery policies
    EPOCH = 0x30
    SINCE_OFFSET = 0x31
    SINCE_EPOCH = 0x32
    RECOVERED = 0x33
    FROM = 0x34
    TO = 0x35
    DROPPED = 0x36
    LIMIT = 0x37
    REVERSE = 0x38
    MAX_RATE = 0x39
    KEY = 0x3A
    PUBLICATION = 0x3B
    MORE = 0x3C
    BINARY = 0x3D
    IDEMPOTENCY_KEY = 0x3E
    DUPLICATE = 0x3F
    # 0x40-0x4F: file transfer
    FILE_ID = 0x40
    NAME = 0x41
    SIZE = 0x42
    SHA256 = 0x43
    CHUNK_SIZE = 0x44
    INDEX = 0x45
    CHUNK = 0x46
    HAVE = 0x47
    CHUNK_COUNT = 0x48
    WINDOW = 0x49
    MAX_BYTES_PER_S = 0x4A
    BURST_BYTES = 0x4B


_FIELD_BY_TAG = {
    Tag.TYPE: "type", Tag.CHANNEL: "channel", Tag.DATA: "data", Tag.ID: "id",
    Tag.OFFSET: "offset", Tag.EXCLUDE_SELF: "exclude_self", Tag.CODE: "code",
    Tag.ERROR: "error", Tag.CLIENT_ID: "client_id", Tag.SERVER: "server",
    Tag.TOKEN: "token", Tag.SUB: "sub", Tag.EXP: "exp", Tag.REASON: "reason",
    Tag.TAIL: "tail", Tag.EPOCH: "epoch", Tag.SINCE_OFFSET: "since_offset",
    Tag.SINCE_EPOCH: "since_epoch", Tag.RECOVERED: "recovered", Tag.FROM: "first",
    Tag.TO: "last", Tag.DROPPED: "dropped", Tag.LIMIT: "limit", Tag.REVERSE: "reverse",
    Tag.MAX_RATE: "max_rate", Tag.KEY: "key", Tag.PUBLICATION: "publications", Tag.MORE: "more",
    Tag.BINARY: "binary", Tag.IDEMPOTENCY_KEY: "idempotency_key", Tag.DUPLICATE: "duplicate",
    Tag.FILE_ID: "file_id", Tag.NAME: "name", Tag.SIZE: "size", Tag.SHA256: "sha256",
    Tag.CHUNK_SIZE: "chunk_size", Tag.INDEX: "index", Tag.CHUNK: "chunk", Tag.HAVE: "have",
    Tag.CHUNK_COUNT: "chunk_count", Tag.WINDOW: "window", Tag.MAX_BYTES_PER_S: "max_bytes_per_s",
    Tag.BURST_BYTES: "burst_bytes",
}
_U64_FIELDS = frozenset({"offset", "exp", "tail", "since_offset", "first", "last", "dropped", "limit",
                         "size", "chunk_size", "index", "chunk_count", "window", "max_bytes_per_s",
                         "burst_bytes"})
# Binary values that JSON writes as lowercase hex, with their sizes.
_HEX_FIELDS = {"file_id": 16, "sha256": 32}
_CHUNK_HEAD = struct.Struct(">16sII")  # a ``chunk`` record's file id, index and count (the seed's layout)
_RANGE = struct.Struct(">II")          # one ``have`` range
_CHUNK_TYPE_RECORD = struct.pack(">BI", Tag.TYPE, len(b"file_chunk")) + b"file_chunk"
_FLAG_FIELDS = frozenset({"exclude_self", "recovered", "reverse", "more", "binary", "duplicate"})
_TAG_BY_FIELD = {name: tag for tag, name in _FIELD_BY_TAG.items()}
_U64 = struct.Struct(">Q")
_F64 = struct.Struct(">d")
_MESSAGE_TYPE = b"message"
_DATA_HEADER = struct.Struct(">BI")  # a TLV record's tag and length (docs/protocol.md)


class TlvCodec:
    """TLV records on binary frames; values are UTF-8 text except ``data``,
    ``offset`` and ``exp`` (u64 big-endian) and ``exclude_self`` (one byte)."""

    def __init__(self, tlv: SimpleNamespace, custom_types: Container[str] = ()) -> None:
        self._decode_records: Callable[..., list[tuple[int, bytes]]] = tlv.decode
        self._encode_records: Callable[[list[tuple[int, bytes]]], bytes] = tlv.encode
        self._custom_types = custom_types

    def decode(self, payload: bytes) -> Command | CustomMessage:
        try:
            records = self._decode_records(payload)
        except ValueError as exc:
            raise InvalidMessage(f"malformed TLV: {exc}") from None
        fields: dict[str, Any] = {}
        for tag, value in records:
            name = _FIELD_BY_TAG.get(tag)
            if name is None:
                raise InvalidField(f"unknown TLV tag 0x{tag:02x}")
            if name in fields:
                raise InvalidField(f"duplicate TLV tag 0x{tag:02x} ({name})")
            fields[name] = self._field_value(name, value)
        msg_id = fields.get("id")
        msg_type = fields.pop("type", None)
        if msg_type is None:
            raise UnknownType("missing `type`", id=msg_id)
        if msg_type == "publish":
            key, once = fields.get("key"), fields.get("idempotency_key")
            if key is not None and len(key) > MAX_KEY_LENGTH:
                raise InvalidField(f"TLV `key` must be at most {MAX_KEY_LENGTH} characters", id=msg_id)
            if once is not None and not 0 < len(once) <= MAX_KEY_LENGTH:
                raise InvalidField(f"TLV `idempotency_key` must be 1 to {MAX_KEY_LENGTH} characters", id=msg_id)
            return Publish(self._require(fields, "channel"), msgspec.Raw(self._require(fields, "data")),
                           msg_id, fields.get("exclude_self", False), key, once)
        if msg_type == "subscribe":
            self._require(fields, "channel")
            return self._convert(fields, Subscribe, ("channel", "id", "tail", "max_rate"))
        if msg_type == "unsubscribe":
            return Unsubscribe(self._require(fields, "channel"), msg_id)
        if msg_type == "ping":
            return Ping(msg_id)
        if msg_type == "auth":
            return Auth(self._require(fields, "token"), msg_id)
        if msg_type == "history":
            self._require(fields, "channel")
            return self._convert(fields, HistoryRequest, ("channel", "id", "limit", "reverse"))
        if msg_type == "file_chunk":
            return self._chunk(self._require(fields, "chunk"))
        if msg_type == "file_begin":
            for name in ("file_id", "name", "size", "sha256", "chunk_size"):
                self._require(fields, name)
            return self._convert(fields, FileBegin, ("file_id", "name", "size", "sha256", "chunk_size",
                                                     "channel", "id"))
        if msg_type == "file_end":
            return FileEnd(self._require(fields, "file_id"), msg_id)
        if msg_type in self._custom_types:
            return CustomMessage(msg_type, {"type": msg_type, **fields}, msg_id)
        raise UnknownType(f"unknown message type {msg_type!r}", id=msg_id)

    @staticmethod
    def _convert(fields: dict[str, Any], kind: type[Command], names: tuple[str, ...]) -> Any:
        """Build ``kind`` from TLV fields with the JSON path's validation
        (msgspec's limits, the same ``$.path`` in errors)."""
        values = {name: fields[name] for name in names if name in fields}
        if "since_offset" in fields or "since_epoch" in fields:
            values["since"] = {"offset": TlvCodec._require(fields, "since_offset"),
                               "epoch": TlvCodec._require(fields, "since_epoch")}
        try:
            return msgspec.convert(values, kind)
        except msgspec.ValidationError as exc:
            raise InvalidField(str(exc), id=fields.get("id")) from None

    @staticmethod
    def _chunk(record: bytes) -> FileChunk:
        """A ``chunk`` record: file id, index and count, then the bytes (kept as a view)."""
        if len(record) < _CHUNK_HEAD.size:
            raise InvalidField(f"TLV `chunk` must hold at least {_CHUNK_HEAD.size} bytes "
                               f"(file_id, index, count), got {len(record)}")
        file_id, index, count = _CHUNK_HEAD.unpack_from(record)
        return FileChunk(file_id.hex(), index, count, memoryview(record)[_CHUNK_HEAD.size:])

    @staticmethod
    def _require(fields: dict[str, Any], name: str) -> Any:
        try:
            return fields[name]
        except KeyError:
            raise InvalidField(f"missing required TLV field `{name}` "
                               f"(tag 0x{_TAG_BY_FIELD[name]:02x})", id=fields.get("id")) from None

    @staticmethod
    def _field_value(name: str, value: bytes) -> Any:
        if name == "data" or name == "chunk":
            return value
        size = _HEX_FIELDS.get(name)
        if size is not None:
            if len(value) != size:
                raise InvalidField(f"TLV `{name}` must be {size} bytes")
            return value.hex()
        if name == "have":
            if len(value) % _RANGE.size:
                raise InvalidField(f"TLV `have` must be a whole number of {_RANGE.size}-byte ranges")
            return [list(pair) for pair in _RANGE.iter_unpack(value)]
        if name in _U64_FIELDS:
            if len(value) != 8:
                raise InvalidField(f"TLV `{name}` must be 8 bytes")
            return _U64.unpack(value)[0]
        if name == "max_rate":
            if len(value) != 8:
                raise InvalidField("TLV `max_rate` must be 8 bytes (IEEE 754 double)")
            return _F64.unpack(value)[0]
        if name in _FLAG_FIELDS:
            if value not in (b"\x00", b"\x01"):
                raise InvalidField(f"TLV `{name}` must be one byte, 0 or 1")
            return value == b"\x01"
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidField(f"TLV `{name}` is not valid UTF-8") from None

    def encode(self, reply: Reply) -> bytes:
        records: list[tuple[int, bytes]] = [(Tag.TYPE, type(reply).__struct_config__.tag.encode())]
        self._add_fields(records, reply)
        return self._encode_records(records)

    def _add_fields(self, records: list[tuple[int, bytes]], obj: Any) -> None:
        """Append ``obj``'s fields as records; a position or a range becomes its two fields."""
        for name in obj.__struct_fields__:
            value = getattr(obj, name)
            if value is None:
                continue
            if isinstance(value, (StreamPosition, Range)):
                self._add_fields(records, value)
                continue
            if name in _HEX_FIELDS:
                value = bytes.fromhex(value)
            elif name == "have":
                value = b"".join(_RANGE.pack(first, last) for first, last in value)
            elif isinstance(value, msgspec.Raw):
                value = bytes(value)
            elif isinstance(value, bool):
                value = b"\x01" if value else b"\x00"
            elif isinstance(value, int):
                value = _U64.pack(value) if name in _U64_FIELDS else str(value).encode()
            elif isinstance(value, str):
                value = value.encode()
            records.append((_TAG_BY_FIELD[name], value))

    def encode_history(self, channel: str, position: StreamPosition, publications: list[Publication],
                       more: bool, msg_id: Id) -> bytes:
        """A ``history`` reply: each publication one nested ``publication``
        record (``offset``, ``data``, ``binary`` for a binary one, ``key``)."""
        records = [(Tag.TYPE, b"history"), (Tag.CHANNEL, channel.encode())]
        self._add_fields(records, position)
        for pub in publications:
            entry = [(Tag.OFFSET, _U64.pack(pub.offset)), (Tag.DATA, pub.data)]
            if pub.binary:
                entry.append((Tag.BINARY, b"\x01"))
            if pub.key is not None:
                entry.append((Tag.KEY, pub.key.encode()))
            records.append((Tag.PUBLICATION, self._encode_records(entry)))
        records.append((Tag.MORE, b"\x01" if more else b"\x00"))
        if msg_id is not None:
            records.append((Tag.ID, str(msg_id).encode()))
        return self._encode_records(records)

    def message_ends(self, channel: str, offset: int, data_bytes: int) -> tuple[bytes, bytes]:
        """What goes before and after a publication's data in its binary
        ``message``: the records before ``data``, then ``data``'s own tag and
        length (nothing after it)."""
        head = self._encode_records([(Tag.TYPE, _MESSAGE_TYPE), (Tag.CHANNEL, channel.encode()),
                                     (Tag.OFFSET, _U64.pack(offset))])
        return head + _DATA_HEADER.pack(Tag.DATA, data_bytes), b""

    def encode_message(self, channel: str, offset: int, data: bytes) -> bytes:
        """The payload of a binary ``message``; ``data`` is carried untouched."""
        head, tail = self.message_ends(channel, offset, len(data))
        return b"".join((head, data, tail))

    # -- the client's side: server messages in, client messages out --------------------

    def decode_fields(self, payload: bytes, max_records: int = 4096) -> dict[str, Any]:
        """A server message from a binary frame, as the dict its JSON twin
        decodes to (what ``wirehub.Client`` dispatches): ``data`` stays bytes,
        ``from``/``to`` keep their JSON names, the ``position`` and ``missed``
        of ``subscribed`` and the ``position`` of ``history`` are nested again,
        and a ``history``'s ``publication`` records become ``publications``
        (dicts of ``offset``, ``data`` as bytes, ``binary``, ``key``). ``id``
        is the text the server sent: TLV ids are strings.

        Raises:
            InvalidMessage: malformed TLV.
            InvalidField: an unknown or repeated tag, a value of the wrong size.
        """
        try:
            records = self._decode_records(payload, max_records)
        except ValueError as exc:
            raise InvalidMessage(f"malformed TLV: {exc}") from None
        fields: dict[str, Any] = {}
        publications = []
        for tag, value in records:
            if tag == Tag.PUBLICATION:
                publications.append(self.decode_fields(value))
                continue
            name = _FIELD_BY_TAG.get(tag)
            if name is None:
                raise InvalidField(f"unknown TLV tag 0x{tag:02x}")
            name = _JSON_NAMES.get(name, name)
            if name in fields:
                raise InvalidField(f"duplicate TLV tag 0x{tag:02x} ({name})")
            fields[name] = self._field_value(_TLV_NAMES.get(name, name), value)
        msg_type = fields.get("type")
        if msg_type in ("subscribed", "history") and "offset" in fields:
            fields["position"] = {"offset": fields.pop("offset"), "epoch": fields.pop("epoch", "")}
        if msg_type == "subscribed" and "from" in fields:
            fields["missed"] = {"from": fields.pop("from"), "to": fields.pop("to", None)}
        if msg_type == "history":
            fields["publications"] = publications
        return fields

    @staticmethod
    def encode_chunk(file_id: bytes, index: int, count: int, data: bytes | memoryview) -> bytes:
        """A ``file_chunk`` message, in one copy of ``data``: the ``type``
        record, then the ``chunk`` record in the seed's layout."""
        return b"".join((_CHUNK_TYPE_RECORD, _DATA_HEADER.pack(Tag.CHUNK, _CHUNK_HEAD.size + len(data)),
                         _CHUNK_HEAD.pack(file_id, index, count), data))

    def encode_fields(self, fields: dict[str, Any]) -> bytes:
        """A client message given as its JSON-style dict (``type``,
        ``channel``, ``data`` as bytes, ``id``, ``key``, ``idempotency_key``,
        ...) as TLV records; ``id`` goes as text. ``None`` values are left out.

        Raises:
            ValueError: a field TLV has no tag for.
        """
        records: list[tuple[int, bytes]] = []
        for name, value in fields.items():
            if value is None:
                continue
            tag = _TAG_BY_FIELD.get(_TLV_NAMES.get(name, name))
            if tag is None:
                raise ValueError(f"no TLV tag for the field {name!r}")
            if isinstance(value, str) and name in _HEX_FIELDS:
                encoded = bytes.fromhex(value)
            elif isinstance(value, (bytes, bytearray, memoryview)):
                encoded = bytes(value)
            elif isinstance(value, bool):
                encoded = b"\x01" if value else b"\x00"
            elif isinstance(value, int):
                encoded = _U64.pack(value) if _TLV_NAMES.get(name, name) in _U64_FIELDS else str(value).encode()
            elif isinstance(value, float):
                encoded = _F64.pack(value)
            else:
                encoded = str(value).encode()
            records.append((tag, encoded))
        return self._encode_records(records)


# The two fields whose TLV names (the Structs' attributes) differ from their JSON names.
_JSON_NAMES = {"first": "from", "last": "to"}
_TLV_NAMES = {json_name: name for name, json_name in _JSON_NAMES.items()}
