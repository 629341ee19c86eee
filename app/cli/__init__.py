"""The `tracelearn` command line: one module per command group, each a thin shell over a service.

    db       schema migrations            keys      API keys
    tenants  a tenant's settings (the PII redaction mode)
    api/up   serving                      demo      the whole loop on synthetic traces
    worker/beat/reaper/regenerate/train/tick       the pipeline (``pipeline``)
    model    the bundled tiny model       train-offline  the learner on its own
    import/export                                  traces in other tools' formats (``transfer``)
"""

from __future__ import annotations

import typer

from app.cli.db import db_cli
from app.cli.demo import demo_app
from app.cli.keys import keys_cli
from app.cli.model import model_app
from app.cli.pipeline import pipeline_app, train_offline_on_learner_allocator
from app.cli.serve import serve_app
from app.cli.tenants import tenants_cli
from app.cli.transfer import transfer_app
from app.jobs.service import register_sender
from app.observability import quiet_libraries
from workers.celery_app import send_job

cli = typer.Typer(help="tracelearn: better LoRA adapters from production traces.",
                  no_args_is_help=True)
cli.add_typer(serve_app)
cli.add_typer(demo_app)
cli.add_typer(pipeline_app)
cli.add_typer(transfer_app)
cli.add_typer(db_cli, name="db")
cli.add_typer(keys_cli, name="keys")
cli.add_typer(tenants_cli, name="tenants")
cli.add_typer(model_app, name="model")
cli.command("train-offline", help="Train an adapter offline from a JSONL of graded groups "
            "(also under torchrun).")(train_offline_on_learner_allocator)


@cli.callback()
def _start() -> None:
    quiet_libraries()  # before any command imports transformers
    # Jobs the CLI enqueues reach the broker through the Celery shell's sender.
    register_sender(send_job)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
