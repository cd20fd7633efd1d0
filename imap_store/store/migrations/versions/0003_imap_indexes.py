"""IMAP: indexes that let SELECT, FETCH FLAGS, SEARCH and EXPUNGE skip the wide message rows;
blob references (expunged bodies are deleted); the header fields SEARCH compares, case-folded

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import json

import sqlalchemy as sa
from alembic import op


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('message', schema=None) as batch_op:
        # (uid, flags) of a mailbox from the index alone, never the wide rows that carry
        # ``meta`` (the part Dovecot's index file plays).
        batch_op.create_index(
            'ix_message_mailbox_uid_flags', ['mailbox_id', 'uid', 'flags', 'blob_id'],
            unique=False,
        )
        # The few messages with keywords (keywords stay out of the index above: up to 5 KB,
        # more than a PostgreSQL index entry may hold).
        batch_op.create_index(
            'ix_message_mailbox_keywords', ['mailbox_id', 'uid'], unique=False,
            sqlite_where=sa.text("keywords != ''"), postgresql_where=sa.text("keywords != ''"),
        )
        # An expunged message's body is deleted when nothing references it any more.
        batch_op.create_index('ix_message_blob_id', ['blob_id'], unique=False)
    with op.batch_alter_table('outbound', schema=None) as batch_op:
        batch_op.create_index('ix_outbound_blob_id', ['blob_id'], unique=False)
    # SEARCH FROM/TO/CC/BCC/SUBJECT: the decoded header fields of a body, case-folded, in narrow
    # rows (filled at APPEND, here for the stored messages, and on the first SEARCH for
    # messages stored without them).
    op.create_table(
        'blob_search',
        sa.Column('blob_id', sa.Integer(), nullable=False),
        sa.Column('from_text', sa.Text(), nullable=True),
        sa.Column('to_text', sa.Text(), nullable=True),
        sa.Column('cc_text', sa.Text(), nullable=True),
        sa.Column('bcc_text', sa.Text(), nullable=True),
        sa.Column('subject_text', sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(['blob_id'], ['blob.id'],
                                name=op.f('fk_blob_search_blob_id_blob'), ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('blob_id', name=op.f('pk_blob_search')),
    )
    _fill_blob_search()


#: blob_search columns and the search header they hold (as imap_store.store.mailboxes.search_values).
_FIELDS = (('from_text', 'from'), ('to_text', 'to'), ('cc_text', 'cc'), ('bcc_text', 'bcc'),
           ('subject_text', 'subject'))


def _values(meta: str | None) -> dict[str, str | None] | None:
    try:
        headers = json.loads(meta or '')['search_headers']
    except (ValueError, TypeError, KeyError):
        return None
    if not isinstance(headers, dict):
        return None
    out: dict[str, str | None] = {}
    for column, field in _FIELDS:
        value = headers.get(field)
        out[column] = value.casefold() if isinstance(value, str) else None
    return out


def _fill_blob_search() -> None:
    bind = op.get_bind()
    message = sa.table('message', sa.column('blob_id', sa.Integer),
                       sa.column('meta', sa.Text))
    target = sa.table('blob_search', sa.column('blob_id', sa.Integer),
                      *(sa.column(column, sa.Text) for column, _field in _FIELDS))
    last = 0
    while True:
        rows = bind.execute(
            sa.select(message.c.blob_id, sa.func.min(message.c.meta))
            .where(message.c.blob_id > last).group_by(message.c.blob_id)
            .order_by(message.c.blob_id).limit(500)
        ).all()
        if not rows:
            break
        last = rows[-1][0]
        values = []
        for blob_id, meta in rows:
            found = _values(meta)
            if found is not None:
                values.append({'blob_id': blob_id, **found})
        if values:
            bind.execute(sa.insert(target), values)


def downgrade() -> None:
    op.drop_table('blob_search')
    with op.batch_alter_table('outbound', schema=None) as batch_op:
        batch_op.drop_index('ix_outbound_blob_id')
    with op.batch_alter_table('message', schema=None) as batch_op:
        batch_op.drop_index('ix_message_blob_id')
        batch_op.drop_index('ix_message_mailbox_keywords')
        batch_op.drop_index('ix_message_mailbox_uid_flags')
