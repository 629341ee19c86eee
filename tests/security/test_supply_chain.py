"""No secrets committed; what is installed is what the hash-pinned lock and the SBOM say (slow
run). The vulnerability audit itself needs a vulnerability service, which this project's
machines cannot reach: `bash deploy/audit.sh`, run by .github/workflows/audit.yml."""

from __future__ import annotations

import json
import re
import subprocess
from importlib import metadata
from pathlib import Path

import pytest
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.support.locks import DEV_LOCK, LANGFUSE_LOCK, RUNTIME_LOCK, SBOM, pyproject, read_lock

REPO = Path(__file__).resolve().parents[2]

SECRET_PATTERNS = {
    "tracelearn API key": re.compile(r"\btl_[0-9a-f]{12}_[A-Za-z0-9_-]{40,}"),
    "private key": re.compile(r"-----BEGIN (RSA |EC |OPENSSH |DSA )?PRIVATE KEY-----"),
    "AWS access key": re.compile(r"\bAKIA[0-9A-Z]{16}\b"),
    "GitHub token": re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36,}\b"),
    "Slack token": re.compile(r"\bxox[abpr]-[A-Za-z0-9-]{10,}"),
    "credentials in a URL": re.compile(r"\b[a-z+]+://[^/\s:@]+:(?!\$\{|change|CHANGE|pass@|x@)"
                                       r"[^/\s:@]{8,}@"),
}


def tracked_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True)
    return [REPO / p for p in out.stdout.decode().split("\0") if p]


def test_no_secrets_in_tracked_files() -> None:
    found = []
    for path in tracked_files():
        if not path.is_file() or path.stat().st_size > 2_000_000:
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        for name, pattern in SECRET_PATTERNS.items():
            for m in pattern.finditer(text):
                found.append(f"{path.relative_to(REPO)}: {name}: {m.group(0)[:24]}…")
    assert found == []


def test_env_files_with_values_are_not_tracked() -> None:
    names = {p.name for p in tracked_files()}
    assert ".env" not in names, "a filled-in .env is tracked"


@pytest.mark.slow
def test_the_installed_set_the_lock_and_the_sbom_agree() -> None:
    runtime = read_lock(RUNTIME_LOCK)
    sbom = json.loads(SBOM.read_text())
    components = {canonicalize_name(c["name"]): c for c in sbom["components"]}
    assert {n: Version(c["version"]) for n, c in components.items()} == {
        n: p.version for n, p in runtime.items()
    }, "the SBOM is not the runtime lock's: run `bash deploy/lock.sh`"
    sbom_hashes = {
        n: {h["content"] for ref in c.get("externalReferences", []) for h in ref.get("hashes", [])}
        for n, c in components.items()
    }
    assert sbom_hashes == {n: set(p.hashes) for n, p in runtime.items()}
    project = pyproject()["project"]
    root = sbom["metadata"]["component"]
    assert (root["name"], root["version"]) == (project["name"], project["version"])
    assert [lic["license"]["id"] for lic in root["licenses"]] == [project["license"]]

    # CI's .venv holds the dev lock, the langfuse SDK and the project, and nothing else.
    locked = {n: p.version for n, p in (read_lock(DEV_LOCK) | read_lock(LANGFUSE_LOCK)).items()}
    locked[canonicalize_name(project["name"])] = Version(project["version"])
    installed = {canonicalize_name(d.metadata["Name"]): Version(d.version)
                 for d in metadata.distributions()}
    differ = sorted(f"{n}: locked {locked.get(n)}, installed {installed.get(n)}"
                    for n in locked.keys() | installed.keys() if locked.get(n) != installed.get(n))
    assert differ == []
