"""Synthetic clinical task: will progression-free survival exceed 180 days on the planned regimen?

Hidden ground truth (documented here on purpose — it is what the benchmark's Bayes bound uses):
every case is advanced non-small-cell lung cancer, and

    logit = SCALE · ( INTERCEPT
                      + ECOG[ecog] + STAGE[stage] + HISTOLOGY[histology] + LINE[line]
                      + MATCH(biomarker, regimen) + PRIOR[prior_response]
                      − 0.6·[LDH > 250 U/L] − 0.6·[albumin < 3.5 g/dL] − 0.3·[Hb < 10 g/dL]
                      − 0.5·[brain metastases] − 0.3·[age > 75] )
    P(PFS > 180 d) = sigmoid(logit),   outcome ~ Bernoulli(P)

with the weight tables below. MATCH rewards a targeted drug given to its biomarker (EGFR +
osimertinib, ALK + alectinib: +1.6; KRAS G12C + sotorasib: +0.8; PD-L1 ≥ 50% + pembrolizumab: +1.0)
and punishes a targeted drug without its biomarker (−1.2); docetaxel is −0.5, platinum doublet 0.
Because the outcome is a coin flip with probability P, no predictor can beat E[max(P, 1−P)]: the
Bayes-optimal accuracy, ≈ 0.76 (``bayes_optimal_accuracy()``; printed by the benchmark); the
base rate of YES is ≈ 0.48.

Everything is deterministic from (seed, split): train, validation and held-out use independent
streams. Each case is written in one of five STYLES (the original narrative, a structured field
list, a clinic note with abbreviations, a reordered long form, SI units with British spellings);
the ground truth reads the case, never its wording. Training and validation prompts (and the
bundled model's tokenizer and warm-start) use the SEEN styles; ``UNSEEN_STYLE`` is for held-out
evaluation only.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

OUTCOME_NAME = "pfs_gt_180d"
DEFAULT_POLICY = "clinical-pfs"

SYSTEM_PROMPT = (
    "Oncology assistant. Reason briefly, then answer on the last line exactly ANSWER: YES or "
    "ANSWER: NO."
)
QUESTION = "Will progression-free survival exceed 180 days on this regimen?"

SCALE = 1.15
INTERCEPT = 0.15
ECOG = {0: 0.8, 1: 0.2, 2: -0.8, 3: -1.6}
STAGE = {"II": 0.8, "III": 0.2, "IV": -0.4}
HISTOLOGY = {"adenocarcinoma": 0.1, "squamous": -0.1, "large cell": -0.4}
LINE = {1: 0.5, 2: -0.1, 3: -0.7}
PRIOR = {"none": 0.0, "CR": 0.6, "PR": 0.3, "SD": 0.0, "PD": -0.7}
TARGETS = {"osimertinib": "EGFR", "alectinib": "ALK", "sotorasib": "KRAS G12C"}
MATCH_BONUS = {"osimertinib": 1.6, "alectinib": 1.6, "sotorasib": 0.8, "pembrolizumab": 1.0}

BIOMARKERS = ["EGFR", "ALK", "KRAS G12C", "PD-L1 high", "none"]
BIOMARKER_P = [0.2, 0.08, 0.12, 0.25, 0.35]
REGIMENS = [
    "osimertinib",
    "alectinib",
    "sotorasib",
    "pembrolizumab",
    "carboplatin-pemetrexed",
    "docetaxel",
]


@dataclass(frozen=True)
class Case:
    age: int
    sex: str
    ecog: int
    stage: str
    histology: str
    biomarker: str
    line: int
    regimen: str
    prior_response: str
    ldh: int
    albumin: float
    hemoglobin: float
    brain_mets: bool


def match_weight(biomarker: str, regimen: str) -> float:
    if regimen in TARGETS:
        return MATCH_BONUS[regimen] if TARGETS[regimen] == biomarker else -1.2
    if regimen == "pembrolizumab":
        return MATCH_BONUS[regimen] if biomarker == "PD-L1 high" else 0.0
    return -0.5 if regimen == "docetaxel" else 0.0


def factor_signs(case: Case) -> list[tuple[str, float]]:
    """The case's factors in a fixed order with their hidden weights (the reasoning template)."""
    return [
        (f"ECOG {case.ecog}", ECOG[case.ecog]),
        (f"stage {case.stage}", STAGE[case.stage]),
        (f"line {case.line}", LINE[case.line]),
        (f"{case.regimen} for {case.biomarker}", match_weight(case.biomarker, case.regimen)),
        (f"prior {case.prior_response}", PRIOR[case.prior_response]),
        ("LDH high" if case.ldh > 250 else "LDH normal", -0.6 if case.ldh > 250 else 0.0),
        ("albumin low" if case.albumin < 3.5 else "albumin normal", -0.6 * (case.albumin < 3.5)),
        ("brain mets" if case.brain_mets else "no brain mets", -0.5 * case.brain_mets),
    ]


