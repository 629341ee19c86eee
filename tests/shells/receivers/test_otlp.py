"""The OTLP receiver with the real OpenTelemetry SDK and its OTLP/HTTP exporter, against a real
`tracelearn api` process: GenAI spans become traces, evaluation events outcomes, everything else
is acknowledged; the answer is an ExportTraceServiceResponse in the request's encoding."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from google.protobuf import json_format
from google.rpc.status_pb2 import Status as RpcStatus
from opentelemetry._logs import LogRecord
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import BatchLogRecordProcessor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Status, StatusCode

from app.settings import get_settings
from tests.conftest import REPO, api_process
from tests.support.live_api import stored_trace as stored
from tests.support.seeding import build_model

pytestmark = pytest.mark.timeout(300)

SYSTEM = [{"type": "text", "content": "Use the weather tool."}]
INPUT = [{"role": "user", "parts": [{"type": "text", "content": "Weather in Paris?"}]}]
OUTPUT = [{"role": "assistant", "finish_reason": "tool_call", "parts": [
    {"type": "tool_call", "id": "call_1", "name": "get_weather", "arguments": {"city": "Paris"}}]}]
TOOLS = [{"type": "function", "name": "get_weather",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]


@pytest.fixture
def db_url(pg_url: str) -> str:
    return pg_url


@pytest.fixture(scope="module")
def api_url(pg_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp_path = tmp_path_factory.mktemp("otlp-api")
    env = {"TRACELEARN_DATABASE_URL": pg_url, "TRACELEARN_DATA_DIR": str(tmp_path / "data"),
           "TRACELEARN_BASE_MODEL_DIR": str(build_model(get_settings().model_cache)),
           "TRACELEARN_LOG_LEVEL": "WARNING", "TRACELEARN_RATE_LIMIT_PER_MINUTE": "0"}
    with api_process(env, tmp_path / "api.log") as url:
        yield url


@pytest.fixture
def policy(http: httpx.Client) -> str:
    name = f"p-{uuid.uuid4().hex[:10]}"
    assert http.post("/v1/policies", json={"name": name, "redaction_enabled": False}
                     ).status_code == 201
    return name


def external_id(span: ReadableSpan) -> str:
    ctx = span.get_span_context()
    assert ctx is not None
    return f"otel-{ctx.trace_id:032x}-{ctx.span_id:016x}"


def record(build: Callable[[TracerProvider], None], policy: str | None) -> list[ReadableSpan]:
    """Spans made by the SDK as an application makes them (kept in memory to export them)."""
    memory = InMemorySpanExporter()
    attrs = {"service.name": "weather-agent"} | ({"tracelearn.policy": policy} if policy else {})
    provider = TracerProvider(resource=Resource.create(attrs))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    build(provider)
    provider.shutdown()
    return list(memory.get_finished_spans())


def tool_calling_chat(provider: TracerProvider) -> None:
    tracer = provider.get_tracer("app")
    with tracer.start_as_current_span("invoke_agent weather"), \
            tracer.start_as_current_span("chat gpt-4o-mini") as span:
        span.set_attributes({
            "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai",
            "gen_ai.request.model": "gpt-4o-mini", "gen_ai.response.model": "gpt-4o-mini-2024",
            "gen_ai.request.temperature": 0.2, "gen_ai.request.max_tokens": 64,
            "gen_ai.response.finish_reasons": ["tool_call"],
            "gen_ai.usage.input_tokens": 20, "gen_ai.usage.output_tokens": 5,
            "gen_ai.system_instructions": json.dumps(SYSTEM),
            "gen_ai.input.messages": json.dumps(INPUT),
            "gen_ai.output.messages": json.dumps(OUTPUT),
            "gen_ai.tool.definitions": json.dumps(TOOLS),
        })
        span.add_event("gen_ai.evaluation.result", {"gen_ai.evaluation.name": "correct",
                                                    "gen_ai.evaluation.score.value": 1.0})


def test_the_sdk_exporter_sends_a_tool_calling_chat_span_that_becomes_a_trace(
    api_url, key, http, policy
):
    spans = record(tool_calling_chat, policy)
    exporter = OTLPSpanExporter(endpoint=f"{api_url}/otlp/v1/traces",
                                headers={"Authorization": f"Bearer {key}"})
    assert exporter.export(spans) is SpanExportResult.SUCCESS
    chat = next(s for s in spans if s.name.startswith("chat"))

    got = stored(http, external_id(chat))
    assert got is not None
    assert got["policy"] == policy and got["model"] == "gpt-4o-mini-2024"
    assert got["messages"] == [{"role": "system", "content": "Use the weather tool."},
                               {"role": "user", "content": "Weather in Paris?"}]
    assert got["response"] == {"tool_calls": [{
        "id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]}
    assert got["finish_reason"] == "tool_calls"
    assert got["tools"] == [{"type": "function", "function": {
        "name": "get_weather", "parameters": TOOLS[0]["parameters"]}}]
    assert got["sampling_params"] == {"temperature": 0.2, "max_tokens": 64}
    assert got["usage"] == {"prompt_tokens": 20, "completion_tokens": 5, "total_tokens": 25}
    assert got["trainable"] is True
    assert got["metadata"]["service_name"] == "weather-agent"
    assert [(o["name"], o["value"], o["origin"]) for o in got["outcomes"]] == [
        ("correct", 1.0, "feedback")]
    # The agent span is not a model call: acknowledged, not stored.
    agent = next(s for s in spans if s.name.startswith("invoke_agent"))
    assert stored(http, external_id(agent)) is None


def test_a_re_export_is_idempotent_gzip_or_not(api_url, key, http, policy):
    spans = record(tool_calling_chat, policy)
    exporter = OTLPSpanExporter(endpoint=f"{api_url}/otlp/v1/traces",
                                headers={"Authorization": f"Bearer {key}"})
    gzipped = OTLPSpanExporter(endpoint=f"{api_url}/otlp/v1/traces",
                               headers={"Authorization": f"Bearer {key}"},
                               compression=Compression.Gzip)
    assert exporter.export(spans) is SpanExportResult.SUCCESS
    assert gzipped.export(spans) is SpanExportResult.SUCCESS
    listed = http.get("/v1/traces", params={"policy": policy}).json()["items"]
    assert len(listed) == 1


def old_shapes(provider: TracerProvider) -> None:
    tracer = provider.get_tracer("app")
    with tracer.start_as_current_span("openai.chat") as span:  # OpenLLMetry's flat attributes
        span.set_attributes({
            "gen_ai.system": "openai", "gen_ai.request.model": "gpt-4o",
            "gen_ai.prompt.0.role": "user", "gen_ai.prompt.0.content": "Weather in Paris?",
            "gen_ai.prompt.1.role": "assistant",
            "gen_ai.prompt.1.tool_calls.0.id": "call_1",
            "gen_ai.prompt.1.tool_calls.0.name": "get_weather",
            "gen_ai.prompt.1.tool_calls.0.arguments": "{\"city\": \"Paris\"}",
            "gen_ai.prompt.2.role": "tool", "gen_ai.prompt.2.tool_call_id": "call_1",
            "gen_ai.prompt.2.content": "18C, sunny",
            "gen_ai.completion.0.role": "assistant", "gen_ai.completion.0.content": "Sunny, 18C.",
            "gen_ai.completion.0.finish_reason": "stop",
        })
    with tracer.start_as_current_span("chat gpt-4o") as span:  # events on the span
        span.set_attributes({"gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o"})
        span.add_event("gen_ai.system.message", {"content": "Be brief."})
        span.add_event("gen_ai.user.message", {"content": "Weather in Paris?"})
        span.add_event("gen_ai.choice", {"index": 0, "finish_reason": "stop",
                                         "message": json.dumps({"content": "Sunny."})})
    with tracer.start_as_current_span("chat gpt-4o") as span:  # content capture off
        span.set_attributes({"gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o",
                             "gen_ai.usage.input_tokens": 7, "gen_ai.usage.output_tokens": 2})
    with tracer.start_as_current_span("chat gpt-4o") as span:  # a failed call
        span.set_attributes({"gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o"})
        span.set_status(Status(StatusCode.ERROR, "timeout"))


def test_old_attribute_shapes_events_and_uncaptured_content_at_langfuses_endpoint(
    api_url, key, http, policy
):
    spans = record(old_shapes, policy)
    public = "_".join(key.split("_", 2)[:2])  # Langfuse's key pair: tl_<prefix> : the key
    basic = base64.b64encode(f"{public}:{key}".encode()).decode()
    exporter = OTLPSpanExporter(endpoint=f"{api_url}/api/public/otel/v1/traces",
                                headers={"Authorization": f"Basic {basic}"})
    assert exporter.export(spans) is SpanExportResult.SUCCESS
    flat, events, uncaptured, failed = (stored(http, external_id(s)) for s in spans)

    assert flat is not None and flat["messages"] == [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "content": "18C, sunny", "tool_call_id": "call_1"}]
    assert flat["response"] == "Sunny, 18C." and flat["finish_reason"] == "stop"
    assert events is not None and events["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"}]
    assert events["response"] == "Sunny." and events["trainable"] is True
    assert uncaptured is not None and uncaptured["trainable"] is False
    assert uncaptured["untrainable_reason"] == "content_not_captured"
    assert uncaptured["usage"] == {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}
    assert failed is not None and failed["untrainable_reason"] == "model_error"


def langfuse_generation(policy: str) -> Callable[[TracerProvider], None]:
    """What the Langfuse v3+ SDKs export: their own attributes, no gen_ai.* ones; the policy in
    the generation's metadata, as Langfuse users set it."""
    def build(provider: TracerProvider) -> None:
        tracer = provider.get_tracer("langfuse-sdk")
        with tracer.start_as_current_span("weather") as trace_span:
            trace_span.set_attribute("langfuse.observation.type", "span")
            with tracer.start_as_current_span("chat") as span:
                span.set_attributes({
                    "langfuse.observation.type": "generation",
                    "langfuse.observation.metadata.policy": policy,
                    "langfuse.observation.model.name": "gpt-4o-mini",
                    "langfuse.observation.model.parameters": json.dumps({"temperature": 0.3}),
                    "langfuse.observation.input": json.dumps(
                        [{"role": "user", "content": "Weather in Paris?"}]),
                    "langfuse.observation.output": json.dumps(
                        {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]}),
                    "langfuse.observation.usage_details": json.dumps({"input": 12, "output": 4}),
                })
    return build


