"""What the patient portal reads and writes (SPEC §11): its sessions with the one-time code,
and the patient's conversations (messages of INBOX, Sent and Drafts grouped by ``thread_id``,
the conversation's first Message-ID, derived at delivery).

Every query is scoped by the logged-in patient: a conversation or message id of another
patient selects nothing. Flag changes and moves go through :class:`PatientMailStore`, so IMAP
sessions see them as they see each other's.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    String,
    bindparam,
    case,
    cast,
    delete,
    func,
    literal,
    literal_column,
    select,
    union_all,
    update,
)
from sqlalchemy.engine import Connection

from imap_store.mime import decode_rfc2047
from imap_store.store import schema as t
from imap_store.store.directory import Store
from imap_store.store.fields import as_utc, utcnow

#: The mailboxes a conversation is made of (Trash holds deleted conversations).
CONVERSATION_MAILBOXES = ("INBOX", "Sent", "Drafts")
DRAFTS = "Drafts"


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


# --- sessions ------------------------------------------------------------------------------


@dataclass(frozen=True)
class WebSession:
    id: str  # SHA-256 of the cookie's token
    patient_id: int
    stage: str  # "password" | "code" | "ok"
    csrf: str
    code_channel: str | None
    code_expires: datetime | None
    code_tries: int
    codes_sent: int
    created_at: datetime
    last_seen: datetime
    # The session's patient, read with it (one query per request).
    ins: str = ""
    name: str = ""
    patient_state: str = "open"


def _session(row: Any) -> WebSession:
    return WebSession(
        id=row.id, patient_id=row.patient_id, stage=row.stage, csrf=row.csrf,
        code_channel=row.code_channel,
        code_expires=as_utc(row.code_expires) if row.code_expires is not None else None,
        code_tries=row.code_tries, codes_sent=row.codes_sent,
        created_at=as_utc(row.created_at),
        last_seen=as_utc(row.last_seen), ins=row.ins, name=row.name,
        patient_state=row.state)


#: A session with its patient (statements built once: the portal runs them on every request).
_SESSION = (select(t.web_session, t.patient.c.ins, t.patient.c.name, t.patient.c.state)
            .join(t.patient, t.patient.c.id == t.web_session.c.patient_id)
            .where(t.web_session.c.id == bindparam("sid")))


def _session_row(conn: Connection, sid: str) -> Any:
    return conn.execute(_SESSION, {"sid": sid}).first()


class Sessions:
    """Portal sessions in the database, so that every ``serve`` process knows them."""

    def __init__(self, store: Store, idle_seconds: int, lifetime_seconds: int = 12 * 3600):
        self.store = store
        self.idle = timedelta(seconds=idle_seconds)
        self.lifetime = timedelta(seconds=lifetime_seconds)

    async def open(self, patient_id: int, ip: str) -> tuple[str, WebSession]:
        """A new session after the password step; returns the cookie token and the row."""
        token = secrets.token_urlsafe(32)
        now = utcnow()
        values = {"id": _digest(token), "patient_id": patient_id, "stage": "password",
                  "csrf": secrets.token_urlsafe(24), "code_tries": 0, "codes_sent": 0,
                  "ip": ip[:64],
                  "created_at": now, "last_seen": now}
        async with self.store.write() as conn:
            await conn.execute(delete(t.web_session).where(
                t.web_session.c.last_seen < now - self.lifetime))
            # One login in progress per patient: a new password step ends the others.
            await conn.execute(delete(t.web_session).where(
                t.web_session.c.patient_id == patient_id, t.web_session.c.stage != "ok"))
            await conn.execute(t.web_session.insert().values(**values))
            row = (await conn.execute(_SESSION, {"sid": values["id"]})).one()
        return token, _session(row)

    async def find(self, token: str | None) -> WebSession | None:
        """The live session of a cookie token (None when unknown, idle too long or too old);
        a logged-in session's idle clock restarts."""
        if not token or len(token) > 100:
            return None
        sid = _digest(token)
        now = utcnow()
        row = await self.store.read_inline(_session_row, sid)
        if row is None:
            return None
        session = _session(row)
        if now - session.last_seen > self.idle or now - session.created_at > self.lifetime:
            await self.close(token)
            return None
        if now - session.last_seen > timedelta(seconds=30):  # one write per half minute
            async with self.store.write() as conn:
                await conn.execute(update(t.web_session).where(t.web_session.c.id == sid)
                                   .values(last_seen=now))
        return session

    async def reserve_code(self, session: WebSession, max_codes: int) -> bool:
        """Count one more code for this login, atomically; False once ``max_codes`` were
        sent (parallel requests cannot pass the limit together)."""
        async with self.store.write() as conn:
            result = await conn.execute(
                update(t.web_session)
                .where(t.web_session.c.id == session.id,
                       t.web_session.c.codes_sent < max_codes)
                .values(codes_sent=t.web_session.c.codes_sent + 1))
            return bool(result.rowcount)

    async def code_sent(self, session: WebSession, code: str, channel: str,
                        ttl_seconds: int) -> None:
        async with self.store.write() as conn:
            await conn.execute(update(t.web_session).where(t.web_session.c.id == session.id)
                               .values(stage="code", code_hash=_digest(code),
                                       code_channel=channel, code_tries=0,
                                       code_expires=utcnow() + timedelta(seconds=ttl_seconds)))

    async def check_code(self, session: WebSession, code: str,
                         max_tries: int) -> tuple[str, str | None]:
        """``("ok", new token)``: logged in, the code is used up and the session gets a new
        token (the one issued before the code step is worthless from now on); else
        ``("wrong" | "expired" | "exhausted", None)``. Each try is counted atomically before
        the code is compared, so parallel guesses cannot pass ``max_tries`` together."""
        now = utcnow()
        async with self.store.write() as conn:
            counted = await conn.execute(
                update(t.web_session)
                .where(t.web_session.c.id == session.id, t.web_session.c.stage == "code",
                       t.web_session.c.code_tries < max_tries)
                .values(code_tries=t.web_session.c.code_tries + 1))
            row = (await conn.execute(select(t.web_session).where(
                t.web_session.c.id == session.id))).first()
            if row is None or row.stage != "code" or row.code_hash is None:
                return "expired", None
            if not counted.rowcount:
                return "exhausted", None
            if row.code_expires is None or as_utc(row.code_expires) < now:
                return "expired", None
            if hmac.compare_digest(row.code_hash, _digest(code.strip())):
                token = secrets.token_urlsafe(32)
                await conn.execute(update(t.web_session).where(
                    t.web_session.c.id == session.id).values(
                        id=_digest(token), stage="ok", code_hash=None,
                        csrf=secrets.token_urlsafe(24), last_seen=now))
                return "ok", token
            return ("exhausted" if row.code_tries >= max_tries else "wrong"), None

    async def close(self, token: str) -> None:
        async with self.store.write() as conn:
            await conn.execute(delete(t.web_session).where(
                t.web_session.c.id == _digest(token)))