def true_logit(case: Case) -> float:
    z = INTERCEPT + HISTOLOGY[case.histology]
    z += sum(w for _, w in factor_signs(case))
    z -= 0.3 * (case.hemoglobin < 10.0) + 0.3 * (case.age > 75)
    return SCALE * z


def true_probability(case: Case) -> float:
    return 1.0 / (1.0 + math.exp(-true_logit(case)))


def _rng(seed: int, split: str, salt: str = "") -> random.Random:
    # String seeds hash with sha512 inside random.Random, independent of PYTHONHASHSEED.
    return random.Random(f"tracelearn-clinical/{seed}/{split}/{salt}")


def sample_case(rng: random.Random) -> Case:
    line = rng.choices([1, 2, 3], [0.5, 0.33, 0.17])[0]
    biomarker = rng.choices(BIOMARKERS, BIOMARKER_P)[0]
    # Regimen follows the biomarker most of the time, with realistic off-label mismatches.
    if rng.random() < 0.6:
        regimen = {
            "EGFR": "osimertinib",
            "ALK": "alectinib",
            "KRAS G12C": "sotorasib",
            "PD-L1 high": "pembrolizumab",
        }.get(biomarker, "carboplatin-pemetrexed")
        if line >= 2 and regimen == "carboplatin-pemetrexed":
            regimen = "docetaxel"
    else:
        regimen = rng.choice(REGIMENS)
    return Case(
        age=max(30, min(89, round(rng.gauss(64, 10)))),
        sex=rng.choice(["man", "woman"]),
        ecog=rng.choices([0, 1, 2, 3], [0.33, 0.4, 0.19, 0.08])[0],
        stage=rng.choices(["II", "III", "IV"], [0.15, 0.3, 0.55])[0],
        histology=rng.choices(["adenocarcinoma", "squamous", "large cell"], [0.6, 0.3, 0.1])[0],
        biomarker=biomarker,
        line=line,
        regimen=regimen,
        prior_response="none" if line == 1 else rng.choice(["CR", "PR", "SD", "PD"]),
        ldh=round(rng.lognormvariate(math.log(230), 0.3)),
        albumin=round(rng.gauss(3.7, 0.45), 1),
        hemoglobin=round(rng.gauss(12.0, 1.6), 1),
        brain_mets=rng.random() < 0.25,
    )


@dataclass(frozen=True)
class Example:
    """One task instance: the case, its sampled outcome, the style it is written in, a stable id."""

    external_id: str
    split: str
    case: Case
    outcome: bool
    style: str = "narrative"

    @property
    def messages(self) -> list[dict[str, str]]:
        return build_messages(self.case, self.style)


SPLITS = ("train", "validation", "heldout")


