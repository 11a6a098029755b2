"""The gateways on one Redis, as each sees the others: a registry of live
nodes with their main figures, and per-channel subscriber counts.

Every node writes, once a second (``HEARTBEAT_S``):

- its heartbeat into the sorted set ``wh:nodes`` (node id, milliseconds);
- its figures into ``wh:node:<id>``, which expires after ``NODE_TTL_S``;
- the local subscriber count of each channel whose count changed since the
  last beat, into ``wh:{c}:n`` (node id → count).

A node whose heartbeat is older than ``NODE_TTL_S`` is dead. Its figures
expire by themselves, and the readers drop its counts. So a cluster's sums
(``/metrics``: ``wirehub_cluster_*``, and ``wirehub_node_*`` per node) and a channel's subscribers across the
cluster (``Gateway.subscribers``) are at most a beat behind.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import msgspec

from ..protocol.errors import Unavailable

try:
    from redis.exceptions import RedisError
except ImportError:  # pragma: no cover - RedisBroker says so first
    RedisError = OSError

logger = logging.getLogger("wirehub.broker.nodes")

HEARTBEAT_S = 1.0
NODE_TTL_S = 5.0
NODES_KEY = "wh:nodes"
# The figures each node shares: ``wirehub_node_<name>`` per node, ``wirehub_cluster_<name>`` summed.
SHARED = ("connections", "subscriptions", "channels", "publications_total", "deliveries_total",
          "messages_received_total", "errors_total")


class NodeRegistry:
    """This node's entry in the registry, and the others' figures as of the last beat.

    Args:
        redis: the broker's client.
        node_id: this node's id (``RedisBroker.node_id``).
        figures: this node's current figures (the names in ``SHARED``) and labels.
        presence: the channels whose local subscriber count changed since the
            last call, with their counts now (0: none left).
        clock: wall-clock seconds, shared by the nodes.
    """

    def __init__(self, redis: Any, node_id: str, *, figures: Callable[[], dict[str, Any]],
                 presence: Callable[[], dict[str, int]], clock: Callable[[], float] = time.time) -> None:
        self._redis = redis
        self.node_id = node_id
        self._figures = figures
        self._presence = presence
        self._clock = clock
        self._unsent: dict[str, int] = {}  # counts a failed beat did not write
        self.stopped = False
        self.nodes: dict[str, dict[str, Any]] = {}  # live nodes' figures, this one's included

    async def run(self) -> None:
        """Beat until ``stop``. (Cancelling alone is not enough: an ``asyncio.timeout``
        that expires as the task is cancelled turns the cancellation into a
        ``TimeoutError``, which the loop would survive.)"""
        while not self.stopped:
            try:
                await self.beat()
            except (RedisError, OSError, TimeoutError) as exc:  # the broker's supervisor reports outages
                logger.debug("node heartbeat failed: %s", exc)
            if not self.stopped:
                await asyncio.sleep(HEARTBEAT_S)

    def stop(self) -> None:
        self.stopped = True

    async def beat(self) -> None:
        now_ms = int(self._clock() * 1000)
        ttl_ms = int(NODE_TTL_S * 1000)
        self._unsent.update(self._presence())
        counts, self._unsent = self._unsent, {}
        pipe = self._redis.pipeline(transaction=False)
        pipe.zadd(NODES_KEY, {self.node_id: now_ms})
        pipe.set(f"wh:node:{self.node_id}", msgspec.json.encode(self._figures()), px=ttl_ms)
        for channel, count in counts.items():
            key = f"wh:{{{channel}}}:n"
            if count:
                pipe.hset(key, self.node_id, count)
                pipe.pexpire(key, ttl_ms * 12)  # a channel nobody beats for a minute goes
            else:
                pipe.hdel(key, self.node_id)
        pipe.zremrangebyscore(NODES_KEY, "-inf", now_ms - ttl_ms)
        pipe.zrange(NODES_KEY, 0, -1)
        try:
            async with asyncio.timeout(HEARTBEAT_S * 2):
                results = await pipe.execute()
        except BaseException:
            for channel, count in counts.items():
                self._unsent.setdefault(channel, count)  # sent again by the next beat
            raise
        alive = [text(node) for node in results[-1]]
        found = await self._redis.mget([f"wh:node:{node}" for node in alive]) if alive else []
        self.nodes = {node: msgspec.json.decode(raw) for node, raw in zip(alive, found, strict=True) if raw}

    async def subscribers(self, channel: str, local: int) -> int:
        """Subscribers of ``channel`` on every live node; ``local`` is this node's count now.

        Raises:
            Unavailable: Redis does not answer.
        """
        now_ms = int(self._clock() * 1000)
        try:
            pipe = self._redis.pipeline(transaction=False)
            pipe.hgetall(f"wh:{{{channel}}}:n")
            pipe.zrangebyscore(NODES_KEY, now_ms - int(NODE_TTL_S * 1000), "+inf")
            async with asyncio.timeout(HEARTBEAT_S * 2):
                counts, alive = await pipe.execute()
        except (RedisError, OSError, TimeoutError) as exc:
            raise Unavailable(f"the broker is unavailable: {exc}") from None
        live = {text(node) for node in alive}
        return local + sum(int(count) for node, count in counts.items()
                           if text(node) in live and text(node) != self.node_id)

    def metric_lines(self) -> list[str]:
        """``wirehub_cluster_nodes``; per shared figure, its sum over the live
        nodes and each node's (labelled with its id, pid and worker number)."""
        nodes = sorted(self.nodes.items())
        lines = ["# TYPE wirehub_cluster_nodes gauge", f"wirehub_cluster_nodes {len(nodes)}"]
        for name in SHARED:
            kind = "counter" if name.endswith("_total") else "gauge"
            lines += [f"# TYPE wirehub_cluster_{name} {kind}",
                      f"wirehub_cluster_{name} {sum(figures.get(name, 0) for _, figures in nodes)}",
                      f"# TYPE wirehub_node_{name} {kind}"]
            lines += [f'wirehub_node_{name}{{node="{node}",pid="{figures.get("pid", "")}",'
                      f'worker="{figures.get("worker", "")}"}} {figures.get(name, 0)}' for node, figures in nodes]
        return lines

def text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
