"""service tiers: a job's tier, a flex job's deadline (and when it was promoted) and the
planned start of one that waits for a cheap or clean hour; the tier, price of power and
carbon intensity of each ledger row; each step's tenant and broker priority, and the index
that counts and releases a tenant's waiting steps (`queued` in the broker, `held` in the
database)

Revision ID: 0014
Revises: 0013
Create Date: 2026-11-30 19:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

WAITING = sa.text("status IN ('queued', 'held')")


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("service_tier", sa.String(length=20), nullable=False,
                                      server_default="standard"))
        batch_op.add_column(sa.Column("due_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("promoted_at", sa.DateTime(timezone=True),
                                      nullable=True))
        batch_op.add_column(sa.Column("optimize", sa.String(length=10), nullable=True))
        batch_op.add_column(sa.Column("planned_start_at", sa.DateTime(timezone=True),
                                      nullable=True))
        batch_op.create_index("ix_jobs_due_at", ["due_at"], unique=False)
    with op.batch_alter_table("model_calls", schema=None) as batch_op:
        batch_op.add_column(sa.Column("service_tier", sa.String(length=20), nullable=True))
        batch_op.add_column(sa.Column("power_price", sa.Double(), nullable=True))
        batch_op.add_column(sa.Column("carbon_intensity", sa.Double(), nullable=True))
    with op.batch_alter_table("steps", schema=None) as batch_op:
        batch_op.add_column(sa.Column("tenant_id", sa.String(length=40), nullable=True))
        batch_op.add_column(sa.Column("priority", sa.Integer(), nullable=True))
    # Steps that may still run learn their tenant; finished ones are never counted.
    op.execute("UPDATE steps SET tenant_id = (SELECT jobs.tenant_id FROM jobs "
               "WHERE jobs.id = steps.job_id) WHERE status IN ('pending', 'queued', 'running')")
    op.create_index("ix_steps_waiting", "steps", ["tenant_id", "status", "priority",
                                                  "created_at"], unique=False,
                    postgresql_where=WAITING, sqlite_where=WAITING)


def downgrade() -> None:
    op.drop_index("ix_steps_waiting", table_name="steps")
    with op.batch_alter_table("steps", schema=None) as batch_op:
        batch_op.drop_column("priority")
        batch_op.drop_column("tenant_id")
    with op.batch_alter_table("model_calls", schema=None) as batch_op:
        batch_op.drop_column("carbon_intensity")
        batch_op.drop_column("power_price")
        batch_op.drop_column("service_tier")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_jobs_due_at")
        batch_op.drop_column("planned_start_at")
        batch_op.drop_column("optimize")
        batch_op.drop_column("promoted_at")
        batch_op.drop_column("due_at")
        batch_op.drop_column("service_tier")
