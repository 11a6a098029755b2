"""The shared broker on real Redis: gateways as one, history from the stream,
gaps filled, outages survived (docs/scaling.md).

Every test starts its own ``redis-server`` (``redis_server.py``) so that it
can kill, restart and starve it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from helpers import free_port, json_client, running_gateway, until
from redis_server import RedisServer
from wirehub import Config, Gateway
from wirehub.client import Client, Gap
from wirehub.config import ChannelOptions
from wirehub.broker.base import HistoryOptions
from wirehub.broker.memory import MemoryBroker, entry_bytes
from wirehub.broker import redis as redis_module
from wirehub.broker.redis import RedisBroker
from wirehub.broker.shards import ShardedBroker
from wirehub.protocol.errors import Unavailable
from wirehub.protocol.messages import Publication


async def settled(result: Any) -> Any:
    """A publish's answer, whether the broker gave it at once or as a future."""
    return await result if isinstance(result, asyncio.Future) else result


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["memory", "redis", "redis-shards"])
def make_broker(request: pytest.FixtureRequest):
    """Each broker, for the semantics all must share; ``await make(clock)``."""
    async def make(clock: Clock) -> Any:
        if request.param == "memory":
            return MemoryBroker(clock=clock)
        if request.param == "redis":
            broker = RedisBroker(request.getfixturevalue("redis_server").url, clock=clock)
        else:
            broker = ShardedBroker([server.url for server in request.getfixturevalue("redis_shards")], clock=clock)
        await broker.start()
        return broker
    return make


async def offsets(broker: Any, channel: str, **kwargs: Any) -> list[int]:
    return [pub.offset for pub in (await broker.history(channel, **kwargs)).publications]


async def test_history_pages_and_trims_the_same_on_both_brokers(make_broker):
    broker = await make_broker(Clock())
    try:
        keep = HistoryOptions(size=5)
        positions = [await settled(broker.publish("c", b'{"n":%d}' % i, history=keep)) for i in range(8)]
        assert [p.offset for p in positions] == list(range(1, 9))
        assert len({p.epoch for p in positions}) == 1
        assert await offsets(broker, "c") == [4, 5, 6, 7, 8]
        assert await offsets(broker, "c", since=5, limit=2) == [6, 7]
        assert await offsets(broker, "c", reverse=True, limit=2) == [8, 7]
        assert await offsets(broker, "c", since=6, reverse=True) == [5, 4]
        page = await broker.history("c", since=5, limit=2)
        assert page.more and page.first_offset == 4 and page.position == positions[-1]
        assert (await broker.history("c", since=2)).publications[0].data == b'{"n":3}'
        nothing = await broker.history("never")
        assert nothing.publications == [] and nothing.position.offset == 0 and nothing.first_offset == 1
    finally:
        await broker.close()


async def test_history_ttl_on_both_brokers(make_broker):
    clock = Clock()
    broker = await make_broker(clock)
    try:
        keep = HistoryOptions(size=100, ttl_s=10)
        for _ in range(5):
            await settled(broker.publish("c", b"x", history=keep))
            clock.now += 3
        # Published at 0, 3, ... 12 s; now 15 s: the first two are older than 10 s.
        assert await offsets(broker, "c") == [3, 4, 5]
        assert (await broker.history("c")).first_offset == 3
        for _ in range(95):  # more expire at once than one publish trims in Redis (64)
            await settled(broker.publish("c", b"x", history=keep))
        clock.now += 20
        last = await settled(broker.publish("c", b"x", history=keep))
        assert await offsets(broker, "c") == [last.offset] == [101]
    finally:
        await broker.close()


async def test_history_max_bytes_per_channel_on_both_brokers(make_broker):
    broker = await make_broker(Clock())
    try:
        cost = entry_bytes(Publication("c", b"x" * 100, 1, "e"))  # 2 x data + overhead, on both
        keep = HistoryOptions(size=100, max_bytes=3 * cost)
        for _ in range(10):
            await settled(broker.publish("c", b"x" * 100, history=keep))
        assert await offsets(broker, "c") == [8, 9, 10]
        await settled(broker.publish("c", b"x" * 250, history=keep))  # one large pushes out two
        assert await offsets(broker, "c") == [10, 11]
    finally:
        await broker.close()


