"""The vLLM serving engine sends a prompt's tools the way ``encode_prompt`` renders them: as the
server's ``tools`` when the template renders them, else as the same system block; ``tool_choice``
goes on only to a server started with a tool-call parser (no real vLLM here: request bodies and
the server's command line)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from workers.inference.base import SamplingParams
from workers.inference.chat import tools_block, with_tools
from workers.inference.serving import ToolCallDeltas, VllmServingEngine
from workers.inference.tool_calls import ParsedCall
from workers.inference.vllm_server import server_argv
from workers.learner.bootstrap import CHAT_TEMPLATE
from workers.learner.trainer import TrainerConfig

TOOLS = [{"type": "function", "function": {"name": "lookup_ecog", "parameters": {}}}]
MESSAGES = [{"role": "user", "content": "Patient 7?"}]


@dataclass
class _Client:
    """What the engine reads from its rollout-side vLLM client to build a request body."""

    tokenizer: Any
    base_url: str = "http://vllm"
    base_model: str = "base"


def _tokenizer(template: str) -> PreTrainedTokenizerFast:
    raw = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=raw, chat_template=template)


def test_a_template_without_tools_gets_the_system_block() -> None:
    engine = VllmServingEngine(_Client(_tokenizer(CHAT_TEMPLATE)))
    body = engine._body(None, with_tools(MESSAGES, TOOLS), SamplingParams(max_tokens=4))
    assert body["messages"] == [tools_block(TOOLS), *MESSAGES] and "tools" not in body


def test_a_template_with_tools_gets_them_as_the_servers_tools() -> None:
    engine = VllmServingEngine(_Client(_tokenizer("{{ tools }}{{ messages }}")))
    body = engine._body(None, with_tools(MESSAGES, TOOLS), SamplingParams(max_tokens=4))
    assert body["messages"] == MESSAGES and body["tools"] == TOOLS
    plain = engine._body(None, MESSAGES, SamplingParams(max_tokens=4))
    assert plain["messages"] == MESSAGES and "tools" not in plain


HERMES_TEMPLATE = "{{ tools }}{{ messages }}"


def test_without_a_tool_call_parser_the_server_is_told_none_and_still_shows_the_tools() -> None:
    # vLLM refuses "auto" (its default when tools are sent) without a parser; "none" keeps the
    # tools in the template, and the calls come back as text for the proxy to split.
    engine = VllmServingEngine(_Client(_tokenizer(HERMES_TEMPLATE)))
    body = engine._body(None, with_tools(MESSAGES, TOOLS, "auto"), SamplingParams(max_tokens=4))
    assert body["tools"] == TOOLS and body["tool_choice"] == "none"


def test_with_a_tool_call_parser_the_clients_tool_choice_is_passed_on() -> None:
    engine = VllmServingEngine(_Client(_tokenizer(HERMES_TEMPLATE)), tool_call_parser="hermes")
    named = {"type": "function", "function": {"name": "lookup_ecog"}}
    for choice in ("auto", "required", "none", named):
        body = engine._body(None, with_tools(MESSAGES, TOOLS, choice),
                            SamplingParams(max_tokens=4))
        assert body["tools"] == TOOLS and body["tool_choice"] == choice
    unsaid = engine._body(None, with_tools(MESSAGES, TOOLS), SamplingParams(max_tokens=4))
    assert "tool_choice" not in unsaid  # the server's default: auto
    plain = engine._body(None, MESSAGES, SamplingParams(max_tokens=4))
    assert "tools" not in plain and "tool_choice" not in plain


def test_a_template_without_tools_gets_no_tool_choice_even_with_a_parser() -> None:
    engine = VllmServingEngine(_Client(_tokenizer(CHAT_TEMPLATE)), tool_call_parser="hermes")
    body = engine._body(None, with_tools(MESSAGES, TOOLS, "auto"), SamplingParams(max_tokens=4))
    assert body["messages"] == [tools_block(TOOLS), *MESSAGES]
    assert "tools" not in body and "tool_choice" not in body


def test_streamed_tool_call_deltas_are_put_back_together() -> None:
    calls = ToolCallDeltas()
    calls.add([{"index": 0, "id": "chatcmpl-tool-1", "type": "function",
                "function": {"name": "lookup_ecog", "arguments": ""}}])
    calls.add([{"index": 0, "function": {"arguments": '{"id": '}}])
    calls.add([{"index": 1, "function": {"name": "get_weather"}},
               {"index": 0, "function": {"arguments": "7}"}}])
    assert calls.complete() == (ParsedCall("lookup_ecog", '{"id": 7}'),
                                ParsedCall("get_weather", "{}"))


def test_the_server_command_line_enables_the_tool_call_parser_only_when_named() -> None:
    plain = server_argv("python", "/models/base", 8000)
    assert "--enable-auto-tool-choice" not in plain and "--tool-call-parser" not in plain
    # The server loads adapters of the trainer's default rank.
    assert int(plain[plain.index("--max-lora-rank") + 1]) >= TrainerConfig().lora_rank
    argv = server_argv("python", "/models/base", 8000, tool_call_parser="hermes")
    assert argv[:len(plain)] == plain
    assert argv[len(plain):] == ["--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
