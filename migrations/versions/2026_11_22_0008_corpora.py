"""corpora: documents, chunks

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-22 06:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "corpora",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("description", sa.String(length=1000), nullable=True),
        sa.Column("document_count", sa.Integer(), nullable=False),
        sa.Column("chunk_count", sa.Integer(), nullable=False),
        sa.Column("revision", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["tenants.id"],
            name=op.f("fk_corpora_tenant_id_tenants"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_corpora")),
    )
    with op.batch_alter_table("corpora", schema=None) as batch_op:
        batch_op.create_index(
            "ix_corpora_tenant_created", ["tenant_id", "created_at", "id"], unique=False
        )

    op.create_table(
        "corpus_documents",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("corpus_id", sa.String(length=40), nullable=False),
        sa.Column("title", sa.String(length=300), nullable=False),
        sa.Column("filename", sa.String(length=300), nullable=True),
        sa.Column("content_type", sa.String(length=40), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("char_count", sa.Integer(), nullable=False),
        sa.Column("chunk_count", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["corpus_id"],
            ["corpora.id"],
            name=op.f("fk_corpus_documents_corpus_id_corpora"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_corpus_documents")),
        sa.UniqueConstraint("corpus_id", "sha256", name="uq_corpus_documents_corpus_sha256"),
    )
    with op.batch_alter_table("corpus_documents", schema=None) as batch_op:
        batch_op.create_index(
            "ix_corpus_documents_corpus_created", ["corpus_id", "created_at", "id"], unique=False
        )

    op.create_table(
        "corpus_chunks",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("corpus_id", sa.String(length=40), nullable=False),
        sa.Column("document_id", sa.String(length=40), nullable=False),
        sa.Column("ordinal", sa.Integer(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("char_start", sa.Integer(), nullable=False),
        sa.Column("char_end", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["corpus_id"],
            ["corpora.id"],
            name=op.f("fk_corpus_chunks_corpus_id_corpora"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["document_id"],
            ["corpus_documents.id"],
            name=op.f("fk_corpus_chunks_document_id_corpus_documents"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_corpus_chunks")),
        sa.UniqueConstraint("document_id", "ordinal", name="uq_corpus_chunks_document_ordinal"),
    )
    with op.batch_alter_table("corpus_chunks", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_corpus_chunks_corpus_id"), ["corpus_id"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("corpus_chunks", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_corpus_chunks_corpus_id"))

    op.drop_table("corpus_chunks")
    with op.batch_alter_table("corpus_documents", schema=None) as batch_op:
        batch_op.drop_index("ix_corpus_documents_corpus_created")

    op.drop_table("corpus_documents")
    with op.batch_alter_table("corpora", schema=None) as batch_op:
        batch_op.drop_index("ix_corpora_tenant_created")

    op.drop_table("corpora")
