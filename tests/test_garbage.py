"""The garbage collector: ``wirehub serve`` tunes it, every gateway times it."""

from __future__ import annotations

import gc
import re
import subprocess
import sys

from helpers import metrics_text, running_gateway, start_server
from wirehub import garbage


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def collect(watch: garbage.PauseWatch, clock: FakeClock, generation: int, pause_s: float) -> None:
    """Drive the watch the way ``gc.callbacks`` does, with a pause of ``pause_s``."""
    info = {"generation": generation, "collected": 0, "uncollectable": 0}
    clock.now = 0.0
    watch._on_collect("start", info)
    clock.now = pause_s
    watch._on_collect("stop", info)


def buckets(text: str) -> dict[str, int]:
    """The pause histogram's cumulative counts, by ``le``."""
    return {le: int(n) for le, n in re.findall(r'wirehub_gc_pause_seconds_bucket\{le="([^"]+)"\} (\d+)', text)}


def test_each_pause_lands_in_its_bucket_and_generation():
    clock = FakeClock()
    watch = garbage.PauseWatch(clock)
    collect(watch, clock, 0, 0.0002)
    collect(watch, clock, 0, 0.001)      # on a bound: counted in it (Prometheus `le`)
    collect(watch, clock, 2, 0.120)
    collect(watch, clock, 2, 3.0)        # above every bound
    assert watch.collections == [2, 0, 2]
    text = "\n".join(watch.metric_lines()) + "\n"
    counts = buckets(text)
    assert counts["0.0005"] == 1 and counts["0.001"] == 2
    assert counts["0.1"] == 2 and counts["0.25"] == 3 and counts["1.0"] == 3
    assert counts["+Inf"] == 4
    assert "wirehub_gc_pause_seconds_count 4\n" in text
    assert abs(float(re.search(r"wirehub_gc_pause_seconds_sum (\S+)", text)[1]) - 3.1212) < 1e-9
    assert 'wirehub_gc_collections_total{generation="2"} 2\n' in text


def test_installed_watch_times_real_collections_until_uninstalled():
    watch = garbage.PauseWatch()
    watch.install()
    watch.install()                      # idempotent: one callback, counted once
    try:
        gc.collect()
        assert watch.collections[2] == 1
        assert watch.pause_seconds > 0
    finally:
        watch.uninstall()
    gc.collect()
    assert watch.collections[2] == 1


def test_tune_freezes_start_up_and_still_collects_later_cycles():
    code = """
import gc, weakref
from wirehub import garbage
garbage.tune()
assert gc.get_freeze_count() > 1000, gc.get_freeze_count()
assert gc.get_threshold()[:2] == (garbage.YOUNG_THRESHOLD, garbage.MIDDLE_THRESHOLD)
class Node: pass
a, b = Node(), Node()
a.other, b.other = b, a
alive = weakref.ref(a)
del a, b
gc.collect()
assert alive() is None, "a cycle made after tune() must still be collected"
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


async def test_an_embedded_gateway_reports_pauses_but_leaves_the_collector_alone():
    threshold, frozen = gc.get_threshold(), gc.get_freeze_count()
    async with running_gateway() as gw:
        gc.collect()
        text = await metrics_text(gw.port)
        assert gc.get_threshold() == threshold and gc.get_freeze_count() == frozen
    generation_2 = int(re.search(r'wirehub_gc_collections_total\{generation="2"\} (\d+)', text)[1])
    assert generation_2 >= 1
    assert buckets(text)["+Inf"] >= generation_2
    assert f"wirehub_gc_frozen_objects {frozen}\n" in text
    # Stopped, the gateway no longer listens to the collector.
    assert gw.gc_watch._on_collect not in gc.callbacks


async def test_serve_tunes_its_own_process():
    with start_server() as (_, port):
        text = await metrics_text(port)
    frozen = int(re.search(r"wirehub_gc_frozen_objects (\d+)", text)[1])
    assert frozen > 1000          # modules, configuration, the gateway: frozen at start
