"""Evaluation of a candidate on held-out traces: metrics, pass@k, bootstrap CIs, the paired test."""
