"""permessage-deflate end to end: negotiation, compressed receive path,
encode-once compressed fan-out, per-connection compressors, bomb limits."""

from __future__ import annotations

import json
import zlib

import pytest

from helpers import RawClient, client_frame, json_client, running_gateway

OFFER = "permessage-deflate; client_max_window_bits"
TAIL = b"\x00\x00\xff\xff"


def deflate_message(data: bytes) -> bytes:
    """Compress one message the way a client without context takeover does (RFC 7692 §7.2.1)."""
    compressor = zlib.compressobj(wbits=-15)
    out = compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH)
    assert out.endswith(TAIL)
    return out[:-4]


def inflate_message(data: bytes) -> bytes:
    return zlib.decompressobj(wbits=-15).decompress(data + TAIL)


async def connect(gw, path="/ws", extensions=OFFER) -> RawClient:
    client = await RawClient.connect(gw.port, path, extensions)
    assert client.handshake.startswith("HTTP/1.1 101"), client.handshake
    opcode, welcome = await client.frame()
    assert json.loads(welcome)["type"] == "welcome"
    return client


async def send_json(client: RawClient, msg: dict, *, compress: bool = False) -> None:
    data = json.dumps(msg).encode()
    if compress:
        client.writer.write(client_frame(0x1, deflate_message(data), rsv=4))
    else:
        client.writer.write(client_frame(0x1, data))


pytestmark = pytest.mark.parametrize("impl_name", ["ext", "pure"])


class TestNegotiation:
    async def test_default_answer_shares_one_compressor(self, impl_name):
        async with running_gateway(impl_name) as gw:
            client = await RawClient.connect(gw.port, "/ws", OFFER)
            assert "Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover\r\n" in client.handshake

    async def test_no_offer_no_extension(self, impl_name):
        async with running_gateway(impl_name) as gw:
            client = await RawClient.connect(gw.port, "/ws")
            assert "Sec-WebSocket-Extensions" not in client.handshake

    async def test_disabled(self, impl_name):
        async with running_gateway(impl_name, deflate=False) as gw:
            client = await RawClient.connect(gw.port, "/ws", OFFER)
            assert client.handshake.startswith("HTTP/1.1 101")
            assert "Sec-WebSocket-Extensions" not in client.handshake

    async def test_unparsable_header_is_400(self, impl_name):
        async with running_gateway(impl_name) as gw:
            client = await RawClient.connect(gw.port, "/ws", "permessage-deflate;;")
            assert client.handshake.startswith("HTTP/1.1 400")


class TestCompressedTraffic:
    async def test_compressed_publish_and_shared_compressed_fanout(self, impl_name):
        big = {"rows": [{"id": i, "status": "running", "labels": ["ci", "linux"]} for i in range(200)]}
        async with running_gateway(impl_name) as gw:
            subscribers = [await connect(gw) for _ in range(3)]
            for sub in subscribers:
                await send_json(sub, {"type": "subscribe", "channel": "runners"})
                assert json.loads((await sub.frame())[1])["type"] == "subscribed"
            async with json_client(gw, compression=None) as plain:
                await plain.subscribe("runners")
                await send_json(subscribers[0], {"type": "publish", "channel": "runners", "data": big},
                                compress=True)
                frames = []
                for sub in subscribers:
                    opcode, payload = await sub.frame()
                    assert opcode == 0x1 and sub.last_rsv1
                    frames.append(payload)
                assert frames[0] == frames[1] == frames[2]  # compressed once, shared
                message = json.loads(inflate_message(frames[0]))
                assert message == {"type": "message", "channel": "runners", "offset": 1, "data": big}
                assert await plain.recv() == message  # the uncompressed group gets it too

    async def test_small_messages_stay_uncompressed(self, impl_name):
        async with running_gateway(impl_name, deflate_threshold_bytes=1024) as gw:
            client = await connect(gw)
            await send_json(client, {"type": "ping", "id": 1})
            opcode, payload = await client.frame()
            assert not client.last_rsv1 and json.loads(payload) == {"type": "pong", "id": 1}

    async def test_fragmented_compressed_message(self, impl_name):
        async with running_gateway(impl_name, echo=True) as gw:
            client = await RawClient.connect(gw.port, "/echo", OFFER)
            text = ("fragmented and compressed " * 200).encode()
            compressed = deflate_message(text)
            thirds = [compressed[:50], compressed[50:100], compressed[100:]]
            client.writer.write(client_frame(0x1, thirds[0], fin=False, rsv=4)
                                + client_frame(0x0, thirds[1], fin=False)
                                + client_frame(0x0, thirds[2]))
            opcode, payload = await client.frame()
            assert opcode == 0x1 and client.last_rsv1
            assert inflate_message(payload) == text

    async def test_rsv1_on_a_continuation_is_1002(self, impl_name):
        async with running_gateway(impl_name, echo=True) as gw:
            client = await RawClient.connect(gw.port, "/echo", OFFER)
            client.writer.write(client_frame(0x1, deflate_message(b"a"), fin=False, rsv=4)
                                + client_frame(0x0, deflate_message(b"b"), rsv=4))
            assert await client.close_code() == 1002

    async def test_decompression_bomb_is_1009(self, impl_name):
        async with running_gateway(impl_name, echo=True, max_payload_bytes=64 * 1024,
                                   high_water_bytes=1 << 20) as gw:
            client = await RawClient.connect(gw.port, "/echo", OFFER)
            bomb = deflate_message(b"\x00" * (10 << 20))  # 10 MiB of zeros, ~10 KiB compressed
            assert len(bomb) < 64 * 1024
            client.writer.write(client_frame(0x2, bomb, rsv=4))
            assert await client.close_code() == 1009

    async def test_inflation_ratio_limit(self, impl_name):
        async with running_gateway(impl_name, echo=True, max_payload_bytes=8 << 20, high_water_bytes=16 << 20,
                                   deflate_max_ratio=100) as gw:
            client = await RawClient.connect(gw.port, "/echo", OFFER)
            client.writer.write(client_frame(0x2, deflate_message(b"\x00" * (4 << 20)), rsv=4))
            assert await client.close_code() == 1009

    async def test_corrupt_compressed_data_is_1007(self, impl_name):
        async with running_gateway(impl_name, echo=True) as gw:
            client = await RawClient.connect(gw.port, "/echo", OFFER)
            client.writer.write(client_frame(0x1, b"\xff\xff\xff\xff garbage", rsv=4))
            assert await client.close_code() == 1007

    async def test_context_takeover_mode_with_websockets(self, impl_name):
        async with running_gateway(impl_name, deflate_server_no_context_takeover=False) as gw:
            async with json_client(gw) as sub, json_client(gw) as pub:
                assert "server_no_context_takeover" not in \
                    sub.ws.response.headers["Sec-WebSocket-Extensions"]
                await sub.subscribe("logs")
                line = {"line": "x" * 3000}
                for i in range(3):
                    await pub.send(type="publish", channel="logs", data=line)
                    assert (await sub.recv())["offset"] == i + 1

    async def test_websockets_client_round_trip(self, impl_name):
        async with running_gateway(impl_name) as gw, json_client(gw) as c:
            await c.subscribe("big")
            await c.send(type="publish", channel="big", data="y" * 50_000)
            assert (await c.recv())["data"] == "y" * 50_000
