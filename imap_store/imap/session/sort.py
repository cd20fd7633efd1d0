"""SORT (RFC 5256 §3): the search keys go through SEARCH's query (session/search.py), the
messages found are ordered by keys read from what the store keeps per message (size,
internal date and the ``meta`` record FETCH ENVELOPE uses: envelope, sent date, subject)."""

from __future__ import annotations

from bisect import bisect_left
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from imap_store.imap import threads
from imap_store.imap.commands import Sort, Thread
from imap_store.imap.session.fetch import stored_meta
from imap_store.imap.session.search import query
from imap_store.imap.session.state import Action
from imap_store.imap.sorting import base_subject
from imap_store.store.mailboxes import MessageRow

if TYPE_CHECKING:
    from imap_store.imap.session.core import Session

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
#: Envelope positions of the address lists SORT uses (RFC 3501 §7.4.2 envelope).
_ADDRESS_FIELD = {"FROM": 2, "TO": 5, "CC": 6}


async def _found(s: Session, cmd: Sort | Thread) -> list[tuple[int, int, MessageRow]]:
    """``(seq, uid, row)`` of the messages the search keys find in this session's view, by
    sequence number, through SEARCH's own query."""
    sel = s.require_selected()
    mail = s.require_mail()
    result = await mail.search(sel.mailbox_id, query(cmd.criteria, sel))
    view, count = sel.uids, len(sel.uids)
    found: dict[int, int] = {}  # uid -> sequence number
    for uid in result.uids:
        position = bisect_left(view, uid)
        if position < count and view[position] == uid:
            found[uid] = position + 1
    rows = await mail.fetch_rows(sel.mailbox_id, sorted(found), ("size", "internal_date", "meta"))
    return sorted(((found[row.uid], row.uid, row) for row in rows), key=lambda item: item[0])


async def sort(s: Session, cmd: Sort) -> Action:
    items = await _found(s, cmd)
    for name, reverse in reversed(cmd.keys):  # stable sorts (ties stay in sequence order),
        keys = {uid: _key(name, row) for _seq, uid, row in items}  # the last key first
        items.sort(key=lambda item: keys[item[1]], reverse=reverse)
    numbers = (uid if cmd.uid else seq for seq, uid, _row in items)
    await s.emit(b"* SORT" + b"".join(b" %d" % n for n in numbers) + b"\r\n")
    return await s.complete(cmd, allow_expunge=cmd.uid)


async def thread(s: Session, cmd: Thread) -> Action:
    """THREAD (RFC 5256 §3): message ids and references from the stored ``meta``."""
    messages = []
    for seq, uid, row in await _found(s, cmd):
        meta = stored_meta(row.meta) or {}
        refs = meta.get("references")
        messages.append(threads.Message(
            number=uid if cmd.uid else seq, seq=seq, date=_key("DATE", row),
            subject=str(meta.get("subject") or ""),
            message_id=meta.get("message_id") or None,
            references=[str(r) for r in refs] if isinstance(refs, list) else [],
            in_reply_to=meta.get("in_reply_to") or None))
    if cmd.algorithm == "REFERENCES":
        roots = threads.references(messages)
    else:
        roots = threads.ordered_subject(messages)
    data = threads.render(roots)
    await s.emit(b"* THREAD" + (b" " + data if data else b"") + b"\r\n")
    return await s.complete(cmd, allow_expunge=cmd.uid)


def _utc(value: datetime | None) -> datetime:
    if value is None:
        return _EPOCH
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _key(name: str, row: MessageRow) -> Any:
    if name == "SIZE":
        return row.size
    if name == "ARRIVAL":
        return _utc(row.internal_date)
    meta = stored_meta(row.meta) or {}
    if name == "DATE":  # RFC 5256 §3: the sent date, else the internal date, in UTC
        sent = meta.get("date")
        if isinstance(sent, str):
            try:
                return _utc(datetime.fromisoformat(sent))
            except ValueError:
                pass
        return _utc(row.internal_date)
    if name == "SUBJECT":
        subject = meta.get("subject")
        return base_subject(subject if isinstance(subject, str) else "")
    envelope = meta.get("envelope") or []
    field = _ADDRESS_FIELD[name]
    addresses = envelope[field] if len(envelope) > field else None
    for address in addresses or ():  # the first mailbox's local part (skipping group markers)
        if isinstance(address, list) and len(address) >= 4 and address[2] and address[3]:
            return str(address[2]).casefold()
    return ""
