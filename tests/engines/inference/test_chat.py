"""OpenAI chat messages in the full format become what every chat template understands."""

from __future__ import annotations

import json
from typing import Any

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from workers.graders import get_grader
from workers.inference.chat import (
    TOOLS_ROLE,
    content_text,
    encode_prompt,
    flatten_messages,
    render_prompt,
    split_tools,
    template_supports_tools,
    tools_block,
    with_tools,
)
from workers.learner.bootstrap import CHAT_TEMPLATE


def test_part_lists_become_their_text_and_media_parts_carry_none() -> None:
    parts = [{"type": "text", "text": "Stage IV."}, {"type": "image_url", "image_url": {"url": "x"}},
             {"type": "text", "text": "PFS > 180 days?"}]
    assert content_text(parts) == "Stage IV.\nPFS > 180 days?"
    assert content_text(None) == "" and content_text("plain") == "plain"


def test_tool_calls_and_tool_results_are_kept_as_text() -> None:
    messages = [
        {"role": "developer", "content": "Answer YES or NO."},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function",
             "function": {"name": "lookup", "arguments": "{\"id\": 7}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "ECOG 1"}]},
    ]
    assert flatten_messages(messages) == [
        {"role": "system", "content": "Answer YES or NO."},  # what chat templates call it
        {"role": "assistant", "content": '[{"arguments": "{\\"id\\": 7}", "name": "lookup"}]'},
        {"role": "tool", "content": "ECOG 1"},
    ]


TOOLS = [{"type": "function", "function": {
    "name": "lookup_ecog", "description": "ECOG score of a patient",
    "parameters": {"type": "object", "properties": {"id": {"type": "integer"}}}}}]
TOOL_HISTORY = [
    {"role": "user", "content": "Patient 7: PFS over 180 days?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function",
         "function": {"name": "lookup_ecog", "arguments": "{\"id\": 7}"}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "ECOG 1"},
]


class _Tokenizer:
    """Records what ``apply_chat_template`` receives (the rendering, not the tokens, is tested)."""

    def __init__(self, template: str) -> None:
        self.chat_template = template
        self.calls: list[dict[str, Any]] = []

    def apply_chat_template(self, messages: list[dict[str, Any]], **kw: Any) -> str:
        self.calls.append({"messages": messages, **kw})
        return json.dumps(messages) + json.dumps(kw.get("tools"))


def test_with_tools_carries_the_definitions_to_render_and_nowhere_else() -> None:
    prompt = with_tools(TOOL_HISTORY, TOOLS)
    assert prompt[0] == {"role": TOOLS_ROLE, "tools": TOOLS} and prompt[1:] == TOOL_HISTORY
    assert split_tools(prompt) == (TOOL_HISTORY, TOOLS)
    assert with_tools(TOOL_HISTORY, None) == TOOL_HISTORY == with_tools(TOOL_HISTORY, [])
    assert flatten_messages(prompt) == flatten_messages(TOOL_HISTORY)  # not a message


def test_a_template_without_tools_support_gets_the_tools_as_a_system_block() -> None:
    tok = _Tokenizer("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert not template_supports_tools(tok)
    render_prompt(tok, with_tools(TOOL_HISTORY, TOOLS))
    (call,) = tok.calls
    assert "tools" not in call and call["add_generation_prompt"] is True
    assert call["messages"] == [tools_block(TOOLS), *flatten_messages(TOOL_HISTORY)]
    block = call["messages"][0]["content"]
    assert block.startswith("Tools you may call")
    assert json.loads(block.split("\n", 1)[1]) == [TOOLS[0]["function"]]


def test_a_template_with_tools_support_gets_tools_and_structured_calls() -> None:
    tok = _Tokenizer("{% if tools %}{{ tools | tojson }}{% endif %}")
    assert template_supports_tools(tok)
    render_prompt(tok, with_tools(TOOL_HISTORY, TOOLS))
    (call,) = tok.calls
    assert call["tools"] == TOOLS
    user, assistant, tool = call["messages"]
    assert user == {"role": "user", "content": "Patient 7: PFS over 180 days?"}
    assert assistant["tool_calls"] == [{"type": "function", "id": "c1", "function": {
        "name": "lookup_ecog", "arguments": {"id": 7}}}]
    assert tool == {"role": "tool", "content": "ECOG 1", "tool_call_id": "c1"}


def test_the_bundled_template_renders_the_tool_names_into_the_prompt_ids() -> None:
    raw = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, chat_template=CHAT_TEMPLATE)
    text = render_prompt(tok, with_tools(TOOL_HISTORY, TOOLS))
    assert "lookup_ecog" in text.split("<|user|>")[0]  # the definitions, before the history
    assert text.endswith("<|assistant|>\n")
    assert render_prompt(tok, TOOL_HISTORY) == tok.apply_chat_template(
        flatten_messages(TOOL_HISTORY), tokenize=False, add_generation_prompt=True)
    assert encode_prompt(tok, TOOL_HISTORY) == tok(
        render_prompt(tok, TOOL_HISTORY), add_special_tokens=False)["input_ids"]


# A Hermes/Qwen-style template with tools support, rendered by transformers itself.
TOOLS_TEMPLATE = (
    "{% if tools %}<|system|>\n# Tools\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}"
    "<|end|>\n{% endif %}{% for m in messages %}<|{{ m.role }}|>\n{% if m.tool_calls %}"
    "{% for c in m.tool_calls %}<tool_call>{\"name\": \"{{ c.function.name }}\", \"arguments\": "
    "{{ c.function.arguments | tojson }}}</tool_call>{% endfor %}{% else %}{{ m.content }}"
    "{% endif %}<|end|>\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def test_a_real_tools_template_renders_definitions_and_calls_the_tool_call_grader_reads() -> None:
    raw = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, chat_template=TOOLS_TEMPLATE)
    text = render_prompt(tok, with_tools(TOOL_HISTORY, TOOLS))
    assert text.startswith("<|system|>\n# Tools\n" + json.dumps(TOOLS[0]))
    call = '<tool_call>{"name": "lookup_ecog", "arguments": {"id": 7}}</tool_call>'
    assert f"<|assistant|>\n{call}<|end|>\n<|tool|>\nECOG 1<|end|>\n<|assistant|>\n" in text
    grader = get_grader({"kind": "tool_call", "name": "lookup_ecog", "arguments": {"id": 7}})
    assert grader.grade([], call, None).reward == 1.0


def test_a_developer_message_renders_as_system_with_and_without_tools_support() -> None:
    """A trace stored with OpenAI's ``developer`` role is regenerated from the prompt the proxy
    served: every backend renders through ``render_prompt``."""
    as_developer = [{"role": "developer", "content": "Answer YES or NO."},
                    {"role": "user", "content": "PFS > 180 days?"}]
    as_system = [{"role": "system", "content": "Answer YES or NO."}, as_developer[1]]
    for template in ("{{ messages }}", "{% if tools %}{{ tools }}{% endif %}{{ messages }}"):
        tok = _Tokenizer(template)
        for prompt in (as_developer, with_tools(as_developer, TOOLS)):
            twin = as_system if prompt is as_developer else with_tools(as_system, TOOLS)
            assert render_prompt(tok, prompt) == render_prompt(tok, twin)
        assert {c["messages"][-2]["role"] for c in tok.calls} == {"system"}
