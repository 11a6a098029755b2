"""The gateway's sense of time, in one object that tests can replace.

Everything in the gateway that waits or compares against a deadline reads
time here: token expiry and the ``token_expiring`` notice, the
authentication timeout, the handshake timeout, the heartbeat and the
per-IP connection rate. With the real ``Clock`` these are the event loop's
timers and the system clocks. With ``ManualClock`` time moves only when a
test calls ``advance()``, so an expiry or a timeout is tested by moving the
clock past it and waiting for the event, in microseconds of real time and
without racing the scheduler.

Two clocks, because tokens and timeouts speak different times: ``exp``,
``nbf`` and ``iat`` are wall-clock seconds (the issuer's ``time.time()``),
timeouts are intervals and need a clock that never jumps.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from typing import Any, Callable, Protocol


class Timer(Protocol):
    """What ``call_later`` returns: ``asyncio.TimerHandle`` has this shape."""

    def cancel(self) -> None: ...


class Clock:
    """The real clocks and the running loop's timers."""

    def monotonic(self) -> float:
        """Seconds that never jump: timeouts, the heartbeat, rates."""
        return time.monotonic()

    def wall(self) -> float:
        """Seconds since the epoch, for JWT ``exp``, ``nbf`` and ``iat``."""
        return time.time()

    def call_later(self, delay_s: float, callback: Callable[..., Any], *args: Any) -> Timer:
        """Run ``callback(*args)`` on the running loop in ``delay_s`` seconds."""
        return asyncio.get_running_loop().call_later(delay_s, callback, *args)

    async def sleep(self, delay_s: float) -> None:
        await asyncio.sleep(delay_s)


class _ManualTimer:
    __slots__ = ("callback", "args", "cancelled")

    def __init__(self, callback: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.callback = callback
        self.args = args
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class ManualClock(Clock):
    """A clock that stands still until ``advance()`` moves it.

    It starts at the real time, so that tokens minted with ``wall()`` verify,
    and from then on both readings move only with ``advance()``, in step
    with the timers: a timer set for ``wall() + 30`` runs when ``wall()``
    reaches it, never a scheduler's hiccup earlier or later.

    >>> clock = ManualClock()
    >>> gateway = Gateway(config, clock=clock)
    >>> clock.advance(31)      # runs every timer due by then, in order
    """

    def __init__(self) -> None:
        self._offset = 0.0
        self._wall_at_start = time.time()
        self._monotonic_at_start = time.monotonic()
        self._timers: list[tuple[float, int, _ManualTimer]] = []
        self._order = itertools.count()
        self._sleepers: set[asyncio.Future[None]] = set()

    def monotonic(self) -> float:
        return self._monotonic_at_start + self._offset

    def wall(self) -> float:
        return self._wall_at_start + self._offset

    def call_later(self, delay_s: float, callback: Callable[..., Any], *args: Any) -> Timer:
        timer = _ManualTimer(callback, args)
        heapq.heappush(self._timers, (self._offset + max(0.0, delay_s), next(self._order), timer))
        return timer

    async def sleep(self, delay_s: float) -> None:
        wakeup: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        timer = self.call_later(delay_s, _resolve, wakeup)
        self._sleepers.add(wakeup)
        try:
            await wakeup
        finally:
            timer.cancel()
            self._sleepers.discard(wakeup)

    def advance(self, seconds: float) -> None:
        """Move time forward and run, in deadline order, every timer now due
        (including those that the callbacks themselves schedule within the step)."""
        if seconds < 0:
            raise ValueError("time does not go backwards")
        target = self._offset + seconds
        while self._timers and self._timers[0][0] <= target:
            due, _, timer = heapq.heappop(self._timers)
            self._offset = max(self._offset, due)
            if not timer.cancelled:
                timer.callback(*timer.args)
        self._offset = target

    def scheduled(self) -> list[Callable[..., Any]]:
        """The callbacks of the timers still due to run (not run, not cancelled), in deadline order:
        what a test checks to see that a periodic task stopped."""
        return [timer.callback for _, _, timer in sorted(self._timers) if not timer.cancelled]

    @property
    def sleeping(self) -> int:
        """Tasks asleep in ``sleep()`` and not yet woken. After ``advance()``
        wakes a periodic task (the heartbeat), this count comes back once the
        task has done its round and gone back to sleep: what a test waits for."""
        return sum(not wakeup.done() for wakeup in self._sleepers)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
