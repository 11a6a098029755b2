"""Pattern routing: the subscription index (both builds) and the hub's routes.

The index must answer exactly what matching every pattern one by one
answers (``protocol.patterns.matches``); the hub's per-channel routes must
always equal what a from-scratch computation gives, through any order of
subscribes, unsubscribes and token refreshes.
"""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any

import pytest
from helpers import metrics_text, running_gateway
from hypothesis import given, settings
from hypothesis import strategies as st
from picows import WSListener, WSMsgType, ws_connect

from wirehub import _speedups
from wirehub.auth import Principal
from wirehub.broker.memory import MemoryBroker
from wirehub.hub import Hub
from wirehub.metrics import Metrics
from wirehub.protocol.codec import JsonCodec, TlvCodec
from wirehub.protocol.patterns import check_pattern, is_pattern, matches

BUILDS = {name: _speedups.load(name) for name in ("ext", "pure")}

# Small alphabets, so that random patterns and names collide often.
segment = st.sampled_from(["a", "b", "cc", ""])
separator = st.sampled_from([".", ":"])


@st.composite
def names(draw: st.DrawFn) -> str:
    parts = [draw(segment)]
    for _ in range(draw(st.integers(0, 3))):
        parts += [draw(separator), draw(segment)]
    name = "".join(parts)
    return name or "a"


@st.composite
def patterns(draw: st.DrawFn) -> str:
    count = draw(st.integers(1, 4))
    segments = [draw(st.sampled_from(["a", "b", "cc", "", "*"])) for _ in range(count)]
    if draw(st.booleans()):
        segments[-1] = "**"
    parts = [segments[0]]
    for seg in segments[1:]:
        parts += [draw(separator), seg]
    pattern = "".join(parts) or "*"
    check_pattern(pattern)  # the strategy only makes valid patterns
    return pattern


@pytest.mark.parametrize("routing", [build.routing for build in BUILDS.values()], ids=list(BUILDS))
class TestPatternIndex:
    def test_tokens_keep_each_separator_with_its_segment(self, routing):
        assert routing.tokens("runner:42.cpu") == ["runner", ":42", ".cpu"]
        assert routing.tokens(".a..b:") == ["", ".a", ".", ".b", ":"]
        assert routing.tokens("a.*.**") == ["a", ".*", ".**"]

    @pytest.mark.parametrize("pattern, channel, expected", [
        ("runner:*", "runner:42", True), ("runner:*", "runner:42:logs", False),
        ("runner:*", "runner.42", False), ("logs:**", "logs:a", True), ("logs:**", "logs:a.b:c", True),
        ("logs:**", "logs", False), ("logs:**", "logs:", False), ("**", "x", True),
        ("*", "x", True), ("*", "x.y", False), ("*.x", ".x", False), ("a..*", "a..b", True),
        ("a.**", "a..", True), ("t.*", "t.", False),
    ])
    def test_matches_like_the_pattern_syntax(self, routing, pattern, channel, expected):
        index = routing.PatternIndex()
        index.add(pattern, pattern)
        assert (index.match(channel) == [pattern]) is expected is matches(pattern, channel)

    def test_a_pattern_is_found_once_with_its_latest_value(self, routing):
        index = routing.PatternIndex()
        index.add("t.*", 1)
        index.add("t.*", 2)
        index.add("t.**", 3)
        assert len(index) == 2
        assert sorted(index.match("t.x")) == [2, 3]

    def test_discard_gives_back_the_nodes_only_it_used(self, routing):
        index = routing.PatternIndex()
        index.add("a.b.*", 1)
        index.add("a.c.*", 2)
        shared = index.node_count
        index.add("a.b.c.d.*", 3)
        index.discard("a.b.c.d.*")
        assert index.node_count == shared
        index.discard("a.b.c")        # not indexed (a prefix of a path): nothing happens
        index.discard("x.y")
        assert index.node_count == shared and len(index) == 2
        index.discard("a.b.*")
        index.discard("a.c.*")
        assert index.node_count == 1 and len(index) == 0 and index.match("a.b.x") == []

    @settings(max_examples=400, deadline=None)
    @given(st.lists(patterns(), max_size=12), st.lists(names(), min_size=1, max_size=10))
    def test_matches_exactly_what_brute_force_matches(self, routing, pattern_list, channels):
        index = routing.PatternIndex()
        for pattern in pattern_list:
            index.add(pattern, pattern)
        for channel in channels:
            found = index.match(channel)
            assert len(found) == len(set(found))
            assert set(found) == {p for p in pattern_list if matches(p, channel)}, channel

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.tuples(st.booleans(), patterns()), max_size=30), st.lists(names(), max_size=6))
    def test_adds_and_discards_in_any_order(self, routing, operations, channels):
        index, model = routing.PatternIndex(), set()
        for add, pattern in operations:
            if add:
                index.add(pattern, pattern)
                model.add(pattern)
            else:
                index.discard(pattern)
                model.discard(pattern)
            assert len(index) == len(model)
        for channel in channels:
            assert set(index.match(channel)) == {p for p in model if matches(p, channel)}
        for pattern in list(model):
            index.discard(pattern)
        assert index.node_count == 1


