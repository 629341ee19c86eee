"""Postgres is the job truth: enqueue with an outbox, claim with a lease, reap expired leases."""
