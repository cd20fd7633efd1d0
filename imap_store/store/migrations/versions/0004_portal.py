"""Patient portal: web sessions with their one-time code, the patient's phone for the code by
SMS, conversation ids (thread_id = the conversation's first Message-ID) and an attachment flag

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import json
from typing import Any

import sqlalchemy as sa
from alembic import op


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def _thread_id(message_id: str | None, in_reply_to: str | None,
               references: str | None) -> str | None:
    # The same rule as imap_store.store.deliver.thread_id (copied: a migration is frozen).
    refs = (references or "").split()
    root = refs[0] if refs else (in_reply_to or message_id)
    return root[:998] if root else None


def _meta(text: str | None) -> dict[str, Any]:
    try:
        value = json.loads(text or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _from_name(meta: dict[str, Any]) -> str | None:
    # As imap_store.store.deliver.from_name, on the stored ENVELOPE (frozen here).
    from email.header import decode_header, make_header

    envelope = meta.get("envelope") or []
    senders = envelope[2] if len(envelope) > 2 else None
    if senders and isinstance(senders[0], list) and senders[0] and senders[0][0]:
        try:
            return str(make_header(decode_header(str(senders[0][0]))))[:200]
        except (ValueError, LookupError):
            return str(senders[0][0])[:200]
    return None


def upgrade() -> None:
    op.create_table(
        'web_session',
        sa.Column('id', sa.String(length=64), nullable=False),
        sa.Column('patient_id', sa.Integer(), nullable=False),
        sa.Column('stage', sa.String(length=12), nullable=False),
        sa.Column('csrf', sa.String(length=64), nullable=False),
        sa.Column('code_hash', sa.String(length=64), nullable=True),
        sa.Column('code_channel', sa.String(length=10), nullable=True),
        sa.Column('code_expires', sa.DateTime(timezone=True), nullable=True),
        sa.Column('code_tries', sa.Integer(), nullable=False, server_default='0'),
        sa.Column('codes_sent', sa.Integer(), nullable=False, server_default='0'),
        sa.Column('ip', sa.String(length=64), nullable=False, server_default=''),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('last_seen', sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(['patient_id'], ['patient.id'],
                                name='fk_web_session_patient_id_patient', ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id', name='pk_web_session'),
    )
    op.create_index('ix_web_session_patient_id', 'web_session', ['patient_id'], unique=False)
    op.create_index('ix_audit_actor_action', 'audit', ['actor', 'action'], unique=False)
    with op.batch_alter_table('patient', schema=None) as batch_op:
        batch_op.add_column(sa.Column('phone', sa.String(length=20), nullable=True))
    with op.batch_alter_table('message', schema=None) as batch_op:
        batch_op.add_column(sa.Column('has_attachments', sa.Integer(), nullable=False,
                                      server_default='0'))
        batch_op.add_column(sa.Column('from_name', sa.String(length=200), nullable=True))
        batch_op.create_index('ix_message_mailbox_thread', ['mailbox_id', 'thread_id'],
                              unique=False)
    conn = op.get_bind()
    message = sa.table('message', sa.column('id', sa.Integer), sa.column('thread_id'),
                       sa.column('message_id'), sa.column('in_reply_to'),
                       sa.column('references'), sa.column('has_attachments'),
                       sa.column('from_name'), sa.column('meta'))
    rows = conn.execute(sa.select(message.c.id, message.c.message_id, message.c.in_reply_to,
                                  message.c.references, message.c.meta)).all()
    updates = []
    for r in rows:
        meta = _meta(r.meta)
        updates.append({"row_id": r.id,
                        "tid": _thread_id(r.message_id, r.in_reply_to, r.references),
                        "att": int(bool(meta.get("has_attachments"))),
                        "name": _from_name(meta)})
    if updates:
        conn.execute(message.update().where(message.c.id == sa.bindparam("row_id"))
                     .values(thread_id=sa.bindparam("tid"), has_attachments=sa.bindparam("att"),
                             from_name=sa.bindparam("name")), updates)


def downgrade() -> None:
    with op.batch_alter_table('message', schema=None) as batch_op:
        batch_op.drop_index('ix_message_mailbox_thread')
        batch_op.drop_column('has_attachments')
        batch_op.drop_column('from_name')
    with op.batch_alter_table('patient', schema=None) as batch_op:
        batch_op.drop_column('phone')
    op.drop_index('ix_audit_actor_action', table_name='audit')
    op.drop_index('ix_web_session_patient_id', table_name='web_session')
    op.drop_table('web_session')
