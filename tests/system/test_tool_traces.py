"""A tool-calling trace end to end, on SQLite with the test-size model: in through POST /v1/traces,
the Langfuse receiver and the OTLP/JSON receiver; regenerated (G completions from a prompt that
renders the tool definitions, the call and its result; the trainer encodes the same ids); graded
by the contract grader and by the tool-call grader; out through ``tracelearn export --format
openai-jsonl`` with the rewards."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update
from typer.testing import CliRunner

from app.cli import cli
from app.db import session_scope
from app.models import GroupStatus, Policy, RolloutGroup, Snapshot, Split, Trace
from app.rollouts.service import grade_groups, regenerate
from app.runs.training import _learner_groups
from app.settings import get_settings
from app.snapshots.evaluation import heldout_items
from tests.support.seeding import build_model
from workers.graders import get_grader
from workers.inference.base import AdapterRef, Completion, SamplingParams
from workers.inference.chat import encode_prompt
from workers.inference.local import LocalBackend
from workers.learner.data import flatten_groups

pytestmark = pytest.mark.timeout(180)

G = 4
TOOL = "lookup_ecog"
TOOLS = [{"type": "function", "function": {
    "name": TOOL, "description": "The patient's ECOG performance status.",
    "parameters": {"type": "object", "properties": {"patient_id": {"type": "integer"}},
                   "required": ["patient_id"]}}}]
CALL = {"id": "call_1", "type": "function",
        "function": {"name": TOOL, "arguments": json.dumps({"patient_id": 7})}}
MESSAGES = [
    {"role": "system", "content": "Answer with the contract: ANSWER: YES or ANSWER: NO."},
    {"role": "user", "content": "Patient 7: 64 years, stage IV. Will PFS exceed 180 days?"},
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call_1", "content": "ECOG 1"},
]
ANSWER = "ANSWER: YES"
# Per grader: the policy's grader spec, the outcome each receiver carries for it, and an answer
# it must reward 1 (the tiny model answers neither shape to a prompt this far from its training).
GRADERS = {
    "contract": ({"kind": "contract", "outcome": "pfs_gt_180d"}, "pfs_gt_180d", True, ANSWER),
    "tool_call": ({"kind": "tool_call", "outcome": "tool_call", "arguments": {"patient_id": 7}},
                  "tool_call", TOOL, json.dumps([CALL])),
}


@pytest.fixture
def db_url(sqlite_url: str) -> str:
    return sqlite_url


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return build_model(get_settings().model_cache)


class RecordingBackend(LocalBackend):
    """The real local sampler, keeping the prompt ids it encoded (what regeneration rendered)."""

    prompt_ids: list[list[int]]

    def generate(self, prompts: list[list[dict[str, str]]], n: int, params: SamplingParams,
                 adapter: AdapterRef | None = None) -> list[list[Completion]]:
        self.prompt_ids = [encode_prompt(self.tokenizer, p) for p in prompts]
        return super().generate(prompts, n, params, adapter)


def post_trace(client: TestClient, headers: dict[str, str], policy: str, outcome: tuple) -> str:
    r = client.post("/v1/traces", headers=headers, json={
        "external_id": "api-1", "policy": policy, "messages": MESSAGES, "tools": TOOLS,
        "response": ANSWER, "finish_reason": "stop",
        "outcome": {"name": outcome[0], "value": outcome[1]}})
    assert r.status_code == 201, r.text
    return "api-1"


def post_langfuse(client: TestClient, key: str, policy: str, outcome: tuple) -> str:
    public = "_".join(key.split("_", 2)[:2])
    auth = base64.b64encode(f"{public}:{key}".encode()).decode()
    at = "2026-12-01T00:00:00Z"
    batch = [
        {"id": "e1", "type": "trace-create", "timestamp": at,
         "body": {"id": "lf-trace", "metadata": {"policy": policy}}},
        # Langfuse's OpenAI integration logs a call with tools as {"messages", "tools"}.
        {"id": "e2", "type": "generation-create", "timestamp": at,
         "body": {"id": "lf-gen", "traceId": "lf-trace", "model": "gpt-4o",
                  "input": {"messages": MESSAGES, "tools": TOOLS}}},
        {"id": "e3", "type": "generation-update", "timestamp": at,
         "body": {"id": "lf-gen", "traceId": "lf-trace",
                  "output": {"role": "assistant", "content": ANSWER}}},
        {"id": "e4", "type": "score-create", "timestamp": at,
         "body": {"traceId": "lf-trace", "observationId": "lf-gen", "name": outcome[0],
                  "value": outcome[1]}},
    ]
    r = client.post("/api/public/ingestion", json={"batch": batch},
                    headers={"Authorization": f"Basic {auth}"})
    assert r.status_code == 207 and not r.json()["errors"], r.text
    return "lf-gen"


def post_otlp(client: TestClient, headers: dict[str, str], policy: str, outcome: tuple) -> str:
    def attr(k: str, v: Any) -> dict[str, Any]:
        return {"key": k, "value": {"doubleValue": v} if isinstance(v, float)
                else {"stringValue": v}}

    def parts(m: dict[str, Any]) -> dict[str, Any]:
        if m["role"] == "tool":
            return {"role": "tool", "parts": [{"type": "tool_call_response",
                                               "id": m["tool_call_id"], "response": m["content"]}]}
        if m.get("tool_calls"):
            return {"role": "assistant", "parts": [
                {"type": "tool_call", "id": c["id"], "name": c["function"]["name"],
                 "arguments": json.loads(c["function"]["arguments"])} for c in m["tool_calls"]]}
        return {"role": m["role"], "parts": [{"type": "text", "content": m["content"]}]}

    score = (attr("gen_ai.evaluation.score.value", 1.0) if outcome[1] is True
             else attr("gen_ai.evaluation.score.label", outcome[1]))
    span = {
        "traceId": "5b8efff798038103d269b633813fc60c", "spanId": "eee19b7ec3c1b174",
        "name": "chat gpt-4o", "kind": 3, "startTimeUnixNano": "1767225600000000000",
        "endTimeUnixNano": "1767225601000000000",
        "attributes": [
            attr("gen_ai.operation.name", "chat"), attr("gen_ai.request.model", "gpt-4o"),
            attr("gen_ai.input.messages", json.dumps([parts(m) for m in MESSAGES])),
            attr("gen_ai.output.messages", json.dumps([{
                "role": "assistant", "finish_reason": "stop",
                "parts": [{"type": "text", "content": ANSWER}]}])),
            # the semantic conventions' flat tool definitions
            attr("gen_ai.tool.definitions", json.dumps([t["function"] | {"type": "function"}
                                                        for t in TOOLS])),
        ],
        "events": [{"timeUnixNano": "1767225601000000000", "name": "gen_ai.evaluation.result",
                    "attributes": [attr("gen_ai.evaluation.name", outcome[0]), score]}],
    }
    body = {"resourceSpans": [{
        "resource": {"attributes": [attr("tracelearn.policy", policy)]},
        "scopeSpans": [{"scope": {"name": "manual"}, "spans": [span]}]}]}
    r = client.post("/otlp/v1/traces", json=body, headers=headers)
    assert r.status_code == 200 and r.json() == {}, r.text
    return "otel-5b8efff798038103d269b633813fc60c-eee19b7ec3c1b174"


@pytest.mark.parametrize("grader", sorted(GRADERS))
def test_a_tool_calling_trace_goes_in_three_ways_is_regenerated_graded_and_exported(
    grader: str, client: TestClient, make_key, tenant: str, model_dir: Path, tmp_path: Path,
) -> None:
    t0 = time.monotonic()
    spec, outcome_name, outcome_value, right_answer = GRADERS[grader]
    key = make_key(tenant, "ingest,read,admin")
    headers = {"Authorization": f"Bearer {key}"}
    policy = f"tools-{grader.replace('_', '-')}"
    r = client.post("/v1/policies", headers=headers, json={
        "name": policy, "base_model": str(model_dir), "grader": spec, "group_size": G,
        "sampling": {"temperature": 1.0, "max_tokens": 48}, "redaction_enabled": False})
    assert r.status_code == 201, r.text

    outcome = (outcome_name, outcome_value)
    external_ids = [post_trace(client, headers, policy, outcome),
                    post_langfuse(client, key, policy, outcome),
                    post_otlp(client, headers, policy, outcome)]
    with session_scope() as s:
        snapshot_id = s.scalars(select(Policy.serving_snapshot_id)
                                .where(Policy.name == policy)).one()
        traces = {t.external_id: t for t in s.scalars(
            select(Trace).where(Trace.external_id.in_(external_ids), Trace.tenant == tenant))}
    assert sorted(traces) == sorted(external_ids)
    for t in traces.values():  # the same conversation and tools, whichever way it came in
        assert t.request["tools"] == TOOLS and t.trainable
        assert t.messages[2]["tool_calls"][0]["function"]["name"] == TOOL
        assert [m["role"] for m in t.messages] == ["system", "user", "assistant", "tool"]

    backend = RecordingBackend(model_dir)
    trace_ids = sorted(t.id for t in traces.values())
    created = regenerate(trace_ids, snapshot_id, backend=backend,
                         enqueue_grading=False).groups_created
    assert len(created) == 3
    for ids in backend.prompt_ids:  # the definitions and the call are in what was sampled from
        text = backend.tokenizer.decode(ids)
        assert text.count(TOOL) == 2 and "patient_id" in text and "ECOG 1" in text
    assert len(set(map(tuple, backend.prompt_ids))) == 1  # three ways in, one prompt

    summary = grade_groups(created)
    assert summary.groups_graded == 3 and summary.rollouts_graded == 3 * G
    with session_scope() as s:
        groups = list(s.scalars(select(RolloutGroup).where(RolloutGroup.id.in_(created))))
        rewards = {g.trace_id: [r.reward for r in sorted(g.rollouts, key=lambda r: r.index)]
                   for g in groups}
        assert all(g.status == GroupStatus.graded and g.grader_version.startswith(grader)
                   for g in groups)
        # The outcome arrived, through every receiver, in the shape the grader reads.
        for t in s.scalars(select(Trace).where(Trace.id.in_(trace_ids))):
            stored = {o.name: o.value for o in t.outcomes}
            assert get_grader(spec).grade(t.messages, right_answer, stored).reward == 1.0
            assert get_grader(spec).grade(t.messages, "no idea", stored).parse_ok is False

    # The trainer encodes the same prompt ids the sampler did (its group query takes train-split
    # traces; the split is drawn per trace at ingest, so all three are put in train here).
    with session_scope() as s:
        s.execute(update(Trace).where(Trace.id.in_(trace_ids)).values(split=Split.train))
    with session_scope() as s:
        policy_row = s.scalars(select(Policy).where(Policy.name == policy)).one()
        snapshot = s.get(Snapshot, snapshot_id)
        assert snapshot is not None
        learner_groups = _learner_groups(s, policy_row, snapshot, None, True)
    records = flatten_groups(learner_groups, backend.tokenizer, "oapl")
    assert len(records) == 3 * G
    assert {tuple(r.prompt_ids) for r in records} == {tuple(backend.prompt_ids[0])}

    out = tmp_path / "export.jsonl"
    result = CliRunner().invoke(cli, ["export", str(out), "--format", "openai-jsonl",
                                      "--tenant", tenant, "--policy", policy])
    assert result.exit_code == 0, result.output
    lines = {json.loads(line)["tracelearn"]["external_id"]: json.loads(line)
             for line in out.read_text().splitlines()}
    assert sorted(lines) == sorted(external_ids)
    for ext, line in lines.items():
        assert line["tools"] == TOOLS
        assert line["messages"][:4] == MESSAGES
        assert line["messages"][4] == {"role": "assistant", "content": ANSWER}
        assert [(o["name"], o["value"]) for o in line["tracelearn"]["outcomes"]] == [outcome]
        (group,) = line["tracelearn"]["groups"]
        assert group["grader_version"].startswith(grader)
        assert [r["reward"] for r in group["rollouts"]] == rewards[traces[ext].id]

    # Held-out evaluation samples from the same rendering as regeneration.
    with session_scope() as s:
        s.execute(update(Trace).where(Trace.id.in_(trace_ids)).values(split=Split.heldout))
    with session_scope() as s:
        policy_row = s.scalars(select(Policy).where(Policy.name == policy)).one()
        items, skipped = heldout_items(s, policy_row, 10)
    assert skipped == 0 and len(items) == 3
    assert {tuple(encode_prompt(backend.tokenizer, it.prompt or [])) for it in items} == {
        tuple(backend.prompt_ids[0])}
    print(f"\n{grader}: rewards per way in "
          f"{ {ext: rewards[traces[ext].id] for ext in external_ids} } "
          f"({time.monotonic() - t0:.1f}s)")
