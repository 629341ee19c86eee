"""Typer sub-app for the learner: ``train_app`` (offline training).

Mounted by ``app/cli/__init__.py`` as ``tracelearn train-offline``; also runnable
directly, which is how ``torchrun`` starts data-parallel training::

    python -m workers.learner.commands train --groups g.jsonl --base DIR --out DIR
    torchrun --nproc_per_node 2 -m workers.learner.commands train --groups g.jsonl ...

No FastAPI or Celery imports here: the learner must run on a bare training box.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

train_app = typer.Typer(help="Train an adapter offline from graded rollout groups.")
console = Console(stderr=True)


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=console,
    )


@train_app.callback(invoke_without_command=True)
def train_offline(
    groups: Annotated[Path, typer.Option(help="JSONL of graded rollout groups.")],
    base: Annotated[Path, typer.Option(help="Base model directory.")],
    out: Annotated[Path, typer.Option(help="Adapter directory to create (must not exist).")],
    parent: Annotated[Path | None, typer.Option(help="Adapter to continue from.")] = None,
    algorithm: Annotated[str | None, typer.Option(help="oapl | grpo")] = None,
    epochs: Annotated[int | None, typer.Option(help="Passes over the groups.")] = None,
    groups_per_step: Annotated[int | None, typer.Option(help="Groups per optimizer step.")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate.")] = None,
    beta1: Annotated[float | None, typer.Option(help="OAPL value temperature β₁.")] = None,
    beta2: Annotated[float | None, typer.Option(help="OAPL log-ratio coefficient β₂.")] = None,
    lora_rank: Annotated[int | None, typer.Option()] = None,
    lora_alpha: Annotated[float | None, typer.Option()] = None,
    micro_batch_size: Annotated[int | None, typer.Option()] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    config: Annotated[
        Path | None, typer.Option(help="JSON file of TrainerConfig fields (overrides flags).")
    ] = None,
    history_out: Annotated[
        Path | None, typer.Option(help="Write the per-step history as JSON here.")
    ] = None,
) -> None:
    """Train one adapter from a JSONL file of graded groups (runs under torchrun too).

    A flag left out keeps ``TrainerConfig``'s default; ``--config`` overrides the flags."""
    import torch.distributed as dist

    from workers.learner.data import load_groups_jsonl
    from workers.learner.trainer import TrainerConfig, TrainerConfigError, init_distributed_from_env
    from workers.learner.trainer import train as run_training

    flags = {
        "algorithm": algorithm,
        "epochs": epochs,
        "groups_per_step": groups_per_step,
        "lr": lr,
        "beta1": beta1,
        "beta2": beta2,
        "lora_rank": lora_rank,
        "lora_alpha": lora_alpha,
        "micro_batch_size": micro_batch_size,
        "seed": seed,
    }
    fields: dict[str, Any] = {k: v for k, v in flags.items() if v is not None}
    try:
        if config is not None:
            fields |= json.loads(config.read_text())
        cfg = TrainerConfig.from_dict(fields)
    except (TrainerConfigError, json.JSONDecodeError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    try:
        rollout_groups = load_groups_jsonl(groups)
    except (OSError, ValueError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    try:
        distributed = init_distributed_from_env(cfg)
    except TrainerConfigError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    rank = dist.get_rank() if distributed else 0
    try:
        with _progress() as prog:
            task = prog.add_task(f"{cfg.algorithm.upper()}", total=None, info="",
                                 visible=rank == 0)

            def on_step(step: int, total: int, m: dict[str, float]) -> None:
                prog.update(
                    task,
                    completed=step,
                    total=total,
                    info=f"loss {m.get('loss', float('nan')):.4f} "
                    f"reward {m.get('train_reward', float('nan')):.3f}",
                )

            result = run_training(rollout_groups, base, out, cfg, parent=parent, progress=on_step)
    except (TrainerConfigError, ValueError, FileExistsError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    finally:
        if distributed:
            dist.destroy_process_group()
    if rank == 0:
        if history_out is not None:
            history_out.write_text(json.dumps(result.history, indent=2))
        if result.status != "succeeded":
            console.print(f"[red]run failed:[/red] {result.failure_reason}")
            raise typer.Exit(1)
        console.print(
            f"adapter {result.adapter_path} ({result.metrics['groups_used']} groups, "
            f"{result.metrics['groups_dropped_zero_variance']} dropped, "
            f"{result.metrics['optimizer_steps']} steps over {result.metrics['epochs']} epochs, "
            f"final loss {result.metrics['final_loss']:.4f})"
        )


cli = typer.Typer(no_args_is_help=True)
cli.add_typer(train_app, name="train")

if __name__ == "__main__":
    cli()
