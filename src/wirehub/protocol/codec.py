"""Two codecs for one model: JSON on text frames, TLV on binary frames.

Both decode to the Structs in ``messages`` and raise the ``WirehubError``
subclasses from ``errors`` for bad input, so the connection answers a bad
JSON message and a bad TLV message the same way.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable, Container
from types import SimpleNamespace
from typing import Any

import msgspec

from .errors import InvalidField, InvalidMessage, UnknownType
from .messages import (Auth, ClientMessage, Command, CustomMessage, Id, Message, Ping, Publish,
                       Reply, Subscribe, Unsubscribe)

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
            if msg_type in self._custom_types:
                return CustomMessage(msg_type, obj, msg_id)
            raise UnknownType(f"unknown message type {msg_type!r}", id=msg_id)
        raise InvalidField(reason, id=msg_id)

    def encode_message(self, channel: str, offset: int, data: bytes) -> bytes:
        """The payload of a ``message`` for a JSON publication (``data`` is raw JSON)."""
        return self._encoder.encode(Message(channel, offset, msgspec.Raw(data)))


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


_FIELD_BY_TAG = {
    Tag.TYPE: "type", Tag.CHANNEL: "channel", Tag.DATA: "data", Tag.ID: "id",
    Tag.OFFSET: "offset", Tag.EXCLUDE_SELF: "exclude_self", Tag.CODE: "code",
    Tag.ERROR: "error", Tag.CLIENT_ID: "client_id", Tag.SERVER: "server",
    Tag.TOKEN: "token", Tag.SUB: "sub", Tag.EXP: "exp", Tag.REASON: "reason",
    Tag.TAIL: "tail",
}
_U64_FIELDS = frozenset({"offset", "exp", "tail"})
_TAG_BY_FIELD = {name: tag for tag, name in _FIELD_BY_TAG.items()}
_U64 = struct.Struct(">Q")
_MESSAGE_TYPE = b"message"


class TlvCodec:
    """TLV records on binary frames; values are UTF-8 text except ``data``,
    ``offset`` and ``exp`` (u64 big-endian) and ``exclude_self`` (one byte)."""

    def __init__(self, tlv: SimpleNamespace, custom_types: Container[str] = ()) -> None:
        self._decode_records: Callable[[bytes], list[tuple[int, bytes]]] = tlv.decode
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
            return Publish(self._require(fields, "channel"), msgspec.Raw(self._require(fields, "data")),
                           msg_id, fields.get("exclude_self", False))
        if msg_type == "subscribe":
            return Subscribe(self._require(fields, "channel"), msg_id, fields.get("tail"))
        if msg_type == "unsubscribe":
            return Unsubscribe(self._require(fields, "channel"), msg_id)
        if msg_type == "ping":
            return Ping(msg_id)
        if msg_type == "auth":
            return Auth(self._require(fields, "token"), msg_id)
        if msg_type in self._custom_types:
            return CustomMessage(msg_type, {"type": msg_type, **fields}, msg_id)
        raise UnknownType(f"unknown message type {msg_type!r}", id=msg_id)

    @staticmethod
    def _require(fields: dict[str, Any], name: str) -> Any:
        try:
            return fields[name]
        except KeyError:
            raise InvalidField(f"missing required TLV field `{name}` "
                               f"(tag 0x{_TAG_BY_FIELD[name]:02x})", id=fields.get("id")) from None

    @staticmethod
    def _field_value(name: str, value: bytes) -> Any:
        if name == "data":
            return value
        if name in _U64_FIELDS:
            if len(value) != 8:
                raise InvalidField(f"TLV `{name}` must be 8 bytes")
            return _U64.unpack(value)[0]
        if name == "exclude_self":
            if value not in (b"\x00", b"\x01"):
                raise InvalidField("TLV `exclude_self` must be one byte, 0 or 1")
            return value == b"\x01"
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidField(f"TLV `{name}` is not valid UTF-8") from None

    def encode(self, reply: Reply) -> bytes:
        records: list[tuple[int, bytes]] = [(Tag.TYPE, type(reply).__struct_config__.tag.encode())]
        for name in reply.__struct_fields__:
            value = getattr(reply, name)
            if value is None:
                continue
            if isinstance(value, msgspec.Raw):
                value = bytes(value)
            elif isinstance(value, bool):
                value = b"\x01" if value else b"\x00"
            elif isinstance(value, int):
                value = _U64.pack(value) if name in _U64_FIELDS else str(value).encode()
            elif isinstance(value, str):
                value = value.encode()
            records.append((_TAG_BY_FIELD[name], value))
        return self._encode_records(records)

    def encode_message(self, channel: str, offset: int, data: bytes) -> bytes:
        """The payload of a binary ``message``; ``data`` is carried untouched."""
        return self._encode_records([(Tag.TYPE, _MESSAGE_TYPE), (Tag.CHANNEL, channel.encode()),
                                     (Tag.OFFSET, _U64.pack(offset)), (Tag.DATA, data)])
