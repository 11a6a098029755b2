"""Docker channels against a real engine (tests/engine/start-engine.sh starts one).

Each test runs its own containers (busybox, no network, labelled with a
value unique to the test) and its own gateway on loopback. Scripts in the
containers wait for a flag file (``wait_for``) where a test needs to act
between two phases of output, so nothing depends on sleeps.

The engine-restart test stops and starts the scripts' dockerd; it is last
in this file and leaves the engine running.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import re
import struct
import time
import uuid
from collections.abc import Iterator
from typing import Any

import docker
import pytest
import websockets
from picows import WSListener, WSMsgType, ws_connect

from docker_engine import LABEL, containers, engine_host, managed, run_script, stop_started_engine, wait_for
from helpers import (connect_recording, json_client, no_position, running_gateway, start_server,
                     subscribed_position, until)
from redis_server import RedisServer

from wirehub import Config, Gateway
from wirehub.broker.shards import shard_of
from wirehub.sources.docker import DockerSources
from wirehub.sources.docker_engine import Engine
from wirehub.sources.docker_logs import DockerLogsSource, _clocks_agree, ts_ns

TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z$")
# A container that never pauses: a numbered line every 5 ms, from 1.
PRINT_EVERY_5MS = "i=1; while true; do echo $i; i=$((i+1)); sleep 0.005; done"


@pytest.fixture(scope="session")
def docker_host() -> Iterator[str]:
    yield engine_host()
    stop_started_engine()  # what the session started, it stops


@pytest.fixture
def api(docker_host):
    client = docker.APIClient(base_url=docker_host, version="auto")
    yield client
    client.close()


@pytest.fixture
def made(api):
    with containers(api, uuid.uuid4().hex[:12]) as made:
        yield made


def docker_gateway(host: str, *, config: dict[str, Any] | None = None, **options: Any) -> tuple[Gateway, DockerSources]:
    gw = Gateway(Config(port=0, **(config or {})))
    sources = DockerSources(Engine(host), **options)
    sources.install(gw)
    return gw, sources


async def read_lines(client, channel: str, *, stop_at_end: bool = True, count: int | None = None,
                     timeout_s: float = 10.0) -> tuple[list[dict], dict | None]:
    """Messages on ``channel`` until stream_end (or ``count`` lines): (lines, stream_end)."""
    lines: list[dict] = []
    while count is None or len(lines) < count:
        msg = await client.recv(timeout_s)
        assert msg["type"] == "message" and msg["channel"] == channel, msg
        if msg["data"].get("type") == "stream_end":
            return lines, msg
        lines.append(msg)
    return lines, None


def numbers(lines: list[dict]) -> list[int]:
    return [int(m["data"]["line"]) for m in lines]


def assert_consecutive_offsets(lines: list[dict]) -> None:
    offsets = [m["offset"] for m in lines]
    assert offsets == list(range(offsets[0], offsets[0] + len(offsets))), offsets


async def printed(api, cid: str, count: int, timeout_s: float = 30.0) -> None:
    """Wait until the engine has line ``count`` of a container that numbers its lines."""
    deadline = time.monotonic() + timeout_s
    while True:
        last = (await asyncio.to_thread(api.logs, cid, tail=1)).split()
        if last and int(last[-1]) >= count:
            return
        assert time.monotonic() < deadline, f"line {count} not printed within {timeout_s} s"
        await asyncio.sleep(0.01)


# -- logs:<container> ---------------------------------------------------------------


async def test_tail_then_follow_without_gap_or_duplicate(docker_host, made):
    """Three viewers join before, at and during the live phase: each sees its tail,
    then every later line once, in order; the late joiners' tails come from the ring."""
    cid = made.create(f"seq 1 50; {wait_for()}; i=51; while [ $i -le 600 ]; do echo $i; "
                      f"i=$((i+1)); [ $((i % 5)) -eq 0 ] && sleep 0.01; done; exit 0")
    ch = f"logs:{cid}"
    gw, sources = docker_gateway(docker_host)
    async with running_gateway(gateway=gw), json_client(gw) as a, json_client(gw) as b, json_client(gw) as c:
        assert no_position(await a.request(type="subscribe", channel=ch, tail=5, id=1)) == \
            {"type": "subscribed", "channel": ch, "id": 1}
        history_a, _ = await read_lines(a, ch, count=5)
        assert numbers(history_a) == [46, 47, 48, 49, 50]
        assert all(TS.match(m["data"]["ts"]) and m["data"]["stream"] == "stdout" for m in history_a)
        await a.expect_silence(0.2)

        assert no_position(await b.request(type="subscribe", channel=ch, tail=20, id=2)) == \
            {"type": "subscribed", "channel": ch, "id": 2}
        history_b, _ = await read_lines(b, ch, count=20)
        assert numbers(history_b) == list(range(31, 51))
        assert [m["offset"] for m in history_b[-5:]] == [m["offset"] for m in history_a]

        await asyncio.to_thread(made.signal, cid)
        live_a, _ = await read_lines(a, ch, count=50)        # up to line 100
        await c.send(type="subscribe", channel=ch, tail=10, id=3)  # joins while lines flow
        rest_a, end_a = await read_lines(a, ch)
        all_a = history_a + live_a + rest_a
        assert numbers(all_a) == list(range(46, 601))
        assert_consecutive_offsets(all_a)
        assert end_a["data"]["exit_code"] == 0

        rest_b, end_b = await read_lines(b, ch)
        assert numbers(history_b + rest_b) == list(range(31, 601))
        assert end_b == end_a

        assert no_position(await c.recv()) == {"type": "subscribed", "channel": ch, "id": 3}
        lines_c, end_c = await read_lines(c, ch)
        first = numbers(lines_c)[0]
        assert first >= 91  # its tail ends at or after line 100, which a had seen
        assert numbers(lines_c) == list(range(first, 601))
        by_offset = {m["offset"]: m["data"] for m in all_a}
        assert all(by_offset[m["offset"]] == m["data"] for m in lines_c)
        assert end_c == end_a
        assert sources.logs.stats.streams_started == 1  # b's and c's tails came from the ring


