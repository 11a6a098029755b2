"""The embedded memory broker: offsets, epochs, its bound on remembered channels, and history."""

from __future__ import annotations

import asyncio

import pytest

from wirehub.broker.base import HistoryOptions
from wirehub.broker.memory import MemoryBroker, entry_bytes


class Recorder:
    def __init__(self):
        self.publications = []

    def handle_publication(self, pub, origin):
        self.publications.append((pub.channel, pub.offset, pub.data, origin))


def test_offsets_grow_per_channel_and_only_subscribed_channels_are_delivered():
    broker, recorder = MemoryBroker(), Recorder()
    broker.bind(recorder)
    broker.subscribe("a")
    assert broker.publish("a", b"1").offset == 1
    assert broker.publish("b", b"x").offset == 1
    assert broker.publish("a", b"2", origin="c1").offset == 2
    assert recorder.publications == [("a", 1, b"1", None), ("a", 2, b"2", "c1")]


def test_idle_channels_are_forgotten_oldest_first_under_a_new_epoch():
    broker = MemoryBroker(max_idle_channels=2)
    first = broker.publish("old", b"")
    broker.publish("old", b"")
    broker.publish("mid", b"")
    broker.publish("new", b"")  # a third idle channel: "old" is forgotten
    again = broker.publish("old", b"")
    assert again.offset == 1 and again.epoch != first.epoch


def test_subscribed_channels_are_never_forgotten():
    broker = MemoryBroker(max_idle_channels=1)
    broker.bind(Recorder())
    broker.subscribe("kept")
    first = broker.publish("kept", b"")
    for name in "abcdef":
        broker.publish(name, b"")
    assert broker.publish("kept", b"") == type(first)(2, first.epoch)
    broker.unsubscribe("kept")  # idle again: the next new channel pushes it out
    broker.publish("z", b"")
    assert broker.publish("kept", b"").offset == 1


# -- history (a suite for any broker: ``broker_factory`` makes one) -------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["memory"])
def broker_factory(request):
    """Brokers that keep history; each test gets a fresh one (``clock`` for TTLs)."""
    def make(clock=FakeClock(), **kwargs):
        return MemoryBroker(clock=clock, **kwargs)
    return make


def history(broker, channel, **kwargs):
    page = asyncio.run(broker.history(channel, **kwargs))
    return [p.offset for p in page.publications], page


def test_history_keeps_the_last_size_publications(broker_factory):
    broker = broker_factory()
    keep = HistoryOptions(size=5)
    for i in range(1, 9):
        broker.publish("c", b"%d" % i, history=keep, key="k" if i % 2 else None)
    offsets, page = history(broker, "c")
    assert offsets == [4, 5, 6, 7, 8] and page.first_offset == 4 and not page.more
    assert page.position == broker.position("c") and page.position.offset == 8
    assert [(p.data, p.key) for p in page.publications][:2] == [(b"4", None), (b"5", "k")]


def test_history_pages_forward_and_backward(broker_factory):
    broker = broker_factory()
    for i in range(1, 11):
        broker.publish("c", b"x", history=HistoryOptions(size=100))
    assert history(broker, "c", since=3, limit=4)[0] == [4, 5, 6, 7]
    assert history(broker, "c", since=3, limit=4)[1].more
    assert history(broker, "c", since=7, limit=4)[0] == [8, 9, 10]
    assert not history(broker, "c", since=7, limit=4)[1].more
    assert history(broker, "c", since=10)[0] == []
    assert history(broker, "c", reverse=True, limit=3)[0] == [10, 9, 8]
    offsets, page = history(broker, "c", reverse=True, since=4, limit=5)
    assert offsets == [3, 2, 1] and not page.more
    assert history(broker, "c", reverse=True, since=8, limit=2)[1].more
    assert history(broker, "c", limit=0)[0] == []


def test_a_channel_without_history_answers_its_position(broker_factory):
    broker = broker_factory()
    broker.publish("c", b"x")
    offsets, page = history(broker, "c")
    assert offsets == [] and page.position.offset == 1 and page.first_offset == 2
    assert history(broker, "never")[1].position.offset == 0


def test_history_ttl(broker_factory):
    clock = FakeClock()
    broker = broker_factory(clock=clock)
    keep = HistoryOptions(size=100, ttl_s=10)
    for i in range(5):
        broker.publish("c", b"x", history=keep)
        clock.now += 3
    # Published at 1000, 1003, ... 1012; now 1015: the first two are older than 10 s.
    assert history(broker, "c")[0] == [3, 4, 5]


def test_history_max_bytes_per_channel(broker_factory):
    broker = broker_factory()
    pub_cost = entry_bytes(type("P", (), {"data": b"x" * 100})())
    for _ in range(10):
        broker.publish("c", b"x" * 100, history=HistoryOptions(size=100, max_bytes=3 * pub_cost))
    assert history(broker, "c")[0] == [8, 9, 10]


def test_the_global_budget_drops_the_least_recently_published_history(broker_factory):
    cost = 2 * 100 + 200
    broker = broker_factory(max_history_bytes=10 * cost)
    broker.bind(Recorder())
    keep = HistoryOptions(size=100)
    broker.subscribe("watched")
    old_epoch = broker.publish("watched", b"x" * 100, history=keep).epoch
    broker.publish("idle", b"x" * 100, history=keep)
    for _ in range(9):
        broker.publish("busy", b"x" * 100, history=keep)
    assert broker.history_bytes <= 10 * cost
    # "watched" was the least recently published: its history went, its position stayed.
    offsets, page = history(broker, "watched")
    assert offsets == [] and page.position.offset == 1 and page.position.epoch == old_epoch
    assert page.first_offset == 2
    broker.publish("busy", b"x" * 100, history=keep)  # now "idle" goes, and nobody holds it
    assert history(broker, "idle")[1].position.offset == 0  # forgotten: a new stream


def test_one_channel_over_the_global_budget_keeps_its_newest(broker_factory):
    cost = 2 * 100 + 200
    broker = broker_factory(max_history_bytes=4 * cost)
    for _ in range(10):
        broker.publish("c", b"x" * 100, history=HistoryOptions(size=100))
    assert history(broker, "c")[0] == [7, 8, 9, 10]


def test_history_survives_expiring_entirely_and_long_trimming(broker_factory):
    clock = FakeClock()
    broker = broker_factory(clock=clock)
    keep = HistoryOptions(size=50, ttl_s=1)
    for _ in range(500):                      # trimmed 450 times: the list is compacted on the way
        broker.publish("c", b"x", history=keep)
    assert history(broker, "c", limit=1000)[0] == list(range(451, 501))
    clock.now += 5                             # every kept publication expires
    offsets, page = history(broker, "c")
    assert offsets == [] and page.first_offset == 501
    broker.publish("c", b"y", history=keep)
    assert history(broker, "c")[0] == [501]
