"""The vLLM serving engine sends a prompt's tools the way ``encode_prompt`` renders them: as the
server's ``tools`` when the template renders them, else as the same system block."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from workers.inference.base import SamplingParams
from workers.inference.chat import tools_block, with_tools
from workers.inference.serving import VllmServingEngine
from workers.learner.bootstrap import CHAT_TEMPLATE

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
