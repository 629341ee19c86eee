"""Each benchmark's core function on tiny inputs: the JSON it writes has the expected keys and
finite numbers. Timings are never asserted (they depend on the machine and its load)."""

from __future__ import annotations

import dataclasses
import importlib.machinery
import importlib.util
import json
import math
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

from tests.conftest import skip_or_fail

if TYPE_CHECKING:
    from benchmarks.quality import QualityConfig

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
@pytest.mark.timeout(300)
def test_ingest_benchmark_reports_wrk_levels_copy_ratios_and_the_profile(tmp_path: Path) -> None:
    from app.cli.serve import default_api_workers
    from benchmarks.ingest import IngestConfig, run

    if shutil.which("wrk") is None:
        skip_or_fail("wrk is not installed")
    cfg = IngestConfig(connections=(1, 2), duration_s=1, warmup_s=1, reference_connections=2,
                       batch_sizes=(1, 20), batches=1, min_rows=2, outcome_batches=1,
                       profile=True)
    result = run(cfg, tmp_path)
    saved = json.loads((tmp_path / "ingest.json").read_text())
    assert saved["ratios"] == result["ratios"]
    assert {"ingest_http_vs_copy_ratio", "ingest_http_vs_copy_ratio_batch_1",
            "ingest_http_vs_copy_ratio_batch_20", "ingest_p99_ms_at_2",
            "ingest_rps_at_2_vs_1"} <= set(saved["ratios"])
    # no 1000-trace batch here: the headline ratio is the largest batch's
    assert saved["ratios"]["ingest_http_vs_copy_ratio"] == saved["batches"][-1]["ratio"]
    assert [b["batch_size"] for b in saved["batches"]] == [1, 20]
    assert [b["batches"] for b in saved["batches"]] == [2, 1]  # min_rows=2 one-trace batches
    assert all(finite(b["ratio"]) for b in saved["batches"])
    assert finite(saved["batch_with_outcomes"]["ratio"])
    assert [lv["connections"] for lv in saved["wrk"]] == [1, 2]
    assert [lv["connections"] for lv in saved["healthz_floor"]] == [1, 2]
    assert saved["machine"]["python_loop_ms_at_start"] > 0
    assert saved["machine"]["python_loop_ms_at_end"] > 0
    # The reference level ran three times; its figures are the median-p99 run's.
    reference = saved["wrk"][1]
    assert "repeats" not in saved["wrk"][0] and len(reference["repeats"]) == 3
    assert reference["p99_ms"] == sorted(r["p99_ms"] for r in reference["repeats"])[1]
    for level in saved["wrk"]:
        assert level["requests"] > 0 and level["non_2xx"] == 0 and level["socket_errors"] == 0
        assert level["sent_equals_stored"], level
        assert all(finite(level[k]) for k in ("p50_ms", "p99_ms", "requests_per_s",
                                               "traces_per_s"))
    assert (tmp_path / "ingest.png").stat().st_size > 0
    if shutil.which("py-spy", path=str(Path(sys.executable).parent)):
        assert "top self:" in (tmp_path / "ingest_profile_wrk2.txt").read_text()
    default = saved["wrk_default_processes"]
    if default_api_workers() > 1:  # the service as started by default here, at the reference
        assert default["processes"] == default_api_workers()
        (level,) = default["wrk"]
        assert level["connections"] == 2 and level["requests"] > 0 and level["non_2xx"] == 0
        assert level["sent_equals_stored"], level
        assert saved["ratios"]["ingest_p99_ms_at_2_default_processes"] == level["p99_ms"]
    else:
        assert default is None


def test_the_reference_level_is_the_run_with_the_median_p99() -> None:
    from benchmarks.ingest import median_run

    runs = [{"p99_ms": 30.0, "requests_per_s": 1.0}, {"p99_ms": 10.0, "requests_per_s": 2.0},
            {"p99_ms": 20.0, "requests_per_s": 3.0}]
    chosen = median_run(runs)
    assert chosen["p99_ms"] == 20.0 and chosen["requests_per_s"] == 3.0
    assert [r["p99_ms"] for r in chosen["repeats"]] == [30.0, 10.0, 20.0]  # as run
    # A run that measured nothing ranks last; a single run is reported as it is.
    assert median_run([{"p99_ms": None}, {"p99_ms": 5.0}])["p99_ms"] is None
    assert median_run([{"p99_ms": None}, {"p99_ms": 5.0}, {"p99_ms": 6.0}])["p99_ms"] == 6.0
    assert median_run([{"p99_ms": 7.0}]) == {"p99_ms": 7.0}


