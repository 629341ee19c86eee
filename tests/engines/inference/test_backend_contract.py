"""One contract, every inference backend: the local transformers sampler and a real vLLM server.

Shapes; token ids decode to the text; behaviour log-probs equal the trainer's log-probs of the
same completion (the trainer's forward pass is the reference, tolerance below); an adapter
changes the outputs; an unknown adapter is a clear error.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from workers.inference.base import (
    AdapterRef,
    Completion,
    InferenceBackend,
    SamplingParams,
    UnknownAdapterError,
)
from workers.inference.chat import with_tools

# float32 on both sides; different kernels (vLLM's CPU attention vs eager PyTorch) differ in the
# last bits, which over a 2-layer model stays well under this per token.
TOKEN_LOGPROB_TOL = 2e-3

PROMPTS = [
    [{"role": "user", "content": "Patient 7: 64 years, ECOG 1, stage IV. PFS over 180 days?"}],
    [{"role": "system", "content": "Answer with the contract."},
     {"role": "user", "content": "Patient 9: 51 years. Will PFS exceed 180 days?"}],
]
# A tool-using trace as regeneration builds it (``with_tools``): definitions, a call, its result.
TOOL_PROMPT = with_tools(
    [{"role": "user", "content": "Patient 7: PFS over 180 days?"},
     {"role": "assistant", "content": None, "tool_calls": [
         {"id": "c1", "type": "function",
          "function": {"name": "lookup_ecog", "arguments": "{\"id\": 7}"}}]},
     {"role": "tool", "tool_call_id": "c1", "content": "ECOG 1"}],
    [{"type": "function", "function": {
        "name": "lookup_ecog", "parameters": {"type": "object",
                                              "properties": {"id": {"type": "integer"}}}}}],
)


@pytest.fixture(
    params=["local", pytest.param("vllm", marks=pytest.mark.vllm)], scope="module"
)
def backend(request: pytest.FixtureRequest, model_dir: Path) -> Iterator[InferenceBackend]:
    if request.param == "local":
        from workers.inference.local import LocalBackend

        yield LocalBackend(model_dir)
        return
    from workers.inference.vllm_http import VllmHttpBackend

    server = request.getfixturevalue("vllm")
    client = VllmHttpBackend(server.url, model_dir, timeout_s=300)
    yield client
    client.close()


def _decode(backend: InferenceBackend, c: Completion) -> str:
    ids = c.token_ids[:-1] if c.finish_reason == "stop" else c.token_ids
    return str(backend.tokenizer.decode(ids, skip_special_tokens=True))  # type: ignore[attr-defined]


def test_shapes_and_token_ids_decode_to_the_text(backend: InferenceBackend) -> None:
    out = backend.generate(PROMPTS, 3, SamplingParams(max_tokens=12, temperature=1.0, seed=1))
    assert [len(g) for g in out] == [3, 3]
    for group in out:
        for c in group:
            assert 0 < len(c.token_ids) <= 12 and len(c.logprobs) == len(c.token_ids)
            assert c.finish_reason in ("stop", "length")
            assert all(lp <= 1e-6 for lp in c.logprobs)
            assert c.logprob_sum == pytest.approx(sum(c.logprobs))
            assert _decode(backend, c) == c.text


def test_behaviour_logprobs_match_the_trainers(backend: InferenceBackend, model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    from workers.inference.chat import encode_prompt
    from workers.learner.data import SequenceRecord, collate
    from workers.learner.trainer import sequence_logprobs

    prompts = [*PROMPTS, TOOL_PROMPT]
    out = backend.generate(prompts, 2, SamplingParams(max_tokens=10, temperature=1.0, seed=2))
    tok = backend.tokenizer  # type: ignore[attr-defined]
    assert "lookup_ecog" in tok.decode(encode_prompt(tok, TOOL_PROMPT))
    records, flat = [], []
    for messages, group in zip(prompts, out, strict=True):
        for c in group:
            records.append(SequenceRecord(0, encode_prompt(tok, messages), c.token_ids,
                                          c.logprobs, c.logprob_sum, 0.0, 0.0, 1.0))
            flat.append(c)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    batch = collate(records, tok.pad_token_id, range(len(records)))
    with torch.no_grad():
        seq, per_token = sequence_logprobs(model, batch)
    for i, c in enumerate(flat):
        mask = batch.target_mask[i].bool()
        trainer = per_token[i][mask].tolist()
        assert len(trainer) == len(c.logprobs)
        worst = max(abs(a - b) for a, b in zip(trainer, c.logprobs, strict=True))
        assert worst < TOKEN_LOGPROB_TOL, f"token log-prob differs by {worst:.2e}"
        assert float(seq[i]) == pytest.approx(c.logprob_sum, abs=TOKEN_LOGPROB_TOL * len(trainer))


def test_an_adapter_changes_the_outputs(backend: InferenceBackend, adapter_dirs: list[Path]) -> None:
    greedy = SamplingParams(max_tokens=12, temperature=0.0)
    ref = AdapterRef(name=f"contract-{adapter_dirs[0].name}", path=str(adapter_dirs[0]))
    base = backend.generate(PROMPTS[:1], 1, greedy)[0][0]
    tuned = backend.generate(PROMPTS[:1], 1, greedy, ref)[0][0]
    again = backend.generate(PROMPTS[:1], 1, greedy, ref)[0][0]
    assert tuned.token_ids != base.token_ids
    assert again.token_ids == tuned.token_ids  # greedy and the same adapter: deterministic


def test_an_unknown_adapter_is_a_clear_error(backend: InferenceBackend, tmp_path: Path) -> None:
    missing = AdapterRef(name="contract-missing", path=str(tmp_path / "nope"))
    with pytest.raises(UnknownAdapterError, match="contract-missing"):
        backend.generate(PROMPTS[:1], 1, SamplingParams(max_tokens=4), missing)


@pytest.mark.vllm
def test_vllm_adapter_load_is_verified_and_names_are_never_reused(
    vllm: object, model_dir: Path, adapter_dirs: list[Path]
) -> None:
    from workers.inference.vllm_http import VllmError, VllmHttpBackend

    client = VllmHttpBackend(vllm.url, model_dir, timeout_s=300)  # type: ignore[attr-defined]
    assert client.health()
    name = "lifecycle-v1"
    client.load_adapter(AdapterRef(name, str(adapter_dirs[0])))  # /v1/models + canary inside
    assert name in client.list_models()
    client.load_adapter(AdapterRef(name, str(adapter_dirs[0])))  # idempotent for the same path
    with pytest.raises(VllmError, match="already loaded"):
        client.load_adapter(AdapterRef(name, str(adapter_dirs[1])))
    client.unload_adapter(name)
    assert name not in client.list_models()
    client.unload_adapter(name)  # unknown names are ignored