TOOL_CALL = {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}


def test_a_langfuse_sdk_generation_span_becomes_a_trace(api_url, key, http, policy):
    spans = record(langfuse_generation(policy), policy=None)
    public = "_".join(key.split("_", 2)[:2])
    basic = base64.b64encode(f"{public}:{key}".encode()).decode()
    exporter = OTLPSpanExporter(endpoint=f"{api_url}/api/public/otel/v1/traces",
                                headers={"Authorization": f"Basic {basic}"})
    assert exporter.export(spans) is SpanExportResult.SUCCESS
    generation, outer = spans  # children end first
    got = stored(http, external_id(generation))
    assert got is not None and got["policy"] == policy and got["model"] == "gpt-4o-mini"
    assert got["messages"] == [{"role": "user", "content": "Weather in Paris?"}]
    assert got["response"] == {"role": "assistant", "tool_calls": [TOOL_CALL]}
    assert got["sampling_params"] == {"temperature": 0.3}
    assert got["usage"] == {"prompt_tokens": 12, "completion_tokens": 4, "total_tokens": 16}
    assert got["trainable"] is True
    assert stored(http, external_id(outer)) is None


def post_protobuf(api_url: str, key: str, spans: list[ReadableSpan]) -> httpx.Response:
    return httpx.post(f"{api_url}/otlp/v1/traces",
                      content=encode_spans(spans).SerializeToString(),
                      headers={"Authorization": f"Bearer {key}",
                               "Content-Type": "application/x-protobuf"})


