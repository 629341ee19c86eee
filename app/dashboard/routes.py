"""The ops dashboard: server-rendered pages under ``/dashboard``, enhanced by HTMX.

Sign-in takes an admin API key and turns it into a signed session cookie; pages need that
session (not a bearer key) and every form carries the session's CSRF token. Actions call the same
services as the API (``app.snapshots.service``), so the dashboard and the API cannot disagree.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Depends, FastAPI, Form, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from sqlalchemy.orm import Session

from app.auth.service import Principal, Scope, authenticate
from app.dashboard import service, words
from app.dashboard.session import (
    COOKIE,
    COOKIE_PATH,
    CSRF_FIELD,
    CSRF_HEADER,
    LOGIN_CSRF_COOKIE,
    check_login_token,
    new_login_token,
    new_session,
    read_session,
)
from app.db import first_statement
from app.dependencies import SessionDep
from app.errors import Conflict, DomainError, Forbidden, InvalidInput
from app.models import ApiKey
from app.settings import get_settings
from app.snapshots import service as snapshots
from app.snapshots.schemas import ApproveIn, EvaluateIn, RejectIn, RollbackIn

PREFIX = "/dashboard"
HERE = Path(__file__).parent
templates = Jinja2Templates(directory=str(HERE / "templates"))
templates.env.filters["age"] = service.age
templates.env.filters["pct"] = lambda v: "—" if v is None else f"{float(v):.1%}"
templates.env.filters["num"] = lambda v: "—" if v is None else f"{float(v):.3f}"
templates.env.filters["change"] = words.audit_change

router = APIRouter(prefix=PREFIX, include_in_schema=False)


class LoginRequired(Exception):
    """No valid dashboard session: answered with a redirect to the sign-in page."""


class DashboardUser:
    def __init__(self, principal: Principal, csrf: str) -> None:
        self.principal = principal
        self.csrf = csrf


def current_user(
    request: Request, session: SessionDep
) -> DashboardUser:
    settings = get_settings()
    data = read_session(settings.session_secret, request.cookies.get(COOKIE))
    if data is None:
        raise LoginRequired()
    # The request's first statement: retried once on a pooled connection that died with a
    # database restart, as the API's first statement is.
    key = first_statement(session, lambda: session.get(ApiKey, data.key_id))
    # The key is re-checked on every page, so revoking it (or its admin scope) logs out at once.
    if key is None or key.revoked_at is not None or Scope.admin.value not in key.scopes:
        raise LoginRequired()
    principal = Principal(
        key_id=key.id, tenant=key.tenant, scopes=frozenset(Scope(s) for s in key.scopes),
        name=key.name,
    )
    return DashboardUser(principal, data.csrf)


async def csrf_user(request: Request, user: DashboardUser = Depends(current_user)) -> DashboardUser:
    """``current_user`` for state-changing requests: the CSRF token must match the session's."""
    token = request.headers.get(CSRF_HEADER)
    if token is None:
        form = await request.form()
        value = form.get(CSRF_FIELD)
        token = value if isinstance(value, str) else None
    import hmac

    if not token or not hmac.compare_digest(token, user.csrf):
        raise Forbidden("missing or invalid CSRF token; reload the page and try again")
    return user


def _render(request: Request, name: str, user: DashboardUser | None, **ctx: Any) -> HTMLResponse:
    ctx |= {
        "user": user,
        "csrf": user.csrf if user else "",
        "msg": request.query_params.get("msg"),
        "error": request.query_params.get("error"),
        "prefix": PREFIX,
    }
    return templates.TemplateResponse(request, name, ctx)


def _back(path: str, *, msg: str | None = None, error: str | None = None) -> RedirectResponse:
    query = {k: v for k, v in (("msg", msg), ("error", error)) if v}
    url = PREFIX + path + (("?" + urlencode(query)) if query else "")
    return RedirectResponse(url, status_code=303)


