"""tenants: per-tenant settings, starting with the PII redaction mode

``redaction_mode`` is ``mask`` (the behaviour before this revision: ``[EMAIL]``), ``hash`` (a
stable keyed token per value, ``[EMAIL:3fa2c1d4e5f6]``) or ``off``. A tenant without a row has
the default, so no row is written here: existing tenants keep masking.

Revision ID: 0007_tenant_redaction_mode
Revises: 0006_outcome_precedence
Create Date: 2026-12-04 09:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007_tenant_redaction_mode"
down_revision: str | None = "0006_outcome_precedence"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "tenants",
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column(
            "redaction_mode",
            sa.Enum("mask", "hash", "off", name="redactionmode", native_enum=False, length=32),
            nullable=False,
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_tenants")),
    )


def downgrade() -> None:
    op.drop_table("tenants")
