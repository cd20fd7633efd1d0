"""Typed IMAP4rev1 client commands, as produced by :class:`imap_store.imap.parser.CommandParser`.

One frozen dataclass per command of RFC 3501 §6 and of the extensions this server advertises:
IDLE (RFC 2177), UIDPLUS (RFC 4315, ``UID EXPUNGE``), MOVE (RFC 6851), SPECIAL-USE (RFC 6154,
``CREATE ... (USE (...))`` and ``LIST ... RETURN (SPECIAL-USE)``), LIST-EXTENDED (RFC 5258)
with LIST-STATUS (RFC 5819), NAMESPACE (RFC 2342), UNSELECT (RFC 3691), ENABLE (RFC 5161),
ID (RFC 2971) and SASL-IR (RFC 4959). Every command carries the client's ``tag``.

Conventions:

* Mailbox names are decoded from modified UTF-7 (RFC 3501 §5.1.3) to ``str``; a name equal to
  ``INBOX`` in any case becomes ``"INBOX"`` (RFC 3501 §5.1). LIST/LSUB patterns and references are
  decoded the same way but are *not* case-normalised: matching ``inbox`` against ``INBOX`` is the
  session's job. :func:`encode_mailbox_name` renders a name for the server's responses.
* Flags are ``str``; the system flags of RFC 3501 §2.3.2 are normalised to their canonical case
  (``\\seen`` -> ``\\Seen``), keywords are kept as sent.
* SEARCH string arguments are decoded *here* with the command's CHARSET (RFC 3501 §6.4.4): the
  tree holds ``str``. Without a CHARSET the strings are decoded as UTF-8 (a superset of the
  US-ASCII default, tolerating clients that send 8-bit text without announcing it). An unknown
  charset yields ``InvalidCommand(status="NO", code="BADCHARSET (...)")``.
* Secrets (LOGIN password, SASL initial response) and message bodies are excluded from ``repr``
  so that logging an event never leaks them.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import enum
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import ClassVar, Literal

from imap_store.store.search_keys import (
    DateRelation,
    MessageKey,
    SearchAll,
    SearchAnd,
    SearchBody,
    SearchFlag,
    SearchHeader,
    SearchInternalDate,
    SearchLarger,
    SearchModseq,
    SearchNot,
    SearchOr,
    SearchSentDate,
    SearchSmaller,
    SearchText,
)

__all__ = [
    "BINARY_NAMES",
    "FETCH_MACROS",
    "FETCH_NAMES",
    "MAX_MODSEQ",
    "MAX_NUMBER",
    "SAVED_RESULT",
    "SEARCH_CHARSETS",
    "SYSTEM_FLAGS",
    "Append",
    "Authenticate",
    "Capability",
    "Check",
    "Close",
    "Command",
    "Copy",
    "Create",
    "DateRelation",
    "Delete",
    "Enable",
    "Expunge",
    "Fetch",
    "FetchAttr",
    "Id",
    "Idle",
    "InvalidCommand",
    "List",
    "Login",
    "Logout",
    "Lsub",
    "Move",
    "Namespace",
    "Noop",
    "QResync",
    "Rename",
    "ResolvedSet",
    "Search",
    "SearchAll",
    "SearchAnd",
    "SearchBody",
    "SearchFlag",
    "SearchHeader",
    "SearchInternalDate",
    "SearchKey",
    "SearchLarger",
    "SearchModseq",
    "SearchNot",
    "SearchOr",
    "SearchSentDate",
    "SearchSet",
    "SearchSmaller",
    "SearchText",
    "Section",
    "SectionText",
    "Select",
    "SeqRange",
    "SequenceSet",
    "StartTls",
    "Status",
    "Store",
    "StoreMode",
    "Subscribe",
    "Unselect",
    "Unsubscribe",
    "decode_mailbox_name",
    "encode_mailbox_name",
]

#: Largest value of ``number`` / ``nz-number`` (RFC 3501 §9: unsigned 32-bit integer).
MAX_NUMBER = 0xFFFFFFFF

#: System flags of RFC 3501 §2.3.2, in canonical case (``\\Recent`` cannot be set by a client).
SYSTEM_FLAGS = ("\\Seen", "\\Answered", "\\Flagged", "\\Deleted", "\\Draft", "\\Recent")

#: Charsets accepted by SEARCH (RFC 3501 §6.4.4 requires US-ASCII; UTF-8 is what clients send).
#: The edge lists them in ``NO [BADCHARSET (UTF-8 US-ASCII)]``.
SEARCH_CHARSETS = ("UTF-8", "US-ASCII")


# --------------------------------------------------------------------------- mailbox names


_MUTF7_ALPHABET = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+,")


def _encode_run(run: list[str]) -> bytes:
    """Encode non-printable characters as ``&<modified BASE64 of UTF-16BE>-`` (§5.1.3)."""
    utf16 = "".join(run).encode("utf-16-be", "surrogatepass")
    b64 = base64.b64encode(utf16).rstrip(b"=").replace(b"/", b",")
    return b"&" + b64 + b"-"


def encode_mailbox_name(name: str) -> bytes:
    """Encode a mailbox name in modified UTF-7 (RFC 3501 §5.1.3) for the server's responses.

    Printable US-ASCII (0x20-0x7E) stands for itself except ``&``, written ``&-``; every other
    run of characters becomes ``&`` + modified BASE64 (``,`` for ``/``, no padding) of its UTF-16BE
    form + ``-``. The result still has to be quoted (or sent as a literal) by the caller.
    """
    out = bytearray()
    run: list[str] = []
    for char in name:
        if 0x20 <= ord(char) <= 0x7E:
            if run:
                out += _encode_run(run)
                run = []
            out += b"&-" if char == "&" else char.encode("ascii")
        else:
            run.append(char)
    if run:
        out += _encode_run(run)
    return bytes(out)


def decode_mailbox_name(raw: bytes) -> str:
    """Decode a modified UTF-7 mailbox name (RFC 3501 §5.1.3).

    Strict: raises :class:`ValueError` for bytes outside printable US-ASCII, an unterminated or
    malformed BASE64 run, invalid UTF-16, and any non-canonical spelling (an encoded printable
    character, two adjacent encoded runs, non-zero padding bits), which RFC 3501 §5.1.3 forbids.
    Being canonical means two different byte strings never name the same mailbox.
    """
    out: list[str] = []
    i = 0
    length = len(raw)
    while i < length:
        byte = raw[i]
        if byte == 0x26:  # "&"
            end = raw.find(b"-", i + 1)
            if end < 0:
                raise ValueError("unterminated modified BASE64 run")
            chunk = raw[i + 1 : end]
            if not chunk:
                out.append("&")
            else:
                if any(c not in _MUTF7_ALPHABET for c in chunk):
                    raise ValueError("invalid modified BASE64 character")
                padded = chunk.replace(b",", b"/") + b"=" * (-len(chunk) % 4)
                try:
                    utf16 = base64.b64decode(padded, validate=True)
                except binascii.Error as exc:
                    raise ValueError("invalid modified BASE64 run") from exc
                if len(utf16) % 2:
                    raise ValueError("odd UTF-16 length")
                out.append(utf16.decode("utf-16-be"))  # strict: lone surrogates raise
            i = end + 1
        elif 0x20 <= byte <= 0x7E:
            out.append(chr(byte))
            i += 1
        else:
            raise ValueError("mailbox name byte outside printable US-ASCII")
    name = "".join(out)
    if encode_mailbox_name(name) != raw:
        raise ValueError("non-canonical modified UTF-7")
    return name


# --------------------------------------------------------------------------- sequence sets


@dataclass(frozen=True, slots=True)
class SeqRange:
    """One element of a sequence set (RFC 3501 §9 ``seq-range``); ``None`` stands for ``*``.

    Normalised so that ``start <= end`` with ``*`` counted as the largest value: ``5:2`` is stored
    as ``2:5``, ``*:4`` as ``4:*`` and a lone number ``n`` as ``n:n``.
    """

    start: int | None
    end: int | None

    def bounds(self, max_value: int) -> tuple[int, int]:
        """The inclusive ``(low, high)`` once ``*`` is replaced by ``max_value`` (unclamped)."""
        low = max_value if self.start is None else self.start
        high = max_value if self.end is None else self.end
        return (low, high) if low <= high else (high, low)

    def __str__(self) -> str:
        first = "*" if self.start is None else str(self.start)
        if self.start == self.end:
            return first
        return f"{first}:{'*' if self.end is None else self.end}"


@dataclass(frozen=True, slots=True)
class ResolvedSet:
    """A sequence set resolved against a mailbox: sorted, merged, inclusive intervals.

    Supports ``in``, iteration (ascending, each value once), ``len`` and truth value; iteration is
    bounded by the ``max_value`` given to :meth:`SequenceSet.resolve`.
    """

    intervals: tuple[tuple[int, int], ...]

    def __contains__(self, value: object) -> bool:
        if not isinstance(value, int):
            return False
        index = bisect.bisect_right(self.intervals, (value, MAX_NUMBER + 1)) - 1
        return index >= 0 and self.intervals[index][0] <= value <= self.intervals[index][1]

    def __iter__(self) -> Iterator[int]:
        for low, high in self.intervals:
            yield from range(low, high + 1)

    def __len__(self) -> int:
        return sum(high - low + 1 for low, high in self.intervals)

    def __bool__(self) -> bool:
        return bool(self.intervals)


@dataclass(frozen=True, slots=True)
class SequenceSet:
    """An RFC 3501 §9 ``sequence-set`` (message sequence numbers or UIDs), e.g. ``2,4:7,9,12:*``.

    ``*`` means "the largest number in use" (RFC 3501 §6.4.5, §9): the number of messages for
    sequence numbers, the highest UID for UIDs. Resolve it with :meth:`resolve`.

    ``saved`` (no ranges): ``$``, the result saved by ``SEARCH RETURN (SAVE)`` (RFC 5182 §2.1),
    which only the session knows (:meth:`Selected.slices
    <imap_store.imap.session.state.Selected.slices>` reads it).
    """

    ranges: tuple[SeqRange, ...]
    saved: bool = False

    @classmethod
    def parse(cls, text: str) -> SequenceSet:
        """Parse ``sequence-set`` syntax; raises :class:`ValueError` when it is malformed."""
        if not text:
            raise ValueError("empty sequence set")
        ranges: list[SeqRange] = []
        for element in text.split(","):
            parts = element.split(":")
            if len(parts) > 2:
                raise ValueError("invalid sequence range")
            values = [_parse_seq_number(part) for part in parts]
            first, last = values[0], values[-1]
            if first is None or (last is not None and first > last):
                first, last = last, first
            ranges.append(SeqRange(first, last))
        return cls(tuple(ranges))

    @classmethod
    def from_values(cls, values: Iterable[int]) -> SequenceSet:
        """The most compact set holding exactly ``values`` (for COPYUID/APPENDUID, RFC 4315 §3)."""
        ordered = sorted(set(values))
        if not ordered:
            raise ValueError("a sequence set cannot be empty")
        ranges: list[SeqRange] = []
        start = previous = ordered[0]
        for value in ordered[1:]:
            if value != previous + 1:
                ranges.append(SeqRange(start, previous))
                start = value
            previous = value
        ranges.append(SeqRange(start, previous))
        return cls(tuple(ranges))

    @property
    def has_star(self) -> bool:
        """Whether ``*`` appears in the set."""
        return any(r.start is None or r.end is None for r in self.ranges)

    @property
    def highest_number(self) -> int:
        """Largest explicit number in the set (``*`` ignored; 0 if the set is only ``*``).

        For message sequence numbers the session answers BAD when this exceeds the number of
        messages (RFC 3501 §9 ``seq-number``); non-existent UIDs are simply ignored (§2.3.1.1).
        """
        numbers = [n for r in self.ranges for n in (r.start, r.end) if n is not None]
        return max(numbers, default=0)

    def resolve(self, max_value: int) -> ResolvedSet:
        """Resolve against a mailbox whose largest number (message count or UID) is ``max_value``.

        ``*`` becomes ``max_value`` and every range is clamped to ``1..max_value``, so numbers that
        do not exist are dropped and iterating the result is bounded. Note the RFC 3501 §6.4.8
        consequence: ``UID 100:*`` with a highest UID of 50 is ``50:100``, which holds UID 50.
        """
        clamped: list[tuple[int, int]] = []
        for seq_range in self.ranges:
            low, high = seq_range.bounds(max_value)
            low, high = max(low, 1), min(high, max_value)
            if low <= high:
                clamped.append((low, high))
        clamped.sort()
        merged: list[tuple[int, int]] = []
        for low, high in clamped:
            if merged and low <= merged[-1][1] + 1:
                if high > merged[-1][1]:
                    merged[-1] = (merged[-1][0], high)
            else:
                merged.append((low, high))
        return ResolvedSet(tuple(merged))

    def contains(self, value: int, max_value: int) -> bool:
        """Whether ``value`` belongs to the set once ``*`` is ``max_value``."""
        for seq_range in self.ranges:
            low, high = seq_range.bounds(max_value)
            if low <= value <= high:
                return True
        return False

    def __str__(self) -> str:
        return "$" if self.saved else ",".join(str(r) for r in self.ranges)


#: ``$`` (RFC 5182 §2.1): the search result this session saved.
SAVED_RESULT = SequenceSet((), saved=True)


def _parse_seq_number(text: str) -> int | None:
    if text == "*":
        return None
    if not text.isascii() or not text.isdigit() or text[0] == "0" or len(text) > 10:
        raise ValueError("invalid sequence number")
    value = int(text)
    if value > MAX_NUMBER:
        raise ValueError("sequence number out of range")
    return value


# --------------------------------------------------------------------------- FETCH attributes


#: Atoms accepted by ``header-fld-name`` without quoting when rendering (RFC 3501 §9 ATOM-CHAR).
_ATOM_SPECIALS = frozenset('(){ %*"\\]')


def _render_astring(text: str) -> str:
    if text and all(0x20 < ord(c) < 0x7F and c not in _ATOM_SPECIALS for c in text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


SectionText = Literal["HEADER", "HEADER.FIELDS", "HEADER.FIELDS.NOT", "TEXT", "MIME"]


@dataclass(frozen=True, slots=True)
class Section:
    """A body section specifier (RFC 3501 §6.4.5 ``section``), e.g. ``1.2.HEADER.FIELDS (FROM)``.

    ``part`` is the part path (``()`` for the whole message); ``text`` is ``None``, ``"HEADER"``,
    ``"HEADER.FIELDS"``, ``"HEADER.FIELDS.NOT"``, ``"TEXT"`` or ``"MIME"`` (``MIME`` only with a
    part); ``fields`` the header field names of ``HEADER.FIELDS[.NOT]``, as sent by the client.
    """

    part: tuple[int, ...] = ()
    text: SectionText | None = None
    fields: tuple[str, ...] = ()

    def render(self) -> str:
        """The section as it appears between the brackets of a FETCH response (§7.4.2)."""
        pieces = [".".join(str(p) for p in self.part)] if self.part else []
        if self.text is not None:
            pieces.append(self.text)
        spec = ".".join(pieces)
        if self.fields:
            spec += " (" + " ".join(_render_astring(f) for f in self.fields) + ")"
        return spec


#: Simple FETCH attribute names of RFC 3501 §6.4.5 (``BODY`` alone is the non-extensible
#: BODYSTRUCTURE; ``BODY[...]`` is represented with a :class:`Section`).
FETCH_NAMES = frozenset(
    {
        "ENVELOPE",
        "FLAGS",
        "INTERNALDATE",
        "RFC822",
        "RFC822.HEADER",
        "RFC822.SIZE",
        "RFC822.TEXT",
        "BODY",
        "BODYSTRUCTURE",
        "UID",
        "MODSEQ",  # RFC 7162 §3.1.4.1
    }
)

#: BINARY fetch items (RFC 3516 §4.2, RFC 9051 §6.4.5), always with a section of part numbers.
BINARY_NAMES = frozenset({"BINARY", "BINARY.SIZE"})

#: RFC 7162 §7: mod-sequence-value, a positive unsigned 63-bit integer.
MAX_MODSEQ = 2**63 - 1


@dataclass(frozen=True, slots=True)
class FetchAttr:
    """One FETCH data item (RFC 3501 §6.4.5 ``fetch-att``).

    ``name`` is one of :data:`FETCH_NAMES`. When ``section`` is set, ``name`` is ``"BODY"`` and
    the item is ``BODY[section]`` (``BODY.PEEK[section]`` if ``peek``), optionally restricted to
    ``partial = (origin, length)`` octets; or ``name`` is ``"BINARY"`` (``BINARY[part]``, the
    part with its Content-Transfer-Encoding removed, RFC 3516 §4.2; ``BINARY.PEEK`` if
    ``peek``) or ``"BINARY.SIZE"`` (its decoded size), the section holding part numbers only.
    """

    name: str
    section: Section | None = None
    partial: tuple[int, int] | None = None
    peek: bool = False

    @property
    def is_body_section(self) -> bool:
        """``BODY[...]`` / ``BODY.PEEK[...]`` rather than a plain item."""
        return self.section is not None

    @property
    def sets_seen(self) -> bool:
        """Whether fetching this item implicitly sets ``\\Seen`` (RFC 3501 §6.4.5).

        True for ``BODY[...]`` and ``BINARY[...]`` (not ``.PEEK``), ``RFC822`` and
        ``RFC822.TEXT``; the session skips it when the mailbox was opened with EXAMINE.
        """
        if self.section is not None:
            return not self.peek and self.name != "BINARY.SIZE"
        return self.name in ("RFC822", "RFC822.TEXT")

    def response_name(self) -> str:
        """The item's name in the FETCH response (RFC 3501 §7.4.2).

        ``BODY.PEEK[...]`` answers as ``BODY[...]`` and a partial ``<origin.length>`` as
        ``<origin>``, e.g. ``BODY[HEADER.FIELDS (SUBJECT)]<0>``.
        """
        return self._spelled(as_written=False)

    def __str__(self) -> str:
        """The item as the client wrote it (canonical case)."""
        return self._spelled(as_written=True)

    def _spelled(self, as_written: bool) -> str:
        """The name, then the section and the partial if any: ``.PEEK`` and
        ``<origin.length>`` as written, only ``<origin>`` as answered."""
        if self.section is None:
            return self.name
        peek = ".PEEK" if as_written and self.peek else ""
        name = f"{self.name}{peek}[{self.section.render()}]"
        if self.partial is not None:
            origin, length = self.partial
            name += f"<{origin}.{length}>" if as_written else f"<{origin}>"
        return name


#: FETCH macros (RFC 3501 §6.4.5), expanded by the parser.
FETCH_MACROS: dict[str, tuple[FetchAttr, ...]] = {
    "ALL": (
        FetchAttr("FLAGS"),
        FetchAttr("INTERNALDATE"),
        FetchAttr("RFC822.SIZE"),
        FetchAttr("ENVELOPE"),
    ),
    "FAST": (FetchAttr("FLAGS"), FetchAttr("INTERNALDATE"), FetchAttr("RFC822.SIZE")),
    "FULL": (
        FetchAttr("FLAGS"),
        FetchAttr("INTERNALDATE"),
        FetchAttr("RFC822.SIZE"),
        FetchAttr("ENVELOPE"),
        FetchAttr("BODY"),
    ),
}


# --------------------------------------------------------------------------- SEARCH keys
# The keys about one message alone and NOT, OR and AND are the ones the store takes too
# (imap_store/store/search_keys.py); this one is relative to a session's view.


@dataclass(frozen=True, slots=True)
class SearchSet:
    """A bare sequence set: messages whose sequence number is in ``seq_set``; with ``uid``,
    ``UID set``: messages whose UID is in ``seq_set`` (as the ``uid`` of FETCH, STORE ...)."""

    seq_set: SequenceSet
    uid: bool = False


SearchKey = (
    MessageKey | SearchSet
    | SearchNot["SearchKey"] | SearchOr["SearchKey"] | SearchAnd["SearchKey"]
)


# --------------------------------------------------------------------------- commands


@dataclass(frozen=True, slots=True)
class _Command:
    """Fields common to every command: the client's tag (RFC 3501 §2.2.1)."""

    tag: str

    #: Command name as written in completion texts (e.g. ``"UID FETCH"``).
    NAME: ClassVar[str] = ""

    @property
    def name(self) -> str:
        """The command's name, upper-case (``UID `` prefix included when relevant)."""
        return self.NAME