# --- conversations ---------------------------------------------------------------------------


@dataclass(frozen=True)
class MessageSummary:
    id: int  # message row id (unique across mailboxes)
    mailbox_id: int
    mailbox: str
    uid: int
    flags: int
    internal_date: datetime
    date: datetime  # its Date: field, else when it arrived
    subject: str
    from_name: str
    from_addr: str
    to: tuple[tuple[str, str], ...]  # (name, address)
    cc: tuple[tuple[str, str], ...]
    reply_to: tuple[tuple[str, str], ...]
    message_id: str | None
    in_reply_to: str | None
    references: str | None
    has_attachments: bool
    meta: dict[str, Any]
    blob_id: int  # its body
    digest: str  # the body's SHA-256: what the caches of derived data are keyed on

    @property
    def seen(self) -> bool:
        return bool(self.flags & t.FLAG_SEEN)

    @property
    def draft(self) -> bool:
        return self.mailbox == DRAFTS


@dataclass(frozen=True)
class ConversationSummary:
    key: int  # the id of its first message: the conversation's id in URLs
    last_date: datetime
    subject: str
    last_sender: str
    messages: int
    unread: bool
    has_draft: bool
    has_attachments: bool


def _people(entries: Any) -> tuple[tuple[str, str], ...]:
    """(display name, address) of ENVELOPE address lists (names RFC 2047-decoded)."""
    out = []
    for entry in entries or ():
        if isinstance(entry, list) and len(entry) == 4 and entry[2] and entry[3]:
            name = decode_rfc2047(entry[0]) if isinstance(entry[0], str) else ""
            out.append((name, f"{entry[2]}@{entry[3]}".lower()))
    return tuple(out)