def test_a_span_without_a_policy_is_rejected_alone_in_partial_success(api_url, key, http):
    spans = record(tool_calling_chat, policy=None)  # model gpt-4o-mini names no policy
    r = post_protobuf(api_url, key, spans)
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-protobuf"
    answer = ExportTraceServiceResponse.FromString(r.content)
    assert answer.partial_success.rejected_spans == 1
    assert "tracelearn.policy" in answer.partial_success.error_message


def test_the_policy_can_be_the_model_name(api_url, key, http):
    name = "gpt-4o-mini-2024"  # the response model of the span
    tenant_policy = http.post("/v1/policies", json={"name": name, "redaction_enabled": False})
    assert tenant_policy.status_code == 201
    spans = record(tool_calling_chat, policy=None)
    answer = ExportTraceServiceResponse.FromString(post_protobuf(api_url, key, spans).content)
    assert answer.partial_success.rejected_spans == 0
    chat = next(s for s in spans if s.name.startswith("chat"))
    got = stored(http, external_id(chat))
    assert got is not None and got["policy"] == name


def rpc_status(answer: httpx.Response) -> RpcStatus:
    """The google.rpc.Status OTLP/HTTP puts in a 4xx/5xx body, decoded by its content type."""
    if answer.headers["content-type"].startswith("application/json"):
        return json_format.Parse(answer.text, RpcStatus())
    assert answer.headers["content-type"] == "application/x-protobuf"
    return RpcStatus.FromString(answer.content)


