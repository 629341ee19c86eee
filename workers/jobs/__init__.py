"""Postgres is the job truth: enqueue with an outbox, claim with a lease, reap expired leases."""

from workers.jobs.service import (
    JOB_ROUTES,
    JobContext,
    LeaseLost,
    claim,
    complete,
    dispatch,
    dispatch_pending,
    enqueue,
    fail,
    heartbeat,
    reap,
    run_job,
)

__all__ = [
    "JOB_ROUTES",
    "JobContext",
    "LeaseLost",
    "claim",
    "complete",
    "dispatch",
    "dispatch_pending",
    "enqueue",
    "fail",
    "heartbeat",
    "reap",
    "run_job",
]