async def test_a_retried_publish_is_published_once_on_both_brokers(make_broker):
    broker = await make_broker(Clock())
    try:
        first, duplicate = await settled(broker.publish_once("c", b"1", "key-1"))
        again, repeated = await settled(broker.publish_once("c", b"1", "key-1"))
        other, _ = await settled(broker.publish_once("c", b"2", "key-2"))
        assert (duplicate, repeated) == (False, True) and again == first and other.offset == 2
    finally:
        await broker.close()


# -- gateways on one Redis --------------------------------------------------------------


async def test_three_gateways_deliver_every_offset_in_order(redis_server):
    count = 500
    async with running_gateway(broker=redis_server.url) as a, running_gateway(broker=redis_server.url) as b, \
            running_gateway(broker=redis_server.url) as c:
        async with json_client(a) as publisher, json_client(a) as local, json_client(b) as on_b, \
                json_client(c) as on_c:
            readers = (local, on_b, on_c)
            for reader in readers:
                assert (await reader.request(type="subscribe", channel="feed"))["position"]["offset"] == 0
            for i in range(count):  # not waiting for answers: they pipeline through Redis
                await publisher.send(type="publish", channel="feed", data={"i": i}, id=i)
            answers = [await publisher.recv() for _ in range(count)]
            assert [m["offset"] for m in answers] == list(range(1, count + 1))
            assert [m["type"] for m in answers] == ["published"] * count
            for reader in readers:
                got = [await reader.recv() for _ in range(count)]
                assert [(m["offset"], m["data"]["i"]) for m in got] == [(i + 1, i) for i in range(count)]


async def test_a_client_that_moves_to_another_gateway_resumes_without_a_gap(redis_server):
    channels = [ChannelOptions(pattern="feed", history_size=1000)]
    async with running_gateway(broker=redis_server.url, channels=channels) as a, \
            running_gateway(broker=redis_server.url, channels=channels) as b:
        async with json_client(a) as publisher:
            async with json_client(a) as mover:
                position = (await mover.request(type="subscribe", channel="feed"))["position"]
                for i in range(10):
                    await publisher.request(type="publish", channel="feed", data=i, id=i)
                last = [await mover.recv() for _ in range(10)][-1]["offset"]
            for i in range(10, 25):  # while it is away
                await publisher.request(type="publish", channel="feed", data=i, id=i)
            async with json_client(b) as moved:
                reply = await moved.request(type="subscribe", channel="feed",
                                            since={"offset": last, "epoch": position["epoch"]})
                assert reply["recovered"] is True and reply["position"]["offset"] == 25
                assert [(await moved.recv())["data"] for _ in range(15)] == list(range(10, 25))
                await publisher.request(type="publish", channel="feed", data=25, id=25)
                assert (await moved.recv())["offset"] == 26


async def test_patterns_and_exclude_self_across_gateways(redis_server):
    async with running_gateway(broker=redis_server.url) as a, running_gateway(broker=redis_server.url) as b:
        async with json_client(a) as publisher, json_client(b) as watcher:
            await watcher.request(type="subscribe", channel="prices.*")
            await publisher.request(type="subscribe", channel="prices.btc")
            reply = await publisher.request(type="publish", channel="prices.btc", data=1, id=1, exclude_self=True)
            assert reply["type"] == "published"
            assert (await watcher.recv())["data"] == 1
            await publisher.expect_silence()  # its own publish is not sent back to it
            await publisher.request(type="publish", channel="prices.btc.usd", data=2, id=2)
            await publisher.request(type="publish", channel="prices.eth", data=3, id=3)
            # prices.btc.usd is not covered by prices.* (one segment): the hub filters what Redis's glob lets by.
            assert (await watcher.recv())["data"] == 3