@dataclass(frozen=True)
class _Parsed:
    """What a message row's ``meta`` gives the portal (immutable once the row is written)."""

    meta: dict[str, Any]
    senders: tuple[tuple[str, str], ...]
    to: tuple[tuple[str, str], ...]
    cc: tuple[tuple[str, str], ...]
    reply_to: tuple[tuple[str, str], ...]


#: Parsed ``meta`` by the SHA-256 of the body it was derived from: ``meta`` is a function of
#: the stored bytes alone (``deliver.fields_from_info``), so equal digests give equal entries
#: whichever row, mailbox or patient reads them (row ids, which SQLite may reuse after a
#: delete, are never a key); bounded.
_PARSED: OrderedDict[str, _Parsed] = OrderedDict()
_PARSED_KEPT = 4096


def _parsed(digest: str, text: str | None) -> _Parsed:
    cached = _PARSED.get(digest)
    if cached is not None:
        _PARSED.move_to_end(digest)
        return cached
    try:
        meta = json.loads(text or "{}")
    except ValueError:
        meta = {}
    if not isinstance(meta, dict):
        meta = {}
    envelope = meta.get("envelope") or [None] * 10

    def people(i: int) -> tuple[tuple[str, str], ...]:
        return _people(envelope[i] if len(envelope) > i else None)

    parsed = _Parsed(meta, people(2), people(5), people(6), people(4))
    _PARSED[digest] = parsed
    while len(_PARSED) > _PARSED_KEPT:
        _PARSED.popitem(last=False)
    return parsed


def _summary(row: Any) -> MessageSummary:
    p = _parsed(row.sha256, row.meta)
    return MessageSummary(
        id=row.id, mailbox_id=row.mailbox_id, mailbox=row.mailbox, uid=int(row.uid),
        flags=row.flags, internal_date=as_utc(row.internal_date),
        date=as_utc(row.sent_date or row.internal_date),
        subject=row.subject or "", from_name=p.senders[0][0] if p.senders else "",
        from_addr=p.senders[0][1] if p.senders else (row.from_addr or ""),
        to=p.to, cc=p.cc, reply_to=p.reply_to, message_id=row.message_id,
        in_reply_to=row.in_reply_to, references=row.references,
        has_attachments=bool(p.meta.get("has_attachments")), meta=p.meta,
        blob_id=int(row.blob_id), digest=row.sha256)


@dataclass(frozen=True)
class _Group:
    key: str
    last: datetime
    first_id: int
    last_id: int  # the latest message that is not a draft (else the latest)
    messages: int
    unseen: int
    drafts: int
    attachments: int


#: Each patient's grouped conversation list, with the (mailbox id, HIGHESTMODSEQ) pairs it was
#: read at: every change to a mailbox (delivery, flags, expunge, move) bumps its MODSEQ, so an
#: entry is valid exactly while the pairs are unchanged, in every process.
_GROUPS: OrderedDict[int, tuple[tuple[tuple[int, int], ...], list[_Group]]] = OrderedDict()
_GROUPS_KEPT = 256