def test_learner_benchmark_reports_cost_ratio_and_rss(tmp_path: Path, model_cache: Path) -> None:
    from benchmarks.learner import LearnerBenchConfig, run

    # The ~100M RSS model sized down to seconds: the same code path, a 2-layer random model.
    small = (("hidden_size", 64), ("num_hidden_layers", 2), ("intermediate_size", 128),
             ("num_attention_heads", 4), ("num_key_value_heads", 2))
    cfg = LearnerBenchConfig(size="test", prompts=2, group_size=4, max_new_tokens=16, steps=2,
                             rounds=1, micro_batch_size=8, bootstrap_overrides=TINY, scale=small,
                             scale_micro_batch_size=4)
    run(cfg, tmp_path)
    saved = json.loads((tmp_path / "learner.json").read_text())
    assert set(saved["ratios"]) == {"oapl_vs_sft_cost_ratio", "learner_peak_rss_vs_floor",
                                    "learner_peak_rss_vs_floor_bundled",
                                    "learner_peak_rss_vs_floor_system_malloc"}
    assert all(finite(v) for v in saved["ratios"].values())
    assert saved["tokens"]["completion_tokens_per_step"] > 0
    rss = saved["rss"]
    for key, allocator in (("bundled", "jemalloc"), ("scaled", "jemalloc"),
                           ("bundled_system", "system"), ("scaled_system", "system")):
        r = rss[key]
        # Floor and peak were measured in processes on the stated allocator.
        assert r["allocator"] == allocator, key
        # The floor holds the same state in the same kind of process: training only adds.
        assert 0 < r["state_peak_rss_mib"] < r["floor_mib"] and r["activation_mib"] > 0
        assert r["oapl_vs_floor"] > 0.5
    scaled = rss["scaled"]
    assert scaled["micro_batch"]["sequences"] == 4 and scaled["config"]["hidden_size"] == 64
    assert saved["ratios"]["learner_peak_rss_vs_floor"] == scaled["oapl_vs_floor"]
    assert (saved["ratios"]["learner_peak_rss_vs_floor_system_malloc"]
            == rss["scaled_system"]["oapl_vs_floor"])
    assert (tmp_path / "learner.png").stat().st_size > 0


@pytest.mark.timeout(1500)  # TRL's import and trainer set-up are slow on a loaded 2-core box
def test_time_to_target_tunes_both_arms_then_measures_with_their_points(
    tmp_path: Path, model_cache: Path
) -> None:
    if importlib.util.find_spec("trl") is None:
        skip_or_fail("trl is not installed (pip install -e '.[bench]')")
    from benchmarks.time_to_target import TimeToTargetConfig, run, tune

    cfg = TimeToTargetConfig(size="test", budget_s=3, train_prompts=8, heldout=4, group_size=2,
                             max_new_tokens=12, trl_batch=4, eval_every=1, sync_interval=2,
                             window_passes=2, micro_batch_size=4, bootstrap_overrides=TINY,
                             # the test model's rewards are all equal: keep its groups to train
                             keep_zero_variance_groups=True, seeds=(0,))
    # One point per arm, one seed: the file's chosen points are what the measurement then runs.
    grid = {"ours": [dict(lr=1e-3, sync_interval=4, window_passes=2)],
            "trl": [dict(trl_lr=1e-3, trl_num_iterations=2)]}
    tuned = tune(cfg, tmp_path, grid=grid, seeds=(5,), budget_s=2)
    assert tuned["config"]["eval_split"] == "validation"
    assert tuned["best"]["ours"]["sync_interval"] == 4
    assert tuned["best"]["trl"]["trl_num_iterations"] == 2
    for arm in ("ours", "trl"):
        (point,) = tuned["points"][arm]
        assert finite(point["mean_seconds_to_target"]) and point["runs"][0]["seed"] == 5

    run(dataclasses.replace(cfg, tuned_path=str(tmp_path / "time_to_target_tune.json")),
        tmp_path)
    saved = json.loads((tmp_path / "time_to_target.json").read_text())
    assert saved["config"]["sync_interval"] == 4 and saved["config"]["window_passes"] == 2
    assert saved["config"]["trl_num_iterations"] == 2 and saved["config"]["lr"] == 1e-3
    (only,) = saved["seeds"]
    for arm in ("ours", "trl"):
        evals = [c for c in only[arm]["curve"] if "correct" in c]
        assert evals, arm
        assert [c["step"] for c in evals] == list(range(1, len(evals) + 1)), arm
        assert all(0.0 <= c["correct"] <= 1.0 and finite(c["train_seconds"]) for c in evals)
    value = saved["ratios"]["time_to_45pct_speedup_vs_trl"]
    assert value == (1.0 if only["speedup"] is None else only["speedup"])
    assert (tmp_path / "time_to_target.png").stat().st_size > 0


def test_the_headline_speed_up_is_the_median_over_seeds_a_failed_seed_counting_as_none() -> None:
    from benchmarks.time_to_target import median_speedup

    assert median_speedup([5.35, 0.79, 1.03]) == 1.03
    assert median_speedup([2.0, 4.0]) == 3.0
    # A seed where neither arm reached the target counts as no speed-up, not as a missing value.
    assert median_speedup([None, 4.0, 6.0]) == 4.0
    assert median_speedup([None, None, 6.0]) == 1.0
    assert median_speedup([]) is None


