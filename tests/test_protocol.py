"""The message model and its two codecs, without sockets."""

from __future__ import annotations

import struct
from pathlib import Path

import msgspec
import pytest

from wirehub import _speedups
from wirehub.protocol.codec import JsonCodec, Tag, TlvCodec
from wirehub.protocol.errors import ErrorCode, InvalidField, InvalidMessage, UnknownType, WirehubError
from wirehub.protocol.messages import (CustomMessage, Error, HistoryRequest, Lagged, Ping, Publish, Published,
                                       Range, StreamPosition, Subscribe, Subscribed, Unsubscribe, Welcome)

TLV = _speedups.load("ext").tlv


def tlv(*records: tuple[int, bytes]) -> bytes:
    return TLV.encode(records)


@pytest.fixture(params=["json", "tlv"])
def codec(request):
    return JsonCodec({"whoami"}) if request.param == "json" else TlvCodec(TLV, {"whoami"})


def as_wire(codec, msg: dict) -> bytes:
    """Express one client message in the codec's own format."""
    if isinstance(codec, JsonCodec):
        return msgspec.json.encode(msg)
    records = []
    for name, value in msg.items():
        tag = {"type": Tag.TYPE, "channel": Tag.CHANNEL, "data": Tag.DATA, "id": Tag.ID,
               "exclude_self": Tag.EXCLUDE_SELF}[name]
        if name == "exclude_self":
            value = b"\x01" if value else b"\x00"
        elif name == "data":
            value = value if isinstance(value, bytes) else msgspec.json.encode(value)
        else:
            value = str(value).encode()
        records.append((tag, value))
    return TLV.encode(records)


class TestDecode:
    def test_subscribe(self, codec):
        msg = codec.decode(as_wire(codec, {"type": "subscribe", "channel": "a.b", "id": "7"}))
        assert msg == Subscribe("a.b", "7")

    def test_unsubscribe_and_ping(self, codec):
        assert codec.decode(as_wire(codec, {"type": "unsubscribe", "channel": "a"})) == Unsubscribe("a")
        assert codec.decode(as_wire(codec, {"type": "ping"})) == Ping()

    def test_publish_keeps_data_raw(self, codec):
        msg = codec.decode(as_wire(codec, {"type": "publish", "channel": "c", "data": {"k": [1, 2]},
                                           "exclude_self": True}))
        assert isinstance(msg, Publish) and msg.exclude_self
        assert bytes(msg.data) == b'{"k":[1,2]}'

    def test_custom_type(self, codec):
        msg = codec.decode(as_wire(codec, {"type": "whoami", "id": "1"}))
        assert isinstance(msg, CustomMessage) and msg.type == "whoami" and msg.id == "1"

    def test_unknown_type(self, codec):
        with pytest.raises(UnknownType, match="unknown message type 'nope'"):
            codec.decode(as_wire(codec, {"type": "nope"}))

    def test_missing_type(self, codec):
        with pytest.raises(UnknownType, match="missing `type`"):
            codec.decode(as_wire(codec, {"channel": "x"}))


class TestJsonErrors:
    codec = JsonCodec()

    @pytest.mark.parametrize("payload, error_type, text", [
        (b"{nope", InvalidMessage, "invalid JSON: JSON is malformed: object keys must be strings (byte 1)"),
        (b"[1, 2]", InvalidMessage, "expected a JSON object"),
        (b'"str"', InvalidMessage, "expected a JSON object"),
        (b"[" * 5000, InvalidMessage, "invalid JSON: nested too deeply"),
        (b'{"type":"custom","x":' + b"{\"a\":" * 5000 + b"1" + b"}" * 5001, InvalidMessage,
         "invalid JSON: nested too deeply"),
        (b'{"type": 5}', UnknownType, "`type` must be a string"),
        (b'{"type":"subscribe","channel":42}', InvalidField, "Expected `str`, got `int` - at `$.channel`"),
        (b'{"type":"subscribe"}', InvalidField, "Object missing required field `channel`"),
        (b'{"type":"publish","channel":"c"}', InvalidField, "Object missing required field `data`"),
        (b'{"type":"publish","channel":"c","data":1,"exclude_self":"yes"}', InvalidField,
         "Expected `bool`, got `str` - at `$.exclude_self`"),
    ])
    def test_exact_errors(self, payload, error_type, text):
        with pytest.raises(error_type) as exc:
            self.codec.decode(payload)
        assert exc.value.message == text

    def test_error_carries_the_id_of_an_invalid_message(self):
        with pytest.raises(InvalidField) as exc:
            self.codec.decode(b'{"type":"subscribe","channel":1,"id":"req-9"}')
        assert exc.value.id == "req-9"

    def test_unknown_fields_are_ignored(self):
        assert self.codec.decode(b'{"type":"ping","future_field":1}') == Ping()


