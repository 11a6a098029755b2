"""The gateway end to end: real sockets on loopback, real clients, both hot-path builds."""

from __future__ import annotations

import asyncio
import json
import socket
import struct

import pytest
import websockets
from picows import WSFrame, WSMsgType, WSTransport, ws_connect

from wirehub import Gateway, Config, Rejected
from wirehub._speedups import load
from wirehub.protocol.codec import Tag

from helpers import (RawClient, RecordingClient, client_frame, connect_recording, json_client, metrics_text,
                     running_gateway, until)

TLV = load("ext").tlv
pytestmark = pytest.mark.parametrize("impl_name", ["ext", "pure"], indirect=False)


def tlv_publish(channel: str, data: bytes, **extra: bytes) -> bytes:
    records = [(Tag.TYPE, b"publish"), (Tag.CHANNEL, channel.encode()), (Tag.DATA, data)]
    records += [(getattr(Tag, k.upper()), v) for k, v in extra.items()]
    return TLV.encode(records)


class PingCounter(RecordingClient):
    """Answers the server's pings itself, counting them."""

    def __init__(self) -> None:
        super().__init__()
        self.pings = 0

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.PING:
            self.pings += 1
            transport.send_pong(frame.get_payload_as_bytes())
        else:
            super().on_ws_frame(transport, frame)


class TestPubSub:
    async def test_welcome(self, impl_name):
        async with running_gateway(impl_name) as gw, json_client(gw) as c:
            assert c.welcome["type"] == "welcome"
            assert c.welcome["server"].startswith("wirehub/")
            assert len(c.welcome["client_id"]) == 16

    async def test_subscribe_publish_unsubscribe(self, impl_name):
        async with running_gateway(impl_name) as gw, json_client(gw) as sub, json_client(gw) as pub:
            await sub.subscribe("prices.btc")
            await pub.send(type="publish", channel="prices.btc", data={"bid": 101.5})
            assert await sub.recv() == {"type": "message", "channel": "prices.btc", "offset": 1,
                                        "data": {"bid": 101.5}}
            assert await sub.request(type="unsubscribe", channel="prices.btc", id=4) == \
                {"type": "unsubscribed", "channel": "prices.btc", "id": 4}
            await pub.send(type="publish", channel="prices.btc", data=2)
            await sub.expect_silence()
            await pub.expect_silence()  # no `published` without an id

    async def test_offsets_count_per_channel(self, impl_name):
        async with running_gateway(impl_name) as gw, json_client(gw) as c:
            replies = []
            for channel in ["a", "b", "a", "a", "b"]:
                replies.append(await c.request(type="publish", channel=channel, data=None, id=channel))
            assert [(r["channel"], r["offset"]) for r in replies] == \
                [("a", 1), ("b", 1), ("a", 2), ("a", 3), ("b", 2)]
            assert all(r["type"] == "published" for r in replies)

    async def test_data_is_forwarded_byte_for_byte(self, impl_name):
        async with running_gateway(impl_name) as gw, json_client(gw) as c:
            await c.subscribe("raw")
            await c.ws.send('{"type":"publish","channel":"raw","data":{"b" : [1,2.50, "é"] }}')
            assert await c.ws.recv() == '{"type":"message","channel":"raw","offset":1,"data":{"b" : [1,2.50, "é"] }}'

    async def test_exclude_self(self, impl_name):
        async with running_gateway(impl_name) as gw, json_client(gw) as a, json_client(gw) as b:
            await a.subscribe("room")
            await b.subscribe("room")
            await a.send(type="publish", channel="room", data="hi", exclude_self=True, id=1)
            assert (await a.recv())["type"] == "published"
            assert (await b.recv())["data"] == "hi"
            await a.expect_silence()
            await a.send(type="publish", channel="room", data="again")
            assert (await a.recv())["data"] == "again"

    async def test_binary_publication_passes_through_untouched(self, impl_name):
        payload = bytes(range(256)) * 300  # 76,800 bytes: a 64-bit-length frame
        async with running_gateway(impl_name) as gw, json_client(gw) as sub, json_client(gw) as pub:
            await sub.subscribe("blobs")
            await pub.ws.send(tlv_publish("blobs", payload, id=b"b1"))
            ack = TLV.decode(await pub.ws.recv())
            assert ack[:4] == [(Tag.TYPE, b"published"), (Tag.CHANNEL, b"blobs"),
                               (Tag.OFFSET, struct.pack(">Q", 1)), (Tag.ID, b"b1")]
            assert ack[4][0] == Tag.EPOCH and len(ack) == 5
            delivered = await sub.ws.recv()
            assert isinstance(delivered, bytes)
            assert TLV.decode(delivered) == [(Tag.TYPE, b"message"), (Tag.CHANNEL, b"blobs"),
                                             (Tag.OFFSET, struct.pack(">Q", 1)), (Tag.DATA, payload)]

    async def test_fragmented_message_is_reassembled(self, impl_name):
        async with running_gateway(impl_name) as gw, json_client(gw) as c:
            await c.subscribe("frag")
            text = json.dumps({"type": "publish", "channel": "frag", "data": "x" * 5000})
            await c.ws.send([text[i:i + 700] for i in range(0, len(text), 700)])
            assert (await c.recv())["data"] == "x" * 5000


