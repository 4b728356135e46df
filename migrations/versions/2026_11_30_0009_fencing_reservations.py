"""fencing: reservations per call, ledger rows carry their run and position

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-30 09:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

MONEY = sa.Numeric(20, 10)


def upgrade() -> None:
    op.create_table(
        "reservations",
        sa.Column("request_id", sa.String(length=120), nullable=False),
        sa.Column("job_id", sa.String(length=40), nullable=False),
        sa.Column("step_id", sa.String(length=40), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("tokens", sa.BigInteger(), nullable=False),
        sa.Column("cost_usd", MONEY, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"],
                                name=op.f("fk_reservations_job_id_jobs"), ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["step_id"], ["steps.id"],
                                name=op.f("fk_reservations_step_id_steps"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("request_id", name=op.f("pk_reservations")),
    )
    with op.batch_alter_table("reservations", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_reservations_job_id"), ["job_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_reservations_step_id"), ["step_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_reservations_expires_at"), ["expires_at"],
                              unique=False)

    with op.batch_alter_table("tenants", schema=None) as batch_op:
        batch_op.add_column(sa.Column("webhooks_version", sa.BigInteger(), nullable=False,
                                      server_default="0"))
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.add_column(sa.Column("priority", sa.Integer(), nullable=True))

    with op.batch_alter_table("model_calls", schema=None) as batch_op:
        batch_op.add_column(sa.Column("attempt", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("call_index", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("settled_late", sa.String(length=20), nullable=True))

    # Rows written before: `{step id}:{index}`.
    conn = op.get_bind()
    if conn.dialect.name == "postgresql":
        conn.execute(sa.text(
            "UPDATE model_calls SET call_index = CAST(split_part(request_id, ':', 2) AS INTEGER)"
            " WHERE call_index IS NULL AND request_id ~ '^[^:]+:[0-9]+$'"))
    else:
        conn.execute(sa.text(
            "UPDATE model_calls SET call_index = "
            "CAST(substr(request_id, instr(request_id, ':') + 1) AS INTEGER) "
            "WHERE call_index IS NULL AND instr(request_id, ':') > 0"))

    # A step's outstanding reservation (its run died between reserving and settling) becomes
    # one expired reservation row: the next claim of the step, or the sweeper, releases it.
    conn.execute(sa.text(
        "INSERT INTO reservations (request_id, job_id, step_id, attempt, tokens, cost_usd, "
        "created_at, expires_at) "
        "SELECT id || '\\:legacy', job_id, id, attempt, reserved_tokens, reserved_cost_usd, "
        "CURRENT_TIMESTAMP, CURRENT_TIMESTAMP FROM steps "
        "WHERE reserved_tokens <> 0 OR reserved_cost_usd <> 0"))
    with op.batch_alter_table("steps", schema=None) as batch_op:
        batch_op.drop_column("reserved_tokens")
        batch_op.drop_column("reserved_cost_usd")
        batch_op.create_index("ix_steps_status_lease", ["status", "lease_expires_at"],
                              unique=False)


def downgrade() -> None:
    with op.batch_alter_table("steps", schema=None) as batch_op:
        batch_op.drop_index("ix_steps_status_lease")
        batch_op.add_column(sa.Column("reserved_tokens", sa.BigInteger(), nullable=False,
                                      server_default="0"))
        batch_op.add_column(sa.Column("reserved_cost_usd", MONEY, nullable=False,
                                      server_default="0"))
    conn = op.get_bind()
    conn.execute(sa.text(
        "UPDATE steps SET reserved_tokens = COALESCE((SELECT SUM(r.tokens) FROM reservations r "
        "WHERE r.step_id = steps.id), 0), reserved_cost_usd = COALESCE((SELECT "
        "SUM(r.cost_usd) FROM reservations r WHERE r.step_id = steps.id), 0)"))
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.drop_column("priority")
    with op.batch_alter_table("tenants", schema=None) as batch_op:
        batch_op.drop_column("webhooks_version")
    with op.batch_alter_table("model_calls", schema=None) as batch_op:
        batch_op.drop_column("settled_late")
        batch_op.drop_column("call_index")
        batch_op.drop_column("attempt")
    with op.batch_alter_table("reservations", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_reservations_expires_at"))
        batch_op.drop_index(batch_op.f("ix_reservations_step_id"))
        batch_op.drop_index(batch_op.f("ix_reservations_job_id"))
    op.drop_table("reservations")
