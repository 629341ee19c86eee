"""Stored numbers and JSON turned into what a person reads on the dashboard: outcomes, config
tables, metric definitions, example titles and sentences. Pure functions; the pages are assembled
in ``app.dashboard.service``."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from workers.clinical import task

METRIC_HELP: dict[str, str] = {
    "correct": "End-to-end correctness: the share of held-out prompts whose FIRST sample "
               "(same seed for both snapshots) gives the right answer; an answer that cannot be "
               "parsed counts as wrong. The gate's default metric.",
    "parse_rate": "The share of ALL k samples per prompt that follow the output contract "
                  "(a final 'ANSWER: YES/NO' line), right or wrong. Format only, not truth.",
    "mean_reward": "The grader's reward averaged over all k samples (contract grader: 1 right, "
                   "0 wrong, −1 unparseable), so it moves with both correctness and format.",
    "pass@1": "Unbiased estimate from all k samples of the chance that ONE random sample is "
              "right. Same quantity as 'correct', but averaged over k samples instead of the "
              "first one only, so the two differ by sampling noise.",
}
PASS_AT_K_HELP = ("Unbiased estimate (Chen et al. 2021) from all samples of the chance that at "
                  "least one of {k} samples is right: how often retrying would find the answer.")


def metric_help(name: str) -> str:
    if name in METRIC_HELP:
        return METRIC_HELP[name]
    if name.startswith("pass@"):
        return PASS_AT_K_HELP.format(k=name.removeprefix("pass@"))
    return ""


def value_text(value: Any) -> str:
    """One stored value as a person writes it: yes/no, trimmed floats, lists joined."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list | tuple):
        return ", ".join(value_text(v) for v in value)
    if isinstance(value, Mapping):
        return json.dumps(value, sort_keys=True, default=str)
    return str(value)


def outcome_text(outcome: Mapping[str, Any] | None) -> str:
    """``{"pfs_gt_180d": True}`` → ``pfs_gt_180d: yes``."""
    if not outcome:
        return "no outcome"
    return ", ".join(f"{name}: {value_text(v)}" for name, v in outcome.items())


def example_title(prompt: str, metadata: Mapping[str, Any] | None) -> str:
    """What a reviewer recognises a held-out prompt by: the clinical case in a few words when the
    trace carries one, otherwise the prompt's first line."""
    case = (metadata or {}).get("case")
    if isinstance(case, Mapping):
        title = task.case_title(case)
        if title:
            return title
    first = next((line.strip() for line in prompt.splitlines() if line.strip()), "")
    return first if len(first) <= 90 else first[:89].rstrip() + "…"


@dataclass(frozen=True)
class Setting:
    group: str
    name: str
    value: str
    meaning: str
    default: bool = False
    """The value is the learner's default, not something the policy sets."""


# (key, label, what it does) of the learner settings worth a row; the rest is in the JSON.
TRAINING_ROWS: tuple[tuple[str, str, str], ...] = (
    ("algorithm", "algorithm", "OAPL (off-policy, against the lagged serving snapshot) or GRPO"),
    ("epochs", "epochs", "passes over the round's groups"),
    ("groups_per_step", "groups per optimizer step",
     "steps per round = epochs × ⌈groups ÷ this⌉"),
    ("lr", "learning rate", "AdamW step size"),
    ("lr_schedule", "lr schedule", "constant or cosine (with warm-up steps)"),
    ("beta1", "β₁ (value temperature)", "OAPL soft value V̂ = β₁·log mean exp(r/β₁)"),
    ("beta2", "β₂ (log-ratio weight)", "how far πθ may move from π_ref per unit advantage"),
    ("lora_rank", "LoRA rank", "adapter capacity"),
    ("device", "learner device", "auto (a GPU when the train worker has one), cpu or cuda"),
    ("keep_zero_variance_groups", "keep equal-reward groups",
     "groups whose G completions all scored the same carry no signal; dropped by default"),
    ("min_groups", "data trigger", "informative groups needed before a scheduled run starts"),
    ("max_groups", "max groups per round", "cap on the groups one run trains on"),
)