@pytest.mark.parametrize("tty", [False, True], ids=["multiplexed", "tty"])
async def test_streams_long_lines_invalid_utf8_and_exit_code(docker_host, made, api, tty):
    """stdout/stderr stay apart (a TTY has one stream), lines over the engine's
    16 KiB split come back whole, bad UTF-8 is replaced, the exit code arrives."""
    script = ("echo out1; echo err1 >&2; head -c 40000 /dev/zero | tr '\\0' x; echo; "
              "printf 'bad \\377 end\\n'; head -c 16384 /dev/zero | tr '\\0' a; printf '\\303\\251!\\n'; "
              "echo err2 >&2; echo out2; printf 'no newline'; exit 7")
    cid = made.create(script, tty=tty)
    assert (await asyncio.to_thread(api.wait, cid, 10))["StatusCode"] == 7
    ch = f"logs:{cid}"
    gw, _ = docker_gateway(docker_host)
    async with running_gateway(gateway=gw), json_client(gw) as c:
        assert (await c.request(type="subscribe", channel=ch, tail=100))["type"] == "subscribed"
        lines, end = await read_lines(c, ch)
    data = [m["data"] for m in lines]
    by_stream = {s: [d["line"] for d in data if d["stream"] == s] for s in ("stdout", "stderr")}
    # (A character cut by the engine's 16 KiB split is stored as U+FFFD by the json-file
    # log driver itself, so "é" starts right after the split here; the decoder's own
    # handling of a cut character is tested in test_docker_stream.py.)
    stdout = ["out1", "x" * 40000, "bad \ufffd end", "a" * 16384 + "é!", "out2", "no newline"]
    if tty:  # one stream, in the order the program wrote it
        assert by_stream == {"stdout": ["out1", "err1", *stdout[1:4], "err2", "out2", "no newline"],
                             "stderr": []}
    else:
        assert by_stream == {"stdout": stdout, "stderr": ["err1", "err2"]}
    assert all(TS.match(d["ts"]) for d in data)
    assert end["data"] == {"type": "stream_end", "container": cid, "exit_code": 7, "status": "exited",
                           "reason": "exited"}


async def test_stream_end_while_watching(docker_host, made, api):
    cid = made.create(f"echo started; {wait_for()}; echo bye >&2; exit 3")
    ch = f"logs:{cid}"
    gw, sources = docker_gateway(docker_host)
    async with running_gateway(gateway=gw), json_client(gw) as c:
        assert (await c.request(type="subscribe", channel=ch))["type"] == "subscribed"  # no tail: live only
        await c.expect_silence(0.1)
        await asyncio.to_thread(made.signal, cid)
        lines, end = await read_lines(c, ch)
        assert [(m["data"]["stream"], m["data"]["line"]) for m in lines] == [("stderr", "bye")]
        assert end["data"]["exit_code"] == 3 and end["data"]["reason"] == "exited"
        # A late joiner of an ended stream gets its tail and the stream_end.
        async with json_client(gw) as late:
            assert (await late.request(type="subscribe", channel=ch, tail=10))["type"] == "subscribed"
            late_lines, late_end = await read_lines(late, ch)
            assert [m["data"]["line"] for m in late_lines] == ["started", "bye"]
            assert late_end == end
        assert sources.logs.stats.streams_started == 1
        # An ended stream takes no aliases: another name for the container, started
        # again, is a fresh engine stream (the engine's backlog holds both runs).
        await asyncio.to_thread(api.start, cid)
        async with json_client(gw) as other:
            ch2 = f"logs:{cid[:12]}"
            assert (await other.request(type="subscribe", channel=ch2, tail=10))["type"] == "subscribed"
            lines2, end2 = await read_lines(other, ch2)
            # (stdout and stderr written back to back may arrive in either order)
            assert sorted(m["data"]["line"] for m in lines2) == ["bye", "bye", "started", "started"]
            assert end2["data"]["exit_code"] == 3
        assert sources.logs.stats.streams_started == 2


async def test_one_engine_stream_for_50_viewers_stopped_after_the_last_leaves(docker_host, made):
    cid = made.create(f"echo ready; {wait_for()}; seq 1 300; {wait_for('end')}")
    ch = f"logs:{cid}"
    gw, sources = docker_gateway(docker_host)
    logs = sources.logs
    async with running_gateway(gateway=gw):
        viewers = [await connect_recording(gw.port) for _ in range(50)]
        for v in viewers:
            assert (await v.recv_json())["type"] == "welcome"
            v.send_json(type="subscribe", channel=ch)
        for v in viewers:
            assert no_position(await v.recv_json()) == {"type": "subscribed", "channel": ch}
        assert logs.stats.streams_started == 1 and logs.stats.running == 1
        assert gw.hub.viewers(ch) == 50
        await asyncio.to_thread(made.signal, cid)
        for v in viewers:
            got = [json.loads((await asyncio.wait_for(v.messages.get(), 10))[1])["data"]["line"]
                   for _ in range(300)]
            assert got == [str(n) for n in range(1, 301)]
        reader = logs.channels[ch].stream.reader
        for v in viewers[:49]:
            v.transport.disconnect()
        await until(lambda: gw.hub.viewers(ch) == 1, what="49 viewers gone")
        # Nothing but a stop timer, armed when a channel's last viewer leaves, stops a stream
        # (this container waits for a flag before it exits): with one viewer left, none is armed.
        assert logs.channels[ch].stop_timer is None
        assert logs.stats.running == 1 and reader.thread.is_alive()
        viewers[49].transport.disconnect()
        await until(lambda: logs.stats.streams_stopped == 1 and not reader.thread.is_alive(),
                    what="the engine stream stopped after the last viewer left")
        assert logs.stats.running == 0 and ch not in logs.channels

        # The next subscriber starts a fresh engine stream, tail from the engine's backlog.
        async with json_client(gw) as again:
            assert (await again.request(type="subscribe", channel=ch, tail=3))["type"] == "subscribed"
            lines, _ = await read_lines(again, ch, count=3)
            assert [m["data"]["line"] for m in lines] == ["298", "299", "300"]
        assert logs.stats.streams_started == 2
        await asyncio.to_thread(made.signal, cid, "end")


async def test_a_viewer_resuming_with_since_gets_every_line_once_across_a_restart(docker_host, made):
    """The only viewer leaves, the engine stream stops, lines keep coming; it
    comes back with ``since``: a fresh stream starts, its engine backlog holds
    lines the channel already published (skipped by timestamp), and the
    viewer gets exactly the lines it missed, then the live ones."""
    cid = made.create(f"{wait_for()}; i=1; while [ $i -le 300 ]; do echo $i; i=$((i+1)); sleep 0.01; done; "
                      f"{wait_for('end')}")
    ch = f"logs:{cid}"
    gw, sources = docker_gateway(docker_host)
    async with running_gateway(gateway=gw):
        async with json_client(gw) as first:
            position = await first.subscribe(ch)
            await asyncio.to_thread(made.signal, cid)
            seen, _ = await read_lines(first, ch, count=40)
        await until(lambda: sources.logs.stats.streams_stopped == 1, what="the stream stopped")
        async with json_client(gw) as again:
            since = {"offset": seen[-1]["offset"], "epoch": position["epoch"]}
            reply = await again.request(type="subscribe", channel=ch, since=since)
            assert reply["type"] == "subscribed" and reply["recovered"] is True, reply
            rest, _ = await read_lines(again, ch, count=300 - 40)
        everything = seen + rest
        assert numbers(everything) == list(range(1, 301))
        assert_consecutive_offsets(everything)
        assert sources.logs.stats.streams_started == 2   # the resume restarted the stream
        await asyncio.to_thread(made.signal, cid, "end")


