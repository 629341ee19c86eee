"""`tracelearn demo`: the whole loop on the embedded default, end to end, with progress.

    bundled tiny model ─▶ API (this process, or the one at --url) ─▶ POST synthetic clinical
    traces over HTTP ─▶ regenerate G completions per train trace from the serving snapshot
    ─▶ grade ─▶ one OAPL update ─▶ candidate ─▶ eval vs the champion on held-out traces ─▶ gate
    ─▶ left ``awaiting_approval`` (or ``rejected`` with the reason) on the dashboard

Everything but the HTTP ingest runs in this process against the settings' database, so with
``--url`` the server must share it (``tracelearn up`` in the same directory does).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import httpx

from app.auth.service import create_key
from app.db import Database, get_database, session_scope, set_database
from app.install import prepare
from app.models import Snapshot
from app.policies.schemas import POLICY_NAME, GateSpec
from app.runs.pipeline import run_policy_pipeline
from app.settings import Settings, set_settings
from app.snapshots.evaluation import EvalOptions, evaluate_snapshot
from workers.clinical import task

ApiServer = Callable[[Settings], AbstractContextManager[str]]
"""serve(settings): a context manager that runs the API and yields its base URL."""
DemoProgress = Callable[[str, int, int], None]
"""progress(stage, done, total); stages: model, server, policy, ingest, regenerate, grade, train,
evaluate, done."""
Notice = Callable[[str], None]
"""say(line): a decision the user should read (which policy, which gate)."""
DEFAULT_POLICY = "clinical"
"""The README's policy."""

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
    duplicates: int = 0
    """Traces that an earlier run had already posted (same seed and policy)."""
    error: str | None = None

    @property
    def dashboard_url(self) -> str:
        if self.snapshot_id is None:
            return f"{self.url}/dashboard"
        return f"{self.url}/dashboard/snapshots/{self.snapshot_id}"


KEY_FIX = "create one with `tracelearn keys create --tenant demo --scopes ingest,read,admin`"


class DemoRefused(Exception):
    """The demo cannot run as asked; the message is one line that names the fix. Raised before
    anything slow (the model, the pipeline) has started."""


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _admin_key(tenant: str) -> str:
    with session_scope() as session:
        return create_key(session, tenant, "ingest,read,admin", name="demo").secret


def check_server(base_url: str) -> None:
    """A tracelearn API answers ``/healthz`` at ``base_url``."""
    try:
        r = httpx.get(f"{base_url}/healthz", timeout=5)
    except httpx.TransportError:
        raise DemoRefused(
            f"no tracelearn server at {base_url}: start it with `tracelearn up`"
        ) from None
    if r.status_code != 200:
        raise DemoRefused(f"no tracelearn server at {base_url} (/healthz answered "
                          f"{r.status_code}): start it with `tracelearn up`")


def _refused(r: httpx.Response, doing: str, *, key_made_here: bool = False) -> DemoRefused:
    """The one-line reason an authenticated request failed, with the fix."""
    if r.status_code == 401:
        if key_made_here:
            return DemoRefused(
                "the key the demo created in this directory's database was refused (401): the "
                "server uses another database; pass --key, " + KEY_FIX + " where it runs")
        return DemoRefused(f"the key was refused (401): {KEY_FIX}")
    if r.status_code == 403:
        return DemoRefused(f"the key may not {doing} (403): {KEY_FIX}")
    return DemoRefused(f"{doing} failed: {r.status_code} {r.text[:200]}")


def check_key(client: httpx.Client, *, key_made_here: bool = False) -> None:
    """The key is accepted (an authenticated GET) and may ingest: an empty batch is refused for
    its scope (403) before its body is looked at (422), so the probe writes nothing. The admin
    scope is needed only to create a policy, and checked there."""
    r = client.get("/v1/policies")
    if r.status_code != 200:
        raise _refused(r, "read policies", key_made_here=key_made_here)
    r = client.post("/v1/traces", json={"traces": []})
    if r.status_code in (401, 403):
        raise _refused(r, "ingest traces", key_made_here=key_made_here)


def _gate_words(gate: dict[str, Any]) -> str:
    spec = GateSpec.model_validate(gate)
    words = [f"{spec.primary_metric} must improve"
             + (" significantly" if spec.require_significant_gain else ""),
             f"others may drop ≤ {spec.max_secondary_regression:g}",
             f"n ≥ {spec.min_eval_n}"]
    if spec.min_parse_rate is not None:
        words.append(f"parse rate ≥ {spec.min_parse_rate:g}")
    if spec.min_abs_gain is not None:
        words.append(f"gain ≥ {spec.min_abs_gain:+g}")
    if spec.min_rel_gain is not None:
        words.append(f"relative gain ≥ {spec.min_rel_gain:+.0%}")
    return ", ".join(words)