class TestErrors:
    @pytest.mark.parametrize("raw, code, text", [
        ("{not json", "invalid_message", None),
        ("[1,2]", "invalid_message", "expected a JSON object"),
        # Nesting past the interpreter's recursion limit, in the message or in `data`.
        ("[" * 5000, "invalid_message", "invalid JSON: nested too deeply"),
        ('{"type":"publish","channel":"a","data":' + "[" * 5000 + "]" * 5000 + "}",
         "invalid_message", "invalid JSON: nested too deeply"),
        ('{"channel":"a"}', "unknown_type", "missing `type`"),
        ('{"type":"launch"}', "unknown_type", "unknown message type 'launch'"),
        ('{"type":"subscribe","channel":7}', "invalid_field", "Expected `str`, got `int` - at `$.channel`"),
        ('{"type":"subscribe","channel":"bad channel!"}', "invalid_channel", None),
        ('{"type":"publish","channel":"","data":1}', "invalid_channel", None),
        ('{"type":"unsubscribe","channel":"never"}', "not_subscribed", None),
    ])
    async def test_error_reply_keeps_the_connection(self, impl_name, raw, code, text):
        async with running_gateway(impl_name) as gw, json_client(gw) as c:
            await c.ws.send(raw)
            reply = await c.recv()
            assert reply["type"] == "error" and reply["code"] == code
            if text is not None:
                assert reply["error"] == text
            assert await c.request(type="ping", id="still-open") == {"type": "pong", "id": "still-open"}
            assert gw.metrics.errors_total[code] == 1

    async def test_error_echoes_the_request_id(self, impl_name):
        async with running_gateway(impl_name) as gw, json_client(gw) as c:
            reply = await c.request(type="subscribe", channel=["x"], id="r1")
            assert reply["id"] == "r1" and reply["code"] == "invalid_field"

    async def test_channel_length_limit(self, impl_name):
        async with running_gateway(impl_name, max_channel_length=10) as gw, json_client(gw) as c:
            assert (await c.request(type="subscribe", channel="a" * 10))["type"] == "subscribed"
            reply = await c.request(type="subscribe", channel="a" * 11)
            assert reply["code"] == "invalid_channel"

    async def test_too_many_subscriptions(self, impl_name):
        async with running_gateway(impl_name, max_subscriptions_per_connection=3) as gw, json_client(gw) as c:
            for name in "abc":
                await c.subscribe(name)
            reply = await c.request(type="subscribe", channel="d", id=1)
            assert reply == {"type": "error", "code": "too_many_subscriptions",
                             "error": "a connection may hold at most 3 subscriptions", "id": 1}
            await c.subscribe("a")  # re-subscribing to a held channel is fine

    async def test_malformed_tlv(self, impl_name):
        async with running_gateway(impl_name) as gw, json_client(gw) as c:
            await c.ws.send(b"\x01\x00\x00\x00\x09pub")
            reply = TLV.decode(await c.ws.recv())
            assert reply[:2] == [(Tag.TYPE, b"error"), (Tag.CODE, b"invalid_message")]

    async def test_invalid_utf8_closes_1007(self, impl_name):
        async with running_gateway(impl_name) as gw:
            client = await connect_recording(gw.port)
            client.transport.send(WSMsgType.TEXT, b'{"type":"ping","x":"\xff"}')
            assert await client.wait_closed() == 1007

    async def test_reserved_bits_close_1002(self, impl_name):
        async with running_gateway(impl_name) as gw:
            client = await connect_recording(gw.port)
            client.transport.send(WSMsgType.TEXT, b"{}", rsv2=True)
            assert await client.wait_closed() == 1002

    async def test_max_payload_closes_1009(self, impl_name):
        async with running_gateway(impl_name, max_payload_bytes=1000, high_water_bytes=10_000) as gw:
            async with json_client(gw) as c:
                await c.ws.send("x" * 1001)
                with pytest.raises(websockets.ConnectionClosed) as exc:
                    await c.recv()
                assert exc.value.rcvd.code == 1009
            async with json_client(gw) as c:  # the same limit across fragments
                await c.ws.send(["x" * 600, "y" * 600])
                with pytest.raises(websockets.ConnectionClosed) as exc:
                    await c.recv()
                assert exc.value.rcvd.code == 1009

    async def test_rate_limit_then_close_1008(self, impl_name):
        limits = dict(rate_limit_messages_per_s=5, rate_limit_burst_messages=5,
                      rate_limit_violations_per_s=1, rate_limit_burst_violations=3)
        async with running_gateway(impl_name, **limits) as gw, json_client(gw) as c:
            for i in range(8):
                await c.send(type="ping", id=i)
            replies = [await c.recv() for _ in range(8)]
            assert [r["type"] for r in replies[:5]] == ["pong"] * 5
            # Refused unprocessed, but answered with their ids: a client
            # waiting for those answers learns at once.
            assert replies[5:] == [{"type": "error", "code": "rate_limited", "id": i,
                                    "error": "rate limit exceeded; message not processed"} for i in (5, 6, 7)]
            await c.send(type="ping")
            with pytest.raises(websockets.ConnectionClosed) as exc:
                await c.recv()
            assert exc.value.rcvd.code == 1008


