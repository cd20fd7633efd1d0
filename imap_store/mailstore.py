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
from array import array
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol, TypeVar

from sqlalchemy import (
    ColumnElement,
    bindparam,
    delete,
    false,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection

from imap_store import schema as t
from imap_store.derive import derive
from imap_store.store import MessageFields, Store, new_uidvalidity

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

    async def highestmodseq(self, mailbox_id: int) -> int: ...

    async def fetch_rows(
        self, mailbox_id: int, uids: Sequence[int], columns: Iterable[str]
    ) -> list[Any]: ...

    async def all_rows(self, mailbox_id: int, columns: Iterable[str]) -> list[Any]: ...

    async def body(self, mailbox_id: int, uid: int) -> bytes | None: ...

    async def store_flags(
        self, mailbox_id: int, uids: Sequence[int], mode: str, bits: int,
        keywords: Sequence[str],
    ) -> tuple[int, list[FlagState]]: ...

    async def expunge(
        self, mailbox_id: int, only: Callable[[int], bool] | None = None
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
        """Conditions selecting sorted ``uids``: ranges, or one range filtered afterwards
        (``True`` in the second item means "filter the rows in Python")."""
        ranges = uid_ranges(uids)
        if not ranges:
            return [false()], False
        if len(ranges) <= _MAX_RANGES:
            return [or_(*(t.message.c.uid.between(lo, hi) for lo, hi in ranges))], False
        return [t.message.c.uid.between(ranges[0][0], ranges[-1][1])], True

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
            result = await conn.execute(
                select(t.message.c.uid, t.message.c.flags)
                .where(t.message.c.mailbox_id == info.id)  # info came from a scoped lookup
                .order_by(t.message.c.uid)
            )
            uids: array[int] = array("L")
            first_unseen = 0
            seen = t.FLAG_SEEN
            for uid, flags in result:
                uids.append(uid)
                if not first_unseen and not flags & seen:
                    first_unseen = len(uids)
            keywords = await conn.execute(
                select(t.message.c.keywords)
                .where(t.message.c.mailbox_id == info.id, t.message.c.keywords != "")
                .distinct()
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

    async def highestmodseq(self, mailbox_id: int) -> int:
        async with self._store.read() as conn:
            value = (await conn.execute(
                select(t.mailbox.c.highestmodseq)
                .where(t.mailbox.c.id == mailbox_id, self._owned())
            )).scalar_one_or_none()
        return 0 if value is None else int(value)

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
            await conn.execute(delete(t.message).where(self._in_mailbox(info.id)))
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

    async def all_rows(self, mailbox_id: int, columns: Iterable[str]) -> list[Any]:
        wanted = [getattr(t.message.c, name) for name in sorted(set(columns) & ROW_COLUMNS)]
        async with self._store.read() as conn:
            rows = await conn.execute(
                select(t.message.c.uid, *wanted)
                .where(self._in_mailbox(mailbox_id))
                .order_by(t.message.c.uid)
            )
            return list(rows.all())

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
        for start in range(0, len(uids), _CHUNK):
            chunk = list(uids[start : start + _CHUNK])
            await conn.execute(
                delete(t.message).where(self._in_mailbox(mailbox_id), t.message.c.uid.in_(chunk))
            )
        if uids:
            await conn.execute(insert(t.expunged), [
                {"mailbox_id": mailbox_id, "uid": uid, "modseq": modseq} for uid in uids
            ])

    async def expunge(
        self, mailbox_id: int, only: Callable[[int], bool] | None = None
    ) -> tuple[int, list[int]]:
        """Remove the messages flagged \\Deleted (those ``only`` accepts, for UID EXPUNGE,
        RFC 4315 §2.1); they are recorded in ``expunged`` for the other sessions."""

        async def job(conn: AsyncConnection) -> tuple[int, list[int]]:
            deleted = t.message.c.flags.op("&")(t.FLAG_DELETED) != 0
            candidates = (await conn.execute(
                select(t.message.c.uid).where(self._in_mailbox(mailbox_id), deleted)
                .order_by(t.message.c.uid)
            )).scalars().all()
            uids = [int(u) for u in candidates if only is None or only(int(u))]
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
            fields: MessageFields = await asyncio.to_thread(derive, raw)
        else:
            fields = derive(raw)
        kw_text = " ".join(list(dict.fromkeys(keywords))[:MAX_KEYWORDS])

        async def job(conn: AsyncConnection) -> tuple[int, int, int, int]:
            info = await self._lookup(conn, name)
            if info is None:
                raise TryCreate()
            stored = await self._store.append(
                conn, info.id, raw, fields, flags=bits, keywords=kw_text,
                internal_date=internal_date,
            )
            return info.id, info.uidvalidity, stored.uid, stored.modseq

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
