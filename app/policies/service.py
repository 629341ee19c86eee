"""Policies: what to train, how to grade, when, and what gate a candidate must pass.

Creating a policy also creates snapshot v0 — the bare base model — serving, so "the deployed
snapshot" is always defined.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.audit import record
from app.auth.service import Principal
from app.errors import Conflict, NotFound
from app.models import Policy, Snapshot, SnapshotStatus
from app.policies.schemas import PolicyCreate, PolicyOut, PolicyUpdate, SamplingSpec
from app.settings import get_settings
from workers.graders import Grader, get_grader
from workers.inference.base import SamplingParams


def served_name(policy_name: str, version: int) -> str:
    return f"{policy_name}-v{version}"


def default_base_model() -> str:
    settings = get_settings()
    return str(settings.base_model_dir or (settings.models_dir / "tiny"))


def sampling_params(
    policy: Policy,
    *,
    seed: int | None = None,
    max_tokens: int | None = None,
    temperature: float | None = None,
) -> SamplingParams:
    """How the policy samples — rollouts, evaluation, the proxy and the trainer's scoring all ask
    here. Never top-p/top-k: the stored log-probs must be those of the full distribution that
    was sampled (they are log π_ref). ``max_tokens``/``temperature`` override per call."""
    spec = SamplingSpec.model_validate(policy.sampling_params or {})
    return SamplingParams(
        max_tokens=int(max_tokens or spec.max_tokens),
        temperature=float(spec.temperature if temperature is None else temperature),
        seed=seed,
    )


def grader(policy: Policy) -> Grader:
    """The policy's grader, built from its spec (contract by default). A judge caches its
    verdicts under the data directory."""
    spec = dict(policy.grader_spec or {"kind": "contract"})
    if spec.get("kind") == "judge":
        spec.setdefault("cache_dir", str(get_settings().data_dir / "judge_cache"))
    return get_grader(spec)


def create_policy(session: Session, principal: Principal, data: PolicyCreate) -> Policy:
    if session.scalar(select(Policy.id).where(Policy.name == data.name)) is not None:
        raise Conflict(f"a policy named {data.name!r} already exists")
    policy = Policy(
        tenant=principal.tenant,
        name=data.name,
        base_model=data.base_model or default_base_model(),
        grader_spec=data.grader.model_dump(),
        sampling_params=data.sampling.model_dump(),
        group_size=data.group_size,
        schedule=data.schedule,
        gate=data.gate.model_dump(),
        training_config=data.training.model_dump(),
        redaction_enabled=data.redaction_enabled,
    )
    session.add(policy)
    try:
        session.flush()
    except IntegrityError as exc:
        raise Conflict(f"a policy named {data.name!r} already exists") from exc
    base = Snapshot(
        policy_id=policy.id,
        version=0,
        served_name=served_name(policy.name, 0),
        status=SnapshotStatus.serving,
        manifest={"base_model": policy.base_model},
    )
    session.add(base)
    session.flush()
    policy.serving_snapshot_id = base.id
    record(
        session,
        principal.tenant,
        principal.actor,
        "policy.create",
        "policy",
        policy.id,
        after=to_out(policy, base).model_dump(mode="json"),
    )
    return policy


def get_policy(session: Session, tenant: str, name: str) -> Policy:
    policy = session.scalar(select(Policy).where(Policy.name == name, Policy.tenant == tenant))
    if policy is None:
        raise NotFound(f"no policy named {name!r}")
    return policy


def list_policies(session: Session, tenant: str) -> list[Policy]:
    return list(session.scalars(select(Policy).where(Policy.tenant == tenant).order_by(Policy.id)))


def update_policy(session: Session, principal: Principal, name: str, data: PolicyUpdate) -> Policy:
    policy = get_policy(session, principal.tenant, name)
    before = to_out(policy).model_dump(mode="json")
    changes = data.model_dump(exclude_unset=True)
    column_of = {
        "grader": "grader_spec",
        "sampling": "sampling_params",
        "training": "training_config",
    }
    for key, value in changes.items():
        setattr(policy, column_of.get(key, key), value)
    session.flush()
    record(
        session,
        principal.tenant,
        principal.actor,
        "policy.update",
        "policy",
        policy.id,
        before=before,
        after=to_out(policy).model_dump(mode="json"),
    )
    return policy


def to_out(policy: Policy, serving: Snapshot | None = None) -> PolicyOut:
    serving = serving or policy.serving_snapshot
    return PolicyOut(
        id=policy.id,
        name=policy.name,
        tenant=policy.tenant,
        base_model=policy.base_model,
        grader=policy.grader_spec,
        sampling=policy.sampling_params,
        group_size=policy.group_size,
        schedule=policy.schedule,
        gate=policy.gate,
        training=policy.training_config,
        redaction_enabled=policy.redaction_enabled,
        serving_snapshot_id=policy.serving_snapshot_id,
        serving_snapshot=serving.served_name if serving else None,
        created_at=policy.created_at,
        updated_at=policy.updated_at,
    )