async def test_a_container_that_never_pauses_is_joined_right_after_its_tail(docker_host, made, api):
    """A container printing a numbered line every 5 ms is never quiet. The backlog
    ends at the first line stamped after the logs request, not after a quiet period:
    ``quiet_s`` and ``catch_up_max_s`` are a minute here, far longer than the test
    waits, and the subscribes are still answered. ``tail: 20`` is exactly the 20
    lines before the first live one (stamped after the subscribe), then every line
    once; a viewer without a tail gets no backlog line."""
    tail, live = 20, 300
    cid = made.create(PRINT_EVERY_5MS)
    await printed(api, cid, 2 * tail)  # a full tail before the stream starts
    ch = f"logs:{cid}"
    gw, sources = docker_gateway(docker_host, logs_options={"quiet_s": 60.0, "catch_up_max_s": 60.0})
    async with running_gateway(gateway=gw), json_client(gw) as a, json_client(gw) as b:
        before = time.time_ns()
        await a.send(type="subscribe", channel=ch, tail=tail, id=1)
        await b.send(type="subscribe", channel=ch, id=2)
        position = subscribed_position(await a.recv(20), ch, id=1)["offset"]
        lines_a, _ = await read_lines(a, ch, count=tail + live)
        first = numbers(lines_a)[0]
        assert first > 1 and numbers(lines_a) == list(range(first, first + tail + live))
        assert_consecutive_offsets(lines_a)
        # The tail is what the channel held at the join: exactly the 20 lines before the first live one.
        assert [m["offset"] <= position for m in lines_a] == [True] * tail + [False] * live
        # ... which was stamped after the subscribe (the logs request came after it).
        assert ts_ns(lines_a[tail]["data"]["ts"]) >= before
        # b joined at the same point or later (had its subscribe come after the first live line):
        # either way it gets no backlog line, and the same lines as a from its join on.
        position_b = subscribed_position(await b.recv(20), ch, id=2)["offset"]
        assert position_b >= position
        after_b = [m for m in lines_a if m["offset"] > position_b]
        assert (await read_lines(b, ch, count=len(after_b)))[0] == after_b
        assert sources.logs.stats.streams_started == 1


async def test_aliases_of_one_container_share_one_engine_stream(docker_host, made):
    """``logs:<name>``, ``logs:<id>`` and ``logs:<id prefix>`` from three connections: one
    engine stream; each channel has its own consecutive offsets and the same lines (same
    timestamps) in order, the late aliases' tails from the ring. The stream outlives the
    viewers of two aliases, stops after the last viewer of all of them, starts again as
    one stream for two aliases subscribing at once, and both get the stream_end."""
    name = f"wh-{made.test_label}-alias"
    cid = made.create(f"seq 1 20; {wait_for()}; seq 21 220; {wait_for('end')}; echo last; exit 4", name=name)
    by_name, by_id, by_prefix = f"logs:{name}", f"logs:{cid}", f"logs:{cid[:12]}"
    gw, sources = docker_gateway(docker_host)
    logs = sources.logs
    async with running_gateway(gateway=gw), json_client(gw) as a, json_client(gw) as b, json_client(gw) as c:
        assert (await a.request(type="subscribe", channel=by_name, tail=5))["type"] == "subscribed"
        tail_a, _ = await read_lines(a, by_name, count=5)
        assert (await b.request(type="subscribe", channel=by_id, tail=10))["type"] == "subscribed"
        tail_b, _ = await read_lines(b, by_id, count=10)
        assert numbers(tail_b) == list(range(11, 21))
        assert [m["data"] for m in tail_b[5:]] == [m["data"] for m in tail_a]
        assert logs.stats.streams_started == 1 and len(logs.streams) == 1

        await asyncio.to_thread(made.signal, cid)
        live_a, _ = await read_lines(a, by_name, count=50)        # up to line 70
        await c.send(type="subscribe", channel=by_prefix, tail=3)  # joins while lines flow
        rest_a, _ = await read_lines(a, by_name, count=150)
        rest_b, _ = await read_lines(b, by_id, count=200)
        assert no_position(await c.recv()) == {"type": "subscribed", "channel": by_prefix}
        lines_c: list[dict] = []
        while not lines_c or lines_c[-1]["data"]["line"] != "220":
            lines_c += (await read_lines(c, by_prefix, count=1))[0]
        all_a, all_b = tail_a + live_a + rest_a, tail_b + rest_b
        first = numbers(lines_c)[0]
        assert first >= 68  # its tail ends at or after line 70, which a had seen
        for lines, numbered in ((all_a, range(16, 221)), (all_b, range(11, 221)), (lines_c, range(first, 221))):
            assert numbers(lines) == list(numbered)
            assert_consecutive_offsets(lines)
        by_line = {m["data"]["line"]: m["data"] for m in all_b}
        assert all(by_line[m["data"]["line"]] == m["data"] for m in all_a + lines_c)
        assert logs.stats.streams_started == 1 and logs.stats.running == 1
        assert "wirehub_docker_log_streams 1" in gw.metrics.render(0, 0)
        assert set(logs.channels) == {by_name, by_id, by_prefix}

        # The stream is held by the viewers of any alias; an unwatched alias detaches.
        reader = logs.channels[by_id].stream.reader
        assert (await a.request(type="unsubscribe", channel=by_name))["type"] == "unsubscribed"
        assert (await c.request(type="unsubscribe", channel=by_prefix))["type"] == "unsubscribed"
        # Their grace period over, both detach; the stream, still watched through by_id, runs on.
        await until(lambda: set(logs.channels) == {by_id}, what="the unwatched aliases detached")
        assert reader.thread.is_alive() and logs.stats.running == 1 and logs.stats.streams_stopped == 0
        assert (await b.request(type="unsubscribe", channel=by_id))["type"] == "unsubscribed"
        await until(lambda: logs.stats.streams_stopped == 1 and not reader.thread.is_alive(),
                    what="the engine stream stopped after the last alias detached")
        assert logs.stats.running == 0
        assert not logs.channels and not logs.streams

        # Two aliases at once: the first reader to resolve the container follows it.
        await a.send(type="subscribe", channel=by_prefix, tail=2)
        await c.send(type="subscribe", channel=by_name, tail=2)
        for client, ch in ((a, by_prefix), (c, by_name)):
            assert no_position(await client.recv()) == {"type": "subscribed", "channel": ch}
            assert numbers((await read_lines(client, ch, count=2))[0]) == [219, 220]
        assert logs.stats.streams_started == 2 and len(logs.streams) == 1
        await asyncio.to_thread(made.signal, cid, "end")
        (lines_a, end_a), (lines_c, end_c) = await read_lines(a, by_prefix), await read_lines(c, by_name)
        assert [m["data"]["line"] for m in lines_a] == [m["data"]["line"] for m in lines_c] == ["last"]
        assert end_a["data"] == end_c["data"] == {"type": "stream_end", "container": cid, "exit_code": 4,
                                                  "status": "exited", "reason": "exited"}
        assert end_a["offset"] == lines_a[-1]["offset"] + 1 and end_c["offset"] == lines_c[-1]["offset"] + 1