def test_auth_needs_an_ingest_key(api_url, make_key, tenant):
    spans = record(tool_calling_chat, policy="x")
    unknown = post_protobuf(api_url, "tl_nope_nope", spans)
    assert unknown.status_code == 401
    assert rpc_status(unknown).code == 16 and "Authorization" in rpc_status(unknown).message
    read_only = post_protobuf(api_url, make_key(tenant, "read"), spans)
    assert read_only.status_code == 403
    assert rpc_status(read_only).code == 7 and "ingest" in rpc_status(read_only).message


def test_an_undecodable_body_is_a_400_and_an_unknown_encoding_a_415(api_url, key):
    """Refusals answer OTLP/HTTP's google.rpc.Status in the request's encoding, not
    problem+json."""
    auth = {"Authorization": f"Bearer {key}"}
    bad = httpx.post(f"{api_url}/otlp/v1/traces", content=b"\xff\xff\xff",
                     headers=auth | {"Content-Type": "application/x-protobuf"})
    assert bad.status_code == 400
    assert rpc_status(bad).code == 3
    assert "not an ExportTraceServiceRequest" in rpc_status(bad).message
    bad_json = httpx.post(f"{api_url}/api/public/otel/v1/logs", content=b"{nope",
                          headers=auth | {"Content-Type": "application/json"})
    assert bad_json.status_code == 400
    assert rpc_status(bad_json).message == "the body is not JSON"
    not_gzip = httpx.post(f"{api_url}/otlp/v1/traces", content=b"plain",
                          headers=auth | {"Content-Type": "application/json",
                                          "Content-Encoding": "gzip"})
    assert not_gzip.status_code == 400 and rpc_status(not_gzip).message == "the body is not valid gzip"
    odd = httpx.post(f"{api_url}/otlp/v1/traces", content=b"x",
                     headers=auth | {"Content-Type": "text/plain"})
    assert odd.status_code == 415
    assert rpc_status(odd).code == 3 and "text/plain" in rpc_status(odd).message


def json_request(policy: str, span_id: str, name: str = "chat gpt-4o") -> dict[str, Any]:
    """An OTLP/JSON body as the spec spells it: hex ids, typed attribute values."""
    def attr(key: str, value: Any) -> dict[str, Any]:
        typed = {"intValue": str(value)} if isinstance(value, int) else {"stringValue": value}
        return {"key": key, "value": typed}
    return {"resourceSpans": [{
        "resource": {"attributes": [attr("tracelearn.policy", policy)]},
        "scopeSpans": [{"scope": {"name": "manual"}, "spans": [{
            "traceId": "5b8efff798038103d269b633813fc60c", "spanId": span_id, "name": name,
            "kind": 3, "startTimeUnixNano": "1767225600000000000",
            "endTimeUnixNano": "1767225601000000000",
            "attributes": [attr("gen_ai.operation.name", "chat"),
                           attr("gen_ai.request.model", "gpt-4o"),
                           attr("gen_ai.input.messages", json.dumps(INPUT)),
                           attr("gen_ai.output.messages", json.dumps([{
                               "role": "assistant", "finish_reason": "stop",
                               "parts": [{"type": "text", "content": "Sunny."}]}])),
                           attr("gen_ai.usage.input_tokens", 9),
                           attr("gen_ai.usage.output_tokens", 2)],
            "events": [{"timeUnixNano": "1767225601000000000", "name": "gen_ai.evaluation.result",
                        "attributes": [attr("gen_ai.evaluation.name", "helpful"),
                                       attr("gen_ai.evaluation.score.label", "yes")]}],
        }]}],
    }]}


