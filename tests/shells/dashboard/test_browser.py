"""The dashboard in a real Chromium: sign in, open a candidate, approve it, watch the serving
snapshot change, roll back. Screenshots land in test-artifacts/dashboard/."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.conftest import IN_CI, bearer
from tests.support.seeding import add_evaluation

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[3] / "test-artifacts" / "dashboard"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]

pytestmark = [
    pytest.mark.browser,
    # .ci/run installs it, so CI runs (and fails) instead of skipping.
    pytest.mark.skipif(not CHROMIUM.exists() and not IN_CI,
                       reason="Debian's chromium is not installed"),
]


@pytest.fixture
def db_url(pg_url: str) -> str:
    """One run is enough for a browser walk-through: on Postgres, the production database."""
    return pg_url


def test_sign_in_approve_and_roll_back_in_the_browser(
    live_server, make_key, tenant, database, candidate_factory
):
    from playwright.sync_api import expect, sync_playwright

    key = make_key(tenant, "ingest,read,admin")
    name = "onc-browser"
    r = httpx.post(f"{live_server.url}/v1/policies", json={"name": name}, headers=bearer(key))
    assert r.status_code == 201, r.text
    sid = candidate_factory(name)
    add_evaluation(database, sid)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("dialog", lambda d: d.accept())  # hx-confirm asks before approve/rollback
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))

            page.goto(f"{live_server.url}/dashboard")
            expect(page).to_have_url(f"{live_server.url}/dashboard/login?next=%2Fdashboard")
            page.fill("#api_key", key)
            page.click("#sign-in")
            expect(page.locator("#policies")).to_contain_text(f"{name}-v0")
            page.screenshot(path=str(ARTIFACTS / "01-overview.png"), full_page=True)

            page.click("text=v1 · awaiting_approval")
            expect(page.locator("#snapshot-status")).to_have_text("awaiting_approval")
            expect(page.locator("#metrics")).to_contain_text("pass@1")
            page.screenshot(path=str(ARTIFACTS / "02-candidate.png"), full_page=True)

            page.fill("input[name=comment] >> nth=0", "better contract adherence")
            page.click("#approve")
            expect(page.locator(".flash.ok")).to_contain_text("Approved and now serving")
            expect(page.locator("#policy-serving")).to_have_text(f"{name}-v1")
            expect(page.locator("#snapshot-status")).to_have_text("serving")
            page.screenshot(path=str(ARTIFACTS / "03-approved.png"), full_page=True)

            page.click(f"a:has-text('{name}')")
            expect(page.locator("#serving-snapshot")).to_have_text(f"{name}-v1")
            page.fill("input[name=reason]", "canary complaints")
            page.click("#rollback")
            expect(page.locator(".flash.ok")).to_contain_text("Rolled back")
            expect(page.locator("#serving-snapshot")).to_have_text(f"{name}-v0")
            page.screenshot(path=str(ARTIFACTS / "04-rolled-back.png"), full_page=True)

            page.click("text=Audit log")
            page.fill("input[name=action]", "policy.*")
            page.click("#filter")
            expect(page.locator("#audit-rows")).to_contain_text("policy.serving_changed")
            expect(page.locator("#audit-rows")).not_to_contain_text("snapshot.approved")
            page.screenshot(path=str(ARTIFACTS / "05-audit.png"), full_page=True)

            page.click("#logout")
            expect(page.locator(".flash.ok")).to_have_text("Signed out.")
            assert "/dashboard/login" in page.url
            assert errors == []
        finally:
            browser.close()

    api = httpx.get(f"{live_server.url}/v1/policies/{name}", headers=bearer(key)).json()
    assert api["serving_snapshot"] == f"{name}-v0"