class LineCounter(WSListener):  # type: ignore[misc]
    """A viewer that checks every line's number as it arrives (no per-message await)."""

    def __init__(self) -> None:
        self.transport = None
        self.expected = 1
        self.errors: list[str] = []
        self.done = asyncio.get_running_loop().create_future()
        self.subscribed = asyncio.get_running_loop().create_future()

    def on_ws_connected(self, transport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport, frame) -> None:
        if frame.msg_type != WSMsgType.TEXT:
            return
        msg = json.loads(frame.get_payload_as_bytes())
        if msg["type"] == "subscribed":
            self.subscribed.set_result(True)
        if msg["type"] != "message":
            return
        data = msg["data"]
        if data.get("type") == "stream_end":
            if not self.done.done():
                self.done.set_result(data)
            return
        if data["line"] != str(self.expected) and len(self.errors) < 5:
            self.errors.append(f"expected {self.expected}, got {data['line']!r}")
        self.expected += 1

    def on_ws_disconnected(self, transport) -> None:
        if not self.done.done():
            self.done.set_exception(ConnectionError("disconnected"))


class Pinger(WSListener):  # type: ignore[misc]
    """Pings through the gateway; ``waiting`` holds the ids not answered yet."""

    def __init__(self) -> None:
        self.transport = None
        self.waiting: set[int] = set()
        self.answered = 0

    def on_ws_connected(self, transport) -> None:
        self.transport = transport

    def ping(self, n: int) -> None:
        self.waiting.add(n)
        self.transport.send(WSMsgType.TEXT, json.dumps({"type": "ping", "id": n}).encode())

    def on_ws_frame(self, transport, frame) -> None:
        if frame.msg_type == WSMsgType.TEXT:
            msg = json.loads(frame.get_payload_as_bytes())
            if msg["type"] == "pong":
                self.waiting.remove(msg["id"])
                self.answered += 1


@pytest.mark.slow
async def test_high_rate_container_keeps_the_loop_responsive(docker_host, made):
    """200,000 lines as fast as the engine delivers them: all arrive, in order, none
    lost; what waits for the loop stays bounded by the handoff, which wakes the loop
    per batch, not per line; and pings through the same gateway (the same event loop)
    sent while the lines stream are all answered. How fast the lines come and the
    pings return depends on the machine: bench/docker_logs.py measures that."""
    total, queue_lines = 200_000, 4096
    cid = made.create(f"{wait_for()}; seq 1 {total}")
    ch = f"logs:{cid}"
    gw, sources = docker_gateway(docker_host, config={"high_water_bytes": 256 << 20},
                                 logs_options={"queue_lines": queue_lines})
    async with running_gateway(gateway=gw):
        _, viewer = await ws_connect(LineCounter, f"ws://127.0.0.1:{gw.port}/ws")
        viewer.transport.send(WSMsgType.TEXT, json.dumps({"type": "subscribe", "channel": ch}).encode())
        await asyncio.wait_for(viewer.subscribed, 10)
        _, pinger = await ws_connect(Pinger, f"ws://127.0.0.1:{gw.port}/ws")
        handoff = sources.logs.channels[ch].stream.handoff
        await asyncio.to_thread(made.signal, cid)
        await until(lambda: viewer.expected > 1, what="first line")
        n = 0
        while not viewer.done.done():
            n += 1
            pinger.ping(n)
            await asyncio.sleep(0.01)
        end = await viewer.done
        await until(lambda: not pinger.waiting, what="the last pong")
    assert viewer.errors == [] and viewer.expected == total + 1
    assert end["exit_code"] == 0
    assert pinger.answered == n >= 1
    stats = f"handoff held at most {handoff.max_items_seen} lines, {handoff.wakeups} wakeups"
    # Memory: what waits for the loop is bounded (the limit plus one read's lines).
    assert handoff.max_items_seen <= queue_lines + 2000, stats
    assert handoff.wakeups < total / 20, stats  # batches, not a wakeup per line


def test_engine_timestamps_and_clock_agreement():
    assert ts_ns("2026-12-07T06:32:50.714487071Z") == 1796625170_714487071
    assert ts_ns("2026-12-07T06:32:50.7Z") == ts_ns("2026-12-07T08:32:50.700+02:00") == 1796625170_700000000
    assert ts_ns("2026-12-07T06:32:50Z") == 1796625170_000000000
    assert [ts_ns(bad) for bad in ("", "2026-12-07T06:32:50.", "2026-12-07T06:32:50.5", "not a time stamp!!")] == \
        [None] * 4
    sent = 1796625170_400000000
    date = "Mon, 07 Dec 2026 06:32:50 GMT"   # the engine's clock read 06:32:50.x
    assert _clocks_agree(date, sent, sent + 5_000_000)
    assert _clocks_agree(date, sent + 590_000_000, sent + 700_000_000)        # read at .99x: still 50
    assert not _clocks_agree("Mon, 07 Dec 2026 06:32:52 GMT", sent, sent + 5_000_000)  # 1.6 s ahead
    assert not _clocks_agree("Mon, 07 Dec 2026 06:32:48 GMT", sent, sent + 5_000_000)  # 1.4 s behind
    assert not _clocks_agree(None, sent, sent) and not _clocks_agree("yesterday", sent, sent)