@dataclass(frozen=True, slots=True)
class Capability(_Command):
    """``CAPABILITY`` (RFC 3501 §6.1.1)."""

    NAME: ClassVar[str] = "CAPABILITY"


@dataclass(frozen=True, slots=True)
class Noop(_Command):
    """``NOOP`` (RFC 3501 §6.1.2)."""

    NAME: ClassVar[str] = "NOOP"


@dataclass(frozen=True, slots=True)
class Logout(_Command):
    """``LOGOUT`` (RFC 3501 §6.1.3)."""

    NAME: ClassVar[str] = "LOGOUT"


@dataclass(frozen=True, slots=True)
class StartTls(_Command):
    """``STARTTLS`` (RFC 3501 §6.2.1).

    The edge must check ``CommandParser.buffered_bytes == 0`` before the handshake: bytes pipelined
    after STARTTLS in clear text must not be executed inside TLS (command injection).
    """

    NAME: ClassVar[str] = "STARTTLS"


@dataclass(frozen=True, slots=True)
class Authenticate(_Command):
    """``AUTHENTICATE mechanism [initial-response]`` (RFC 3501 §6.2.2, SASL-IR RFC 4959).

    ``mechanism`` is upper-cased. ``initial_response`` is the BASE64-decoded initial response
    (``b""`` for ``=``) or ``None`` when absent; the edge then sends ``+ `` continuations and
    reads the client's answers with ``CommandParser.expect_line()``.
    """

    NAME: ClassVar[str] = "AUTHENTICATE"

    mechanism: str
    initial_response: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class Login(_Command):
    """``LOGIN user password`` (RFC 3501 §6.2.3).

    ``user`` is decoded as UTF-8; ``password`` stays bytes (hash verifiers take bytes, and
    ``AUTHENTICATE PLAIN`` yields bytes too). The password is hidden from ``repr``.
    """

    NAME: ClassVar[str] = "LOGIN"

    user: str
    password: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class Select(_Command):
    """``SELECT mailbox`` or, with ``readonly``, ``EXAMINE mailbox`` (RFC 3501 §6.3.1-2)."""

    mailbox: str
    readonly: bool = False
    condstore: bool = False  # the CONDSTORE select parameter (RFC 7162 §3.1.8)
    qresync: QResync | None = None  # the QRESYNC select parameter (RFC 7162 §3.2.5)

    @property
    def name(self) -> str:
        return "EXAMINE" if self.readonly else "SELECT"