def _load_run_all() -> Any:
    loader = importlib.machinery.SourceFileLoader("bench_run_all", str(ROOT / "benchmarks/run_all"))
    spec = importlib.util.spec_from_loader("bench_run_all", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def test_run_all_summary_is_one_flat_object_with_the_nine_figures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_all = _load_run_all()
    monkeypatch.setattr(run_all, "RESULTS", tmp_path)
    (tmp_path / "learner.json").write_text(json.dumps({
        "ratios": {"oapl_vs_sft_cost_ratio": 1.1, "learner_peak_rss_vs_floor": 3.0,
                   "learner_peak_rss_vs_floor_bundled": 1.2,
                   "learner_peak_rss_vs_floor_system_malloc": 3.5},
        "tokens": {"completion_tokens_per_step": 10, "sequences": 2, "padding_share": 0.1,
                   "completion_share_of_logits": 0.3},
        "oapl_us_per_completion_token": 1.0, "sft_us_per_completion_token": 0.9, "rss": None,
        "seconds": 199.14, "machine": {"time": "2026-12-03T16:44:02+0000"},
    }))
    summary = run_all.write_report({"learner": {"status": "ok", "seconds": 1.0}})
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved == summary
    assert set(saved) == {
        "ingest_http_vs_copy_ratio", "ingest_p99_ms_at_50", "ingest_rps_at_50_vs_1",
        "ingest_p99_ms_at_50_default_processes", "oapl_vs_sft_cost_ratio",
        "learner_peak_rss_vs_floor", "learner_peak_rss_vs_floor_bundled",
        "learner_peak_rss_vs_floor_system_malloc",
        "time_to_45pct_speedup_vs_trl", "rollout_pipeline_vs_bare_ratio",
    }
    assert saved["oapl_vs_sft_cost_ratio"] == 1.1 and saved["ingest_p99_ms_at_50"] is None
    report = (tmp_path / "performance.md").read_text()
    assert "| `oapl_vs_sft_cost_ratio` |" in report and "met" in report
    assert "missed: 2.00× the limit" in report  # the RSS ratio at ~100M
    assert "| `learner_peak_rss_vs_floor_bundled` |" in report and "| 1.2 | — | reported |" in report
    assert "| `learner_peak_rss_vs_floor_system_malloc` |" in report and "| 3.5 | — |" in report
    # The Runs table sets run_all's record beside what the result file says of itself.
    assert "| learner | ok | 1.0 | 2026-12-03T16:44:02+0000 | 199.1 |" in report
    assert "| ingest | not run this time | None | — | — |" in report


# --- the quality benchmark -----------------------------------------------------------------------


def test_cluster_bootstrap_resamples_whole_prompts() -> None:
    from benchmarks.quality_stats import cluster_bootstrap_ci, cluster_bootstrap_means

    # Prompt "a" scored 1 under three seeds, prompt "b" scored 0 once. Drawing two clusters gives
    # aa → 6/6 = 1, bb → 0/2 = 0, ab or ba → 3/4: probabilities 1/4, 1/4, 1/2. A bootstrap over
    # the four values as if independent would also give 1/4 and 1/2.
    means = cluster_bootstrap_means([1.0, 1.0, 1.0, 0.0], ["a", "a", "a", "b"], 4000, seed=0)
    assert set(np.round(means, 9)) == {0.0, 0.75, 1.0}
    assert abs(np.mean(means == 0.75) - 0.5) < 0.03
    assert abs(np.mean(means == 1.0) - 0.25) < 0.03
    assert cluster_bootstrap_ci([1.0, 1.0, 1.0, 0.0], ["a", "a", "a", "b"]) == (0.0, 1.0)
    # clusters with equal means: no spread, whatever the cluster sizes
    assert cluster_bootstrap_ci([0.25, 0.75, 0.5, 0.5], [1, 1, 2, 3]) == (0.5, 0.5)
    assert all(math.isnan(x) for x in cluster_bootstrap_ci([], []))


def test_answer_summary_separates_format_from_decision() -> None:
    from benchmarks.quality_stats import answer_summary, majority_rate

    # prompt 1 (outcome YES): YES, None, NO, YES; prompt 2 (outcome NO): NO, NO, None, None
    s = answer_summary([[True, None, False, True], [False, False, None, None]], [True, False])
    assert s["per_prompt_correct"] == [0.5, 0.5] and s["correct"] == 0.5
    assert s["first_sample_correct"] == 1.0
    assert s["parse_rate"] == 0.625  # (3/4 + 2/4) / 2
    assert s["parsed_accuracy"] == 0.8  # 4 correct of 5 parsed
    assert s["yes_share"] == 0.4  # 2 YES of 5 parsed
    assert answer_summary([[None]], [True])["parsed_accuracy"] is None
    assert majority_rate([True, False, False, False]) == 0.75


QUALITY_KEYS = {
    "baseline_heldout_correct", "baseline_parse_rate", "oapl_one_update_heldout_correct",
    "grpo_one_update_heldout_correct", "oapl_one_update_optimizer_steps", "heldout_majority_rate",
    "oapl_best_parsed_accuracy", "unseen_style_heldout_correct",
}


def test_the_rollout_pool_gives_each_prompt_the_largest_group_any_row_trains_it_with() -> None:
    from benchmarks.quality import Row, pool_segments

    rows = [Row("a", "a", 128, 8), Row("b", "b", 2048, 8), Row("c", "c", 128, 32),
            Row("d", "d", 128, 8, rounds=10)]
    # 128 prompts × 32 (row c reaches them), the other 1,920 × 8: 69,632 answers fewer than 2048×32
    assert pool_segments(rows) == [(0, 128, 32), (128, 2048, 8)]
    assert pool_segments([Row("a", "a", 32, 8), Row("b", "b", 128, 8)]) == [(0, 128, 8)]
    assert pool_segments([Row("a", "a", 32, 4), Row("b", "b", 64, 8), Row("c", "c", 96, 2)]) == [
        (0, 64, 8), (64, 96, 2)]


def test_quality_benchmark_reports_rounds_styles_and_cluster_cis(
    tmp_path: Path, model_cache: Path
) -> None:
    from benchmarks.quality import PARTIAL_NAME, QualityConfig, run

    point = (("lr", 5e-3), ("epochs", 1), ("keep_zero_variance_groups", True))
    cfg = QualityConfig(
        size="test", bootstrap_overrides=TINY, seeds=2, heavy_row_seeds=1, heldout=6, samples=2,
        max_tokens=12, rows=("more", "rounds10"), scale=4 / 128, rounds=2, group_size_cap=2, lag_intervals=(1, 2), lag_steps=2,
        lag_groups_per_step=2, lag_group_size=2, lag_heldout=4, lag_eval_every=1, lag_lr=7e-4,
        tuned=(("oapl", (*point, ("beta2", 0.1))), ("grpo", point)))
    partial = tmp_path / PARTIAL_NAME
    oapl_runs_on_disk: list[int] = []

    def log(line: str) -> None:  # logged right after each run: its row is on disk already
        if " oapl | " in line:
            oapl_runs_on_disk.append(
                len(json.loads(partial.read_text())["table1"]["rows"]["more"]["oapl"]))

    run(cfg, tmp_path, log=log)
    # OAPL runs of the "more" row on disk after each OAPL run: seed 0 "more", seed 0 "rounds10",
    # seed 1 "more" (the heavy 10-rounds row runs under one seed)
    assert oapl_runs_on_disk == [1, 1, 2]
    assert not partial.exists()  # removed once quality.json holds everything
    saved = json.loads((tmp_path / "quality.json").read_text())
    assert set(saved) >= QUALITY_KEYS
    for key in QUALITY_KEYS - {"oapl_best_parsed_accuracy"}:
        assert finite(saved[key]), key
    # None only when the best lag point parsed nothing
    assert saved["oapl_best_parsed_accuracy"] is None or finite(saved["oapl_best_parsed_accuracy"])
    # a best lag point is re-checked (its figure is the key); this model parses nothing, so its
    # lag runs drop every group and evaluate only at step 0, which is never a best point
    recheck = saved["table2_best_recheck"]
    assert (recheck is None) == (saved["oapl_best_parsed_accuracy_point"] is None)
    if recheck is not None:
        assert saved["oapl_best_parsed_accuracy"] == recheck["parsed_accuracy"]
    for key in ("baseline_heldout_correct", "oapl_one_update_heldout_correct"):
        lo, hi = saved[f"{key}_ci95"]
        assert lo <= saved[key] <= hi
    # one round of 1 epoch over 4 groups at 16 per step: one optimizer step
    assert saved["oapl_one_update_optimizer_steps"] == 1
    rows = saved["table1"]["summary"]["rows"]
    assert set(rows) == {"more", "rounds10"}
    assert rows["more"]["oapl"]["seeds"] == 2 and rows["rounds10"]["oapl"]["seeds"] == 1
    assert rows["rounds10"]["grpo"]["optimizer_steps"] == 2  # two rounds of one step
    head = rows["more"]["oapl"]
    for cond in ("seen_t1", "seen_greedy", "unseen_t1", "unseen_greedy"):
        s = head[cond]
        assert s["n_prompts"] == 6 and finite(s["correct"]) and finite(s["parse_rate"])
        assert len(s["correct_ci95"]) == 2
    assert rows["rounds10"]["oapl"]["unseen_t1"] is None  # unseen T=1: headline row only
    assert set(saved["table2"]) == {"1", "2"}
    assert saved["setup"]["lag_lr"] == 7e-4  # the lag runs' own learning rate, in the report too
    report = (tmp_path / "quality.md").read_text()
    assert "acc \\| parsed" in report and "si_units" in report
    assert "2 groups a step at lr 0.0007" in report
    assert (tmp_path / "one_update.png").stat().st_size > 0


def test_tuning_script_writes_chosen_points_the_benchmark_reads(
    tmp_path: Path, model_cache: Path
) -> None:
    from benchmarks.quality import load_tuned
    from benchmarks.tune_round import TuneConfig, run

    run(TuneConfig(size="test", bootstrap_overrides=TINY, grid="smoke", prompts=4, group_size=2,
                   val=4, samples=1, max_tokens=12, epochs=(1, 2),
                   grid_keeps_zero_variance=True), tmp_path, log=lambda _: None)
    saved = json.loads((tmp_path / "tune_round.json").read_text())
    assert len(saved["trials"]) == 8  # 2 runs per algorithm, each scored after epochs 1 and 2
    assert [t["epochs"] for t in saved["trials"][:2]] == [1, 2]
    assert all(finite(t["correct"]) for t in saved["trials"])
    # the best point tried both ways (here nothing parses, so dropping leaves nothing to train on)
    assert [t["keep_zero_variance_groups"] for t in saved["zero_variance"]["oapl"]] == [True, False]
    assert saved["best"]["oapl"]["correct"] is not None
    assert saved["bootstrap_overrides"] == dict(TINY)  # the recipe it was tuned on
    tuned = load_tuned(tmp_path / "tune_round.json")
    assert set(tuned["oapl"]) == {"lr", "beta2", "epochs", "keep_zero_variance_groups"}
    assert set(tuned["grpo"]) == {"lr", "epochs", "keep_zero_variance_groups"}
    assert not (tmp_path / "tune_round.partial.json").exists()  # a finished run leaves none

    # A run cut short after its first grid point: --resume keeps that point, trains the rest.
    first_point = [t for t in saved["trials"] if t["algorithm"] == "oapl"][:2]
    marked = [t | {"correct": 0.987} for t in first_point]
    setup = {"grid": "smoke", "round": saved["round"], "pool": [4, 2], "size": "test",
             "model": Path(saved["model_dir"]).name, "val": [7, 4, 1], "epochs": [1, 2],
             "max_tokens": 12, "grid_keeps_zero_variance": True}
    (tmp_path / "tune_round.partial.json").write_text(json.dumps(
        {"setup": setup, "baseline": saved["baseline"], "trials": marked}))
    seen: list[str] = []
    run(TuneConfig(size="test", bootstrap_overrides=TINY, grid="smoke", prompts=4, group_size=2,
                   val=4, samples=1, max_tokens=12, epochs=(1, 2),
                   grid_keeps_zero_variance=True, resume=True), tmp_path, log=seen.append)
    resumed = json.loads((tmp_path / "tune_round.json").read_text())
    assert resumed["trials"][:2] == marked and len(resumed["trials"]) == 8
    assert seen[1].startswith("resuming: 2 trial records")

    # --merge: a second grid's records join the first's, the best is chosen over both, and a
    # best point that did not move keeps its zero-variance retrial instead of training again.
    merged_log: list[str] = []
    run(TuneConfig(size="test", bootstrap_overrides=TINY, grid="smoke", prompts=4, group_size=2,
                   val=4, samples=1, max_tokens=12, epochs=(1, 2),
                   grid_keeps_zero_variance=True, merge=True), tmp_path, log=merged_log.append)
    merged = json.loads((tmp_path / "tune_round.json").read_text())
    assert merged["grid"] == "smoke+smoke" and len(merged["trials"]) == 16
    assert all(t["grid"] == "smoke" for t in merged["trials"])
    assert merged["best"]["oapl"]["correct"] == 0.987
    assert merged["zero_variance"]["oapl"] == resumed["zero_variance"]["oapl"]
    with pytest.raises(SystemExit, match="differs in"):
        run(TuneConfig(size="test", bootstrap_overrides=TINY, grid="smoke", prompts=5,
                       group_size=2, val=4, samples=1, max_tokens=12, epochs=(1, 2),
                       merge=True), tmp_path, log=lambda _: None)


def test_quality_rows_skipped_in_a_second_sitting_come_from_the_first(tmp_path: Path) -> None:
    from benchmarks.quality import QualityConfig, keep_previous
    from workers.clinical import task

    qc = QualityConfig(heldout=10, samples=2, rows=("rounds10",), lag_intervals=())
    setup = {"heldout": 10, "samples": 2, "max_tokens": qc.max_tokens,
             "seen_styles": list(task.SEEN_STYLES), "unseen_style": task.UNSEEN_STYLE,
             "lag_lr": 5e-4, "lag_intervals": [1, 10]}
    first = {"setup": setup, "table2": {"1": {"history": []}}, "baseline_heldout_correct": 0.045,
             "table2_best_recheck": {"parsed_accuracy": 0.55},
             "table1": {"summary": {"rows": {"more": {"oapl": "A"}, "rounds10": {"oapl": "old"}}}}}
    (tmp_path / "q.json").write_text(json.dumps(first))
    summary = {"baseline": {}, "rows": {"rounds10": {"oapl": "new"}}}
    merged, t2, recheck, taken = keep_previous(qc, tmp_path / "q.json", summary, {}, None)
    assert merged["rows"] == {"more": {"oapl": "A"}, "rounds10": {"oapl": "new"}}
    assert t2 == first["table2"]
    assert recheck == first["table2_best_recheck"]  # table 2 comes with its best point's re-check
    # table 2's lag settings come with it, not this sitting's (which ran no lag interval)
    assert taken == {"rows": ["more"], "table2": True, "baseline_correct": 0.045,
                     "table2_setup": {"lag_lr": 5e-4, "lag_intervals": [1, 10]},
                     "headline_baseline": {"baseline_heldout_correct": 0.045}}
    (tmp_path / "q.json").write_text(json.dumps(first | {"setup": setup | {"heldout": 500}}))
    with pytest.raises(ValueError, match="held-out setup differs"):
        keep_previous(qc, tmp_path / "q.json", summary, {}, None)


def test_a_sitting_of_one_algorithm_takes_the_other_arm_of_its_rows_from_the_first(
    tmp_path: Path,
) -> None:
    from benchmarks.quality import QualityConfig, keep_previous, run
    from workers.clinical import task

    qc = QualityConfig(heldout=10, samples=2, rows=("rounds10",), algorithms=("grpo",),
                       lag_intervals=())
    setup = {"heldout": 10, "samples": 2, "max_tokens": qc.max_tokens,
             "seen_styles": list(task.SEEN_STYLES), "unseen_style": task.UNSEEN_STYLE}
    first = {"setup": setup, "table2": {}, "baseline_heldout_correct": 0.045,
             "table1": {"summary": {"rows": {"more": {"oapl": "A", "grpo": "B"},
                                             "rounds10": {"oapl": "old", "grpo": "old"}}}}}
    (tmp_path / "q.json").write_text(json.dumps(first))
    summary = {"baseline": {}, "rows": {"rounds10": {"grpo": "new"}}}
    merged, _, _, taken = keep_previous(qc, tmp_path / "q.json", summary, {}, None)
    assert merged["rows"] == {"more": {"oapl": "A", "grpo": "B"},
                              "rounds10": {"grpo": "new", "oapl": "old"}}
    assert taken["rows"] == ["more", "rounds10 OAPL"]
    with pytest.raises(ValueError, match="needs --keep-from"):
        run(dataclasses.replace(qc, rows=("more",)), tmp_path / "out", lambda _: None)
    with pytest.raises(ValueError, match="non-empty subset"):
        QualityConfig(algorithms=("ppo",))


def _wrk_level(c: int, rps: float, p99: float, stored: int) -> dict[str, Any]:
    return {"connections": c, "requests": 100 * c, "seconds": 10.0, "requests_per_s": rps,
            "traces_per_s": rps, "p50_ms": p99 / 2, "p90_ms": p99 * 0.9, "p99_ms": p99,
            "max_ms": p99 * 2, "non_2xx": 0, "socket_errors": 0, "rows_stored": stored,
            "api_cpu_ms_per_request": round(1000 / rps, 2),
            "postgres_cpu_ms_per_request": round(100 / rps, 3)}


def test_run_all_reports_every_wrk_level_the_copy_ratio_per_batch_size_and_the_profile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_all = _load_run_all()
    monkeypatch.setattr(run_all, "RESULTS", tmp_path)
    wrk = [_wrk_level(1, 100.0, 9.0, 100), _wrk_level(10, 150.0, 90.0, 1001),
           _wrk_level(50, 160.0, 400.0, 5003), _wrk_level(200, 140.0, 2000.0, 20010)]
    wrk[2]["repeats"] = [{"p99_ms": p99, "requests_per_s": rps, "api_cpu_ms_per_request": cpu}
                         for p99, rps, cpu in ((380.0, 170.0, 5.9), (400.0, 160.0, 6.25),
                                               (450.0, 150.0, 6.7))]
    batches = [{"batch_size": s, "batches": 6, "http_rows_per_s": 10.0 * s,
                "copy_rows_per_s": 100.0 * s, "ratio": r, "pair_ratios": [r / 2, r, 2 * r]}
               for s, r in ((1, 0.11), (10, 0.12), (100, 0.13), (1000, 0.14))]
    (tmp_path / "ingest.json").write_text(json.dumps({
        "config": {"duration_s": 10, "reference_connections": 50},
        "machine": {"loadavg_at_start": [1.0], "loadavg_at_end": [2.0],
                    "python_loop_ms_at_start": 31.5, "python_loop_ms_at_end": 41.6},
        "wrk": wrk, "healthz_floor": [_wrk_level(c, 900.0, 5.0, 0) for c in (1, 10, 50, 200)],
        "batches": batches, "batch": batches[-1], "batch_with_outcomes": None,
        "ratios": {"ingest_http_vs_copy_ratio": 0.14, "ingest_p99_ms_at_50": 400.0,
                   "ingest_rps_at_50_vs_1": 1.6},
    }))
    (tmp_path / "ingest_profile_wrk50.txt").write_text(
        "busy samples: 4\n\ntop self:\n  75.0%  GroupWriter._gather\n  25.0%  other\n")
    summary = run_all.write_report({"ingest": {"status": "ok", "seconds": 1.0}})
    assert summary["ingest_rps_at_50_vs_1"] == 1.6 and summary["ingest_p99_ms_at_50"] == 400.0
    report = (tmp_path / "performance.md").read_text()
    assert "| `ingest_rps_at_50_vs_1` |" in report and "| 1.6 | ≥ 1.0 | met |" in report
    # CPU a request, ingest (API, Postgres) and then the floor's (API).
    assert ("| 50 | 160.0 | 160.0 | 200.0 | 360.0 | 400.0 | 800.0 | 0 | 0 | 5000 / 5003 | 6.25 | "
            "0.625 | 900.0 | 5.0 | 1.11 |") in report
    for c in (1, 10, 200):
        assert f"\n| {c} | " in report
    for s, r in ((1, 0.11), (10, 0.12), (100, 0.13), (1000, 0.14)):
        assert f"| {s} | 6 | {10.0 * s} | {100.0 * s} | {r} | {r / 2}–{2 * r} |" in report
    assert "75.0%  GroupWriter._gather" in report
    assert "a fixed Python loop took 31.5 ms at start and 41.6 ms at end" in report
    assert ("At 50 connections its row in the table is the run with the median p99 of 3 back "
            "to back: p99 380.0 / 400.0 / 450.0 ms, 170.0 / 160.0 / 150.0 req/s, API CPU "
            "5.9 / 6.25 / 6.7 ms a request.") in report


def test_a_round_whose_groups_all_scored_alike_is_skipped_not_fatal(
    tmp_path: Path, model_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GRPO at its cliff collapses to answers that all score the same: the 10-rounds row must
    record the rounds it could not train and go on, not end the sitting (as it once did)."""
    import benchmarks.quality as quality
    from workers.inference.base import SamplingParams
    from workers.inference.local import LocalBackend
    from workers.learner.bootstrap import BootstrapConfig, bootstrap_model
    from workers.learner.data import make_rollout_groups
    from workers.learner.trainer import TrainerConfig

    overrides: dict[str, Any] = dict(TINY)
    model_dir = bootstrap_model(config=BootstrapConfig(size="test", **overrides),
                                cache_dir=model_cache)
    backend = LocalBackend(model_dir)
    prompts = quality.items(0, 2, "train")
    by_length = lambda m, text, o: (1.0 if len(text) % 2 else -1.0, True)  # noqa: E731
    first = make_rollout_groups(backend, prompts, 4, SamplingParams(12, 1.0, 0), by_length)
    assert any(len(set(g.rewards)) > 1 for g in first)
    monkeypatch.setattr(quality, "grade", lambda m, text, o: (-1.0, False))  # the collapse
    row = quality.Row("rounds10", "3 rounds", 2, 4, rounds=3)
    cfg = TrainerConfig(epochs=1, groups_per_step=2, lr=1e-2)
    lines: list[str] = []
    model, history = quality.run_rounds(model_dir, backend, first, prompts, row, cfg, 0,
                                        tmp_path, lines.append, max_tokens=12)
    assert model is not None  # round 1's policy, kept
    assert history[0]["optimizer_steps"] >= 1 and "skipped" not in history[0]
    assert [h.get("skipped") for h in history[1:]] == ["every group has equal rewards"] * 2
    assert [h["train_reward"] for h in history[1:]] == [-1.0, -1.0]
    assert lines[-1] == ("  round 3/3: train reward -1.000, every group has equal rewards: "
                         "skipped")


def _first_sitting(tmp_path: Path) -> tuple[QualityConfig, Path]:
    """A very small first sitting of the headline row alone, for the tests of later sittings:
    its config and the directory of its ``quality.json``."""
    from benchmarks.quality import QualityConfig, run

    point = (("lr", 5e-3), ("epochs", 1), ("keep_zero_variance_groups", True))
    cfg = QualityConfig(
        size="test", bootstrap_overrides=TINY, seeds=1, heavy_row_seeds=1, heldout=4, samples=1,
        max_tokens=8, rows=("more",), scale=2 / 128, rounds=2, group_size_cap=2,
        lag_intervals=(), tuned=(("oapl", (*point, ("beta2", 0.1))), ("grpo", point)))
    first = tmp_path / "first"
    run(cfg, first, log=lambda _: None)
    return cfg, first


def test_a_sitting_of_heavy_rows_alone_runs_them_under_their_seeds_only(
    tmp_path: Path, model_cache: Path
) -> None:
    """`--rows rounds10` with 3 seeds: seeds 1 and 2 have no row to run (the heavy rows run
    under ``heavy_row_seeds``); they are passed over, not a crash after the last row."""
    from benchmarks.quality import run

    cfg, first = _first_sitting(tmp_path)
    heavy = dataclasses.replace(cfg, seeds=3, rows=("rounds10",), keep_from=None)
    with pytest.raises(ValueError, match="headline row 'more' is neither run nor taken"):
        run(heavy, tmp_path / "refused", log=lambda _: None)
    lines: list[str] = []
    run(dataclasses.replace(heavy, keep_from=str(first / "quality.json")), tmp_path / "second",
        log=lines.append)
    saved = json.loads((tmp_path / "second" / "quality.json").read_text())
    rows = saved["table1"]["summary"]["rows"]
    assert rows["rounds10"]["oapl"]["seeds"] == rows["rounds10"]["grpo"]["seeds"] == 1
    earlier_result = json.loads((first / "quality.json").read_text())
    assert rows["more"] == earlier_result["table1"]["summary"]["rows"]["more"]
    # the headline keys pair the kept headline row with the baseline of its own sitting
    for key in ("baseline_heldout_correct", "baseline_parse_rate_ci95",
                "baseline_unseen_style_heldout_correct", "oapl_one_update_heldout_correct"):
        assert saved[key] == earlier_result[key], key
    assert not any(line.startswith(("seed 1", "seed 2")) for line in lines)
    header = (tmp_path / "second" / "quality.md").read_text().split("\n")[2]
    earlier = json.loads((first / "quality.json").read_text())["baseline_heldout_correct"]
    assert f"table 1's rows more come from the earlier one (`--keep-from {first}/quality.json`, " \
        f"whose baseline was {100 * earlier:.1f}% correct at T=1)" in header


def test_a_stopped_sitting_reports_its_finished_runs_from_its_partial_file(
    tmp_path: Path, model_cache: Path
) -> None:
    """A sitting stopped after the 10-round row's OAPL run (before GRPO's): ``from_partial``
    makes the report of what finished, the rest from ``keep_from``, and the header says what
    was not run."""
    from benchmarks.quality import PARTIAL_NAME, run

    cfg, first = _first_sitting(tmp_path)
    heavy = dataclasses.replace(cfg, rows=("rounds10",), keep_from=str(first / "quality.json"))

    class Stopped(Exception):
        pass

    def stop_after_oapl(line: str) -> None:
        if " oapl | " in line:
            raise Stopped

    stopped = tmp_path / "stopped"
    with pytest.raises(Stopped):
        run(heavy, stopped, log=stop_after_oapl)
    assert not (stopped / "quality.json").exists()
    copy = tmp_path / "partial.json"
    copy.write_bytes((stopped / PARTIAL_NAME).read_bytes())
    run(dataclasses.replace(heavy, from_partial=str(copy)), tmp_path / "report",
        log=lambda _: None)
    saved = json.loads((tmp_path / "report" / "quality.json").read_text())
    rows = saved["table1"]["summary"]["rows"]
    assert set(rows["rounds10"]) == {"oapl"} and rows["rounds10"]["oapl"]["optimizer_steps"] == 2
    earlier = json.loads((first / "quality.json").read_text())
    assert rows["more"] == earlier["table1"]["summary"]["rows"]["more"]
    header = (tmp_path / "report" / "quality.md").read_text().split("\n")[2]
    assert f"stopped before it finished: the report is made of its finished runs " \
        f"(`--from-partial {copy}`); not run: rounds10 GRPO." in header
    assert copy.exists()  # the input is left as it was


def test_the_best_lag_point_is_rechecked_on_prompts_its_curves_never_saw(
    model_cache: Path,
) -> None:
    from benchmarks.quality import EvalSet, QualityConfig, recheck_best_point
    from workers.inference.local import LocalBackend
    from workers.learner.bootstrap import BootstrapConfig, bootstrap_model

    qc = QualityConfig(size="test", heldout=9, samples=3, lag_heldout=4, max_tokens=8)
    evalset = EvalSet.build(qc.heldout)
    model_dir = bootstrap_model(config=BootstrapConfig(size="test", **dict(TINY)),
                                cache_dir=model_cache)
    recheck = recheck_best_point(LocalBackend(model_dir), evalset, qc, None)
    assert recheck["prompts"] == 9 - 4 and recheck["samples"] == 3
    # the majority rate of the five prompts after the curves' four, not of all nine
    tail = evalset.outcomes[4:]
    assert recheck["majority_rate"] == max(sum(tail), len(tail) - sum(tail)) / len(tail)
    assert recheck["n_parsed"] <= 5 * 3 and len(recheck["parsed_accuracy_ci95"]) == 2
