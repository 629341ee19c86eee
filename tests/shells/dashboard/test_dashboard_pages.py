"""The dashboard over HTTP: sessions, CSRF, pages rendered from stored numbers, actions."""

from __future__ import annotations

import re
import time
import xml.etree.ElementTree as ET

import pytest
from markupsafe import escape

from app.dashboard.session import COOKIE, sign
from app.dashboard.words import metric_help
from app.db import Database
from app.models import Evaluation, Snapshot, SnapshotStatus
from app.snapshots.gate import apply_gate
from tests.support.dashboard import csrf_from, sign_in
from tests.support.seeding import add_evaluation, add_training_run
from workers.clinical import task

SVG = "{http://www.w3.org/2000/svg}"


def test_pages_without_a_session_redirect_to_sign_in(client):
    for path in ("/dashboard", "/dashboard/audit", "/dashboard/snapshots/1"):
        r = client.get(path, follow_redirects=False)
        assert r.status_code == 303
        assert r.headers["location"].startswith("/dashboard/login")


def test_a_bearer_key_is_not_a_session(client, admin_headers):
    r = client.get("/dashboard", headers=admin_headers, follow_redirects=False)
    assert r.status_code == 303


def test_sign_in_needs_an_admin_key(client, make_key, tenant):
    page = client.get("/dashboard/login")
    r = client.post("/dashboard/login", data={"api_key": make_key(tenant, "read,ingest"),
                                              "csrf_token": csrf_from(page.text)})
    assert "lacks the admin scope" in r.text
    assert COOKIE not in client.cookies


def test_sign_in_form_needs_its_csrf_token(client, admin_key):
    client.get("/dashboard/login")
    r = client.post("/dashboard/login", data={"api_key": admin_key, "csrf_token": "forged"})
    assert "expired" in r.text and COOKIE not in client.cookies


def test_overview_lists_the_policy_with_its_serving_snapshot(client, signed_in, policy_name):
    r = client.get("/dashboard")
    assert policy_name in r.text and f"{policy_name}-v0" in r.text


def test_actions_without_the_csrf_token_are_refused(client, signed_in, policy_name, candidate):
    sid = candidate()
    r = client.post(f"/dashboard/snapshots/{sid}/approve", data={"comment": "x"})
    assert r.status_code == 403
    r = client.post(f"/dashboard/snapshots/{sid}/approve",
                    data={"comment": "x", "csrf_token": "wrong"})
    assert r.status_code == 403
    assert client.get(f"/dashboard/snapshots/{sid}").text.count("awaiting_approval") >= 1


def test_candidate_page_shows_metrics_with_cis_charts_and_lineage(
    client, signed_in, candidate, database: Database
):
    sid = candidate()
    add_evaluation(database, sid)
    html = client.get(f"/dashboard/snapshots/{sid}").text
    for fragment in ("95% CI", "parse_rate", "mean_reward", "pass@4", "McNemar", "<svg",
                     "reward distribution", "Where the two disagree", "ANSWER: YES",
                     "Weights sha256", "Approve and promote", "correct by case.biomarker"):
        assert fragment in html, fragment


def test_approve_in_the_dashboard_flips_serving(client, signed_in, policy_name, candidate):
    sid = candidate()
    page = client.get(f"/dashboard/snapshots/{sid}")
    r = client.post(f"/dashboard/snapshots/{sid}/approve",
                    data={"comment": "ok", "csrf_token": csrf_from(page.text)})
    assert r.status_code == 200
    assert "Approved and now serving" in r.text
    assert f'id="policy-serving">{policy_name}-v1<' in r.text


def test_rollback_button_restores_the_previous_snapshot(
    client, signed_in, policy_name, candidate
):
    page = client.get(f"/dashboard/policies/{policy_name}")
    assert 'id="rollback"' not in page.text and 'id="no-rollback"' in page.text
    sid = candidate()
    client.post(f"/dashboard/snapshots/{sid}/approve", data={"csrf_token": signed_in})
    page = client.get(f"/dashboard/policies/{policy_name}")
    assert f"Roll back to {policy_name}-v0" in page.text
    r = client.post(f"/dashboard/policies/{policy_name}/rollback",
                    data={"reason": "regression", "csrf_token": signed_in})
    assert f"Rolled back: {policy_name}-v0 serves {policy_name} again." in r.text
    assert f'id="serving-snapshot">{policy_name}-v0<' in r.text
    # v1 was rolled back from: no button brings it back.
    assert 'id="rollback"' not in r.text


