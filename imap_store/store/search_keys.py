"""The SEARCH keys (RFC 3501 §6.4.4, RFC 7162 §3.1.5) that the IMAP grammar parses
(:mod:`imap_store.imap.commands`) and the store decides (:mod:`imap_store.store.mailboxes`) as
they are: those about one message alone, and NOT, OR and AND over either side's keys. The keys
relative to a session's view (sequence numbers, UID sets, ``$``, \\Recent) are the grammar's
own; the session makes them UID ranges for the store.

Standard library only: the sans-IO grammar imports it."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import date
from typing import Generic, TypeVar

#: The keys combined: the parsed ones (``commands.SearchKey``) or the store's (``Match``).
K = TypeVar("K")


class DateRelation(enum.StrEnum):
    """``BEFORE`` / ``ON`` / ``SINCE`` (on or after) of the date search keys.

    Comparisons ignore the time and timezone (internal date: in the server's notion of the day;
    sent date: the Date: header's own day).
    """

    BEFORE = "BEFORE"
    ON = "ON"
    SINCE = "SINCE"


@dataclass(frozen=True, slots=True)
class SearchAll:
    """``ALL``: every message."""


@dataclass(frozen=True, slots=True)
class SearchFlag:
    """A flag test: ``flag`` (a system flag, else a keyword) is set (``present``) or not.

    Covers ANSWERED/DELETED/DRAFT/FLAGGED/RECENT/SEEN, their UN- forms, KEYWORD and UNKEYWORD.
    ``NEW`` is parsed as ``SearchAnd((SearchFlag("\\Recent", True), SearchFlag("\\Seen", False)))``
    and ``OLD`` as ``SearchFlag("\\Recent", False)``; the session makes \\Recent UID ranges
    before the store sees it.
    """

    flag: str
    present: bool


@dataclass(frozen=True, slots=True)
class SearchHeader:
    """Substring ``value`` in header ``field`` (lower-cased), case-insensitively.

    ``BCC``/``CC``/``FROM``/``SUBJECT``/``TO`` produce ``field`` ``"bcc"`` ... ``"to"``;
    ``HEADER name value`` produces the lower-cased ``name``. An empty ``value`` matches every
    message that has the field.
    """

    field: str
    value: str


@dataclass(frozen=True, slots=True)
class SearchBody:
    """``BODY string``: substring in the body, case-insensitively."""

    value: str


@dataclass(frozen=True, slots=True)
class SearchText:
    """``TEXT string``: substring in the header or the body, case-insensitively."""

    value: str


@dataclass(frozen=True, slots=True)
class SearchInternalDate:
    """``BEFORE`` / ``ON`` / ``SINCE date``: the internal date (RFC 3501 §2.3.3)."""

    relation: DateRelation
    day: date


@dataclass(frozen=True, slots=True)
class SearchSentDate:
    """``SENTBEFORE`` / ``SENTON`` / ``SENTSINCE date``: the Date: header."""

    relation: DateRelation
    day: date


@dataclass(frozen=True, slots=True)
class SearchLarger:
    """``LARGER n``: RFC 822 size greater than ``size`` octets."""

    size: int


@dataclass(frozen=True, slots=True)
class SearchSmaller:
    """``SMALLER n``: RFC 822 size less than ``size`` octets."""

    size: int


@dataclass(frozen=True, slots=True)
class SearchModseq:
    """``MODSEQ [entry type] n`` (RFC 7162 §3.1.5): messages whose mod-sequence is at least
    ``modseq`` (the entry name and type are accepted and ignored: one mod-sequence per
    message here)."""

    modseq: int


@dataclass(frozen=True, slots=True)
class SearchNot(Generic[K]):
    """``NOT key``."""

    key: K


@dataclass(frozen=True, slots=True)
class SearchOr(Generic[K]):
    """``OR key1 key2``."""

    left: K
    right: K


@dataclass(frozen=True, slots=True)
class SearchAnd(Generic[K]):
    """All of ``keys`` (a parenthesised list, or several top-level keys)."""

    keys: tuple[K, ...]


#: A key about one message alone: the same to the grammar and to the store.
MessageKey = (
    SearchAll
    | SearchFlag
    | SearchHeader
    | SearchBody
    | SearchText
    | SearchInternalDate
    | SearchSentDate
    | SearchLarger
    | SearchSmaller
    | SearchModseq
)
