"""Subscriptions on names (issue 13): the ``subscription`` table replaces the
``mailbox.subscribed`` column, so that a subscription outlives DELETE (RFC 3501 §6.3.6: the
server must not remove a name from the subscriptions by itself) and LSUB / LIST (SUBSCRIBED)
can still show a subscribed name whose mailbox is gone (RFC 3501 §6.3.9, RFC 5258 §3.1).

The column is dropped with SQLite's own ``ALTER TABLE ... DROP COLUMN`` (3.35+), not by a
batch copy of the table: copying ``mailbox`` drops the old table, and with foreign keys on
that would cascade to every message and expunged row.

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'subscription',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('patient_id', sa.Integer(), nullable=False),
        sa.Column('name', sa.String(length=255), nullable=False),
        sa.ForeignKeyConstraint(['patient_id'], ['patient.id'],
                                name=op.f('fk_subscription_patient_id_patient'),
                                ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_subscription')),
        sa.UniqueConstraint('patient_id', 'name', name='uq_subscription_patient_name'),
    )
    op.execute("INSERT INTO subscription (patient_id, name) "
               "SELECT patient_id, name FROM mailbox WHERE subscribed <> 0")
    op.drop_column('mailbox', 'subscribed')


def downgrade() -> None:
    # A name whose mailbox is gone has nowhere to go in the column: it is forgotten. The
    # server default stays (SQLite cannot drop it without copying the table, see above);
    # the code of 0009 always sets the column.
    op.add_column('mailbox', sa.Column('subscribed', sa.Integer(), nullable=False,
                                       server_default='0'))
    op.execute("UPDATE mailbox SET subscribed = 1 WHERE EXISTS (SELECT 1 FROM subscription s "
               "WHERE s.patient_id = mailbox.patient_id AND s.name = mailbox.name)")
    op.drop_table('subscription')