def test_a_json_encoded_request_is_stored_and_answered_in_json(api_url, key, http, policy):
    body = json_request(policy, "eee19b7ec3c1b174")
    r = http.post("/otlp/v1/traces", json=body)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert r.json() == {}  # no partial_success: everything was stored
    got = stored(http, "otel-5b8efff798038103d269b633813fc60c-eee19b7ec3c1b174")
    assert got is not None
    assert got["messages"] == [{"role": "user", "content": "Weather in Paris?"}]
    assert got["response"] == "Sunny." and got["finish_reason"] == "stop"
    assert got["occurred_at"].startswith("2026-01-01T00:00:00")
    assert [(o["name"], o["value"]) for o in got["outcomes"]] == [("helpful", "yes")]


def test_a_hostile_string_or_a_bad_id_rejects_only_its_span(api_url, key, http, policy):
    body = json_request(policy, "aaaaaaaaaaaaaaa1")
    good = json_request(policy, "aaaaaaaaaaaaaaa2")["resourceSpans"][0]["scopeSpans"][0]["spans"]
    body["resourceSpans"][0]["scopeSpans"][0]["spans"][0]["name"] = "chat \ud800"
    bad_id = json_request(policy, "not-hex")["resourceSpans"][0]["scopeSpans"][0]["spans"]
    body["resourceSpans"][0]["scopeSpans"][0]["spans"].extend(good + bad_id)
    payload = json.dumps(body).encode()  # ensure_ascii: the lone surrogate travels as \ud800
    r = http.post("/otlp/v1/traces", content=payload,
                  headers={"Content-Type": "application/json"})
    assert r.status_code == 200, r.text
    answer = json_format.Parse(r.text, ExportTraceServiceResponse())
    assert answer.partial_success.rejected_spans == 2
    assert "lone surrogate" in answer.partial_success.error_message
    assert "ids are hex" in answer.partial_success.error_message
    assert stored(http, "otel-5b8efff798038103d269b633813fc60c-aaaaaaaaaaaaaaa2") is not None


def with_attribute(body: dict[str, Any], key: str, value: str) -> dict[str, Any]:
    [span] = body["resourceSpans"][0]["scopeSpans"][0]["spans"]
    span["attributes"] = [a for a in span["attributes"] if a["key"] != key] + [
        {"key": key, "value": {"stringValue": value}}]
    return body


def test_a_models_answer_keeps_its_control_characters_a_prompt_does_not(
    api_url, key, http, policy
):
    """A sampled answer may hold any character (the bundled model once answered a lone
    backspace); the prompt a client sent gets the full check, and NUL is refused everywhere."""
    def output(text: str) -> str:
        return json.dumps([{"role": "assistant", "finish_reason": "stop",
                            "parts": [{"type": "text", "content": text}]}])
    answered = with_attribute(json_request(policy, "cccccccccccccc01"),
                              "gen_ai.output.messages", output("\b"))
    prompted = with_attribute(json_request(policy, "cccccccccccccc02"), "gen_ai.input.messages",
                              json.dumps([{"role": "user", "parts": [
                                  {"type": "text", "content": "Weather\x1b in Paris?"}]}]))
    nul = with_attribute(json_request(policy, "cccccccccccccc03"),
                         "gen_ai.output.messages", output("Sunny\x00"))
    spans = [b["resourceSpans"][0]["scopeSpans"][0]["spans"][0]
             for b in (prompted, nul)]
    answered["resourceSpans"][0]["scopeSpans"][0]["spans"].extend(spans)
    r = http.post("/otlp/v1/traces", json=answered)
    assert r.status_code == 200, r.text
    answer = json_format.Parse(r.text, ExportTraceServiceResponse())
    assert answer.partial_success.rejected_spans == 2
    assert "control character U+001B" in answer.partial_success.error_message
    got = stored(http, "otel-5b8efff798038103d269b633813fc60c-cccccccccccccc01")
    assert got is not None and got["response"] == "\b" and got["trainable"] is True
    for span_id in ("cccccccccccccc02", "cccccccccccccc03"):
        assert stored(http, f"otel-5b8efff798038103d269b633813fc60c-{span_id}") is None


