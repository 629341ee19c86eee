"""benchmarks/ingest.py, its pure parts: wrk's report parsed into numbers, the summary figures
of the wrk levels, the HTTP-vs-COPY figures of one batch size, how many batches each size gets,
and the profile excerpt. The end-to-end run is in ``test_bench_smoke.py``."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.ingest import (
    CpuMeter,
    IngestConfig,
    batch_summary,
    batches_for,
    main,
    parse_wrk,
    reference_level,
    top_self_frames,
    wrk_ratios,
)

WRK_REPORT = f"""\
Running 10s test @ http://127.0.0.1:41234/v1/traces
  2 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   179.33ms  101.20ms   1.05s    71.02%
    Req/Sec   125.62     40.11   232.00     68.50%
  Latency Distribution
     50%  170.10ms
     75%  812.50us
     90%  348.64ms
     99%    1.04s{" "}
  2497 requests in 10.00s, 0.91MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 4
Requests/sec:    249.74
Transfer/sec:     93.42KB
"""


def test_a_wrk_report_becomes_milliseconds_counts_and_errors() -> None:
    """Every unit wrk prints, and its trailing space after whole seconds ("1.04s "); traces/s
    counts the 2xx answers only: (2497 - 4) / 10 s."""
    parsed = parse_wrk(WRK_REPORT)
    assert parsed == {
        "p50_ms": 170.1, "p75_ms": 0.812, "p90_ms": 348.64, "p99_ms": 1040.0,
        "mean_ms": 179.33, "max_ms": 1050.0, "requests": 2497, "seconds": 10.0,
        "requests_per_s": 249.74, "traces_per_s": 249.3, "non_2xx": 4, "socket_errors": 3,
    }


def test_a_wrk_report_of_a_failed_run_has_zero_throughput_and_no_traces_per_s() -> None:
    assert parse_wrk("unable to connect to 127.0.0.1:1 Connection refused\n") == {
        "requests_per_s": 0.0, "non_2xx": 0, "socket_errors": 0}


def _level(c: int, rps: float, p50: float, p99: float) -> dict[str, float]:
    return {"connections": c, "requests_per_s": rps, "p50_ms": p50, "p99_ms": p99}


def test_wrk_figures_are_taken_at_50_connections_against_one() -> None:
    levels = [_level(1, 100.0, 4.0, 9.0), _level(10, 140.0, 60.0, 90.0),
              _level(50, 150.0, 300.0, 450.0), _level(200, 120.0, 1500.0, 3000.0)]
    assert wrk_ratios(levels, at=50) == {
        "ingest_p99_ms_at_50": 450.0, "ingest_p50_ms_at_50": 300.0,
        "ingest_rps_at_50_vs_1": 1.5,  # 150 / 100
        "ingest_rps_at_50_vs_issue_reference": 1.25,  # 150 / 120 (issue 14 at 50)
    }


def test_wrk_figures_fall_back_to_the_largest_level_when_50_was_not_run() -> None:
    levels = [_level(1, 80.0, 5.0, 10.0), _level(3, 60.0, 20.0, 40.0)]
    assert wrk_ratios(levels, at=50) == {
        "ingest_p99_ms_at_3": 40.0, "ingest_p50_ms_at_3": 20.0,
        "ingest_rps_at_3_vs_1": 0.75,  # 60 / 80; no issue figure at 3 connections
    }


def test_the_reference_level_is_50_connections_or_else_the_largest_run() -> None:
    assert reference_level((1, 10, 50, 200), 50) == 50
    assert reference_level((1, 2), 50) == 2


def test_http_vs_copy_is_the_ratio_of_median_rows_per_second() -> None:
    # 10-row batches: HTTP 100, 50, 25 rows/s (median 50), COPY 1000, 500, 200 (median 500)
    summary = batch_summary(10, [0.1, 0.2, 0.4], [0.01, 0.02, 0.05])
    assert summary == {
        "batch_size": 10, "batches": 3,
        "http_seconds": [0.1, 0.2, 0.4], "copy_seconds": [0.01, 0.02, 0.05],
        "http_rows_per_s": 50.0, "copy_rows_per_s": 500.0, "ratio": 0.1,
        "pair_ratios": [0.1, 0.1, 0.125],
    }


def test_small_batches_get_enough_batches_for_min_rows() -> None:
    cfg = IngestConfig(batches=6, min_rows=100)
    assert [batches_for(s, cfg) for s in (1, 3, 10, 100, 1000)] == [100, 34, 10, 6, 6]


def test_the_profile_excerpt_is_the_top_self_section() -> None:
    summary = "busy samples: 9\n\ntop inclusive (share of busy samples):\n  100.0%  a\n\n" \
              "top self:\n   66.7%  b\n   33.3%  c\n"
    assert top_self_frames(summary, 1) == ["   66.7%  b"]
    assert top_self_frames(summary, 5) == ["   66.7%  b", "   33.3%  c"]
    assert top_self_frames("no profile", 5) == []


def test_no_connection_level_or_batch_size_is_refused_before_any_work(
    capsys: pytest.CaptureFixture[str],
) -> None:
    for argv in (["--connections", ""], ["--batch-sizes", "0"], ["--connections", "1,-5"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
        assert "needs at least one positive number" in capsys.readouterr().err


def test_cpu_per_request_is_the_cpu_seconds_over_the_requests_in_milliseconds() -> None:
    meter = CpuMeter(api_pid=0)
    meter.api_s, meter.postgres_s = 0.5, 0.125
    assert meter.per_request(250) == {"api_cpu_ms_per_request": 2.0,
                                      "postgres_cpu_ms_per_request": 0.5}
    assert meter.per_request(0) == {"api_cpu_ms_per_request": None,
                                    "postgres_cpu_ms_per_request": None}


def test_the_cpu_meter_counts_what_the_api_process_children_burn(tmp_path: Path) -> None:
    """The API process here is a shell whose child burns 0.4 s of CPU and exits: the meter,
    entered before the burn began, counts it as the API's."""
    done = tmp_path / "burnt"
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.4: pass"
    parent = subprocess.Popen(["sh", "-c", f'sleep 0.3; {sys.executable} -c "{burn}"; '
                               f'touch {done}; sleep 30'])
    try:
        with CpuMeter(parent.pid) as meter:
            deadline = time.monotonic() + 30
            while not done.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        assert done.exists(), "the child never finished its burn"
        assert 0.35 <= meter.api_s < 5
    finally:
        parent.kill()
        parent.wait()
