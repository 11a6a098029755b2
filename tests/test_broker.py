"""The embedded memory broker: offsets, epochs and its bound on remembered channels."""

from __future__ import annotations

from wirehub.broker.memory import MemoryBroker


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
