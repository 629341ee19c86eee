"""Snapshots: the promotion state machine, evaluation results, approval and rollback."""