_m = t.message.c
#: The patient's conversation mailboxes (every message query is scoped by it).
_OWNED = (select(t.mailbox.c.id).where(t.mailbox.c.patient_id == bindparam("patient_id"),
                                       t.mailbox.c.name.in_(CONVERSATION_MAILBOXES))
          .scalar_subquery())
_VERSIONS = (select(t.mailbox.c.id, t.mailbox.c.highestmodseq)
             .where(t.mailbox.c.patient_id == bindparam("patient_id"),
                    t.mailbox.c.name.in_(CONVERSATION_MAILBOXES))
             .order_by(t.mailbox.c.id))
_KEY = func.coalesce(_m.thread_id, literal("id:") + cast(_m.id, String)).label("key")
_IS_DRAFT = t.mailbox.c.name == DRAFTS
_GROUPED = (
    select(_KEY, func.max(_m.internal_date).label("last"), func.min(_m.id).label("first_id"),
           func.max(case((~_IS_DRAFT, _m.id))).label("last_sent_id"),
           func.max(_m.id).label("last_id"), func.count().label("n"),
           func.sum(case(((_m.flags.op("&")(t.FLAG_SEEN) == 0) & ~_IS_DRAFT, 1),
                         else_=0)).label("unseen"),
           func.sum(case((_IS_DRAFT, 1), else_=0)).label("drafts"),
           func.max(_m.has_attachments).label("attachments"))
    .select_from(t.message.join(t.mailbox, t.mailbox.c.id == _m.mailbox_id))
    .where(_m.mailbox_id.in_(bindparam("mailboxes", expanding=True)))
    .group_by(_KEY))
#: Rows chosen by id, still scoped to the patient: ``mailbox_id + 0`` keeps SQLite from the
#: mailbox index, which it took for an IN list of ~100 ids and then read every row of the
#: patient's mailboxes (10,000 messages: 2.0 ms of CPU per list page instead of 0.14 ms by
#: rowid, EXPLAIN QUERY PLAN on bench/web.py's database).
_OWNED_ROWS = (_m.mailbox_id + literal_column("0")).in_(_OWNED)
_LIST_ROWS = (select(_m.id, _m.subject, _m.from_name, _m.from_addr, _m.sent_date,
                     _m.internal_date)
              .where(_m.id.in_(bindparam("ids", expanding=True)), _OWNED_ROWS))
_MESSAGE = (select(_m.id, _m.mailbox_id, t.mailbox.c.name.label("mailbox"), _m.uid, _m.flags,
                   _m.internal_date, _m.sent_date, _m.subject, _m.from_addr, _m.message_id,
                   _m.in_reply_to, _m.references, _m.meta, _m.thread_id, _m.blob_id,
                   t.blob.c.sha256)
            .select_from(t.message.join(t.mailbox, t.mailbox.c.id == _m.mailbox_id)
                         .join(t.blob, t.blob.c.id == _m.blob_id))
            .where(_m.mailbox_id.in_(_OWNED)))
#: A conversation in one statement (on PostgreSQL each statement is a round trip): the
#: messages sharing the thread of message ``key``, or ``key`` alone when it has no thread id;
#: nothing when ``key`` is not one of the patient's. UNION ALL, not OR: with OR SQLite read
#: every row of the patient's mailboxes (20 ms a page on bench/web.py's 10,000 messages).
_KEY_THREAD = (select(_m.thread_id).where(_m.id == bindparam("key"), _m.mailbox_id.in_(_OWNED))
               .scalar_subquery())
_CONVERSATION = union_all(
    _MESSAGE.where(_m.thread_id == _KEY_THREAD),
    _MESSAGE.where(_m.id == bindparam("key"), _m.thread_id.is_(None)))
_BODIES = (select(_m.id, t.blob.c.data)
           .select_from(t.message.join(t.blob, t.blob.c.id == _m.blob_id))
           .where(_m.id.in_(bindparam("ids", expanding=True)), _OWNED_ROWS))


