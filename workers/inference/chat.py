"""The one place where chat messages become prompt token ids (sampler and trainer both call it)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple


class TokenOutOfVocabError(ValueError):
    """A token id the model has no embedding row for: the tokenizer and the model disagree."""


class _Special(NamedTuple):
    id: int
    lstrip: bool
    rstrip: bool


def content_text(content: Any) -> str:
    """A message's content as text: a string as is, the text (and refusal) parts of a part list
    joined with newlines; other parts (images, files) carry no text."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for part in content:
        if isinstance(part, Mapping):
            text = part.get("text", part.get("refusal"))
            if isinstance(text, str):
                texts.append(text)
    return "\n".join(texts)


def flatten_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """OpenAI chat messages (part lists, tool calls) as the role/content pairs every chat
    template understands: parts become text, an assistant's tool calls are appended as JSON."""
    flat = []
    for m in messages:
        text = content_text(m.get("content"))
        calls = m.get("tool_calls")
        if calls:
            text = "\n".join(filter(None, [text, json.dumps(
                [c.get("function", c) for c in calls], ensure_ascii=False, sort_keys=True)]))
        flat.append({"role": str(m.get("role", "user")), "content": text})
    return flat


def _special_tokens(tokenizer: Any) -> dict[str, _Special]:
    """The tokenizer's special added tokens (turn markers, end of text), by their text."""
    out = {}
    for tid, tok in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(tok, "special", False):
            out[str(tok)] = _Special(int(tid), bool(tok.lstrip), bool(tok.rstrip))
    return out


def _stand_ins(specials: Iterable[str], texts: Iterable[str]) -> dict[str, str]:
    """One private-use character per special token, none of them occurring in ``texts``."""
    seen = set("".join(texts))
    free = (c for c in map(chr, range(0xF0000, 0x10FFFE)) if c not in seen)
    return {s: next(free) for s in specials}


def encode_prompt(tokenizer: Any, messages: Sequence[Mapping[str, Any]]) -> list[int]:
    """Apply the tokenizer's chat template with the generation prompt and return token ids.

    Message content is customer text (traces): a literal ``<|im_end|>`` or ``<|endoftext|>`` in
    it is encoded as those characters, never as the special token, so a trace cannot inject a
    turn boundary into what is sampled and trained on, nor reach an id the tokenizer invented
    past the model's embedding. Only the special tokens the template itself writes are special.
    For content without special-token text the ids are those of encoding the rendered template
    in one piece (what vLLM's chat endpoint sees). Messages in the full OpenAI format are
    flattened first (``flatten_messages``).
    """
    flat = flatten_messages(messages)
    specials = _special_tokens(tokenizer)
    if not specials:
        text = tokenizer.apply_chat_template(flat, tokenize=False, add_generation_prompt=True)
        plain: list[int] = tokenizer(text, add_special_tokens=False)["input_ids"]
        return plain
    # Longest first: at one position the longest special wins, as in the tokenizer itself.
    pattern = re.compile("|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)))
    stand_in = _stand_ins(specials, (m["content"] for m in flat))
    back = {c: s for s, c in stand_in.items()}
    escaped = [m | {"content": pattern.sub(lambda h: stand_in[h.group()], m["content"])}
               for m in flat]
    text = tokenizer.apply_chat_template(escaped, tokenize=False, add_generation_prompt=True)
    restore = re.compile("|".join(map(re.escape, back)))

    def plain_ids(piece: str) -> list[int]:
        if not piece:
            return []
        piece = restore.sub(lambda h: back[h.group()], piece)
        encoded: list[int] = tokenizer(piece, add_special_tokens=False,
                                       split_special_tokens=True)["input_ids"]
        return encoded

    ids: list[int] = []
    pos, pending = 0, False  # pending: the last special strips whitespace to its right
    for hit in pattern.finditer(text):
        special = specials[hit.group()]
        piece = text[pos:hit.start()]
        if pending:
            piece = piece.lstrip()
        if special.lstrip:
            piece = piece.rstrip()
        ids += plain_ids(piece)
        ids.append(special.id)
        pos, pending = hit.end(), special.rstrip
    tail = text[pos:]
    ids += plain_ids(tail.lstrip() if pending else tail)
    return ids


def embedding_rows(model: Any) -> int:
    """How many token ids a transformers (or peft) model has embedding rows for."""
    return int(model.get_input_embeddings().num_embeddings)


def check_token_ids(sequences: Iterable[Sequence[int]], embedding_rows: int) -> None:
    """Raise ``TokenOutOfVocabError`` for an id without an embedding row, before the model turns
    it into an opaque index error (or a device-side assert on a GPU)."""
    for seq in sequences:
        bad = [t for t in seq if not 0 <= t < embedding_rows]
        if bad:
            raise TokenOutOfVocabError(
                f"token id {bad[0]} is outside the model's {embedding_rows}-row embedding: the "
                "tokenizer and the model disagree on the vocabulary")
