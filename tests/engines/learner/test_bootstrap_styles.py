"""The bundled model's warm-start sees the seen styles only, its cache key follows them, and the
tokenizer it learned with is the one it is served with."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer
from transformers import AutoTokenizer

from app.settings import get_settings
from tests.support.seeding import build_model
from workers.clinical import task
from workers.learner import bootstrap, bundled
from workers.learner.bootstrap import BootstrapConfig


def test_demonstrations_mix_the_seen_styles_and_never_show_the_unseen_one() -> None:
    cfg = BootstrapConfig(size="test", n_demos=300)
    prompts = [msgs[1]["content"] for msgs, _ in bootstrap.demonstrations(cfg)]
    unseen = {task.render(e.case, task.UNSEEN_STYLE)
              for e in task.generate(100_000 + cfg.seed, cfg.n_demos, "train")}
    assert not any(p.split("\n" + task.QUESTION)[0] in unseen for p in prompts)
    assert not any("µkat" in p or "haemoglobin" in p for p in prompts)
    # each seen style's own marker shows up
    assert any(p.startswith("Age: ") for p in prompts)  # fields
    assert any(" NSCLC, " in p for p in prompts)  # clinic note
    assert any(p.startswith("Planned: ") for p in prompts)  # long form
    assert any("-year-old" in p and p[0].isdigit() for p in prompts)  # narrative


def test_cache_key_changes_with_the_task_corpus(monkeypatch: pytest.MonkeyPatch) -> None:
    before = BootstrapConfig(size="test").cache_key()
    assert before == BootstrapConfig(size="test").cache_key()
    monkeypatch.setattr(task, "corpus_digest", lambda: "another-corpus")
    assert BootstrapConfig(size="test").cache_key() != before


def test_cache_key_covers_the_seen_style_set(monkeypatch: pytest.MonkeyPatch) -> None:
    before = BootstrapConfig(size="test").cache_key()
    monkeypatch.setattr(task, "SEEN_STYLES", task.SEEN_STYLES[:-1])
    assert BootstrapConfig(size="test").cache_key() != before


@pytest.mark.parametrize("which", ["test build", "shipped"])
def test_the_served_tokenizer_gives_the_ids_the_warm_start_learned_from(which: str) -> None:
    """transformers (and vLLM through it) loads a qwen2 checkpoint's tokenizer as Qwen2Tokenizer,
    with its own pre-tokenizer over the one in tokenizer.json. The build encodes its
    demonstrations with the tokenizer as trained (tokenizer.json read as is); the served model
    must see the same ids for the same text, numbers included."""
    model_dir = (build_model(get_settings().model_cache) if which == "test build"
                 else bundled.SHIPPED_DIR)
    as_trained = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    served = AutoTokenizer.from_pretrained(str(model_dir))
    examples = task.generate(3, 40, "heldout", list(task.SEEN_STYLES))
    texts = [task.render(e.case, e.style) for e in examples]
    texts += [task.weak_response(e.case, random.Random(i)) for i, e in enumerate(examples)]
    assert any(" 340" in t or "ECOG 2" in t for t in texts)  # numbers after a space are covered
    for text in texts:
        assert served(text, add_special_tokens=False)["input_ids"] == as_trained.encode(
            text, add_special_tokens=False).ids, text
