"""Where the local backend puts its model: ``auto`` follows the machine, a missing GPU is named."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from workers.inference.local import LocalBackend, pick_device

NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has a GPU")


def test_auto_is_a_gpu_when_torch_sees_one_else_the_cpu() -> None:
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert pick_device("cpu") == torch.device("cpu")


@NO_GPU
def test_a_gpu_asked_for_on_a_machine_without_one_is_refused_with_the_reason() -> None:
    for choice in ("cuda", "cuda:1"):
        with pytest.raises(ValueError, match=rf"^device '{choice}' was asked for, but torch "
                           r"sees no GPUs on this machine$"):
            pick_device(choice)


@NO_GPU
def test_the_backend_refuses_before_loading_anything(tmp_path: Path) -> None:
    # The directory holds no model: loading would raise OSError, not this.
    with pytest.raises(ValueError, match="torch sees no GPUs"):
        LocalBackend(tmp_path / "no-model", device="cuda")