async def test_deployments_on_two_databases_of_one_redis_do_not_hear_each_other(redis_server):
    """Pub/sub ignores database numbers; the broker's channel names do not."""
    other_db = redis_server.url.rsplit("/", 1)[0] + "/1"
    async with running_gateway(broker=redis_server.url) as mine, running_gateway(broker=other_db) as theirs:
        async with json_client(mine) as reader, json_client(mine) as publisher, json_client(theirs) as stranger:
            await reader.request(type="subscribe", channel="feed")
            await stranger.request(type="subscribe", channel="feed")
            await stranger.send(type="publish", channel="feed", data="theirs", id=1)
            # Its answer and its delivery travel apart (publish and pub/sub connections): either comes first.
            assert {(await stranger.recv())["type"] for _ in range(2)} == {"published", "message"}
            await publisher.request(type="publish", channel="feed", data="mine", id=2)
            got = await reader.recv()  # had theirs leaked through, it would come first
            assert (got["offset"], got["data"]) == (1, "mine")


async def test_a_killed_subscriber_connection_is_refilled_from_the_stream(redis_server):
    """``CLIENT KILL`` drops the node's pub/sub connection mid-stream: the
    node reconnects and reads what it missed from the stream, in order."""
    count = 3000
    channels = [ChannelOptions(pattern="feed", history_size=count)]
    async with running_gateway(broker=redis_server.url, channels=channels) as a, \
            running_gateway(broker=redis_server.url, channels=channels) as b:
        async with json_client(a) as publisher, json_client(b) as reader:
            await reader.request(type="subscribe", channel="feed")

            async def publish() -> None:
                for i in range(count):
                    await publisher.send(type="publish", channel="feed", data=i)
                    if i == count // 3:
                        await asyncio.to_thread(redis_server.command, "CLIENT", "KILL", "TYPE", "pubsub")
            sending = asyncio.ensure_future(publish())
            got = [await reader.recv(timeout=20) for _ in range(count)]
            await sending
            assert [m["type"] for m in got] == ["message"] * count
            assert [m["offset"] for m in got] == list(range(1, count + 1))
            text = await _metrics(b)
            assert "wirehub_broker_resubscribes_total 1" in text and "wirehub_broker_offsets_lost_total 0" in text


async def test_hundreds_of_channels_catch_up_at_once_without_exhausting_connections(redis_server):
    """Every channel of a node catches up when its subscription is
    (re)confirmed: 300 at once must queue for the node's few connections,
    not fail and be taken for an outage."""
    channels = [f"c{i}" for i in range(300)]
    async with running_gateway(broker=redis_server.url) as a, \
            running_gateway(broker=redis_server.url, max_subscriptions_per_connection=1000) as b:
        async with json_client(a) as publisher, json_client(b) as reader:
            for channel in channels:  # sent without waiting: their confirmations arrive together
                await reader.send(type="subscribe", channel=channel)
            assert {(await reader.recv())["type"] for _ in channels} == {"subscribed"}
            await asyncio.to_thread(redis_server.command, "CLIENT", "KILL", "TYPE", "pubsub")
            await until(lambda: b.broker.resubscribes_total == 1, what="the node subscribing again")
            for channel in channels:
                await publisher.send(type="publish", channel=channel, data=channel)
            got = {(await reader.recv(timeout=20))["channel"] for _ in channels}
            assert got == set(channels)
            assert b.broker.outages_total == 0 and b.broker.publish_errors_total == 0


async def test_a_gap_the_stream_no_longer_holds_is_reported_not_skipped(redis_server):
    """No history: what the node missed while its connection was down
    cannot be refilled, and each subscriber is told which offsets (``lagged``)."""
    count = 3000
    async with running_gateway(broker=redis_server.url) as a, running_gateway(broker=redis_server.url) as b:
        async with json_client(a) as publisher, json_client(b) as reader:
            await reader.request(type="subscribe", channel="feed")
            await asyncio.to_thread(redis_server.command, "CLIENT", "KILL", "TYPE", "pubsub")
            for i in range(count):
                await publisher.send(type="publish", channel="feed", data=i, id=i)
            answers = [await publisher.recv() for _ in range(count)]
            assert answers[-1]["offset"] == count
            covered: list[int] = []
            while not covered or covered[-1] < count:
                msg = await reader.recv(timeout=20)
                if msg["type"] == "lagged":
                    covered += range(msg["from"], msg["to"] + 1)
                else:
                    assert msg["type"] == "message", msg
                    covered.append(msg["offset"])
            assert covered == list(range(1, count + 1))  # every offset: delivered or reported, in order


