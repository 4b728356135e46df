"""idempotency key leases, ledger totals, application secrets

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-30 09:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("idempotency_keys", schema=None) as batch_op:
        batch_op.add_column(sa.Column("owner", sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column("lease_expires_at", sa.DateTime(timezone=True),
                                      nullable=True))
    op.create_table(
        "ledger_totals",
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("shard", sa.Integer(), nullable=False),
        sa.Column("calls", sa.BigInteger(), nullable=False),
        sa.Column("prompt_tokens", sa.BigInteger(), nullable=False),
        sa.Column("cached_tokens", sa.BigInteger(), nullable=False),
        sa.Column("completion_tokens", sa.BigInteger(), nullable=False),
        sa.Column("cost_usd", sa.Numeric(precision=20, scale=10), nullable=False),
        sa.Column("energy_wh", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("model", "shard", name=op.f("pk_ledger_totals")),
    )
    # The ledger so far, in shard 0 of each model.
    op.execute(
        "INSERT INTO ledger_totals (model, shard, calls, prompt_tokens, cached_tokens, "
        "completion_tokens, cost_usd, energy_wh) "
        "SELECT model, 0, count(*), coalesce(sum(prompt_tokens), 0), "
        "coalesce(sum(cached_tokens), 0), coalesce(sum(completion_tokens), 0), "
        "coalesce(sum(cost_usd), 0), coalesce(sum(energy_wh), 0) "
        "FROM model_calls GROUP BY model")
    op.create_table(
        "app_secrets",
        sa.Column("name", sa.String(length=60), nullable=False),
        sa.Column("value", sa.String(length=200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_app_secrets")),
    )


def downgrade() -> None:
    op.drop_table("app_secrets")
    op.drop_table("ledger_totals")
    with op.batch_alter_table("idempotency_keys", schema=None) as batch_op:
        batch_op.drop_column("lease_expires_at")
        batch_op.drop_column("owner")
