"""Redaction mode per tenant (mask, hash, off): an admin sets it, ingest and outcomes follow it,
hash tokens link one value across traces of one tenant only, and a retry of the same raw trace
is a duplicate in every mode — also after the mode changed in between."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from typer.testing import CliRunner

from app.cli import cli
from app.db import Database
from app.models import AuditEvent

from ._helpers import assert_problem, trace_body

H = dict[str, str]
NOTE = ("DOB: 03/14/1957, ECOG 1. Reach the daughter at Jane.Doe@example.org or "
        "+44 20 7946 0958; card 4111 1111 1111 1111. Osimertinib 80 mg since 2023-03-14.")
TOKEN = re.compile(r"\[(?P<kind>[A-Z]+):(?P<digest>[0-9a-f]{12})\]")


def set_mode(client: TestClient, headers: H, mode: str) -> None:
    r = client.patch("/v1/tenant", json={"redaction_mode": mode}, headers=headers)
    assert r.status_code == 200, r.text
    assert r.json()["redaction_mode"] == mode


def stored(client: TestClient, headers: H, trace_id: int) -> dict[str, Any]:
    r = client.get(f"/v1/traces/{trace_id}", headers=headers)
    assert r.status_code == 200, r.text
    return dict(r.json())


def tokens(text: str) -> dict[str, str]:
    return {m["kind"]: m.group(0) for m in TOKEN.finditer(text)}


def test_a_tenant_masks_by_default_and_an_admin_changes_its_mode(
    client: TestClient, admin_headers: H, make_key: Callable[..., str], tenant: str,
    database: Database,
) -> None:
    got = client.get("/v1/tenant", headers=admin_headers).json()
    assert got == {"name": tenant, "redaction_mode": "mask", "updated_at": None}
    reader = {"Authorization": f"Bearer {make_key(tenant, 'read')}"}
    assert client.get("/v1/tenant", headers=reader).json()["redaction_mode"] == "mask"
    assert_problem(client.patch("/v1/tenant", json={"redaction_mode": "off"}, headers=reader), 403)
    assert_problem(client.patch("/v1/tenant", json={"redaction_mode": "scramble"},
                                headers=admin_headers), 422)
    set_mode(client, admin_headers, "hash")
    set_mode(client, admin_headers, "off")
    got = client.get("/v1/tenant", headers=reader).json()
    assert got["redaction_mode"] == "off" and got["updated_at"] is not None
    other = {"Authorization": f"Bearer {make_key(tenant + '-other')}"}
    assert client.get("/v1/tenant", headers=other).json()["redaction_mode"] == "mask"
    with database.session() as session:
        changes = session.scalars(select(AuditEvent).where(
            AuditEvent.tenant == tenant, AuditEvent.action == "tenant.update"
        ).order_by(AuditEvent.id)).all()
        assert [(e.before["redaction_mode"], e.after["redaction_mode"]) for e in changes] == [
            ("mask", "hash"), ("hash", "off")]


@pytest.mark.parametrize("mode", ["mask", "hash", "off"])
def test_a_retry_of_the_same_raw_trace_is_a_duplicate_in_every_mode(
    client: TestClient, admin_headers: H, policy_name: str, mode: str
) -> None:
    set_mode(client, admin_headers, mode)
    body = trace_body("retry-1", policy_name, NOTE, metadata={"contact": "Jane.Doe@example.org"},
                      outcome={"name": "note", "value": "call +44 20 7946 0958"})
    first = client.post("/v1/traces", json=body, headers=admin_headers)
    assert first.status_code == 201, first.text
    again = client.post("/v1/traces", json=body, headers=admin_headers)
    assert again.status_code == 200 and again.json()["status"] == "duplicate", again.text
    assert again.json()["id"] == first.json()["id"]
    got = stored(client, admin_headers, first.json()["id"])
    text = got["messages"][0]["content"]
    outcome = got["outcomes"][0]["value"]
    assert "ECOG 1" in text and "80 mg since 2023-03-14" in text
    if mode == "off":
        assert text == NOTE and got["metadata"] == {"contact": "Jane.Doe@example.org"}
        assert outcome == "call +44 20 7946 0958" and got["redactions"] == {"disabled": True}
        return
    for secret in ("03/14/1957", "Jane.Doe", "7946 0958", "4111 1111"):
        assert secret not in text and secret not in str(got["metadata"]) and secret not in outcome
    if mode == "mask":
        assert "[EMAIL]" in text and "[CARD]" in text and got["metadata"]["contact"] == "[EMAIL]"
        assert outcome == "call [PHONE]" and not TOKEN.search(text)
    else:
        assert set(tokens(text)) == {"DOB", "EMAIL", "PHONE", "CARD"}
        assert got["metadata"]["contact"] == tokens(text)["EMAIL"]
        assert outcome == f"call {tokens(text)['PHONE']}"
        assert got["redactions"]["mode"] == "hash"
    assert got["redactions"]["EMAIL"] == 2  # the message and the metadata


def test_hash_tokens_link_one_value_across_traces_and_layouts_within_one_tenant_only(
    client: TestClient, admin_headers: H, policy_name: str, make_key: Callable[..., str],
    tenant: str,
) -> None:
    set_mode(client, admin_headers, "hash")
    a = client.post("/v1/traces", json=trace_body(
        "h-1", policy_name, "card 4111 1111 1111 1111, mail Jane.Doe@example.org"),
        headers=admin_headers).json()["id"]
    b = client.post("/v1/traces", json=trace_body(
        "h-2", policy_name, "4111-1111-1111-1111 / jane.doe@example.org / john@example.org"),
        headers=admin_headers).json()["id"]
    ta = tokens(stored(client, admin_headers, a)["messages"][0]["content"])
    text_b = stored(client, admin_headers, b)["messages"][0]["content"]
    assert ta["CARD"] in text_b and ta["EMAIL"] in text_b
    assert len(set(TOKEN.findall(text_b))) == 3  # john's address is another token
    fb = {"outcomes": [{"trace_id": b, "name": "review", "value": "mail jane.doe@example.org"}]}
    assert client.post("/v1/feedback", json=fb, headers=admin_headers).status_code == 207
    assert stored(client, admin_headers, b)["outcomes"][0]["value"] == f"mail {ta['EMAIL']}"

    other_tenant = tenant + "-b"
    other = {"Authorization": f"Bearer {make_key(other_tenant)}"}
    other_policy = policy_name + "-b"
    assert client.post("/v1/policies", json={"name": other_policy},
                       headers=other).status_code == 201
    set_mode(client, other, "hash")
    c = client.post("/v1/traces", json=trace_body(
        "h-1", other_policy, "card 4111 1111 1111 1111, mail Jane.Doe@example.org"),
        headers=other).json()["id"]
    tc = tokens(stored(client, other, c)["messages"][0]["content"])
    assert set(tc) == {"CARD", "EMAIL"} and not set(tc.values()) & set(ta.values())


def test_a_retry_after_the_mode_changed_is_still_a_duplicate_and_changes_nothing(
    client: TestClient, admin_headers: H, policy_name: str
) -> None:
    body = trace_body("switch-1", policy_name, NOTE)
    first = client.post("/v1/traces", json=body, headers=admin_headers)
    assert first.status_code == 201
    before = stored(client, admin_headers, first.json()["id"])
    for mode in ("hash", "off", "mask"):
        set_mode(client, admin_headers, mode)
        again = client.post("/v1/traces", json=body, headers=admin_headers)
        assert again.status_code == 200 and again.json()["status"] == "duplicate", mode
    assert stored(client, admin_headers, first.json()["id"]) == before


@pytest.mark.parametrize(("mode", "refused"), [("mask", True), ("hash", True), ("off", False)])
def test_an_external_id_holding_pii_is_refused_unless_redaction_is_off(
    client: TestClient, admin_headers: H, policy_name: str, mode: str, refused: bool
) -> None:
    set_mode(client, admin_headers, mode)
    r = client.post("/v1/traces", json=trace_body("user-jane.doe@example.org", policy_name),
                    headers=admin_headers)
    if refused:
        assert assert_problem(r, 422)["type"].endswith("/pii-in-external-id")
    else:
        assert r.status_code == 201, r.text


def test_the_cli_sets_a_tenants_mode_and_ingest_follows_it(
    client: TestClient, admin_headers: H, policy_name: str, tenant: str
) -> None:
    result = CliRunner().invoke(cli, ["tenants", "set", "--tenant", tenant,
                                      "--redaction-mode", "hash"])
    assert result.exit_code == 0, result.output
    assert client.get("/v1/tenant", headers=admin_headers).json()["redaction_mode"] == "hash"
    shown = CliRunner().invoke(cli, ["tenants", "show", "--tenant", tenant])
    assert "redaction_mode hash" in shown.output
    tid = client.post("/v1/traces", json=trace_body("cli-1", policy_name, "mail a@example.org"),
                      headers=admin_headers).json()["id"]
    assert set(tokens(stored(client, admin_headers, tid)["messages"][0]["content"])) == {"EMAIL"}
    bad = CliRunner().invoke(cli, ["tenants", "set", "--tenant", tenant, "--redaction-mode", "x"])
    assert bad.exit_code != 0


def test_tracelearn_settings_masks_the_pii_hash_secret(settings: Any) -> None:
    settings.pii_hash_secret = "very-secret-pii-key"
    result = CliRunner().invoke(cli, ["settings"])
    assert result.exit_code == 0, result.output
    assert "very-secret-pii-key" not in result.output and '"pii_hash_secret": "***"' in result.output
