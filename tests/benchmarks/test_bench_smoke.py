"""Each benchmark's core function on tiny inputs: the JSON it writes has the expected keys and
finite numbers. Timings are never asserted (they depend on the machine and its load)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import skip_or_fail

ROOT = Path(__file__).resolve().parents[2]
# The very small bootstrap model the learner tests use (~10 s to build on 2 cores).
TINY = (("n_demos", 600), ("sft_steps", 80), ("batch_size", 16), ("lr", 1e-2))


def finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("bench-model-cache")
    old = os.environ.get("TRACELEARN_MODEL_CACHE")
    os.environ["TRACELEARN_MODEL_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("TRACELEARN_MODEL_CACHE", None)
    else:
        os.environ["TRACELEARN_MODEL_CACHE"] = old


@pytest.mark.postgres
def test_ingest_benchmark_reports_ratio_and_latency_percentiles(tmp_path: Path) -> None:
    from benchmarks.ingest import IngestConfig, run

    cfg = IngestConfig(batch_size=20, batches=1, outcome_batches=1, clients=(1, 3),
                       requests_per_level=6, min_requests_per_client=2, level_cap_s=20)
    result = run(cfg, tmp_path)
    saved = json.loads((tmp_path / "ingest.json").read_text())
    assert saved["ratios"] == result["ratios"]
    assert finite(saved["ratios"]["ingest_http_vs_copy_ratio"])
    assert finite(saved["ratios"]["ingest_p99_ms_at_3"])
    assert [lv["clients"] for lv in saved["latency"]] == [1, 3]
    for lv in saved["latency"]:
        assert lv["errors"] == 0
        assert all(finite(lv[k]) for k in ("p50_ms", "p99_ms", "requests_per_s"))
    assert finite(saved["batch_with_outcomes"]["ratio"])
    assert (tmp_path / "ingest.png").stat().st_size > 0


def test_learner_benchmark_reports_cost_ratio_and_rss(tmp_path: Path, model_cache: Path) -> None:
    from benchmarks.learner import LearnerBenchConfig, run

    cfg = LearnerBenchConfig(size="test", prompts=2, group_size=4, max_new_tokens=16, steps=2,
                             rounds=1, micro_batch_size=8, bootstrap_overrides=TINY)
    run(cfg, tmp_path)
    saved = json.loads((tmp_path / "learner.json").read_text())
    assert set(saved["ratios"]) == {"oapl_vs_sft_cost_ratio", "learner_peak_rss_vs_floor"}
    assert all(finite(v) for v in saved["ratios"].values())
    assert saved["tokens"]["completion_tokens_per_step"] > 0
    assert saved["rss"]["floor_mib"] > 0
    assert (tmp_path / "learner.png").stat().st_size > 0


@pytest.mark.timeout(1500)  # TRL's import and trainer set-up are slow on a loaded 2-core box
def test_time_to_target_benchmark_runs_both_arms(tmp_path: Path, model_cache: Path) -> None:
    if importlib.util.find_spec("trl") is None:
        skip_or_fail("trl is not installed (pip install -e '.[bench]')")
    from benchmarks.time_to_target import TimeToTargetConfig, run

    cfg = TimeToTargetConfig(size="test", budget_s=3, train_prompts=8, heldout=4, group_size=2,
                             max_new_tokens=12, prompts_per_round=2, trl_batch=4,
                             micro_batch_size=4, bootstrap_overrides=TINY)
    run(cfg, tmp_path)
    saved = json.loads((tmp_path / "time_to_target.json").read_text())
    assert "time_to_45pct_speedup_vs_trl" in saved["ratios"]
    for arm in ("ours", "trl"):
        evals = [c for c in saved[arm]["curve"] if "correct" in c]
        assert evals, arm
        assert all(0.0 <= c["correct"] <= 1.0 and finite(c["train_seconds"]) for c in evals)
    value = saved["ratios"]["time_to_45pct_speedup_vs_trl"]
    assert value is None or finite(value)


def _load_run_all() -> Any:
    loader = importlib.machinery.SourceFileLoader("bench_run_all", str(ROOT / "benchmarks/run_all"))
    spec = importlib.util.spec_from_loader("bench_run_all", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def test_run_all_summary_is_one_flat_object_with_the_six_figures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_all = _load_run_all()
    monkeypatch.setattr(run_all, "RESULTS", tmp_path)
    (tmp_path / "learner.json").write_text(json.dumps({
        "ratios": {"oapl_vs_sft_cost_ratio": 1.1, "learner_peak_rss_vs_floor": 3.0},
        "tokens": {"completion_tokens_per_step": 10, "sequences": 2, "padding_share": 0.1,
                   "completion_share_of_logits": 0.3},
        "oapl_us_per_completion_token": 1.0, "sft_us_per_completion_token": 0.9, "rss": None,
    }))
    summary = run_all.write_report({"learner": {"status": "ok", "seconds": 1.0}})
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved == summary
    assert set(saved) == {
        "ingest_http_vs_copy_ratio", "ingest_p99_ms_at_50", "oapl_vs_sft_cost_ratio",
        "learner_peak_rss_vs_floor", "time_to_45pct_speedup_vs_trl",
        "rollout_pipeline_vs_bare_ratio",
    }
    assert saved["oapl_vs_sft_cost_ratio"] == 1.1 and saved["ingest_p99_ms_at_50"] is None
    report = (tmp_path / "performance.md").read_text()
    assert "| `oapl_vs_sft_cost_ratio` |" in report and "met" in report
    assert "missed: 1.50× the limit" in report
