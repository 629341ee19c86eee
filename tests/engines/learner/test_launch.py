"""The launcher's process handling, with small Python scripts standing in for torchrun's ranks
(the real torchrun round is tested through the train job in tests/domain/runs/)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil

from workers.learner.launch import (
    LearnerProcess,
    Progress,
    parse_line,
    progress_line,
    rank_errors,
)


def _script(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_progress_line_round_trips_and_anything_else_is_a_log_line() -> None:
    line = progress_line(3, 10, {"loss": 0.25})
    assert line == '@@tracelearn.progress {"step": 3, "total": 10, "metrics": {"loss": 0.25}}'
    assert parse_line(line) == Progress(3, 10, {"loss": 0.25})
    assert parse_line("Loading weights") == "Loading weights"


def test_output_comes_back_as_progress_and_log_lines_and_stays_in_the_log(tmp_path: Path) -> None:
    argv = _script(f"""
        import sys
        print("starting", flush=True)
        print({progress_line(1, 2, {"loss": 1.5})!r}, flush=True)
        print("ValueError: boom", file=sys.stderr, flush=True)
        sys.exit(3)
    """)
    events: list[Progress | str] = []
    with LearnerProcess(argv, tmp_path / "learner.log") as proc:
        while proc.poll() is None:
            events += proc.events(timeout=0.2)
        events += proc.finish()
    assert proc.poll() == 3
    assert events == ["starting", Progress(1, 2, {"loss": 1.5}), "ValueError: boom"]
    assert proc.tail() == "starting\nValueError: boom"
    assert (tmp_path / "learner.log").read_text().splitlines()[-1] == "ValueError: boom"


def test_terminate_kills_the_whole_tree_when_term_is_ignored(tmp_path: Path) -> None:
    # Like torchrun's ranks, the child runs in a session of its own: TERM to the launcher's
    # process group does not reach it.
    child = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
    argv = _script(f"""
        import signal, subprocess, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        subprocess.Popen([sys.executable, "-c", {child!r}], start_new_session=True)
        print("up", flush=True)
        time.sleep(60)
    """)
    proc = LearnerProcess(argv, tmp_path / "learner.log")
    assert proc.events(timeout=20) == ["up"]
    tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    assert len(tree) == 2
    started = time.monotonic()
    proc.terminate(grace_s=1.0)
    assert time.monotonic() - started < 10
    assert all(_gone(p.pid) for p in tree)


def test_a_rank_whose_job_process_died_stops_at_its_next_report(tmp_path: Path) -> None:
    # The worker running the job is killed (no chance to terminate anything): the pipe it read
    # closes, and rank 0's next progress line fails with a broken pipe, which ends the round.
    rank = _script(f"""
        import time
        while True:
            print({progress_line(1, 2, {})!r}, flush=True)
            time.sleep(0.1)
    """)
    job = _script(f"""
        import os
        from pathlib import Path
        from workers.learner.launch import LearnerProcess
        proc = LearnerProcess({rank!r}, Path({str(tmp_path / "learner.log")!r}))
        proc.events(timeout=20)
        print(proc.pid, flush=True)
        os._exit(0)
    """)
    out = subprocess.run(job, capture_output=True, text=True, timeout=120, check=True)
    pid = int(out.stdout.strip())
    deadline = time.monotonic() + 10
    while not _gone(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _gone(pid)


def test_rank_errors_names_each_distinct_error_once_with_its_ranks(tmp_path: Path) -> None:
    same = "Traceback (most recent call last):\n  File \"x.py\", line 1\nOSError: no model\n"
    (tmp_path / "error-rank0.txt").write_text(same)
    (tmp_path / "error-rank1.txt").write_text(same)
    (tmp_path / "error-rank10.txt").write_text("a\nb\nc\nRuntimeError: gloo timeout\n")
    assert rank_errors(tmp_path, lines=2) == (
        "rank 0, 1: OSError: no model\n  File \"x.py\", line 1\nOSError: no model\n"
        "rank 10: RuntimeError: gloo timeout\nc\nRuntimeError: gloo timeout"
    )
    assert rank_errors(tmp_path / "none") == ""