async def test_a_resume_past_the_end_is_refused_once_the_channel_is_live(redis_server):
    async with running_gateway(broker=redis_server.url) as a, running_gateway(broker=redis_server.url) as b:
        async with json_client(a) as publisher, json_client(b) as client:
            epoch = (await publisher.request(type="publish", channel="feed", data=0, id=0))["epoch"]
            reply = await client.request(type="subscribe", channel="feed", id=1, since={"offset": 99, "epoch": epoch})
            assert reply["type"] == "error" and reply["code"] == "invalid_field" and reply["id"] == 1, reply
            # Nothing was left subscribed: a plain subscribe is a new one, from the channel's position.
            reply = await client.request(type="subscribe", channel="feed", id=2)
            assert reply["type"] == "subscribed" and reply["position"] == {"offset": 1, "epoch": epoch}


# -- Redis down ----------------------------------------------------------------------------


async def test_redis_down_publishes_fail_fast_health_says_so_and_the_epoch_change_is_told(tmp_path: Path):
    server = RedisServer(tmp_path).start()  # no persistence: a restart loses every stream
    try:
        async with running_gateway(broker=server.url) as a, running_gateway(broker=server.url) as b:
            async with json_client(a) as publisher, json_client(b) as reader:
                before = (await reader.request(type="subscribe", channel="feed"))["position"]
                await publisher.request(type="publish", channel="feed", data=0, id=0)
                assert (await reader.recv())["offset"] == 1
                server.stop()
                await until(lambda: a.broker.health() is not None and b.broker.health() is not None,
                            what="both gateways noticing")
                reply = await publisher.request(type="publish", channel="feed", data=1, id=1)
                assert reply["type"] == "error" and reply["code"] == "unavailable" and reply["id"] == 1
                status, body = await _get(a.port, "/healthz")
                assert status == 503 and "unreachable" in body
                assert (await publisher.request(type="ping", id=2))["type"] == "pong"  # still connected
                refused = await publisher.request(type="subscribe", channel="other", id=4)
                assert refused["type"] == "error" and refused["code"] == "unavailable" and refused["id"] == 4
                server.start()
                await until(lambda: a.broker.health() is None and b.broker.health() is None,
                            timeout_s=20, what="both gateways reconnecting")
                assert (await _get(a.port, "/healthz"))[0] == 200
                published = await publisher.request(type="publish", channel="feed", data=2, id=3)
                assert published["offset"] == 1 and published["epoch"] != before["epoch"]
                notice = await reader.recv()
                assert notice["type"] == "subscribed" and notice["recovered"] is False
                assert notice["reason"] == "epoch_changed" and notice["position"]["epoch"] == published["epoch"]
                got = await reader.recv()
                assert got.get("offset") == 1, got
                assert "wirehub_broker_outages_total 1" in await _metrics(a)
    finally:
        server.stop()


async def test_the_python_client_hears_of_a_lost_stream_and_follows_the_new_one(tmp_path: Path):
    server = RedisServer(tmp_path).start()
    try:
        async with running_gateway(broker=server.url) as a, running_gateway(broker=server.url) as b:
            async with Client(f"ws://127.0.0.1:{b.port}/ws") as client, json_client(a) as publisher:
                gaps: list[Gap] = []
                client.on("gap", gaps.append)
                sub = await client.subscribe("feed")
                await publisher.request(type="publish", channel="feed", data="old", id=0)
                assert (await anext(sub)).offset == 1
                old_epoch = sub.position.epoch
                server.stop()
                await until(lambda: b.broker.health() is not None, what="the gateway noticing")
                server.start()
                await until(lambda: a.broker.health() is None, timeout_s=20, what="reconnecting")
                await publisher.request(type="publish", channel="feed", data="new", id=1)
                message = await asyncio.wait_for(anext(sub), 10)
                assert (message.offset, message.data) == (1, "new")
                assert [g.reason for g in gaps] == ["epoch_changed"]
                assert sub.position.offset == 1 and sub.position.epoch != old_epoch
    finally:
        server.stop()