class TestTlvErrors:
    codec = TlvCodec(TLV)

    @pytest.mark.parametrize("payload, error_type, text", [
        (b"\x01\x00", InvalidMessage, "malformed TLV: truncated TLV header at byte 0"),
        (tlv((Tag.TYPE, b"ping"), (0x7F, b"")), InvalidField, "unknown TLV tag 0x7f"),
        (tlv((Tag.TYPE, b"ping"), (Tag.TYPE, b"ping")), InvalidField, "duplicate TLV tag 0x01 (type)"),
        (tlv((Tag.TYPE, b"subscribe")), InvalidField, "missing required TLV field `channel` (tag 0x02)"),
        (tlv((Tag.TYPE, b"subscribe"), (Tag.CHANNEL, b"\xff")), InvalidField, "TLV `channel` is not valid UTF-8"),
        (tlv((Tag.TYPE, b"publish"), (Tag.CHANNEL, b"c"), (Tag.DATA, b""), (Tag.EXCLUDE_SELF, b"\x02")),
         InvalidField, "TLV `exclude_self` must be one byte, 0 or 1"),
    ])
    def test_exact_errors(self, payload, error_type, text):
        with pytest.raises(error_type) as exc:
            self.codec.decode(payload)
        assert exc.value.message == text


class TestEncode:
    def test_json_replies_omit_absent_ids(self):
        codec = JsonCodec()
        assert codec.encode(Welcome("c1", "wirehub/0")) == b'{"type":"welcome","client_id":"c1","server":"wirehub/0"}'
        assert codec.encode(Error("invalid_field", "bad")) == b'{"type":"error","code":"invalid_field","error":"bad"}'
        assert codec.encode(Published("c", 3, 9, "e1")) == \
            b'{"type":"published","channel":"c","offset":3,"id":9,"epoch":"e1"}'

    def test_json_message_embeds_data_verbatim(self):
        payload = JsonCodec().encode_message("c", 12, b'{"a": 1 }')
        assert payload == b'{"type":"message","channel":"c","offset":12,"data":{"a": 1 }}'

    def test_tlv_message_golden_bytes(self):
        payload = TlvCodec(TLV).encode_message("t", 1, b"\x00\xff")
        assert payload == (b"\x01\x00\x00\x00\x07message" b"\x02\x00\x00\x00\x01t"
                           b"\x05\x00\x00\x00\x08" + struct.pack(">Q", 1) + b"\x03\x00\x00\x00\x02\x00\xff")

    def test_tlv_reply_round_trips_through_records(self):
        payload = TlvCodec(TLV).encode(Error(ErrorCode.RATE_LIMITED, "slow down", "x"))
        assert TLV.decode(payload) == [(Tag.TYPE, b"error"), (Tag.CODE, b"rate_limited"),
                                       (Tag.ERROR, b"slow down"), (Tag.ID, b"x")]


def test_every_error_has_a_documented_code():
    with open(Path(__file__).resolve().parent.parent / "docs" / "protocol.md") as f:
        doc = f.read()
    for cls in WirehubError.__subclasses__():
        assert f"`{cls.code}`" in doc, cls