@settings(max_examples=200, deadline=None)
@given(st.lists(patterns(), max_size=10), st.lists(names(), min_size=1, max_size=6))
def test_both_builds_return_the_same_order(pattern_list, channels):
    """The hub compares match results as lists: the order must not depend on the build."""
    indexes = {name: build.routing.PatternIndex() for name, build in BUILDS.items()}
    for index in indexes.values():
        for pattern in pattern_list:
            index.add(pattern, pattern)
    for channel in channels:
        assert indexes["ext"].match(channel) == indexes["pure"].match(channel)


# -- the hub's routes -------------------------------------------------------------

class FakeBatch:
    """A batch nothing is written to: routing tests only look at who is targeted."""

    def unhold(self, channel: str) -> None:
        pass


class FakeConnection:
    """What the hub reads of a connection: no socket, no batch to write."""

    def __init__(self, client_id: str, principal: Principal) -> None:
        self.client_id = client_id
        self.principal = principal
        self.fanout_group = None
        self.batch = FakeBatch()
        self.subscriptions: set[str] | frozenset[str] = frozenset()


def make_hub(impl_name: str) -> Hub:
    impl = BUILDS[impl_name]
    return Hub(MemoryBroker(), impl, JsonCodec(), TlvCodec(impl.tlv), Metrics(),
               max_channel_length=255, max_subscriptions=128, shared_compressors={},
               compress_threshold_bytes=1024)


def delivered_to(hub: Hub, channel: str) -> set[str]:
    """The client ids a publication on ``channel`` reaches, as ``handle_publication`` computes it."""
    direct = hub.channels.get(channel)
    ids = set(direct.members) if direct is not None else set()
    by_pattern = hub._pattern_targets(channel) if hub.patterns else None
    if by_pattern is not None:
        assert not ids & set(by_pattern.members), "a client would get the publication twice"
        ids |= set(by_pattern.members)
    return ids


def expected_delivery(conns: list[FakeConnection], channel: str) -> set[str]:
    return {conn.client_id for conn in conns
            if channel in conn.subscriptions
            or any(is_pattern(s) and matches(s, channel) and conn.principal.can_subscribe(channel)
                   for s in conn.subscriptions)}


CHANNELS = ["t.a", "t.b", "t.a.x", "u.a", "u:b", "v"]
PATTERNS = ["t.*", "t.**", "*.a", "**", "u.*", "t.*.x", "*"]
GRANTS = [["**"], ["t.**"], ["t.a", "u.*"], ["*.a"], []]


@pytest.mark.parametrize("impl_name", sorted(BUILDS))
@settings(max_examples=300, deadline=None)
@given(operations=st.lists(st.tuples(st.sampled_from(["sub", "unsub", "refresh", "publish", "drop"]),
                                     st.integers(0, 3), st.sampled_from(CHANNELS + PATTERNS),
                                     st.integers(0, len(GRANTS) - 1)),
                           max_size=60))
def test_routes_follow_every_change(impl_name, operations):
    hub = make_hub(impl_name)
    conns = [FakeConnection(f"c{i}", Principal(f"u{i}", subscribe=["**"])) for i in range(4)]
    for kind, who, name, grant in operations:
        conn = conns[who]
        if kind == "sub":
            if is_pattern(name) or conn.principal.can_subscribe(name):  # as Connection checks
                hub.subscribe(conn, name)
        elif kind == "unsub" and name in conn.subscriptions:
            hub.unsubscribe(conn, name)
        elif kind == "refresh":
            conn.principal = Principal(conn.principal.sub, subscribe=GRANTS[grant])
            hub.revoke(conn)
        elif kind == "drop":
            hub.drop(conn)
        # Publishing builds routes; every channel is checked after every step.
        for channel in CHANNELS:
            assert delivered_to(hub, channel) == expected_delivery(conns, channel), (kind, who, name)
    for conn in conns:
        hub.drop(conn)
    assert not hub.patterns and not hub._routes and hub.subscription_count == 0


