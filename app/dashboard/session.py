"""Dashboard sessions: a signed, expiring cookie that names an admin API key.

The cookie holds ``{key_id, csrf, exp}`` as base64 JSON plus an HMAC-SHA256 over it with
``settings.session_secret``; nothing secret is in it and it cannot be forged or extended without
the secret. The key itself is re-checked on every request, so revoking the key ends its sessions
at once. Every form carries the session's CSRF token (HTMX sends it as a header).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

COOKIE = "tl_dashboard"
LOGIN_CSRF_COOKIE = "tl_login_csrf"
COOKIE_PATH = "/dashboard"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"


@dataclass(frozen=True)
class SessionData:
    key_id: int
    csrf: str
    exp: int


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(secret: str, payload: str, purpose: str) -> str:
    # The purpose is part of the MAC so a login-CSRF token can never pass as a session.
    return _b64(hmac.new(secret.encode(), f"{purpose}\0{payload}".encode(), hashlib.sha256).digest())


def sign(secret: str, data: dict[str, Any], purpose: str = "session") -> str:
    payload = _b64(json.dumps(data, separators=(",", ":"), sort_keys=True).encode())
    return f"{payload}.{_mac(secret, payload, purpose)}"


def unsign(secret: str, token: str | None, purpose: str = "session") -> dict[str, Any] | None:
    """The signed data, or None when the token is missing, tampered with or expired."""
    if not token or token.count(".") != 1:
        return None
    payload, mac = token.split(".")
    if not hmac.compare_digest(mac, _mac(secret, payload, purpose)):
        return None
    try:
        data = json.loads(_unb64(payload))
    except (ValueError, json.JSONDecodeError):
        return None
    if not isinstance(data, dict) or int(data.get("exp", 0)) < time.time():
        return None
    return data


def new_session(secret: str, key_id: int, max_age_s: int) -> tuple[str, SessionData]:
    data = SessionData(key_id=key_id, csrf=secrets.token_urlsafe(24),
                       exp=int(time.time()) + max_age_s)
    return sign(secret, {"key_id": data.key_id, "csrf": data.csrf, "exp": data.exp}), data


def read_session(secret: str, token: str | None) -> SessionData | None:
    data = unsign(secret, token)
    if data is None:
        return None
    try:
        return SessionData(key_id=int(data["key_id"]), csrf=str(data["csrf"]),
                           exp=int(data["exp"]))
    except (KeyError, TypeError, ValueError):
        return None


def new_login_token(secret: str, ttl_s: int = 1800) -> str:
    return sign(secret, {"n": secrets.token_urlsafe(16), "exp": int(time.time()) + ttl_s},
                purpose="login")


def check_login_token(secret: str, cookie: str | None, form_value: str | None) -> bool:
    """Double submit: the form's token must equal the cookie's, and the cookie must be ours."""
    if not cookie or not form_value or not hmac.compare_digest(cookie, form_value):
        return False
    return unsign(secret, cookie, purpose="login") is not None