def test_reject_needs_a_comment(client, signed_in, candidate):
    sid = candidate()
    r = client.post(f"/dashboard/snapshots/{sid}/reject", data={"csrf_token": signed_in})
    assert "needs a comment" in r.text
    r = client.post(f"/dashboard/snapshots/{sid}/reject",
                    data={"comment": "off-label doses", "csrf_token": signed_in})
    assert "off-label doses" in r.text and "rejected" in r.text


def test_audit_rows_filter_for_htmx(client, signed_in, candidate):
    sid = candidate()
    client.post(f"/dashboard/snapshots/{sid}/reject",
                data={"comment": "nope", "csrf_token": signed_in})
    rows = client.get("/dashboard/audit/rows", params={"action": "snapshot.rejected"},
                      headers={"HX-Request": "true"}).text
    assert "<html" not in rows and "snapshot.rejected" in rows and "nope" in rows
    none = client.get("/dashboard/audit/rows", params={"action": "no.such"}).text
    assert "No events." in none


def test_revoking_the_key_ends_the_session(client, signed_in, database, tenant):
    from sqlalchemy import select

    from app.models import ApiKey

    with database.session() as s:
        for key in s.scalars(select(ApiKey).where(ApiKey.tenant == tenant)):
            key.revoked_at = key.created_at
    assert client.get("/dashboard", follow_redirects=False).status_code == 303


def test_an_expired_or_tampered_session_is_refused(client, settings, admin_key):
    sign_in(client, admin_key)
    good = client.cookies.get(COOKIE)
    client.cookies.delete(COOKIE)
    expired = sign(settings.session_secret, {"key_id": 1, "csrf": "c", "exp": int(time.time()) - 1})
    for token in (expired, good[:-2] + "xx"):
        client.cookies.set(COOKIE, token, path="/dashboard")
        assert client.get("/dashboard", follow_redirects=False).status_code == 303
        client.cookies.delete(COOKIE)


def test_sign_out_clears_the_session(client, signed_in):
    r = client.post("/dashboard/logout", data={"csrf_token": signed_in})
    assert "Signed out" in r.text
    assert client.get("/dashboard", follow_redirects=False).status_code == 303


def test_static_htmx_is_served_locally(client):
    r = client.get("/dashboard/static/htmx.min.js")
    assert r.status_code == 200 and "htmx" in r.text[:200]


def test_overview_shows_next_scheduled_run_and_recent_failures(
    client, signed_in, policy_name, admin_headers, database
):
    from app.models import SnapshotStatus
    from tests.support.seeding import add_snapshot

    client.patch(f"/v1/policies/{policy_name}", json={"schedule": "0 3 * * *"},
                 headers=admin_headers)
    sid = add_snapshot(database, policy_name, None, SnapshotStatus.failed)
    with database.session() as s:
        from app.models import Snapshot

        s.get(Snapshot, sid).status_reason = "canary: empty answer"
    html = client.get("/dashboard").text
    assert "03:00 UTC" in html and "0 3 * * *" in html
    assert "canary: empty answer" in html


def test_evaluate_button_queues_the_evaluation_or_says_why_it_cannot_run(
    client, signed_in, candidate
):
    from app.models import SnapshotStatus

    sid = candidate(SnapshotStatus.candidate)
    r = client.post(f"/dashboard/snapshots/{sid}/evaluate", data={"csrf_token": signed_in})
    assert r.status_code == 200
    assert "has no held-out traces with outcomes to evaluate on" in r.text


def _post_clinical_traces(client, headers, policy: str, n: int) -> list[dict]:
    items = task.ingest_items(0, n, "train", policy=policy)
    r = client.post("/v1/traces", json={"traces": items}, headers=headers)
    assert r.status_code == 207, r.text
    return items


def _section(html: str, element_id: str, end: str = "</div>") -> str:
    """The page from the element with ``element_id`` to the first ``end`` after it."""
    return html[html.index(f'id="{element_id}"'):].split(end)[0]


