"""cache_generations: counters that keep the API's process caches exact

The API caches API keys and policies in each process (``app.cache``) and reads these counters as
the first statement of every request; a changed counter empties that cache. Triggers bump them in
the transaction that changes the rows, so a revoked key fails on the very next request in every
process, whoever revoked it (API, CLI, a worker, plain SQL), and no code path can forget to bump.

``api_keys`` counts any change to ``api_keys``; ``policies`` any change to ``policies`` and
``tenants`` (a tenant's redaction mode, read on every ingest) and the served names of ``snapshots`` (the ingest path maps a trace's ``model`` to its snapshot), but not
snapshot status updates, which workers make often and which no cache holds.

The counters start at a random value so that two databases (a dropped and recreated one under the
same URL) never share a generation. On SQLite, a later ``batch_alter_table`` on ``api_keys``,
``policies`` or ``snapshots`` recreates the table and drops its triggers: such a migration must
create them again (``tests/shells/api/test_cache_generations.py`` checks they exist at head).

Revision ID: 0008_cache_generations
Revises: 0007_tenant_redaction_mode
Create Date: 2026-12-02 09:00:00
"""

import secrets
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008_cache_generations"
down_revision: str | None = "0007_tenant_redaction_mode"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# (table, counter, the UPDATE columns that count; None: every column)
WATCHED: tuple[tuple[str, str, tuple[str, ...] | None], ...] = (
    ("api_keys", "api_keys", None),
    ("policies", "policies", None),
    ("snapshots", "policies", ("served_name", "policy_id")),
    ("tenants", "policies", None),
)


def _bump(counter: str) -> str:
    return f"UPDATE cache_generations SET generation = generation + 1 WHERE name = '{counter}'"


def upgrade() -> None:
    table = op.create_table(
        "cache_generations",
        sa.Column("name", sa.String(length=32), nullable=False),
        sa.Column("generation", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_cache_generations")),
    )
    counters = sorted({counter for _, counter, _ in WATCHED})
    op.bulk_insert(table, [{"name": c, "generation": secrets.randbits(48)} for c in counters])
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            "CREATE FUNCTION bump_cache_generation() RETURNS trigger LANGUAGE plpgsql AS $$ "
            "BEGIN UPDATE cache_generations SET generation = generation + 1 "
            "WHERE name = TG_ARGV[0]; RETURN NULL; END $$"
        )
        for table_name, counter, columns in WATCHED:
            update = f"UPDATE OF {', '.join(columns)}" if columns else "UPDATE"
            truncate = "" if columns else " OR TRUNCATE"
            # Statement-level: one bump per statement, however many rows it touched.
            op.execute(
                f"CREATE TRIGGER {table_name}_bump_cache AFTER INSERT OR {update} OR DELETE"
                f"{truncate} ON {table_name} FOR EACH STATEMENT "
                f"EXECUTE FUNCTION bump_cache_generation('{counter}')"
            )
        return
    for table_name, counter, columns in WATCHED:
        update = f"UPDATE OF {', '.join(columns)}" if columns else "UPDATE"
        for event in ("INSERT", update, "DELETE"):
            op.execute(
                f"CREATE TRIGGER {table_name}_bump_cache_{event.split()[0].lower()} "
                f"AFTER {event} ON {table_name} FOR EACH ROW BEGIN {_bump(counter)}; END"
            )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for table_name, _, _ in WATCHED:
            op.execute(f"DROP TRIGGER {table_name}_bump_cache ON {table_name}")
        op.execute("DROP FUNCTION bump_cache_generation()")
    else:
        for table_name, _, _ in WATCHED:
            for event in ("insert", "update", "delete"):
                op.execute(f"DROP TRIGGER {table_name}_bump_cache_{event}")
    op.drop_table("cache_generations")