def _act(page: str, action: Callable[[], str]) -> RedirectResponse:
    """Run a dashboard action and go back to ``page`` with its message, or with the reason a
    domain error gave."""
    try:
        return _back(page, msg=action())
    except DomainError as exc:
        return _back(page, error=exc.detail)


def _secure(request: Request) -> bool:
    return request.url.scheme == "https" or get_settings().environment == "production"


# --- sign-in ---------------------------------------------------------------------------------


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request) -> Response:
    token = new_login_token(get_settings().session_secret)
    response = _render(request, "login.html", None, login_csrf=token,
                       next=request.query_params.get("next", PREFIX))
    response.set_cookie(LOGIN_CSRF_COOKIE, token, max_age=1800, path=COOKIE_PATH, httponly=True,
                        samesite="strict", secure=_secure(request))
    return response


@router.post("/login")
def login(
    session: SessionDep,
    request: Request,
    api_key: str = Form(default=""),
    csrf_token: str = Form(default=""),
    next: str = Form(default=PREFIX),
) -> Response:
    settings = get_settings()
    if not check_login_token(settings.session_secret, request.cookies.get(LOGIN_CSRF_COOKIE),
                             csrf_token):
        return _back("/login", error="The sign-in form expired; try again.")
    principal = authenticate(session, api_key.strip())
    if principal is None or Scope.admin not in principal.scopes:
        return _back("/login", error="That key is unknown, revoked or lacks the admin scope.")
    token, _ = new_session(settings.session_secret, principal.key_id, settings.session_max_age_s)
    # Only local paths: an open redirect after sign-in would be a phishing aid.
    target = next if next.startswith(PREFIX) and "//" not in next else PREFIX
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(COOKIE, token, max_age=settings.session_max_age_s, path=COOKIE_PATH,
                        httponly=True, samesite="lax", secure=_secure(request))
    response.delete_cookie(LOGIN_CSRF_COOKIE, path=COOKIE_PATH)
    return response


@router.post("/logout")
def logout() -> Response:
    # No session needed to log out; clearing a cookie cannot hurt anyone.
    response = RedirectResponse(PREFIX + "/login?msg=" + quote("Signed out."), status_code=303)
    response.delete_cookie(COOKIE, path=COOKIE_PATH)
    return response


# --- pages -----------------------------------------------------------------------------------


@router.get("", response_class=HTMLResponse)
def overview(
    session: SessionDep,
    request: Request,
    user: DashboardUser = Depends(current_user),
) -> Response:
    rows = service.policy_rows(session, user.principal.tenant)
    return _render(request, "overview.html", user, rows=rows)


@router.get("/policies/{name}", response_class=HTMLResponse)
def policy_page(
    session: SessionDep,
    request: Request,
    name: str,
    user: DashboardUser = Depends(current_user),
) -> Response:
    page = service.policy_page(session, user.principal.tenant, name)
    return _render(request, "policy.html", user, page=page)


@router.get("/snapshots/{snapshot_id}", response_class=HTMLResponse)
def snapshot_page(
    session: SessionDep,
    request: Request,
    snapshot_id: int,
    user: DashboardUser = Depends(current_user),
) -> Response:
    page = service.snapshot_page(session, user.principal.tenant, snapshot_id)
    return _render(request, "snapshot.html", user, page=page)


def _audit_filters(request: Request) -> dict[str, str]:
    keys = ("action", "entity_type", "entity_id", "actor")
    return {k: request.query_params.get(k, "").strip() for k in keys}


def _audit_page(request: Request, user: DashboardUser, session: Session) -> Any:
    filters = _audit_filters(request)
    cursor = request.query_params.get("cursor")
    return snapshots.list_audit_events(
        session, user.principal.tenant, cursor=int(cursor) if cursor and cursor.isdigit() else None,
        limit=50, **{k: v or None for k, v in filters.items()},  # type: ignore[arg-type]
    ), filters


