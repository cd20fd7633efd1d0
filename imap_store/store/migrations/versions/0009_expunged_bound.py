"""A bounded ``expunged`` (issue 13): the hourly housekeeping keeps the newest
``EXPUNGED_KEEP`` expunged UIDs of each mailbox and deletes older ones, and
``mailbox.vanished_modseq`` remembers the highest MODSEQ it deleted. A QRESYNC client whose
MODSEQ is below it gets a superset in VANISHED (EARLIER): every UID of its known range that is
not in the mailbox (RFC 7162 §3.2.5.2, §3.2.10).

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('mailbox', sa.Column('vanished_modseq', sa.BigInteger(), nullable=False,
                                       server_default='0'))


def downgrade() -> None:
    with op.batch_alter_table('mailbox') as batch:
        batch.drop_column('vanished_modseq')