async def test_with_aof_nothing_acknowledged_is_lost_across_a_redis_restart(tmp_path: Path):
    server = RedisServer(tmp_path, appendonly=True).start()
    channels = [ChannelOptions(pattern="feed", history_size=1000)]
    try:
        async with running_gateway(broker=server.url, channels=channels) as a, \
                running_gateway(broker=server.url, channels=channels) as b:
            async with json_client(a) as publisher, json_client(b) as reader:
                position = (await reader.request(type="subscribe", channel="feed"))["position"]
                for i in range(50):
                    assert (await publisher.request(type="publish", channel="feed", data=i, id=i))["offset"] == i + 1
                server.stop()
                await until(lambda: b.broker.health() is not None, what="the gateway noticing")
                server.start()
                await until(lambda: a.broker.health() is None, timeout_s=20, what="reconnecting")
                reply = await publisher.request(type="publish", channel="feed", data=50, id=50)
                assert reply["offset"] == 51 and reply["epoch"] == position["epoch"]
                got = [await reader.recv() for _ in range(51)]
                assert [m["offset"] for m in got] == list(range(1, 52))  # the same epoch throughout
            page = await b.history("feed")
            assert [p.offset for p in page.publications] == list(range(1, 52))
    finally:
        server.stop()


async def test_a_redis_that_refuses_writes_answers_unavailable(tmp_path: Path):
    server = RedisServer(tmp_path, extra=("--maxmemory", "2mb", "--maxmemory-policy", "noeviction")).start()
    try:
        channels = [ChannelOptions(pattern="big", history_size=100_000)]
        async with running_gateway(broker=server.url, channels=channels) as gw:
            async with json_client(gw) as client:
                data = "x" * 60_000
                for i in range(200):
                    reply = await client.request(type="publish", channel="big", data=data, id=i)
                    if reply["type"] == "error":
                        break
                assert reply["code"] == "unavailable" and "maxmemory" in reply["error"], reply
                assert (await client.request(type="ping", id="p"))["type"] == "pong"
                assert 'wirehub_errors_total{code="unavailable"}' in await _metrics(gw)
    finally:
        server.stop()


async def test_a_redis_that_stops_answering_fails_publishes_instead_of_hanging_them(redis_server, monkeypatch):
    """Redis frozen (SIGSTOP) with a publish in flight: the publish is answered
    ``unavailable`` once its reply is overdue, the broker reports the outage,
    and once Redis runs again the node reconnects and publishes go on."""
    monkeypatch.setattr(redis_module, "COMMAND_TIMEOUT_S", 0.5)
    broker = RedisBroker(redis_server.url)
    await broker.start()
    try:
        assert (await broker.publish("c", b"1")).offset == 1
        os.kill(redis_server.proc.pid, signal.SIGSTOP)
        try:
            with pytest.raises(Unavailable, match="may or may not have been taken"):
                await asyncio.wait_for(broker.publish("c", b"2"), 30)
            assert broker.health() is not None and broker.outages_total == 1
            with pytest.raises(Unavailable, match="unavailable"):
                broker.publish("c", b"3")
        finally:
            os.kill(redis_server.proc.pid, signal.SIGCONT)
        await until(lambda: broker.health() is None, timeout_s=30, what="the broker back")
        assert (await broker.publish("c", b"4")).offset in (2, 3)  # "2" may have been taken
    finally:
        await broker.close()


async def test_a_redis_that_accepts_but_never_answers_fails_the_start(redis_server, monkeypatch):
    """Frozen (SIGSTOP) before the gateway starts: the kernel still accepts
    the connection, so only a deadline turns the wait into an error."""
    monkeypatch.setattr(redis_module, "COMMAND_TIMEOUT_S", 0.5)
    os.kill(redis_server.proc.pid, signal.SIGSTOP)
    try:
        with pytest.raises(Unavailable, match="cannot reach the broker at .*: no answer"):
            await asyncio.wait_for(RedisBroker(redis_server.url).start(), 30)
    finally:
        os.kill(redis_server.proc.pid, signal.SIGCONT)


