"""policies.training_config: the learner's round keys replace steps / adam_betas / filter_zero_variance

A run is now one round of ``epochs × ⌈groups / groups_per_step⌉`` steps. Stored configs are
translated so they keep validating: ``steps: N`` (N full-batch steps) becomes ``epochs: N`` with
``groups_per_step`` large enough for one step per epoch, ``adam_betas: [b1, b2]`` becomes
``adam_beta1``/``adam_beta2`` and ``filter_zero_variance: x`` becomes
``keep_zero_variance_groups: not x``.

Revision ID: 0005_training_config_round_keys
Revises: 0004_job_replans
Create Date: 2026-12-02 05:40:00
"""

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0005_training_config_round_keys"
down_revision: str | None = "0004_job_replans"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ONE_STEP_PER_EPOCH = 1_000_000

policies = sa.table("policies", sa.column("id", sa.Integer), sa.column("training_config", sa.JSON))


def translate(config: dict[str, Any]) -> dict[str, Any]:
    out = dict(config)
    if "steps" in out:
        out["epochs"] = int(out.pop("steps"))
        out.setdefault("groups_per_step", ONE_STEP_PER_EPOCH)
    if "adam_betas" in out:
        b1, b2 = out.pop("adam_betas")
        out["adam_beta1"], out["adam_beta2"] = float(b1), float(b2)
    if "filter_zero_variance" in out:
        out["keep_zero_variance_groups"] = not bool(out.pop("filter_zero_variance"))
    return out


def upgrade() -> None:
    conn = op.get_bind()
    for pid, config in conn.execute(sa.select(policies.c.id, policies.c.training_config)).all():
        if config and translate(config) != config:
            conn.execute(policies.update().where(policies.c.id == pid)
                         .values(training_config=translate(config)))


def downgrade() -> None:
    # The old keys cannot express a multi-step round; configs keep the new keys.
    pass
