"""``--bootstrap KEY=VALUE``: the warm-start recipe of a benchmark run, typed and validated."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks._common import bootstrap_overrides
from benchmarks.quality import _recipe_note
from workers.learner.recipe import BootstrapConfig

ROOT = Path(__file__).resolve().parents[2]


def test_values_take_their_fields_types_and_come_back_sorted() -> None:
    got = bootstrap_overrides(["sft_steps=300", "answer_line_weight=5", "call_noise = 0"])
    assert got == (("answer_line_weight", 5.0), ("call_noise", 0.0), ("sft_steps", 300))
    assert isinstance(dict(got)["sft_steps"], int)
    assert isinstance(dict(got)["answer_line_weight"], float)
    # The overrides build the recipe they name; none at all is the shipped recipe.
    assert BootstrapConfig(**dict(got)).answer_line_weight == 5.0
    assert bootstrap_overrides([]) == ()


@pytest.mark.parametrize(("pairs", "reason"), [
    (["answer_line_weight"], "expected KEY=VALUE"),
    (["answer_line_weight="], "expected KEY=VALUE"),
    (["answer_line_wieght=5"], "unknown field 'answer_line_wieght'"),
    (["size=small"], "unknown field 'size'"),
    (["sft_steps=3.5"], "is not a int"),
    (["answer_line_weight=five"], "is not a float"),
    (["call_noise=0", "call_noise=0.1"], "given twice"),
    (["answer_line_weight=0"], "invalid bootstrap config"),
    (["call_noise=1.5"], "invalid bootstrap config"),
])
def test_bad_flags_are_refused_with_the_reason(pairs: list[str], reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        bootstrap_overrides(pairs)


@pytest.mark.parametrize(("module", "has_cache_flag"), [
    ("benchmarks.quality", True), ("benchmarks.tune_round", True), ("benchmarks.decision", True),
    ("benchmarks.time_to_target", False),  # builds into the settings' model cache
])
def test_the_cli_refuses_a_bad_flag_before_building_anything(
    tmp_path: Path, module: str, has_cache_flag: bool
) -> None:
    cache = ["--cache-dir", str(tmp_path / "cache")] if has_cache_flag else []
    proc = subprocess.run(
        [sys.executable, "-m", module, "--bootstrap", "answer_line_weight=-1",
         "--out", str(tmp_path / "out"), *cache],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env=os.environ | {"TRACELEARN_MODEL_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 2
    assert "invalid bootstrap config" in proc.stderr
    assert not (tmp_path / "cache").exists()
    assert not (tmp_path / "out").exists()


def test_the_quality_cli_refuses_an_unknown_algorithm_before_writing_anything(
    tmp_path: Path,
) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.quality", "--algorithms", "oapl,ppo",
         "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "non-empty subset of oapl, grpo, not oapl, ppo" in proc.stderr
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "cache").exists()


def test_the_report_says_when_the_recipe_or_the_tuning_is_not_the_shipped_one() -> None:
    assert _recipe_note({"bootstrap_overrides": [], "tuned_on_model": "m", "model_name": "m"}) == ""
    assert _recipe_note({}) == ""
    note = _recipe_note({"bootstrap_overrides": [["answer_line_weight", 5.0]],
                         "tuned_on_model": "tiny-aaa", "model_name": "tiny-bbb"})
    assert "NOT the shipped one: answer_line_weight=5.0" in note
    assert "tuned on model tiny-aaa, not on this one (tiny-bbb)" in note
    # A trial recipe that has since shipped is the shipped one: only real departures are named.
    shipped = BootstrapConfig()
    note = _recipe_note({"bootstrap_overrides": [["call_noise", shipped.call_noise],
                                                 ["sft_steps", shipped.sft_steps + 1]]})
    assert note == f"; warm-start recipe NOT the shipped one: sft_steps={shipped.sft_steps + 1}"
    assert _recipe_note({"bootstrap_overrides": [["call_noise", shipped.call_noise]]}) == ""
