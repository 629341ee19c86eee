from __future__ import annotations

from pathlib import Path

from app.settings import Settings

README = Path(__file__).resolve().parents[3] / "README.md"


def test_every_setting_is_documented_in_the_readme():
    text = README.read_text()
    for name, field in Settings.model_fields.items():
        assert field.description, f"setting {name} has no description"
        assert f"`TRACELEARN_{name.upper()}`" in text, f"README lacks TRACELEARN_{name.upper()}"


def test_readme_opens_with_the_two_commands():
    blocks = README.read_text().split("```bash\n")[1:3]
    assert "tracelearn up" in blocks[0]
    # The lock is the source of truth for what gets installed, here as in CI and Docker.
    assert "--require-hashes -r requirements/lock-runtime.txt" in blocks[0]
    assert "--no-deps" in blocks[0]
    assert "bash .ci/run" in blocks[1]


def test_api_docs_and_their_assets_are_served_locally(client):
    for page, asset in (("/docs", "/docs/static/swagger-ui-bundle.js"),
                        ("/redoc", "/docs/static/redoc.standalone.js")):
        html = client.get(page)
        assert html.status_code == 200 and asset in html.text
        assert "cdn.jsdelivr.net" not in html.text and "fonts.googleapis" not in html.text
        js = client.get(asset)
        assert js.status_code == 200 and len(js.content) > 100_000
    assert client.get("/favicon.ico").headers["content-type"].startswith("image/svg+xml")
