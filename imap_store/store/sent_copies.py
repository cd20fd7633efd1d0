"""The client's copy of a message the gateway already filed in ``Sent``.

A patient's message sent by SMTP submission (or from the portal) is put in ``Sent`` by the
gateway itself, in the transaction that queues its relays (``submission.py``). Most mail
clients then APPEND their own copy to ``Sent`` as well, which showed every message twice.
Like the large providers, IMAP APPEND keeps one: when the mailbox already holds a copy the
gateway filed less than :data:`SERVER_COPY_WINDOW` ago with the same ``Message-ID``, the
client's copy is not stored and APPEND answers with the UID of the gateway's copy (RFC 4315
APPENDUID names the message that stands for the appended one).

The gateway's copy is kept rather than the client's: it is the message as it was accepted
and relayed (the record of what was sent), it is already threaded and queued against, and
nothing the client appends can alter it. A copy the gateway filed is recognised by the
relay rows that share its blob (only submission writes those), so a message the client
appended itself, a draft or an older copy is never matched.
"""

from __future__ import annotations

from datetime import timedelta
from typing import NamedTuple

from sqlalchemy import and_, exists, select
from sqlalchemy.engine import Connection

from imap_store.store import schema as t
from imap_store.store.fields import utcnow
from imap_store.store.outbound import RELAY

#: How long after the gateway filed a sent message a client's APPEND of the same
#: ``Message-ID`` to that mailbox is taken for the client's own copy (clients append right
#: after sending; a slow link or a queued outbox may take minutes).
SERVER_COPY_WINDOW = timedelta(minutes=15)


#: Characters of a Message-ID kept in the message row (``deliver.message_fields``).
MESSAGE_ID_LIMIT = 998


class FiledCopy(NamedTuple):
    uid: int
    modseq: int


#: The only mailbox the gateway files a patient's sent messages in (``submission.py``).
SENT = "Sent"


def server_filed_copy(conn: Connection, mailbox_id: int, mailbox_name: str,
                      message_id: str | None) -> FiledCopy | None:
    """The gateway's own recent copy of ``message_id`` in ``mailbox_id``, if any: looked for
    only in ``Sent`` (an APPEND to any other mailbox costs no query)."""
    if not message_id or mailbox_name != SENT:
        return None
    message_id = message_id[:MESSAGE_ID_LIMIT]
    m = t.message
    relayed = exists().where(and_(t.outbound.c.blob_id == m.c.blob_id,
                                  t.outbound.c.kind == RELAY))
    row = conn.execute(
        select(m.c.uid, m.c.modseq)
        .where(m.c.mailbox_id == mailbox_id, m.c.message_id == message_id,
               m.c.internal_date >= utcnow() - SERVER_COPY_WINDOW, relayed)
        .order_by(m.c.uid.desc()).limit(1)
    ).first()
    return FiledCopy(int(row.uid), int(row.modseq)) if row is not None else None
