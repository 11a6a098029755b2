"""The verdict logic of the CI benchmark step (``bench/ci.py``) and the run
order of ``bench/run_e2e.py``, without measuring.

The measurements themselves take ~1.5 minutes and run as their own CI step;
here the sections are replaced by fixed figures, so what is tested is the
comparison: tolerances, budgets, missing figures, baseline merging, the table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import ci  # noqa: E402  (bench/ is not a package)
import run_e2e  # noqa: E402


@pytest.mark.parametrize("measured, verdict", [
    (9.0, "OK"),              # exactly the floor: 10 - 10 %
    (8.99, "REGRESSED"),
    (25.0, "OK"),             # better than the baseline never fails
    (None, "MISSING"),
])
def test_ratio_floor_is_the_tolerance_below_the_baseline(measured, verdict):
    row = ci.judge("callgrind.fanout", 10.0, measured)
    assert row.verdict == verdict
    assert row.failed == (verdict != "OK")
    assert row.tolerance == "-10% (>= 9.00)"


def test_e2e_has_its_own_wider_tolerance():
    assert ci.judge("e2e.deliveries_per_cpu_s", 1.0, 0.66).verdict == "OK"
    assert ci.judge("e2e.deliveries_per_cpu_s", 1.0, 0.64).verdict == "REGRESSED"


def test_budget_is_a_ceiling_whatever_the_baseline():
    budget = ci.BUDGET["idle.rss_kib_per_conn"]
    assert ci.judge("idle.rss_kib_per_conn", 6.5, budget).verdict == "OK"
    assert ci.judge("idle.rss_kib_per_conn", 6.5, budget + 0.01).verdict == "REGRESSED"
    assert ci.judge("idle.rss_kib_per_conn", None, budget + 1).verdict == "REGRESSED"


def test_a_ratio_without_baseline_is_new_and_does_not_fail():
    row = ci.judge("callgrind.newcomer", None, 3.0)
    assert (row.verdict, row.failed) == ("NEW", False)


def test_compare_judges_only_the_sections_that_ran():
    baseline = {"callgrind.fanout": 20.0, "callgrind.tlv.decode": 9.0,
                "e2e.deliveries_per_cpu_s": 0.9}
    rows = ci.compare(baseline, {"callgrind.fanout": 21.0}, ["callgrind"])
    assert [(r.metric, r.verdict) for r in rows] == [
        ("callgrind.fanout", "OK"),
        ("callgrind.tlv.decode", "MISSING"),   # ran, but this figure vanished
    ]


def test_compare_orders_by_section_then_name():
    measured = {"idle.rss_kib_per_conn": 6.0, "e2e.deliveries_per_cpu_s": 1.0,
                "callgrind.tlv.decode": 9.0, "callgrind.bucket": 4.0}
    rows = ci.compare({}, measured, ci.SECTIONS)
    assert [r.metric for r in rows] == ["callgrind.bucket", "callgrind.tlv.decode",
                                        "e2e.deliveries_per_cpu_s", "idle.rss_kib_per_conn"]


def test_merge_baseline_replaces_measured_and_keeps_the_rest():
    old = {"callgrind.fanout": 20.0, "e2e.deliveries_per_cpu_s": 0.9}
    merged = ci.merge_baseline(old, {"callgrind.fanout": 22.0, "callgrind.bucket": 4.123456})
    assert merged == {"callgrind.bucket": 4.1235, "callgrind.fanout": 22.0,
                      "e2e.deliveries_per_cpu_s": 0.9}
    assert list(merged) == sorted(merged)
    assert old == {"callgrind.fanout": 20.0, "e2e.deliveries_per_cpu_s": 0.9}


def test_table_has_one_aligned_line_per_row():
    rows = [ci.judge("callgrind.fanout", 21.61, 12.5), ci.judge("callgrind.newcomer", None, 3.0)]
    lines = ci.format_table(rows).splitlines()
    assert lines[0].split() == ["metric", "baseline", "measured", "tolerance", "verdict"]
    assert set(lines[1]) == {"-"}
    assert lines[2].split() == ["callgrind.fanout", "21.61", "12.50", "-10%", "(>=", "19.45)",
                                "REGRESSED"]
    assert lines[3].split()[:3] == ["callgrind.newcomer", "-", "3.00"]
    # right-aligned numbers: the columns end at the same place
    assert lines[2].index("12.50") + 5 == lines[3].index("3.00") + 4


def test_callgrind_total_reads_the_totals_line():
    dump = "version: 1\ncmd: python\nevents: Ir\nfn=(1) f\n3 12\ntotals: 123456\n"
    assert ci.callgrind_total(dump) == 123456
    with pytest.raises(ValueError):
        ci.callgrind_total("events: Ir\n")


FIGURES = {"callgrind.fanout": 21.6, "callgrind.tlv.decode": 9.7}


@pytest.fixture
def no_measuring(monkeypatch):
    """main() with the callgrind section replaced by fixed figures."""
    monkeypatch.setattr(ci, "measure_callgrind", lambda: (dict(FIGURES), {}))


def test_main_exits_1_against_a_doctored_baseline(no_measuring, tmp_path, capsys):
    doctored = tmp_path / "baseline.json"
    # As if the Cython fan-out had been 20 % faster relative to its twin before.
    doctored.write_text(json.dumps({"metrics": {**FIGURES, "callgrind.fanout": 21.6 * 1.25}}))
    assert ci.main(["--only", "callgrind", "--baseline", str(doctored)]) == 1
    out = capsys.readouterr().out
    fanout = next(line for line in out.splitlines() if line.startswith("callgrind.fanout"))
    assert fanout.split()[-1] == "REGRESSED"
    assert "REGRESSED" not in next(line for line in out.splitlines()
                                   if line.startswith("callgrind.tlv.decode"))


def test_main_passes_and_writes_the_report(no_measuring, tmp_path):
    honest = tmp_path / "baseline.json"
    honest.write_text(json.dumps({"metrics": FIGURES}))
    report = tmp_path / "report.json"
    assert ci.main(["--only", "callgrind", "--baseline", str(honest), "--json", str(report)]) == 0
    assert json.loads(report.read_text())["metrics"] == FIGURES


def test_write_baseline_merges_into_the_file(no_measuring, tmp_path):
    path = tmp_path / "baseline.json"
    path.write_text(json.dumps({"metrics": {"callgrind.fanout": 1.0,
                                            "idle.rss_kib_per_conn": 6.5}}))
    assert ci.main(["--only", "callgrind", "--baseline", str(path), "--write-baseline"]) == 0
    assert json.loads(path.read_text())["metrics"] == {**FIGURES, "idle.rss_kib_per_conn": 6.5}


def test_run_e2e_interleaves_servers_and_drops_a_failed_one(monkeypatch):
    """Rounds of one run per server, so a drift of the machine's speed lands on
    every server alike; a server that fails once is not run again."""
    servers = [run_e2e.Server(name, "raw") for name in ("a", "b", "ws")]
    scenario = run_e2e.Scenario("echo-100", "echo", (), ("round_trips_per_s",))
    calls: list[str] = []

    def run_once(server, sc, opts, cores):
        calls.append(server.name)
        if server.name == "b" and calls.count("b") == 2:
            raise subprocess.TimeoutExpired("loadgen", 1)
        return {"round_trips_per_s": float(len(calls))}, {}

    monkeypatch.setattr(run_e2e, "run_once", run_once)
    table = run_e2e.measure_interleaved(servers, scenario, argparse.Namespace(repeat=3),
                                        (None, None))
    assert calls == ["a", "b", "ws", "a", "b", "ws", "a", "ws"]
    assert [r["round_trips_per_s"] for r in table["a"]["runs"]] == [1.0, 4.0, 7.0]
    assert table["a"]["median"]["round_trips_per_s"] == 4.0
    assert table["b"]["skipped"] == "failed"
    assert table["ws"]["median"]["round_trips_per_s"] == 6.0


@pytest.mark.parametrize("q, expected", [
    (0.5, 0.0075),      # rank 5 of 10: half of the way through (0.005, 0.01], ranks 3 to 7
    (0.8, 0.015),       # rank 8: half of the way through (0.01, 0.02], ranks 7 to 9
    (0.99, 0.02),       # rank 9.9 falls in +Inf: the highest finite bound
])
def test_histogram_quantile_interpolates_inside_its_bucket(q, expected):
    buckets = [(0.005, 3), (0.01, 7), (0.02, 9), (float("inf"), 10)]
    assert run_e2e.histogram_quantile(q, buckets) == pytest.approx(expected)


def test_histogram_quantile_of_no_rounds_is_zero():
    assert run_e2e.histogram_quantile(0.99, []) == 0.0
    assert run_e2e.histogram_quantile(0.99, [(0.001, 0), (float("inf"), 0)]) == 0.0
