"""Screenshots of the dashboard's candidate and policy pages after a real demo round.

    PYTHONPATH=. python docs/screenshots/take.py [--model DIR] [--traces N] [--rounds R]

Runs ``tracelearn demo``'s service R times on a fresh SQLite data dir (each posts new synthetic
clinical traces, regenerates, grades, trains one round, evaluates, gates), then opens the dashboard in Chromium
(/usr/bin/chromium, through Playwright) and writes candidate.png (the last round's) and policy.png next to this file.
Without --model it uses the small test model the test suite builds (fast, weak answers).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from PIL import Image
from playwright.sync_api import sync_playwright

from app.auth.service import create_key
from app.cli.serve import local_api
from app.db import session_scope
from app.demo.service import run_demo
from app.settings import Settings, get_settings
from tests.support.seeding import build_model

HERE = Path(__file__).resolve().parent
CHROMIUM = "/usr/bin/chromium"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--traces", type=int, default=160)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    model = args.model or build_model(get_settings().model_cache)
    data = Path(tempfile.mkdtemp(prefix="tl-shots-"))
    settings = Settings(data_dir=data, base_model_dir=model, environment="test",
                        task_always_eager=True, log_level="WARNING")
    # Two rounds on fresh traces, so the policy page has a line per run.
    for seed in range(args.rounds):
        result = run_demo(settings, serve=local_api, n_traces=args.traces, group_size=4,
                          max_tokens=48, eval_k=4, seed=seed, say=print,
                          progress=lambda stage, done, total: None)
        print(result.served_name, result.status, result.status_reason, result.error)
        assert result.snapshot_id is not None, result.error
    with session_scope() as session:
        key = create_key(session, "demo", "ingest,read,admin", name="screenshots").secret
    with local_api(settings) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto(f"{url}/dashboard/login")
        page.fill("#api_key", key)
        page.click("#sign-in")
        page.wait_for_selector("#policies")
        page.goto(f"{url}/dashboard/snapshots/{result.snapshot_id}")
        page.screenshot(path=str(HERE / "candidate.png"), full_page=True)
        page.goto(f"{url}/dashboard/policies/{result.policy}")
        page.screenshot(path=str(HERE / "policy.png"), full_page=True)
        browser.close()
    for name in ("candidate.png", "policy.png"):
        # A 256-colour palette keeps a full-page screenshot of flat UI small enough to commit.
        Image.open(HERE / name).convert("RGB").quantize(256).save(HERE / name, optimize=True)
    print("wrote", HERE / "candidate.png", HERE / "policy.png")


if __name__ == "__main__":
    main()
