"""ledger: call cache keys

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-22 05:05:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("model_calls", schema=None) as batch_op:
        batch_op.add_column(sa.Column("call_key", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("cached_from", sa.String(length=120), nullable=True))
        batch_op.create_index("ix_model_calls_job_call_key", ["job_id", "call_key"],
                              unique=False)


def downgrade() -> None:
    with op.batch_alter_table("model_calls", schema=None) as batch_op:
        batch_op.drop_index("ix_model_calls_job_call_key")
        batch_op.drop_column("cached_from")
        batch_op.drop_column("call_key")