INSTRUMENTED_CLIENT = textwrap.dedent("""
    import json, sys
    import openai
    from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.instrumentation.openai_v2 import OpenAIInstrumentor
    from opentelemetry.sdk._logs import LoggerProvider
    from opentelemetry.sdk._logs.export import BatchLogRecordProcessor, SimpleLogRecordProcessor
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    url, key, policy, logs = sys.argv[1:5]
    auth = {"Authorization": "Bearer " + key}
    resource = Resource.create({"service.name": "instrumented"})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(
        endpoint=url + "/otlp/v1/traces", headers=auth)))
    logger_provider = LoggerProvider(resource=resource)
    log_exporter = OTLPLogExporter(endpoint=url + "/otlp/v1/logs", headers=auth)
    if logs == "logs-first":  # each event exported as it is emitted, before the span ends
        logger_provider.add_log_record_processor(SimpleLogRecordProcessor(log_exporter))
    elif logs == "span-first":  # events held back until after the span is exported
        logger_provider.add_log_record_processor(
            BatchLogRecordProcessor(log_exporter, schedule_delay_millis=600_000))
    OpenAIInstrumentor().instrument(tracer_provider=provider, logger_provider=logger_provider)
    client = openai.OpenAI(api_key=key, base_url=url + "/v1", max_retries=0)
    out = client.chat.completions.create(
        model=policy, max_tokens=6, temperature=0.5,
        messages=[{"role": "system", "content": "Answer YES or NO."},
                  {"role": "user", "content": "ECOG 0. PFS > 180 d?"}])
    provider.shutdown()
    logger_provider.shutdown()
    print(json.dumps({"id": out.id, "content": out.choices[0].message.content,
                      "finish_reason": out.choices[0].finish_reason}))
""")
GENAI_ENV = ("OTEL_SEMCONV", "OTEL_INSTRUMENTATION_GENAI")