@router.get("/audit", response_class=HTMLResponse)
def audit_page(
    session: SessionDep,
    request: Request,
    user: DashboardUser = Depends(current_user),
) -> Response:
    page, filters = _audit_page(request, user, session)
    return _render(request, "audit.html", user, page=page, filters=filters,
                   query=urlencode({k: v for k, v in filters.items() if v}))


@router.get("/audit/rows", response_class=HTMLResponse)
def audit_rows(
    session: SessionDep,
    request: Request,
    user: DashboardUser = Depends(current_user),
) -> Response:
    """The audit table body alone: what the HTMX filter form swaps in."""
    page, filters = _audit_page(request, user, session)
    return _render(request, "_audit_rows.html", user, page=page, filters=filters,
                   query=urlencode({k: v for k, v in filters.items() if v}))


# --- actions ---------------------------------------------------------------------------------


@router.post("/snapshots/{snapshot_id}/approve")
def approve(
    session: SessionDep,
    snapshot_id: int,
    comment: str = Form(default=""),
    user: DashboardUser = Depends(csrf_user),
) -> Response:
    def action() -> str:
        result = snapshots.approve(session, user.principal, snapshot_id,
                                   ApproveIn(comment=comment.strip() or None), get_settings())
        if not result.ok:
            raise Conflict(f"Promotion failed: {result.reason}")
        return "Approved and now serving."

    return _act(f"/snapshots/{snapshot_id}", action)


@router.post("/snapshots/{snapshot_id}/reject")
def reject(
    session: SessionDep,
    snapshot_id: int,
    comment: str = Form(default=""),
    user: DashboardUser = Depends(csrf_user),
) -> Response:
    def action() -> str:
        if not comment.strip():
            raise InvalidInput("A rejection needs a comment.")
        snapshots.reject(session, user.principal, snapshot_id, RejectIn(comment=comment.strip()))
        return "Rejected."

    return _act(f"/snapshots/{snapshot_id}", action)


@router.post("/snapshots/{snapshot_id}/evaluate")
def evaluate(
    session: SessionDep,
    snapshot_id: int,
    breakdown_key: str = Form(default=""),
    user: DashboardUser = Depends(csrf_user),
) -> Response:
    def action() -> str:
        job = snapshots.evaluate(session, user.principal, snapshot_id,
                                 EvaluateIn(breakdown_key=breakdown_key.strip() or None))
        return f"Evaluation queued (job {job.job_id}); this page shows the verdict when it lands."

    return _act(f"/snapshots/{snapshot_id}", action)


@router.post("/policies/{name}/rollback")
def rollback(
    session: SessionDep,
    name: str,
    reason: str = Form(default=""),
    user: DashboardUser = Depends(csrf_user),
) -> Response:
    def action() -> str:
        result = snapshots.rollback_policy(session, user.principal, name,
                                           RollbackIn(reason=reason.strip() or None),
                                           get_settings())
        serving = snapshots.get_snapshot(session, user.principal.tenant, result.snapshot_id)
        return f"Rolled back: {serving.served_name} serves {name} again."

    return _act(f"/policies/{name}", action)


# --- wiring ----------------------------------------------------------------------------------


def install_dashboard(app: FastAPI) -> None:
    """Mount the dashboard on ``app``: pages, static files, and the sign-in redirect."""
    app.include_router(router)
    app.mount(PREFIX + "/static", StaticFiles(directory=str(HERE / "static")),
              name="dashboard-static")

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> FileResponse:
        return FileResponse(HERE / "static" / "favicon.svg", media_type="image/svg+xml")

    async def _login_required(request: Request, exc: Exception) -> Response:
        target = PREFIX + "/login?" + urlencode({"next": request.url.path})
        if request.headers.get("hx-request"):
            # HTMX follows HX-Redirect with a full page load instead of swapping the login form
            # into a fragment.
            return Response(status_code=401, headers={"HX-Redirect": target})
        return RedirectResponse(target, status_code=303)

    app.add_exception_handler(LoginRequired, _login_required)
