"""Synthetic clinical narratives with a hidden ground truth for PFS > 180 days."""

from workers.clinical.task import (
    OUTCOME_NAME,
    SYSTEM_PROMPT,
    Case,
    Example,
    bayes_optimal_accuracy,
    build_messages,
    generate,
    ingest_items,
    true_probability,
    weak_response,
)

__all__ = [
    "OUTCOME_NAME",
    "SYSTEM_PROMPT",
    "Case",
    "Example",
    "bayes_optimal_accuracy",
    "build_messages",
    "generate",
    "ingest_items",
    "true_probability",
    "weak_response",
]