@dataclass(frozen=True, slots=True)
class QResync:
    """``QRESYNC (uidvalidity modseq [known-uids [(seq-match seq-uids)]])`` of SELECT."""

    uidvalidity: int
    modseq: int
    known_uids: SequenceSet | None = None
    seq_match: tuple[SequenceSet, SequenceSet] | None = None


@dataclass(frozen=True, slots=True)
class Create(_Command):
    """``CREATE mailbox [(USE (attrs))]`` (RFC 3501 §6.3.3, RFC 6154 §3).

    ``special_use`` holds the requested special-use attributes (``\\Drafts``, ``\\Sent`` ...,
    canonical case for the RFC 6154 ones).
    """

    NAME: ClassVar[str] = "CREATE"

    mailbox: str
    special_use: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Delete(_Command):
    """``DELETE mailbox`` (RFC 3501 §6.3.4)."""

    NAME: ClassVar[str] = "DELETE"

    mailbox: str


@dataclass(frozen=True, slots=True)
class Rename(_Command):
    """``RENAME existing new`` (RFC 3501 §6.3.5)."""

    NAME: ClassVar[str] = "RENAME"

    mailbox: str
    new_name: str


@dataclass(frozen=True, slots=True)
class Subscribe(_Command):
    """``SUBSCRIBE mailbox`` (RFC 3501 §6.3.6)."""

    NAME: ClassVar[str] = "SUBSCRIBE"

    mailbox: str


