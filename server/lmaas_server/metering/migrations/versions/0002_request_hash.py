"""Idempotency keys bound to the request: the SHA-256 of the body of the request that used the key.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # nullable: rows from before this revision (and rows without an Idempotency-Key) have no hash to compare
    op.add_column("ledger", sa.Column("request_hash", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("ledger") as batch:  # SQLite drops columns by copying the table
        batch.drop_column("request_hash")
