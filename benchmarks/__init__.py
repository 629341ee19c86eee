"""Reproducible benchmark scripts; each writes JSON (+ PNG) under ``benchmarks/results/``."""