@dataclass(frozen=True, slots=True)
class Unsubscribe(_Command):
    """``UNSUBSCRIBE mailbox`` (RFC 3501 §6.3.7)."""

    NAME: ClassVar[str] = "UNSUBSCRIBE"

    mailbox: str


@dataclass(frozen=True, slots=True)
class List(_Command):
    """``LIST [(select-opts)] reference pattern(s) [RETURN (return-opts)]``.

    RFC 3501 §6.3.8 with the RFC 5258 extended syntax: ``patterns`` may hold several patterns
    (``LIST "" ("INBOX" "Sent")``); ``selection_options`` are among ``SUBSCRIBED``, ``REMOTE``,
    ``RECURSIVEMATCH`` (RFC 5258 §3.1) and ``SPECIAL-USE`` (RFC 6154 §3), ``return_options``
    among ``SUBSCRIBED``, ``CHILDREN`` (RFC 5258 §3.2), ``SPECIAL-USE`` (RFC 6154 §2) and
    ``STATUS`` (RFC 5819 §2), whose items are ``status_items``; the parser refuses others
    (BAD). ``extended``: the command used the extended syntax (a selection list, even empty, a
    parenthesised pattern list or RETURN), so the answer may use RFC 5258's ``\\NonExistent``
    where a basic LIST says ``\\Noselect``. ``pattern`` is the first pattern. An empty pattern
    asks for the hierarchy delimiter.
    """

    NAME: ClassVar[str] = "LIST"

    reference: str
    patterns: tuple[str, ...]
    selection_options: tuple[str, ...] = ()
    return_options: tuple[str, ...] = ()
    status_items: tuple[str, ...] = ()
    extended: bool = False

    @property
    def pattern(self) -> str:
        """The first (almost always the only) pattern."""
        return self.patterns[0]


