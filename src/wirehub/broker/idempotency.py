"""The idempotency keys a broker has accepted lately, and where they landed.

A client that publishes, loses its connection before the ``published``
answer and publishes again cannot know whether the first one was taken.
With an ``idempotency_key`` it does not need to: a publish whose key was
accepted on the same channel within the window is answered with the first
one's position and dropped (docs/delivery.md, "Retried publishes").

Keys are kept in acceptance order, so expiry and the count limit both take
from the front: O(1) per publish, and memory bounded by ``max_keys``.
"""

from __future__ import annotations

from collections import OrderedDict

from ..protocol.messages import StreamPosition


class RecentKeys:
    """``(channel, key) -> position`` for the keys accepted in the last ``window_s``.

    Args:
        window_s: how long a key is remembered; 0 remembers nothing.
        max_keys: keys remembered at once; past it the oldest are forgotten
            early (a retry after that is published again).
    """

    def __init__(self, window_s: float, max_keys: int) -> None:
        self.window_s = window_s
        self.max_keys = max_keys
        self._accepted: OrderedDict[tuple[str, str], tuple[StreamPosition, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._accepted)

    def seen(self, channel: str, key: str, now: float) -> StreamPosition | None:
        """The position of ``key``'s publish on ``channel``, if still remembered."""
        self._expire(now)
        found = self._accepted.get((channel, key))
        return found[0] if found is not None else None

    def remember(self, channel: str, key: str, position: StreamPosition, now: float) -> None:
        if self.window_s <= 0:
            return
        self._accepted[(channel, key)] = (position, now)
        self._accepted.move_to_end((channel, key))
        while len(self._accepted) > self.max_keys:
            self._accepted.popitem(last=False)

    def _expire(self, now: float) -> None:
        accepted = self._accepted
        horizon = now - self.window_s
        while accepted:
            _, accepted_at = next(iter(accepted.values()))
            if accepted_at > horizon:
                return
            accepted.popitem(last=False)
