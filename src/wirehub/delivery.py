"""Per-channel delivery options: what a channel keeps, and what its slow subscribers get.

``[[channels]]`` tables (``config.ChannelOptions``) are matched in order and
the first pattern that covers a channel wins; sources add defaults for their
own channels after the user's (``logs:**`` keeps its lines), and a channel
nothing covers keeps nothing and disconnects slow subscribers.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .broker.base import HistoryOptions
from .config import ChannelOptions
from .protocol.patterns import matches

# ``ChannelOptions.slow_consumer`` as the fan-out's ``SlowConsumer`` values.
SLOW_CONSUMER = {"disconnect": 0, "drop_oldest": 1, "conflate": 2}
DISCONNECT = SLOW_CONSUMER["disconnect"]
# Channels whose resolved policy is remembered; past this the memo starts
# over (a client cycling names cannot grow it).
_MEMO_LIMIT = 10_000


@dataclass(frozen=True, slots=True)
class ChannelPolicy:
    """One channel's options, resolved.

    Attributes:
        history: what the broker keeps, or None.
        slow_consumer: a ``fanout.SlowConsumer`` value.
        max_queue_bytes: held per subscriber under ``DROP_OLDEST``/``CONFLATE``.
        max_rate: the highest ``max_rate`` a subscribe may ask for (0: no cap).
    """

    history: HistoryOptions | None
    slow_consumer: int
    max_queue_bytes: int
    max_rate: float

    @classmethod
    def from_options(cls, options: ChannelOptions) -> ChannelPolicy:
        history = (HistoryOptions(options.history_size, options.history_ttl_s, options.history_max_bytes)
                   if options.history_size else None)
        return cls(history, SLOW_CONSUMER[options.slow_consumer], options.max_queue_bytes, options.max_rate)


class ChannelPolicies:
    """The policy of each channel: the first configured pattern that covers it, else the defaults."""

    def __init__(self, configured: Iterable[ChannelOptions] = ()) -> None:
        self._rules = [(options.pattern, ChannelPolicy.from_options(options)) for options in configured]
        self.default = ChannelPolicy.from_options(ChannelOptions())
        self._memo: dict[str, ChannelPolicy] = {}

    def add_default(self, pattern: str, **options: Any) -> None:
        """Add a rule after every configured one (a source's channels); ``options``
        are ``ChannelOptions`` fields."""
        self._rules.append((pattern, ChannelPolicy.from_options(ChannelOptions(pattern=pattern, **options))))
        self._memo.clear()

    def for_channel(self, name: str) -> ChannelPolicy:
        policy = self._memo.get(name)
        if policy is None:
            policy = next((p for pattern, p in self._rules if matches(pattern, name)), self.default)
            if len(self._memo) >= _MEMO_LIMIT:
                self._memo.clear()
            self._memo[name] = policy
        return policy
