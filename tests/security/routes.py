"""The app's route table, read generically so a new route is checked the day it is added."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from fastapi.dependencies.models import Dependant
from starlette.routing import Mount

try:  # FastAPI ≥ 0.16x keeps included routers lazily; this flattens them as OpenAPI does.
    from fastapi.routing import iter_route_contexts
except ImportError:  # pragma: no cover - older FastAPI flattens routes at include time

    def iter_route_contexts(routes: Any) -> Any:  # type: ignore[misc]
        return iter(routes)

from app.auth.service import Scope

# Routes that answer without a key by design: probes, metrics and the API's own documentation.
PUBLIC_PATHS = frozenset(
    {"/healthz", "/readyz", "/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc",
     "/favicon.ico"}
)
DASHBOARD_PREFIX = "/dashboard"
# Dashboard pages a visitor without a session must be able to reach (to log in).
DASHBOARD_PUBLIC = re.compile(r"^/dashboard/(login|logout|static|healthz)(/|$)")
MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})


@dataclass(frozen=True)
class Operation:
    method: str
    path: str  # template, e.g. /v1/traces/{trace_id}
    route: Any  # the route (or FastAPI's route context): .dependant, .param_convertors
    params: dict[str, str]  # path parameter -> "integer" | "string"

    def url(self, values: dict[str, Any] | None = None) -> str:
        values = values or {}
        out = self.path
        for name, kind in self.params.items():
            default = "1" if kind == "integer" else "x"
            out = out.replace("{" + name + "}", str(values.get(name, default)))
        return out

    @property
    def required_scope(self) -> Scope | None:
        dependant = getattr(self.route, "dependant", None)
        if dependant is None:
            return None
        for dep in walk(dependant):
            scope = getattr(dep.call, "required_scope", None)
            if scope is not None:
                return Scope(scope)
        return None

    @property
    def is_public(self) -> bool:
        return self.path in PUBLIC_PATHS or bool(DASHBOARD_PUBLIC.match(self.path))

    @property
    def is_dashboard(self) -> bool:
        return self.path == DASHBOARD_PREFIX or self.path.startswith(DASHBOARD_PREFIX + "/")


def walk(dependant: Dependant) -> Iterator[Dependant]:
    for dep in dependant.dependencies:
        yield dep
        yield from walk(dep)


def _params_from_route(route: Any) -> dict[str, str]:
    return {
        name: "integer" if type(conv).__name__ == "IntegerConvertor" else "string"
        for name, conv in (getattr(route, "param_convertors", None) or {}).items()
    }


def operations(app: FastAPI) -> list[Operation]:
    """Every (method, path) the app answers: the OpenAPI paths, plus routes hidden from the schema
    (include_in_schema=False, plain Starlette routes such as dashboard pages)."""
    routes: dict[tuple[str, str], Any] = {}
    for r in iter_route_contexts(app.routes):
        if isinstance(r, Mount) or getattr(r, "path", None) is None:
            continue
        for m in getattr(r, "methods", None) or ():
            routes[(m, r.path)] = r
    ops: dict[tuple[str, str], Operation] = {}
    for path, item in app.openapi()["paths"].items():
        for method, spec in item.items():
            if method.startswith("x-") or method == "parameters":
                continue
            params = {
                p["name"]: p.get("schema", {}).get("type", "string")
                for p in spec.get("parameters", [])
                if p.get("in") == "path"
            }
            key = (method.upper(), path)
            ops[key] = Operation(method.upper(), path, routes.get(key), params)
    for (method, path), r in routes.items():
        if method == "HEAD" or (method, path) in ops:
            continue
        ops[(method, path)] = Operation(method, path, r, _params_from_route(r))
    for r in app.routes:
        if isinstance(r, Mount) and r.path.startswith("/v1"):
            # A mounted sub-app under the API would escape every check here: refuse it.
            raise AssertionError(f"mounted app at {r.path} is not covered by the route checks")
    return sorted(ops.values(), key=lambda o: (o.path, o.method))


def api_operations(app: FastAPI) -> list[Operation]:
    return [o for o in operations(app) if not o.is_public and not o.is_dashboard]
