"""``wirehub.Client`` against real gateways on loopback: faults injected on
the server side (every connection closed with 1012, a SIGKILLed process),
time and randomness injected on the client side (the backoff)."""

from __future__ import annotations

import asyncio
import random
import signal

import msgspec
import pytest

import wirehub
from wirehub import ChannelOptions, Config, Gateway
from wirehub.auth import mint_token
from wirehub.client import (CLOSED, CONNECTED, Client, ClientClosed, Gap, Message, QueueFull, ServerError)
from wirehub.clock import ManualClock
from wirehub.protocol.messages import Subscribed

from helpers import free_port, running_gateway, start_server, until

SECRET = "integration-secret-long-enough-for-hs256!"
FAST = dict(reconnect_interval_s=0.02, max_reconnect_interval_s=0.2)
KEEP_ALL = [ChannelOptions(pattern="**", history_size=100_000)]
LIMITS_OFF = dict(max_connections_per_ip=0, new_connections_per_ip_per_s=0, rate_limit_messages_per_s=0,
                  rate_limit_bytes_per_s=0)


def url(gw_or_port: Gateway | int) -> str:
    port = gw_or_port if isinstance(gw_or_port, int) else gw_or_port.port
    return f"ws://127.0.0.1:{port}/ws"


async def take(sub: wirehub.client.Subscription, n: int, timeout_s: float = 20.0) -> list[Message]:
    async def read() -> list[Message]:
        return [await sub.__anext__() for _ in range(n)]
    return await asyncio.wait_for(read(), timeout_s)


async def test_subscribe_publish_request_and_wait_for():
    async with running_gateway(channels=KEEP_ALL) as gw:
        @gw.on("add")
        def add(conn, msg):
            return {"type": "sum", "value": msg["a"] + msg["b"]}  # the gateway adds the id

        async with wirehub.connect(url(gw)) as client:
            assert client.state == CONNECTED and client.client_id
            sub = await client.subscribe("prices.btc")
            position = await client.publish("prices.btc", {"bid": 101.5})
            assert position.offset == 1 and position.epoch
            assert await take(sub, 1) == [Message("prices.btc", 1, {"bid": 101.5})]
            reply = await client.request({"type": "add", "a": 2, "b": 3})
            assert reply["value"] == 5
            # wait_for looks at what already arrived first (the answer above).
            assert (await client.wait_for("sum", timeout_s=1))["value"] == 5
            with pytest.raises(asyncio.TimeoutError):
                await client.wait_for("sum", timeout_s=0.05)


