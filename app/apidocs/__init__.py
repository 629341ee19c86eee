"""The API's own documentation pages, /docs (Swagger UI) and /redoc, served with their assets
from this package (swagger-ui-dist 5.35.0 and redoc 2.5.4, licences alongside): the pages work
on a machine with no internet, where FastAPI's defaults load them from a CDN and stay blank."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from pydantic import TypeAdapter

STATIC = Path(__file__).resolve().parent / "static"
ASSETS = "/docs/static"


def install_docs(app: FastAPI) -> None:
    """Mount /docs, /docs/oauth2-redirect and /redoc on an app created with ``docs_url=None``
    and ``redoc_url=None``."""
    app.mount(ASSETS, StaticFiles(directory=str(STATIC)), name="docs-static")
    title = f"{app.title} API"

    @app.get("/docs", include_in_schema=False)
    def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=str(app.openapi_url), title=title,
            oauth2_redirect_url="/docs/oauth2-redirect",
            swagger_js_url=f"{ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS}/swagger-ui.css",
            swagger_favicon_url="/favicon.ico",
        )

    @app.get("/docs/oauth2-redirect", include_in_schema=False)
    def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    def redoc() -> HTMLResponse:
        return get_redoc_html(openapi_url=str(app.openapi_url), title=title,
                              redoc_js_url=f"{ASSETS}/redoc.standalone.js",
                              redoc_favicon_url="/favicon.ico", with_google_fonts=False)


def request_body(annotation: Any) -> dict[str, Any]:
    """``openapi_extra`` documenting the JSON body of a route that reads and parses its body
    itself (the ingest route, for speed), as FastAPI documents a declared one. The schema is
    inlined: the models are then not among the document's components, so nothing could point
    there."""
    schema = TypeAdapter(annotation).json_schema(ref_template="#/$defs/{model}")
    defs = schema.pop("$defs", {})
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": _inline(schema, defs, ())}}}}


def _inline(value: Any, defs: dict[str, Any], seen: tuple[str, ...]) -> Any:
    if isinstance(value, dict):
        ref = value.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            name = ref.removeprefix("#/$defs/")
            if name in seen:
                raise ValueError(f"recursive schema {name} cannot be inlined")
            return _inline(defs[name], defs, (*seen, name))
        return {key: _inline(item, defs, seen) for key, item in value.items()}
    if isinstance(value, list):
        return [_inline(item, defs, seen) for item in value]
    return value
