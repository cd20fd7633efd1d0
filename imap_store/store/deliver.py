"""The one way a message is put into a mailbox (SMTP intake, the patient's Sent copy, notices,
bounces, IMAP APPEND): :func:`deliver`.

Compute once, at delivery (ARCHITECTURE): the header fields the rules and threads need, the
JSON that IMAP FETCH reads (ENVELOPE, BODYSTRUCTURE, search headers) and the case-folded SEARCH
columns are all derived from one parse (:class:`~imap_store.mime.MessageInfo`) of the exact
bytes that are stored, and written with them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy.engine import Connection

from imap_store.mime import MessageInfo, decode_rfc2047, parse_message
from imap_store.store import ops
from imap_store.store.fields import MessageFields, StoredMessage

#: The ``blob_search`` columns and the (case-folded) search header each holds.
SEARCH_FIELDS: Mapping[str, str] = {
    "from": "from_text", "to": "to_text", "cc": "cc_text", "bcc": "bcc_text",
    "subject": "subject_text",
}


class MailboxName(NamedTuple):
    """A patient's mailbox named by (patient id, name): found by the UID allocation itself."""

    patient_id: int
    name: str


#: Where :func:`deliver` puts a message: a mailbox id, or a patient's mailbox by name.
Target = int | MailboxName


def _cut(value: str | None, limit: int) -> str | None:
    return value[:limit] if value else None


def search_values(meta: str | Mapping[str, Any] | None) -> dict[str, str | None] | None:
    """The ``blob_search`` columns of a message from its ``meta`` (JSON text or dict): each
    SEARCH header field decoded and case-folded (``str.casefold``, as SEARCH compares), None
    when the message has no such field. None when ``meta`` has no search headers."""
    try:
        value = json.loads(meta or "") if not isinstance(meta, Mapping) else meta
        headers = value["search_headers"]
    except (ValueError, TypeError, KeyError):
        return None
    if not isinstance(headers, dict):
        return None
    out: dict[str, str | None] = {}
    for field, column in SEARCH_FIELDS.items():
        text = headers.get(field)
        out[column] = text.casefold() if isinstance(text, str) else None
    return out


def thread_id(message_id: str | None, in_reply_to: str | None,
              references: Sequence[str]) -> str | None:
    """The conversation a message belongs to: the first Message-ID of its ``References``
    (the conversation's root, RFC 5322 §3.6.4), else its ``In-Reply-To``, else its own."""
    root = references[0] if references else in_reply_to or message_id
    return _cut(root, 998)


def from_name(envelope: Sequence[Any]) -> str | None:
    """The decoded display name of the first ``From:`` address, None when it has none."""
    senders = envelope[2] if len(envelope) > 2 else None
    if senders and isinstance(senders[0], list) and senders[0] and senders[0][0]:
        return _cut(decode_rfc2047(str(senders[0][0])), 200)
    return None


_META_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, default=str)


def fields_from_info(info: MessageInfo) -> MessageFields:
    """The stored fields of a parsed message (one ``to_dict``, no JSON read back)."""
    meta = info.to_dict()
    return MessageFields(
        message_id=_cut(info.message_id, 998),
        in_reply_to=_cut(info.in_reply_to, 998),
        references=" ".join(info.references)[:8000] or None,
        subject=info.subject,
        from_addr=_cut(info.from_addr, 254),
        sent_date=info.date,
        thread_id=thread_id(info.message_id, info.in_reply_to, info.references),
        has_attachments=info.has_attachments,
        from_name=from_name(info.envelope),
        meta=_META_JSON.encode(meta),
        search=search_values(meta),
    )


def derive(raw: bytes) -> MessageFields:
    """Derive the stored fields of the exact bytes that will be stored."""
    return fields_from_info(parse_message(raw))


def deliver(conn: Connection, targets: Sequence[Target], raw: bytes,
            message: MessageInfo | MessageFields | None = None, *, flags: int = 0,
            keywords: str = "", internal_date: datetime | None = None) -> list[StoredMessage]:
    """Store ``raw`` once (one blob, its SEARCH row) and put it in every target mailbox, in the
    caller's transaction; UIDs and MODSEQs are allocated atomically in the database (RFC 3501
    §2.3.1.1). ``message`` is the parse of ``raw`` when the caller has it (never parsed twice),
    or the fields already derived from it."""
    if message is None:
        message = parse_message(raw)
    fields = fields_from_info(message) if isinstance(message, MessageInfo) else message
    if conn.dialect.name == "postgresql" and targets:
        # One round trip per target instead of two, plus two for the blob (ops: issue 14).
        return ops.merged_deliver(
            conn, [(t.patient_id, t.name) if isinstance(t, MailboxName) else t
                   for t in targets],
            raw, fields, flags=flags, keywords=keywords, internal_date=internal_date)
    blob_id = ops.blob_put(conn, raw)
    if fields.search is not None:
        ops.blob_search_put(conn, blob_id, fields.search)
    stored: list[StoredMessage] = []
    for target in targets:
        if isinstance(target, MailboxName):
            stored.append(ops.append_to(conn, target.patient_id, target.name, raw, fields,
                                        blob_id=blob_id, flags=flags, keywords=keywords,
                                        internal_date=internal_date))
        else:
            stored.append(ops.append(conn, target, raw, fields, blob_id=blob_id, flags=flags,
                                     keywords=keywords, internal_date=internal_date))
    return stored


def deliver_many(conn: Connection,
                 messages: Sequence[tuple[Sequence[MailboxName], bytes,
                                          MessageInfo | MessageFields]],
                 exchanges: Sequence[tuple[int, str, str]] = (),
                 audit: Sequence[ops.AuditEntry] = ()) -> list[list[StoredMessage]]:
    """:func:`deliver` of several messages, each to its patients' mailboxes, then
    ``ops.open_exchanges(exchanges)`` (R2) and ``ops.audit_many(audit)``, where a
    ``ops.DeliveredUid`` in an entry's detail stands for a UID these deliveries give, in the
    caller's transaction; the result in the order of ``messages`` and of each one's targets.
    On PostgreSQL in one statement whatever their number (the group writer's batch of SMTP
    intake: issue 14), the audit rows in it too when no other rows wait to be chained first;
    elsewhere one :func:`deliver` after the other."""
    fields = [(targets, raw, fields_from_info(m) if isinstance(m, MessageInfo) else m)
              for targets, raw, m in messages]
    if conn.dialect.name != "postgresql":
        stored = [deliver(conn, targets, raw, f) for targets, raw, f in fields]
        ops.open_exchanges(conn, exchanges)
    else:
        inline = (0 < len(audit) <= ops.SQL_CHAIN_MAX) and ops.chains_in_statement(conn)
        stored = ops.merged_deliver_many(
            conn, [([(t.patient_id, t.name) for t in targets], raw, f)
                   for targets, raw, f in fields], exchanges, audit=audit if inline else ())
        if inline:
            return stored
    ops.audit_many(conn, ops.with_uids(audit, [s.uid for each in stored for s in each]))
    return stored
