"""`tracelearn demo`: the whole loop on the embedded default, end to end, with progress.

    bundled tiny model ─▶ API (this process, or the one at --url) ─▶ POST synthetic clinical
    traces over HTTP ─▶ regenerate G completions per train trace from the serving snapshot
    ─▶ grade ─▶ one OAPL update ─▶ candidate ─▶ eval vs the champion on held-out traces ─▶ gate
    ─▶ left ``awaiting_approval`` (or ``rejected`` with the reason) on the dashboard

Everything but the HTTP ingest runs in this process against the settings' database, so with
``--url`` the server must share it (``tracelearn up`` in the same directory does).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import httpx

from app.auth.service import create_key
from app.db import Database, get_database, session_scope, set_database
from app.install import prepare
from app.models import Snapshot
from app.runs.pipeline import run_policy_pipeline
from app.settings import Settings, set_settings
from app.snapshots.evaluation import EvalOptions, evaluate_snapshot
from workers.clinical import task

ApiServer = Callable[[Settings], AbstractContextManager[str]]
"""serve(settings): a context manager that runs the API and yields its base URL."""
DemoProgress = Callable[[str, int, int], None]
"""progress(stage, done, total); stages: model, server, policy, ingest, regenerate, grade, train,
evaluate, done."""

@dataclass
class DemoResult:
    policy: str
    url: str
    traces_posted: int = 0
    heldout: int = 0
    groups: int = 0
    run_id: int | None = None
    snapshot_id: int | None = None
    served_name: str | None = None
    status: str | None = None
    status_reason: str | None = None
    before: dict[str, float] = field(default_factory=dict)
    """Champion (serving snapshot) held-out numbers."""
    after: dict[str, float] = field(default_factory=dict)
    """Candidate held-out numbers, same prompts and seeds."""
    p_values: dict[str, float] = field(default_factory=dict)
    error: str | None = None

    @property
    def dashboard_url(self) -> str:
        if self.snapshot_id is None:
            return f"{self.url}/dashboard"
        return f"{self.url}/dashboard/snapshots/{self.snapshot_id}"


def _admin_key(tenant: str) -> str:
    with session_scope() as session:
        return create_key(session, tenant, "ingest,read,admin", name="demo").secret


def _create_policy(client: httpx.Client, base: str, group_size: int, max_tokens: int) -> str:
    """The base name, or base-2, base-3… when an earlier demo already used it."""
    for i in range(1, 100):
        name = base if i == 1 else f"{base}-{i}"
        r = client.post("/v1/policies", json={
            "name": name, "group_size": group_size,
            "sampling": {"temperature": 1.0, "max_tokens": max_tokens},
        })
        if r.status_code == 201:
            return name
        if r.status_code != 409:
            raise RuntimeError(f"creating policy {name!r} failed: {r.status_code} {r.text}")
    raise RuntimeError(f"no free policy name starting with {base!r}")


def _post_traces(
    client: httpx.Client, policy: str, n: int, seed: int, report: DemoProgress
) -> tuple[int, int]:
    items = task.ingest_items(seed, n, "train", policy=policy)
    posted = heldout = 0
    report("ingest", 0, n)
    for start in range(0, n, 100):
        r = client.post("/v1/traces", json={"traces": items[start : start + 100]})
        if r.status_code >= 300 and r.status_code != 207:
            raise RuntimeError(f"ingest failed: {r.status_code} {r.text[:300]}")
        for res in r.json()["results"]:
            if res["status"] in ("created", "duplicate"):
                posted += 1
                heldout += res.get("split") == "heldout"
        report("ingest", min(start + 100, n), n)
    return posted, heldout


def run_demo(
    settings: Settings,
    progress: DemoProgress | None = None,
    *,
    url: str | None = None,
    serve: ApiServer | None = None,
    key: str | None = None,
    n_traces: int = 300,
    group_size: int = 8,
    max_tokens: int = 80,
    policy: str = "clinical-demo",
    seed: int = 0,
    eval_k: int = 4,
    train_overrides: dict[str, Any] | None = None,
) -> DemoResult:
    """Run the loop once and leave a gated candidate behind; see the module docstring.

    ``url``/``key``: post to an already running server (same database); without ``url``,
    ``serve(settings)`` starts one for the demo's duration (the CLI passes its in-process API).
    Without ``key`` an admin key for tenant ``demo`` is created.
    """
    if url is None and serve is None:
        raise ValueError("run_demo needs the url of a running API or a way to serve one")
    report: DemoProgress = progress or (lambda stage, done, total: None)
    set_settings(settings)
    if get_database().settings is not settings:
        set_database(Database(settings))
    report("model", 0, 1)
    prepare(settings, lambda stage, done, total: report(f"model: {stage}", done, total))
    report("model", 1, 1)

    server = serve(settings) if url is None and serve is not None else nullcontext(url or "")
    with server as base_url:
        base_url = base_url.rstrip("/")
        result = DemoResult(policy=policy, url=base_url)
        report("server", 1, 1)
        secret = key or _admin_key("demo")
        with httpx.Client(base_url=base_url, timeout=120,
                          headers={"Authorization": f"Bearer {secret}"}) as client:
            report("policy", 0, 1)
            result.policy = _create_policy(client, policy, group_size, max_tokens)
            report("policy", 1, 1)
            result.traces_posted, result.heldout = _post_traces(
                client, result.policy, n_traces, seed, report
            )

    # One OAPL update = one round with the policy's training config (the learner's defaults).
    pipeline = run_policy_pipeline(result.policy, progress=report, overrides=train_overrides)
    result.groups = pipeline.groups_graded
    result.run_id = pipeline.run_id
    result.snapshot_id = pipeline.snapshot_id
    result.served_name = pipeline.served_name
    if pipeline.snapshot_id is None:
        result.error = pipeline.error or f"training run ended {pipeline.run_status}"
        report("done", 1, 1)
        return result

    report("evaluate", 0, 1)
    with session_scope() as session:
        ev = evaluate_snapshot(
            session, pipeline.snapshot_id, settings, actor="system:demo",
            options=EvalOptions(k=eval_k, breakdown_key="case.biomarker", seed=seed),
            progress=lambda what: report("evaluate", 0, 1),
        )
        snap = session.get(Snapshot, pipeline.snapshot_id)
        assert snap is not None
        result.status, result.status_reason = snap.status.value, snap.status_reason
        champion = ev.comparison.get("champion", {})
        result.after = {k: float(v["value"]) for k, v in ev.metrics.items()}
        result.before = {k: float(v["value"]) for k, v in champion.items()}
        result.p_values = {k: float(v["p_value"]) for k, v in ev.comparison["paired"].items()}
        result.p_values["mcnemar"] = float(ev.comparison["mcnemar"]["p_value"])
    report("evaluate", 1, 1)
    report("done", 1, 1)
    return result