@pytest.fixture
def trained_candidate(client, candidate, database, admin_headers, policy_name):
    """A candidate of ``policy_name`` made by a recorded training run on real posted traces."""

    def _make(used: int, flat: int, steps: int) -> int:
        _post_clinical_traces(client, admin_headers, policy_name, used + flat)
        sid = candidate()
        add_training_run(database, sid, used=used, flat=flat, steps=steps)
        return int(sid)

    return _make


def _polyline_points(svg: str) -> list[int]:
    root = ET.fromstring(svg)
    return [len(p.get("points", "").split()) for p in root.iter(f"{SVG}polyline")]


def test_candidate_page_shows_every_gate_threshold_with_its_value_and_verdict(
    client, signed_in, candidate, database: Database
):
    sid = candidate(SnapshotStatus.candidate)
    eid = add_evaluation(database, sid)
    with database.session() as s:
        decision = apply_gate(s, s.get(Snapshot, sid), s.get(Evaluation, eid), actor="system:test")
    assert decision.passed
    html = client.get(f"/dashboard/snapshots/{sid}").text
    gate = html[html.index('id="gate"'):html.index('id="metrics"')]
    for check, threshold, value in (
        ("held-out prompts evaluated", "≥ 20", "40"),
        ("correct gain over the champion is significant", "paired 95% CI lower bound &gt; 0",
         "+0.100, CI [+0.050, +0.150]"),
        ("parse rate (absolute floor)", "not set (opt-in)", "0.900"),
        ("parse_rate change vs the champion", "≥ -0.050", "+0.500"),
        ("mean_reward change vs the champion", "≥ -0.050", "+0.600"),
    ):
        row = gate[gate.index(check):].split("</tr>")[0]
        assert threshold in row and value in row, row
    assert gate.count('class="badge pass"') == 4 and gate.count('class="badge off"') == 3
    assert "recomputed" not in html  # the rows the gate decided with were stored


def test_an_evaluation_without_stored_gate_rows_shows_them_recomputed_and_says_so(
    client, signed_in, candidate, database: Database
):
    sid = candidate()
    add_evaluation(database, sid)
    html = client.get(f"/dashboard/snapshots/{sid}").text
    assert 'id="gate"' in html and "held-out prompts evaluated" in html
    assert "recomputed with the policy&#39;s current gate" in html


def test_metric_names_carry_their_definitions_on_hover(client, signed_in, candidate, database):
    sid = candidate()
    add_evaluation(database, sid)
    html = client.get(f"/dashboard/snapshots/{sid}").text
    for name in ("correct", "parse_rate", "mean_reward", "pass@1", "pass@4"):
        assert f'<abbr title="{escape(metric_help(name))}">{name}</abbr>' in html, name
    # The definitions say how the look-alikes differ.
    assert "FIRST sample" in metric_help("correct") and "ALL k samples" in metric_help("parse_rate")
    assert "first one only" in metric_help("pass@1")


def test_disagreements_name_the_case_and_give_the_outcome_in_words(
    client, signed_in, candidate, database, admin_headers, policy_name
):
    items = _post_clinical_traces(client, admin_headers, policy_name, 3)
    sid = candidate()
    add_evaluation(database, sid, example_id=items[0]["external_id"])
    html = client.get(f"/dashboard/snapshots/{sid}").text
    title = task.case_title(items[0]["metadata"]["case"])
    assert title and escape(title) in html
    assert "pfs_gt_180d: yes" in html
    assert "{&#39;pfs_gt_180d&#39;" not in html and "{'pfs_gt_180d'" not in html


def test_training_section_charts_every_optimizer_step_and_explains_the_data(
    client, signed_in, trained_candidate, policy_name
):
    sid = trained_candidate(used=6, flat=3, steps=24)
    html = client.get(f"/dashboard/snapshots/{sid}").text
    assert ("Trained on 6 rollout groups: one per train trace, each holding the 4 completions "
            f"{policy_name}-v0 generated for that trace") in html
    assert f"{policy_name}-v0 has 9 graded groups in all; 3 had no reward variance" in html
    charts = _section(html, "training-charts")
    svgs = [f"<svg{part.split('</svg>')[0]}</svg>" for part in charts.split("<svg")[1:]]
    assert len(svgs) == 3  # loss, reward, KL
    assert all(_polyline_points(svg) == [24] for svg in svgs)  # one line of 24 steps each
    assert "optimizer step" in charts and "KL(π_ref ‖ πθ)" in charts
    settings = _section(html, "run-settings", "</table>")
    assert "groups per optimizer step" in settings and "steps per round = epochs" in settings
    assert '<details class="json"><summary>Full training config (JSON)</summary>' in html