@dataclass(frozen=True, slots=True)
class Lsub(_Command):
    """``LSUB reference pattern`` (RFC 3501 §6.3.9)."""

    NAME: ClassVar[str] = "LSUB"

    reference: str
    pattern: str


@dataclass(frozen=True, slots=True)
class Status(_Command):
    """``STATUS mailbox (items)`` (RFC 3501 §6.3.10).

    ``items`` are upper-cased and de-duplicated in the client's order, among ``MESSAGES``,
    ``RECENT``, ``UIDNEXT``, ``UIDVALIDITY``, ``UNSEEN``, ``APPENDLIMIT`` (RFC 7889 §4),
    ``HIGHESTMODSEQ`` (RFC 7162 §3.1.6), ``SIZE`` (RFC 8438) and ``DELETED`` (RFC 9051
    §6.3.11).
    """

    NAME: ClassVar[str] = "STATUS"

    mailbox: str
    items: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Append(_Command):
    """``APPEND mailbox [(flags)] [date-time] literal`` (RFC 3501 §6.3.11).

    ``date`` is timezone-aware (``None``: the server uses the current time). ``message`` is the
    literal's exact bytes (NUL and bare CR/LF included); it is hidden from ``repr``.
    ``binary``: the message came as a ``literal8`` (``~{n}``, RFC 3516 §4.4), where NUL may be.
    """

    NAME: ClassVar[str] = "APPEND"

    mailbox: str
    flags: tuple[str, ...]
    date: datetime | None
    message: bytes = field(repr=False)
    binary: bool = False


