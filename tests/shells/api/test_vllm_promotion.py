"""Promotion, the proxy and rollback against a real vLLM OpenAI server (CPU build), through the
rollout workers' vLLM fixture. Skipped where vLLM is not importable."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.engines import set_engine_override
from tests.conftest import IN_CI
from tests.support.pipeline import vllm_python
from tests.support.seeding import add_snapshot, make_adapter
from workers.inference.serving import VllmServingEngine

pytestmark = [
    pytest.mark.vllm,
    # Decided before any fixture runs, so a machine without vLLM does not build the model first.
    # In CI the vllm fixture fails instead of skipping.
    pytest.mark.skipif(vllm_python() is None and not IN_CI, reason="vllm is not importable"),
]


def test_promote_proxy_and_roll_back_through_vllm(
    vllm, model_dir, client, admin_headers, policy_name, database, tmp_path: Path
):
    from workers.inference.vllm_http import VllmHttpBackend

    engine = VllmServingEngine(VllmHttpBackend(vllm.url, model_dir, timeout_s=300))
    set_engine_override(engine)
    try:
        make_adapter(model_dir, tmp_path / "adapter")
        sid = add_snapshot(database, policy_name, tmp_path / "adapter")
        body = client.post(f"/v1/snapshots/{sid}/approve", headers=admin_headers).json()
        assert body["promoted"] is True, body
        assert f"{policy_name}-v1" in engine.list_models()

        r = client.post("/v1/chat/completions", headers=admin_headers, json={
            "model": policy_name, "max_tokens": 8,
            "messages": [{"role": "user", "content": "ECOG 0. PFS > 180 days?"}]})
        assert r.status_code == 200, r.text
        assert r.json()["model"] == f"{policy_name}-v1"

        back = client.post(f"/v1/policies/{policy_name}/rollback", headers=admin_headers)
        assert back.status_code == 200, back.text
        assert back.json()["snapshot"]["version"] == 0
    finally:
        set_engine_override(None)