class TestDeliveryFields:
    """``since``, ``max_rate``, ``key``, ``history`` and the replies that carry positions, both codecs."""

    def test_tlv_subscribe_with_since_and_max_rate(self):
        payload = tlv((Tag.TYPE, b"subscribe"), (Tag.CHANNEL, b"c"), (Tag.SINCE_OFFSET, struct.pack(">Q", 7)),
                      (Tag.SINCE_EPOCH, b"e1"), (Tag.MAX_RATE, struct.pack(">d", 2.5)), (Tag.ID, b"9"))
        assert TlvCodec(TLV).decode(payload) == Subscribe("c", "9", None, StreamPosition(7, "e1"), 2.5)

    def test_json_and_tlv_history_requests_agree(self):
        json_msg = JsonCodec().decode(b'{"type":"history","channel":"c","since":{"offset":3,"epoch":"e"},'
                                      b'"limit":5,"reverse":true}')
        tlv_msg = TlvCodec(TLV).decode(tlv((Tag.TYPE, b"history"), (Tag.CHANNEL, b"c"),
                                           (Tag.SINCE_OFFSET, struct.pack(">Q", 3)), (Tag.SINCE_EPOCH, b"e"),
                                           (Tag.LIMIT, struct.pack(">Q", 5)), (Tag.REVERSE, b"\x01")))
        assert json_msg == tlv_msg == HistoryRequest("c", None, StreamPosition(3, "e"), 5, True)

    @pytest.mark.parametrize("records, text", [
        (((Tag.TYPE, b"subscribe"), (Tag.CHANNEL, b"c"), (Tag.SINCE_OFFSET, struct.pack(">Q", 7))),
         "missing required TLV field `since_epoch` (tag 0x32)"),
        (((Tag.TYPE, b"history"), (Tag.CHANNEL, b"c"), (Tag.LIMIT, struct.pack(">Q", 1001))),
         "Expected `int` <= 1000 - at `$.limit`"),
        (((Tag.TYPE, b"subscribe"), (Tag.CHANNEL, b"c"), (Tag.MAX_RATE, struct.pack(">d", -1.0))),
         "Expected `float` > 0.0 - at `$.max_rate`"),
        (((Tag.TYPE, b"subscribe"), (Tag.CHANNEL, b"c"), (Tag.MAX_RATE, b"\x01")),
         "TLV `max_rate` must be 8 bytes (IEEE 754 double)"),
        (((Tag.TYPE, b"publish"), (Tag.CHANNEL, b"c"), (Tag.DATA, b""), (Tag.KEY, b"k" * 256)),
         "TLV `key` must be at most 255 characters"),
    ])
    def test_tlv_errors_name_the_field(self, records, text):
        with pytest.raises(InvalidField) as exc:
            TlvCodec(TLV).decode(tlv(*records))
        assert exc.value.message == text

    def test_json_replies(self):
        codec = JsonCodec()
        assert codec.encode(Subscribed("c", 1, StreamPosition(5, "e"), False, "history_trimmed", Range(2, 3))) == (
            b'{"type":"subscribed","channel":"c","id":1,"position":{"offset":5,"epoch":"e"},'
            b'"recovered":false,"reason":"history_trimmed","missed":{"from":2,"to":3}}')
        assert codec.encode(Lagged("c", 3, 4, 6)) == b'{"type":"lagged","channel":"c","dropped":3,"from":4,"to":6}'

    def test_tlv_replies_flatten_positions_and_ranges(self):
        payload = TlvCodec(TLV).encode(Subscribed("c", None, StreamPosition(5, "e"), False, "history_trimmed",
                                                  Range(2, 3)))
        assert TLV.decode(payload) == [
            (Tag.TYPE, b"subscribed"), (Tag.CHANNEL, b"c"), (Tag.OFFSET, struct.pack(">Q", 5)), (Tag.EPOCH, b"e"),
            (Tag.RECOVERED, b"\x00"), (Tag.REASON, b"history_trimmed"), (Tag.FROM, struct.pack(">Q", 2)),
            (Tag.TO, struct.pack(">Q", 3))]
