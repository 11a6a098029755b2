"""Resuming a subscription: what a client that asks for ``since`` is told and sent.

Recovery is the join of two streams, history and live, and the join is where
systems lose or repeat messages. The hub does it in this order
(``Hub._recover``): the subscription starts *holding* the channel's live
publications (``Recovery.hold``) before the broker is asked for history;
history is read page by page from ``since.offset + 1``; then the held
publications after the last one sent follow, and only then does the
subscription go live, in the same loop callback. Every offset is sent once,
in order, whatever arrives meanwhile.

``plan`` is the decision, kept free of I/O so that it is tested on its own.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

from .protocol.messages import Publication, Range, StreamPosition

EPOCH_CHANGED = "epoch_changed"
HISTORY_TRIMMED = "history_trimmed"
NO_HISTORY = "no_history"


@dataclass(frozen=True, slots=True)
class Plan:
    """Where a resumed subscription starts, and what its ``subscribed`` says.

    Attributes:
        after: history is sent from the first kept offset after this one.
        recovered: everything after ``since.offset`` follows.
        reason: why not (``epoch_changed``, ``history_trimmed``, ``no_history``).
        missed: the offsets the client cannot get.
    """

    after: int
    recovered: bool
    reason: str | None = None
    missed: Range | None = None


def plan(since: StreamPosition, position: StreamPosition, first_kept: int, keeps_history: bool) -> Plan:
    """Decide a resume from ``since``, the channel's ``position`` and its oldest kept offset.

    ``first_kept`` is ``position.offset + 1`` when nothing is kept. The caller
    has checked that ``since.offset`` is not past ``position.offset`` in the
    same epoch.
    """
    if since.epoch != position.epoch:
        # Another stream: its offsets restarted at 1; send what it kept.
        missed = Range(1, first_kept - 1) if first_kept > 1 else None
        return Plan(0, False, EPOCH_CHANGED, missed)
    if since.offset == position.offset:
        return Plan(since.offset, True)  # nothing published since
    if first_kept <= since.offset + 1:
        return Plan(since.offset, True)
    reason = HISTORY_TRIMMED if keeps_history else NO_HISTORY
    return Plan(since.offset, False, reason, Range(since.offset + 1, first_kept - 1))


class Recovery:
    """A subscription catching up: its channel's live publications wait here.

    The buffer is bounded: past ``max_bytes`` of data it is emptied, and the
    recovery reads those publications from history instead (it keeps reading
    until it reaches them); only what history no longer keeps is then lost,
    and the client is told (``lagged``).
    """

    __slots__ = ("held", "held_bytes", "max_bytes", "task")

    def __init__(self, max_bytes: int) -> None:
        self.held: collections.deque[Publication] = collections.deque()
        self.held_bytes = 0
        self.max_bytes = max_bytes
        self.task: object = None

    def hold(self, pub: Publication) -> None:
        self.held.append(pub)
        self.held_bytes += len(pub.data)
        if self.held_bytes > self.max_bytes:
            self.held.clear()
            self.held_bytes = 0

    def covers(self, offset: int) -> bool:
        """Whether the held publications reach back to ``offset``."""
        return bool(self.held) and self.held[0].offset <= offset
