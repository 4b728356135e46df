"""ledger: time to first token, cache hit, escalation, energy

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-22 05:10:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("model_calls", schema=None) as batch_op:
        batch_op.add_column(sa.Column("ttft_ms", sa.Double(), nullable=True))
        batch_op.add_column(sa.Column("cache_hit", sa.Boolean(), nullable=True))
        batch_op.add_column(sa.Column("escalated_from", sa.String(length=200), nullable=True))
        batch_op.add_column(sa.Column("energy_wh", sa.Double(), nullable=True))
        batch_op.add_column(sa.Column("energy_method", sa.String(length=20), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("model_calls", schema=None) as batch_op:
        batch_op.drop_column("energy_method")
        batch_op.drop_column("energy_wh")
        batch_op.drop_column("escalated_from")
        batch_op.drop_column("cache_hit")
        batch_op.drop_column("ttft_ms")
