"""``tracelearn model``: the bundled tiny model (``workers.learner.bootstrap``, shipped as
``workers/learner/bundled-tiny``)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer

from app.cli.progress import console, stage_progress
from app.settings import get_settings
from workers.learner import bundled
from workers.learner.recipe import BootstrapConfig

model_app = typer.Typer(help="The bundled tiny model: build it, ship it.", no_args_is_help=True)

BASELINE_PROMPTS = 300
"""Held-out prompts behind the baseline recorded in a shipped manifest."""


def _ship(cfg: BootstrapConfig, cache_dir: Path | None) -> Path:
    """Build (from scratch unless ``cache_dir`` holds this recipe's build: the build is
    deterministic), measure the baseline, replace the package's copy."""
    from workers.learner.bootstrap import baseline, bootstrap_model

    if cfg != BootstrapConfig():
        raise typer.BadParameter("only the default recipe is shipped (drop --size/--seed/...)")
    with tempfile.TemporaryDirectory(prefix="tracelearn-ship-") as scratch:
        with stage_progress("building the bundled model") as report:
            built = bootstrap_model(Path(scratch) / "tiny", cfg,
                                    cache_dir=cache_dir or Path(scratch) / "cache",
                                    progress=report, from_package=False)
        console.print(f"measuring the baseline on {BASELINE_PROMPTS} held-out prompts at T=1…")
        bundled.write_manifest(built, baseline(built, BASELINE_PROMPTS))
        shutil.rmtree(bundled.SHIPPED_DIR, ignore_errors=True)
        shutil.copytree(built, bundled.SHIPPED_DIR)
    return bundled.SHIPPED_DIR


@model_app.command("bootstrap")
def bootstrap(
    out: Annotated[Path | None, typer.Option(
        help="Directory to write the HF model + tokenizer to (must not exist).")] = None,
    ship: Annotated[bool, typer.Option(
        help="Rebuild from scratch and replace the copy shipped in the package, with its "
             "manifest (digests, recipe, baseline).")] = False,
    size: Annotated[str, typer.Option(help="test | tiny | small")] = "tiny",
    seed: Annotated[int, typer.Option(help="Seed of demonstrations, init and batch order.")] = 0,
    sft_steps: Annotated[int | None, typer.Option(help="Override the SFT step count.")] = None,
    demos: Annotated[int | None, typer.Option(
        help="Override the number of demonstrations.")] = None,
    cache_dir: Annotated[Path | None, typer.Option(
        help="Build cache (content-hashed; default: the model_cache setting, none with --ship).")
    ] = None,
) -> None:
    """Build the bundled model deterministically into --out (or the package with --ship)."""
    # The build code loads transformers: only this command pays for it, not every CLI start.
    from workers.learner.bootstrap import bootstrap_info, bootstrap_model

    kw: dict[str, Any] = {"size": size, "seed": seed}
    if sft_steps is not None:
        kw["sft_steps"] = sft_steps
    if demos is not None:
        kw["n_demos"] = demos
    try:
        cfg = BootstrapConfig(**kw)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    if (out is None) == (not ship):
        raise typer.BadParameter("give either --out DIR or --ship")
    if ship:
        path = _ship(cfg, cache_dir)
    else:
        assert out is not None
        with stage_progress("building the bundled model") as report:
            path = bootstrap_model(out, cfg, cache_dir=cache_dir or get_settings().model_cache,
                                   progress=report)
    info = bootstrap_info(path)
    console.print(f"model at {path}: {info['n_params']:,} params, vocab {info['vocab_size']}, "
                  f"built in {info['seconds_total']} s, SFT loss {info['sft_loss_last']:.3f}",
                  markup=False, highlight=False)
