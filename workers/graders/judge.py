"""LLM judge: any OpenAI-compatible chat endpoint scores a completion.

Spec::

    {"kind": "judge", "url": "http://judge:8000", "model": "judge-model",
     "rubric": "Is the answer medically sound and does it follow the format?",
     "outcome": "label",             # optional: shown to the judge as the reference answer
     "api_key_env": "JUDGE_API_KEY", # the key is read from this environment variable, never stored
     "timeout_s": 20, "retries": 2, "min_score": 0, "max_score": 10}

The judge must answer with ``SCORE: <number>`` (or JSON ``{"score": <number>}``); the reward is
the score mapped linearly onto [0, 1]. An answer without a score is a grading failure (raised),
not a zero: the rollout is marked failed with the reason.

Answers are cached on disk under ``<data_dir>/judge_cache`` keyed by (grader version, prompt
hash, completion hash): re-grading, retries after a crash and identical completions (common in
groups) cost no call. The version covers url, model, rubric, template and score range.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx

from workers.graders.base import GradeResult, GraderSpecError, outcome_value, register_grader

JUDGE_VERSION = "judge-1.0"
DEFAULT_TEMPLATE = (
    "You are grading an AI assistant's answer.\n\nRubric: {rubric}\n\n"
    "Conversation:\n{conversation}\n\n{reference}"
    "Answer to grade:\n{completion}\n\n"
    "Reply with one line: SCORE: <a number from {min_score} to {max_score}>."
)
_SCORE = re.compile(r"SCORE:\s*(-?\d+(?:\.\d+)?)", re.IGNORECASE)


class JudgeError(RuntimeError):
    """The judge endpoint failed after all retries, or answered without a score."""


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class JudgeGrader:
    def __init__(
        self,
        url: str,
        model: str,
        rubric: str = "Is the answer correct, complete and in the requested format?",
        template: str = DEFAULT_TEMPLATE,
        outcome: str | None = None,
        api_key_env: str | None = None,
        timeout_s: float = 20.0,
        retries: int = 2,
        backoff_s: float = 0.5,
        min_score: float = 0.0,
        max_score: float = 10.0,
        temperature: float = 0.0,
        cache_dir: str | None = None,
    ) -> None:
        if max_score <= min_score:
            raise GraderSpecError("max_score must be greater than min_score")
        if timeout_s <= 0 or retries < 0:
            raise GraderSpecError("timeout_s must be > 0 and retries >= 0")
        self.url = url.rstrip("/")
        self.model, self.rubric, self.template, self.outcome = model, rubric, template, outcome
        self.api_key_env = api_key_env
        self.timeout_s, self.retries, self.backoff_s = float(timeout_s), int(retries), backoff_s
        self.min_score, self.max_score = float(min_score), float(max_score)
        self.temperature = float(temperature)
        fingerprint = json.dumps(
            [self.url, model, rubric, template, outcome, self.min_score, self.max_score,
             self.temperature],
        )
        self.version = f"{JUDGE_VERSION};model={model};cfg={_sha(fingerprint)[:12]}"
        if cache_dir is None:
            # The service passes its data directory; a bare engine caches under the temp dir.
            cache_dir = str(Path(tempfile.gettempdir()) / "tracelearn-judge-cache")
        self.cache_dir = Path(cache_dir) / _sha(self.version)[:16]

    # --- prompt --------------------------------------------------------------------------------

    def prompt(
        self, messages: list[dict[str, str]], completion: str, outcome: Mapping[str, Any] | None
    ) -> str:
        conversation = "\n".join(f"[{m.get('role', '?')}] {m.get('content', '')}" for m in messages)
        reference = ""
        if self.outcome is not None:
            truth = outcome_value(outcome, self.outcome)
            if truth is not None:
                reference = f"Reference answer: {json.dumps(truth)}\n\n"
        return self.template.format(
            rubric=self.rubric, conversation=conversation, reference=reference,
            completion=completion, min_score=f"{self.min_score:g}", max_score=f"{self.max_score:g}",
        )

    # --- cache ---------------------------------------------------------------------------------

    def _cache_path(self, prompt_hash: str, completion_hash: str) -> Path:
        return self.cache_dir / prompt_hash[:2] / f"{prompt_hash}-{completion_hash}.json"

    def _cache_get(self, path: Path) -> dict[str, Any] | None:
        try:
            data: dict[str, Any] = json.loads(path.read_text())
            return data
        except (OSError, ValueError):
            return None

    def _cache_put(self, path: Path, data: dict[str, Any]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write-then-rename: concurrent graders never read a half-written entry.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        os.replace(tmp, path)

    # --- the call ------------------------------------------------------------------------------

    def _ask(self, prompt: str) -> str:
        headers = {}
        if self.api_key_env:
            key = os.environ.get(self.api_key_env)
            if key:
                headers["Authorization"] = f"Bearer {key}"
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": self.temperature,
            "max_tokens": 64,
        }
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                r = httpx.post(f"{self.url}/v1/chat/completions", json=body, headers=headers,
                               timeout=self.timeout_s)
            except httpx.HTTPError as exc:  # timeouts and connection errors: retry
                last = exc
                continue
            if r.status_code == 429 or r.status_code >= 500:
                last = JudgeError(f"judge answered {r.status_code}")
                continue
            if r.status_code >= 400:
                raise JudgeError(f"judge refused the request: {r.status_code} {r.text[:200]}")
            try:
                return str(r.json()["choices"][0]["message"]["content"] or "")
            except (ValueError, KeyError, IndexError, TypeError) as exc:
                raise JudgeError(f"judge answer is not a chat completion: {exc}") from exc
        raise JudgeError(f"judge failed after {self.retries + 1} attempts: {last}")

    def parse_score(self, text: str) -> float:
        m = _SCORE.search(text)
        if m is not None:
            return float(m.group(1))
        try:
            return float(json.loads(text)["score"])
        except (ValueError, KeyError, TypeError) as exc:
            raise JudgeError(f"judge answer has no score: {text[:200]!r}") from exc

    def grade(
        self,
        prompt_messages: list[dict[str, str]],
        completion_text: str,
        outcome: Mapping[str, Any] | None,
    ) -> GradeResult:
        prompt = self.prompt(prompt_messages, completion_text, outcome)
        # The key's prompt part is the judge prompt without the completion (trace + reference).
        prompt_hash = _sha(self.prompt(prompt_messages, "", outcome))
        path = self._cache_path(prompt_hash, _sha(completion_text))
        cached = self._cache_get(path)
        if cached is None:
            answer = self._ask(prompt)
            score = self.parse_score(answer)
            cached = {"score": score, "answer": answer[:2000]}
            self._cache_put(path, cached)
        score = min(self.max_score, max(self.min_score, float(cached["score"])))
        reward = (score - self.min_score) / (self.max_score - self.min_score)
        return GradeResult(reward, True, f"judge score {score:g}")


register_grader("judge", JudgeGrader)
