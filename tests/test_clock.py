"""Time-driven behaviour on a clock the test moves: token expiry and its
notice, the authentication timeout, the handshake timeout and the heartbeat.

Each test runs a real gateway and real clients on loopback, with the
gateway's ``ManualClock``: time passes only in ``clock.advance()``, so a
timeout is tested by moving just short of it (nothing happens) and then
past it (the event happens), with no sleeps and no race against the
scheduler.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, AsyncIterator

import jwt
import pytest
import websockets

from wirehub import Config, Gateway
from wirehub.auth import mint_token
from wirehub.clock import ManualClock

from helpers import JsonClient, connect_recording, json_client, until

SECRET = "integration-secret-long-enough-for-hs256!"


@contextlib.asynccontextmanager
async def gateway_on(clock: ManualClock, impl_name: str = "ext", **config: Any) -> AsyncIterator[Gateway]:
    config.setdefault("port", 0)
    gw = Gateway(Config(**config), implementation=impl_name, clock=clock)
    await gw.start()
    try:
        yield gw
    finally:
        await gw.stop(timeout_s=1.0)


def secured(clock: ManualClock, impl_name: str = "ext", **config: Any) -> Any:
    return gateway_on(clock, impl_name, jwt_secret=SECRET, jwt_leeway_s=0, **config)


def token(clock: ManualClock, **claims: Any) -> str:
    claims.setdefault("sub", "alice")
    return mint_token(SECRET, now=clock.wall(), **claims)


async def closed_with(c: JsonClient, timeout_s: float = 5.0) -> tuple[int, str]:
    with pytest.raises(websockets.ConnectionClosed) as info:
        while True:
            await asyncio.wait_for(c.ws.recv(), timeout_s)
    return info.value.rcvd.code, info.value.rcvd.reason


async def alive(c: JsonClient) -> bool:
    return await c.request(type="ping", id="alive") == {"type": "pong", "id": "alive"}


async def closed_by_server(reader: asyncio.StreamReader) -> bool:
    """EOF, or a reset when the close met bytes the server had not read yet."""
    try:
        return await asyncio.wait_for(reader.read(), 5) == b""
    except ConnectionResetError:
        return True


# -- the clock itself ------------------------------------------------------------------

async def test_timers_run_in_deadline_order_including_those_scheduled_on_the_way():
    clock, ran = ManualClock(), []
    clock.call_later(3, ran.append, "c")
    clock.call_later(1, lambda: (ran.append("a"), clock.call_later(1, ran.append, "b")))
    clock.call_later(2.5, ran.append, "cancelled").cancel()
    start = clock.monotonic()
    clock.advance(2.9)
    assert ran == ["a", "b"]
    clock.advance(0.1)
    assert ran == ["a", "b", "c"]
    assert clock.monotonic() - start >= 3.0
    with pytest.raises(ValueError):
        clock.advance(-1)


async def test_sleep_wakes_when_the_clock_passes_its_deadline():
    clock = ManualClock()
    sleeper = asyncio.ensure_future(clock.sleep(10))
    await until(lambda: clock.sleeping == 1, what="the task asleep")
    clock.advance(9.999)
    await asyncio.sleep(0)
    assert not sleeper.done()
    clock.advance(0.001)
    await asyncio.wait_for(sleeper, 5)
    assert clock.sleeping == 0


# -- authentication timeout and token expiry ------------------------------------------

async def test_authentication_timeout(impl_name):
    clock = ManualClock()
    async with secured(clock, impl_name, auth_timeout_s=10) as gw:
        async with json_client(gw) as anon, json_client(gw) as authenticating:
            reply = await authenticating.request(type="auth", token=token(clock), id=1)
            assert reply["type"] == "authenticated"
            clock.advance(9.9)
            assert (await anon.request(type="ping", id=2))["code"] == "not_authenticated"  # still open
            clock.advance(0.1)
            assert await closed_with(anon) == (1008, "authentication timeout")
            assert await alive(authenticating)
        assert gw.metrics.auth_failures_total["authentication_timeout"] == 1


async def test_token_expiring_notice_refresh_and_expiry(impl_name):
    clock = ManualClock()
    async with secured(clock, impl_name, token_expiring_notice_s=30) as gw:
        first = token(clock, subscribe=["a", "b"], ttl_s=60)
        exp = jwt.decode(first, options={"verify_signature": False})["exp"]
        async with json_client(gw, f"/ws?token={first}") as c:
            await c.subscribe("a")
            await c.subscribe("b")
            clock.advance(exp - 30 - clock.wall() - 0.5)
            assert await alive(c)  # no notice yet: the ping's answer is the next message
            clock.advance(0.5)
            assert await c.recv() == {"type": "token_expiring", "exp": exp}
            # A refresh with narrower claims: "b" is no longer covered.
            await c.send(type="auth", token=token(clock, subscribe=["a"], ttl_s=600), id=9)
            assert await c.recv() == {"type": "unsubscribed", "channel": "b", "reason": "forbidden"}
            assert (await c.recv())["type"] == "authenticated"
            clock.advance(60)  # well past the first token's exp: the refreshed one holds
            assert await alive(c)

        second = token(clock, ttl_s=60)
        exp = jwt.decode(second, options={"verify_signature": False})["exp"]
        async with json_client(gw, f"/ws?token={second}") as c:
            clock.advance(exp - 30 - clock.wall())
            assert await c.recv() == {"type": "token_expiring", "exp": exp}
            clock.advance(29.5)
            assert await alive(c)
            clock.advance(0.5)
            assert await closed_with(c) == (1008, "token expired")
        assert gw.metrics.auth_failures_total["token_expired"] == 1


async def test_the_handshake_checks_exp_and_nbf_on_the_gateway_clock(impl_name):
    clock = ManualClock()
    async with secured(clock, impl_name) as gw:
        expiring, not_yet = token(clock, ttl_s=60), token(clock, nbf=int(clock.wall()) + 120)
        clock.advance(61)  # by the gateway's clock the first has expired, the second is not yet valid
        for t, code in ((expiring, b"token_expired"), (not_yet, b"invalid_token")):
            with pytest.raises(websockets.InvalidStatus) as refused:
                async with json_client(gw, f"/ws?token={t}"):
                    pass
            assert refused.value.response.status_code == 401 and code in refused.value.response.body
        clock.advance(60)
        async with json_client(gw, f"/ws?token={not_yet}") as c:
            assert await alive(c)


# -- handshake timeout -------------------------------------------------------------

async def test_a_handshake_that_never_finishes_is_cut_off(impl_name):
    clock = ManualClock()
    async with gateway_on(clock, impl_name, handshake_timeout_s=5, max_connections=2) as gw:
        async with json_client(gw) as upgraded:
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            writer.write(b"GET /ws HTTP/1.1\r\nHost: x\r\nX-Slow: 1\r\n")  # never finished
            await until(lambda: gw.admission.handshaking == 1, what="the slow socket accepted")
            # The gateway is now full: a refused socket waits for its request to be answered 503.
            refused_reader, refused_writer = await asyncio.open_connection("127.0.0.1", gw.port)
            await until(lambda: gw.admission.answering == 1, what="the refused socket accepted")
            clock.advance(2.5)
            writer.write(b"X-Slow: 2\r\n")  # a slowloris trickle does not move the deadline
            clock.advance(2.4)
            assert not reader.at_eof() and gw.admission.handshaking == 2
            clock.advance(0.1)
            assert await closed_by_server(reader) and await closed_by_server(refused_reader)
            await until(lambda: gw.admission.answering == 0 and gw.admission.open == 1,
                        what="both places given back")
            assert gw.admission.handshaking == 0
            assert await alive(upgraded)  # an upgraded connection is under no handshake deadline
            writer.close()
            refused_writer.close()
        assert gw.metrics.refusals_total["handshake_timeout"] == 2


# -- heartbeat ----------------------------------------------------------------------

async def test_heartbeat_closes_a_peer_that_stops_answering_pings(impl_name):
    clock = ManualClock()
    async with gateway_on(clock, impl_name, ping_interval_s=20, ping_timeout_s=20) as gw:
        await until(lambda: clock.sleeping == 1, what="the heartbeat asleep")

        async def sweep_after(seconds: float) -> None:
            clock.advance(seconds)
            await until(lambda: clock.sleeping == 1, what="the heartbeat's round")

        silent = await connect_recording(gw.port, enable_auto_pong=False)
        answering = await connect_recording(gw.port)  # picows answers pings
        await until(lambda: len(gw.connections) == 2, what="both connected")
        await sweep_after(10)   # t=10: both just seen
        await sweep_after(10)   # t=20: idle 10 s
        await sweep_after(10)   # t=30: idle 20 s = ping_interval_s: both pinged
        await sweep_after(10)   # t=40: the ping 10 s old, within ping_timeout_s
        assert not silent.closed.done()
        await sweep_after(10)   # t=50: 20 s without an answer
        assert await silent.wait_closed() == 1001
        assert silent.close_reason == "no answer to ping"
        assert not answering.closed.done()
        assert (await answering.recv_json())["type"] == "welcome"
        answering.send_json(type="ping", id=1)
        assert await answering.recv_json() == {"type": "pong", "id": 1}
