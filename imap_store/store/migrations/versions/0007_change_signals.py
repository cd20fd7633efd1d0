"""Change signals (issue 13, ``imap_store/store/signals.py``): on PostgreSQL, a statement
trigger on ``mailbox`` notifies ``mssante_changes.<schema>`` when ``highestmodseq`` moves, so
the IMAP sessions of every process wake at the commit. Nothing on SQLite (its processes signal
each other through Unix sockets).

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    # pg_notify folds identical notifications of one transaction into one: a group commit of
    # many messages sends one signal. The channel names the table's schema.
    op.execute("""
        CREATE OR REPLACE FUNCTION mssante_changes_notify() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('mssante_changes.' || TG_TABLE_SCHEMA, '');
            RETURN NULL;
        END
        $$""")
    op.execute("""
        CREATE TRIGGER mssante_changes AFTER UPDATE OF highestmodseq ON mailbox
        FOR EACH STATEMENT EXECUTE PROCEDURE mssante_changes_notify()""")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("DROP TRIGGER IF EXISTS mssante_changes ON mailbox")
    op.execute("DROP FUNCTION IF EXISTS mssante_changes_notify()")
