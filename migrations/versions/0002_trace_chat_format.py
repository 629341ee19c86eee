"""traces in the OpenAI chat format: response message, request (tools, sampling params),
finish_reason, usage, tags, user/session ids, trainable flag

Revision ID: 0002_trace_chat_format
Revises: 0001
Create Date: 2026-12-02 05:10:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0002_trace_chat_format'
down_revision: str | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql')


def upgrade() -> None:
    with op.batch_alter_table('traces', schema=None) as batch_op:
        batch_op.add_column(sa.Column('response_message', JSON, nullable=True))
        batch_op.add_column(
            sa.Column('request', JSON, nullable=False, server_default=sa.text("'{}'"))
        )
        batch_op.add_column(sa.Column('finish_reason', sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column('usage', JSON, nullable=True))
        batch_op.add_column(sa.Column('tags', JSON, nullable=True))
        batch_op.add_column(sa.Column('user_id', sa.String(length=256), nullable=True))
        batch_op.add_column(sa.Column('session_id', sa.String(length=256), nullable=True))
        batch_op.add_column(
            sa.Column('trainable', sa.Boolean(), nullable=False, server_default=sa.true())
        )
        batch_op.add_column(sa.Column('untrainable_reason', sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('traces', schema=None) as batch_op:
        for name in ('untrainable_reason', 'trainable', 'session_id', 'user_id', 'tags',
                     'usage', 'finish_reason', 'request', 'response_message'):
            batch_op.drop_column(name)