async def test_a_flushed_publish_script_fails_one_publish_and_is_loaded_again(redis_server):
    broker = RedisBroker(redis_server.url)
    await broker.start()
    try:
        assert (await broker.publish("c", b"1")).offset == 1
        redis_server.command("SCRIPT", "FLUSH")
        with pytest.raises(Unavailable, match="lost wirehub's publish script"):
            await broker.publish("c", b"2")
        await until(lambda: broker.outages_total == 1 and broker.health() is None, what="a new connection")
        assert (await broker.publish("c", b"3")).offset == 2
    finally:
        await broker.close()


async def test_the_http_api_waits_for_redis(redis_server):
    async with running_gateway(broker=redis_server.url, api_port=0) as gw:
        async with json_client(gw) as reader:
            await reader.request(type="subscribe", channel="feed")
            status, body = await _post(gw.http_api.port, "/api/publish", {"channel": "feed", "data": 7})
            assert status == 200 and json.loads(body)["offset"] == 1
            status, body = await _post(gw.http_api.port, "/api/batch",
                                       {"publishes": [{"channel": "feed", "data": 8}, {"channel": "$x", "data": 9}]})
            results = json.loads(body)["results"]
            assert status == 200 and results[0]["offset"] == 2 and results[1]["error"]["code"] == "invalid_channel"
            assert [(await reader.recv())["data"] for _ in range(2)] == [7, 8]


def test_serve_exits_2_on_a_broker_it_cannot_use():
    closed = free_port()
    for url, said in ((f"redis://127.0.0.1:{closed}/0", "cannot reach the broker"),
                      ("http://127.0.0.1:6379", "expected redis://")):
        done = subprocess.run([sys.executable, "-m", "wirehub", "serve", "--port", "0", "--broker", url],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and said in done.stderr, done.stderr


async def test_a_broker_closed_right_after_it_started_stops(redis_server):
    """``close`` while the subscription connection is still being made: the
    cancellation can be absorbed on the way (redis-py's ping returned instead),
    and the supervisor must still see that it is closing, not wait on forever."""
    for _ in range(3):
        broker = RedisBroker(redis_server.url)
        await broker.start()
        await asyncio.wait_for(broker.close(), 10)
    assert redis_server.command("CLIENT", "LIST").count(b"cmd=subscribe") == 0


async def test_an_embedded_gateway_says_why_it_cannot_start(redis_server):
    redis_server.stop()
    gateway = Gateway(Config(port=0, broker=redis_server.url))
    with pytest.raises(Unavailable, match="cannot reach the broker"):
        await gateway.start()


# -- helpers -----------------------------------------------------------------------------------


async def _get(port: int, path: str) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        raw = (await asyncio.wait_for(reader.read(), 5)).decode()
    finally:
        writer.close()
    return int(raw.split()[1]), raw.partition("\r\n\r\n")[2]


async def _post(port: int, path: str, body: dict[str, Any]) -> tuple[int, str]:
    payload = json.dumps(body).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(payload)}\r\n"
                     f"Connection: close\r\n\r\n".encode() + payload)
        raw = (await asyncio.wait_for(reader.read(), 10)).decode()
    finally:
        writer.close()
    return int(raw.split()[1]), raw.partition("\r\n\r\n")[2]


async def _metrics(gw: Gateway) -> str:
    return (await _get(gw.port, "/metrics"))[1]


# -- --workers ---------------------------------------------------------------------------------


