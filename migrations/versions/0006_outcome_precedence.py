"""outcomes.origin and outcomes.labelled_at: what outcome precedence is decided on

An outcome now records how it arrived (``origin``: ``inline`` with its trace, or ``feedback``
afterwards, Langfuse scores included) and when it was labelled (``labelled_at``). A stored label
is replaced only by one that outranks it: feedback over inline, and within one origin the later
label (``app.traces.outcomes``).

Rows stored before this revision cannot say how they arrived; they become ``feedback`` (the rank
that nothing weaker can override, so no stored label is lost to a late inline value) labelled at
their ``updated_at``.

Revision ID: 0006_outcome_precedence
Revises: 0005_training_config_round_keys
Create Date: 2026-12-03 09:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006_outcome_precedence"
down_revision: str | None = "0005_training_config_round_keys"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("outcomes", schema=None) as batch_op:
        batch_op.add_column(sa.Column(
            "origin",
            sa.Enum("inline", "feedback", name="outcomeorigin", native_enum=False, length=32),
            nullable=False, server_default="feedback",
        ))
        batch_op.add_column(sa.Column("labelled_at", sa.DateTime(timezone=True), nullable=True))
    op.execute("UPDATE outcomes SET labelled_at = updated_at")
    with op.batch_alter_table("outcomes", schema=None) as batch_op:
        batch_op.alter_column("labelled_at", existing_type=sa.DateTime(timezone=True),
                              nullable=False)


def downgrade() -> None:
    with op.batch_alter_table("outcomes", schema=None) as batch_op:
        batch_op.drop_column("labelled_at")
        batch_op.drop_column("origin")
