"""Adapter directories: written atomically, described by a manifest, verified before loading.

Layout of an adapter directory (what peft's ``save_pretrained`` writes, plus our manifest)::

    adapter_config.json  adapter_model.safetensors  manifest.json

``manifest.json`` records the base model digest, the parent adapter (lineage), a digest of the
rollout-group ids that trained it, the trainer config, metrics and the sha256 of the weights file.
A directory is never overwritten: the writer builds it in a temp dir next to the target, fsyncs the
files and the dir, then renames, so a reader sees either nothing or the complete adapter.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
WEIGHTS = "adapter_model.safetensors"
MANIFEST_VERSION = 1


class AdapterIntegrityError(RuntimeError):
    """The adapter's weights do not match its manifest's sha256 (or the manifest is missing)."""


class AdapterExistsError(FileExistsError):
    """Refusing to overwrite an existing adapter directory."""


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def model_digest(model_dir: str | Path) -> str:
    """sha256 over a HF model directory's weight files, in name order (one file → its sha256)."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors under {model_dir}")
    if len(files) == 1:
        return sha256_file(files[0])
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + sha256_file(f).encode())
    return h.hexdigest()


def group_ids_digest(group_ids: Iterable[str]) -> str:
    """Order-independent digest of the rollout groups an adapter was trained on."""
    return hashlib.sha256("\n".join(sorted(group_ids)).encode()).hexdigest()


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_adapter(
    save_weights: Callable[[Path], None],
    out_dir: str | Path,
    *,
    base_model_digest: str,
    parent: dict[str, Any] | None,
    group_ids: Iterable[str],
    config: dict[str, Any],
    metrics: dict[str, Any],
) -> dict[str, Any]:
    """Write an adapter atomically and return its manifest.

    ``save_weights(tmp_dir)`` must write ``adapter_model.safetensors`` (and its config) into
    ``tmp_dir`` — typically ``peft_model.save_pretrained``. Raises ``AdapterExistsError`` if
    ``out_dir`` exists; on any failure the temp dir is removed and nothing appears at ``out_dir``.
    """
    out = Path(out_dir)
    if out.exists():
        raise AdapterExistsError(f"adapter directory already exists: {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    ids = list(group_ids)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        save_weights(tmp)
        weights = tmp / WEIGHTS
        if not weights.is_file():
            raise FileNotFoundError(f"save_weights did not write {WEIGHTS}")
        manifest = {
            "manifest_version": MANIFEST_VERSION,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "base_model_digest": base_model_digest,
            "parent": parent,
            "group_ids_digest": group_ids_digest(ids),
            "n_groups": len(ids),
            "config": config,
            "metrics": metrics,
            "weights_sha256": sha256_file(weights),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        _fsync_tree(tmp)
        try:
            # os.rename would silently replace an *empty* directory created meanwhile; refuse that.
            if out.exists():
                raise AdapterExistsError(f"adapter directory already exists: {out}")
            os.rename(tmp, out)
        except OSError as exc:
            if isinstance(exc, AdapterExistsError):
                raise
            raise AdapterExistsError(f"cannot place adapter at {out}: {exc}") from exc
        _fsync_dir(out.parent)
        return manifest
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_manifest(path: str | Path) -> dict[str, Any]:
    manifest_path = Path(path) / MANIFEST
    if not manifest_path.is_file():
        raise AdapterIntegrityError(
            f"{path}: no {MANIFEST}; refusing to load an unverified adapter"
        )
    manifest: dict[str, Any] = json.loads(manifest_path.read_text())
    return manifest


def load_verified(path: str | Path) -> dict[str, Any]:
    """Check the weights' sha256 against the manifest and return the manifest; raise if they differ.

    Callers load the weights only after this returns (the local backend and the trainer's
    ``--parent`` both go through here).
    """
    manifest = read_manifest(path)
    weights = Path(path) / WEIGHTS
    if not weights.is_file():
        raise AdapterIntegrityError(f"{path}: {WEIGHTS} is missing")
    actual = sha256_file(weights)
    expected = manifest.get("weights_sha256")
    if actual != expected:
        raise AdapterIntegrityError(
            f"{path}: weights sha256 {actual[:12]}… does not match manifest {str(expected)[:12]}…; "
            "the adapter was modified or corrupted after it was written"
        )
    return manifest
