"""The dashboard over HTTP: sessions, CSRF, pages rendered from stored numbers, actions."""

from __future__ import annotations

import time

from app.dashboard.session import COOKIE, sign
from app.db import Database
from tests.support.dashboard import csrf_from, sign_in
from tests.support.seeding import add_evaluation


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
