"""Long CLI work reports itself line by line when its output is not a terminal (a pipe, a log),
where a rich bar would only be drawn once finished."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from app.cli.progress import StageLines
from tests.conftest import REPO


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_stage_prints_when_it_starts_every_interval_while_it_runs_and_when_it_ends(
    capsys: pytest.CaptureFixture[str],
) -> None:
    clock = Clock()
    report = StageLines("building", every_s=25.0, clock=clock)
    report("tokenizer", 0, 1)
    clock.now = 4.0
    report("tokenizer", 1, 1)
    report("warm-start", 0, 400)
    for step in range(1, 401):
        clock.now = 4.0 + step * 0.25  # 100 s of warm-start
        report("warm-start", step, 400)
    assert capsys.readouterr().err.splitlines() == [
        "building: tokenizer…",
        "building: tokenizer done (4 s)",
        "building: warm-start 0/400…",
        "building: warm-start 100/400 (25 s)",
        "building: warm-start 200/400 (50 s)",
        "building: warm-start 300/400 (75 s)",
        "building: warm-start done (100 s)",
    ]


def test_a_stage_that_ends_twice_or_restarts_prints_nothing_more(
    capsys: pytest.CaptureFixture[str],
) -> None:
    report = StageLines(clock=Clock())
    report("model", 0, 1)
    report("model", 1, 1)
    report("model", 1, 1)
    report("model", 0, 1)
    assert capsys.readouterr().err.splitlines() == ["model…", "model done (0 s)"]


def test_model_bootstrap_into_a_pipe_prints_a_line_per_stage(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "app.cli", "model", "bootstrap", "--out", str(tmp_path / "m"),
         "--size", "test", "--demos", "300", "--sft-steps", "10",
         "--cache-dir", str(tmp_path / "cache")],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stdout
    lines = [line.removeprefix("building the bundled model: ")
             for line in out.stdout.splitlines() if line.startswith("building")]
    stages = ["demonstrations", "tokenizer", "warm-start", "saving"]
    # Each stage: a line when it starts, maybe lines while it runs (a busy box), one at its end.
    assert [line.split(" ")[0].rstrip("…") for line in lines if "…" in line] == stages, out.stdout
    assert [line.split(" ")[0] for line in lines if " done (" in line] == stages, out.stdout
    assert "model at " in out.stdout.splitlines()[-1]