@pytest.mark.parametrize("impl_name", sorted(BUILDS))
def test_a_direct_subscriber_gets_the_channel_once_and_its_patterns_back(impl_name):
    hub = make_hub(impl_name)
    conn = FakeConnection("c", Principal("c", subscribe=["**"]))
    hub.subscribe(conn, "t.*")
    assert set(hub._pattern_targets("t.a").members) == {"c"}
    hub.subscribe(conn, "t.a")                # now through the channel itself
    assert hub._pattern_targets("t.a") is None and set(hub.channels["t.a"].members) == {"c"}
    hub.unsubscribe(conn, "t.a")              # back to its pattern
    assert set(hub._pattern_targets("t.a").members) == {"c"} and "t.a" not in hub.channels


@pytest.mark.parametrize("impl_name", sorted(BUILDS))
def test_a_refresh_narrows_and_widens_what_patterns_deliver(impl_name):
    hub = make_hub(impl_name)
    conn = FakeConnection("c", Principal("c", subscribe=["t.a"]))
    hub.subscribe(conn, "t.*")
    assert set(hub._pattern_targets("t.a").members) == {"c"} and hub._pattern_targets("t.b") is None
    conn.principal = Principal("c", subscribe=["t.b"])
    assert hub.revoke(conn) == []             # a pattern subscription stays; its channels change
    assert hub._pattern_targets("t.a") is None and set(hub._pattern_targets("t.b").members) == {"c"}


@pytest.mark.parametrize("impl_name", sorted(BUILDS))
def test_a_pattern_change_touches_only_the_channels_it_covers(impl_name):
    hub = make_hub(impl_name)
    watcher = FakeConnection("w", Principal("w", subscribe=["**"]))
    hub.subscribe(watcher, "t.*")
    channels = [f"t.{i}" for i in range(100)]
    for channel in channels:
        assert set(hub._pattern_targets(channel).members) == {"w"}
    routes = {channel: hub._routes[channel] for channel in channels}
    toggler = FakeConnection("x", Principal("x", subscribe=["**"]))
    for _ in range(20):
        hub.subscribe(toggler, "u.x.*")      # covers none of them
        hub.unsubscribe(toggler, "u.x.*")
    hub.subscribe(toggler, "t.*")            # an existing pattern: its routes are updated in place
    for channel in channels:
        assert hub._routes[channel] is routes[channel]
        assert set(hub._pattern_targets(channel).members) == {"w", "x"}
        assert hub._routes[channel] is routes[channel]


def test_routes_are_bounded_oldest_first():
    hub = make_hub("pure")
    hub.subscribe(FakeConnection("w", Principal("w", subscribe=["**"])), "**")
    for i in range(10_005):
        hub._pattern_targets(f"c{i}")
    assert len(hub._routes) == 10_000 and "c0" not in hub._routes and "c10004" in hub._routes
    assert len(hub.patterns["**"].dependents) == 10_000


def test_many_patterns_random_model():
    """A longer random run than hypothesis makes: 50 clients, 33 patterns and 18 channels."""
    rng = random.Random(1)
    hub = make_hub("ext")
    conns = [FakeConnection(f"c{i}", Principal(f"u{i}", subscribe=rng.choice(GRANTS) or ["v"]))
             for i in range(50)]
    channels = [f"{a}.{b}.{c}" for a in "tuv" for b in "abc" for c in "xy"]
    pool = [f"{a}.{b}.*" for a in "tuv" for b in "abcdefghij"] + ["t.**", "*.a.*", "**"] + channels
    for step in range(3000):
        conn = rng.choice(conns)
        name = rng.choice(pool)
        if name in conn.subscriptions:
            hub.unsubscribe(conn, name)
        elif is_pattern(name) or conn.principal.can_subscribe(name):
            hub.subscribe(conn, name)
        if step % 100 == 0:
            conn.principal = Principal(conn.principal.sub, subscribe=rng.choice(GRANTS))
            hub.revoke(conn)
        channel = rng.choice(channels)
        assert delivered_to(hub, channel) == expected_delivery(conns, channel)


