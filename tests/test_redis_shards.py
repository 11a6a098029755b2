"""Channels spread over two Redis servers (``broker/shards.py``, docs/scaling.md):
each channel on one shard, every promise of the one-Redis broker kept per
channel, a shard down failing only its channels.

Every test starts its own two ``redis-server`` processes (``redis_shards``).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from helpers import json_client, metrics_text, running_gateway, until
from redis_server import RedisServer
from test_redis_broker import _get, _until_async
from wirehub import Config, Gateway
from wirehub.broker.shards import jump_hash, shard_of
from wirehub.config import ChannelOptions
from wirehub.protocol.errors import Unavailable


def on_each_shard(prefix: str, per_shard: int) -> list[list[str]]:
    """``per_shard`` channel names for each of two shards."""
    found: list[list[str]] = [[], []]
    i = 0
    while min(len(names) for names in found) < per_shard:
        channel = f"{prefix}{i}"
        if len(found[shard_of(channel, 2)]) < per_shard:
            found[shard_of(channel, 2)].append(channel)
        i += 1
    return found


def broker_url(shards: list[RedisServer]) -> str:
    return ",".join(server.url for server in shards)


def test_channels_spread_evenly_and_a_new_shard_takes_only_its_share():
    channels = [f"room.{i}" for i in range(20_000)]
    two = [shard_of(c, 2) for c in channels]
    three = [shard_of(c, 3) for c in channels]
    assert 0.47 < two.count(0) / len(channels) < 0.53
    moved = [(before, after) for before, after in zip(two, three, strict=True) if before != after]
    assert 0.30 < len(moved) / len(channels) < 0.37          # about 1/3, not most of them
    assert {after for _, after in moved} == {2}              # and only to the new shard
    assert [jump_hash(key, 1) for key in range(100)] == [0] * 100


async def test_gateways_on_two_shards_deliver_every_offset_and_keep_each_channel_on_one(redis_shards):
    url = broker_url(redis_shards)
    history = [ChannelOptions(pattern="room.*", history_size=100)]
    by_shard = on_each_shard("room.", 3)
    channels = by_shard[0] + by_shard[1]
    count = 20
    async with running_gateway(broker=url, channels=history) as a, \
            running_gateway(broker=url, channels=history) as b:
        async with json_client(a) as publisher, json_client(b) as reader:
            for channel in channels:
                assert (await reader.request(type="subscribe", channel=channel))["position"]["offset"] == 0
            for i in range(count):  # not waiting for answers: they pipeline through both shards
                for channel in channels:
                    await publisher.send(type="publish", channel=channel, data=i, id=f"{channel}/{i}")
            answers = [await publisher.recv() for _ in range(count * len(channels))]
            assert {m["type"] for m in answers} == {"published"}
            got: dict[str, list[int]] = {channel: [] for channel in channels}
            for _ in range(count * len(channels)):
                message = await reader.recv()
                got[message["channel"]].append(message["offset"])
                assert message["data"] == message["offset"] - 1
            assert got == {channel: list(range(1, count + 1)) for channel in channels}
            # A client arriving at the other gateway resumes from the right shard's stream.
            epoch = next(m["epoch"] for m in answers if m["channel"] == channels[-1])
            async with json_client(a) as mover:
                reply = await mover.request(type="subscribe", channel=channels[-1],
                                            since={"offset": 15, "epoch": epoch})
                assert reply["recovered"] is True
                assert [(await mover.recv())["offset"] for _ in range(5)] == [16, 17, 18, 19, 20]
    for index, server in enumerate(redis_shards):
        for channel in channels:
            kept = server.command("EXISTS", f"wh:{{{channel}}}:m").strip()
            assert kept == (b"1" if shard_of(channel, 2) == index else b"0"), (channel, index)


async def test_a_shard_down_fails_only_its_channels(redis_shards):
    url = broker_url(redis_shards)
    (steady, *_), (lost, *_) = on_each_shard("feed", 1)
    async with running_gateway(broker=url) as a, running_gateway(broker=url) as b:
        async with json_client(a) as publisher, json_client(b) as reader:
            before = (await reader.request(type="subscribe", channel=lost))["position"]
            await reader.request(type="subscribe", channel=steady)
            redis_shards[1].stop()
            await until(lambda: a.broker.health() is not None and b.broker.health() is not None,
                        what="both gateways noticing")
            refused = await publisher.request(type="publish", channel=lost, data="x", id=1)
            assert refused["type"] == "error" and refused["code"] == "unavailable"
            accepted = await publisher.request(type="publish", channel=steady, data="y", id=2)
            assert accepted["type"] == "published" and accepted["offset"] == 1
            assert (await reader.recv())["data"] == "y"          # the other shard's channels go on
            status, body = await _get(a.port, "/healthz")
            assert status == 503 and f":{redis_shards[1].port}/0 unreachable" in body
            assert f":{redis_shards[0].port}" not in body
            assert 'wirehub_broker_up{shard="0"} 1' in await metrics_text(a.port)
            redis_shards[1].start()                              # without persistence: its streams are gone
            await until(lambda: a.broker.health() is None and b.broker.health() is None,
                        timeout_s=20, what="both gateways reconnecting")
            published = await publisher.request(type="publish", channel=lost, data="z", id=3)
            assert published["offset"] == 1 and published["epoch"] != before["epoch"]
            notice = await reader.recv()
            assert notice["type"] == "subscribed" and notice["reason"] == "epoch_changed"
            assert (await reader.recv())["data"] == "z"


async def test_a_pattern_hears_channels_on_every_shard(redis_shards):
    url = broker_url(redis_shards)
    channels = [name for names in on_each_shard("prices.", 2) for name in names]
    async with running_gateway(broker=url) as a, running_gateway(broker=url) as b:
        async with json_client(a) as publisher, json_client(b) as watcher:
            await watcher.request(type="subscribe", channel="prices.*")
            for channel in channels:
                await publisher.request(type="publish", channel=channel, data=channel, id=channel)
            assert {(await watcher.recv())["data"] for _ in channels} == set(channels)


async def test_the_cluster_figures_live_on_the_first_shard(redis_shards):
    url = broker_url(redis_shards)
    (_, [channel]) = on_each_shard("room", 1)            # a channel of the second shard
    async with running_gateway(broker=url) as a, running_gateway(broker=url) as b:
        async with json_client(a) as one, json_client(b) as two:
            for client in (one, two):
                await client.request(type="subscribe", channel=channel)
            await _until_async(lambda: a.subscribers(channel), 2)
            assert await b.subscribers(channel) == 2
            text = await metrics_text(b.port)
            assert 'wirehub_broker_up{shard="1"} 1' in text and "wirehub_broker_shards 2" in text
            assert "wirehub_cluster_nodes 2" in text
    assert redis_shards[0].command("EXISTS", "wh:nodes").strip() == b"1"
    assert redis_shards[1].command("EXISTS", "wh:nodes").strip() == b"0"


async def test_a_gateway_that_lists_the_shards_otherwise_does_not_start(redis_shards):
    async with running_gateway(broker=broker_url(redis_shards)):
        swapped = Gateway(Config(port=0, broker=broker_url(redis_shards[::-1])))
        with pytest.raises(Unavailable, match="is shard 2 of this cluster, not 1: list the Redis servers"):
            await swapped.start()
        alone = Gateway(Config(port=0, broker=redis_shards[1].url))
        with pytest.raises(Unavailable, match="is shard 2 of a sharded cluster: give --broker every shard"):
            await alone.start()
        async with running_gateway(broker=broker_url(redis_shards)):
            pass  # the same order again: fine
    assert redis_shards[1].command("GET", "wh:shard").strip() == b"1"


def test_a_list_that_names_a_server_twice_or_a_bad_url_is_refused():
    with pytest.raises(ValueError, match="named twice"):
        Config(broker="redis://127.0.0.1:6379/0, redis://127.0.0.1:6379/0")
    with pytest.raises(ValueError, match="expected redis://"):
        Config(broker="redis://127.0.0.1:6379/0,http://127.0.0.1:6380/0")


def test_serve_exits_2_when_one_shard_does_not_answer(redis_server):
    from helpers import free_port

    dead = f"redis://127.0.0.1:{free_port()}/0"
    proc = subprocess.run([sys.executable, "-m", "wirehub", "serve", "--port", "0", "--broker",
                           f"{redis_server.url},{dead}"], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2
    assert f"cannot reach the broker at {dead}" in proc.stderr