class Conversations:
    """One patient's conversations."""

    def __init__(self, store: Store, patient_id: int) -> None:
        self.store = store
        self.patient_id = patient_id

    # The reads below are one-shot lookups run by ``Store.read_inline``: on PostgreSQL on a
    # kept autocommit connection (no pool checkout with its ping, no BEGIN and COMMIT: a
    # list page was five round trips more than its two statements), on SQLite as before.

    def _groups(self, conn: Connection) -> list[_Group]:
        versions = tuple((int(r.id), int(r.highestmodseq)) for r in conn.execute(
            _VERSIONS, {"patient_id": self.patient_id}).all())
        cached = _GROUPS.get(self.patient_id)
        if cached is not None and cached[0] == versions:
            _GROUPS.move_to_end(self.patient_id)
            return cached[1]
        # Read after the versions: a change in between leaves an entry that is never used.
        rows = conn.execute(_GROUPED, {"mailboxes": [v[0] for v in versions]}).all()
        groups = [_Group(r.key, as_utc(r.last), int(r.first_id),
                         int(r.last_sent_id or r.last_id), int(r.n), int(r.unseen or 0),
                         int(r.drafts or 0), int(r.attachments or 0)) for r in rows]
        groups.sort(key=lambda g: (g.last, g.first_id), reverse=True)
        _GROUPS[self.patient_id] = (versions, groups)
        while len(_GROUPS) > _GROUPS_KEPT:
            _GROUPS.popitem(last=False)
        return groups

    def _page_rows(self, conn: Connection, offset: int,
                   limit: int) -> tuple[int, list[_Group], list[Any]]:
        groups = self._groups(conn)
        chosen = groups[offset:offset + limit]
        ids = sorted({g.first_id for g in chosen} | {g.last_id for g in chosen})
        rows = list(conn.execute(_LIST_ROWS, {"ids": ids, "patient_id": self.patient_id}
                                 ).all()) if ids else []
        return len(groups), chosen, rows

    async def page(self, offset: int, limit: int) -> tuple[int, list[ConversationSummary]]:
        """The conversations, newest first: ``(total, the page)``."""
        total, chosen, rows = await self.store.read_inline(self._page_rows, offset, limit)
        by_id = {row.id: row for row in rows}
        out = []
        for g in chosen:
            first, last = by_id.get(g.first_id), by_id.get(g.last_id)
            if first is None or last is None:  # removed meanwhile
                continue
            out.append(ConversationSummary(
                # When the last message arrived: the order of the list, and no sender's
                # Date: field can put a conversation out of it (the page shows each Date).
                key=g.first_id, last_date=as_utc(last.internal_date),
                subject=first.subject or last.subject or "",
                last_sender=last.from_name or last.from_addr or "", messages=g.messages,
                unread=g.unseen > 0, has_draft=g.drafts > 0,
                has_attachments=g.attachments > 0))
        return total, out

    def _message_rows(self, conn: Connection, key: int) -> list[Any]:
        rows = conn.execute(_CONVERSATION, {"key": key, "patient_id": self.patient_id}).all()
        return sorted(rows, key=lambda r: (r.internal_date, r.id))  # oldest first

    async def messages(self, key: int) -> list[MessageSummary]:
        """The messages of the conversation whose first message is ``key``, oldest first;
        empty when that message is not one of this patient's conversations."""
        rows = await self.store.read_inline(self._message_rows, key)
        return [_summary(r) for r in rows]

    async def bodies(self, message_ids: Sequence[int]) -> dict[int, bytes]:
        """The stored bytes of some of the patient's messages (not of deleted ones)."""
        if not message_ids:
            return {}
        async with self.store.read() as conn:
            rows = (await conn.execute(_BODIES, {"ids": sorted(message_ids),
                                                 "patient_id": self.patient_id})).all()
        return {int(r.id): bytes(r.data) for r in rows}

    async def body(self, message_id: int) -> bytes | None:
        """The stored bytes of one of the patient's messages (not of a deleted one)."""
        return (await self.bodies([message_id])).get(message_id)
