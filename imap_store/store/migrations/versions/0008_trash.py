"""Trash purge (issue 11, ``imap_store/store/housekeeping.py``): ``message.trashed_at``, the
time a message entered the patient's ``\\Trash`` mailbox (set by COPY/MOVE into it, cleared on
the copy that leaves it), with a partial index so the hourly purge reads only trashed rows.
Messages already in Trash are stamped with the time of this migration: they stay
``[web] trash_days`` from now, never purged at the first start.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('message', sa.Column('trashed_at', sa.DateTime(timezone=True), nullable=True))
    where = sa.text('trashed_at IS NOT NULL')
    op.create_index('ix_message_trashed_at', 'message', ['trashed_at'],
                    sqlite_where=where, postgresql_where=where)
    message = sa.table('message', sa.column('mailbox_id', sa.Integer()),
                       sa.column('trashed_at', sa.DateTime(timezone=True)))
    mailbox = sa.table('mailbox', sa.column('id', sa.Integer()),
                       sa.column('special_use', sa.String()))
    op.execute(
        message.update()
        .where(message.c.mailbox_id.in_(
            sa.select(mailbox.c.id).where(mailbox.c.special_use == '\\Trash')))
        .values(trashed_at=datetime.now(UTC))
    )


def downgrade() -> None:
    op.drop_index('ix_message_trashed_at', table_name='message')
    with op.batch_alter_table('message') as batch:
        batch.drop_column('trashed_at')
