"""The hub ↔ source contract (``sources/base.py``), with a scripted source and real sockets.

What every source relies on: subscribes to its channels reach it with their
``tail``; it may answer later; history then join in one callback means no
gap and no duplicate; the hub tells it when a pending subscriber gives up,
disconnects, or when its channel empties; clients cannot publish on it.
"""

from __future__ import annotations

import struct

from helpers import json_client, no_position, running_gateway, until

from wirehub import Config, Gateway
from wirehub.protocol.codec import Tag
from wirehub.protocol.messages import Error, Subscribed


class ScriptedSource:
    """Owns ``feed:*``; a subscribe waits until the test calls ``admit_all``."""

    def __init__(self) -> None:
        self.host = None
        self.ring: dict[str, list[tuple[int, bytes]]] = {}
        self.pending: dict[tuple[str, str], tuple] = {}
        self.events: list[tuple[str, str]] = []

    def owns(self, channel):
        return channel.startswith("feed:")

    def bind(self, host):
        self.host = host

    async def start(self):
        self.events.append(("start", ""))

    async def close(self):
        self.events.append(("close", ""))

    def subscribe(self, conn, channel, request, answer):
        if channel == "feed:missing":
            answer(Error("container_not_found", "no such feed", request.id))
            return False
        self.pending[(conn.client_id, channel)] = (conn, channel, request, answer)
        return False

    def cancel(self, conn, channel):
        self.events.append(("cancel", channel))
        return self.pending.pop((conn.client_id, channel), None) is not None

    def forget(self, conn):
        self.events.append(("forget", conn.client_id))
        for key in [k for k in self.pending if k[0] == conn.client_id]:
            del self.pending[key]

    def vacated(self, channel):
        self.events.append(("vacated", channel))

    def emit(self, channel, n):
        data = f'{{"n":{n}}}'.encode()
        self.ring.setdefault(channel, []).append((self.host.emit(channel, data).offset, data))

    def admit_all(self):
        pending, self.pending = self.pending, {}
        for conn, channel, request, answer in pending.values():
            if not self.host.allowed(conn, channel):
                answer(Error("forbidden", "not allowed", request.id))
                continue
            answer(Subscribed(channel, request.id))
            tail = request.tail or 0
            self.host.send_history(conn, channel, self.ring.get(channel, [])[-tail:] if tail else [])
            self.host.join(conn, channel)


