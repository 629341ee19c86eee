"""``tracelearn demo``: the whole loop on synthetic clinical traces (``app.demo.service``)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from app.cli.progress import console, stage_progress
from app.cli.serve import local_api
from app.demo.service import DEFAULT_POLICY, DemoRefused, run_demo
from app.settings import get_settings

demo_app = typer.Typer()


@demo_app.command("demo")
def demo_cmd(
    url: Annotated[str | None, typer.Option(
        help="A running `tracelearn up` to post to (same directory, so the same database). "
             "Default: start the API in this process.")] = None,
    key: Annotated[str | None, typer.Option(
        help="Admin key for --url (default: a new key for tenant 'demo').")] = None,
    traces: Annotated[int, typer.Option(min=10, help="Synthetic clinical traces to post.")] = 300,
    group_size: Annotated[int, typer.Option(
        min=2, help="Completions per train trace (G), for a policy the demo creates.")] = 8,
    max_tokens: Annotated[int, typer.Option(
        min=8, help="Completion length cap, for a policy the demo creates.")] = 80,
    seed: Annotated[int, typer.Option(
        help="Seed of the synthetic traces (another one posts new traces to a policy an "
             "earlier demo used).")] = 0,
    policy: Annotated[str, typer.Option(
        help="Policy to post to and train: used as configured if it exists, otherwise created "
             "with the default gate.")] = DEFAULT_POLICY,
) -> None:
    """Run the whole loop once on synthetic clinical traces, ending at a gated candidate.

    Posts traces over HTTP, regenerates, grades, trains one OAPL round, evaluates against the
    champion and gates; the candidate is left awaiting approval (or rejected, with the reason)
    on the dashboard."""
    try:
        with stage_progress() as report:
            result = run_demo(get_settings(), report, url=url, serve=local_api, key=key,
                              n_traces=traces, group_size=group_size, max_tokens=max_tokens,
                              seed=seed, policy=policy,
                              say=lambda line: console.print(line, highlight=False))
    except DemoRefused as exc:
        console.print(f"[red]demo refused:[/red] {exc}", highlight=False)
        raise typer.Exit(2) from None
    if result.error:
        console.print(f"[red]demo stopped:[/red] {result.error}")
        raise typer.Exit(1)
    table = Table("held-out metric", "champion (before)", "candidate (after)", "paired p")
    for metric, after in result.after.items():
        before = result.before.get(metric)
        p = result.p_values.get(metric)
        table.add_row(metric, "—" if before is None else f"{before:.3f}", f"{after:.3f}",
                      "—" if p is None else "<0.001" if p < 1e-3 else f"{p:.3g}")
    console.print(table)
    console.print(f"policy {result.policy}: {result.traces_posted} traces posted "
                  f"({result.heldout} held out), {result.groups} groups graded, "
                  f"training run {result.run_id}")
    console.print(f"candidate {result.served_name}: [bold]{result.status}[/bold]"
                  + (f" ({result.status_reason})" if result.status_reason else ""))
    console.print(f"review it at {result.dashboard_url}")
