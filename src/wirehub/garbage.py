"""The cyclic garbage collector in a long-running gateway: tuned, and watched.

CPython's collector stops the event loop while it runs. Each connection adds
~21 objects it tracks (uvloop's transport, picows's protocol and transport,
wirehub's connection, listener and batch, bound methods, futures), and a
collection of the oldest generation walks all of them: with 10,000
connections that is ~190 ms here, ~115 ms once the objects that exist at
start-up are frozen. In a burst of handshakes the collector took ~10 % of the
server's CPU with CPython's default thresholds.

``tune()`` is what ``wirehub serve`` does once the gateway listens. An
application that embeds ``Gateway`` owns its process, so the gateway never
changes the collector by itself. ``PauseWatch`` only measures: it times every
collection for ``/metrics``. See docs/architecture.md ("The garbage
collector").
"""

from __future__ import annotations

import gc
import time
from bisect import bisect_left
from collections.abc import Callable
from typing import Any

from .metrics import histogram_lines

# The young generation is collected after this many more tracked objects
# were allocated than freed (CPython's default: 700). Steady traffic frees what
# it allocates and never gets there; a burst of handshakes is collected in
# fewer, larger steps, and fewer of its objects are walked again as they age.
YOUNG_THRESHOLD = 10_000
# The middle generation is collected after this many young collections
# (CPython's default: 10). Connections survive their first collection, so the
# middle generation fills with the newest ones, and its collection walks
# them all: every 3rd instead of every 10th keeps that walk short.
MIDDLE_THRESHOLD = 3

PAUSE_BOUNDS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
GENERATIONS = 3


def tune() -> None:
    """Freeze what exists now and set the thresholds of the younger generations.

    Call once start-up is done. Frozen objects (modules, configuration, the
    gateway itself) are never collected and never walked again, so every later
    collection is shorter; they are the objects that live as long as the
    process anyway. The collection before the freeze keeps start-up's
    garbage out of the frozen set.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD, MIDDLE_THRESHOLD, gc.get_threshold()[2])


class PauseWatch:
    """Times every collection, from ``gc.callbacks``; ``metric_lines`` renders them.

    Two calls per collection, and collections are rare: nothing on the path
    of a message.
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock
        self._started = 0.0
        self.collections = [0] * GENERATIONS
        self.pause_counts = [0] * (len(PAUSE_BOUNDS_S) + 1)
        self.pause_seconds = 0.0

    def install(self) -> None:
        if self._on_collect not in gc.callbacks:
            gc.callbacks.append(self._on_collect)

    def uninstall(self) -> None:
        if self._on_collect in gc.callbacks:
            gc.callbacks.remove(self._on_collect)

    def _on_collect(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = self._clock()
            return
        pause = self._clock() - self._started
        self.collections[info["generation"]] += 1
        self.pause_seconds += pause
        self.pause_counts[bisect_left(PAUSE_BOUNDS_S, pause)] += 1   # the first bound >= pause

    def metric_lines(self) -> list[str]:
        lines = ["# TYPE wirehub_gc_collections_total counter"]
        lines += [f'wirehub_gc_collections_total{{generation="{g}"}} {n}'
                  for g, n in enumerate(self.collections)]
        lines += histogram_lines("wirehub_gc_pause_seconds", PAUSE_BOUNDS_S, self.pause_counts,
                                 self.pause_seconds)
        lines += ["# TYPE wirehub_gc_frozen_objects gauge",
                  f"wirehub_gc_frozen_objects {gc.get_freeze_count()}"]
        return lines