def engine_ts(ns: int) -> bytes:
    seconds, fraction = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)).encode() + b".%09dZ" % fraction


class SkewedEngine:
    """Just enough of the engine's API for one container's log stream, its clock an
    hour ahead of ours (its ``Date`` header and its timestamps): the backlog (lines 1
    to ``backlog``), nothing until ``live`` is set, then ``live_lines`` more."""

    CID = "f" * 64

    def __init__(self, backlog: int, live_lines: int) -> None:
        self.backlog, self.live_lines = backlog, live_lines
        self.skew_ns = 3600 * 1_000_000_000
        self.live = asyncio.Event()

    @staticmethod
    def chunk(number: int, stamp_ns: int) -> bytes:
        payload = engine_ts(stamp_ns) + b" %d\n" % number
        frame = struct.pack(">BxxxL", 1, len(payload)) + payload
        return b"%x\r\n%s\r\n" % (len(frame), frame)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                path = head.split(b" ", 2)[1].split(b"?")[0]
                if path.endswith(b"/logs"):
                    await self.logs(reader, writer)
                    return
                if path.endswith(b"/version"):
                    body = b'{"ApiVersion":"1.41","Version":"skewed"}'
                elif path.endswith(b"/json"):
                    body = b'{"Id":"%s","Config":{"Tty":false},"State":{"Status":"running"}}' % self.CID.encode()
                else:
                    body = b'{"message":"not here"}'
                status = b"200 OK" if not body.startswith(b'{"message"') else b"404 Not Found"
                writer.write(b"HTTP/1.1 %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                             % (status, len(body), body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def logs(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        now = time.time_ns() + self.skew_ns
        date = email.utils.formatdate(now / 1e9, usegmt=True).encode()
        backlog = b"".join(self.chunk(n, now - (self.backlog - n) * 1_000_000) for n in range(1, self.backlog + 1))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/vnd.docker.raw-stream\r\n"
                     b"Date: %s\r\nTransfer-Encoding: chunked\r\n\r\n%s" % (date, backlog))  # at once
        await writer.drain()
        await self.live.wait()
        now = time.time_ns() + self.skew_ns
        writer.write(b"".join(self.chunk(self.backlog + n, now + n * 1000) for n in range(1, self.live_lines + 1)))
        await writer.drain()
        await reader.read()  # until the gateway stops following


async def test_an_engine_with_a_skewed_clock_falls_back_to_the_quiet_rule(tmp_path, caplog):
    """An engine whose clock is an hour ahead stamps even its backlog "after" the logs
    request: its ``Date`` header gives it away, the timestamps are not trusted, and the
    backlog ends when the engine goes quiet. The tail is the backlog's last lines,
    then the live ones, each once."""
    engine = SkewedEngine(backlog=30, live_lines=100)
    path = tmp_path / "skewed.sock"
    server = await asyncio.start_unix_server(engine.serve, str(path))
    gw = Gateway(Config(port=0))
    logs = DockerLogsSource(Engine(f"unix://{path}"), ring_lines=50)
    gw.add_source(logs)
    gw.policies.add_default("logs:**", history_size=50)
    with caplog.at_level(logging.WARNING, logger="wirehub.sources.docker_logs"):
        async with server, running_gateway(gateway=gw), json_client(gw) as c:
            reply = await c.request(type="subscribe", channel="logs:fake", tail=3, id=1)
            position = subscribed_position(reply, "logs:fake", id=1)["offset"]
            tail, _ = await read_lines(c, "logs:fake", count=3)
            assert numbers(tail) == [28, 29, 30] and tail[-1]["offset"] == position
            engine.live.set()
            rest, _ = await read_lines(c, "logs:fake", count=100)
            assert numbers(rest) == list(range(31, 131))
            assert_consecutive_offsets(tail + rest)
    assert any("clock" in r.getMessage() and "differs" in r.getMessage() for r in caplog.records)


async def test_log_errors(docker_host, made):
    gw, _ = docker_gateway(docker_host, ring_lines=50)
    cid = made.create("echo hi")
    async with running_gateway(gateway=gw), json_client(gw) as c, json_client(gw) as d:
        await d.send(type="subscribe", channel="logs:no-such-container", id=5)  # both wait for one answer
        assert await c.request(type="subscribe", channel="logs:no-such-container", id=1) == {
            "type": "error", "code": "container_not_found", "id": 1,
            "error": "no such container: no-such-container"}
        assert (await d.recv())["code"] == "container_not_found"
        assert await c.request(type="subscribe", channel=f"logs:{cid}", tail=51, id=2) == {
            "type": "error", "code": "invalid_field", "id": 2,
            "error": "tail must be at most 50 (the gateway keeps that many lines per container)"}
        assert (await c.request(type="publish", channel=f"logs:{cid}", data="fake", id=3))["code"] == "forbidden"
        assert await c.request(type="ping", id=4) == {"type": "pong", "id": 4}


async def test_engine_unavailable(tmp_path):
    gw, sources = docker_gateway(f"unix://{tmp_path}/docker.sock")
    async with running_gateway(gateway=gw), json_client(gw) as c:
        reply = await c.request(type="subscribe", channel="logs:web", id=1)
        assert reply == {"type": "error", "code": "engine_unavailable", "id": 1,
                         "error": f"cannot reach the Docker engine at unix://{tmp_path}/docker.sock"}
        assert (await c.request(type="subscribe", channel="runners", id=2))["code"] == "engine_unavailable"
        assert await c.request(type="ping", id=3) == {"type": "pong", "id": 3}
        assert "wirehub_docker_engine_up 0" in gw.metrics.render(0, 0)


async def test_engine_refusal_is_engine_forbidden(tmp_path):
    """An engine that answers 403 (as with an authorization plugin): ``engine_forbidden``
    with the engine's own message."""
    path = tmp_path / "refusing.sock"
    body = b'{"message":"authorization denied by plugin opa: request rejected"}'

    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        writer.close()

    server = await asyncio.start_unix_server(refuse, str(path))
    gw, _ = docker_gateway(f"unix://{path}")
    async with server, running_gateway(gateway=gw), json_client(gw) as c:
        expected = {"type": "error", "code": "engine_forbidden", "id": 1,
                    "error": "the engine refused: authorization denied by plugin opa: request rejected"}
        assert await c.request(type="subscribe", channel="logs:web", id=1) == expected
        assert await c.request(type="subscribe", channel="runners", id=1) == expected
        assert gw.metrics.errors_total["engine_forbidden"] == 2


