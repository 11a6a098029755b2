"""Leases in Redis: which gateway of a cluster does a job that must run once.

A lease is a key ``wh:{<name>}:lease`` holding ``<node id> <state>``, set
with a time to live. Its holder renews it (``hold``) more often than it
expires; when the holder dies, the key expires and the next node that asks
takes it. ``state`` is a word the holder shares with the others (a log
stream says ``starting``, ``live`` or ``ended``), renewed with the lease.

A node that needs the job done but does not hold the lease says so in the
same call (``wanted``): the key ``wh:{<name>}:want`` lives one lease period,
so a holder with no users of its own keeps the job while another node has
some, and gives it up a period after the last one left.

The check and the write are one script, so two nodes asking at once cannot
both get the lease.
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec

from ..protocol.errors import Unavailable

try:
    from redis.exceptions import RedisError
except ImportError:  # pragma: no cover - RedisBroker says so first
    RedisError = OSError

# KEYS: lease, want; ARGV: node id, state, ttl ms, "1" if this node wants the job.
# Returns {holder and state, whether another node wants it}.
HOLD_SCRIPT = """
local current = redis.call('GET', KEYS[1])
local mine = ARGV[1] .. ' '
if (not current) or string.sub(current, 1, #mine) == mine then
  redis.call('SET', KEYS[1], mine .. ARGV[2], 'PX', ARGV[3])
  return {mine .. ARGV[2], redis.call('EXISTS', KEYS[2])}
end
if ARGV[4] == '1' then redis.call('SET', KEYS[2], '1', 'PX', ARGV[3]) end
return {current, 1}
"""

# KEYS: lease; ARGV: node id. Deletes the lease if this node holds it.
RELEASE_SCRIPT = """
local current = redis.call('GET', KEYS[1])
if current and string.sub(current, 1, #ARGV[1] + 1) == ARGV[1] .. ' ' then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

COMMAND_TIMEOUT_S = 5.0


class Lease(msgspec.Struct, frozen=True, gc=False):
    """A lease as one ``hold`` found it."""

    holder: str      # node id
    state: str       # the holder's word
    wanted: bool     # another node asked for the job within the last period
    mine: bool       # held by the node that asked


class Leases:
    """This node's side of the cluster's leases.

    Args:
        node_id: this node's id (``RedisBroker.node_id``).
    """

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self._redis: Any = None
        self._hold: Any = None
        self._release: Any = None

    def connect(self, redis: Any) -> None:
        """Use the broker's client (``RedisBroker.start``)."""
        self._redis = redis
        self._hold = redis.register_script(HOLD_SCRIPT)
        self._release = redis.register_script(RELEASE_SCRIPT)

    async def hold(self, claims: list[tuple[str, str, bool]], ttl_s: float) -> list[Lease]:
        """Take or renew the lease of each ``(name, state, wanted)``, in one round trip.

        A lease that is free or this node's becomes this node's for
        ``ttl_s`` with ``state``; one that another node holds is left alone,
        and marked as wanted when ``wanted`` is true.

        Raises:
            Unavailable: Redis does not answer.
        """
        ttl_ms = max(1, int(ttl_s * 1000))
        try:
            async with asyncio.timeout(COMMAND_TIMEOUT_S):
                async with self._redis.pipeline(transaction=False) as pipe:
                    for name, state, wanted in claims:
                        await self._hold(keys=_keys(name), args=[self.node_id, state, ttl_ms, int(wanted)],
                                         client=pipe)
                    results = await pipe.execute()
        except (RedisError, OSError, TimeoutError) as exc:
            raise Unavailable(f"the broker is unavailable: {exc}") from None
        leases = []
        for value, wanted in results:
            holder, _, state = (value.decode() if isinstance(value, bytes) else value).partition(" ")
            leases.append(Lease(holder, state, bool(wanted), holder == self.node_id))
        return leases

    async def release(self, names: list[str]) -> None:
        """Give up the leases this node holds among ``names``.

        Raises:
            Unavailable: Redis does not answer (the leases then expire by themselves).
        """
        if not names:
            return
        try:
            async with asyncio.timeout(COMMAND_TIMEOUT_S):
                async with self._redis.pipeline(transaction=False) as pipe:
                    for name in names:
                        await self._release(keys=_keys(name)[:1], args=[self.node_id], client=pipe)
                    await pipe.execute()
        except (RedisError, OSError, TimeoutError) as exc:
            raise Unavailable(f"the broker is unavailable: {exc}") from None


def _keys(name: str) -> list[str]:
    return [f"wh:{{{name}}}:lease", f"wh:{{{name}}}:want"]