class TestLifecycle:
    async def test_unanswered_pings_close_the_connection(self, impl_name):
        async with running_gateway(impl_name, ping_interval_s=0.2, ping_timeout_s=0.2) as gw:
            silent = await connect_recording(gw.port, enable_auto_pong=False)
            _, alive = await ws_connect(PingCounter, f"ws://127.0.0.1:{gw.port}/ws", enable_auto_pong=False)
            assert (await alive.recv_json())["type"] == "welcome"
            assert await silent.wait_closed(timeout=10) == 1001
            # A second ping is sent only once the first was answered: the pong counted.
            await until(lambda: alive.pings >= 2, what="a second ping to the client that answers")
            alive.send_json(type="ping")
            assert await alive.recv_json() == {"type": "pong"}

    async def test_the_welcome_follows_the_101_with_the_agreed_headers(self, impl_name):
        """The 101 and the ``welcome`` go out in one write; the head still
        carries what was agreed, the welcome is an uncompressed text frame,
        and client ids stay unique past a draw of the id pool (512)."""
        async with running_gateway(impl_name, max_connections_per_ip=0, new_connections_per_ip_per_s=0) as gw:
            ids = set()
            for _ in range(600):
                client = await RawClient.connect(gw.port, "/ws", extensions="permessage-deflate")
                head = client.handshake
                assert head.startswith("HTTP/1.1 101 Switching Protocols\r\n"), head
                assert "Sec-WebSocket-Accept: " in head and "Sec-WebSocket-Extensions: permessage-deflate" in head
                opcode, payload = await client.frame()
                assert opcode == WSMsgType.TEXT and not client.last_rsv1
                welcome = json.loads(payload)
                assert welcome["type"] == "welcome" and len(welcome["client_id"]) == 16
                ids.add(welcome["client_id"])
                client.writer.close()
            assert len(ids) == 600

    async def test_pings_are_answered_in_order_with_their_payload(self, impl_name):
        async with running_gateway(impl_name, echo=True) as gw:
            client = await RawClient.connect(gw.port, "/echo")
            client.writer.write(client_frame(0x9, b"one") + client_frame(0x1, b"text")
                                + client_frame(0x9, b"two"))
            assert [await client.frame() for _ in range(3)] == [(0xA, b"one"), (0x1, b"text"),
                                                                  (0xA, b"two")]

    async def test_a_peer_that_pings_without_reading_is_a_slow_consumer(self, impl_name):
        """PONGs are queued like replies, so they meet high_water_bytes (picows's
        auto-pong wrote them to the transport, whose buffer grew without a bound)."""
        async with running_gateway(impl_name, max_payload_bytes=1000, high_water_bytes=64_000) as gw:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # no autotuning
            sock.connect(("127.0.0.1", gw.port))
            sock.setblocking(False)
            reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 24)
            writer.write(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                         b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
            await reader.readuntil(b"\r\n\r\n")
            writer.transport.pause_reading()  # from now on, never read
            ping = client_frame(0x9, b"p" * 125)
            for _ in range(100):  # 4 MB of PONGs asked for
                writer.write(ping * 250)
                await writer.drain()
            writer.transport.resume_reading()
            client = RawClient(reader, writer)
            while (frame := await client.frame(timeout=10))[0] != 0x8:
                assert frame[0] in (0x1, 0xA)  # the welcome, then PONGs
            assert struct.unpack(">H", frame[1][:2])[0] == 1013
            assert gw.metrics.closes_total[1013] == 1

    async def test_graceful_shutdown_sends_1001(self, impl_name):
        async with running_gateway(impl_name) as gw, json_client(gw) as c:
            await gw.stop(timeout_s=2)
            with pytest.raises(websockets.ConnectionClosed) as exc:
                await c.recv()
            assert exc.value.rcvd.code == 1001

    async def test_client_close_is_echoed(self, impl_name):
        async with running_gateway(impl_name) as gw, json_client(gw) as c:
            await c.ws.close(4321, "bye")
            assert c.ws.protocol.close_rcvd.code == 4321
            await until(lambda: gw.metrics.connections_current == 0, what="the connection gone")

    @pytest.mark.parametrize("path, status, body", [
        ("/healthz", 200, b"ok\n"), ("/nope", 404, b"not found\n"), ("/ws/extra", 404, b"not found\n"),
    ])
    async def test_http_routes(self, impl_name, path, status, body):
        async with running_gateway(impl_name) as gw:
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            response = await reader.read()
            writer.close()
            assert response.startswith(f"HTTP/1.1 {status} ".encode())
            assert response.endswith(body)

    async def test_metrics_endpoint(self, impl_name):
        async with running_gateway(impl_name) as gw, json_client(gw) as c:
            await c.subscribe("m")
            await c.request(type="publish", channel="m", data=1)
            text = await metrics_text(gw.port)
            assert "wirehub_connections 1\n" in text
            assert "wirehub_publications_total 1\n" in text
            assert "wirehub_deliveries_total 1\n" in text
            # One fan-out round (the message to the subscriber): a histogram
            # whose buckets count up to it.
            buckets = [int(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                       if line.startswith("wirehub_fanout_round_seconds_bucket{")]
            assert len(buckets) == len(gw.impl.fanout.ROUND_BOUNDS_S) + 1
            assert buckets == sorted(buckets) and buckets[-1] >= 1
            assert f"wirehub_fanout_round_seconds_count {buckets[-1]}\n" in text
            assert 'wirehub_fanout_round_seconds_bucket{le="+Inf"}' in text


class TestEmbeddingApi:
    async def test_publish_from_python(self, impl_name):
        async with running_gateway(impl_name) as gw, json_client(gw) as c:
            await c.subscribe("feed")
            assert gw.publish("feed", {"n": 1}).offset == 1
            assert await c.recv() == {"type": "message", "channel": "feed", "offset": 1, "data": {"n": 1}}
            gw.publish("feed", b"\x00raw")
            assert TLV.decode(await c.ws.recv())[-1] == (Tag.DATA, b"\x00raw")

    async def test_middleware_can_reject(self, impl_name):
        gw = Gateway(Config(port=0), implementation=impl_name)

        @gw.use
        def no_secrets(conn, msg):
            if getattr(msg, "channel", "").startswith("secret"):
                raise Rejected("secret channels are closed", code="forbidden")

        async with running_gateway(gateway=gw), json_client(gw) as c:
            reply = await c.request(type="subscribe", channel="secret.plans", id=1)
            assert reply == {"type": "error", "code": "forbidden", "error": "secret channels are closed", "id": 1}
            await c.subscribe("public")

    async def test_custom_handlers(self, impl_name):
        gw = Gateway(Config(port=0), implementation=impl_name)

        @gw.on("whoami")
        def whoami(conn, msg):
            return {"type": "you_are", "client_id": conn.client_id, "echo": msg.get("x")}

        @gw.on("slow_add")
        async def slow_add(conn, msg):
            await asyncio.sleep(0)  # answers from a later turn of the loop
            return {"type": "sum", "value": msg["a"] + msg["b"]}

        @gw.on("broken")
        def broken(conn, msg):
            raise RuntimeError("bug")

        @gw.on("refuse")
        def refuse(conn, msg):
            raise Rejected("no", code="forbidden")

        async with running_gateway(gateway=gw), json_client(gw) as c:
            assert await c.request(type="whoami", x=5) == \
                {"type": "you_are", "client_id": c.welcome["client_id"], "echo": 5}
            assert await c.request(type="slow_add", a=2, b=3) == {"type": "sum", "value": 5}
            # A dict answer gets the request's id, sync or async, so clients can match it.
            assert (await c.request(type="whoami", x=1, id="q1"))["id"] == "q1"
            assert await c.request(type="slow_add", a=1, b=1, id=7) == {"type": "sum", "value": 2, "id": 7}
            assert await c.request(type="broken", id=1) == \
                {"type": "error", "code": "internal_error", "error": "internal error; see the server log", "id": 1}
            assert (await c.request(type="refuse"))["code"] == "forbidden"

    async def test_running_async_handlers_are_limited_per_connection(self, impl_name):
        gw = Gateway(Config(port=0, max_pending_handlers_per_connection=2), implementation=impl_name)
        release = asyncio.Event()

        @gw.on("wait")
        async def wait(conn, msg):
            await release.wait()
            return {"type": "done", "id": msg["id"]}

        async with running_gateway(gateway=gw), json_client(gw) as c, json_client(gw) as other:
            await c.send(type="wait", id=1)
            await c.send(type="wait", id=2)
            assert await c.request(type="wait", id=3) == {
                "type": "error", "code": "rate_limited", "id": 3,
                "error": "2 requests of this connection are still running; message not processed"}
            await other.send(type="wait", id=4)  # the limit is per connection
            release.set()
            assert sorted([(await c.recv())["id"], (await c.recv())["id"]]) == [1, 2]
            assert await other.recv() == {"type": "done", "id": 4}
            assert await c.request(type="wait", id=5) == {"type": "done", "id": 5}
            assert gw.metrics.errors_total["rate_limited"] == 1

    async def test_builtin_types_cannot_be_overridden(self, impl_name):
        with pytest.raises(ValueError):
            Gateway(Config(port=0), implementation=impl_name).on("publish", lambda c, m: None)

    async def test_upgrade_request_is_kept_for_the_connect_hooks_only(self, impl_name):
        gw = Gateway(Config(port=0), implementation=impl_name)
        seen = []
        release = asyncio.Event()
        gw.on_connect(lambda conn: seen.append(("sync", conn.request.headers.get("X-Tenant"))))

        @gw.on_connect
        async def later(conn):
            await release.wait()
            seen.append(("async", conn.request.headers.get("X-Tenant")))

        async with running_gateway(gateway=gw):
            async with json_client(gw, "/ws?token=abc&x=1&x=2",
                                   additional_headers={"X-Tenant": "acme"}) as c:
                [conn] = gw.connections
                assert seen == [("sync", "acme")] and conn.request is not None  # kept while a hook runs
                release.set()
                await until(lambda: conn.request is None, what="headers let go once the hooks are done")
                assert seen == [("sync", "acme"), ("async", "acme")]
                assert conn.path == "/ws"
                assert conn.query == {"token": ["abc"], "x": ["1", "2"]}
                assert conn.subscriptions == set()
                await c.subscribe("a")
                assert conn.subscriptions == {"a"}

    async def test_idle_connection_holds_no_handshake_state(self, impl_name):
        # picows keeps the request and the 101 response on its transport;
        # the compiled listener lets go of both (docs/benchmarks.md, idle memory).
        async with running_gateway(impl_name) as gw, json_client(gw):
            # (Let go in the callback that sent the welcome, which json_client has read.)
            [conn] = gw.connections
            assert conn.request is None
            if impl_name == "ext":
                assert conn.listener.transport.request is None
                assert conn.listener.transport.response is None

    async def test_connect_and_disconnect_hooks(self, impl_name):
        gw = Gateway(Config(port=0), implementation=impl_name)
        events = []
        gw.on_connect(lambda conn: events.append(("connect", conn.client_id)))
        gw.on_disconnect(lambda conn: events.append(("disconnect", conn.client_id)))
        async with running_gateway(gateway=gw):
            async with json_client(gw) as c:
                client_id = c.welcome["client_id"]
                assert events == [("connect", client_id)]
                assert [conn.client_id for conn in gw.connections] == [client_id]
            await until(lambda: len(events) == 2, what="the disconnect hook")
            assert events == [("connect", client_id), ("disconnect", client_id)]


async def test_a_history_read_that_fails_unexpectedly_answers_internal_error(impl_name):
    """A broker failing with something other than a WirehubError (a bug, a
    driver's own exception): the client still gets an answer with its id."""
    from wirehub.broker.memory import MemoryBroker

    class Failing(MemoryBroker):
        async def history(self, channel, **kwargs):
            raise RuntimeError("the broker broke")

    gateway = Gateway(Config(port=0), broker=Failing(), implementation=impl_name)
    async with running_gateway(gateway=gateway) as gw:
        async with json_client(gw) as client:
            reply = await client.request(type="history", channel="c", id=7)
            assert (reply["type"], reply["code"], reply["id"]) == ("error", "internal_error", 7)
            assert (await client.request(type="ping", id=8))["type"] == "pong"
