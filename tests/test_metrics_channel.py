"""``$sys:metrics`` (``sources/metrics.py``): the live metrics channel.

Real gateways and clients on loopback. Time is the gateway's ``ManualClock``:
an update is produced by ``clock.advance()`` and pushed into the watchers'
batches before it returns, so a test reads it next; that nothing else came
is shown by a ``ping`` whose ``pong`` is the next message.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from helpers import JsonClient, json_client, running_gateway, subscribed_position

from wirehub import Config, Gateway, cli
from wirehub.auth import mint_token
from wirehub.clock import ManualClock
from wirehub.config import ConfigError, load
from wirehub.protocol.errors import Forbidden, InvalidChannel

METRICS = "$sys:metrics"
SECRET = "metrics-channel-secret-long-enough-for-hs256!"
INTERVAL = 2.0
DOCS = Path(__file__).resolve().parent.parent / "docs"
# No heartbeat ping or token expiry within the minutes a test moves the clock.
QUIET = {"ping_interval_s": 3600.0, "ping_timeout_s": 3600.0, "metrics_interval_s": INTERVAL}


@contextlib.asynccontextmanager
async def gateway_on(clock: ManualClock, impl_name: str, **config: Any) -> AsyncIterator[Gateway]:
    gw = Gateway(Config(port=0, **{**QUIET, **config}), implementation=impl_name, clock=clock)
    async with running_gateway(gateway=gw):
        yield gw


def token(clock: ManualClock, **claims: Any) -> str:
    claims.setdefault("sub", "alice")
    return mint_token(SECRET, now=clock.wall(), ttl_s=86400, **claims)


async def watch(c: JsonClient, id: Any = 1) -> tuple[dict[str, Any], dict[str, Any]]:
    """Subscribe to ``$sys:metrics``; return the ``subscribed`` position and the snapshot ``message``."""
    position = subscribed_position(await c.request(type="subscribe", channel=METRICS, id=id), METRICS, id=id)
    return position, await c.recv()


async def next_metrics(c: JsonClient, kind: str = "metrics_update") -> dict[str, Any]:
    msg = await c.recv()
    assert msg["type"] == "message" and msg["channel"] == METRICS and msg["data"]["type"] == kind, msg
    return msg


async def nothing_queued(c: JsonClient) -> None:
    """Whatever the gateway queued for ``c`` before now comes before this pong: nothing did."""
    assert await c.request(type="ping", id="quiet") == {"type": "pong", "id": "quiet"}


def node(msg: dict[str, Any]) -> dict[str, Any]:
    [entry] = msg["data"]["metrics"]["nodes"]
    return entry


class TestSnapshot:
    async def test_a_snapshot_follows_subscribed_at_the_next_offset_with_sane_counts(self, impl_name):
        config = {**QUIET, "metrics_interval_s": 3600.0}  # the real clock: no update during the test
        async with running_gateway(impl_name, **config) as gw, json_client(gw) as other, \
                json_client(gw) as watcher:
            await other.subscribe("prices")
            position, msg = await watch(watcher)
            assert msg["type"] == "message" and msg["channel"] == METRICS
            assert msg["offset"] == position["offset"] + 1
            data = msg["data"]
            assert data["type"] == "metrics_snapshot" and isinstance(data["ts"], float)
            metrics = data["metrics"]
            assert metrics["interval_s"] == 3600.0
            entry = node(msg)
            assert entry["node"] and entry["window_s"] >= 0 and entry["uptime_s"] >= 0
            assert entry["connections"] >= 2
            assert entry["subscriptions"] == 2 and entry["channels"] == 2   # prices, $sys:metrics
            assert entry["patterns"] == 0 and entry["docker_log_streams"] == 0
            total = metrics["total"]
            assert total == {k: v for k, v in entry.items() if k not in ("node", "uptime_s", "window_s")}
            assert gw.metrics_source.watching

    async def test_every_field_is_documented(self, impl_name):
        clock = ManualClock()
        async with gateway_on(clock, impl_name) as gw, json_client(gw) as c:
            _, msg = await watch(c)
        documented = (DOCS / "operations.md").read_text()
        fields = {*msg["data"], *msg["data"]["metrics"], *node(msg)}
        missing = sorted(f for f in fields if f"`{f}`" not in documented)
        assert not missing, f"docs/operations.md does not describe {missing}"

    async def test_a_later_viewer_gets_its_own_snapshot_and_the_others_see_it(self, impl_name):
        clock = ManualClock()
        async with gateway_on(clock, impl_name) as gw, json_client(gw) as a, json_client(gw) as b:
            _, first = await watch(a)
            position, second = await watch(b, id=2)
            assert second["offset"] == position["offset"] + 1 == first["offset"] + 1
            assert node(second)["subscriptions"] == 2
            assert (await next_metrics(a, "metrics_snapshot"))["offset"] == second["offset"]
            clock.advance(INTERVAL)  # one timer for both
            assert (await next_metrics(a))["offset"] == (await next_metrics(b))["offset"] == second["offset"] + 1
            await nothing_queued(a)
            await nothing_queued(b)

    async def test_the_python_client_receives_the_snapshot(self, impl_name):
        import wirehub

        clock = ManualClock()
        async with gateway_on(clock, impl_name) as gw, \
                wirehub.connect(f"ws://127.0.0.1:{gw.port}/ws") as client:
            sub = await client.subscribe(METRICS)
            snapshot = await anext(sub)
            assert snapshot.data["type"] == "metrics_snapshot"
            clock.advance(INTERVAL)
            update = await anext(sub)
            assert update.data["type"] == "metrics_update" and update.offset == snapshot.offset + 1


    async def test_since_gets_a_fresh_snapshot_and_tail_is_refused(self, impl_name):
        clock = ManualClock()
        async with gateway_on(clock, impl_name) as gw, json_client(gw) as c:
            position, snapshot = await watch(c)
            await c.request(type="unsubscribe", channel=METRICS, id=2)
            reply = await c.request(type="subscribe", channel=METRICS, id=3, since=position)
            again = subscribed_position(reply, METRICS, id=3)   # no `recovered`: nothing to replay
            assert again["offset"] == snapshot["offset"]
            assert (await next_metrics(c, "metrics_snapshot"))["offset"] == snapshot["offset"] + 1
            await c.request(type="unsubscribe", channel=METRICS, id=4)
            reply = await c.request(type="subscribe", channel=METRICS, id=5, tail=3)
            assert reply["code"] == "invalid_field" and "no history" in reply["error"]
            assert METRICS not in gw.hub.channels and not gw.metrics_source.watching


class TestTimer:
    async def test_updates_come_every_interval_only_while_watched(self, impl_name):
        clock = ManualClock()
        async with gateway_on(clock, impl_name) as gw, json_client(gw) as c:
            source = gw.metrics_source
            assert not source.watching and source._tick not in clock.scheduled()
            _, snapshot = await watch(c)
            assert source._tick in clock.scheduled()
            clock.advance(INTERVAL - 0.5)
            await nothing_queued(c)
            clock.advance(0.5)
            update = await next_metrics(c)
            assert update["offset"] == snapshot["offset"] + 1
            assert update["data"]["ts"] == pytest.approx(snapshot["data"]["ts"] + INTERVAL, abs=0.002)
            assert node(update)["window_s"] == INTERVAL
            await nothing_queued(c)
            clock.advance(3 * INTERVAL)
            updates = [await next_metrics(c) for _ in range(3)]
            assert [u["offset"] for u in updates] == [update["offset"] + i for i in (1, 2, 3)]
            await nothing_queued(c)

            assert await c.request(type="unsubscribe", channel=METRICS, id=9) == \
                {"type": "unsubscribed", "channel": METRICS, "id": 9}
            assert not source.watching and source._tick not in clock.scheduled()
            sent, position = source.sent, gw.hub.position(METRICS)
            clock.advance(10 * INTERVAL)
            assert source.sent == sent and gw.hub.position(METRICS) == position
            assert source._tick not in clock.scheduled()

            # Watched again: a snapshot at once, the next offset, the timer back.
            again, snapshot = await watch(c, id=10)
            assert again["offset"] == position.offset and snapshot["offset"] == position.offset + 1
            clock.advance(INTERVAL)
            assert (await next_metrics(c))["offset"] == snapshot["offset"] + 1

    async def test_the_timer_stops_when_the_last_viewer_disconnects(self, impl_name):
        clock = ManualClock()
        async with gateway_on(clock, impl_name) as gw:
            async with json_client(gw) as a, json_client(gw) as b:
                await watch(a)
                await watch(b, id=2)
                await next_metrics(a, "metrics_snapshot")
            await until_vacated(gw)
            assert gw.metrics_source._tick not in clock.scheduled()
            sent = gw.metrics_source.sent
            clock.advance(5 * INTERVAL)
            assert gw.metrics_source.sent == sent


async def until_vacated(gw: Gateway) -> None:
    from helpers import until

    await until(lambda: METRICS not in gw.hub.channels and not gw.metrics_source.watching,
                what="$sys:metrics vacated")


class TestRates:
    async def test_rates_are_what_happened_between_two_ticks(self, impl_name):
        clock = ManualClock()
        k = 10
        async with gateway_on(clock, impl_name) as gw, json_client(gw) as watcher, \
                json_client(gw) as subscriber, json_client(gw) as publisher:
            await subscriber.subscribe("prices")
            await watch(watcher)
            sent_bytes = received_bytes = 0
            for n in range(k):
                raw = json.dumps({"type": "publish", "channel": "prices", "data": {"n": n}, "id": n})
                await publisher.ws.send(raw)
                assert (await publisher.recv())["type"] == "published"
                received_bytes += len(raw)
            for n in range(k):
                text = await subscriber.ws.recv()
                assert json.loads(text)["data"] == {"n": n}
                sent_bytes += 2 + len(text.encode())  # a text frame's 2-byte header: under 126 bytes
            clock.advance(INTERVAL)
            entry = node(await next_metrics(watcher))
            assert entry["window_s"] == INTERVAL
            assert entry["publications_per_s"] == k / INTERVAL
            assert entry["deliveries_per_s"] == k / INTERVAL
            assert entry["messages_in_per_s"] == k / INTERVAL
            assert entry["bytes_in_per_s"] == round(received_bytes / INTERVAL, 3)
            assert entry["bytes_out_per_s"] == round(sent_bytes / INTERVAL, 3)
            # A quiet window: the metrics' own publications and deliveries are not counted.
            clock.advance(INTERVAL)
            quiet = node(await next_metrics(watcher))
            assert {name: quiet[name] for name in quiet if name.endswith("_per_s")} == dict.fromkeys(
                ["publications_per_s", "deliveries_per_s", "messages_in_per_s", "bytes_in_per_s",
                 "bytes_out_per_s"], 0.0)
            assert gw.metrics.publications_total == k + 3  # and the three metrics messages

    async def test_a_later_viewer_sees_the_running_window_and_leaves_it_running(self, impl_name):
        clock = ManualClock()
        k = 6
        async with gateway_on(clock, impl_name) as gw, json_client(gw) as first, json_client(gw) as later:
            await watch(first)
            for n in range(k):
                await first.request(type="publish", channel="nobody", data=n, id=n)
            clock.advance(INTERVAL / 2)
            subscribe = json.dumps({"type": "subscribe", "channel": METRICS, "id": 2})
            _, snapshot = await watch(later, id=2)
            assert node(snapshot)["window_s"] == INTERVAL / 2
            assert node(snapshot)["publications_per_s"] == k / (INTERVAL / 2)
            assert node(snapshot)["messages_in_per_s"] == (k + 1) / (INTERVAL / 2)  # and its subscribe
            await next_metrics(first, "metrics_snapshot")
            clock.advance(INTERVAL / 2)
            entry = node(await next_metrics(first))
            assert entry["window_s"] == INTERVAL   # the window the first viewer started
            assert entry["publications_per_s"] == k / INTERVAL   # the later snapshot is not counted
            assert entry["deliveries_per_s"] == 0.0               # nor its two deliveries
            assert entry["messages_in_per_s"] == (k + 1) / INTERVAL
            assert entry["bytes_out_per_s"] == 0.0
            published = sum(len(json.dumps({"type": "publish", "channel": "nobody", "data": n, "id": n}))
                            for n in range(k))
            assert entry["bytes_in_per_s"] == round((published + len(subscribe)) / INTERVAL, 3)

    async def test_totals_move_with_refusals(self, impl_name):
        clock = ManualClock()
        async with gateway_on(clock, impl_name, jwt_secret=SECRET) as gw, \
                json_client(gw, f"/ws?token={token(clock, permissions=['admin'])}") as admin, \
                json_client(gw, f"/ws?token={token(clock, subscribe=['**'])}") as reader:
            _, snapshot = await watch(admin)
            assert node(snapshot)["forbidden_total"] == 0
            reply = await reader.request(type="subscribe", channel=METRICS, id=1)
            assert reply["code"] == "forbidden"
            clock.advance(INTERVAL)
            assert node(await next_metrics(admin))["forbidden_total"] == 1


class TestAccess:
    @pytest.mark.parametrize("permissions", [["sys:metrics"], ["admin"]])
    async def test_a_permission_reads_it(self, impl_name, permissions):
        clock = ManualClock()
        async with gateway_on(clock, impl_name, jwt_secret=SECRET) as gw, \
                json_client(gw, f"/ws?token={token(clock, permissions=permissions)}") as c:
            _, snapshot = await watch(c)
            assert snapshot["data"]["type"] == "metrics_snapshot"

    async def test_channel_claims_do_not_read_it(self, impl_name):
        clock = ManualClock()
        async with gateway_on(clock, impl_name, jwt_secret=SECRET, default_subscribe=["**"]) as gw, \
                json_client(gw, f"/ws?token={token(clock, subscribe=['**'], permissions=['runners:delete'])}") as c:
            reply = await c.request(type="subscribe", channel=METRICS, id=1)
            assert reply == {"type": "error", "code": "forbidden", "id": 1,
                             "error": "not allowed to subscribe to '$sys:metrics'"}
            reply = await c.request(type="history", channel=METRICS, id=2)
            assert reply["code"] == "forbidden"
            assert gw.metrics.errors_total["forbidden"] == 2
            assert METRICS not in gw.hub.channels and not gw.metrics_source.watching

    async def test_a_refreshed_token_without_the_permission_ends_the_subscription(self, impl_name):
        clock = ManualClock()
        async with gateway_on(clock, impl_name, jwt_secret=SECRET) as gw, \
                json_client(gw, f"/ws?token={token(clock, permissions=['sys:metrics'])}") as c:
            await watch(c)
            await c.send(type="auth", token=token(clock, subscribe=["**"]), id="a")
            assert await c.recv() == {"type": "unsubscribed", "channel": METRICS, "reason": "forbidden"}
            assert (await c.recv())["type"] == "authenticated"
            assert not gw.metrics_source.watching

    async def test_nobody_publishes_on_it(self, impl_name):
        clock = ManualClock()
        async with gateway_on(clock, impl_name) as gw, json_client(gw) as c:
            reply = await c.request(type="publish", channel=METRICS, data={"fake": 1}, id=1)
            assert reply == {"type": "error", "code": "forbidden", "id": 1,
                             "error": "'$sys:metrics' is written by the gateway only"}
            with pytest.raises(Forbidden):
                gw.publish(METRICS, {"fake": 1})
        async with gateway_on(clock, impl_name, jwt_secret=SECRET) as gw, \
                json_client(gw, f"/ws?token={token(clock, publish=['**'], permissions=['admin'])}") as c:
            reply = await c.request(type="publish", channel=METRICS, data={"fake": 1}, id=1)
            assert reply["code"] == "forbidden"

    @pytest.mark.parametrize("name", ["$sys:other", "$sys:metrics:x", "$sys", "$metrics", "$"])
    async def test_other_reserved_names_are_invalid(self, impl_name, name):
        clock = ManualClock()
        async with gateway_on(clock, impl_name) as gw, json_client(gw) as c:
            for msg_type, extra in (("subscribe", {}), ("publish", {"data": 1}), ("history", {})):
                reply = await c.request(type=msg_type, channel=name, id=1, **extra)
                assert reply["code"] == "invalid_channel", (msg_type, reply)
                assert "reserved" in reply["error"]
            with pytest.raises(InvalidChannel):
                gw.publish(name, 1)

    @pytest.mark.parametrize("pattern", ["$sys:*", "$sys:**", "$*"])
    async def test_a_pattern_cannot_name_it(self, impl_name, pattern):
        clock = ManualClock()
        async with gateway_on(clock, impl_name) as gw, json_client(gw) as c:
            assert (await c.request(type="subscribe", channel=pattern, id=1))["code"] == "invalid_channel"

    async def test_a_catch_all_pattern_does_not_receive_metrics(self, impl_name):
        clock = ManualClock()
        async with gateway_on(clock, impl_name) as gw, json_client(gw) as everything, \
                json_client(gw) as sys_only, json_client(gw) as watcher:
            assert await everything.subscribe("**") is None
            assert await sys_only.subscribe("*:metrics") is None
            await watch(watcher)
            clock.advance(INTERVAL)
            await next_metrics(watcher)
            await watcher.request(type="publish", channel="after", data=1, id=1)
            msg = await everything.recv()
            assert (msg["type"], msg["channel"]) == ("message", "after")  # not a metrics message first
            await nothing_queued(everything)
            await nothing_queued(sys_only)


class TestConfig:
    def test_the_interval_is_validated(self):
        assert Config().metrics_interval_s == 5.0
        assert load(overrides={"metrics_interval_s": "0.5"}).metrics_interval_s == 0.5
        for bad in ("0", "-1"):
            with pytest.raises(ConfigError, match="metrics_interval_s"):
                load(overrides={"metrics_interval_s": bad})

    def test_the_serve_flag(self, capsys):
        assert cli.main(["serve", "--metrics-interval-s", "0"]) == 2
        assert re.search(r"metrics_interval_s \(from --metrics-interval-s\)", capsys.readouterr().err)


def test_docker_log_streams_are_counted():
    pytest.importorskip("docker")
    from wirehub.sources.docker import DockerSources
    from wirehub.sources.docker_engine import Engine

    gw = Gateway(Config())
    docker = DockerSources(Engine("unix:///nonexistent/docker.sock"))
    docker.install(gw)
    assert gw.metrics_source.sample()["docker_log_streams"] == 0
    docker.logs.stats.running = 3   # what following three containers' logs leaves
    assert gw.metrics_source.sample()["docker_log_streams"] == 3


def test_the_totals_are_the_gateway_counters():
    gw = Gateway(Config())
    metrics = gw.metrics
    metrics.closes_total[1013] += 2
    metrics.closes_total[1000] += 7          # a normal close is no slow consumer
    metrics.lagged_total, metrics.dropped_total = 3, 40
    metrics.errors_total["rate_limited"] += 5
    metrics.errors_total["forbidden"] += 6
    metrics.refusals_total["max_connections"] += 1
    metrics.refusals_total["unauthorized"] += 2
    gw.gc_watch.collections = [10, 2, 1]
    gw.gc_watch.pause_seconds = 0.25
    entry = gw.metrics_source.sample()
    assert {name: entry[name] for name in entry if name.endswith("_total")} == {
        "slow_consumer_closes_total": 2, "lagged_total": 3, "dropped_total": 40, "rate_limited_total": 5,
        "forbidden_total": 6, "refused_connections_total": 3, "gc_collections_total": 13,
        "gc_pause_seconds_total": 0.25}


def test_the_total_sums_the_nodes():
    from wirehub.sources.metrics import total

    a = {"node": "a/1", "uptime_s": 9.0, "window_s": 5.0, "connections": 2, "publications_per_s": 0.1,
         "gc_pause_seconds_total": 0.1}
    b = {"node": "b/2", "uptime_s": 3.0, "window_s": 5.0, "connections": 5, "publications_per_s": 0.2,
         "gc_pause_seconds_total": 0.2}
    assert total([a, b]) == {"connections": 7, "publications_per_s": 0.3, "gc_pause_seconds_total": 0.3}