async def test_wirehub_serve_docker(docker_host, made):
    """``wirehub serve --docker --docker-host ... --runner-label ...`` serves the channels."""
    label = made.test_label
    cid = made.create("echo from-serve", name=f"wh-{label}-serve")
    with start_server("--docker", "--docker-host", docker_host, "--runner-label", f"{LABEL}={label}") as (_, port):
        async with websockets.connect(f"ws://127.0.0.1:{port}/ws") as ws:
            assert json.loads(await ws.recv())["type"] == "welcome"
            await ws.send(json.dumps({"type": "subscribe", "channel": "runners"}))
            assert no_position(json.loads(await ws.recv())) == {"type": "subscribed", "channel": "runners"}
            state = json.loads(await ws.recv())["data"]
            assert [r["name"] for r in state["runners"]] == [f"wh-{label}-serve"]
            await ws.send(json.dumps({"type": "subscribe", "channel": f"logs:{cid}", "tail": 10}))
            assert json.loads(await ws.recv())["type"] == "subscribed"
            assert json.loads(await ws.recv())["data"]["line"] == "from-serve"


# -- in a cluster (a shared broker) -----------------------------------------------


def lease_of(redis_server, channel: str) -> str:
    """``<node id> <state>`` of the channel's lease in Redis, or "" when nobody holds it."""
    return redis_server.command("GET", f"wh:{{{channel}}}:lease").decode().strip()


async def test_a_cluster_follows_a_container_once_and_takes_over_when_its_follower_dies(
        docker_host, made, redis_server):
    """Gateway A (``wirehub serve``) and gateway B on one Redis, a viewer on each:
    A holds the channel's lease and follows the engine, B only relays what
    Redis carries. A is SIGKILLed mid-stream: within a few seconds B takes
    the lease over and follows again from the last line Redis has, so B's
    viewer sees every line once, in order, with consecutive offsets."""
    cid = made.create(f"{wait_for()}; i=1; while [ ! -e /tmp/end ]; do echo $i; i=$((i+1)); sleep 0.01; done; "
                      f"exit 0")
    ch = f"logs:{cid}"
    with start_server("--docker", "--docker-host", docker_host, "--broker", redis_server.url) as (proc, port):
        async with json_client(port) as a:
            assert (await a.request(type="subscribe", channel=ch, id=1))["type"] == "subscribed"
            gw_b, sources_b = docker_gateway(docker_host, config={"broker": redis_server.url})
            logs_b = sources_b.logs
            async with running_gateway(gateway=gw_b), json_client(gw_b) as b:
                assert (await b.request(type="subscribe", channel=ch, id=2))["type"] == "subscribed"
                holder = lease_of(redis_server, ch)
                assert holder.endswith(" live") and not holder.startswith(gw_b.broker.node_id)
                assert logs_b.stats.streams_started == 0 and ch in logs_b.remote  # one engine stream: A's
                await asyncio.to_thread(made.signal, cid)
                seen_a, _ = await read_lines(a, ch, count=100)
                before, _ = await read_lines(b, ch, count=100)
                assert [(m["offset"], m["data"]) for m in before] == [(m["offset"], m["data"]) for m in seen_a]

                proc.kill()
                await until(lambda: logs_b.stats.running == 1, timeout_s=20, what="B following after A died")
                assert lease_of(redis_server, ch).startswith(gw_b.broker.node_id)
                after, _ = await read_lines(b, ch, count=300, timeout_s=20)
                seen = before + after
                assert numbers(seen) == list(range(1, len(seen) + 1))
                assert_consecutive_offsets(seen)
                await asyncio.to_thread(made.signal, cid, "end")
                rest, end = await read_lines(b, ch, timeout_s=20)
                assert numbers(seen + rest) == list(range(1, len(seen + rest) + 1))
                assert end["data"]["exit_code"] == 0 and end["offset"] == (seen + rest)[-1]["offset"] + 1


async def test_a_follower_without_viewers_keeps_the_stream_while_another_gateway_has_some(
        docker_host, made, redis_server):
    """A follows, B relays; A's only viewer leaves: A keeps following for B's
    viewer (B wants the lease), and stops and gives the lease up once B's
    viewer has left too."""
    cid = made.create(f"{wait_for()}; i=1; while [ ! -e /tmp/end ]; do echo $i; i=$((i+1)); sleep 0.01; done")
    ch = f"logs:{cid}"
    options = {"logs_options": {"lease_s": 0.6}}
    gw_a, sources_a = docker_gateway(docker_host, config={"broker": redis_server.url}, **options)
    gw_b, sources_b = docker_gateway(docker_host, config={"broker": redis_server.url}, **options)
    logs_a, logs_b = sources_a.logs, sources_b.logs
    async with running_gateway(gateway=gw_a), running_gateway(gateway=gw_b):
        async with json_client(gw_b) as b:
            async with json_client(gw_a) as a:
                assert (await a.request(type="subscribe", channel=ch, tail=5, id=1))["type"] == "subscribed"
                assert (await b.request(type="subscribe", channel=ch, tail=5, id=2))["type"] == "subscribed"
                assert logs_a.stats.running == 1 and logs_b.stats.streams_started == 0
                await asyncio.to_thread(made.signal, cid)
                await read_lines(a, ch, count=10)
                await until(lambda: logs_a.channels[ch].wanted, what="A told that B wants the stream")
            await until(lambda: gw_a.hub.viewers(ch) == 0, what="A's viewer gone")
            # 200 lines take two seconds: several lease periods and grace periods of A.
            seen, _ = await read_lines(b, ch, count=200)
            assert numbers(seen) == list(range(1, 201))
            assert logs_a.stats.running == 1 and logs_a.stats.streams_stopped == 0
            assert logs_b.stats.streams_started == 0
        await until(lambda: logs_a.stats.running == 0, what="A stopped after B's viewer left")
        await until(lambda: lease_of(redis_server, ch) == "", what="the lease given up")
        assert logs_b.stats.streams_started == 0
    await asyncio.to_thread(made.signal, cid, "end")