def _children(pid: int) -> set[int]:
    """The pids of ``pid``'s child processes (from /proc)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                found.add(int(entry.name))
    return found


async def test_workers_share_a_port_and_a_killed_one_is_replaced_without_losing_a_message(redis_server):
    """``--workers 2``: each worker is killed with SIGKILL in turn, so every
    client's connection is cut at least once; the supervisor restarts each,
    and the client library reconnects, publishes on (each publish once) and
    resumes every subscription: every offset arrives, once, in order."""
    port, count = free_port(), 300
    proc = subprocess.Popen([sys.executable, "-m", "wirehub", "serve", "--port", str(port), "--workers", "2",
                             "--broker", redis_server.url, "--channel", f"feed:history_size={count}"],
                            stderr=subprocess.PIPE, text=True)
    try:
        banner = await asyncio.to_thread(proc.stderr.readline)
        assert "listening on" in banner and "2 workers" in banner, banner
        workers = _children(proc.pid)
        assert len(workers) == 2
        url = f"ws://127.0.0.1:{port}/ws"
        options = {"reconnect_interval_s": 0.05, "max_reconnect_interval_s": 0.2}
        readers = [Client(url, **options) for _ in range(4)]
        publisher = Client(url, **options)
        for client in (*readers, publisher):
            await client.start()
        gaps: list[Gap] = []
        subs = []
        for reader in readers:
            reader.on("gap", gaps.append)
            subs.append(await reader.subscribe("feed"))

        async def kill_and_wait_for_restart(pid: int) -> None:
            proc_line = asyncio.to_thread(proc.stderr.readline)
            os.kill(pid, signal.SIGKILL)
            said = await proc_line
            assert f"(pid {pid}) exited with signal SIGKILL" in said and "restarting" in said, said
            await until(lambda: len(_children(proc.pid) - {pid}) == 2, what="the worker restarted")

        async def publish() -> None:
            for i in range(count):
                assert (await publisher.publish("feed", i)).offset == i + 1
                if i == count // 3:
                    await kill_and_wait_for_restart(min(workers))
                elif i == 2 * count // 3:
                    await kill_and_wait_for_restart(max(workers))

        async def read(sub: Any) -> list[tuple[int, Any]]:
            got = []
            async for message in sub:
                got.append((message.offset, message.data))
                if message.offset == count:
                    return got
            return got

        results = await asyncio.gather(publish(), *(read(sub) for sub in subs))
        for got in results[1:]:
            assert got == [(i + 1, i) for i in range(count)]
        assert gaps == []
        for client in (*readers, publisher):
            await client.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        status = await asyncio.to_thread(proc.wait, 30)
        said = proc.stderr.read()
        proc.stderr.close()
        assert status == 0, said
    assert not (_children(proc.pid)), "workers outlived their supervisor"


def test_workers_need_a_shared_broker_and_a_port():
    for args, said in ((["--workers", "2"], "needs a shared broker"),
                       (["--workers", "2", "--broker", "redis://127.0.0.1:1/0", "--port", "0"], "give port")):
        done = subprocess.run([sys.executable, "-m", "wirehub", "serve", *args], capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 2 and said in done.stderr, done.stderr


async def test_the_cluster_counts_subscribers_and_sums_its_figures(redis_server):
    async with running_gateway(broker=redis_server.url) as a, running_gateway(broker=redis_server.url) as b:
        async with json_client(a) as one, json_client(b) as two, json_client(b) as three:
            for client in (one, two, three):
                await client.request(type="subscribe", channel="room")
            await two.request(type="subscribe", channel="other")
            # Each gateway counts its own at once, the other's as of its last heartbeat.
            await _until_async(lambda: a.subscribers("room"), 3)
            assert await b.subscribers("room") == 3 and await a.subscribers("other") == 1
            await _until_async(lambda: _cluster_figure(a, "wirehub_cluster_connections"), 3)
            assert await _cluster_figure(b, "wirehub_cluster_nodes") == 2
            assert await _cluster_figure(a, "wirehub_cluster_subscriptions") == 4
            await three.ws.close()
            await _until_async(lambda: a.subscribers("room"), 2)
        await b.stop(timeout_s=1.0)
        # A gateway gone: its counts drop out once its heartbeat is older than NODE_TTL_S.
        await _until_async(lambda: _cluster_figure(a, "wirehub_cluster_nodes"), 1, timeout_s=20)
        assert await a.subscribers("room") == 0


async def _until_async(read: Any, wanted: Any, timeout_s: float = 10.0) -> None:
    """Wait until the coroutine ``read()`` answers ``wanted`` (figures shared by heartbeats)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while (got := await read()) != wanted:
        assert asyncio.get_running_loop().time() < deadline, f"{got!r}, not {wanted!r}, after {timeout_s} s"
        await asyncio.sleep(0.05)


async def _cluster_figure(gw: Gateway, name: str) -> float:
    for line in (await _metrics(gw)).splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} is not on /metrics")
