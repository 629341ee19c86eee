"""The hash-pinned locks agree with pyproject.toml, and CI, the image and the audit install or
read them. When one of these fails after a change to pyproject's dependencies: `bash
deploy/lock.sh` (docs/supply-chain.md)."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.support.locks import (
    DEV_EXTRAS,
    DEV_LOCK,
    LANGFUSE_LOCK,
    PIP_LOCK,
    REPO,
    RUNTIME_LOCK,
    Pin,
    declared,
    read_lock,
)

RELOCK = "pyproject and the lock disagree: run `bash deploy/lock.sh`"


def disagreements(requirements: list[Requirement], lock: dict[str, Pin]) -> list[str]:
    found = []
    for req in requirements:
        pin = lock.get(canonicalize_name(req.name))
        if pin is None:
            found.append(f"{req} is not in the lock")
        elif not req.specifier.contains(pin.version, prereleases=True):
            found.append(f"{req} but the lock has {pin.version}")
    return found


@pytest.mark.parametrize(
    ("lock_path", "requirements"),
    [
        (RUNTIME_LOCK, declared()),
        (DEV_LOCK, declared(*DEV_EXTRAS)),
        (LANGFUSE_LOCK, declared("langfuse", runtime=False)),
    ],
    ids=["runtime", "dev", "langfuse"],
)
def test_every_declared_dependency_is_locked_at_a_version_it_allows(
    lock_path: Path, requirements: list[Requirement]
) -> None:
    assert disagreements(requirements, read_lock(lock_path)) == [], RELOCK


def test_a_lock_that_misses_or_breaks_a_specifier_is_caught() -> None:
    lock = read_lock(RUNTIME_LOCK)
    celery = lock[canonicalize_name("celery")]
    assert disagreements([Requirement(f"celery>{celery.version}")], lock) != []
    assert disagreements([Requirement("no-such-package>=1")], lock) != []


def test_the_runtime_lock_is_the_dev_lock_at_the_same_versions() -> None:
    runtime, dev = read_lock(RUNTIME_LOCK), read_lock(DEV_LOCK)
    assert runtime.keys() <= dev.keys()
    assert {n: p.version for n, p in runtime.items() if dev[n] != p} == {}


def test_the_langfuse_lock_holds_the_sdk_alone() -> None:
    # Installed with --no-deps: anything else here would be installed without its dependencies.
    assert set(read_lock(LANGFUSE_LOCK)) == {"langfuse"}


def test_torch_is_locked_as_the_cpu_build_of_pyprojects_pin() -> None:
    torch_req = next(r for r in declared() if r.name == "torch")
    for lock_path in (RUNTIME_LOCK, DEV_LOCK):
        torch = read_lock(lock_path)[canonicalize_name("torch")]
        # PyPI carries only the CUDA build under the public version: the local label and the one
        # hash keep pip from ever taking it.
        assert torch.version.local == "cpu", lock_path.name
        assert torch_req.specifier.contains(torch.version)
        assert len(torch.hashes) == 1
    dev = read_lock(DEV_LOCK)
    assert not [n for n in dev if n.startswith("nvidia-") or n == "triton"]


def test_the_local_cpu_wheel_is_the_locked_file() -> None:
    folder = Path(os.environ.get("TORCH_FIND_LINKS", "/opt/wheels"))
    torch = read_lock(DEV_LOCK)[canonicalize_name("torch")]
    wheels = sorted(folder.glob(f"torch-{torch.version}-cp311-*_x86_64.whl"))
    if not wheels:
        pytest.skip(f"no torch {torch.version} wheel in {folder}")
    assert hashlib.sha256(wheels[0].read_bytes()).hexdigest() in torch.hashes


def test_ci_and_the_image_install_from_the_locks_with_hashes() -> None:
    ci = (REPO / ".ci" / "run").read_text()
    assert "pip install -q --require-hashes -r requirements/lock-dev.txt" in ci
    assert "pip install -q --no-deps --require-hashes -r requirements/lock-langfuse.txt" in ci
    assert re.search(r"pip install -q --no-deps --no-build-isolation -e \.$", ci, re.M)
    docker = (REPO / "deploy" / "Dockerfile").read_text().replace("\\\n", " ")
    assert re.search(r"pip install --require-hashes .*-r requirements/lock-runtime\.txt", docker)
    assert re.search(r"COPY .*requirements/lock-runtime\.txt", docker)


def test_pip_comes_first_at_the_dev_locks_version_and_hashes() -> None:
    # A venv's bundled pip 23.x misresolves a dependency's extra under --require-hashes
    # (docs/supply-chain.md), so CI, the README's first command and the image install pip alone
    # from its own lock before anything else.
    assert read_lock(PIP_LOCK) == {"pip": read_lock(DEV_LOCK)["pip"]}
    first = "pip install -q --require-hashes -r requirements/lock-pip.txt"
    ci = (REPO / ".ci" / "run").read_text()
    assert first in ci and ci.index(first) < ci.index("-r requirements/lock-dev.txt")
    readme = (REPO / "README.md").read_text()
    assert readme.index("-r requirements/lock-pip.txt") < readme.index("-r requirements/lock-runtime.txt")
    docker = (REPO / "deploy" / "Dockerfile").read_text()
    assert docker.index("-r requirements/lock-pip.txt") < docker.index("-r requirements/lock-runtime.txt")


def test_the_audit_workflow_audits_every_lock_with_the_locked_pip_audit() -> None:
    workflow = yaml.safe_load((REPO / ".github" / "workflows" / "audit.yml").read_text())
    script = "\n".join(s.get("run", "") for job in workflow["jobs"].values() for s in job["steps"])
    pip_audit = read_lock(DEV_LOCK)[canonicalize_name("pip-audit")]
    assert f"pip-audit=={pip_audit.version}" in script
    assert "bash deploy/audit.sh" in script
    audit = (REPO / "deploy" / "audit.sh").read_text()
    for lock_path in (RUNTIME_LOCK, DEV_LOCK, LANGFUSE_LOCK):
        assert f"requirements/{lock_path.name}" in audit
    assert all(f in audit for f in ("--require-hashes", "--disable-pip", "--strict"))
