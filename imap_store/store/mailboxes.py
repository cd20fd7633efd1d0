"""Mailbox and message queries of the IMAP server (SPEC §5, RFC 3501), on SQLAlchemy Core.

Every query is scoped by the authenticated patient: a :class:`PatientMailStore` is bound to one
patient id and each statement it runs names that id (directly, or through
:func:`PatientMailStore._in_mailbox`, a scalar sub-select of the mailbox *owned by that patient*).
A mailbox id that belongs to someone else therefore selects nothing, whatever the session asks.

Writes go through the group writer (ARCHITECTURE "group commit") when one is given. Every change
to a mailbox first bumps ``mailbox.highestmodseq`` with one ``UPDATE ... RETURNING``: that locks
the mailbox row until commit, so changes of one mailbox are serialised across processes and the
MODSEQs they carry are committed in increasing order. Other sessions learn of changes by reading
rows (and ``expunged`` rows) with a MODSEQ above the one they last saw (RFC 7162 §3.1 ideas,
without advertising CONDSTORE). Bodies are read only when a body is asked for.
"""

from __future__ import annotations

import asyncio
import logging
import re
from array import array
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol, TypeVar

from sqlalchemy import (
    ColumnElement,
    Integer,
    bindparam,
    case,
    cast,
    delete,
    exists,
    false,
    func,
    insert,
    literal_column,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection

from imap_store.mime import MessageInfo, parse_message
from imap_store.store import schema as t
from imap_store.store.deliver import SEARCH_FIELDS, deliver, search_values
from imap_store.store.directory import DatabaseBlobStore, Store, new_uidvalidity

log = logging.getLogger(__name__)
T = TypeVar("T")
Job = Callable[[AsyncConnection], Awaitable[T]]

#: Hierarchy delimiter of mailbox names (RFC 3501 §5.1.1), announced in LIST and NAMESPACE.
DELIMITER = "/"
#: Most mailboxes one patient may have (SPEC §9: limits on everything a client controls).
MAX_MAILBOXES = 1000
#: Longest mailbox name, in characters (the ``mailbox.name`` column holds 255).
MAX_NAME_LENGTH = 200
#: Most keywords kept on one message and longest keyword (RFC 3501 §2.3.2 sets no limit).
MAX_KEYWORDS = 50
MAX_KEYWORD_LENGTH = 100
#: UIDs per ``IN (...)`` list: below the parameter limits of SQLite and PostgreSQL.
_CHUNK = 500
#: Header field names read from ``meta`` by SQL (others: the JSON is parsed in Python).
_FIELD_NAME = re.compile(r"[A-Za-z0-9_.-]{1,100}")
#: SEARCH header keys answered from ``blob_search`` (case-folded values; see search_values).
SEARCH_COLUMNS: dict[str, ColumnElement[Any]] = {
    key: t.blob_search.c[name] for key, name in SEARCH_FIELDS.items()
}
#: Messages that have keywords: the condition of the partial index ``ix_message_mailbox_keywords``
#: (a literal, so that SQLite's planner recognises it).
_HAS_KEYWORDS = t.message.c.keywords != literal_column("''")
#: A UID set with more ranges than this is read as one ``BETWEEN`` and filtered in Python.
_MAX_RANGES = 20
#: Messages parsed in a worker thread above this size (keeps the event loop responsive).
_THREAD_PARSE_SIZE = 256 * 1024

SYSTEM_FLAG_BITS: dict[str, int] = {
    "\\Seen": t.FLAG_SEEN,
    "\\Answered": t.FLAG_ANSWERED,
    "\\Flagged": t.FLAG_FLAGGED,
    "\\Deleted": t.FLAG_DELETED,
    "\\Draft": t.FLAG_DRAFT,
}


# --------------------------------------------------------------------------- errors


class MailStoreError(Exception):
    """A refusal that knows its IMAP reply: ``NO [code] text`` (RFC 3501 §7.1, RFC 5530)."""

    code: str | None = None
    text: str = "Refused"

    def __init__(self, text: str | None = None, code: str | None = None) -> None:
        super().__init__(text or self.text)
        if text is not None:
            self.text = text
        if code is not None:
            self.code = code


class NoSuchMailbox(MailStoreError):
    code = "NONEXISTENT"
    text = "No such mailbox"


class TryCreate(MailStoreError):
    """APPEND/COPY/MOVE to a mailbox that does not exist (RFC 3501 §6.3.11, §6.4.7)."""

    code = "TRYCREATE"
    text = "No such mailbox"


class MailboxExists(MailStoreError):
    code = "ALREADYEXISTS"
    text = "Mailbox already exists"


class Cannot(MailStoreError):
    code = "CANNOT"
    text = "Not allowed on this mailbox"


class InvalidName(MailStoreError):
    code = "CANNOT"
    text = "Invalid mailbox name"


class TooMany(MailStoreError):
    code = "LIMIT"
    text = "Too many mailboxes"


# --------------------------------------------------------------------------- records


@dataclass(frozen=True, slots=True)
class MailboxInfo:
    """One mailbox row of the authenticated patient."""

    id: int
    name: str
    special_use: str | None
    subscribed: bool
    uidvalidity: int
    uidnext: int
    highestmodseq: int
    recent_uid: int


@dataclass(slots=True)
class MailboxView:
    """What SELECT needs (RFC 3501 §6.3.1): UIDs in sequence order, compactly."""

    mailbox: MailboxInfo
    uids: array[int]
    first_unseen: int  # sequence number of the first message without \Seen, 0 if none
    keywords: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class FlagState:
    """A message's flags after a change, with the MODSEQ of that change."""

    uid: int
    flags: int
    keywords: str
    modseq: int


@dataclass(frozen=True, slots=True)
class Changes:
    """Changes of a mailbox after a MODSEQ: flag changes and new messages (``changed``, by
    UID), expunged UIDs. ``exists`` is False when the mailbox itself is gone."""

    highestmodseq: int
    recent_uid: int
    changed: tuple[FlagState, ...]
    expunged: tuple[int, ...]
    exists: bool = True


@dataclass(frozen=True, slots=True)
class StatusCounts:
    """STATUS items (RFC 3501 §6.3.10)."""

    messages: int
    unseen: int
    recent: int
    uidnext: int
    uidvalidity: int


@dataclass(frozen=True, slots=True)
class CopyResult:
    """COPY/MOVE outcome: COPYUID data (RFC 4315 §3) and, for MOVE, the expunge MODSEQ."""

    mailbox_id: int  # the target
    modseq: int  # of the copies in the target
    uidvalidity: int
    pairs: tuple[tuple[int, int], ...]  # (source UID, new UID), ascending
    expunge_modseq: int = 0


#: Columns the session may ask :meth:`PatientMailStore.fetch_rows` for (``uid`` always comes).
ROW_COLUMNS = frozenset(
    {"flags", "keywords", "internal_date", "size", "meta", "blob_id", "sent_date", "modseq"}
)


class MailStore(Protocol):
    """The storage the IMAP session works with, bound to one authenticated patient."""

    patient_id: int

    async def mailboxes(self) -> list[MailboxInfo]: ...

    async def mailbox(self, name: str) -> MailboxInfo | None: ...

    async def open(self, name: str) -> MailboxView | None: ...

    async def claim_recent(self, mailbox_id: int, seen: int, up_to: int) -> bool: ...

    async def changes(self, mailbox_id: int, since: int) -> Changes: ...

    async def fetch_rows(
        self, mailbox_id: int, uids: Sequence[int], columns: Iterable[str]
    ) -> list[Any]: ...

    async def flag_rows(
        self, mailbox_id: int, ranges: Sequence[tuple[int, int]]
    ) -> tuple[list[Any], dict[int, str]]: ...

    async def search_rows(
        self, mailbox_id: int, where: ColumnElement[bool] | None, columns: Iterable[str],
        headers: Iterable[str] = (), *, indexed: bool = False,
    ) -> list[Any] | None: ...

    async def body(self, mailbox_id: int, uid: int) -> bytes | None: ...

    async def bodies(
        self, mailbox_id: int, uids: Sequence[int], *, header_only: bool = False
    ) -> dict[int, bytes]: ...

    async def store_flags(
        self, mailbox_id: int, uids: Sequence[int], mode: str, bits: int,
        keywords: Sequence[str],
    ) -> tuple[int, list[FlagState]]: ...

    async def expunge(
        self, mailbox_id: int, ranges: Sequence[tuple[int, int]] | None = None
    ) -> tuple[int, list[int]]: ...

    async def append(
        self, name: str, raw: bytes, bits: int, keywords: Sequence[str],
        internal_date: datetime | None,
    ) -> tuple[int, int, int, int]: ...

    async def copy(
        self, mailbox_id: int, uids: Sequence[int], target: str, move: bool
    ) -> CopyResult: ...

    async def create(self, name: str) -> None: ...

    async def delete(self, name: str) -> None: ...

    async def rename(self, old: str, new: str) -> None: ...

    async def subscribe(self, name: str, subscribed: bool) -> None: ...

    async def status(self, name: str) -> StatusCounts: ...


# --------------------------------------------------------------------------- helpers


def split_keywords(text: str) -> list[str]:
    return text.split() if text else []


def uid_ranges(uids: Sequence[int]) -> list[tuple[int, int]]:
    """Ascending, merged ``(low, high)`` ranges of sorted UIDs."""
    ranges: list[tuple[int, int]] = []
    for uid in uids:
        if ranges and uid == ranges[-1][1] + 1:
            ranges[-1] = (ranges[-1][0], uid)
        elif not ranges or uid > ranges[-1][1]:
            ranges.append((uid, uid))
    return ranges


def validate_name(name: str) -> str:
    """A mailbox name the patient may create (RFC 3501 §5.1): no wildcards, no empty, ``.`` or
    ``..`` levels, no namespace prefixes (``#``, ``~``), no control characters. A trailing
    delimiter is dropped (RFC 3501 §6.3.3)."""
    if name.endswith(DELIMITER):
        name = name[:-1]
    if not name or len(name) > MAX_NAME_LENGTH:
        raise InvalidName()
    if name[0] in "#~&" or any(c in name for c in "%*\\\"") or any(
        ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in name
    ):
        raise InvalidName()
    for level in name.split(DELIMITER):
        if level in ("", ".", "..") or level != level.strip():
            raise InvalidName()
    if name.upper() == "INBOX":
        return "INBOX"
    if name.upper().startswith("INBOX" + DELIMITER):
        raise InvalidName("Mailboxes under INBOX are not supported")
    return name


class SqlMailStores:
    """Process-wide access: one :class:`PatientMailStore` per logged-in patient, and the one
    cheap query the change watcher runs for every selected mailbox of the process."""

    def __init__(self, store: Store, submit: Callable[[Job[Any]], Awaitable[Any]] | None = None):
        self.store = store
        self._submit = submit

    def for_patient(self, patient_id: int) -> PatientMailStore:
        return PatientMailStore(self, patient_id)

    async def write(self, job: Job[T]) -> T:
        if self._submit is not None:
            result: T = await self._submit(job)
            return result
        async with self.store.write() as conn:
            return await job(conn)

    async def highestmodseqs(self, mailbox_ids: Iterable[int]) -> dict[int, int]:
        """``{mailbox id: highestmodseq}`` for the mailboxes selected in this process (counters
        only; a mailbox that vanished is absent)."""
        ids = list(mailbox_ids)
        result: dict[int, int] = {}
        async with self.store.read() as conn:
            for start in range(0, len(ids), _CHUNK):
                rows = await conn.execute(
                    select(t.mailbox.c.id, t.mailbox.c.highestmodseq)
                    .where(t.mailbox.c.id.in_(ids[start : start + _CHUNK]))
                )
                result.update((int(r[0]), int(r[1])) for r in rows)
        return result


def _info(row: Any) -> MailboxInfo:
    return MailboxInfo(
        id=int(row.id), name=row.name, special_use=row.special_use,
        subscribed=bool(row.subscribed), uidvalidity=int(row.uidvalidity),
        uidnext=int(row.uidnext), highestmodseq=int(row.highestmodseq),
        recent_uid=int(row.recent_uid),
    )


_MAILBOX_COLUMNS = (
    t.mailbox.c.id, t.mailbox.c.name, t.mailbox.c.special_use, t.mailbox.c.subscribed,
    t.mailbox.c.uidvalidity, t.mailbox.c.uidnext, t.mailbox.c.highestmodseq,
    t.mailbox.c.recent_uid,
)


class PatientMailStore:
    """:class:`MailStore` on the database, for one patient (every query names ``patient_id``)."""

    def __init__(self, stores: SqlMailStores, patient_id: int) -> None:
        self._stores = stores
        self._store = stores.store
        self.patient_id = patient_id

    # --- scoping ------------------------------------------------------------------------

    def _owned(self) -> ColumnElement[bool]:
        return t.mailbox.c.patient_id == self.patient_id

    def _mailbox_id(self, mailbox_id: int) -> Any:
        """The id of ``mailbox_id`` if this patient owns it, else nothing (a sub-select)."""
        return (
            select(t.mailbox.c.id)
            .where(t.mailbox.c.id == mailbox_id, self._owned())
            .scalar_subquery()
        )

    def _in_mailbox(self, mailbox_id: int) -> ColumnElement[bool]:
        condition: ColumnElement[bool] = t.message.c.mailbox_id == self._mailbox_id(mailbox_id)
        return condition

    @staticmethod
    def _uid_filter(uids: Sequence[int]) -> tuple[list[ColumnElement[bool]], bool]:
        """Conditions selecting sorted ``uids``: ranges, an ``IN`` list, or one range filtered
        afterwards (``True`` in the second item means "filter the rows in Python")."""
        ranges = uid_ranges(uids)
        if not ranges:
            return [false()], False
        if len(ranges) <= _MAX_RANGES:
            return [or_(*(t.message.c.uid.between(lo, hi) for lo, hi in ranges))], False
        if len(uids) <= _CHUNK:
            return [t.message.c.uid.in_(list(uids))], False
        return [t.message.c.uid.between(ranges[0][0], ranges[-1][1])], True

    @property
    def _sqlite(self) -> bool:
        return self._store.engine.dialect.name == "sqlite"

    def _meta_text(self, *path: str) -> ColumnElement[Any]:
        """A string inside the ``meta`` JSON, extracted by the database (no JSON reaches
        Python). An invalid ``meta`` makes the statement fail: callers fall back to Python."""
        if self._sqlite:
            json_path = "$" + "".join(f'."{part}"' for part in path)
            return func.json_extract(t.message.c.meta, json_path)
        value: Any = cast(t.message.c.meta, postgresql.JSON)
        for part in path[:-1]:
            value = value[part]
        result: ColumnElement[Any] = value[path[-1]].astext
        return result

    def _header_size(self) -> ColumnElement[Any]:
        """``MessageInfo.header_size`` of the stored ``meta`` (NULL when unknown)."""
        if self._sqlite:
            return func.json_extract(t.message.c.meta, "$.header_size")
        # the first keys of MessageInfo.to_dict(), anchored: no JSON parsing, never an error
        text = func.substring(t.message.c.meta, r'^\{"size":\d+,"header_size":(\d+)[,}]')
        return cast(text, Integer)

    async def _lookup(self, conn: AsyncConnection, name: str) -> MailboxInfo | None:
        row = (await conn.execute(
            select(*_MAILBOX_COLUMNS).where(self._owned(), t.mailbox.c.name == name)
        )).first()
        return None if row is None else _info(row)

    async def _bump(self, conn: AsyncConnection, mailbox_id: int, uids: int = 0) -> Any:
        """Allocate a MODSEQ (and ``uids`` UIDs): locks the mailbox row until commit."""
        values: dict[str, Any] = {"highestmodseq": t.mailbox.c.highestmodseq + 1}
        if uids:
            values["uidnext"] = t.mailbox.c.uidnext + uids
        row = (await conn.execute(
            update(t.mailbox)
            .where(t.mailbox.c.id == mailbox_id, self._owned())
            .values(**values)
            .returning(t.mailbox.c.highestmodseq, t.mailbox.c.uidnext, t.mailbox.c.uidvalidity)
        )).first()
        if row is None:
            raise NoSuchMailbox()
        return row

    # --- mailboxes ----------------------------------------------------------------------

    async def mailboxes(self) -> list[MailboxInfo]:
        async with self._store.read() as conn:
            rows = await conn.execute(
                select(*_MAILBOX_COLUMNS).where(self._owned()).order_by(t.mailbox.c.name)
            )
            return [_info(r) for r in rows]

    async def mailbox(self, name: str) -> MailboxInfo | None:
        async with self._store.read() as conn:
            return await self._lookup(conn, name)

    async def open(self, name: str) -> MailboxView | None:
        """SELECT/EXAMINE: the mailbox, its UIDs and first unseen message, from rows only."""
        async with self._store.read() as conn:
            info = await self._lookup(conn, name)
            if info is None:
                return None
            in_box = t.message.c.mailbox_id == info.id  # info came from a scoped lookup
            # Three index-only reads (ix_message_mailbox_uid_flags, the partial keywords
            # index): the UIDs, the first unseen one, the keywords in use; no row is read.
            result = await conn.execute(
                select(t.message.c.uid).where(in_box).order_by(t.message.c.uid)
            )
            uids: array[int] = array("L", result.scalars())
            first = (await conn.execute(
                _flags_hint(select(func.min(t.message.c.uid))
                            .where(in_box, t.message.c.flags.op("&")(t.FLAG_SEEN) == 0))
            )).scalar()
            first_unseen = 0
            if first is not None:
                index = bisect_left(uids, first)
                if index < len(uids) and uids[index] == first:
                    first_unseen = index + 1
            keywords = await conn.execute(
                select(t.message.c.keywords).where(in_box, _HAS_KEYWORDS).distinct()
            )
            names: set[str] = set()
            for (text,) in keywords:
                names.update(split_keywords(text))
        return MailboxView(info, uids, first_unseen, tuple(sorted(names)))

    async def claim_recent(self, mailbox_id: int, seen: int, up_to: int) -> bool:
        """Announce UIDs ``seen+1 .. up_to`` as \\Recent to the calling session only: a
        compare-and-set on ``mailbox.recent_uid`` (RFC 3501 §2.3.2)."""

        async def job(conn: AsyncConnection) -> bool:
            result = await conn.execute(
                update(t.mailbox)
                .where(t.mailbox.c.id == mailbox_id, self._owned(),
                       t.mailbox.c.recent_uid == seen)
                .values(recent_uid=up_to)
            )
            return bool(result.rowcount)

        return await self._stores.write(job)

    async def changes(self, mailbox_id: int, since: int) -> Changes:
        async with self._store.read() as conn:
            row = (await conn.execute(
                select(t.mailbox.c.highestmodseq, t.mailbox.c.recent_uid)
                .where(t.mailbox.c.id == mailbox_id, self._owned())
            )).first()
            if row is None:
                return Changes(since, 0, (), (), exists=False)
            highest = int(row[0])
            if highest <= since:
                return Changes(highest, int(row[1]), (), ())
            rows = await conn.execute(
                select(t.message.c.uid, t.message.c.flags, t.message.c.keywords,
                       t.message.c.modseq)
                .where(self._in_mailbox(mailbox_id), t.message.c.modseq > since,
                       t.message.c.modseq <= highest)
                .order_by(t.message.c.uid)
            )
            changed = tuple(FlagState(int(r[0]), int(r[1]), r[2], int(r[3])) for r in rows)
            gone = await conn.execute(
                select(t.expunged.c.uid)
                .where(t.expunged.c.mailbox_id == self._mailbox_id(mailbox_id),
                       t.expunged.c.modseq > since, t.expunged.c.modseq <= highest)
                .order_by(t.expunged.c.uid)
            )
            expunged = tuple(int(r[0]) for r in gone)
        return Changes(highest, int(row[1]), changed, expunged)

    async def status(self, name: str) -> StatusCounts:
        async with self._store.read() as conn:
            info = await self._lookup(conn, name)
            if info is None:
                raise NoSuchMailbox()
            unseen = t.message.c.flags.op("&")(t.FLAG_SEEN) == 0
            row = (await conn.execute(
                select(
                    func.count(t.message.c.id),
                    func.count(t.message.c.id).filter(unseen),
                    func.count(t.message.c.id).filter(t.message.c.uid > info.recent_uid),
                ).where(self._in_mailbox(info.id))
            )).one()
        return StatusCounts(int(row[0]), int(row[1]), int(row[2]), info.uidnext,
                            info.uidvalidity)

    async def create(self, name: str) -> None:
        name = validate_name(name)

        async def job(conn: AsyncConnection) -> None:
            count = (await conn.execute(
                select(func.count(t.mailbox.c.id)).where(self._owned())
            )).scalar_one()
            if count >= MAX_MAILBOXES:
                raise TooMany()
            if await self._lookup(conn, name) is not None:
                raise MailboxExists()
            await conn.execute(insert(t.mailbox).values(
                patient_id=self.patient_id, name=name, special_use=None,
                uidvalidity=new_uidvalidity(), uidnext=1, highestmodseq=1, subscribed=1,
                recent_uid=0,
            ))

        await self._stores.write(job)

    async def delete(self, name: str) -> None:
        """RFC 3501 §6.3.4. INBOX and the special-use mailboxes the gateway files mail into
        cannot be deleted; neither can a mailbox with inferiors (we keep no \\Noselect
        mailboxes)."""

        async def job(conn: AsyncConnection) -> None:
            info = await self._lookup(conn, name)
            if info is None:
                raise NoSuchMailbox()
            if info.name == "INBOX" or info.special_use is not None:
                raise Cannot("This mailbox cannot be deleted")
            children = (await conn.execute(
                select(t.mailbox.c.name).where(self._owned())
            )).scalars()
            if any(child.startswith(name + DELIMITER) for child in children):
                raise Cannot("Delete the mailboxes inside it first")
            await conn.execute(delete(t.expunged).where(t.expunged.c.mailbox_id == info.id))
            gone = await conn.execute(
                delete(t.message).where(self._in_mailbox(info.id)).returning(t.message.c.blob_id)
            )
            await self._delete_orphan_blobs(conn, {int(b) for b in gone.scalars()})
            await conn.execute(
                delete(t.mailbox).where(t.mailbox.c.id == info.id, self._owned())
            )

        await self._stores.write(job)

    async def rename(self, old: str, new: str) -> None:
        """RFC 3501 §6.3.5: inferiors follow; renaming INBOX moves its messages to a new
        mailbox and leaves INBOX empty."""
        new = validate_name(new)

        async def job(conn: AsyncConnection) -> None:
            info = await self._lookup(conn, old)
            if info is None:
                raise NoSuchMailbox()
            if new == "INBOX" or await self._lookup(conn, new) is not None:
                raise MailboxExists()
            if new.startswith(old + DELIMITER):
                raise Cannot("A mailbox cannot be moved inside itself")
            if old == "INBOX":
                await self._rename_inbox(conn, info, new)
                return
            names = (await conn.execute(
                select(t.mailbox.c.id, t.mailbox.c.name).where(self._owned())
            )).all()
            for mailbox_id, name in names:
                if name == old or name.startswith(old + DELIMITER):
                    renamed = new + name[len(old):]
                    if len(renamed) > MAX_NAME_LENGTH:
                        raise InvalidName()
                    await conn.execute(
                        update(t.mailbox).where(t.mailbox.c.id == mailbox_id, self._owned())
                        .values(name=renamed)
                    )

        await self._stores.write(job)

    async def _rename_inbox(self, conn: AsyncConnection, inbox: MailboxInfo, new: str) -> None:
        bumped = await self._bump(conn, inbox.id)
        modseq = int(bumped[0])
        target = int((await conn.execute(insert(t.mailbox).values(
            patient_id=self.patient_id, name=new, special_use=None,
            uidvalidity=new_uidvalidity(), uidnext=int(bumped[1]), highestmodseq=modseq,
            subscribed=1, recent_uid=inbox.recent_uid,
        ).returning(t.mailbox.c.id))).scalar_one())
        uids = (await conn.execute(
            select(t.message.c.uid).where(self._in_mailbox(inbox.id))
        )).scalars().all()
        await conn.execute(
            update(t.message).where(self._in_mailbox(inbox.id)).values(mailbox_id=target)
        )
        if uids:
            await conn.execute(insert(t.expunged), [
                {"mailbox_id": inbox.id, "uid": uid, "modseq": modseq} for uid in uids
            ])

    async def subscribe(self, name: str, subscribed: bool) -> None:
        async def job(conn: AsyncConnection) -> None:
            result = await conn.execute(
                update(t.mailbox).where(self._owned(), t.mailbox.c.name == name)
                .values(subscribed=1 if subscribed else 0)
            )
            if not result.rowcount:
                raise NoSuchMailbox()

        await self._stores.write(job)

    # --- messages -----------------------------------------------------------------------

    async def fetch_rows(
        self, mailbox_id: int, uids: Sequence[int], columns: Iterable[str]
    ) -> list[Any]:
        """Rows (``uid`` + ``columns``) of the sorted ``uids`` that still exist, by UID."""
        wanted = [getattr(t.message.c, name) for name in sorted(set(columns) & ROW_COLUMNS)]
        conditions, filter_after = self._uid_filter(uids)
        async with self._store.read() as conn:
            rows = (await conn.execute(
                select(t.message.c.uid, *wanted)
                .where(self._in_mailbox(mailbox_id), *conditions)
                .order_by(t.message.c.uid)
            )).all()
        if filter_after:
            keep = set(uids)
            rows = [r for r in rows if r.uid in keep]
        return list(rows)

    async def flag_rows(
        self, mailbox_id: int, ranges: Sequence[tuple[int, int]]
    ) -> tuple[list[Any], dict[int, str]]:
        """FETCH FLAGS, the most frequent FETCH: ``(uid, flags)`` rows with a UID in the sorted
        inclusive ``ranges`` (or between the first and the last when there are many: callers
        filter), by UID, and ``{uid: keywords}`` of those that have keywords; from the indexes
        alone."""
        if not ranges:
            return [], {}
        if len(ranges) <= _MAX_RANGES:
            condition = or_(*(t.message.c.uid.between(lo, hi) for lo, hi in ranges))
        else:
            condition = t.message.c.uid.between(ranges[0][0], ranges[-1][1])
        in_box = self._in_mailbox(mailbox_id)
        async with self._store.read() as conn:
            rows = (await conn.execute(
                _flags_hint(select(t.message.c.uid, t.message.c.flags)
                            .where(in_box, condition).order_by(t.message.c.uid))
            )).all()
            keywords = {int(uid): str(text) for uid, text in await conn.execute(
                select(t.message.c.uid, t.message.c.keywords)
                .where(in_box, _HAS_KEYWORDS, condition)
            )}
        return list(rows), keywords

    async def search_rows(
        self, mailbox_id: int, where: ColumnElement[bool] | None, columns: Iterable[str],
        headers: Iterable[str] = (), *, indexed: bool = False,
    ) -> list[Any] | None:
        """SEARCH: ``uid`` + ``columns`` of the messages matching ``where`` (a condition on
        ``message`` columns and, when ``indexed``, on :data:`SEARCH_COLUMNS`), by UID.
        ``headers`` (lower-case field names) come as ``h0``, ``h1``... from ``meta``'s search
        headers, and ``"sent"`` in ``columns`` as ``sent`` (``meta``'s Date), extracted by the
        database; when it cannot (an invalid ``meta``), ``meta`` itself comes instead and
        ``h0`` ... are absent.

        ``indexed``: messages without a ``blob_search`` row get one first (once: Dovecot fills
        its cache file the same way); None if some still have none (the caller searches
        without ``blob_search``)."""
        if indexed:
            if not isinstance(self._store.blobs, DatabaseBlobStore):
                return None
            for _attempt in range(2):
                rows = await self._search_rows(mailbox_id, where, columns, headers, True)
                missing = {row.blob_id for row in rows if row.unindexed}
                if not missing:
                    return rows
                if not await self._fill_search(missing):
                    return None
            return None
        return await self._search_rows(mailbox_id, where, columns, headers, False)

    async def _fill_search(self, blob_ids: Iterable[int]) -> bool:
        """Write the ``blob_search`` rows of ``blob_ids`` (from their ``meta``)."""
        ids = sorted(blob_ids)
        values: list[dict[str, Any]] = []
        async with self._store.read() as conn:
            for start in range(0, len(ids), _CHUNK):
                rows = await conn.execute(
                    select(t.message.c.blob_id, func.min(t.message.c.meta))
                    .where(t.message.c.blob_id.in_(ids[start : start + _CHUNK]))
                    .group_by(t.message.c.blob_id)
                )
                for blob_id, meta in rows:
                    found = search_values(meta)
                    if found is None:
                        return False  # no search headers: this message is searched in Python
                    values.append({"blob_id": int(blob_id), **found})
        if not values:
            return False

        async def job(conn: AsyncConnection) -> None:
            for start in range(0, len(values), _CHUNK):
                await conn.execute(self._insert_search(), values[start : start + _CHUNK])

        try:
            await self._stores.write(job)
        except DBAPIError:  # a body deleted meanwhile
            log.info("blob_search not filled: a message went away")
            return False
        return True

    def _insert_search(self) -> Any:
        """INSERT into ``blob_search`` that leaves an existing row alone."""
        if self._sqlite:
            return sqlite.insert(t.blob_search).on_conflict_do_nothing()
        return postgresql.insert(t.blob_search).on_conflict_do_nothing()

    async def _search_rows(
        self, mailbox_id: int, where: ColumnElement[bool] | None, columns: Iterable[str],
        headers: Iterable[str], indexed: bool,
    ) -> list[Any]:
        wanted = sorted(set(columns) & ROW_COLUMNS)
        extracted: list[ColumnElement[Any]] = []
        fields = list(headers)
        if not all(_FIELD_NAME.fullmatch(name) for name in fields):
            wanted = sorted(set(wanted) | {"meta"})  # odd field names: the JSON in Python
            fields = []
            columns = set(columns) - {"sent"}
        for index, name in enumerate(fields):
            extracted.append(self._meta_text("search_headers", name).label(f"h{index}"))
        if "sent" in columns:
            extracted.append(self._meta_text("date").label("sent"))
        conditions = [self._in_mailbox(mailbox_id)]
        if indexed:
            unindexed = t.blob_search.c.blob_id.is_(None)
            extracted += [t.message.c.blob_id, unindexed.label("unindexed")]
            if where is not None:
                conditions.append(or_(unindexed, where))
        elif where is not None:
            conditions.append(where)
        only_flags = not extracted and set(wanted) <= {"flags"}

        def query(cols: list[Any]) -> Any:
            statement = select(t.message.c.uid, *cols).where(*conditions)
            if indexed:
                statement = statement.select_from(t.message.outerjoin(
                    t.blob_search, t.blob_search.c.blob_id == t.message.c.blob_id))
            statement = statement.order_by(t.message.c.uid)
            return _flags_hint(statement) if only_flags or indexed else statement

        plain = [getattr(t.message.c, name) for name in wanted]
        if extracted:
            try:
                async with self._store.read() as conn:
                    return list((await conn.execute(query(plain + extracted))).all())
            except DBAPIError:
                plain = [getattr(t.message.c, name) for name in sorted(set(wanted) | {"meta"})]
                if indexed:
                    plain += [t.message.c.blob_id, t.blob_search.c.blob_id.is_(None)
                              .label("unindexed")]
        async with self._store.read() as conn:
            return list((await conn.execute(query(plain))).all())

    async def bodies(
        self, mailbox_id: int, uids: Sequence[int], *, header_only: bool = False
    ) -> dict[int, bytes]:
        """``{uid: stored bytes}`` of the sorted ``uids`` that still exist, in one query.
        ``header_only``: the header section only (up to and with the empty line) when its
        size is known, the whole message otherwise; the rest of the body is not read."""
        if not isinstance(self._store.blobs, DatabaseBlobStore):
            out: dict[int, bytes] = {}
            for uid in uids:
                raw = await self.body(mailbox_id, uid)
                if raw is not None:
                    out[uid] = raw
            return out
        conditions, filter_after = self._uid_filter(uids)
        data: ColumnElement[Any] = t.blob.c.data
        if header_only:
            size = self._header_size()
            data = case((size > 0, func.substr(t.blob.c.data, 1, size)), else_=t.blob.c.data)

        def query(data: ColumnElement[Any]) -> Any:
            return (
                select(t.message.c.uid, data)
                .select_from(t.message.join(t.blob, t.blob.c.id == t.message.c.blob_id))
                .where(self._in_mailbox(mailbox_id), *conditions)
            )

        try:
            async with self._store.read() as conn:
                rows = (await conn.execute(query(data))).all()
        except DBAPIError:
            if not header_only:
                raise
            async with self._store.read() as conn:  # invalid meta: whole bodies
                rows = (await conn.execute(query(t.blob.c.data))).all()
        keep = set(uids) if filter_after else None
        return {int(uid): bytes(raw) for uid, raw in rows if keep is None or uid in keep}

    async def body(self, mailbox_id: int, uid: int) -> bytes | None:
        """The stored bytes of one message of this patient, or None if it is gone."""
        async with self._store.read() as conn:
            blob_id = (await conn.execute(
                select(t.message.c.blob_id)
                .where(self._in_mailbox(mailbox_id), t.message.c.uid == uid)
            )).scalar_one_or_none()
            if blob_id is None:
                return None
            return await self._store.blobs.get(conn, int(blob_id))

    async def store_flags(
        self, mailbox_id: int, uids: Sequence[int], mode: str, bits: int,
        keywords: Sequence[str],
    ) -> tuple[int, list[FlagState]]:
        """STORE (RFC 3501 §6.4.6): ``mode`` is ``FLAGS``, ``+FLAGS`` or ``-FLAGS``. Returns the
        MODSEQ of the change and the resulting flags of every message of ``uids`` that
        exists; rows whose flags changed carry that MODSEQ."""
        wanted_keywords = list(dict.fromkeys(keywords))

        async def job(conn: AsyncConnection) -> tuple[int, list[FlagState]]:
            modseq = int((await self._bump(conn, mailbox_id))[0])
            conditions, filter_after = self._uid_filter(uids)
            rows = (await conn.execute(
                select(t.message.c.uid, t.message.c.flags, t.message.c.keywords,
                       t.message.c.modseq)
                .where(self._in_mailbox(mailbox_id), *conditions)
                .order_by(t.message.c.uid)
            )).all()
            keep = set(uids) if filter_after else None
            states: list[FlagState] = []
            updates: list[dict[str, Any]] = []
            for uid, flags, kw_text, old_modseq in rows:
                if keep is not None and uid not in keep:
                    continue
                current = split_keywords(kw_text)
                if mode == "+FLAGS":
                    new_flags = flags | bits
                    new_kw = current + [k for k in wanted_keywords if k not in current]
                elif mode == "-FLAGS":
                    new_flags = flags & ~bits
                    new_kw = [k for k in current if k not in wanted_keywords]
                else:
                    new_flags = bits
                    new_kw = wanted_keywords
                new_kw = [k[:MAX_KEYWORD_LENGTH] for k in new_kw[:MAX_KEYWORDS]]
                new_text = " ".join(new_kw)
                if new_flags != flags or new_text != kw_text:
                    updates.append({"u": uid, "f": new_flags, "k": new_text})
                    states.append(FlagState(uid, new_flags, new_text, modseq))
                else:
                    states.append(FlagState(uid, flags, kw_text, int(old_modseq)))
            if updates:
                await conn.execute(
                    update(t.message)
                    .where(t.message.c.mailbox_id == mailbox_id,
                           t.message.c.uid == bindparam("u"))
                    .values(flags=bindparam("f"), keywords=bindparam("k"), modseq=modseq),
                    updates,
                )
            return modseq, states

        return await self._stores.write(job)

    async def _delete_uids(
        self, conn: AsyncConnection, mailbox_id: int, uids: Sequence[int], modseq: int
    ) -> None:
        blob_ids: set[int] = set()
        for start in range(0, len(uids), _CHUNK):
            chunk = list(uids[start : start + _CHUNK])
            result = await conn.execute(
                delete(t.message).where(self._in_mailbox(mailbox_id), t.message.c.uid.in_(chunk))
                .returning(t.message.c.blob_id)
            )
            blob_ids.update(int(b) for b in result.scalars())
        await self._delete_orphan_blobs(conn, blob_ids)
        if uids:
            await conn.execute(insert(t.expunged), [
                {"mailbox_id": mailbox_id, "uid": uid, "modseq": modseq} for uid in uids
            ])

    async def _delete_orphan_blobs(self, conn: AsyncConnection, blob_ids: Iterable[int]) -> None:
        """Delete the bodies of ``blob_ids`` that no message and no outbound mail references
        any more (health data must not linger after EXPUNGE), in the caller's transaction."""
        ids = sorted(blob_ids)
        if not isinstance(self._store.blobs, DatabaseBlobStore):
            return
        for start in range(0, len(ids), _CHUNK):
            await conn.execute(
                delete(t.blob).where(
                    t.blob.c.id.in_(ids[start : start + _CHUNK]),
                    ~exists().where(t.message.c.blob_id == t.blob.c.id),
                    ~exists().where(t.outbound.c.blob_id == t.blob.c.id),
                )
            )

    async def expunge(
        self, mailbox_id: int, ranges: Sequence[tuple[int, int]] | None = None
    ) -> tuple[int, list[int]]:
        """Remove the messages flagged \\Deleted (with a UID in ``ranges``, inclusive, for UID
        EXPUNGE, RFC 4315 §2.1); they are recorded in ``expunged`` for the other sessions and
        their bodies are deleted unless still referenced."""
        conditions: list[ColumnElement[bool]] = []
        keep: Callable[[int], bool] | None = None
        if ranges is not None:
            if not ranges:
                return 0, []
            if len(ranges) <= _MAX_RANGES:
                conditions.append(or_(*(t.message.c.uid.between(lo, hi) for lo, hi in ranges)))
            else:
                conditions.append(t.message.c.uid.between(ranges[0][0], ranges[-1][1]))

                def keep(uid: int) -> bool:
                    index = bisect_left(ranges, (uid + 1,)) - 1
                    return index >= 0 and ranges[index][0] <= uid <= ranges[index][1]

        async def job(conn: AsyncConnection) -> tuple[int, list[int]]:
            deleted = t.message.c.flags.op("&")(t.FLAG_DELETED) != 0
            candidates = (await conn.execute(
                _flags_hint(select(t.message.c.uid)
                            .where(self._in_mailbox(mailbox_id), deleted, *conditions)
                            .order_by(t.message.c.uid))
            )).scalars().all()
            uids = [int(u) for u in candidates if keep is None or keep(int(u))]
            if not uids:
                return 0, []
            modseq = int((await self._bump(conn, mailbox_id))[0])
            await self._delete_uids(conn, mailbox_id, uids, modseq)
            return modseq, uids

        return await self._stores.write(job)

    async def append(
        self, name: str, raw: bytes, bits: int, keywords: Sequence[str],
        internal_date: datetime | None,
    ) -> tuple[int, int, int, int]:
        """APPEND (RFC 3501 §6.3.11): ``(mailbox id, UIDVALIDITY, UID, MODSEQ)``."""
        if len(raw) > _THREAD_PARSE_SIZE:
            info: MessageInfo = await asyncio.to_thread(parse_message, raw)
        else:
            info = parse_message(raw)
        kw_text = " ".join(list(dict.fromkeys(keywords))[:MAX_KEYWORDS])

        async def job(conn: AsyncConnection) -> tuple[int, int, int, int]:
            mailbox = await self._lookup(conn, name)
            if mailbox is None:
                raise TryCreate()
            stored = (await conn.run_sync(deliver, [mailbox.id], raw, info, flags=bits,
                                          keywords=kw_text, internal_date=internal_date))[0]
            return mailbox.id, mailbox.uidvalidity, stored.uid, stored.modseq

        return await self._stores.write(job)

    async def copy(
        self, mailbox_id: int, uids: Sequence[int], target: str, move: bool
    ) -> CopyResult:
        """COPY (RFC 3501 §6.4.7) or MOVE (RFC 6851): new UIDs allocated in one block, bodies
        shared (blobs are immutable), flags kept; MOVE expunges the sources in the same
        transaction."""
        copied = [c for c in t.message.c if c.name not in ("id", "mailbox_id", "uid", "modseq")]

        async def job(conn: AsyncConnection) -> CopyResult:
            dest = await self._lookup(conn, target)
            if dest is None:
                raise TryCreate()
            conditions, filter_after = self._uid_filter(uids)
            rows = (await conn.execute(
                select(t.message.c.uid, *copied)
                .where(self._in_mailbox(mailbox_id), *conditions)
                .order_by(t.message.c.uid)
            )).all()
            if filter_after:
                keep = set(uids)
                rows = [r for r in rows if r.uid in keep]
            if not rows:
                return CopyResult(dest.id, 0, dest.uidvalidity, ())
            bumped = await self._bump(conn, dest.id, uids=len(rows))
            modseq, first = int(bumped[0]), int(bumped[1]) - len(rows)
            values = []
            pairs = []
            for offset, row in enumerate(rows):
                record = {c.name: getattr(row, c.name) for c in copied}
                record.update(mailbox_id=dest.id, uid=first + offset, modseq=modseq)
                values.append(record)
                pairs.append((int(row.uid), first + offset))
            await conn.execute(insert(t.message), values)
            expunge_modseq = 0
            if move:
                expunge_modseq = int((await self._bump(conn, mailbox_id))[0])
                await self._delete_uids(conn, mailbox_id, [p[0] for p in pairs], expunge_modseq)
            return CopyResult(dest.id, modseq, int(bumped[2]), tuple(pairs), expunge_modseq)

        return await self._stores.write(job)


def _flags_hint(statement: Any) -> Any:
    """Have SQLite read (uid, flags) from ``ix_message_mailbox_uid_flags`` alone (its planner
    would pick the unique (mailbox_id, uid) index and read every wide row for the flags)."""
    return statement.with_hint(t.message, "INDEXED BY ix_message_mailbox_uid_flags", "sqlite")
