"""IMAP: \\Recent bookkeeping shared by every session (RFC 3501 §2.3.2)

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Highest UID already announced as \Recent to some session: exactly one session sees a
    # message as recent (RFC 3501 §2.3.2), across processes sharing the database.
    with op.batch_alter_table('mailbox', schema=None) as batch_op:
        batch_op.add_column(
            sa.Column('recent_uid', sa.BigInteger(), nullable=False, server_default='0')
        )


def downgrade() -> None:
    with op.batch_alter_table('mailbox', schema=None) as batch_op:
        batch_op.drop_column('recent_uid')
