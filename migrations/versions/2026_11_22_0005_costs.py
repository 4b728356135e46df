"""costs

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-22 03:43:55.761617
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "cost_usd",
                sa.Numeric(precision=20, scale=10),
                nullable=False,
                server_default=sa.text("0"),
            )
        )
        batch_op.add_column(
            sa.Column(
                "reserved_cost_usd",
                sa.Numeric(precision=20, scale=10),
                nullable=False,
                server_default=sa.text("0"),
            )
        )

    with op.batch_alter_table("model_calls", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("cost_usd", sa.Numeric(precision=20, scale=10), nullable=True)
        )

    with op.batch_alter_table("steps", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "reserved_cost_usd",
                sa.Numeric(precision=20, scale=10),
                nullable=False,
                server_default=sa.text("0"),
            )
        )


def downgrade() -> None:
    with op.batch_alter_table("steps", schema=None) as batch_op:
        batch_op.drop_column("reserved_cost_usd")

    with op.batch_alter_table("model_calls", schema=None) as batch_op:
        batch_op.drop_column("cost_usd")

    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("reserved_cost_usd")
        batch_op.drop_column("cost_usd")