def test_lineage_is_told_in_words_after_approval(
    client, signed_in, trained_candidate, policy_name
):
    sid = trained_candidate(used=4, flat=0, steps=8)
    client.post(f"/dashboard/snapshots/{sid}/approve",
                data={"comment": "fewer unparseable answers", "csrf_token": signed_in})
    html = client.get(f"/dashboard/snapshots/{sid}").text
    words = _section(html, "lineage-words")
    assert (f"{policy_name}-v1 was trained from {policy_name}-v0&#39;s rollouts of 4 traces "
            "(OAPL, training run") in words
    assert "8 optimizer steps over 2 epochs" in words
    assert re.search(rf"On \d{{4}}-\d\d-\d\d \d\d:\d\d UTC it replaced {policy_name}-v0 "
                     r"after approval by \S+", words), words
    assert "fewer unparseable answers" in words


def test_policy_page_shows_the_settings_that_matter_with_the_json_behind_a_toggle(
    client, signed_in, trained_candidate, policy_name
):
    trained_candidate(used=4, flat=0, steps=12)
    html = client.get(f"/dashboard/policies/{policy_name}").text
    table = _section(html, "settings", "</table>")
    for fragment in ("completions per trace (G)", "temperature", "max tokens", "grader",
                     "epochs", "groups per optimizer step", "learning rate", "primary metric",
                     "significant gain required", "not set (opt-in)"):
        assert fragment in table, fragment
    assert '<details class="json" id="config-json">' in html
    assert "&#34;primary_metric&#34;: &#34;correct&#34;" in html or \
        '"primary_metric": "correct"' in html
    charts = _section(html, "training-charts")
    assert f"→ {policy_name}-v1" in charts  # the run's line, named by what it made
    assert f'<td>{policy_name}-v0</td>' in html  # parents by name, not id


def test_audit_log_shows_outcome_changes_in_words(
    client, signed_in, admin_headers, policy_name
):
    item = _post_clinical_traces(client, admin_headers, policy_name, 1)[0]
    r = client.post("/v1/feedback", headers=admin_headers, json={"outcomes": [{
        "trace_external_id": item["external_id"], "name": "pfs_gt_180d",
        "value": not item["outcome"]["value"]}]})
    assert r.status_code < 300, r.text
    rows = client.get("/dashboard/audit/rows", params={"action": "outcome.set"}).text
    old, new = ("no", "yes") if not item["outcome"]["value"] else ("yes", "no")
    assert f"→ pfs_gt_180d: {old} (" in rows  # the inline label, when the trace came
    assert f"{old} (" in rows and f") → pfs_gt_180d: {new} (" in rows  # the feedback's change
    assert "{&#39;" not in rows and "{'" not in rows


def test_lineage_words_follow_a_snapshot_through_replacement_and_rollback(
    client, signed_in, policy_name, candidate, database
):
    sid = candidate()
    client.post(f"/dashboard/snapshots/{sid}/approve", data={"csrf_token": signed_in})
    client.post(f"/dashboard/policies/{policy_name}/rollback",
                data={"reason": "canary complaints", "csrf_token": signed_in})
    with database.session() as s:
        from sqlalchemy import select

        v0 = s.scalars(select(Snapshot).where(Snapshot.served_name == f"{policy_name}-v0")).one()
        v0_id = v0.id
    html = client.get(f"/dashboard/snapshots/{v0_id}").text
    words = _section(html, "lineage-words")
    assert f"{policy_name}-v0 is the base model of {policy_name}, with no adapter." in words
    assert f"it was replaced by {policy_name}-v1." in words
    assert re.search(rf"it replaced {policy_name}-v1 when \S+ rolled back to it "
                     r"\(canary complaints\)", words), words
    v1 = client.get(f"/dashboard/snapshots/{sid}").text
    v1_words = _section(v1, "lineage-words")
    assert re.search(rf"\S+ rolled back to {policy_name}-v0; it will not serve again without a "
                     "fresh evaluation and approval", v1_words), v1_words
