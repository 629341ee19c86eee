"""API keys: created once and shown once, stored only as a SHA-256 hash.

A key looks like ``tl_<prefix>_<secret>``; the prefix is stored in clear to find the row without
scanning, the whole key is hashed for the comparison. Keys are cached per process by prefix
(``app.cache``): a create, revoke or scope change reaches every process on its next request.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.cache import GenerationCache
from app.db import utcnow
from app.errors import InvalidInput, NotFound
from app.models import ApiKey


class Scope(enum.StrEnum):
    ingest = "ingest"
    read = "read"
    admin = "admin"


@dataclass(frozen=True)
class Principal:
    """Who is calling: the tenant whose data they may touch and what they may do."""

    key_id: int
    tenant: str
    scopes: frozenset[Scope]
    name: str

    def holds(self, scope: Scope) -> bool:
        """Whether this key may use what needs ``scope`` (admin holds every scope)."""
        return scope in self.scopes or Scope.admin in self.scopes

    @property
    def actor(self) -> str:
        return f"key:{self.key_id}:{self.name}" if self.name else f"key:{self.key_id}"


@dataclass(frozen=True)
class CreatedKey:
    id: int
    tenant: str
    scopes: list[str]
    secret: str


def hash_key(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


def parse_scopes(scopes: list[str] | str) -> list[Scope]:
    items = [s.strip() for s in scopes.split(",")] if isinstance(scopes, str) else scopes
    out: list[Scope] = []
    for item in items:
        if not item:
            continue
        try:
            out.append(Scope(item))
        except ValueError as exc:
            allowed = ", ".join(s.value for s in Scope)
            raise InvalidInput(f"unknown scope {item!r}; allowed: {allowed}") from exc
    if not out:
        raise InvalidInput("at least one scope is required")
    return sorted(set(out))


def create_key(session: Session, tenant: str, scopes: list[str] | str, name: str = "") -> CreatedKey:
    tenant = tenant.strip()
    if not tenant or len(tenant) > 128:
        raise InvalidInput("tenant must be 1..128 characters")
    parsed = parse_scopes(scopes)
    prefix = secrets.token_hex(6)
    raw = f"tl_{prefix}_{secrets.token_urlsafe(32)}"
    row = ApiKey(
        tenant=tenant, name=name, prefix=prefix, key_hash=hash_key(raw),
        scopes=[s.value for s in parsed],
    )
    session.add(row)
    session.flush()
    return CreatedKey(id=row.id, tenant=tenant, scopes=row.scopes, secret=raw)


@dataclass(frozen=True)
class _LiveKey:
    key_hash: str
    principal: Principal


_live_keys: GenerationCache[str, _LiveKey] = GenerationCache("api_keys")


def _load_live_keys(session: Session, prefixes: set[str]) -> dict[str, _LiveKey]:
    rows = session.scalars(
        select(ApiKey).where(ApiKey.prefix.in_(prefixes), ApiKey.revoked_at.is_(None))
    )
    return {
        row.prefix: _LiveKey(row.key_hash, Principal(
            key_id=row.id, tenant=row.tenant, scopes=frozenset(Scope(s) for s in row.scopes),
            name=row.name,
        ))
        for row in rows
    }


def authenticate(session: Session, raw: str) -> Principal | None:
    """The principal for a presented key, or None when it is unknown, malformed or revoked."""
    parts = raw.split("_", 2)
    if len(parts) != 3 or parts[0] != "tl":
        return None
    prefix = parts[1]
    live = _live_keys.get_many(
        session, [prefix], lambda missing: _load_live_keys(session, missing)
    ).get(prefix)
    if live is None or not hmac.compare_digest(live.key_hash, hash_key(raw)):
        return None
    return live.principal


def list_keys(session: Session, tenant: str | None = None) -> list[ApiKey]:
    q = select(ApiKey).order_by(ApiKey.id)
    if tenant:
        q = q.where(ApiKey.tenant == tenant)
    return list(session.scalars(q))


def revoke_key(session: Session, key_id: int, at: datetime | None = None) -> ApiKey:
    row = session.get(ApiKey, key_id)
    if row is None:
        raise NotFound(f"no API key with id {key_id}")
    if row.revoked_at is None:
        row.revoked_at = at or utcnow()
    return row
