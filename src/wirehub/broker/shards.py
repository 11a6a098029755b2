"""Channels spread over several Redis servers: a cluster past one Redis core.

One Redis runs one core, and every publication costs it the publish script
and a pub/sub copy per receiving gateway, so one Redis is the first thing a
growing cluster saturates (docs/scaling.md, "Sizing"). ``--broker
redis://a:6379/0,redis://b:6379/0`` gives each gateway one ``RedisBroker``
per server (a *shard*) and keeps each channel on one of them: its offsets,
stream, pub/sub channel and delivery all live there, so everything the
single-Redis broker promises per channel holds unchanged, and the shards
share the load (as Centrifugo's client-side Redis sharding does).

Which shard holds a channel is a jump consistent hash (Lamping and Veach,
2014) of its name: every gateway computes the same one from the same list,
and adding an (N+1)th shard moves only about 1/(N+1) of the channels
(their offsets then restart under a new epoch on the new shard, which
clients are told, as after a lost stream). All gateways must list the
shards in the same order: each Redis keeps its place in the list
(``wh:shard``), and a gateway that lists them otherwise, or names a later
shard alone, does not start.

The first shard also keeps what belongs to the cluster rather than to a
channel: the gateways' heartbeats and subscriber counts (``nodes.py``) and
the leases of cluster-wide sources (``leases.py``).

A shard that is down fails only its channels: their publishes are answered
``unavailable`` while the other shards' channels go on, and ``health``
(``/healthz``) names it, since this gateway cannot serve every channel.
Pattern subscriptions are made on every shard, as a pattern can match
channels on any of them.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
from collections.abc import Callable
from typing import Any

from ..protocol.messages import PublicationData, StreamPosition
from .base import BrokerEventHandler, HistoryOptions, HistoryPage
from .leases import Leases
from .redis import RedisBroker, render_samples

_MULTIPLIER = 2862933555777941757
_MASK64 = (1 << 64) - 1


def jump_hash(key: int, buckets: int) -> int:
    """The bucket in ``range(buckets)`` of a 64-bit ``key`` (jump consistent hash):
    going from n to n + 1 buckets moves a key only to the new one, and then
    about one key in n + 1."""
    bucket, candidate = -1, 0
    while candidate < buckets:
        bucket = candidate
        key = (key * _MULTIPLIER + 1) & _MASK64
        candidate = int((bucket + 1) * ((1 << 31) / ((key >> 33) + 1)))
    return bucket


@functools.lru_cache(maxsize=1 << 16)  # every publish asks; hashing costs more than the lookup
def shard_of(channel: str, shards: int) -> int:
    """The index of the shard that holds ``channel`` among ``shards``."""
    key = int.from_bytes(hashlib.blake2b(channel.encode(), digest_size=8).digest(), "big")
    return jump_hash(key, shards)


class ShardedBroker:
    """The broker interface over one ``RedisBroker`` per shard, each channel on one of them.

    Args:
        urls: the shards' Redis URLs, in the same order on every gateway.
        **options: ``RedisBroker``'s, for every shard.
    """

    shares_presence = True  # the hub reports count changes (``take_presence``), kept on the first shard

    def __init__(self, urls: list[str], **options: Any) -> None:
        if len(urls) < 2:
            raise ValueError("a sharded broker needs at least two Redis URLs")
        first = RedisBroker(urls[0], shard=0, **options)
        self.shards = [first] + [RedisBroker(url, node_id=first.node_id, shard=index, **options)
                                 for index, url in enumerate(urls[1:], 1)]
        self.node_id = first.node_id  # the gateway's id in the cluster, on every shard

    def _for(self, channel: str) -> RedisBroker:
        return self.shards[shard_of(channel, len(self.shards))]

    # -- cluster-wide: on the first shard ---------------------------------------------

    @property
    def node_figures(self) -> Callable[[], dict[str, Any]]:
        return self.shards[0].node_figures

    @node_figures.setter
    def node_figures(self, figures: Callable[[], dict[str, Any]]) -> None:
        self.shards[0].node_figures = figures

    @property
    def leases(self) -> Leases:
        return self.shards[0].leases

    async def subscribers(self, channel: str) -> int:
        return await self.shards[0].subscribers(channel)

    # -- life cycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Connect to every shard, or raise ``Unavailable`` (the CLI exits 2 on it)."""
        started: list[RedisBroker] = []
        try:
            for shard in self.shards:
                await shard.start()
                started.append(shard)
        except BaseException:
            await asyncio.gather(*(shard.close() for shard in started), return_exceptions=True)
            raise

    async def close(self) -> None:
        await asyncio.gather(*(shard.close() for shard in self.shards))

    def health(self) -> str | None:
        """None when every shard answers; otherwise which do not and why."""
        down = [reason for shard in self.shards if (reason := shard.health()) is not None]
        return "; ".join(down) if down else None

    def metric_lines(self) -> list[str]:
        """Each broker figure per shard (``shard="<index>"``), then the cluster's."""
        registry = self.shards[0].registry
        return [*render_samples([shard.metric_samples() for shard in self.shards]),
                "# TYPE wirehub_broker_shards gauge", f"wirehub_broker_shards {len(self.shards)}",
                *(registry.metric_lines() if registry is not None else ())]

    # -- per channel: on its shard ---------------------------------------------------------

    def bind(self, handler: BrokerEventHandler) -> None:
        for shard in self.shards:
            shard.bind(handler)

    def subscribe(self, channel: str) -> None:
        self._for(channel).subscribe(channel)

    def unsubscribe(self, channel: str) -> None:
        self._for(channel).unsubscribe(channel)

    def subscribe_pattern(self, pattern: str) -> None:
        for shard in self.shards:
            shard.subscribe_pattern(pattern)

    def unsubscribe_pattern(self, pattern: str) -> None:
        for shard in self.shards:
            shard.unsubscribe_pattern(pattern)

    def live(self, channel: str) -> bool:
        return self._for(channel).live(channel)

    async def sync(self, channel: str) -> None:
        await self._for(channel).sync(channel)

    def position(self, channel: str) -> StreamPosition:
        return self._for(channel).position(channel)

    def publish(self, channel: str, data: PublicationData, *, binary: bool = False, origin: str | None = None,
                key: str | None = None, history: HistoryOptions | None = None) -> asyncio.Future[StreamPosition]:
        return self._for(channel).publish(channel, data, binary=binary, origin=origin, key=key, history=history)

    def publish_once(self, channel: str, data: PublicationData, idempotency_key: str, *, binary: bool = False,
                     origin: str | None = None, key: str | None = None,
                     history: HistoryOptions | None = None) -> asyncio.Future[tuple[StreamPosition, bool]]:
        return self._for(channel).publish_once(channel, data, idempotency_key, binary=binary, origin=origin,
                                               key=key, history=history)

    async def history(self, channel: str, *, since: int | None = None, limit: int = 100,
                      reverse: bool = False) -> HistoryPage:
        return await self._for(channel).history(channel, since=since, limit=limit, reverse=reverse)
