"""benchmarks/ingest_wrk.py: wrk's report parsed into numbers, and one tiny run end to end
(the JSON has every level, nothing failed, and what was answered was stored). Timings are not
asserted."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from benchmarks.ingest_wrk import main, parse_wrk
from tests.conftest import ensure_postgres, skip_or_fail

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
    """Every unit wrk prints, and its trailing space after whole seconds ("1.04s ")."""
    parsed = parse_wrk(WRK_REPORT)
    assert parsed == {
        "p50_ms": 170.1, "p75_ms": 0.812, "p90_ms": 348.64, "p99_ms": 1040.0,
        "mean_ms": 179.33, "max_ms": 1050.0, "requests": 2497, "requests_per_s": 249.74,
        "non_2xx": 4, "socket_errors": 3,
    }


@pytest.mark.timeout(300)
def test_a_short_run_reports_every_level_and_stores_what_was_answered(tmp_path: Path) -> None:
    if shutil.which("wrk") is None:
        skip_or_fail("wrk is not installed")
    ensure_postgres()
    main(["--duration", "1", "--connections", "1,2", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "ingest_wrk.json").read_text())
    assert [lv["connections"] for lv in result["ingest"]] == [1, 2]
    assert [lv["connections"] for lv in result["healthz_floor"]] == [1, 2]
    for level in result["ingest"]:
        assert level["requests"] > 0 and level["non_2xx"] == 0 and level["socket_errors"] == 0
        assert level["sent_equals_stored"], level
    assert set(result["ratios"]) == {"ingest_rps_at_2_vs_1", "ingest_p99_ms_at_2"}
    assert (tmp_path / "ingest_wrk.png").stat().st_size > 0