def run_instrumented_client(api_url: str, key: str, policy: str, env: dict[str, str],
                            logs: str = "none") -> dict[str, Any]:
    """The official openai client, instrumented by opentelemetry-instrumentation-openai-v2, in
    its own process (the instrumentation reads its settings from the environment once)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(GENAI_ENV)}
    done = subprocess.run([sys.executable, "-c", INSTRUMENTED_CLIENT, api_url, key, policy, logs],
                          env=clean | env, cwd=REPO, capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def otel_traces(http: httpx.Client, policy: str) -> list[dict[str, Any]]:
    items = http.get("/v1/traces", params={"policy": policy}).json()["items"]
    return [t for t in items if t["external_id"].startswith("otel-")]


def test_the_openai_v2_instrumentation_through_our_proxy_sends_real_genai_spans(
    api_url, key, http, policy
):
    env = {"OTEL_SEMCONV_STABILITY_OPT_IN": "gen_ai_latest_experimental",
           "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT": "span_only"}
    answer = run_instrumented_client(api_url, key, policy, env)
    [trace] = otel_traces(http, policy)
    assert trace["messages"] == [{"role": "system", "content": "Answer YES or NO."},
                                 {"role": "user", "content": "ECOG 0. PFS > 180 d?"}]
    assert trace["response"] == answer["content"]
    assert trace["finish_reason"] == answer["finish_reason"]
    assert trace["sampling_params"] == {"temperature": 0.5, "max_tokens": 6}
    assert trace["trainable"] is True and trace["metadata"]["response_id"] == answer["id"]


@pytest.mark.parametrize("logs", ["logs-first", "span-first"])
def test_the_instrumentations_log_event_joins_its_span_whichever_arrives_first(
    api_url, key, http, policy, logs
):
    """Content capture `event_only`: the span carries no content; the messages come as a
    `gen_ai.client.inference.operation.details` log record to /otlp/v1/logs."""
    env = {"OTEL_SEMCONV_STABILITY_OPT_IN": "gen_ai_latest_experimental",
           "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT": "event_only"}
    answer = run_instrumented_client(api_url, key, policy, env, logs)
    [trace] = otel_traces(http, policy)
    # the sampled answer in the message: which answers a join could miss is what a failure needs
    assert trace["messages"] == [{"role": "system", "content": "Answer YES or NO."},
                                 {"role": "user", "content": "ECOG 0. PFS > 180 d?"}], answer
    assert trace["response"] == answer["content"]
    assert trace["finish_reason"] == answer["finish_reason"]
    assert trace["trainable"] is True, trace["untrainable_reason"]


def legacy_events(provider: TracerProvider, loggers: LoggerProvider, policy: str) -> None:
    """What openai-v2 before util-genai emitted with content capture on: one log record per
    message (`gen_ai.{role}.message`) and per choice (`gen_ai.choice`), in the span's context."""
    logger = loggers.get_logger("opentelemetry.instrumentation.openai_v2")
    with provider.get_tracer("openai_v2").start_as_current_span("chat gpt-4o") as span:
        span.set_attributes({"gen_ai.operation.name": "chat", "gen_ai.system": "openai",
                             "gen_ai.request.model": "gpt-4o", "tracelearn.policy": policy})
        logger.emit(LogRecord(event_name="gen_ai.system.message",
                              body={"content": "Use the weather tool."}))
        logger.emit(LogRecord(event_name="gen_ai.user.message",
                              body={"content": "Weather in Paris?"}))
        logger.emit(LogRecord(event_name="gen_ai.choice", body={
            "index": 0, "finish_reason": "tool_calls",
            "message": {"role": "assistant", "tool_calls": [TOOL_CALL]}}))
        logger.emit(LogRecord(event_name="gen_ai.evaluation.result", attributes={
            "gen_ai.evaluation.name": "tool_choice", "gen_ai.evaluation.score.value": 0.5}))


def test_legacy_message_log_records_fill_in_a_span_stored_before_them(
    api_url, key, http, policy
):
    auth = {"Authorization": f"Bearer {key}"}
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    loggers = LoggerProvider()
    log_exporter = OTLPLogExporter(endpoint=f"{api_url}/otlp/v1/logs", headers=auth)
    loggers.add_log_record_processor(
        BatchLogRecordProcessor(log_exporter, schedule_delay_millis=600_000))
    legacy_events(provider, loggers, policy)
    [span] = spans.get_finished_spans()
    span_exporter = OTLPSpanExporter(endpoint=f"{api_url}/otlp/v1/traces", headers=auth)
    assert span_exporter.export([span]) is SpanExportResult.SUCCESS
    before = stored(http, external_id(span))
    assert before is not None and before["untrainable_reason"] == "content_not_captured"

    loggers.shutdown()  # now the log records go out
    after = stored(http, external_id(span))
    assert after is not None and after["trainable"] is True
    assert after["messages"] == [{"role": "system", "content": "Use the weather tool."},
                                 {"role": "user", "content": "Weather in Paris?"}]
    assert after["response"] == {"tool_calls": [TOOL_CALL]}
    assert after["finish_reason"] == "tool_calls"
    assert [(o["name"], o["value"]) for o in after["outcomes"]] == [("tool_choice", 0.5)]


def test_the_instrumentation_without_content_capture_gives_an_untrainable_trace(
    api_url, key, http, policy
):
    run_instrumented_client(api_url, key, policy, {}, logs="logs-first")
    [trace] = otel_traces(http, policy)
    assert trace["trainable"] is False
    assert trace["untrainable_reason"] == "content_not_captured"
    assert trace["usage"]["completion_tokens"] >= 1
