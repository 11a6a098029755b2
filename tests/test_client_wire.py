"""The client's wire layer (``wirehub.client_wire``) and what ``wirehub.Client``
gets from it: whole messages, RFC 6455 failures with the right close code,
permessage-deflate both ways, binary (TLV) publications.

A ``RawServer`` on loopback answers the upgrade by hand and writes its
frames in the same write as the 101, so the client sees the response and the
frames in one read (the read-ahead guard's client mode must still deliver
frame N before picows reacts to frame N+1). Each test runs on the compiled
and the pure hot path.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
import struct
import zlib
from typing import Any, Self

import pytest
import websockets
from helpers import client_frame, running_gateway
from picows import WSHandshakeError, WSMsgType

import wirehub
from wirehub import ChannelOptions, _speedups
from wirehub._pure.listener import _is_valid_close_code as pure_listener_rule
from wirehub.client import CLOSED, Client, ClientClosed, Message
from wirehub.client_wire import ClientWire, ExtensionRejected, connect
from wirehub.protocol.errors import is_valid_close_code
from wirehub.protocol.permessage_deflate import (
    CLIENT_OFFER,
    DeflateParams,
    NegotiationError,
    accept_response,
)

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
KEEP_ALL = [ChannelOptions(pattern="**", history_size=1000)]
TEXT, BINARY, CONT, CLOSE, PING, PONG = 0x1, 0x2, 0x0, 0x8, 0x9, 0xA


def frame(opcode: int, payload: bytes = b"", *, fin: bool = True, rsv: int = 0) -> bytes:
    """A server frame: unmasked."""
    return client_frame(opcode, payload, fin=fin, masked=False, rsv=rsv)


def close(code: int, reason: bytes = b"") -> bytes:
    return frame(CLOSE, struct.pack(">H", code) + reason)


def deflate(payload: bytes, window_bits: int = 15) -> bytes:
    """One message compressed on its own (RFC 7692 §7.2.1: sync flush, tail removed)."""
    compressor = zlib.compressobj(6, zlib.DEFLATED, -window_bits)
    data = compressor.compress(payload) + compressor.flush(zlib.Z_SYNC_FLUSH)
    assert data.endswith(b"\x00\x00\xff\xff")
    return data[:-4]


class RawServer:
    """One WebSocket server connection by hand: the 101 (with ``extensions``
    as its ``Sec-WebSocket-Extensions`` when given) and ``frames`` in one
    write; then it records the client's frames (unmasked) until the
    client's CLOSE, and closes the TCP connection."""

    def __init__(self, frames: list[bytes] = (), extensions: str | None = None, *,
                 refusal: bytes | None = None, trickle: bool = False) -> None:
        self.frames = list(frames)
        self.extensions = extensions
        self.refusal = refusal  # an HTTP response to answer with instead of the 101
        self.trickle = trickle  # write the 101 and the frames but the last a byte at a time
        self.request = ""
        self.received: asyncio.Queue[tuple[int, bool, bytes]] = asyncio.Queue()
        self.close_code: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        self.writer: asyncio.StreamWriter | None = None
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._server.close()
        if self.writer is not None:
            self.writer.close()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        head = await reader.readuntil(b"\r\n\r\n")
        self.request = head.decode("latin-1")
        key = re.search(r"(?im)^Sec-WebSocket-Key: *(\S+)", self.request).group(1)
        accept = base64.b64encode(hashlib.sha1(key.encode() + GUID).digest()).decode()
        extra = f"Sec-WebSocket-Extensions: {self.extensions}\r\n" if self.extensions is not None else ""
        data = self.refusal or (f"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                                f"Sec-WebSocket-Accept: {accept}\r\n{extra}\r\n".encode() + b"".join(self.frames))
        if self.trickle:  # all but the last frame a byte at a time, then the last one
            last = len(self.frames[-1])
            for i in range(len(data) - last):
                writer.write(data[i:i + 1])
                await writer.drain()
                await asyncio.sleep(0.001)
            data = data[-last:]
        writer.write(data)
        try:
            while True:
                b0, b1 = await reader.readexactly(2)
                assert b1 & 0x80, "a client frame must be masked"
                n = b1 & 0x7F
                if n == 126:
                    n = struct.unpack(">H", await reader.readexactly(2))[0]
                elif n == 127:
                    n = struct.unpack(">Q", await reader.readexactly(8))[0]
                mask = await reader.readexactly(4)
                payload = bytes(b ^ mask[i % 4] for i, b in enumerate(await reader.readexactly(n)))
                opcode = b0 & 0x0F
                self.received.put_nowait((opcode, bool(b0 & 0x40), payload))
                if opcode == CLOSE:
                    self.close_code.set_result(struct.unpack(">H", payload[:2])[0] if payload else None)
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            if not self.close_code.done():
                self.close_code.set_result(None)
        writer.close()

    def send(self, data: bytes) -> None:
        self.writer.write(data)


class Recorder(ClientWire):
    """Keep every message."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.messages: list[tuple[int, bytes]] = []

    def on_message(self, opcode: int, payload: bytes) -> None:
        self.messages.append((opcode, payload))


async def session(server: RawServer, impl_name: str, **options: Any) -> Recorder:
    """Connect a Recorder to ``server`` and wait until the connection ends."""
    _, wire = await connect(server.url, Recorder, impl=_speedups.load(impl_name), **options)
    await asyncio.wait_for(asyncio.shield(wire.closed), 10)
    return wire


# -- messages --------------------------------------------------------------------------------


async def test_fragmented_text_and_binary_arrive_whole_between_pings(impl_name):
    async with RawServer([
        frame(TEXT, b"frag", fin=False), frame(PING, b"ping!"), frame(CONT, b"ment", fin=False),
        frame(CONT, "é!".encode()),
        frame(BINARY, b"\x00", fin=False), frame(CONT, b"", fin=False), frame(CONT, b"\xff"),
        frame(TEXT, b""),
        close(1000),
    ]) as server:
        wire = await session(server, impl_name)
        assert wire.messages == [(TEXT, "fragmenté!".encode()), (BINARY, b"\x00\xff"), (TEXT, b"")]
        assert await server.received.get() == (PONG, False, b"ping!")   # answered mid-message
        assert await server.close_code == 1000                           # the CLOSE echoed
        assert (wire.close_code, wire.failed) == (1000, False)


@pytest.mark.parametrize("frames, code", [
    ([frame(TEXT, b"ok \xf4\x90\x80\x80")], 1007),                                 # > U+10FFFF
    ([frame(TEXT, b"\xce\xba\xe1", fin=False)] + [frame(CONT, b"\xbd\xb9\xed\xa0\x80")], 1007),
    ([frame(TEXT, "☃".encode()[:2])], 1007),                                       # cut at the end
    ([frame(CONT, b"orphan")], 1002),                                              # nothing to continue
    ([frame(TEXT, b"a", fin=False), frame(BINARY, b"b")], 1002),                   # a new message mid-way
    ([frame(TEXT, b"x", rsv=4)], 1002),                                            # RSV1 without deflate
    ([frame(BINARY, b"x", rsv=2)], 1002),                                          # RSV2
    ([frame(PING, b"", rsv=1)], 1002),                                             # RSV3 on a control frame
    ([frame(0x3, b"reserved")], 1002),                                             # reserved opcode (picows)
    ([close(1005)], 1002), ([close(999)], 1002), ([close(5000)], 1002),            # forbidden close codes
    ([frame(CLOSE, b"\x03\xe8\xff")], 1007),                                       # reason not UTF-8 (picows)
])
async def test_violations_close_with_the_right_code(impl_name, frames, code):
    async with RawServer(frames) as server:
        wire = await session(server, impl_name)
        assert await server.close_code == code
        assert wire.close_code == code and wire.failed
        assert wire.messages == []


async def test_invalid_utf8_fails_fast_before_the_message_ends(impl_name):
    async with RawServer([frame(TEXT, b"fine so far, then \xc0\xaf", fin=False)]) as server:
        wire = await session(server, impl_name)            # no more frames: it must not wait for them
        assert await server.close_code == 1007 and wire.close_code == 1007


async def test_messages_over_max_message_bytes_close_1009(impl_name):
    for frames in ([frame(BINARY, b"x" * 1001)],                                  # one frame
                   [frame(TEXT, b"x" * 600, fin=False), frame(CONT, b"x" * 600)]):  # fragments
        async with RawServer([frame(TEXT, b"x" * 1000), *frames]) as server:
            wire = await session(server, impl_name, max_message_bytes=1000)
            assert wire.messages == [(TEXT, b"x" * 1000)]                          # the limit itself passes
            assert await server.close_code == 1009 and wire.close_code == 1009
    async with RawServer([frame(TEXT, deflate(b" " * 5000), rsv=4)], extensions="permessage-deflate") as server:
        wire = await session(server, impl_name, max_message_bytes=1000)
        assert await server.close_code == 1009 and wire.close_code == 1009  # inflating stops at the limit


async def test_the_message_before_a_refused_frame_is_delivered_and_answered_first(impl_name):
    """Two CLOSEs and a reserved opcode, each after a message, all in the read
    that brings the 101: picows reads one frame ahead, the guard splits."""
    async with RawServer([frame(TEXT, b"hi"), close(1000), close(1001)]) as server:
        wire = await session(server, impl_name)
        assert wire.messages == [(TEXT, b"hi")]
        assert await server.close_code == 1000 and wire.close_code == 1000   # Autobahn 7.1.2
    async with RawServer([frame(TEXT, b"hi"), frame(0xB, b"")]) as server:
        wire = await session(server, impl_name)
        assert wire.messages == [(TEXT, b"hi")]
        assert await server.close_code == 1002                               # Autobahn 4.2.3


async def test_the_101_and_frames_a_byte_at_a_time(impl_name):
    async with RawServer([frame(TEXT, b"a" * 200), frame(BINARY, b"b" * 300, fin=False), frame(CONT, b"c"),
                          close(1000) + close(1001)], trickle=True) as server:
        wire = await session(server, impl_name)
        assert wire.messages == [(TEXT, b"a" * 200), (BINARY, b"b" * 300 + b"c")]
        assert await server.close_code == 1000 and wire.close_code == 1000


async def test_a_refused_upgrade_keeps_its_body(impl_name):
    """The guard hands picows a refusal whole: its body is the error's."""
    refusal = b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 13\r\n\r\ninvalid_token"
    async with RawServer(refusal=refusal) as server:
        with pytest.raises(WSHandshakeError) as refused:
            await connect(server.url, Recorder, impl=_speedups.load(impl_name))
        assert refused.value.response.status == 401 and refused.value.raw_body == b"invalid_token"


@pytest.mark.parametrize("payload, answer", [(b"", 1000), (struct.pack(">H", 3000) + b"done", 3000)])
async def test_a_close_is_echoed(impl_name, payload, answer):
    async with RawServer([frame(CLOSE, payload)]) as server:
        wire = await session(server, impl_name)
        assert await server.close_code == answer
        assert wire.close_code == (1005 if not payload else 3000) and not wire.failed


def test_the_close_code_rule_is_the_gateways():
    assert [c for c in range(70000) if is_valid_close_code(c) != pure_listener_rule(c)] == []


# -- permessage-deflate ------------------------------------------------------------------------


@pytest.mark.parametrize("answer, params", [
    ([], None),
    (["permessage-deflate"], DeflateParams(False, False, 15, 15)),
    (["permessage-deflate; server_no_context_takeover; server_max_window_bits=10"],
     DeflateParams(True, False, 10, 15)),
    (["Permessage-Deflate; client_max_window_bits=9;client_no_context_takeover"],
     DeflateParams(False, True, 15, 9)),
    (['permessage-deflate; client_max_window_bits="8"'], DeflateParams(False, False, 15, 8)),
])
def test_acceptable_answers(answer, params):
    assert accept_response(answer) == params


@pytest.mark.parametrize("answer", [
    "x-webkit-deflate-frame", "permessage-deflate, permessage-deflate", "permessage-deflate; foo",
    "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
    "permessage-deflate; client_no_context_takeover=1", "permessage-deflate; server_max_window_bits",
    "permessage-deflate; server_max_window_bits=16", "permessage-deflate; client_max_window_bits=08",
    "permessage-deflate; client_max_window_bits=7", "permessage-deflate;;",
])
def test_unacceptable_answers(answer):
    with pytest.raises(NegotiationError):
        accept_response([answer])


def test_an_answer_without_an_offer_is_unacceptable():
    assert accept_response([], offered=False) is None
    with pytest.raises(NegotiationError):
        accept_response(["permessage-deflate"], offered=False)


async def test_the_offer_and_a_bad_answer_fail_the_connection(impl_name):
    async with RawServer([], extensions="permessage-deflate; server_max_window_bits=16") as server:
        with pytest.raises(ExtensionRejected, match="server_max_window_bits=16"):
            await connect(server.url, Recorder, impl=_speedups.load(impl_name))
        assert f"Sec-WebSocket-Extensions: {CLIENT_OFFER}\r\n" in server.request
    async with RawServer([], extensions="permessage-deflate") as server:
        with pytest.raises(ExtensionRejected):
            await connect(server.url, Recorder, compression=False, impl=_speedups.load(impl_name))
        assert "Sec-WebSocket-Extensions" not in server.request


async def test_compressed_messages_inflate_under_the_servers_window_and_context_rules(impl_name):
    text = b"wirehub " * 400
    async with RawServer([frame(TEXT, deflate(text, 10), rsv=4),
                          # fragmented, and compressed afresh (no context takeover)
                          frame(BINARY, deflate(text, 10)[:7], fin=False, rsv=4),
                          frame(CONT, deflate(text, 10)[7:]),
                          frame(TEXT, b"plain"), close(1000)],
                         extensions="permessage-deflate; server_no_context_takeover; server_max_window_bits=10",
                         ) as server:
        wire = await session(server, impl_name)
        assert wire.messages == [(TEXT, text), (BINARY, text), (TEXT, b"plain")]
    # With context takeover the second message is a reference to the first.
    text = " ".join(str(n) for n in range(1000)).encode()
    compressor = zlib.compressobj(6, zlib.DEFLATED, -15)
    first, second = (compressor.compress(text) + compressor.flush(zlib.Z_SYNC_FLUSH) for _ in range(2))
    assert len(second) < 100 < len(first)
    async with RawServer([frame(TEXT, first[:-4], rsv=4), frame(TEXT, second[:-4], rsv=4), close(1000)],
                         extensions="permessage-deflate") as server:
        wire = await session(server, impl_name)
        assert wire.messages == [(TEXT, text), (TEXT, text)]


@pytest.mark.parametrize("answer, window_bits, compressed", [
    ("permessage-deflate; client_max_window_bits=9; client_no_context_takeover", 9, True),
    ("permessage-deflate; client_max_window_bits=8", 8, False),   # zlib cannot: sent uncompressed
])
async def test_sending_compresses_within_the_allowed_window(impl_name, answer, window_bits, compressed):
    big = bytes(range(256)) * 20
    async with RawServer([], extensions=answer) as server:
        transport, wire = await connect(server.url, Recorder, impl=_speedups.load(impl_name))
        for _ in range(2):
            wire.send(WSMsgType.BINARY, big)
        wire.send(WSMsgType.TEXT, b"small")                        # under the threshold: never compressed
        got = [await asyncio.wait_for(server.received.get(), 5) for _ in range(3)]
        assert got[2] == (TEXT, False, b"small")
        for opcode, rsv1, payload in got[:2]:
            assert (opcode, rsv1) == (BINARY, compressed)
            if compressed:  # each one on its own, with a 512-byte window
                payload = zlib.decompressobj(-window_bits).decompress(payload + b"\x00\x00\xff\xff")
            assert payload == big
        wire.close()
        assert await server.close_code == 1000
        transport.disconnect()


# -- wirehub.Client ------------------------------------------------------------------------------


def url(gw: wirehub.Gateway) -> str:
    return f"ws://127.0.0.1:{gw.port}/ws"


async def take(sub: wirehub.client.Subscription, n: int) -> list[Message]:
    return [await asyncio.wait_for(sub.__anext__(), 10) for _ in range(n)]


async def test_compressed_messages_both_ways_arrive_intact(impl_name):
    big = {"text": "wirehub " * 1000, "n": list(range(200))}
    blob = bytes(range(256)) * 64
    async with running_gateway(impl_name, channels=KEEP_ALL) as gw, \
            wirehub.connect(url(gw), implementation=impl_name) as client:
        assert client._wire.deflate is not None                   # negotiated with the gateway
        sub = await client.subscribe("c")
        gw.publish("c", big)                                      # the gateway compresses >= 1024 bytes
        await client.publish("c", big)                            # and so does the client
        await client.publish("c", blob)
        assert await take(sub, 3) == [Message("c", 1, big), Message("c", 2, big), Message("c", 3, blob)]


async def test_compression_off_offers_nothing(impl_name):
    async with running_gateway(impl_name, channels=KEEP_ALL) as gw, \
            wirehub.connect(url(gw), compression=False, implementation=impl_name) as client:
        assert client._wire.deflate is None
        sub = await client.subscribe("c")
        gw.publish("c", "x" * 5000)
        assert (await take(sub, 1))[0].data == "x" * 5000


async def test_a_binary_publish_reaches_another_client_byte_for_byte(impl_name):
    data = bytes(range(256)) + b"\x00\xff" * 10
    async with running_gateway(impl_name, channels=KEEP_ALL) as gw, \
            wirehub.connect(url(gw), implementation=impl_name) as publisher, \
            wirehub.connect(url(gw), implementation=impl_name) as subscriber:
        sub = await subscriber.subscribe("bin")
        position = await publisher.publish("bin", data)           # a TLV publish: its answer has a text id
        assert position.offset == 1 and position.epoch
        assert (await publisher.publish("bin", bytearray(b"ba"))).offset == 2
        assert (await publisher.publish("bin", memoryview(b"mv"))).offset == 3
        assert await take(sub, 3) == [Message("bin", 1, data), Message("bin", 2, b"ba"), Message("bin", 3, b"mv")]
        assert (await publisher.publish("bin", {"json": True})).offset == 4   # not bytes: JSON
        assert (await take(sub, 1))[0].data == {"json": True}


async def test_a_binary_publish_from_another_library_arrives_as_bytes(impl_name):
    def record(tag: int, value: bytes) -> bytes:
        return struct.pack(">BI", tag, len(value)) + value

    async with running_gateway(impl_name, channels=KEEP_ALL) as gw, \
            wirehub.connect(url(gw), implementation=impl_name) as client:
        sub = await client.subscribe("t")
        async with websockets.connect(url(gw)) as ws:
            await ws.recv()                                          # welcome
            await ws.send(record(0x01, b"publish") + record(0x02, b"t") + record(0x03, b"\x00\xff")
                          + record(0x04, b"7"))
            assert b"published" in await ws.recv()
        assert await take(sub, 1) == [Message("t", 1, b"\x00\xff")]


async def test_bad_data_from_the_server_fails_the_client_for_good(impl_name):
    welcome = frame(TEXT, b'{"type":"welcome","client_id":"c1","server":"raw"}')
    async with RawServer([welcome]) as server:
        client = Client(server.url, implementation=impl_name, reconnect_interval_s=0.01)
        await client.start()
        subscribing = asyncio.ensure_future(client.subscribe("c"))
        opcode, _, request = await asyncio.wait_for(server.received.get(), 5)
        assert opcode == TEXT and b'"subscribe"' in request
        server.send(frame(TEXT, b'{"type":"subscribed","channel":"c\xff"}'))
        with pytest.raises(ClientClosed, match="the client failed the connection: 1007 text message is not valid"):
            await subscribing
        assert (client.state, client.close_code) == (CLOSED, 1007) and await server.close_code == 1007


async def test_an_unacceptable_extension_answer_is_terminal(impl_name):
    async with RawServer([], extensions="permessage-deflate; foo") as server:
        client = Client(server.url, implementation=impl_name, reconnect_interval_s=0.01)
        with pytest.raises(ClientClosed, match="permessage-deflate answer is not acceptable"):
            await client.start()
        assert client.state == CLOSED


async def test_publications_reach_their_subscription_in_order_by_either_path(impl_name):
    # Whole plain publications go from the frame path to the subscription;
    # a compressed or fragmented one, or one for a channel not subscribed,
    # through on_message: the order is the frames' either way.
    welcome = frame(TEXT, b'{"type":"welcome","client_id":"c1","server":"raw"}')
    async with RawServer([welcome], extensions="permessage-deflate; server_no_context_takeover") as server:
        client = Client(server.url, implementation=impl_name)
        await client.start()
        subscribing = asyncio.ensure_future(client.subscribe("c"))
        _, _, request = await asyncio.wait_for(server.received.get(), 5)
        assert b'"subscribe"' in request
        server.send(frame(TEXT, b'{"type":"subscribed","channel":"c","position":{"offset":0,"epoch":"e"},"id":1}'))
        sub = await subscribing

        def publication(channel: bytes, offset: int, data: bytes) -> bytes:
            return b'{"type":"message","channel":"%s","offset":%d,"data":%s}' % (channel, offset, data)

        big = b'"' + b"x" * 2000 + b'"'
        server.send(frame(TEXT, publication(b"c", 1, b"1"))
                    + frame(TEXT, publication(b"other", 1, b"0"))
                    + frame(TEXT, deflate(publication(b"c", 2, big)), rsv=4)
                    + frame(TEXT, publication(b"c", 3, b"[3]")[:10], fin=False)
                    + frame(CONT, publication(b"c", 3, b"[3]")[10:])
                    + frame(TEXT, publication(b"c", 4, b'{"four":4}')))
        assert await take(sub, 4) == [Message("c", 1, 1), Message("c", 2, "x" * 2000), Message("c", 3, [3]),
                                      Message("c", 4, {"four": 4})]
        assert sub.position == wirehub.StreamPosition(4, "e")
        await client.close()