@dataclass(frozen=True, slots=True)
class Check(_Command):
    """``CHECK`` (RFC 3501 §6.4.1)."""

    NAME: ClassVar[str] = "CHECK"


@dataclass(frozen=True, slots=True)
class Close(_Command):
    """``CLOSE`` (RFC 3501 §6.4.2)."""

    NAME: ClassVar[str] = "CLOSE"


@dataclass(frozen=True, slots=True)
class Unselect(_Command):
    """``UNSELECT`` (RFC 3691 §2)."""

    NAME: ClassVar[str] = "UNSELECT"


@dataclass(frozen=True, slots=True)
class Expunge(_Command):
    """``EXPUNGE`` (RFC 3501 §6.4.3) or, with ``uid_set``, ``UID EXPUNGE set`` (RFC 4315 §2.1)."""

    uid_set: SequenceSet | None = None

    @property
    def uid(self) -> bool:
        """Whether this is ``UID EXPUNGE``."""
        return self.uid_set is not None

    @property
    def name(self) -> str:
        return "UID EXPUNGE" if self.uid_set is not None else "EXPUNGE"


@dataclass(frozen=True, slots=True)
class _UidCommand(_Command):
    """Base of the commands that accept the ``UID`` prefix (RFC 3501 §6.4.8)."""

    @property
    def name(self) -> str:
        uid: bool = getattr(self, "uid", False)
        return f"UID {self.NAME}" if uid else self.NAME