# -- a gateway with many patterns ---------------------------------------------------

class Counter(WSListener):  # type: ignore[misc]
    """Counts replies, and checks that each channel's messages arrive in offset order with no gap."""

    def __init__(self) -> None:
        self.transport: Any = None
        self.replies = 0
        self.messages = 0
        self.last_offset: dict[str, int] = {}
        self.gaps: list[tuple[str, int, int]] = []
        self.unexpected: list[Any] = []
        self._wanted: tuple[str, int, asyncio.Future[None]] | None = None

    def on_ws_connected(self, transport: Any) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: Any, frame: Any) -> None:
        if frame.msg_type != WSMsgType.TEXT:
            return
        msg = json.loads(frame.get_payload_as_bytes())
        if msg["type"] == "message":
            self.messages += 1
            expected = self.last_offset.get(msg["channel"], 0) + 1
            if msg["offset"] != expected:
                self.gaps.append((msg["channel"], expected, msg["offset"]))
            self.last_offset[msg["channel"]] = msg["offset"]
        elif msg["type"] in ("subscribed", "unsubscribed"):
            self.replies += 1
        elif msg["type"] != "welcome":
            self.unexpected.append(msg)
        if self._wanted is not None:
            attribute, count, future = self._wanted
            if getattr(self, attribute) >= count and not future.done():
                future.set_result(None)

    async def wait_for(self, attribute: str, count: int, timeout: float = 60.0) -> None:
        if getattr(self, attribute) >= count:
            return
        future = asyncio.get_running_loop().create_future()
        self._wanted = (attribute, count, future)
        await asyncio.wait_for(future, timeout)

    def send(self, **msg: Any) -> None:
        self.transport.send(WSMsgType.TEXT, json.dumps(msg).encode())


async def _counter(port: int) -> Counter:
    _, client = await ws_connect(Counter, f"ws://127.0.0.1:{port}/ws")
    return client


async def test_20000_patterns_and_a_toggling_client_lose_nothing(impl_name):
    holders, per_holder, channels, rounds = 160, 125, 2000, 2
    async with running_gateway(impl_name, rate_limit_messages_per_s=0, max_connections_per_ip=0,
                               new_connections_per_ip_per_s=0) as gw:
        held = []
        for c in range(holders):
            holder = await _counter(gw.port)
            for k in range(per_holder):
                holder.send(type="subscribe", channel=f"u.{c}.{k}.*")
            held.append(holder)
        for holder in held:
            await holder.wait_for("replies", per_holder)
        metrics = await metrics_text(gw.port)
        assert f"wirehub_patterns {holders * per_holder}\n" in metrics
        # Each u.<c>.<k>.* adds at most two trie nodes (".<k>" and ".*").
        nodes = int(metrics.split("\nwirehub_pattern_index_nodes ")[1].split()[0])
        assert nodes <= 2 * holders * per_holder + holders + 2

        watcher, publisher, toggler = await _counter(gw.port), await _counter(gw.port), await _counter(gw.port)
        watcher.send(type="subscribe", channel="t.*")
        await watcher.wait_for("replies", 1)
        toggles = 0

        async def toggle() -> None:
            nonlocal toggles
            while True:   # covers every published channel: the worst pattern to toggle
                toggler.send(type="subscribe", channel="t.**")
                toggler.send(type="unsubscribe", channel="t.**")
                toggles += 1
                await toggler.wait_for("replies", 2 * toggles)
                await asyncio.sleep(0.005)

        toggling = asyncio.ensure_future(toggle())
        total = channels * rounds
        for i in range(total):
            publisher.send(type="publish", channel=f"t.{i % channels}", data=i)
            if i % 200 == 199:
                await asyncio.sleep(0.005)
        await watcher.wait_for("messages", total)
        toggling.cancel()
        assert watcher.gaps == [] and len(watcher.last_offset) == channels
        assert set(watcher.last_offset.values()) == {rounds}
        assert toggles > 1
        for client in (*held, watcher, publisher, toggler):
            assert client.unexpected == []
            client.transport.disconnect()
