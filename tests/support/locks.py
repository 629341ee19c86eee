"""Reading the hash-pinned locks under requirements/ (written by deploy/lock.sh) and what
pyproject.toml declares, for the lock tests (tests/deploy/test_lock.py) and the slow check of
the installed set (tests/security/test_supply_chain.py)."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from packaging.requirements import Requirement
from packaging.utils import NormalizedName, canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
LOCKS = REPO / "requirements"
RUNTIME_LOCK = LOCKS / "lock-runtime.txt"
DEV_LOCK = LOCKS / "lock-dev.txt"
LANGFUSE_LOCK = LOCKS / "lock-langfuse.txt"
PIP_LOCK = LOCKS / "lock-pip.txt"
SBOM = REPO / "deploy" / "sbom.cdx.json"
# The extras CI installs from lock-dev.txt; `langfuse` has its own lock (installed with
# --no-deps), `vllm` lives unlocked in .venv-vllm.
DEV_EXTRAS = ("test", "dev", "bench")

_PIN = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>\S+)$")
_HASH = re.compile(r"^--hash=sha256:(?P<hex>[0-9a-f]{64})$")


@dataclass(frozen=True)
class Pin:
    name: NormalizedName
    version: Version
    hashes: frozenset[str]


def read_lock(path: Path) -> dict[NormalizedName, Pin]:
    """One entry per `name==version --hash=sha256:… …` line; anything else is an error, so a
    hand-edited lock with a range or an unhashed line fails here, not at install time."""
    text = path.read_text().replace("\\\n", " ")
    pins: dict[NormalizedName, Pin] = {}
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        pin = _PIN.match(fields[0])
        hashes = [_HASH.match(f) for f in fields[1:]]
        if pin is None or not hashes or None in hashes:
            raise ValueError(f"{path.name}: not an exact, hashed pin: {line.strip()[:120]}")
        name = canonicalize_name(pin["name"])
        if name in pins:
            raise ValueError(f"{path.name}: {name} pinned twice")
        pins[name] = Pin(name, Version(pin["version"]),
                         frozenset(h["hex"] for h in hashes if h is not None))
    return pins


def pyproject() -> dict[str, Any]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def declared(*extras: str, runtime: bool = True) -> list[Requirement]:
    """What pyproject asks for: the runtime dependencies and build tools, plus the extras."""
    meta = pyproject()
    specs: list[str] = []
    if runtime:
        specs += meta["project"]["dependencies"] + meta["build-system"]["requires"]
    for extra in extras:
        specs += meta["project"]["optional-dependencies"][extra]
    return [Requirement(s) for s in specs]