async def test_every_offset_once_in_order_and_queued_publishes_once_through_ten_restarts():
    """The gateway closes every connection (1012) ten times while a publisher
    runs: the application sees each offset once, in order, and the client's
    own publishes, queued while it was away, are each applied once."""
    total, own = 3000, 200
    async with running_gateway(channels=KEEP_ALL, **LIMITS_OFF) as gw, \
            wirehub.connect(url(gw), **FAST) as client:
        sub = await client.subscribe("feed")
        mine = await client.subscribe("mine")
        restarts = 0

        async def publish_and_restart() -> None:
            nonlocal restarts
            for n in range(1, total + 1):
                gw.publish("feed", n)
                if n % 10 == 0:
                    await asyncio.sleep(0)
                if n % (total // 10) == 0:
                    for conn in gw.connections:
                        conn.close(1012, "service restart")
                    restarts += 1

        async def publish_own() -> list[int]:
            offsets = []
            for n in range(own):
                offsets.append((await client.publish("mine", {"n": n})).offset)
                await asyncio.sleep(0.001)
            return offsets

        server_side, offsets = await asyncio.gather(publish_and_restart(), publish_own())
        received = await take(sub, total, timeout_s=60)
        assert [m.data for m in received] == list(range(1, total + 1))
        assert [m.offset for m in received] == list(range(1, total + 1))
        own_received = await take(mine, own, timeout_s=60)
        assert sorted(m.data["n"] for m in own_received) == list(range(own))
        assert [m.offset for m in own_received] == list(range(1, own + 1))
        assert sorted(offsets) == list(range(1, own + 1))
        assert restarts == 10 and gw.broker.position("mine").offset == own


async def test_a_killed_server_comes_back_with_a_new_epoch_and_the_client_carries_on():
    port = free_port()  # the same port for both servers (a later --port wins over start_server's)
    args = ("--channel", "**:history_size=1000", "--max-connections-per-ip", "0", "--port", str(port))
    gaps: list[Gap] = []
    states: list[str] = []
    with start_server(*args) as (proc, _):
        client = Client(url(port), **FAST)
        client.on("gap", gaps.append)
        client.on("state", lambda state, code, reason: states.append(state))
        await client.start()
        sub = await client.subscribe("c")
        await client.publish("c", "before")
        assert [m.data for m in await take(sub, 1)] == ["before"]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        await until(lambda: client.state != CONNECTED, what="the client sees the loss")
    with start_server(*args):
        await until(lambda: client.state == CONNECTED, timeout_s=20, what="the client back")
        await until(lambda: gaps, what="the gap reported")
        assert gaps[0].channel == "c" and gaps[0].reason == "epoch_changed"
        await client.publish("c", "after")
        assert [(m.offset, m.data) for m in await take(sub, 1)] == [(1, "after")]
        assert "disconnected" in states and "connecting" in states
        await client.close()


async def test_backoff_is_full_jitter_with_the_configured_bounds_and_stops_after_max_attempts():
    clock, seed = ManualClock(), 7
    client = Client(url(free_port()), clock=clock, rng=random.Random(seed), max_reconnect_attempts=4,
                    reconnect_interval_s=1.0, reconnect_decay=1.5, max_reconnect_interval_s=2.0)
    expected = random.Random(seed)
    starting = asyncio.ensure_future(client.start(timeout_s=None))
    for attempt in range(1, 5):
        delay = expected.uniform(0, min(2.0, 1.0 * 1.5 ** (attempt - 1)))
        await until(lambda: clock.sleeping == 1, what=f"the wait before attempt {attempt + 1}")
        clock.advance(delay * 0.999)
        await asyncio.sleep(0)
        assert clock.sleeping == 1, "woke before its delay"
        clock.advance(delay * 0.002)        # past it: the next attempt starts
    with pytest.raises(ClientClosed, match="gave up after 4 reconnect attempts"):
        await asyncio.wait_for(starting, 10)
    assert client.state == CLOSED


async def test_a_refused_token_is_terminal():
    async with running_gateway(jwt_secret=SECRET) as gw:
        client = Client(url(gw), token="not-a-token", **FAST)
        with pytest.raises(ClientClosed, match="refused the token"):
            await client.start()
        assert client.state == CLOSED


async def test_the_token_is_refreshed_on_token_expiring_with_one_call():
    clock = ManualClock()
    calls = 0

    def get_token() -> str:
        nonlocal calls
        calls += 1
        return mint_token(SECRET, sub="alice", subscribe=["a"], ttl_s=600, now=clock.wall())

    gw = Gateway(Config(port=0, jwt_secret=SECRET, jwt_leeway_s=0, token_expiring_notice_s=30), clock=clock)
    async with running_gateway(gateway=gw), wirehub.connect(url(gw), get_token=get_token) as client:
        assert calls == 1                      # before connecting
        await client.subscribe("a")
        clock.advance(600 - 30)
        refreshed = await client.wait_for("authenticated", timeout_s=5)
        assert refreshed["sub"] == "alice" and calls == 2
        clock.advance(60)                       # past the first token's exp: still open
        assert (await client.request({"type": "ping"}))["type"] == "pong"


async def test_bad_use_gets_clear_exceptions():
    async with running_gateway() as gw:
        client = Client(url(gw), **FAST)
        await client.start()
        await client.subscribe("a")
        with pytest.raises(ValueError, match="already subscribed"):
            await client.subscribe("a")
        with pytest.raises(TypeError, match="not JSON-serializable"):
            await client.publish("a", object())
        with pytest.raises(ServerError) as refused:
            await client.publish("bad channel!", 1)
        assert refused.value.code == "invalid_channel"
        await client.close()
        with pytest.raises(ClientClosed):
            await client.publish("a", 1)


async def test_publishes_while_disconnected_are_bounded():
    gw = Gateway(Config(port=0))
    await gw.start()
    client = Client(url(gw), max_queued=3, reconnect_interval_s=5, max_reconnect_interval_s=5)
    await client.start()
    await gw.stop(timeout_s=1)                 # nobody to reconnect to for a while
    await until(lambda: client.state != CONNECTED, what="the client disconnected")
    queued = [asyncio.ensure_future(client.publish("a", n)) for n in range(3)]
    await asyncio.sleep(0)
    with pytest.raises(QueueFull):
        await client.publish("a", 3)
    await client.close()
    for publish in queued:
        with pytest.raises(ClientClosed):
            await publish


class SnapshotSource:
    """Owns ``state:*`` like the runners source: a subscriber first gets a
    snapshot at the channel's current offset (the one ``subscribed`` reports),
    then every later publication."""

    def __init__(self) -> None:
        self.host = None
        self.offsets: dict[str, int] = {}

    def owns(self, channel):
        return channel.startswith("state:")

    def bind(self, host):
        self.host = host

    async def start(self):
        pass

    async def close(self):
        pass

    def subscribe(self, conn, channel, request, answer):
        answer(Subscribed(channel, request.id))
        snapshot = msgspec.json.encode({"snapshot": self.offsets.get(channel, 0)})
        self.host.send_history(conn, channel, [(self.offsets.get(channel, 0), snapshot)])
        self.host.join(conn, channel)
        return False

    def cancel(self, conn, channel):
        return False

    def forget(self, conn):
        pass

    def vacated(self, channel):
        pass

    def emit(self, channel: str, n: int) -> None:
        self.offsets[channel] = self.host.emit(channel, msgspec.json.encode({"n": n})).offset


async def test_a_sources_snapshot_at_the_subscribed_offset_is_delivered():
    """The runners channel's ``initial_state`` comes at the offset ``subscribed``
    reports: a fresh subscription takes it, then everything after it once."""
    source = SnapshotSource()
    gw = Gateway(Config(port=0), sources=[source])
    async with running_gateway(gateway=gw), wirehub.connect(url(gw), **FAST) as client:
        source.emit("state:a", 1)
        source.emit("state:a", 2)
        sub = await client.subscribe("state:a")
        assert sub.position.offset == 2
        source.emit("state:a", 3)
        assert await take(sub, 2) == [Message("state:a", 2, {"snapshot": 2}), Message("state:a", 3, {"n": 3})]
        states: list[str] = []
        client.on("state", lambda state, code, reason: states.append(state))
        for conn in gw.connections:
            conn.close(1012, "service restart")
        await until(lambda: "disconnected" in states and client.state == CONNECTED, what="the client back")
        # A source that keeps no history answers a resume afresh (no `recovered`):
        # its snapshot comes again, the state to start from, then what follows.
        assert await take(sub, 1) == [Message("state:a", 3, {"snapshot": 3})]
        source.emit("state:a", 4)
        assert await take(sub, 1) == [Message("state:a", 4, {"n": 4})]



async def test_a_publish_refused_by_the_rate_limiter_fails_at_once_instead_of_waiting() -> None:
    async with running_gateway(rate_limit_messages_per_s=0.001, rate_limit_burst_messages=2) as gw:
        async with wirehub.connect(f"ws://127.0.0.1:{gw.port}/ws") as client:
            results = await asyncio.wait_for(asyncio.gather(
                *(client.publish("limited", i) for i in range(4)), return_exceptions=True), 10)
    assert [r.offset for r in results[:2]] == [1, 2]
    assert all(isinstance(r, ServerError) and r.code == "rate_limited" for r in results[2:]), results
