"""The bundled tiny model as shipped in the package: built once by ``tracelearn model bootstrap
--ship``, so a first start copies ~2 MB instead of training for minutes.

``bundled-tiny/`` holds what ``workers.learner.bootstrap`` builds (HF config, safetensors in fp32,
tokenizer, ``bootstrap.json``) plus ``manifest.json``::

    {"cache_key": ..., "code_version": ..., "config": {...}, "n_params": ...,
     "files": {name: sha256, ...}, "baseline": {"correct": ..., "parse_rate": ..., ...}}

A shipped model is used only when its cache key is the current recipe's (a changed recipe —
task styles, sizes, build code — means a rebuild) and every file matches its digest. Nothing here
loads torch or transformers: the check runs in the API process of ``tracelearn up``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from workers.learner.adapters import sha256_file
from workers.learner.recipe import BootstrapConfig

SHIPPED_DIR = Path(__file__).with_name("bundled-tiny")
MANIFEST = "manifest.json"
BUILD_INFO = "bootstrap.json"
"""The build's own record; it carries timings, so it is the one file a rebuild does not
reproduce byte for byte."""


def file_digests(model_dir: Path) -> dict[str, str]:
    """sha256 of every file of a model directory but the manifest, by name."""
    return {f.name: sha256_file(f) for f in sorted(model_dir.iterdir())
            if f.is_file() and f.name != MANIFEST}


def write_manifest(model_dir: Path, baseline: dict[str, Any]) -> dict[str, Any]:
    """Describe a freshly built model directory (its ``bootstrap.json`` names the recipe)."""
    info = json.loads((model_dir / BUILD_INFO).read_text())
    manifest = {
        "cache_key": info["cache_key"],
        "code_version": info["code_version"],
        "config": info["config"],
        "n_params": info["n_params"],
        "vocab_size": info["vocab_size"],
        "files": file_digests(model_dir),
        "baseline": baseline,
    }
    (model_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def read_manifest(model_dir: Path = SHIPPED_DIR) -> dict[str, Any]:
    manifest: dict[str, Any] = json.loads((model_dir / MANIFEST).read_text())
    return manifest


def unusable_reason(recipe: BootstrapConfig, model_dir: Path = SHIPPED_DIR) -> str | None:
    """Why the shipped model cannot stand in for building ``recipe``; None when it can."""
    if not (model_dir / MANIFEST).is_file():
        return f"no shipped model at {model_dir}"
    manifest = read_manifest(model_dir)
    if manifest["cache_key"] != recipe.cache_key():
        return (f"the shipped model was built by recipe {manifest['cache_key']} "
                f"({manifest['code_version']}) and this code builds {recipe.cache_key()}")
    actual = file_digests(model_dir)
    changed = sorted(name for name, digest in manifest["files"].items()
                     if actual.get(name) != digest)
    if changed:
        return f"shipped files differ from their manifest digests: {', '.join(changed)}"
    return None


def install(dest: Path, model_dir: Path = SHIPPED_DIR) -> Path:
    """Copy the shipped model to ``dest`` (absent): through a temp dir and a rename, so an
    interrupted first start leaves no half model behind."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        shutil.copytree(model_dir, tmp, dirs_exist_ok=True)
        try:
            os.rename(tmp, dest)
        except OSError:
            # Another first start (`up` and `demo` side by side) installed it first: same bytes.
            if not (dest / MANIFEST).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
