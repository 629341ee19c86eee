"""Synthetic clinical narratives with a hidden ground truth for PFS > 180 days."""

from workers.clinical.task import (
    OUTCOME_NAME,
    SEEN_STYLES,
    STYLES,
    SYSTEM_PROMPT,
    UNSEEN_STYLE,
    Case,
    Example,
    bayes_optimal_accuracy,
    build_messages,
    generate,
    ingest_items,
    render,
    true_probability,
    weak_response,
)

__all__ = [
    "OUTCOME_NAME",
    "SEEN_STYLES",
    "STYLES",
    "SYSTEM_PROMPT",
    "UNSEEN_STYLE",
    "Case",
    "Example",
    "bayes_optimal_accuracy",
    "build_messages",
    "generate",
    "ingest_items",
    "render",
    "true_probability",
    "weak_response",
]
