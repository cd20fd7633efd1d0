"""Compute once, at delivery (ARCHITECTURE): the header fields the rules and threads need and
the JSON that IMAP FETCH/SEARCH read (ENVELOPE, BODYSTRUCTURE, search headers)."""

from __future__ import annotations

import json

from imap_store.fields import MessageFields
from imap_store.mime import MessageInfo, parse_message


def _cut(value: str | None, limit: int) -> str | None:
    return value[:limit] if value else None


def fields_from_info(info: MessageInfo) -> MessageFields:
    return MessageFields(
        message_id=_cut(info.message_id, 998),
        in_reply_to=_cut(info.in_reply_to, 998),
        references=" ".join(info.references)[:8000] or None,
        subject=info.subject,
        from_addr=_cut(info.from_addr, 254),
        sent_date=info.date,
        meta=json.dumps(info.to_dict(), separators=(",", ":"), ensure_ascii=False,
                        default=str),
    )


def derive(raw: bytes) -> MessageFields:
    """Derive the stored fields of the exact bytes that will be stored."""
    return fields_from_info(parse_message(raw))