def generate(
    seed: int, n: int, split: str = "train", styles: Sequence[str] | None = None
) -> list[Example]:
    """``n`` examples of ``split`` ("train", "validation" or "heldout"); identical for identical
    arguments.

    Each example is written in a style drawn uniformly from ``styles`` (default: the SEEN styles,
    mixed). The cases and outcomes depend on (seed, split) only: the same seed and split give the
    same cases in every style, so a style comparison is paired. The UNSEEN style is for
    evaluation only ("heldout"): asking for it in "train" or "validation" raises ValueError.
    Ids carry the style when ``styles`` is given, so one case in two styles never shares an id.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    chosen = tuple(styles) if styles is not None else SEEN_STYLES
    if not chosen or any(s not in STYLES for s in chosen):
        raise ValueError(f"styles must be a non-empty subset of {sorted(STYLES)}, got {chosen!r}")
    if split != "heldout" and UNSEEN_STYLE in chosen:
        raise ValueError(f"style {UNSEEN_STYLE!r} is unseen: held-out evaluation only")
    rng = _rng(seed, split)
    # Styles come from their own stream so that the cases and outcomes do not depend on them.
    style_rng = _rng(seed, split, "style")
    out = []
    for i in range(n):
        case = sample_case(rng)
        outcome = rng.random() < true_probability(case)
        style = chosen[0] if len(chosen) == 1 else style_rng.choice(chosen)
        suffix = "" if styles is None else f"-{style}"
        out.append(Example(f"clin-{split}-s{seed}-{i:06d}{suffix}", split, case, outcome, style))
    return out


# --- the styles a case is written in ---------------------------------------------------------------
# Every style renders every field the hidden model reads (tests perturb each field and parse the
# SI values back); rendering is a pure function of the case, only the style choice is random.

PRIOR_WORDS = {
    "CR": "complete response",
    "PR": "partial response",
    "SD": "stable disease",
    "PD": "progressive disease",
}
HISTOLOGY_ABBR = {"adenocarcinoma": "adeno", "squamous": "SCC", "large cell": "LCC"}
REGIMEN_ABBR = {"carboplatin-pemetrexed": "carbo/pem", "pembrolizumab": "pembro"}
LDH_UKAT_PER_U = 1 / 60
"""1 U/L = 1/60 µkat/L (16.67 nkat/L); two decimals keep every integer U/L value distinct."""


def _biomarker_phrase(case: Case) -> str:
    return "no actionable biomarker" if case.biomarker == "none" else f"{case.biomarker} positive"


def case_title(case: Mapping[str, Any]) -> str | None:
    """A case in a few words, e.g. "75-year-old woman · stage IV squamous · EGFR positive ·
    osimertinib (line 2)": what a reviewer recognises a prompt by. None when ``case`` (a stored
    trace's ``metadata.case``) lacks the fields."""
    try:
        c = Case(**{f: case[f] for f in Case.__dataclass_fields__})
    except (KeyError, TypeError):
        return None
    person = {"female": "woman", "male": "man"}.get(str(c.sex), str(c.sex))
    return (f"{c.age}-year-old {person} · stage {c.stage} {c.histology} · "
            f"{_biomarker_phrase(c)} · {c.regimen} (line {c.line})")


def narrative(case: Case) -> str:
    """The original single template: one sentence per block, US units."""
    prior = (
        "treatment-naive"
        if case.prior_response == "none"
        else f"prior therapy best response {case.prior_response}"
    )
    brain = "brain metastases present" if case.brain_mets else "no brain metastases"
    return (
        f"{case.age}-year-old {case.sex}, ECOG {case.ecog}, stage {case.stage} "
        f"{case.histology} of the lung, {_biomarker_phrase(case)}, {brain}. Line {case.line}: "
        f"{case.regimen}; {prior}. Labs: LDH {case.ldh} U/L, albumin {case.albumin} g/dL, "
        f"hemoglobin {case.hemoglobin} g/dL."
    )