def training_settings(stored: Mapping[str, Any], effective: Mapping[str, Any] | None,
                      *, all_rows: bool = True) -> list[Setting]:
    """The learner rows: the policy's value, else the value the last run used (its default);
    ``all_rows=False`` leaves out what neither has."""
    rows = []
    for key, label, meaning in TRAINING_ROWS:
        if key in stored:
            rows.append(Setting("training", label, value_text(stored[key]), meaning))
        elif effective is not None and key in effective:
            rows.append(Setting("training", label, value_text(effective[key]), meaning,
                                default=True))
        elif all_rows and key != "max_groups":
            rows.append(Setting("training", label, "learner default", meaning, default=True))
    return rows


def gate_settings(gate: Mapping[str, Any]) -> list[Setting]:
    primary = gate.get("primary_metric", "correct")

    def opt_in(key: str, fmt: str) -> str:
        v = gate.get(key)
        return "not set (opt-in)" if v is None else fmt.format(v)

    return [
        Setting("gate", "primary metric", str(primary), metric_help(str(primary))),
        Setting("gate", "significant gain required",
                value_text(gate.get("require_significant_gain", True)),
                f"the paired 95% CI of the {primary} gain over the champion must be above 0"),
        Setting("gate", "max drop on other metrics",
                value_text(gate.get("max_secondary_regression")),
                "correct / parse_rate / mean_reward may fall at most this much"),
        Setting("gate", "min held-out prompts", value_text(gate.get("min_eval_n")),
                "fewer prompts than this: no verdict"),
        Setting("gate", "min parse rate", opt_in("min_parse_rate", "{:g}"),
                "absolute floor on the candidate's parse rate"),
        Setting("gate", "min absolute gain", opt_in("min_abs_gain", "{:+g}"),
                f"{primary} must rise at least this much"),
        Setting("gate", "min relative gain", opt_in("min_rel_gain", "{:+.0%}"),
                f"{primary} must rise at least this fraction"),
    ]


def policy_settings(
    sampling: Mapping[str, Any], group_size: int, grader: Mapping[str, Any],
    training: Mapping[str, Any], effective_training: Mapping[str, Any] | None,
    gate: Mapping[str, Any], schedule: str | None,
) -> list[Setting]:
    rows = [
        Setting("sampling", "completions per trace (G)", str(group_size),
                "regenerated from the serving snapshot for every train trace"),
        Setting("sampling", "temperature", value_text(sampling.get("temperature")),
                "1.0 samples the model's own distribution, as OAPL's π_ref assumes"),
        Setting("sampling", "max tokens", value_text(sampling.get("max_tokens")),
                "completion length cap"),
        Setting("grading", "grader", value_text(grader.get("kind")),
                "scores each completion against the trace's outcome"),
        Setting("grading", "outcome", value_text(grader.get("outcome")),
                "the label the grader compares with"),
        Setting("schedule", "schedule", schedule or "none",
                "crontab of scheduled rounds (the data trigger must also be met)"),
    ]
    return rows + training_settings(training, effective_training) + gate_settings(gate)


def run_settings(config: Mapping[str, Any]) -> list[Setting]:
    """A training run's config (the learner's full, effective one) as rows."""
    rows = training_settings(config, None, all_rows=False)
    extra = (("group_size", "completions per trace (G)", "as sampled"),
             ("temperature", "sampling temperature", "π_ref's log-probs are at this temperature"),
             ("ref_logprobs", "π_ref log-probs", "sampler's stored (behaviour) or re-scored"),
             ("sync_interval", "sync interval L", "steps between regenerations; none = offline"),
             ("window_passes", "passes per window k",
              "each window samples L/k steps' prompts and trains on them k times"))
    return rows + [Setting("training", label, value_text(config.get(key)), meaning)
                   for key, label, meaning in extra if key in config]


def pretty_json(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, default=str)


def count(n: int, singular: str, plural: str | None = None) -> str:
    return f"{n} {singular if n == 1 else (plural or singular + 's')}"


def audit_change(before: Mapping[str, Any], after: Mapping[str, Any]) -> str:
    """An audit row's before → after in a few words: a status, an outcome, what serves."""
    if "value" in after and "name" in after:  # outcome.set
        new = f"{after['name']}: {value_text(after['value'])} ({after.get('source', '?')})"
        if "value" in before:
            return f"{value_text(before['value'])} ({before.get('source', '?')}) → {new}"
        return f"→ {new}"
    old = before.get("status", before.get("serving_snapshot_id", ""))
    new_value = after.get("status", after.get("served_name", after.get("serving_snapshot_id", "")))
    return f"{value_text(old) if old != '' else ''} → {value_text(new_value)}"