@dataclass(frozen=True, slots=True)
class Search(_UidCommand):
    """``[UID] SEARCH [CHARSET name] keys`` (RFC 3501 §6.4.4).

    ``charset`` is the upper-cased CHARSET argument or ``None``; string arguments inside
    ``criteria`` are already decoded (see the module docstring). Several top-level keys are
    wrapped in a :class:`SearchAnd`.
    """

    NAME: ClassVar[str] = "SEARCH"

    charset: str | None
    criteria: SearchKey
    uid: bool = False
    #: RFC 4731 ``RETURN (...)``: MIN, MAX, ALL, COUNT (``RETURN ()`` is ALL); None for a
    #: plain SEARCH answered with ``* SEARCH``.
    returns: tuple[str, ...] | None = None


#: RFC 5256 §3 sort-key names (DISPLAY and ESORT are not offered).
SORT_KEYS = frozenset({"ARRIVAL", "CC", "DATE", "FROM", "SIZE", "SUBJECT", "TO"})


@dataclass(frozen=True, slots=True)
class Sort(_UidCommand):
    """``[UID] SORT (criteria) charset keys`` (RFC 5256 §3).

    ``keys`` is the sort criteria in order, each ``(name, reverse)`` with ``name`` one of
    :data:`SORT_KEYS`; ``charset`` is upper-cased and one of :data:`SEARCH_CHARSETS`.
    """

    NAME: ClassVar[str] = "SORT"

    keys: tuple[tuple[str, bool], ...]
    charset: str
    criteria: SearchKey
    uid: bool = False


#: RFC 5256 §3 threading algorithms offered.
THREAD_ALGORITHMS = ("ORDEREDSUBJECT", "REFERENCES")


@dataclass(frozen=True, slots=True)
class Thread(_UidCommand):
    """``[UID] THREAD algorithm charset keys`` (RFC 5256 §3)."""

    NAME: ClassVar[str] = "THREAD"

    algorithm: str
    charset: str
    criteria: SearchKey
    uid: bool = False


@dataclass(frozen=True, slots=True)
class Fetch(_UidCommand):
    """``[UID] FETCH set items`` (RFC 3501 §6.4.5).

    ``attributes`` has the macros expanded and exact duplicates removed, in the client's order.
    For ``UID FETCH`` the session must add the ``UID`` item to every response (RFC 3501 §6.4.8)
    even when it is not listed.
    """

    NAME: ClassVar[str] = "FETCH"

    seq_set: SequenceSet
    attributes: tuple[FetchAttr, ...]
    uid: bool = False
    changedsince: int | None = None  # CHANGEDSINCE modifier (RFC 7162 §3.1.4.1)
    vanished: bool = False  # VANISHED modifier of UID FETCH (RFC 7162 §3.2.6)


