"""Import (OpenAI JSONL, Langfuse events, OTLP/JSON) through the ingest services, and export
(OpenAI JSONL, Parquet) with outcomes and graded rollout groups: idempotent, resumable, and an
export imports back as what was stored."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from fastapi.testclient import TestClient

from app.db import Database
from app.models import GroupStatus, Rollout, RolloutGroup, RolloutStatus, SnapshotStatus
from app.settings import Settings
from app.transfer.service import (
    ExportFormat,
    ImportFormat,
    export_file,
    import_file,
    operator,
)
from tests.support.seeding import add_snapshot

TOOL_CALL = {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}]
PLAIN = {"messages": [{"role": "system", "content": "Answer YES or NO."},
                      {"role": "user", "content": "ECOG 0. PFS > 180 d?"},
                      {"role": "assistant", "content": "ANSWER: YES", "weight": 1}]}
TOOL_USE = {"messages": [{"role": "user", "content": "Weather in Paris?"},
                         {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]},
                         {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
                         {"role": "assistant", "content": "Sunny, 18C."}],
            "tools": TOOLS, "parallel_tool_calls": False}
TOOL_CALL_ANSWER = {"messages": [{"role": "user", "content": "Weather in Rome?"},
                                 {"role": "assistant", "tool_calls": [TOOL_CALL]}],
                    "tools": TOOLS}


def write_jsonl(path: Path, lines: list[Any]) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n"
                            for line in lines))
    return path


def run_import(database: Database, settings: Settings, tenant: str, path: Path,
               fmt: ImportFormat = ImportFormat.openai_jsonl, **kw: Any) -> Any:
    return import_file(database, operator(tenant, "import"), path, fmt, settings, **kw)


def listed(client: TestClient, headers: dict[str, str], policy: str) -> list[dict[str, Any]]:
    return list(client.get("/v1/traces", params={"policy": policy},
                           headers=headers).json()["items"])


def test_openai_jsonl_lines_become_traces_and_a_second_import_adds_nothing(
    database, settings, tenant, policy_name, client, admin_headers, tmp_path
):
    path = write_jsonl(tmp_path / "ft.jsonl", [PLAIN, TOOL_USE, TOOL_CALL_ANSWER, "{not json",
                                               {"messages": [{"role": "user", "content": "?"}]}])
    first = run_import(database, settings, tenant, path, policy=policy_name)
    assert (first.records, first.created, first.rejected) == (4, 3, 2)
    assert first.problems[0].startswith("line 4: not JSON")
    assert "last from the assistant" in first.problems[1]
    again = run_import(database, settings, tenant, path, policy=policy_name)
    assert (again.created, again.already_stored, again.rejected) == (0, 3, 2)

    by_answer = {json.dumps(t["response"]): t for t in listed(client, admin_headers, policy_name)}
    plain = by_answer[json.dumps("ANSWER: YES")]
    assert plain["messages"] == PLAIN["messages"][:2]
    assert plain["metadata"] == {"source": "openai-jsonl", "openai_weights": {"2": 1}}
    tool_use = by_answer[json.dumps("Sunny, 18C.")]
    assert tool_use["messages"] == TOOL_USE["messages"][:3]
    assert tool_use["tools"] == TOOLS and tool_use["parallel_tool_calls"] is False
    assert by_answer[json.dumps({"tool_calls": [TOOL_CALL]})]["trainable"] is True


def test_an_interrupted_import_resumes_where_it_stopped(
    database, settings, tenant, policy_name, tmp_path
):
    lines = [{"messages": [{"role": "user", "content": f"q{i}"},
                           {"role": "assistant", "content": f"a{i}"}]} for i in range(5)]
    run_import(database, settings, tenant, write_jsonl(tmp_path / "part.jsonl", lines[:2]),
               policy=policy_name)
    seen: list[tuple[int, int]] = []
    rest = run_import(database, settings, tenant, write_jsonl(tmp_path / "all.jsonl", lines),
                      policy=policy_name, batch_size=2,
                      progress=lambda done, total: seen.append((done, total)))
    assert (rest.created, rest.already_stored) == (3, 2)
    assert seen == [(2, 5), (4, 5), (5, 5)]  # three committed batches


def graded_group(database: Database, policy: str, trace_id: int) -> None:
    snapshot = add_snapshot(database, policy, None, status=SnapshotStatus.serving)
    with database.session() as s:
        s.add(RolloutGroup(
            trace_id=trace_id, snapshot_id=snapshot, group_size=2, status=GroupStatus.graded,
            sampling_params={"temperature": 1.0}, grader_version="contract-1",
            reward_mean=0.5, reward_std=0.5,
            rollouts=[Rollout(index=i, text=text, token_ids=[1], token_logprobs=[-0.5],
                              behaviour_logprob_sum=-0.5, status=RolloutStatus.graded,
                              reward=reward, parse_ok=True, grader_version="contract-1")
                      for i, (text, reward) in enumerate([("ANSWER: YES", 1.0),
                                                          ("ANSWER: NO", 0.0)])]))


def post_trace(client: TestClient, headers: dict[str, str], policy: str) -> dict[str, Any]:
    body = {"external_id": "tool-1", "policy": policy, "messages": TOOL_USE["messages"][:1],
            "tools": TOOLS, "response": {"role": "assistant", "tool_calls": [TOOL_CALL]},
            "finish_reason": "tool_calls", "metadata": {"team": "a"},
            "outcome": {"name": "correct", "value": True}}
    r = client.post("/v1/traces", json=body, headers=headers)
    assert r.status_code in (200, 201, 207), r.text
    got = client.get("/v1/traces", params={"external_id": "tool-1"}, headers=headers).json()
    return dict(got["items"][0])


def test_the_export_carries_outcomes_and_graded_groups_and_imports_back_as_duplicates(
    database, settings, tenant, policy_name, client, admin_headers, make_key, tmp_path
):
    trace = post_trace(client, admin_headers, policy_name)
    graded_group(database, policy_name, trace["id"])
    out = tmp_path / "export.jsonl"
    assert export_file(database, tenant, out, ExportFormat.openai_jsonl) == 1
    [line] = [json.loads(x) for x in out.read_text().splitlines()]
    assert line["messages"] == [*TOOL_USE["messages"][:1],
                                {"role": "assistant", "tool_calls": [TOOL_CALL]}]
    assert line["tools"] == TOOLS
    ours = line["tracelearn"]
    assert ours["external_id"] == "tool-1" and ours["finish_reason"] == "tool_calls"
    assert [(o["name"], o["value"]) for o in ours["outcomes"]] == [("correct", True)]
    [group] = ours["groups"]
    assert group["reference_snapshot"].startswith(policy_name)
    assert [(r["text"], r["reward"]) for r in group["rollouts"]] == [("ANSWER: YES", 1.0),
                                                                    ("ANSWER: NO", 0.0)]

    back = run_import(database, settings, tenant, out)
    assert (back.created, back.already_stored, back.rejected) == (0, 1, 0)

    other, other_policy = f"{tenant}-copy", f"{policy_name}-copy"
    other_headers = {"Authorization": f"Bearer {make_key(other)}"}
    assert client.post("/v1/policies", json={"name": other_policy},
                       headers=other_headers).status_code == 201
    copy = run_import(database, settings, other, out, policy=other_policy)
    assert (copy.created, copy.rejected) == (1, 0)
    [copied] = listed(client, other_headers, other_policy)
    for key in ("external_id", "messages", "tools", "response", "finish_reason", "metadata"):
        assert copied[key] == trace[key], key
    assert [(o["name"], o["value"]) for o in copied["outcomes"]] == [("correct", True)]


def test_bare_export_keeps_only_the_chat_keys(database, tenant, policy_name, client,
                                              admin_headers, tmp_path):
    post_trace(client, admin_headers, policy_name)
    out = tmp_path / "bare.jsonl"
    export_file(database, tenant, out, ExportFormat.openai_jsonl, bare=True)
    assert set(json.loads(out.read_text())) == {"messages", "tools"}


def test_parquet_export_has_a_row_per_trace_with_its_rewards(
    database, tenant, policy_name, client, admin_headers, tmp_path
):
    trace = post_trace(client, admin_headers, policy_name)
    graded_group(database, policy_name, trace["id"])
    out = tmp_path / "traces.parquet"
    assert export_file(database, tenant, out, ExportFormat.parquet) == 1
    [row] = pq.read_table(out).to_pylist()
    assert row["external_id"] == "tool-1" and row["policy"] == policy_name
    assert row["rewards"] == [1.0, 0.0]
    assert json.loads(row["outcomes"])[0]["value"] is True
    assert json.loads(row["messages"])[-1] == {"role": "assistant", "tool_calls": [TOOL_CALL]}
    assert not list(tmp_path.glob(".*partial"))


def test_an_otlp_json_file_imports_through_the_otlp_receiver(
    database, settings, tenant, policy_name, client, admin_headers, tmp_path
):
    def attr(key: str, value: str) -> dict[str, Any]:
        return {"key": key, "value": {"stringValue": value}}
    request = {"resourceSpans": [{
        "resource": {"attributes": [attr("tracelearn.policy", policy_name)]},
        "scopeSpans": [{"spans": [
            {"traceId": "0af7651916cd43dd8448eb211c80319c", "spanId": "b7ad6b7169203331",
             "name": "chat", "attributes": [
                 attr("gen_ai.operation.name", "chat"),
                 attr("gen_ai.input.messages", json.dumps(
                     [{"role": "user", "parts": [{"type": "text", "content": "Hi"}]}])),
                 attr("gen_ai.output.messages", json.dumps(
                     [{"role": "assistant", "parts": [{"type": "text", "content": "Hello"}]}]))]},
            {"traceId": "0af7651916cd43dd8448eb211c80319c", "spanId": "b7ad6b7169203332",
             "name": "GET /", "attributes": [attr("http.method", "GET")]},
        ]}]}]}
    path = write_jsonl(tmp_path / "collector.jsonl", [request])
    report = run_import(database, settings, tenant, path, ImportFormat.otlp_json)
    assert (report.created, report.skipped, report.rejected) == (1, 1, 0)
    again = run_import(database, settings, tenant, path, ImportFormat.otlp_json)
    assert again.rejected == 0
    [trace] = listed(client, admin_headers, policy_name)
    assert trace["external_id"] == "otel-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331"
    assert trace["response"] == "Hello"


def test_a_langfuse_event_file_imports_through_the_langfuse_receiver(
    database, settings, tenant, policy_name, client, admin_headers, tmp_path
):
    events = [
        {"id": "e1", "type": "trace-create", "body": {"id": "t1",
                                                      "metadata": {"policy": policy_name}}},
        {"id": "e2", "type": "generation-create", "body": {
            "id": "g1", "traceId": "t1", "model": "gpt-4o",
            "input": [{"role": "user", "content": "Hi"}]}},
        {"id": "e3", "type": "generation-update", "body": {"id": "g1", "output": "Hello"}},
        {"id": "e4", "type": "score-create", "body": {"traceId": "t1", "name": "ok",
                                                      "value": 1}},
    ]
    report = run_import(database, settings, tenant, write_jsonl(tmp_path / "lf.jsonl", events),
                        ImportFormat.langfuse)
    assert (report.created, report.rejected) == (4, 0)
    [trace] = listed(client, admin_headers, policy_name)
    assert trace["external_id"] == "g1" and trace["response"] == "Hello"
    assert [(o["name"], o["value"]) for o in trace["outcomes"]] == [("ok", 1)]


def test_a_collector_logs_line_fills_in_the_span_it_belongs_to(
    database, settings, tenant, policy_name, client, admin_headers, tmp_path
):
    def attr(key: str, value: str) -> dict[str, Any]:
        return {"key": key, "value": {"stringValue": value}}
    ids = {"traceId": "1af7651916cd43dd8448eb211c80319c", "spanId": "c7ad6b7169203331"}
    span_line = {"resourceSpans": [{"scopeSpans": [{"spans": [ids | {
        "name": "chat", "attributes": [attr("gen_ai.operation.name", "chat"),
                                       attr("tracelearn.policy", policy_name)]}]}]}]}
    logs_line = {"resourceLogs": [{"scopeLogs": [{"logRecords": [
        ids | {"eventName": "gen_ai.user.message",
               "body": {"kvlistValue": {"values": [attr("content", "Hi")]}}},
        ids | {"eventName": "gen_ai.choice", "body": {"kvlistValue": {"values": [
            attr("finish_reason", "stop"),
            {"key": "message", "value": {"kvlistValue": {"values": [
                attr("role", "assistant"), attr("content", "Hello")]}}}]}}},
    ]}]}]}
    path = write_jsonl(tmp_path / "collector.jsonl", [span_line, logs_line])
    report = run_import(database, settings, tenant, path, ImportFormat.otlp_json)
    assert (report.created, report.rejected) == (3, 0)  # the span and its two events
    [trace] = listed(client, admin_headers, policy_name)
    assert trace["messages"] == [{"role": "user", "content": "Hi"}]
    assert trace["response"] == "Hello" and trace["trainable"] is True
