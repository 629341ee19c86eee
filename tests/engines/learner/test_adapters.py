"""Atomic adapter writes, manifests, and refusal of tampered weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from workers.learner.adapters import (
    AdapterExistsError,
    AdapterIntegrityError,
    group_ids_digest,
    load_verified,
    write_adapter,
)


def fake_weights(content: bytes = b"weights") -> object:
    def save(d: Path) -> None:
        (d / "adapter_model.safetensors").write_bytes(content)
        (d / "adapter_config.json").write_text("{}")

    return save


def write(path: Path, content: bytes = b"weights") -> dict:
    return write_adapter(
        fake_weights(content),  # type: ignore[arg-type]
        path,
        base_model_digest="abc",
        parent={"path": "/p", "weights_sha256": "00"},
        group_ids=["g2", "g1"],
        config={"lr": 1.0},
        metrics={"loss": 0.5},
    )


def test_write_creates_complete_directory_with_manifest(tmp_path: Path) -> None:
    manifest = write(tmp_path / "a1")
    on_disk = json.loads((tmp_path / "a1" / "manifest.json").read_text())
    assert on_disk == manifest
    assert manifest["base_model_digest"] == "abc"
    assert manifest["parent"]["weights_sha256"] == "00"
    assert manifest["group_ids_digest"] == group_ids_digest(["g1", "g2"])
    assert manifest["n_groups"] == 2
    assert manifest["config"] == {"lr": 1.0}
    # sha256(b"weights")
    assert manifest["weights_sha256"].startswith("9a129038")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a1"]  # no temp dir left behind


def test_existing_directory_is_never_overwritten(tmp_path: Path) -> None:
    write(tmp_path / "a1", b"first")
    with pytest.raises(AdapterExistsError):
        write(tmp_path / "a1", b"second")
    assert (tmp_path / "a1" / "adapter_model.safetensors").read_bytes() == b"first"
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterExistsError):
        write(tmp_path / "empty")


def test_failed_save_leaves_nothing(tmp_path: Path) -> None:
    def broken(d: Path) -> None:
        (d / "adapter_model.safetensors").write_bytes(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_adapter(
            broken,
            tmp_path / "a1",
            base_model_digest="",
            parent=None,
            group_ids=[],
            config={},
            metrics={},
        )
    assert list(tmp_path.iterdir()) == []


def test_load_verified_accepts_intact_and_refuses_tampered(tmp_path: Path) -> None:
    write(tmp_path / "a1")
    assert load_verified(tmp_path / "a1")["n_groups"] == 2
    (tmp_path / "a1" / "adapter_model.safetensors").write_bytes(b"weightz")
    with pytest.raises(AdapterIntegrityError, match="does not match"):
        load_verified(tmp_path / "a1")


def test_load_verified_refuses_missing_manifest(tmp_path: Path) -> None:
    (tmp_path / "a1").mkdir()
    (tmp_path / "a1" / "adapter_model.safetensors").write_bytes(b"w")
    with pytest.raises(AdapterIntegrityError, match="manifest"):
        load_verified(tmp_path / "a1")