async def test_on_redis_shards_a_cluster_still_follows_a_container_once(docker_host, made, redis_shards):
    """With the channels spread over two Redis servers, the lease stays on the
    first (``shards.py``) while the log channel lives on its own shard: one
    engine stream in the cluster, every line on both gateways, in order."""
    cid = made.create(f"{wait_for()}; for i in $(seq 1 50); do echo $i; done; sleep 30")
    ch = f"logs:{cid}"
    url = ",".join(server.url for server in redis_shards)
    gw_a, sources_a = docker_gateway(docker_host, config={"broker": url})
    gw_b, sources_b = docker_gateway(docker_host, config={"broker": url})
    async with running_gateway(gateway=gw_a), running_gateway(gateway=gw_b):
        async with json_client(gw_a) as a, json_client(gw_b) as b:
            assert (await a.request(type="subscribe", channel=ch, id=1))["type"] == "subscribed"
            assert (await b.request(type="subscribe", channel=ch, id=2))["type"] == "subscribed"
            await asyncio.to_thread(made.signal, cid)
            seen_a, _ = await read_lines(a, ch, count=50)
            seen_b, _ = await read_lines(b, ch, count=50)
            assert numbers(seen_a) == numbers(seen_b) == list(range(1, 51))
            assert [m["offset"] for m in seen_a] == [m["offset"] for m in seen_b]
            assert_consecutive_offsets(seen_b)
            started = sources_a.logs.stats.streams_started + sources_b.logs.stats.streams_started
            assert started == 1                                  # one engine stream in the cluster
            assert lease_of(redis_shards[0], ch).endswith(" live") and lease_of(redis_shards[1], ch) == ""
            home = redis_shards[shard_of(ch, 2)]
            assert home.command("EXISTS", f"wh:{{{ch}}}:m").strip() == b"1"


async def test_a_viewer_on_another_gateway_of_an_ended_stream_gets_its_stream_end(docker_host, made, redis_server):
    """The container has exited and A, which followed it, still has a viewer:
    a viewer arriving on B gets the ``stream_end`` (the channel's last
    publication), and B asks the engine for nothing."""
    cid = made.create("seq 1 3; exit 7")
    ch = f"logs:{cid}"
    gw_a, _ = docker_gateway(docker_host, config={"broker": redis_server.url})
    gw_b, sources_b = docker_gateway(docker_host, config={"broker": redis_server.url})
    async with running_gateway(gateway=gw_a), running_gateway(gateway=gw_b):
        async with json_client(gw_a) as a, json_client(gw_b) as b:
            assert (await a.request(type="subscribe", channel=ch, tail=10, id=1))["type"] == "subscribed"
            lines, end = await read_lines(a, ch)
            assert numbers(lines) == [1, 2, 3] and end["data"]["exit_code"] == 7
            await until(lambda: lease_of(redis_server, ch).endswith(" ended"), what="the lease saying ended")
            assert (await b.request(type="subscribe", channel=ch, id=2))["type"] == "subscribed"
            assert await b.recv() == end
            assert sources_b.logs.stats.streams_started == 0


async def test_lines_published_while_redis_was_down_are_read_again_from_the_engine(docker_host, made, tmp_path):
    """The follower's Redis is killed mid-stream and restarted (with AOF, so
    it loses nothing it acknowledged): publishing fails and the gateway stops
    following; once Redis answers it takes the lease again and reads the
    engine's backlog from the last line Redis has. The viewer, which stayed
    connected, sees every line once, in order, with consecutive offsets."""
    server = RedisServer(tmp_path, appendonly=True).start()
    cid = made.create(f"{wait_for()}; i=1; while [ ! -e /tmp/end ]; do echo $i; i=$((i+1)); sleep 0.01; done")
    ch = f"logs:{cid}"
    gw, sources = docker_gateway(docker_host, config={"broker": server.url}, logs_options={"lease_s": 0.6})
    logs = sources.logs
    try:
        async with running_gateway(gateway=gw), json_client(gw) as viewer:
            assert (await viewer.request(type="subscribe", channel=ch, id=1))["type"] == "subscribed"
            await asyncio.to_thread(made.signal, cid)
            before, _ = await read_lines(viewer, ch, count=50)
            server.stop()
            await until(lambda: logs.stats.streams_stopped == 1, what="following stopped when publishing failed")
            server.start()
            await until(lambda: logs.stats.streams_started >= 2, timeout_s=20, what="following again")
            after, _ = await read_lines(viewer, ch, count=300, timeout_s=20)
            seen = before + after
            assert numbers(seen) == list(range(1, len(seen) + 1))
            assert_consecutive_offsets(seen)
            await asyncio.to_thread(made.signal, cid, "end")
    finally:
        server.stop()


# -- runners ------------------------------------------------------------------------


async def next_update(client, channel: str = "runners", timeout_s: float = 10.0) -> dict:
    msg = await client.recv(timeout_s)
    assert msg["type"] == "message" and msg["channel"] == channel, msg
    return msg["data"]


async def test_initial_state_and_runner_updates(docker_host, made, api):
    label = made.test_label
    a = made.create("sleep 60", start=False, name=f"wh-{label}-a", labels={"role": "ci"})
    made.create("sleep 60", start=False, labels={LABEL: "someone-else"})   # not ours
    gw, sources = docker_gateway(docker_host, runner_label=f"{LABEL}={label}")
    async with running_gateway(gateway=gw), json_client(gw) as c, json_client(gw) as one:
        assert no_position(await c.request(type="subscribe", channel="runners", id=1)) == \
            {"type": "subscribed", "channel": "runners", "id": 1}
        state = await next_update(c)
        assert state == {"type": "initial_state", "runners": [
            {"id": a, "name": f"wh-{label}-a", "image": "wirehub-test/busybox", "status": "created",
             "labels": {LABEL: label, "role": "ci"}}]}
        assert (await one.request(type="subscribe", channel=f"runner:wh-{label}-a"))["type"] == "subscribed"
        assert (await next_update(one, f"runner:wh-{label}-a"))["runners"][0]["id"] == a

        expected = [("started", "running", lambda: api.start(a)),
                    ("stopped", "exited", lambda: api.stop(a, timeout=0)),
                    ("deleted", "removed", lambda: api.remove_container(a))]
        for action, status, do in expected:
            await asyncio.to_thread(do)
            update = await next_update(c)
            assert (update["type"], update["action"], update["runner"]["status"]) == \
                ("runner_update", action, status)
            assert update["runner"]["id"] == a and update["runner"]["name"] == f"wh-{label}-a"
            assert update["runner"]["labels"] == {LABEL: label, "role": "ci"}
            assert await next_update(one, f"runner:wh-{label}-a") == update

        b = await asyncio.to_thread(made.create, "sleep 60", name=f"wh-{label}-b")
        created, started = await next_update(c), await next_update(c)
        assert (created["action"], started["action"]) == ("created", "started")
        assert started["runner"] == {"id": b, "name": f"wh-{label}-b", "image": "wirehub-test/busybox",
                                     "status": "running", "labels": {LABEL: label}}
        await one.expect_silence(0.1)  # runner:<a> is not told about b
        assert await c.request(type="subscribe", channel="runner:no-such-runner", id=9) == {
            "type": "error", "code": "container_not_found", "error": "no such container: no-such-runner", "id": 9}


