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

import json
import logging
import operator
import re
from array import array
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any, NamedTuple, Protocol, TypeVar

from sqlalchemy import (
    ColumnElement,
    Integer,
    and_,
    bindparam,
    case,
    cast,
    delete,
    exists,
    false,
    func,
    insert,
    literal_column,
    not_,
    null,
    or_,
    select,
    true,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection

from imap_store.mime import MessageInfo, parse_message_async, text_for_search
from imap_store.store import schema as t
from imap_store.store import search_keys as sk
from imap_store.store.deliver import SEARCH_FIELDS, deliver, search_values
from imap_store.store.directory import DatabaseBlobStore, Store, new_uidvalidity
from imap_store.store.sent_copies import server_filed_copy

log = logging.getLogger(__name__)
T = TypeVar("T")
Job = Callable[[AsyncConnection], Awaitable[T]]
SyncJob = Callable[[Connection], T]

#: Hierarchy delimiter of mailbox names (RFC 3501 §5.1.1), announced in LIST and NAMESPACE.
DELIMITER = "/"
#: Most mailboxes one patient may have (SPEC §9: limits on everything a client controls).
MAX_MAILBOXES = 1000
#: Longest mailbox name, in characters (the ``mailbox.name`` column holds 255).
MAX_NAME_LENGTH = 200
#: Most subscribed names per patient. Subscriptions outlive their mailbox (RFC 3501 §6.3.6),
#: so without a bound CREATE, SUBSCRIBE, DELETE in a loop would grow the table for ever.
MAX_SUBSCRIPTIONS = 2 * MAX_MAILBOXES
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
#: A SEARCH key naming more UID ranges than this is decided in Python rather than in SQL.
_MAX_SEARCH_RANGES = 50
#: Message bodies read in one query by SEARCH BODY/TEXT (at least one message per query).
_SEARCH_BODY_BATCH = 8 * 1024 * 1024

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


class TooManySubscriptions(MailStoreError):
    code = "LIMIT"
    text = "Too many subscriptions"


# --------------------------------------------------------------------------- records


@dataclass(frozen=True, slots=True)
class MailboxInfo:
    """One mailbox row of the authenticated patient."""

    id: int
    name: str
    special_use: str | None
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
    """STATUS items (RFC 3501 §6.3.10): with ``deleted`` (messages with ``\\Deleted``, RFC 9051
    §6.3.11) and ``size`` (the messages' octets, RFC 8438; 0 unless asked for)."""

    messages: int
    unseen: int
    recent: int
    uidnext: int
    uidvalidity: int
    highestmodseq: int = 0
    deleted: int = 0
    size: int = 0


@dataclass(frozen=True, slots=True)
class CopyResult:
    """COPY/MOVE outcome: COPYUID data (RFC 4315 §3) and, for MOVE, the expunge MODSEQ."""

    mailbox_id: int  # the target
    modseq: int  # of the copies in the target
    uidvalidity: int
    pairs: tuple[tuple[int, int], ...]  # (source UID, new UID), ascending
    expunge_modseq: int = 0


class MessageRow(NamedTuple):
    """A message's columns as FETCH reads them (:meth:`MailStore.fetch_rows`). Only the
    columns asked for are read: the others hold ``0``, ``""`` or ``None``."""

    uid: int
    flags: int  # system flag bits (SYSTEM_FLAG_BITS)
    keywords: str  # space-separated
    size: int
    internal_date: datetime | None
    meta: str | None  # MessageInfo.to_dict() as JSON
    modseq: int  # of the message's last change (RFC 7162 §3.1)


#: Columns the session may ask :meth:`MailStore.fetch_rows` for (``uid`` always comes).
ROW_COLUMNS = frozenset(MessageRow._fields[1:])


# --------------------------------------------------------------------------- SEARCH queries
# What a SEARCH asks of the store: the keys of search_keys.py (sk) as the IMAP grammar parsed
# them, and MatchUids for those the session resolves against its view (sequence numbers, UID
# sets and \\Recent become UID ranges).


@dataclass(frozen=True, slots=True)
class MatchUids:
    """A UID in one of ``ranges`` (inclusive, ascending, merged)."""

    ranges: tuple[tuple[int, int], ...]


Match = (
    sk.MessageKey | MatchUids
    | sk.SearchNot["Match"] | sk.SearchOr["Match"] | sk.SearchAnd["Match"]
)


@dataclass(frozen=True, slots=True)
class SearchResult:
    """The answer of :meth:`MailStore.search`: the UIDs that match, ascending. ``bodies``: the
    query looked into message bodies (BODY, TEXT), an access to health data to audit."""

    uids: list[int]
    bodies: bool = False


class SearchRow(NamedTuple):
    """A message SEARCH could not decide in the database: the columns the rest of the query
    looks at, ``0``, ``""`` or ``None`` for the others."""

    uid: int
    flags: int
    keywords: str
    size: int
    internal_date: datetime | None
    meta: str | None  # read when the header fields could not be extracted by the database
    modseq: int
    sent: str | None  # the Date header (ISO 8601), extracted from ``meta`` by the database
    headers: tuple[str | None, ...]  # header fields, extracted likewise (see _Candidates)


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
    ) -> list[MessageRow]: ...

    async def flag_rows(
        self, mailbox_id: int, ranges: Sequence[tuple[int, int]]
    ) -> tuple[Sequence[tuple[int, int]], dict[int, str]]: ...

    async def search(self, mailbox_id: int, query: Match) -> SearchResult: ...

    async def body(self, mailbox_id: int, uid: int) -> bytes | None: ...

    async def bodies(
        self, mailbox_id: int, uids: Sequence[int], *, header_only: bool = False
    ) -> dict[int, bytes]: ...

    async def store_flags(
        self, mailbox_id: int, uids: Sequence[int], mode: str, bits: int,
        keywords: Sequence[str], unchanged_since: int | None = None,
        modified: list[int] | None = None,
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

    async def subscriptions(self) -> list[str]: ...

    async def subscribe(self, name: str, subscribed: bool) -> None: ...

    async def status(self, name: str, size: bool = False) -> StatusCounts: ...

    async def statuses(self, mailbox_ids: Collection[int],
                       size: bool = False) -> dict[int, StatusCounts]: ...

    async def vanished(self, mailbox_id: int, since: int,
                       ranges: Sequence[tuple[int, int]] | None = None) -> list[int]: ...


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


def merge_ranges(bounds: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, merged inclusive ranges."""
    merged: list[tuple[int, int]] = []
    for low, high in sorted(bounds):
        if merged and low <= merged[-1][1] + 1:
            if high > merged[-1][1]:
                merged[-1] = (merged[-1][0], high)
        else:
            merged.append((low, high))
    return merged


# --------------------------------------------------------------------------- SEARCH in SQL


def _leaves(key: Match) -> Iterator[Match]:
    """The keys of a query that are not NOT, OR or AND."""
    stack: list[Match] = [key]
    while stack:
        node = stack.pop()
        if isinstance(node, sk.SearchNot):
            stack.append(node.key)
        elif isinstance(node, sk.SearchOr):
            stack.extend((node.left, node.right))
        elif isinstance(node, sk.SearchAnd):
            stack.extend(node.keys)
        else:
            yield node


def _query_fields(key: Match) -> set[str]:
    """Header fields (lower case) a query looks into."""
    return {n.field for n in _leaves(key) if isinstance(n, sk.SearchHeader)}


def _number_test(key: Match) -> tuple[str, Callable[[Any, int], Any], int] | None:
    """For the keys that compare one number of the message with the key's (LARGER, SMALLER,
    MODSEQ): the column, the comparison and the key's number; the SQL condition and the
    Python match both apply it. None for the other keys."""
    if isinstance(key, sk.SearchLarger):
        return "size", operator.gt, key.size
    if isinstance(key, sk.SearchSmaller):
        return "size", operator.lt, key.size
    if isinstance(key, sk.SearchModseq):
        return "modseq", operator.ge, key.modseq
    return None


def _query_columns(key: Match) -> set[str]:
    """Columns (``sent``: the Date header; ``body``) a query needs in Python (header fields
    are extracted from ``meta``: see ``_query_fields``)."""
    out: set[str] = set()
    for node in _leaves(key):
        if isinstance(node, sk.SearchFlag):
            out.update(("flags", "keywords"))
        elif isinstance(node, sk.SearchInternalDate):
            out.add("internal_date")
        elif isinstance(node, sk.SearchSentDate):
            out.add("sent")
        elif (test := _number_test(node)) is not None:
            out.add(test[0])
        elif isinstance(node, sk.SearchBody):
            out.add("body")
        elif isinstance(node, sk.SearchText):
            out.update(("body", "meta"))
    return out


def _sql_condition(key: Match, indexed: bool) -> Any:
    """A WHERE clause deciding ``key`` exactly, or None when Python must decide (keywords,
    dates, bodies, other header fields, many UID ranges). ``indexed``: the search joins
    ``blob_search`` (FROM/TO/CC/BCC/SUBJECT, case-folded like the needle)."""
    m = t.message.c
    if isinstance(key, sk.SearchAll):
        return true()
    if isinstance(key, sk.SearchHeader):
        column = SEARCH_COLUMNS.get(key.field)
        if not indexed or column is None:
            return None
        # both sides case-folded: LIKE is a plain substring test (SQLite's LIKE only folds
        # ASCII, which case-folded text no longer has in upper case)
        return and_(column.is_not(None),
                    column.contains(key.value.casefold(), autoescape=True))
    if isinstance(key, sk.SearchFlag):
        if key.flag not in SYSTEM_FLAG_BITS:
            return None
        condition = m.flags.op("&")(SYSTEM_FLAG_BITS[key.flag]) != 0
        return condition if key.present else not_(condition)
    if isinstance(key, MatchUids):
        if len(key.ranges) > _MAX_SEARCH_RANGES:
            return None
        return or_(false(), *(m.uid.between(low, high) for low, high in key.ranges))
    if (test := _number_test(key)) is not None:
        name, compare, number = test
        return compare(m[name], number)
    if isinstance(key, sk.SearchNot):
        inner = _sql_condition(key.key, indexed)
        return None if inner is None else not_(inner)
    if isinstance(key, sk.SearchOr | sk.SearchAnd):
        keys = (key.left, key.right) if isinstance(key, sk.SearchOr) else key.keys
        parts = [_sql_condition(k, indexed) for k in keys]
        if any(p is None for p in parts):
            return None
        return or_(*parts) if isinstance(key, sk.SearchOr) else and_(true(), *parts)
    return None


#: What :class:`MessageRow` and :class:`SearchRow` hold for a column that was not asked for.
_NOT_READ: dict[str, ColumnElement[Any]] = {
    "flags": literal_column("0"), "keywords": literal_column("''"), "size": literal_column("0"),
    "internal_date": null(), "meta": null(), "modseq": literal_column("0"),
}


def _row_columns(wanted: Collection[str]) -> list[ColumnElement[Any]]:
    """The columns of :class:`MessageRow` after ``uid``, in order: the ``message`` column when
    ``wanted``, else a constant (no column read, index-only scans stay possible)."""
    return [t.message.c[name] if name in wanted else _NOT_READ[name].label(name)
            for name in MessageRow._fields[1:]]


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

    def __init__(self, store: Store, submit: Callable[[Job[Any]], Awaitable[Any]] | None = None,
                 submit_sync: Callable[..., Awaitable[Any]] | None = None):
        self.store = store
        self._submit = submit
        self._submit_sync = submit_sync

    def for_patient(self, patient_id: int) -> PatientMailStore:
        return PatientMailStore(self, patient_id)

    async def write(self, job: Job[T]) -> T:
        if self._submit is not None:
            result: T = await self._submit(job)
            return result
        async with self.store.write() as conn:
            return await job(conn)

    async def write_sync(self, job: SyncJob[T], size: int = 0) -> T:
        """Run ``job(Connection)`` in a write transaction: the group writer's synchronous job
        (``GroupWriter.submit_sync``; ``size``: about how many bytes it writes) when given,
        else through ``submit`` or a transaction of its own.

        IMAP's writes are synchronous jobs: on SQLite a batch of them runs on the writer's
        own pysqlite connection, its statements on the event loop, instead of one
        aiosqlite thread hop per statement; and a batch is all synchronous jobs, so it never
        switches between the writer's connection and the async engine's (see writer.py)."""
        if self._submit_sync is not None:
            result: T = await self._submit_sync(job, size)
            return result
        if self._submit is not None:
            return await self.write(lambda conn: conn.run_sync(job))
        async with self.store.write() as conn:
            return await conn.run_sync(job)

    async def highestmodseqs(self, mailbox_ids: Iterable[int]) -> dict[int, int]:
        """``{mailbox id: highestmodseq}`` for the mailboxes selected in this process (counters
        only; a mailbox that vanished is absent)."""
        ids = list(mailbox_ids)
        result: dict[int, int] = {}
        async with self.store.read() as conn:
            for start in range(0, len(ids), _CHUNK):
                rows = await conn.execute(_HIGHESTMODSEQS, {"ids": ids[start : start + _CHUNK]})
                result.update((int(r[0]), int(r[1])) for r in rows)
        return result


def _info(row: Any) -> MailboxInfo:
    return MailboxInfo(
        id=int(row.id), name=row.name, special_use=row.special_use,
        uidvalidity=int(row.uidvalidity),
        uidnext=int(row.uidnext), highestmodseq=int(row.highestmodseq),
        recent_uid=int(row.recent_uid),
    )


_MAILBOX_COLUMNS = (
    t.mailbox.c.id, t.mailbox.c.name, t.mailbox.c.special_use,
    t.mailbox.c.uidvalidity, t.mailbox.c.uidnext, t.mailbox.c.highestmodseq,
    t.mailbox.c.recent_uid,
)

# --- statements built once ------------------------------------------------------------------
# The statements of SELECT/EXAMINE, STATUS and the change poll run for every session at every
# command: built per call, SQLAlchemy spent more CPU constructing them and their cache keys
# than running them (bench/select_cost.py). Built once with bind parameters, a statement
# object keeps its memoized cache key and only the parameters change.

_P_PATIENT = bindparam("patient_id", type_=Integer)
_P_MAILBOX = bindparam("mailbox_id", type_=Integer)
#: The id of mailbox ``:mailbox_id`` if patient ``:patient_id`` owns it, else nothing.
_OWNED_MAILBOX_ID = (
    select(t.mailbox.c.id)
    .where(t.mailbox.c.id == _P_MAILBOX, t.mailbox.c.patient_id == _P_PATIENT)
    .scalar_subquery()
)
_HIGHESTMODSEQS = select(t.mailbox.c.id, t.mailbox.c.highestmodseq).where(
    t.mailbox.c.id.in_(bindparam("ids", expanding=True)))
_LOOKUP = select(*_MAILBOX_COLUMNS).where(
    t.mailbox.c.patient_id == _P_PATIENT, t.mailbox.c.name == bindparam("name"))
# Three index-only reads (ix_message_mailbox_uid_flags, the partial keywords index): the UIDs,
# the first unseen one, the keywords in use; no row is read. ``:mailbox_id`` comes from a
# scoped lookup.
_OPEN_UIDS = (select(t.message.c.uid).where(t.message.c.mailbox_id == _P_MAILBOX)
              .order_by(t.message.c.uid))
_OPEN_FIRST_UNSEEN = (
    select(func.min(t.message.c.uid))
    .where(t.message.c.mailbox_id == _P_MAILBOX, t.message.c.flags.op("&")(t.FLAG_SEEN) == 0)
    .with_hint(t.message, "INDEXED BY ix_message_mailbox_uid_flags", "sqlite")
)
_OPEN_KEYWORDS = (select(t.message.c.keywords)
                  .where(t.message.c.mailbox_id == _P_MAILBOX, _HAS_KEYWORDS).distinct())
_CLAIM_RECENT = (
    update(t.mailbox)
    # (an UPDATE's bind parameters may not be named like the table's columns)
    .where(t.mailbox.c.id == bindparam("box", type_=Integer),
           t.mailbox.c.patient_id == bindparam("owner", type_=Integer),
           t.mailbox.c.recent_uid == bindparam("seen", type_=Integer))
    .values(recent_uid=bindparam("up_to", type_=Integer))
)
_CHANGES_HEAD = select(t.mailbox.c.highestmodseq, t.mailbox.c.recent_uid,
                       t.mailbox.c.vanished_modseq).where(
    t.mailbox.c.id == _P_MAILBOX, t.mailbox.c.patient_id == _P_PATIENT)
#: What VANISHED needs of a mailbox: where the UIDs end, where the kept expunges start.
_VANISHED_HEAD = select(t.mailbox.c.uidnext, t.mailbox.c.vanished_modseq).where(
    t.mailbox.c.id == _P_MAILBOX, t.mailbox.c.patient_id == _P_PATIENT)
_P_SINCE = bindparam("since", type_=Integer)
_P_HIGHEST = bindparam("highest", type_=Integer)
_CHANGED_FLAGS = (
    select(t.message.c.uid, t.message.c.flags, t.message.c.keywords, t.message.c.modseq)
    .where(t.message.c.mailbox_id == _OWNED_MAILBOX_ID, t.message.c.modseq > _P_SINCE,
           t.message.c.modseq <= _P_HIGHEST)
    .order_by(t.message.c.uid)
)
_CHANGED_GONE = (
    select(t.expunged.c.uid)
    .where(t.expunged.c.mailbox_id == _OWNED_MAILBOX_ID, t.expunged.c.modseq > _P_SINCE,
           t.expunged.c.modseq <= _P_HIGHEST)
    .order_by(t.expunged.c.uid)
)
_STATUS_UNSEEN = t.message.c.flags.op("&")(t.FLAG_SEEN) == 0
_STATUS_DELETED = t.message.c.flags.op("&")(t.FLAG_DELETED) != 0
_STATUS_COUNTS = select(
    func.count(t.message.c.id),
    func.count(t.message.c.id).filter(_STATUS_UNSEEN),
    func.count(t.message.c.id).filter(t.message.c.uid > bindparam("recent_uid", type_=Integer)),
    func.count(t.message.c.id).filter(_STATUS_DELETED),
).where(t.message.c.mailbox_id == _OWNED_MAILBOX_ID)
#: STATUS SIZE (RFC 8438): the one item that reads the message rows, not only the index.
_STATUS_SIZE = select(func.coalesce(func.sum(t.message.c.size), 0)).where(
    t.message.c.mailbox_id == _OWNED_MAILBOX_ID)


def _statuses_query(size: bool) -> Any:
    """LIST-STATUS (RFC 5819): the STATUS counts of many mailboxes of one patient in one
    statement, grouped by mailbox (a mailbox without messages counts zeros)."""
    message = t.message.c
    columns = [
        t.mailbox.c.id, t.mailbox.c.uidnext, t.mailbox.c.uidvalidity, t.mailbox.c.highestmodseq,
        func.count(message.id),
        func.count(message.id).filter(_STATUS_UNSEEN),
        func.count(message.id).filter(message.uid > t.mailbox.c.recent_uid),
        func.count(message.id).filter(_STATUS_DELETED),
    ]
    if size:
        columns.append(func.coalesce(func.sum(message.size), 0))
    return (
        select(*columns)
        .select_from(t.mailbox.outerjoin(t.message, message.mailbox_id == t.mailbox.c.id))
        .where(t.mailbox.c.patient_id == _P_PATIENT,
               t.mailbox.c.id.in_(bindparam("ids", expanding=True)))
        .group_by(t.mailbox.c.id, t.mailbox.c.uidnext, t.mailbox.c.uidvalidity,
                  t.mailbox.c.highestmodseq)
    )


_STATUSES = {size: _statuses_query(size) for size in (False, True)}


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
            _LOOKUP, {"patient_id": self.patient_id, "name": name})).first()
        return None if row is None else _info(row)

    def _lookup_sync(self, conn: Connection, name: str) -> MailboxInfo | None:
        row = conn.execute(_LOOKUP, {"patient_id": self.patient_id, "name": name}).first()
        return None if row is None else _info(row)

    def _bump(self, conn: Connection, mailbox_id: int, uids: int = 0) -> Any:
        """Allocate a MODSEQ (and ``uids`` UIDs): locks the mailbox row until commit."""
        values: dict[str, Any] = {"highestmodseq": t.mailbox.c.highestmodseq + 1}
        if uids:
            values["uidnext"] = t.mailbox.c.uidnext + uids
        row = conn.execute(
            update(t.mailbox)
            .where(t.mailbox.c.id == mailbox_id, self._owned())
            .values(**values)
            .returning(t.mailbox.c.highestmodseq, t.mailbox.c.uidnext, t.mailbox.c.uidvalidity)
        ).first()
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
            in_box = {"mailbox_id": info.id}  # info came from a scoped lookup
            result = await conn.execute(_OPEN_UIDS, in_box)
            uids: array[int] = array("L", result.scalars())
            first = (await conn.execute(_OPEN_FIRST_UNSEEN, in_box)).scalar()
            first_unseen = 0
            if first is not None:
                index = bisect_left(uids, first)
                if index < len(uids) and uids[index] == first:
                    first_unseen = index + 1
            keywords = await conn.execute(_OPEN_KEYWORDS, in_box)
            names: set[str] = set()
            for (text,) in keywords:
                names.update(split_keywords(text))
        return MailboxView(info, uids, first_unseen, tuple(sorted(names)))

    async def claim_recent(self, mailbox_id: int, seen: int, up_to: int) -> bool:
        """Announce UIDs ``seen+1 .. up_to`` as \\Recent to the calling session only: a
        compare-and-set on ``mailbox.recent_uid`` (RFC 3501 §2.3.2)."""

        def job(conn: Connection) -> bool:
            result = conn.execute(_CLAIM_RECENT, {
                "box": mailbox_id, "owner": self.patient_id, "seen": seen,
                "up_to": up_to})
            return bool(result.rowcount)

        return await self._stores.write_sync(job)

    async def changes(self, mailbox_id: int, since: int) -> Changes:
        async with self._store.read() as conn:
            scope = {"mailbox_id": mailbox_id, "patient_id": self.patient_id}
            row = (await conn.execute(_CHANGES_HEAD, scope)).first()
            if row is None:
                return Changes(since, 0, (), (), exists=False)
            highest = int(row[0])
            if highest <= since:
                return Changes(highest, int(row[1]), (), ())
            window = {**scope, "since": since, "highest": highest}
            rows = await conn.execute(_CHANGED_FLAGS, window)
            changed = tuple(FlagState(int(r[0]), int(r[1]), r[2], int(r[3])) for r in rows)
            if since < int(row[2]):  # expunges after ``since`` were pruned: every absent UID
                absent = await self._absent(conn, mailbox_id, None)
                return Changes(highest, int(row[1]), changed, tuple(absent))
            gone = await conn.execute(_CHANGED_GONE, window)
            expunged = tuple(int(r[0]) for r in gone)
        return Changes(highest, int(row[1]), changed, expunged)

    async def _absent(self, conn: Any, mailbox_id: int,
                      ranges: Sequence[tuple[int, int]] | None) -> list[int]:
        """The UIDs below UIDNEXT, within ``ranges`` (all if None), that no message of the
        mailbox has: what may have been expunged once the record of it was pruned."""
        head = (await conn.execute(_VANISHED_HEAD, {
            "mailbox_id": mailbox_id, "patient_id": self.patient_id})).first()
        if head is None:
            return []
        last = int(head[0]) - 1
        present = set((await conn.execute(_OPEN_UIDS, {"mailbox_id": mailbox_id})).scalars())
        bounds = [(1, last)] if ranges is None else [(lo, min(hi, last)) for lo, hi in ranges]
        return [uid for lo, hi in bounds for uid in range(max(lo, 1), hi + 1)
                if uid not in present]

    async def vanished(self, mailbox_id: int, since: int,
                       ranges: Sequence[tuple[int, int]] | None = None) -> list[int]:
        """UIDs expunged from the mailbox after MODSEQ ``since`` (RFC 7162 §3.2.5-6 VANISHED),
        ascending, within the inclusive UID ``ranges`` (sorted, disjoint) when given. Exact
        while ``since`` is at or above the mailbox's ``vanished_modseq`` (the expunges after
        it are all kept); below it, the housekeeping pruned some, and the answer is every UID
        of ``ranges`` below UIDNEXT that no message has, the superset RFC 7162 §3.2.5.2
        allows."""
        if ranges is not None and not ranges:
            return []
        conditions = [t.expunged.c.mailbox_id == self._mailbox_id(mailbox_id),
                      t.expunged.c.modseq > since]
        if ranges is not None and len(ranges) <= _MAX_RANGES:
            conditions.append(or_(*(t.expunged.c.uid.between(lo, hi) for lo, hi in ranges)))
        async with self._store.read() as conn:
            rows = await conn.execute(
                select(t.expunged.c.uid).where(*conditions).order_by(t.expunged.c.uid))
            uids = sorted({int(r[0]) for r in rows})
            # Read after the rows: a prune committed in between shows here (never a row gone
            # unnoticed).
            floor = (await conn.execute(_VANISHED_HEAD, {
                "mailbox_id": mailbox_id, "patient_id": self.patient_id})).first()
            if floor is not None and since < int(floor[1]):
                return await self._absent(conn, mailbox_id, ranges)
        if ranges is not None and len(ranges) > _MAX_RANGES:
            starts = [lo for lo, _hi in ranges]
            uids = [u for u in uids
                    if (i := bisect_left(starts, u + 1) - 1) >= 0 and u <= ranges[i][1]]
        return uids

    async def status(self, name: str, size: bool = False) -> StatusCounts:
        """STATUS of one mailbox; ``size``: also its octets (RFC 8438), which reads rows."""
        async with self._store.read() as conn:
            info = await self._lookup(conn, name)
            if info is None:
                raise NoSuchMailbox()
            scope = {"mailbox_id": info.id, "patient_id": self.patient_id}
            row = (await conn.execute(_STATUS_COUNTS, {
                **scope, "recent_uid": info.recent_uid})).one()
            octets = int((await conn.execute(_STATUS_SIZE, scope)).scalar_one()) if size else 0
        return StatusCounts(int(row[0]), int(row[1]), int(row[2]), info.uidnext,
                            info.uidvalidity, info.highestmodseq, int(row[3]), octets)

    async def statuses(self, mailbox_ids: Collection[int],
                       size: bool = False) -> dict[int, StatusCounts]:
        """LIST-STATUS (RFC 5819): ``{mailbox id: counts}`` of this patient's mailboxes among
        ``mailbox_ids``, in one statement (a mailbox deleted meanwhile is absent)."""
        if not mailbox_ids:
            return {}
        async with self._store.read() as conn:
            rows = await conn.execute(_STATUSES[size], {
                "patient_id": self.patient_id, "ids": list(mailbox_ids)})
            return {
                int(row[0]): StatusCounts(
                    int(row[4]), int(row[5]), int(row[6]), int(row[1]), int(row[2]),
                    int(row[3]), int(row[7]), int(row[8]) if size else 0)
                for row in rows
            }

    async def create(self, name: str) -> None:
        name = validate_name(name)

        def job(conn: Connection) -> None:
            count = conn.execute(
                select(func.count(t.mailbox.c.id)).where(self._owned())
            ).scalar_one()
            if count >= MAX_MAILBOXES:
                raise TooMany()
            if self._lookup_sync(conn, name) is not None:
                raise MailboxExists()
            conn.execute(insert(t.mailbox).values(
                patient_id=self.patient_id, name=name, special_use=None,
                uidvalidity=new_uidvalidity(), uidnext=1, highestmodseq=1, recent_uid=0,
            ))
            # CREATE subscribes the new name (RFC 3501 leaves it to the server), below the
            # limit only: beyond it the mailbox is made all the same
            self._subscribe_sync(conn, name, quiet=True)

        await self._stores.write_sync(job)

    async def delete(self, name: str) -> None:
        """RFC 3501 §6.3.4. INBOX and the special-use mailboxes the gateway files mail into
        cannot be deleted; neither can a mailbox with inferiors (we keep no \\Noselect
        mailboxes). Its subscription stays (RFC 3501 §6.3.6: only UNSUBSCRIBE removes it)."""

        def job(conn: Connection) -> None:
            info = self._lookup_sync(conn, name)
            if info is None:
                raise NoSuchMailbox()
            if info.name == "INBOX" or info.special_use is not None:
                raise Cannot("This mailbox cannot be deleted")
            children = conn.execute(select(t.mailbox.c.name).where(self._owned())).scalars()
            if any(child.startswith(name + DELIMITER) for child in children):
                raise Cannot("Delete the mailboxes inside it first")
            conn.execute(delete(t.expunged).where(t.expunged.c.mailbox_id == info.id))
            gone = conn.execute(
                delete(t.message).where(self._in_mailbox(info.id)).returning(t.message.c.blob_id)
            )
            self._delete_orphan_blobs(conn, {int(b) for b in gone.scalars()})
            conn.execute(delete(t.mailbox).where(t.mailbox.c.id == info.id, self._owned()))

        await self._stores.write_sync(job)

    async def rename(self, old: str, new: str) -> None:
        """RFC 3501 §6.3.5: inferiors follow; renaming INBOX moves its messages to a new
        mailbox and leaves INBOX empty. Subscriptions stay on their names, as RFC 9051
        §6.3.6 says (renaming does not update the subscription of the old name; the client
        subscribes the new one) and as Dovecot 2.3 does; here the old name then shows in LSUB as
        ``\\Noselect`` and in LIST (SUBSCRIBED) as ``\\NonExistent`` until unsubscribed."""
        new = validate_name(new)

        def job(conn: Connection) -> None:
            info = self._lookup_sync(conn, old)
            if info is None:
                raise NoSuchMailbox()
            if new == "INBOX" or self._lookup_sync(conn, new) is not None:
                raise MailboxExists()
            if new.startswith(old + DELIMITER):
                raise Cannot("A mailbox cannot be moved inside itself")
            if old == "INBOX":
                self._rename_inbox(conn, info, new)
                return
            names = conn.execute(
                select(t.mailbox.c.id, t.mailbox.c.name).where(self._owned())
            ).all()
            for mailbox_id, name in names:
                if name == old or name.startswith(old + DELIMITER):
                    renamed = new + name[len(old):]
                    if len(renamed) > MAX_NAME_LENGTH:
                        raise InvalidName()
                    conn.execute(
                        update(t.mailbox).where(t.mailbox.c.id == mailbox_id, self._owned())
                        .values(name=renamed)
                    )

        await self._stores.write_sync(job)

    def _rename_inbox(self, conn: Connection, inbox: MailboxInfo, new: str) -> None:
        bumped = self._bump(conn, inbox.id)
        modseq = int(bumped[0])
        target = int((conn.execute(insert(t.mailbox).values(
            patient_id=self.patient_id, name=new, special_use=None,
            uidvalidity=new_uidvalidity(), uidnext=int(bumped[1]), highestmodseq=modseq,
            recent_uid=inbox.recent_uid,
        ).returning(t.mailbox.c.id))).scalar_one())
        uids = conn.execute(
            select(t.message.c.uid).where(self._in_mailbox(inbox.id))
        ).scalars().all()
        conn.execute(
            update(t.message).where(self._in_mailbox(inbox.id)).values(mailbox_id=target)
        )
        if uids:
            conn.execute(insert(t.expunged), [
                {"mailbox_id": inbox.id, "uid": uid, "modseq": modseq} for uid in uids
            ])

    async def subscriptions(self) -> list[str]:
        """The names this patient subscribed to, mailbox or not (RFC 3501 §6.3.9)."""
        async with self._store.read() as conn:
            rows = await conn.execute(
                select(t.subscription.c.name)
                .where(t.subscription.c.patient_id == self.patient_id)
                .order_by(t.subscription.c.name))
            return list(rows.scalars())

    async def subscribe(self, name: str, subscribed: bool) -> None:
        """SUBSCRIBE / UNSUBSCRIBE (RFC 3501 §6.3.6-7) a name. SUBSCRIBE wants an existing
        mailbox (NO [NONEXISTENT] otherwise: RFC 3501 allows refusing names that are no
        mailbox); UNSUBSCRIBE takes any subscribed name, that of a deleted mailbox too, and
        is OK for an existing mailbox not subscribed; other names are NO [NONEXISTENT]."""

        def job(conn: Connection) -> None:
            if subscribed:
                self._subscribe_sync(conn, name)
                return
            gone = conn.execute(delete(t.subscription).where(
                t.subscription.c.patient_id == self.patient_id,
                t.subscription.c.name == name))
            if not gone.rowcount and self._lookup_sync(conn, name) is None:
                raise NoSuchMailbox()

        await self._stores.write_sync(job)

    def _subscribe_sync(self, conn: Connection, name: str, *, quiet: bool = False) -> None:
        """Subscribe the existing mailbox ``name`` (its stored spelling); ``quiet``: at the
        limit, do nothing rather than raise."""
        info = self._lookup_sync(conn, name)
        if info is None:
            raise NoSuchMailbox()
        mine = t.subscription.c.patient_id == self.patient_id
        if conn.execute(select(t.subscription.c.id).where(
                mine, t.subscription.c.name == info.name)).first() is not None:
            return
        count = conn.execute(select(func.count(t.subscription.c.id)).where(mine)).scalar_one()
        if count >= MAX_SUBSCRIPTIONS:
            if quiet:
                return
            raise TooManySubscriptions()
        # another process may subscribe the same name between the read and this insert
        dialect = sqlite if conn.dialect.name == "sqlite" else postgresql
        conn.execute(dialect.insert(t.subscription).on_conflict_do_nothing().values(
            patient_id=self.patient_id, name=info.name))

    # --- messages -----------------------------------------------------------------------

    async def fetch_rows(
        self, mailbox_id: int, uids: Sequence[int], columns: Iterable[str]
    ) -> list[MessageRow]:
        """Rows (``uid`` + ``columns``, see :data:`ROW_COLUMNS`) of the sorted ``uids`` that
        still exist, by UID."""
        conditions, filter_after = self._uid_filter(uids)
        async with self._store.read() as conn:
            rows = (await conn.execute(
                select(t.message.c.uid, *_row_columns(set(columns)))
                .where(self._in_mailbox(mailbox_id), *conditions)
                .order_by(t.message.c.uid)
            )).all()
        if filter_after:
            keep = set(uids)
            return [MessageRow._make(r) for r in rows if r[0] in keep]
        return [MessageRow._make(r) for r in rows]

    async def flag_rows(
        self, mailbox_id: int, ranges: Sequence[tuple[int, int]]
    ) -> tuple[Sequence[tuple[int, int]], dict[int, str]]:
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
            rows: Sequence[tuple[int, int]] = (await conn.execute(
                _flags_hint(select(t.message.c.uid, t.message.c.flags)
                            .where(in_box, condition).order_by(t.message.c.uid))
            )).all()
            keywords = {int(uid): str(text) for uid, text in await conn.execute(
                select(t.message.c.uid, t.message.c.keywords)
                .where(in_box, _HAS_KEYWORDS, condition)
            )}
        return rows, keywords

    async def search(self, mailbox_id: int, query: Match) -> SearchResult:
        """SEARCH (RFC 3501 §6.4.4): what the database can decide exactly (flags, UIDs, sizes,
        and FROM/TO/CC/BCC/SUBJECT through ``blob_search``) is a WHERE clause over the
        top-level keys; the rest (other header fields, dates, keywords, bodies) is checked in
        Python on the rows it leaves, with the header fields and the Date extracted from
        ``meta`` by the database. Bodies are read only for BODY/TEXT.

        Messages without a ``blob_search`` row get one first (once: Dovecot fills its cache
        file the same way); if some still have none, header keys are checked in Python."""
        conjuncts = query.keys if isinstance(query, sk.SearchAnd) else (query,)
        indexed = bool(_query_fields(query) & SEARCH_COLUMNS.keys()) and isinstance(
            self._store.blobs, DatabaseBlobStore)
        while True:
            conditions: list[Any] = []
            residual: list[Match] = []
            for key in conjuncts:
                condition = _sql_condition(key, indexed)
                if condition is None:
                    residual.append(key)
                else:
                    conditions.append(condition)
            rest = sk.SearchAnd(tuple(residual)) if residual else None
            where = and_(*conditions) if conditions else None
            if not indexed:
                found, _missing = await self._search_rows(mailbox_id, where, rest, False)
                return await self._check(mailbox_id, found)
            for _attempt in range(2):
                found, missing = await self._search_rows(mailbox_id, where, rest, True)
                if not missing:
                    return await self._check(mailbox_id, found)
                if not await self._fill_search(missing):
                    break
            indexed = False  # some messages have no blob_search row: headers in Python

    async def _check(self, mailbox_id: int, found: _Candidates) -> SearchResult:
        """The candidates for which the rest of the query holds; bodies read in batches of
        :data:`_SEARCH_BODY_BATCH` bytes, only when it looks into them."""
        if found.rest is None:
            return SearchResult(found.uids)
        matcher = _Matcher(found)
        matches = matcher.compile(found.rest)
        uids: list[int] = []
        bodies: dict[int, bytes] = {}
        rows = found.rows
        for index, row in enumerate(rows):
            matcher.row, matcher.meta, matcher.text = row, None, None
            if found.bodies:
                uid = row.uid
                if uid not in bodies:
                    batch: list[int] = []
                    batch_bytes = 0
                    for other in rows[index:]:
                        if batch and batch_bytes + other.size > _SEARCH_BODY_BATCH:
                            break
                        batch.append(other.uid)
                        batch_bytes += other.size
                    bodies = await self.bodies(mailbox_id, batch)
                matcher.raw = bodies.get(uid, b"")
            if matches():
                uids.append(row.uid)
        return SearchResult(uids, found.bodies)

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

        def job(conn: Connection) -> None:
            for start in range(0, len(values), _CHUNK):
                conn.execute(self._insert_search(), values[start : start + _CHUNK])

        try:
            await self._stores.write_sync(job)
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
        self, mailbox_id: int, where: ColumnElement[bool] | None, rest: Match | None,
        indexed: bool,
    ) -> tuple[_Candidates, set[int]]:
        """The messages matching ``where`` (on ``message`` and, when ``indexed``, on
        :data:`SEARCH_COLUMNS`) with the columns ``rest`` needs, by UID, and the ids of the
        blobs without a ``blob_search`` row among them (``indexed`` only: those match
        ``where`` whatever their header fields are)."""
        columns = _query_columns(rest) if rest is not None else set()
        bodies = "body" in columns
        if bodies:
            columns.add("size")
        wanted = columns & ROW_COLUMNS
        fields = sorted(_query_fields(rest)) if rest is not None else []
        sent = "sent" in columns
        if "meta" in wanted:
            fields, sent = [], False  # both are read from ``meta``
        elif not all(_FIELD_NAME.fullmatch(name) for name in fields):
            wanted.add("meta")  # odd field names: the JSON in Python
            fields, sent = [], False
        conditions = [self._in_mailbox(mailbox_id)]
        extra: list[ColumnElement[Any]] = []
        if indexed:
            unindexed = t.blob_search.c.blob_id.is_(None)
            extra = [t.message.c.blob_id, unindexed.label("unindexed")]
            if where is not None:
                conditions.append(or_(unindexed, where))
        elif where is not None:
            conditions.append(where)

        def query(wanted: set[str], fields: Sequence[str], sent: bool) -> Any:
            cols: list[ColumnElement[Any]] = []
            if rest is not None:  # the columns of SearchRow
                cols = _row_columns(wanted)
                cols.append(self._meta_text("date").label("sent") if sent
                            else null().label("sent"))
                cols += [self._meta_text("search_headers", name).label(f"h{index}")
                         for index, name in enumerate(fields)]
            statement = select(t.message.c.uid, *cols, *extra).where(*conditions)
            if indexed:
                statement = statement.select_from(t.message.outerjoin(
                    t.blob_search, t.blob_search.c.blob_id == t.message.c.blob_id))
            statement = statement.order_by(t.message.c.uid)
            only_flags = not fields and not sent and wanted <= {"flags"}
            return _flags_hint(statement) if only_flags or indexed else statement

        rows: Sequence[Any] | None = None
        if fields or sent:
            try:
                async with self._store.read() as conn:
                    rows = (await conn.execute(query(wanted, fields, sent))).all()
            except DBAPIError:  # an invalid ``meta``: the JSON in Python
                wanted, fields, sent = wanted | {"meta"}, [], False
        if rows is None:
            async with self._store.read() as conn:
                rows = (await conn.execute(query(wanted, fields, sent))).all()
        missing = {row.blob_id for row in rows if row.unindexed} if indexed else set()
        if rest is None:
            return _Candidates([row[0] for row in rows]), missing
        end = 8 + len(fields)
        found = [SearchRow(row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7],
                           tuple(row[8:end]) if fields else ()) for row in rows]
        return _Candidates([], found, rest, bodies, "meta" not in wanted,
                           tuple(fields)), missing

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
        keywords: Sequence[str], unchanged_since: int | None = None,
        modified: list[int] | None = None,
    ) -> tuple[int, list[FlagState]]:
        """STORE (RFC 3501 §6.4.6): ``mode`` is ``FLAGS``, ``+FLAGS`` or ``-FLAGS``. Returns the
        MODSEQ of the change and the resulting flags of every message of ``uids`` that
        exists; rows whose flags changed carry that MODSEQ. With ``unchanged_since``
        (RFC 7162 §3.1.3 UNCHANGEDSINCE), a message whose MODSEQ is above it is left alone
        and its UID appended to ``modified``, in the same transaction as the others' change."""
        wanted_keywords = list(dict.fromkeys(keywords))
        refused: list[int] = []

        def job(conn: Connection) -> tuple[int, list[FlagState]]:
            del refused[:]  # a job may run twice (writer.py)
            modseq = int(self._bump(conn, mailbox_id)[0])
            conditions, filter_after = self._uid_filter(uids)
            rows = conn.execute(
                select(t.message.c.uid, t.message.c.flags, t.message.c.keywords,
                       t.message.c.modseq)
                .where(self._in_mailbox(mailbox_id), *conditions)
                .order_by(t.message.c.uid)
            ).all()
            keep = set(uids) if filter_after else None
            states: list[FlagState] = []
            updates: list[dict[str, Any]] = []
            for uid, flags, kw_text, old_modseq in rows:
                if keep is not None and uid not in keep:
                    continue
                if unchanged_since is not None and int(old_modseq) > unchanged_since:
                    refused.append(int(uid))
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
                conn.execute(
                    update(t.message)
                    .where(t.message.c.mailbox_id == mailbox_id,
                           t.message.c.uid == bindparam("u"))
                    .values(flags=bindparam("f"), keywords=bindparam("k"), modseq=modseq),
                    updates,
                )
            return modseq, states

        result = await self._stores.write_sync(job)
        if modified is not None:
            modified.extend(refused)
        return result

    def _delete_uids(
        self, conn: Connection, mailbox_id: int, uids: Sequence[int], modseq: int
    ) -> None:
        blob_ids: set[int] = set()
        for start in range(0, len(uids), _CHUNK):
            chunk = list(uids[start : start + _CHUNK])
            result = conn.execute(
                delete(t.message).where(self._in_mailbox(mailbox_id), t.message.c.uid.in_(chunk))
                .returning(t.message.c.blob_id)
            )
            blob_ids.update(int(b) for b in result.scalars())
        self._delete_orphan_blobs(conn, blob_ids)
        if uids:
            conn.execute(insert(t.expunged), [
                {"mailbox_id": mailbox_id, "uid": uid, "modseq": modseq} for uid in uids
            ])

    def expunge_in(self, conn: Connection, mailbox_id: int, uids: Sequence[int]) -> int:
        """Expunge ``uids`` (sorted) in the caller's write transaction, as EXPUNGE does (one
        MODSEQ, ``expunged`` rows, orphan bodies deleted): the Trash purge (housekeeping.py)."""
        modseq = int(self._bump(conn, mailbox_id)[0])
        self._delete_uids(conn, mailbox_id, uids, modseq)
        return modseq

    def _delete_orphan_blobs(self, conn: Connection, blob_ids: Iterable[int]) -> None:
        """Delete the bodies of ``blob_ids`` that no message and no outbound mail references
        any more (health data must not linger after EXPUNGE), in the caller's transaction."""
        ids = sorted(blob_ids)
        if not isinstance(self._store.blobs, DatabaseBlobStore):
            return
        for start in range(0, len(ids), _CHUNK):
            conn.execute(
                delete(t.blob).where(
                    t.blob.c.id.in_(ids[start : start + _CHUNK]),
                    ~exists().where(t.message.c.blob_id == t.blob.c.id),
                    ~exists().where(t.outbound.c.blob_id == t.blob.c.id),
                    # A health document kept from an attachment (documents.py) keeps its body.
                    ~exists().where(t.document.c.blob_id == t.blob.c.id),
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

        def job(conn: Connection) -> tuple[int, list[int]]:
            deleted = t.message.c.flags.op("&")(t.FLAG_DELETED) != 0
            candidates = conn.execute(
                _flags_hint(select(t.message.c.uid)
                            .where(self._in_mailbox(mailbox_id), deleted, *conditions)
                            .order_by(t.message.c.uid))
            ).scalars().all()
            uids = [int(u) for u in candidates if keep is None or keep(int(u))]
            if not uids:
                return 0, []
            modseq = int(self._bump(conn, mailbox_id)[0])
            self._delete_uids(conn, mailbox_id, uids, modseq)
            return modseq, uids

        return await self._stores.write_sync(job)

    async def append(
        self, name: str, raw: bytes, bits: int, keywords: Sequence[str],
        internal_date: datetime | None,
    ) -> tuple[int, int, int, int]:
        """APPEND (RFC 3501 §6.3.11): ``(mailbox id, UIDVALIDITY, UID, MODSEQ)``."""
        info: MessageInfo = await parse_message_async(raw)
        kw_text = " ".join(list(dict.fromkeys(keywords))[:MAX_KEYWORDS])

        def job(conn: Connection) -> tuple[int, int, int, int]:
            mailbox = self._lookup_sync(conn, name)
            if mailbox is None:
                raise TryCreate()
            filed = server_filed_copy(conn, mailbox.id, name, info.message_id)
            if filed is not None:  # the client's copy of what the gateway put in Sent
                return mailbox.id, mailbox.uidvalidity, filed.uid, filed.modseq
            stored = deliver(conn, [mailbox.id], raw, info, flags=bits, keywords=kw_text,
                             internal_date=internal_date)[0]
            return mailbox.id, mailbox.uidvalidity, stored.uid, stored.modseq

        return await self._stores.write_sync(job, size=len(raw))

    async def copy(
        self, mailbox_id: int, uids: Sequence[int], target: str, move: bool
    ) -> CopyResult:
        """COPY (RFC 3501 §6.4.7) or MOVE (RFC 6851): new UIDs allocated in one block, bodies
        shared (blobs are immutable), flags kept; MOVE expunges the sources in the same
        transaction."""
        copied = [c for c in t.message.c if c.name not in ("id", "mailbox_id", "uid", "modseq")]

        def job(conn: Connection) -> CopyResult:
            dest = self._lookup_sync(conn, target)
            if dest is None:
                raise TryCreate()
            conditions, filter_after = self._uid_filter(uids)
            rows = conn.execute(
                select(t.message.c.uid, *copied)
                .where(self._in_mailbox(mailbox_id), *conditions)
                .order_by(t.message.c.uid)
            ).all()
            if filter_after:
                keep = set(uids)
                rows = [r for r in rows if r.uid in keep]
            if not rows:
                return CopyResult(dest.id, 0, dest.uidvalidity, ())
            bumped = self._bump(conn, dest.id, uids=len(rows))
            modseq, first = int(bumped[0]), int(bumped[1]) - len(rows)
            values = []
            pairs = []
            # The Trash purge counts from here (housekeeping.py); a copy out of Trash is kept.
            trashed = datetime.now(UTC) if dest.special_use == "\\Trash" else None
            for offset, row in enumerate(rows):
                record = {c.name: getattr(row, c.name) for c in copied}
                record.update(mailbox_id=dest.id, uid=first + offset, modseq=modseq,
                              trashed_at=trashed)
                values.append(record)
                pairs.append((int(row.uid), first + offset))
            conn.execute(insert(t.message), values)
            expunge_modseq = 0
            if move:
                expunge_modseq = int(self._bump(conn, mailbox_id)[0])
                self._delete_uids(conn, mailbox_id, [p[0] for p in pairs], expunge_modseq)
            return CopyResult(dest.id, modseq, int(bumped[2]), tuple(pairs), expunge_modseq)

        return await self._stores.write_sync(job)


def _flags_hint(statement: Any) -> Any:
    """Have SQLite read (uid, flags) from ``ix_message_mailbox_uid_flags`` alone (its planner
    would pick the unique (mailbox_id, uid) index and read every wide row for the flags)."""
    return statement.with_hint(t.message, "INDEXED BY ix_message_mailbox_uid_flags", "sqlite")


# --------------------------------------------------------------------------- SEARCH in Python


@dataclass(slots=True)
class _Candidates:
    """What the database left of a query: the answer (``uids``) when it decided every key
    (``rest`` None), else the ``rows`` for which ``rest`` must still hold. ``bodies``: ``rest``
    looks into bodies. ``extracted``: the Date came as ``SearchRow.sent`` and the header
    fields ``fields`` as ``SearchRow.headers``; if not, both are read from ``meta``."""

    uids: list[int]
    rows: list[SearchRow] = field(default_factory=list)
    rest: Match | None = None
    bodies: bool = False
    extracted: bool = False
    fields: tuple[str, ...] = ()


_NO_ROW = SearchRow(0, 0, "", 0, None, None, 0, None, ())


def _compare(relation: str, value: date, wanted: date) -> bool:
    if relation == "BEFORE":
        return value < wanted
    if relation == "ON":
        return value == wanted
    return value >= wanted


class _Matcher:
    """Evaluates a query against one row at a time (:attr:`row`, and :attr:`raw`, the
    message, when the query looks into bodies)."""

    __slots__ = ("extracted", "fields", "meta", "raw", "row", "text")

    def __init__(self, found: _Candidates) -> None:
        self.row = _NO_ROW
        self.meta: dict[str, Any] | None = None
        self.raw = b""
        self.text: str | None = None
        self.extracted = found.extracted
        # header field -> its position in SearchRow.headers
        self.fields = {name: index for index, name in enumerate(found.fields)
                       if found.extracted}

    def compile(self, key: Match) -> Callable[[], bool]:
        """``key`` as a function of the current row: the tree is walked once per SEARCH, not
        once per message, for the frequent keys."""
        if isinstance(key, sk.SearchAnd):
            parts = [self.compile(k) for k in key.keys]
            if len(parts) == 1:
                return parts[0]
            return lambda: all(part() for part in parts)
        if isinstance(key, sk.SearchOr):
            left, right = self.compile(key.left), self.compile(key.right)
            return lambda: left() or right()
        if isinstance(key, sk.SearchNot):
            inner = self.compile(key.key)
            return lambda: not inner()
        if isinstance(key, sk.SearchFlag) and key.flag in SYSTEM_FLAG_BITS:
            bit, present = SYSTEM_FLAG_BITS[key.flag], key.present
            return lambda: bool(self.row.flags & bit) is present
        if isinstance(key, sk.SearchHeader) and key.field in self.fields:
            position, needle = self.fields[key.field], key.value.casefold()

            def header() -> bool:
                text = self.row.headers[position]
                return text is not None and needle in text.casefold()

            return header
        if (test := _number_test(key)) is not None:
            name, compare, number = test
            return lambda: bool(compare(getattr(self.row, name), number))
        return lambda: self.match(key)

    def _header(self, name: str) -> Any:
        position = self.fields.get(name)
        if position is not None:
            return self.row.headers[position]
        return self._headers().get(name)

    def _sent(self) -> Any:
        if self.extracted:
            return self.row.sent
        return self._meta().get("date")

    def _meta(self) -> dict[str, Any]:
        if self.meta is None:
            try:
                value = json.loads(self.row.meta or "{}")
            except ValueError:
                value = {}
            self.meta = value if isinstance(value, dict) else {}
        return self.meta

    def _body_text(self) -> str:
        if self.text is None:
            self.text = text_for_search(self.raw).casefold()
        return self.text

    def _headers(self) -> dict[str, str]:
        headers = self._meta().get("search_headers") or {}
        return headers if isinstance(headers, dict) else {}

    def match(self, key: Match) -> bool:
        """A key that ``compile`` leaves to be decided at each row (never AND, OR or NOT,
        nor a number test: it compiles those)."""
        row = self.row
        if isinstance(key, sk.SearchAll):
            return True
        if isinstance(key, sk.SearchFlag):
            if key.flag in SYSTEM_FLAG_BITS:
                present = bool(row.flags & SYSTEM_FLAG_BITS[key.flag])
            else:
                present = key.flag.casefold() in (k.casefold() for k in row.keywords.split())
            return present == key.present
        if isinstance(key, MatchUids):
            index = bisect_left(key.ranges, (row.uid + 1,)) - 1
            return index >= 0 and key.ranges[index][0] <= row.uid <= key.ranges[index][1]
        if isinstance(key, sk.SearchInternalDate):
            if row.internal_date is None:
                return False
            return _compare(key.relation, row.internal_date.date(), key.day)
        if isinstance(key, sk.SearchSentDate):
            sent = self._sent()
            if not sent:
                return False
            try:
                day = datetime.fromisoformat(sent).date()
            except ValueError:
                return False
            return _compare(key.relation, day, key.day)
        if isinstance(key, sk.SearchHeader):
            text = self._header(key.field)
            if text is None:
                return False
            return key.value.casefold() in text.casefold()
        if isinstance(key, sk.SearchBody):
            return key.value.casefold() in self._body_text()
        if isinstance(key, sk.SearchText):
            wanted = key.value.casefold()
            if any(wanted in f"{k}: {v}".casefold() for k, v in self._headers().items()):
                return True
            return wanted in self._body_text()
        return False