class TestSourceContract:
    async def test_tail_then_live_without_gap_or_duplicate(self, impl_name):
        source = ScriptedSource()
        gw = Gateway(Config(port=0), implementation=impl_name, sources=[source])
        async with running_gateway(gateway=gw), json_client(gw) as c:
            assert source.events == [("start", "")]
            for n in range(1, 11):
                source.emit("feed:a", n)
            await c.send(type="subscribe", channel="feed:a", tail=3, id=1)
            await until(lambda: source.pending)
            await c.expect_silence(0.05)  # the source has not answered yet
            source.admit_all()
            source.emit("feed:a", 11)  # published right after the join: must arrive once
            assert no_position(await c.recv()) == {"type": "subscribed", "channel": "feed:a", "id": 1}
            got = [await c.recv() for _ in range(4)]
            assert [(m["offset"], m["data"]["n"]) for m in got] == [(8, 8), (9, 9), (10, 10), (11, 11)]
            await c.expect_silence(0.1)

    async def test_source_errors_and_pending_unsubscribe(self, impl_name):
        source = ScriptedSource()
        gw = Gateway(Config(port=0), implementation=impl_name, sources=[source])
        async with running_gateway(gateway=gw), json_client(gw) as c:
            assert await c.request(type="subscribe", channel="feed:missing", id=2) == \
                {"type": "error", "code": "container_not_found", "error": "no such feed", "id": 2}
            await c.send(type="subscribe", channel="feed:b", id=3)
            assert await c.request(type="unsubscribe", channel="feed:b", id=4) == \
                {"type": "unsubscribed", "channel": "feed:b", "id": 4}
            assert ("cancel", "feed:b") in source.events and not source.pending
            assert (await c.request(type="unsubscribe", channel="feed:b", id=5))["code"] == "not_subscribed"

    async def test_hub_reports_vacated_channels_and_closed_connections(self, impl_name):
        source = ScriptedSource()
        gw = Gateway(Config(port=0), implementation=impl_name, sources=[source])
        async with running_gateway(gateway=gw):
            async with json_client(gw) as c:
                await c.send(type="subscribe", channel="feed:c")
                await until(lambda: source.pending)
                source.admit_all()
                assert (await c.recv())["type"] == "subscribed"
                await c.send(type="subscribe", channel="feed:d")  # left pending
                await until(lambda: source.pending)
                client_id = c.welcome["client_id"]
            await until(lambda: ("vacated", "feed:c") in source.events)
            assert ("forget", client_id) in source.events
            assert ("vacated", "feed:c") in source.events
            assert not source.pending
        assert source.events[-1] == ("close", "")

    async def test_clients_cannot_publish_on_source_channels(self, impl_name):
        gw = Gateway(Config(port=0), implementation=impl_name, sources=[ScriptedSource()])
        async with running_gateway(gateway=gw), json_client(gw) as c:
            reply = await c.request(type="publish", channel="feed:a", data=1, id=1)
            assert reply == {"type": "error", "code": "forbidden",
                             "error": "'feed:a' is written by the gateway only", "id": 1}

    async def test_tail_on_a_channel_without_history(self, impl_name):
        gw = Gateway(Config(port=0), implementation=impl_name)
        async with running_gateway(gateway=gw), json_client(gw) as c:
            assert await c.request(type="subscribe", channel="plain", tail=5, id=1) == {
                "type": "error", "code": "invalid_field", "id": 1,
                "error": "`tail` needs a channel that keeps history: 'plain' keeps none "
                         "(history_size, docs/delivery.md)"}
            assert await c.request(type="subscribe", channel="plain", tail=-1, id=2) == {
                "type": "error", "code": "invalid_field", "id": 2,
                "error": "Expected `int` >= 0 - at `$.tail`"}
            await c.subscribe("plain")

    async def test_a_waiting_subscribe_counts_and_is_not_asked_twice(self, impl_name):
        source = ScriptedSource()
        gw = Gateway(Config(port=0, max_subscriptions_per_connection=2), implementation=impl_name,
                     sources=[source])
        async with running_gateway(gateway=gw), json_client(gw) as c:
            await c.send(type="subscribe", channel="feed:a", id=1)
            await until(lambda: source.pending)
            # The first request keeps its answer; the second is refused at once.
            assert await c.request(type="subscribe", channel="feed:a", id=2) == {
                "type": "error", "code": "invalid_field", "id": 2,
                "error": "a subscribe to 'feed:a' is already waiting for its answer"}
            await c.send(type="subscribe", channel="feed:b", id=3)
            await until(lambda: len(source.pending) == 2)
            # Two subscriptions waiting: the limit of two is reached.
            assert (await c.request(type="subscribe", channel="plain", id=4))["code"] == \
                "too_many_subscriptions"
            source.admit_all()
            replies = [await c.recv(), await c.recv()]
            assert sorted(r["id"] for r in replies) == [1, 3]
            assert all(r["type"] == "subscribed" for r in replies)
            assert (await c.request(type="subscribe", channel="plain", id=5))["code"] == \
                "too_many_subscriptions"
            await c.request(type="unsubscribe", channel="feed:a")
            await c.subscribe("plain")
            assert gw.metrics.errors_total["invalid_field"] == 1

    async def test_tail_on_a_repeated_subscribe_is_refused(self, impl_name):
        source = ScriptedSource()
        gw = Gateway(Config(port=0), implementation=impl_name, sources=[source])
        async with running_gateway(gateway=gw), json_client(gw) as c:
            await c.send(type="subscribe", channel="feed:r", id=1)
            await until(lambda: source.pending)
            source.admit_all()
            assert (await c.recv())["type"] == "subscribed"
            assert no_position(await c.request(type="subscribe", channel="feed:r", id=2)) == {
                "type": "subscribed", "channel": "feed:r", "id": 2}  # twice is a no-op
            assert await c.request(type="subscribe", channel="feed:r", tail=3, id=3) == {
                "type": "error", "code": "invalid_field", "id": 3,
                "error": "already subscribed to 'feed:r': `since`, `tail` and `max_rate` need a new "
                         "subscription (unsubscribe first)"}

    async def test_tail_over_tlv(self, impl_name):
        source = ScriptedSource()
        gw = Gateway(Config(port=0), implementation=impl_name, sources=[source])
        async with running_gateway(gateway=gw), json_client(gw) as c:
            for n in range(1, 6):
                source.emit("feed:t", n)

            def record(tag, value):
                return struct.pack(">BI", tag, len(value)) + value
            await c.ws.send(record(Tag.TYPE, b"subscribe") + record(Tag.CHANNEL, b"feed:t")
                            + record(Tag.TAIL, struct.pack(">Q", 2)))
            await until(lambda: source.pending)
            source.admit_all()
            reply = await c.recv()
            assert isinstance(reply, bytes) and b"subscribed" in reply
            assert [(await c.recv())["offset"] for _ in range(2)] == [4, 5]
            await c.ws.send(record(Tag.TYPE, b"subscribe") + record(Tag.CHANNEL, b"feed:t")
                            + record(Tag.TAIL, b"\x01"))
            assert b"TLV `tail` must be 8 bytes" in await c.recv()

    async def test_a_subscribe_waiting_while_the_token_changes_is_checked_again(self, impl_name):
        from wirehub.auth import mint_token

        secret = "sources-test-secret-0123456789abcdef"
        source = ScriptedSource()
        gw = Gateway(Config(port=0, jwt_secret=secret), implementation=impl_name, sources=[source])
        wide = mint_token(secret, sub="u", subscribe=["feed:*"], ttl_s=600)
        narrow = mint_token(secret, sub="u", subscribe=["feed:a"], ttl_s=600)
        async with running_gateway(gateway=gw), json_client(gw, f"/ws?token={wide}") as c:
            await c.send(type="subscribe", channel="feed:a", id=1)
            await c.send(type="subscribe", channel="feed:b", id=2)
            await until(lambda: len(source.pending) == 2)
            assert (await c.request(type="auth", token=narrow))["type"] == "authenticated"
            source.admit_all()
            replies = {m["id"]: m for m in [await c.recv(), await c.recv()]}
            assert no_position(replies[1]) == {"type": "subscribed", "channel": "feed:a", "id": 1}
            assert replies[2]["code"] == "forbidden"
