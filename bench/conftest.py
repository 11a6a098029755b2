"""Report each microbenchmark group as a ratio: pure-Python median / Cython median.

Run: ``python -m pytest bench/ --benchmark-only`` (add ``--benchmark-json out.json``
to keep the raw figures).
"""

from __future__ import annotations

import pytest

from wirehub import _speedups


@pytest.fixture(params=["ext", "pure"])
def impl(request):
    return _speedups.load(request.param)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    medians: dict[str, dict[str, float]] = {}
    for bench in session.benchmarks:
        variant = "ext" if "[ext" in bench.name else "pure" if "[pure" in bench.name else None
        if variant is not None and bench.stats is not None:
            medians.setdefault(bench.group or bench.name.split("[")[0], {})[variant] = bench.stats.median
    terminalreporter.section("Cython speed-up (median pure / median ext)")
    for group, m in sorted(medians.items()):
        if "ext" in m and "pure" in m:
            terminalreporter.write_line(
                f"{group:<40} ext {m['ext'] * 1e6:10.2f} us   pure {m['pure'] * 1e6:10.2f} us   "
                f"x{m['pure'] / m['ext']:.1f}")
