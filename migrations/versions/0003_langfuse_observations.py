"""langfuse_observations: Langfuse traces and generations staged until complete

Revision ID: 0003_langfuse_observations
Revises: 0002_trace_chat_format
Create Date: 2026-12-02 05:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0003_langfuse_observations'
down_revision: str | None = '0002_trace_chat_format'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('langfuse_observations',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('tenant', sa.String(length=128), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('lf_id', sa.String(length=256), nullable=False),
    sa.Column('lf_trace_id', sa.String(length=256), nullable=True),
    sa.Column('body', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('trace_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['trace_id'], ['traces.id'], name=op.f('fk_langfuse_observations_trace_id_traces'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_langfuse_observations')),
    sa.UniqueConstraint('tenant', 'kind', 'lf_id', name=op.f('uq_langfuse_observations_tenant'))
    )
    with op.batch_alter_table('langfuse_observations', schema=None) as batch_op:
        batch_op.create_index('ix_langfuse_observations_trace', ['tenant', 'lf_trace_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('langfuse_observations', schema=None) as batch_op:
        batch_op.drop_index('ix_langfuse_observations_trace')
    op.drop_table('langfuse_observations')