class StoreMode(enum.StrEnum):
    """``FLAGS`` (replace), ``+FLAGS`` (add) or ``-FLAGS`` (remove) of STORE (RFC 3501 §6.4.6)."""

    REPLACE = "FLAGS"
    ADD = "+FLAGS"
    REMOVE = "-FLAGS"


@dataclass(frozen=True, slots=True)
class Store(_UidCommand):
    """``[UID] STORE set [+|-]FLAGS[.SILENT] flags`` (RFC 3501 §6.4.6)."""

    NAME: ClassVar[str] = "STORE"

    seq_set: SequenceSet
    mode: StoreMode
    silent: bool
    flags: tuple[str, ...]
    uid: bool = False
    unchangedsince: int | None = None  # UNCHANGEDSINCE modifier (RFC 7162 §3.1.3)


@dataclass(frozen=True, slots=True)
class Copy(_UidCommand):
    """``[UID] COPY set mailbox`` (RFC 3501 §6.4.7)."""

    NAME: ClassVar[str] = "COPY"

    seq_set: SequenceSet
    mailbox: str
    uid: bool = False


@dataclass(frozen=True, slots=True)
class Move(_UidCommand):
    """``[UID] MOVE set mailbox`` (RFC 6851 §3)."""

    NAME: ClassVar[str] = "MOVE"

    seq_set: SequenceSet
    mailbox: str
    uid: bool = False


@dataclass(frozen=True, slots=True)
class Idle(_Command):
    """``IDLE`` (RFC 2177 §3): the edge answers ``+ idling`` then calls
    ``CommandParser.expect_line()`` to receive ``DONE`` as a ``RawLine``."""

    NAME: ClassVar[str] = "IDLE"


@dataclass(frozen=True, slots=True)
class Namespace(_Command):
    """``NAMESPACE`` (RFC 2342 §5)."""

    NAME: ClassVar[str] = "NAMESPACE"


@dataclass(frozen=True, slots=True)
class Enable(_Command):
    """``ENABLE cap...`` (RFC 5161 §3.1); capability names upper-cased."""

    NAME: ClassVar[str] = "ENABLE"

    capabilities: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Id(_Command):
    """``ID (field value ...)`` or ``ID NIL`` (RFC 2971 §3.1).

    ``params`` maps field names (as sent) to values (``None`` for NIL), decoded as UTF-8 with
    replacement characters; ``None`` for ``ID NIL``. At most 30 pairs, fields of at most 30
    octets and values of at most 1024 octets are accepted (RFC 2971 §3.3).
    """

    NAME: ClassVar[str] = "ID"

    params: dict[str, str | None] | None


@dataclass(frozen=True, slots=True)
class InvalidCommand:
    """A command the parser refused; the edge answers ``<tag> <status> [<code>] <text>``.

    ``tag`` is ``None`` when no valid tag could be read (answer with ``*``). ``status`` is
    ``"BAD"`` for syntax errors (RFC 3501 §7.1.3) and ``"NO"`` for an unsupported SEARCH
    charset, with ``code`` ``"BADCHARSET (UTF-8 US-ASCII)"`` (RFC 3501 §6.4.4, §7.1), and for a
    mailbox name that cannot exist (not modified UTF-7, §5.1.3), ``NONEXISTENT`` or ``CANNOT``
    (RFC 5530). ``text``
    is short, fixed text of our own, safe to echo.

    ``saves`` is True when the refused command was a SEARCH whose RETURN options name SAVE:
    a SEARCH ... SAVE that fails, by a syntax error too, empties ``$`` (RFC 5182 §2.1).
    """

    tag: str | None
    text: str
    status: Literal["BAD", "NO"] = "BAD"
    code: str | None = None
    saves: bool = False


Command = (
    Capability
    | Noop
    | Logout
    | StartTls
    | Authenticate
    | Login
    | Select
    | Create
    | Delete
    | Rename
    | Subscribe
    | Unsubscribe
    | List
    | Lsub
    | Status
    | Append
    | Check
    | Close
    | Unselect
    | Expunge
    | Search
    | Sort
    | Thread
    | Fetch
    | Store
    | Copy
    | Move
    | Idle
    | Namespace
    | Enable
    | Id
)