def field_list(case: Case) -> str:
    """A structured record, one ``Field: value`` per line."""
    return "\n".join([
        f"Age: {case.age}",
        f"Sex: {'male' if case.sex == 'man' else 'female'}",
        f"ECOG: {case.ecog}",
        f"Stage: {case.stage}",
        f"Histology: {case.histology}",
        f"Biomarker: {case.biomarker}",
        f"Brain metastases: {'yes' if case.brain_mets else 'no'}",
        f"Line of therapy: {case.line}",
        f"Regimen: {case.regimen}",
        f"Prior best response: {case.prior_response}",
        f"LDH (U/L): {case.ldh}",
        f"Albumin (g/dL): {case.albumin}",
        f"Hemoglobin (g/dL): {case.hemoglobin}",
    ])


def clinic_note(case: Case) -> str:
    """A terse clinic note with abbreviations (PS, st, BM, 2L, alb, Hgb)."""
    bm = "no driver" if case.biomarker == "none" else f"{case.biomarker}+"
    prior = "tx-naive" if case.prior_response == "none" else f"prior best resp {case.prior_response}"
    regimen = REGIMEN_ABBR.get(case.regimen, case.regimen)
    return (
        f"{case.age}{'M' if case.sex == 'man' else 'F'} NSCLC, {HISTOLOGY_ABBR[case.histology]}, "
        f"st {case.stage}, PS {case.ecog}, {bm}, {'BM+' if case.brain_mets else 'BM-'}. "
        f"Plan {case.line}L {regimen}, {prior}. LDH {case.ldh}, alb {case.albumin}, "
        f"Hgb {case.hemoglobin}."
    )


def long_form(case: Case) -> str:
    """Full sentences in another order: the treatment first, then labs, then the patient."""
    prior = (
        "first-line treatment"
        if case.prior_response == "none"
        else f"previous best response {PRIOR_WORDS[case.prior_response]}"
    )
    brain = "brain metastases" if case.brain_mets else "no brain metastases"
    return (
        f"Planned: {case.regimen} as line {case.line}, {prior}. Hemoglobin {case.hemoglobin} "
        f"g/dL, albumin {case.albumin} g/dL, LDH {case.ldh} U/L. Tumour: "
        f"{_biomarker_phrase(case)}; {brain}. The patient, a {case.age}-year-old {case.sex} "
        f"with stage {case.stage} {case.histology}, has performance status ECOG {case.ecog}."
    )


def si_units(case: Case) -> str:
    """Another hospital's system: SI units (LDH µkat/L, albumin and haemoglobin g/L), British
    spellings, WHO performance status (the same 0-4 scale as ECOG)."""
    prior = (
        "no previous systemic therapy"
        if case.prior_response == "none"
        else f"best response to previous therapy {PRIOR_WORDS[case.prior_response]}"
    )
    bm = "no targetable alteration" if case.biomarker == "none" else f"{case.biomarker} detected"
    brain = "cerebral metastases" if case.brain_mets else "no cerebral metastases"
    return (
        f"{'Male' if case.sex == 'man' else 'Female'}, aged {case.age}, WHO performance status "
        f"{case.ecog}. Stage {case.stage} {case.histology} of the lung ({bm}; {brain}). "
        f"Line {case.line} therapy: {case.regimen}, {prior}. Bloods: LDH "
        f"{case.ldh * LDH_UKAT_PER_U:.2f} µkat/L, albumin {round(case.albumin * 10)} g/L, "
        f"haemoglobin {round(case.hemoglobin * 10)} g/L."
    )


STYLES: dict[str, Callable[[Case], str]] = {
    "narrative": narrative,
    "fields": field_list,
    "clinic_note": clinic_note,
    "long_form": long_form,
    "si_units": si_units,
}
UNSEEN_STYLE = "si_units"
"""Never in training or validation prompts, nor in the bundled model's tokenizer and warm-start:
held-out evaluation of how the learned policy transfers to a new way of writing the same case."""
SEEN_STYLES: tuple[str, ...] = tuple(s for s in STYLES if s != UNSEEN_STYLE)


def render(case: Case, style: str = "narrative") -> str:
    return STYLES[style](case)


def build_messages(case: Case, style: str = "narrative") -> list[dict[str, str]]:
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": f"{render(case, style)}\n{QUESTION}"},
    ]