def use_or_create_policy(
    client: httpx.Client, name: str, group_size: int, max_tokens: int, say: Notice
) -> bool:
    """Use the policy ``name`` as it is configured, or create it with the default gate (and
    ``group_size``/``max_tokens``); says which. True when it was created."""
    r = client.get(f"/v1/policies/{name}")
    if r.status_code == 200:
        p = r.json()
        say(f"using policy {name} as configured: G={p['group_size']}, "
            f"max_tokens {p['sampling'].get('max_tokens')}, its gate ({_gate_words(p['gate'])})")
        return False
    if r.status_code != 404:
        raise _refused(r, "read policies")
    say(f"creating policy {name} with the default gate ({_gate_words({})}), G={group_size}, "
        f"max_tokens {max_tokens}")
    r = client.post("/v1/policies", json={
        "name": name, "group_size": group_size,
        "sampling": {"temperature": 1.0, "max_tokens": max_tokens},
    })
    if r.status_code == 409:
        raise DemoRefused(f"policy name {name!r} is taken by another tenant: "
                          "pass --policy with another name")
    if r.status_code != 201:
        raise _refused(r, "create policies")
    return True


def _post_traces(
    client: httpx.Client, policy: str, n: int, seed: int, report: DemoProgress
) -> tuple[int, int, int]:
    """(posted, held out, already there) for ``n`` synthetic traces."""
    items = task.ingest_items(seed, n, "train", policy=policy)
    posted = heldout = duplicates = 0
    report("ingest", 0, n)
    for start in range(0, n, 100):
        r = client.post("/v1/traces", json={"traces": items[start : start + 100]})
        if r.status_code in (401, 403):
            raise _refused(r, "ingest traces")
        if r.status_code >= 300 and r.status_code != 207:
            raise RuntimeError(f"ingest failed: {r.status_code} {r.text[:300]}")
        for res in r.json()["results"]:
            if res["status"] in ("created", "duplicate"):
                posted += 1
                heldout += res.get("split") == "heldout"
                duplicates += res["status"] == "duplicate"
        report("ingest", min(start + 100, n), n)
    return posted, heldout, duplicates


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
    policy: str = DEFAULT_POLICY,
    seed: int = 0,
    eval_k: int = 4,
    train_overrides: dict[str, Any] | None = None,
    say: Notice | None = None,
) -> DemoResult:
    """Run the loop once and leave a gated candidate behind; see the module docstring.

    ``url``/``key``: post to an already running server (same database); without ``url``,
    ``serve(settings)`` starts one for the demo's duration (the CLI passes its in-process API).
    Without ``key`` an admin key for tenant ``demo`` is created. ``policy`` is used as it is
    configured, or created with the default gate; ``say`` hears which. Raises ``DemoRefused``
    (before the model is touched) when the server does not answer or refuses the key.
    """
    if url is None and serve is None:
        raise ValueError("run_demo needs the url of a running API or a way to serve one")
    if re.fullmatch(POLICY_NAME, policy) is None:
        raise DemoRefused(f"{policy!r} is not a policy name: use lowercase letters, digits and "
                          "'-', at most 48, starting with a letter or digit")
    report: DemoProgress = progress or (lambda stage, done, total: None)
    notice: Notice = say or (lambda line: None)
    set_settings(settings)
    if get_database().settings is not settings:
        set_database(Database(settings))
    if url is not None:
        # A wrong URL or key should cost a second, not a model load and a traceback.
        url = url.rstrip("/")
        check_server(url)
        if key is not None:
            with httpx.Client(base_url=url, timeout=10, headers=_bearer(key)) as probe:
                check_key(probe)
    report("model", 0, 1)
    prepare(settings, lambda stage, done, total: report(f"model: {stage}", done, total))
    report("model", 1, 1)

    server = serve(settings) if url is None and serve is not None else nullcontext(url or "")
    with server as base_url:
        base_url = base_url.rstrip("/")
        result = DemoResult(policy=policy, url=base_url)
        secret = key or _admin_key("demo")
        with httpx.Client(base_url=base_url, timeout=120, headers=_bearer(secret)) as client:
            check_key(client, key_made_here=key is None)
            report("server", 1, 1)
            report("policy", 0, 1)
            use_or_create_policy(client, policy, group_size, max_tokens, notice)
            report("policy", 1, 1)
            result.traces_posted, result.heldout, result.duplicates = _post_traces(
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
        if result.duplicates == result.traces_posted:
            result.error += (f" (all {result.duplicates} traces were posted by an earlier demo: "
                             "pass --seed with another number for new ones)")
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