async def test_runner_commands_are_refused_without_the_permission(docker_host, made, api, caplog):
    """An anonymous connection on an open gateway has no permissions."""
    cid = made.create("sleep 60")
    gw, _ = docker_gateway(docker_host)
    async with running_gateway(gateway=gw), json_client(gw) as c:
        with caplog.at_level(logging.INFO, logger="wirehub.audit"):
            reply = await c.request(type="runner_stop", runner=cid, id=1)
        assert (reply["type"], reply["code"], reply["id"]) == ("error", "forbidden", 1)
        assert reply["error"] == "'runner_stop' needs permission 'runners:delete'"
        assert (await c.request(type="runner_delete", runner=cid, id=2))["code"] == "forbidden"
    assert api.inspect_container(cid)["State"]["Running"]
    audit = [(r.action, r.runner_name, r.sub, r.result) for r in caplog.records if r.name == "wirehub.audit"]
    assert ("runner_stop", cid, "anonymous", "forbidden") in audit


async def test_runner_stop_and_delete_with_the_permission(docker_host, made, api, caplog):
    from wirehub.auth import mint_token

    secret = "wirehub-docker-test-secret-" + made.test_label + "x" * 16
    label = made.test_label
    target = made.create("sleep 60", name=f"wh-{label}-stop")
    outsider = made.create("sleep 60", labels={LABEL: "not-a-runner"})
    viewer = mint_token(secret, sub="viewer", subscribe=["runners"], ttl_s=600)
    operator = mint_token(secret, sub="ops-alice", subscribe=["runners"], permissions=["runners:delete"],
                          ttl_s=600)
    gw, _ = docker_gateway(docker_host, config={"jwt_secret": secret}, runner_label=f"{LABEL}={label}")
    async with running_gateway(gateway=gw):
        async with json_client(gw, f"/ws?token={viewer}") as v:
            reply = await v.request(type="runner_stop", runner=target, id=1)
            assert (reply["code"], reply["id"]) == ("forbidden", 1)
        assert api.inspect_container(target)["State"]["Running"]
        async with json_client(gw, f"/ws?token={operator}") as ops:
            with caplog.at_level(logging.INFO, logger="wirehub.audit"):
                reply = await ops.request(type="runner_stop", runner=f"wh-{label}-stop", timeout=0, id=2)
                assert reply == {"type": "runner_stopped", "runner": target, "name": f"wh-{label}-stop", "id": 2}
                assert not api.inspect_container(target)["State"]["Running"]
                reply = await ops.request(type="runner_stop", runner=outsider, timeout=0, id=3)
                assert reply["code"] == "container_not_found"  # not a runner: untouchable
                reply = await ops.request(type="runner_delete", runner=target, id=4)
                assert reply == {"type": "runner_deleted", "runner": target, "name": f"wh-{label}-stop", "id": 4}
            with pytest.raises(docker.errors.NotFound):
                api.inspect_container(target)
            assert api.inspect_container(outsider)["State"]["Running"]
    audit = [(r.action, r.runner_name, r.sub, r.result) for r in caplog.records if r.name == "wirehub.audit"]
    assert ("runner_stop", f"wh-{label}-stop", "ops-alice", "ok") in audit
    assert ("runner_delete", f"wh-{label}-stop", "ops-alice", "ok") in audit
    assert any(a[0] == "runner_stop" and a[2] == "ops-alice" and a[3] == "container_not_found" for a in audit)


# -- last: the engine goes away and comes back ----------------------------------------


async def test_engine_restart_recovery(docker_host, made, api):
    if not managed(docker_host):
        pytest.skip("the engine is not the one tests/engine/ started: it is not ours to restart")
    label = made.test_label
    cid = made.create("echo alive; sleep 300", name=f"wh-{label}-r")
    gw, sources = docker_gateway(docker_host, runner_label=f"{LABEL}={label}",
                                 events_options={"backoff_max_s": 0.5})
    async with running_gateway(gateway=gw), json_client(gw) as r, json_client(gw) as logs, \
            json_client(gw) as c:
        assert (await r.request(type="subscribe", channel="runners"))["type"] == "subscribed"
        assert [x["status"] for x in (await next_update(r))["runners"]] == ["running"]
        assert (await logs.request(type="subscribe", channel=f"logs:{cid}", tail=5))["type"] == "subscribed"
        assert (await logs.recv())["data"]["line"] == "alive"
        seen: list[dict] = []

        async def until_seen(predicate) -> None:
            while not any(predicate(u) for u in seen):
                seen.append(await next_update(r, timeout_s=30))

        try:
            await asyncio.to_thread(run_script, "stop-engine.sh")
            await until_seen(lambda u: u["type"] == "engine_status")
            assert seen[-1] == {"type": "engine_status", "status": "unavailable", "code": "engine_unavailable",
                                "error": seen[-1]["error"]}
            end = await logs.recv(30)  # the engine killed the container on its way down
            assert end["data"]["type"] == "stream_end"
            # (logs:{cid} itself has ended and still has a viewer: it would answer from its
            # ring; another name for the container needs the engine.)
            reply = await c.request(type="subscribe", channel=f"logs:{cid[:12]}", id=7)
            assert (reply["code"], reply["id"]) == ("engine_unavailable", 7)
            assert await c.request(type="ping", id=8) == {"type": "pong", "id": 8}
            assert "wirehub_docker_engine_up 0" in gw.metrics.render(0, 0)
        finally:
            await asyncio.to_thread(run_script, "start-engine.sh")
        await until_seen(lambda u: u == {"type": "engine_status", "status": "available"})
        # Killed by the engine's shutdown: told live, or as the difference after reconnecting.
        await until_seen(lambda u: u.get("action") == "stopped")
        stopped = next(u for u in seen if u.get("action") == "stopped")
        assert (stopped["runner"]["id"], stopped["runner"]["status"]) == (cid, "exited")
        # Logs work again: a new stream on the restarted engine.
        assert (await c.request(type="subscribe", channel=f"logs:{cid[:12]}", tail=5))["type"] == "subscribed"
        lines, end = await read_lines(c, f"logs:{cid[:12]}")
        assert [m["data"]["line"] for m in lines] == ["alive"] and end["data"]["reason"] == "exited"
        assert sources.runners.reconnects >= 1
        assert "wirehub_docker_engine_up 1" in gw.metrics.render(0, 0)