# --- the weak deployed model's habits (also the noisy SFT demonstrations of the bootstrap) -------

# Final-line styles with their frequency in the demonstrations: the contract (exactly
# "ANSWER: YES"/"ANSWER: NO") is rare and its near-misses common, like a model that never learned
# the response contract.
FINAL_STYLES: list[tuple[str, float]] = [
    ("ANSWER: {YN}", 0.14),
    ("Answer: {yn}", 0.13),
    ("ANSWER: {YN}.", 0.12),
    ("Final answer: {YN}", 0.1),
    ("Prediction: PFS > 180 days {likely}", 0.12),
    ("ANSWER: LIKELY {YN}", 0.1),
    ("ANSWER: {YN} (low confidence)", 0.09),
    ("ANSWER: {Y}", 0.1),
    ("", 0.1),  # stops after the reasoning, no answer line at all
]


def signed_factors(case: Case) -> list[str]:
    """The reasoning's factor list: each non-neutral factor with its sign ("ECOG 2 -")."""
    # Neutral factors are left out to keep completions short (CPU sampling cost is per token).
    return [f"{name} {'+' if w > 0 else '-'}" for name, w in factor_signs(case) if abs(w) > 0.05]


def reasoning(case: Case, rng: random.Random, call_noise: float) -> tuple[str, bool]:
    """Signed factor list in a fixed order, then an overall call, wrong w.p. ``call_noise``."""
    parts = signed_factors(case)
    call = true_logit(case) > 0
    if rng.random() < call_noise:
        call = not call
    overall = "favorable" if call else "unfavorable"
    return "Factors: " + "; ".join(parts) + f".\nOverall: {overall}.", call


def final_line(style: str, yes: bool) -> str:
    return style.format(
        YN="YES" if yes else "NO",
        yn="yes" if yes else "no",
        Y="Y" if yes else "N",
        likely="likely" if yes else "unlikely",
    )


def weak_response(case: Case, rng: random.Random, call_noise: float = 0.15) -> str:
    """What the weak deployed model answers: sensible-looking reasoning, mostly broken contract."""
    text, call = reasoning(case, rng, call_noise)
    styles, weights = zip(*FINAL_STYLES, strict=True)
    style = rng.choices(styles, weights)[0]
    line = final_line(style, call)
    return f"{text}\n{line}" if line else text


def ingest_items(
    seed: int, n: int, split: str = "train", policy: str = DEFAULT_POLICY
) -> list[dict[str, Any]]:
    """Items for POST /v1/traces, one per example, each with its late outcome attached."""
    rng = _rng(seed, split, "responses")
    items = []
    for ex in generate(seed, n, split):
        items.append(
            {
                "external_id": ex.external_id,
                "policy": policy,
                "messages": ex.messages,
                "response": weak_response(ex.case, rng),
                "metadata": {
                    "task": "clinical-pfs",
                    "split": split,
                    "style": ex.style,
                    "case": asdict(ex.case),
                },
                "outcome": {"name": OUTCOME_NAME, "value": ex.outcome},
            }
        )
    return items


def bayes_optimal_accuracy(n: int = 200_000, seed: int = 0) -> float:
    """E[max(P, 1−P)] over the case distribution, by Monte Carlo (±0.002 at the default n)."""
    rng = _rng(seed, "bayes")
    total = 0.0
    for _ in range(n):
        p = true_probability(sample_case(rng))
        total += max(p, 1.0 - p)
    return total / n


def corpus_digest(styles: Sequence[str] | None = None) -> str:
    """Changes whenever the prompt/response formats or the set of styles (default: the SEEN ones)
    change; part of the bootstrap cache key (a model warm-started on other styles is never
    reused)."""
    styles = SEEN_STYLES if styles is None else styles
    probe = [e.case for e in generate(0, 3, "train")]
    blob = SYSTEM_PROMPT + QUESTION + repr(FINAL_STYLES) + repr(tuple(styles))
    blob += "".join(render(c, s) for s in styles for c in probe)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
