"""Match graders (exact, regex, JSON field) and the LLM judge against a real HTTP endpoint."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from workers.graders import GraderSpecError, MissingOutcomeError, get_grader
from workers.graders.judge import JudgeError, JudgeGrader
from workers.graders.match import MatchGrader

MSGS = [{"role": "user", "content": "What is the label?"}]


def test_exact_match_compares_stripped_casefolded_text() -> None:
    g = get_grader({"kind": "exact", "outcome": "label"})
    assert g.grade(MSGS, "  Remission \n", {"label": "remission"}).reward == 1.0
    assert g.grade(MSGS, "progression", {"label": "remission"}).reward == 0.0
    assert g.grade(MSGS, "   ", {"label": "remission"}).parse_ok is False


def test_regex_match_extracts_the_first_group_and_understands_booleans() -> None:
    g = get_grader({"kind": "regex", "outcome": "pfs", "pattern": r"ANSWER: (YES|NO)"})
    assert g.grade(MSGS, "reasoning…\nANSWER: YES", {"pfs": True}).reward == 1.0
    assert g.grade(MSGS, "ANSWER: NO", {"pfs": True}).reward == 0.0
    assert g.grade(MSGS, "no contract here", {"pfs": True}).reward == -1.0
    with pytest.raises(MissingOutcomeError):
        g.grade(MSGS, "ANSWER: NO", {})


def test_json_field_match_finds_json_inside_prose_and_compares_numbers() -> None:
    g = MatchGrader(mode="json_field", outcome="dose", field="plan.dose_mg", abs_tol=0.01)
    text = 'Here you go:\n```json\n{"plan": {"dose_mg": 12.004}}\n```'
    assert g.grade(MSGS, text, {"dose": 12}).reward == 1.0
    assert g.grade(MSGS, '{"plan": {"dose_mg": 13}}', {"dose": 12}).reward == 0.0
    assert g.grade(MSGS, '{"plan": {}}', {"dose": 12}).parse_ok is False
    assert g.grade(MSGS, "not json", {"dose": 12}).parse_ok is False


def test_bad_specs_are_refused_and_versions_carry_the_options() -> None:
    with pytest.raises(GraderSpecError):
        get_grader({"kind": "regex", "outcome": "x"})
    with pytest.raises(GraderSpecError):
        get_grader({"kind": "regex", "outcome": "x", "pattern": "("})
    a = get_grader({"kind": "regex", "outcome": "x", "pattern": "a"})
    b = get_grader({"kind": "regex", "outcome": "x", "pattern": "b"})
    assert a.version != b.version


class _Judge(BaseHTTPRequestHandler):
    """An OpenAI-compatible chat endpoint: fails the first `fail_first` calls with 503,
    then scores by the completion's length; a 'hang' completion sleeps past the timeout."""

    calls = 0
    fail_first = 0

    def do_POST(self) -> None:
        type(self).calls += 1
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][0]["content"]
        if type(self).calls <= type(self).fail_first:
            self.send_response(503)
            self.end_headers()
            return
        if "hang" in prompt:
            import time

            time.sleep(2)
        answer = "SCORE: 7" if "good" in prompt else "no idea"
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": answer}}]})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(data.encode())

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def judge_url() -> Iterator[str]:
    _Judge.calls, _Judge.fail_first = 0, 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_judge_scores_retries_and_caches(judge_url: str, tmp_path: Path) -> None:
    _Judge.fail_first = 2
    g = JudgeGrader(url=judge_url, model="j", retries=2, backoff_s=0.01, cache_dir=str(tmp_path))
    r = g.grade(MSGS, "a good answer", None)
    assert r.reward == pytest.approx(0.7) and _Judge.calls == 3
    again = JudgeGrader(url=judge_url, model="j", cache_dir=str(tmp_path))
    assert again.grade(MSGS, "a good answer", None).reward == pytest.approx(0.7)
    assert _Judge.calls == 3  # served from the cache keyed by (version, prompt, completion)
    other_rubric = JudgeGrader(url=judge_url, model="j", rubric="x", cache_dir=str(tmp_path))
    other_rubric.grade(MSGS, "a good answer", None)
    assert _Judge.calls == 4


def test_judge_timeouts_and_missing_scores_raise(judge_url: str, tmp_path: Path) -> None:
    g = JudgeGrader(url=judge_url, model="j", timeout_s=0.3, retries=1, backoff_s=0.01,
                    cache_dir=str(tmp_path))
    with pytest.raises(JudgeError, match="after 2 attempts"):
        g.grade(MSGS, "hang", None)
    with pytest.raises(JudgeError, match="no score"):
        g.grade(MSGS, "a bad answer", None)
