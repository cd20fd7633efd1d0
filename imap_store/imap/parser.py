"""Sans-IO IMAP4rev1 command parser (RFC 3501 §2.2, §4, §9; LITERAL+ RFC 7888).

:class:`CommandParser` turns the bytes a client sends into events; it never touches a socket and
never blocks. The asyncio edge drives it like this::

    parser.feed(data)                       # whatever the transport delivered
    while (event := parser.next_event()) is not None:
        match event:
            case NeedContinuation():        # synchronising literal {n}: invite it
                write(b"+ Ready for literal\\r\\n")   # or parser.reject_literal() + tagged NO
            case LiteralTooLarge():         # refused before reading any of it
                write(tagged NO [TOOBIG] / BAD)       # non-sync literal: parser drains it
            case LineTooLong():             # drained up to its CRLF, never buffered
                write(tagged or untagged BAD)         # the edge may also disconnect
            case RawLine():                 # only after expect_line(): AUTHENTICATE / IDLE
                ...
            case InvalidCommand():          # BAD (or NO [BADCHARSET]); parser already resynced
                ...
            case _:                         # a command from imap_store.imap.commands
                ...

Framing is done on lines first (a line ending in ``{n}`` or ``{n+}`` announces a literal of
exactly ``n`` octets, RFC 3501 §4.3, RFC 7888 §3), then the assembled command is parsed with the
RFC 3501 §9 grammar. Parse failures never raise: they become :class:`InvalidCommand` and the
parser resumes at the next command. Lines must end with CRLF (RFC 3501 §2.2); a bare LF or CR is
just an invalid character inside the line.

Limits (all refused *before* buffering, so a client cannot make the server hold more than about
``max_literal + max_command`` bytes per connection):

* ``max_line``: one line of a command, CRLF excluded (default :data:`DEFAULT_MAX_LINE`);
* ``max_literal``: the message literal of APPEND (default :data:`DEFAULT_MAX_LITERAL`);
* ``max_command``: any other command, all its lines and literals together
  (default :data:`DEFAULT_MAX_COMMAND`); a literal that would exceed it is refused with
  :class:`LiteralTooLarge` too. No command but APPEND needs large literals.

The limits are public attributes: the session may lower ``max_literal`` before authentication.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import dataclasses
import enum
import re
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from typing import TypeVar

from imap_store.imap import commands as c
from policy.rules import MAX_INBOUND_SIZE

__all__ = [
    "DEFAULT_MAX_COMMAND",
    "DEFAULT_MAX_LINE",
    "DEFAULT_MAX_LITERAL",
    "MAX_SEARCH_DEPTH",
    "PRE_LOGIN_MAX_COMMAND",
    "CommandParser",
    "Event",
    "LineTooLong",
    "LiteralTooLarge",
    "NeedContinuation",
    "RawLine",
]

#: Longest accepted line, CRLF excluded. RFC 7162 §4 asks servers to accept command lines of at
#: least 8192 octets (RFC 2683 §3.2.1.5 said 8000); longer ones are drained and refused.
DEFAULT_MAX_LINE = 8192

#: Largest APPEND message literal. RFC 3501 sets no limit; RFC 7889 (APPENDLIMIT) lets the server
#: advertise one: the edge advertises this value, the inbound message limit of rule R7.
DEFAULT_MAX_LITERAL = MAX_INBOUND_SIZE

#: Largest total size (lines and literals) of any command other than APPEND. RFC 7888 §4 lets a
#: server refuse over-large literals; only APPEND carries big data, logins and search strings
#: are small.
DEFAULT_MAX_COMMAND = 64 * 1024
#: The same before authentication, where only CAPABILITY, STARTTLS, ID, LOGIN and AUTHENTICATE
#: mean anything (an RFC 2971 ID is at most 30 pairs of 30 + 1024 octets): a 60 KB command of
#: 6,000 literals cost ~40 ms of event loop to parse, and anyone may send it (issue 16).
PRE_LOGIN_MAX_COMMAND = 32 * 1024

#: Deepest nesting of SEARCH keys (parentheses, NOT, OR) before the command is refused as BAD:
#: bounds recursion on hostile input (RFC 3501 §6.4.4 sets no limit).
MAX_SEARCH_DEPTH = 64


_T = TypeVar("_T")

# --------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class NeedContinuation:
    """The client announced a synchronising literal ``{size}`` (RFC 3501 §4.3, §7.5).

    The edge sends a continuation request (``+ Ready``) and keeps feeding: the next ``size``
    bytes are read verbatim. To refuse it instead (e.g. APPEND before login), the edge calls
    :meth:`CommandParser.reject_literal` and sends a tagged NO/BAD; the client will not send it.
    ``command`` is the upper-cased command name (``"APPEND"``, ``"UID SEARCH"`` ...).
    """

    tag: str
    size: int
    command: str


@dataclass(frozen=True, slots=True)
class LiteralTooLarge:
    """A literal over the configured limit was refused before any byte of it was read.

    Synchronising (``{n}``): the client waits for ``+`` and will not send it; the command is
    dropped. Non-synchronising (``{n+}``, RFC 7888 §4): the parser silently discards the next
    ``n`` bytes and the rest of that command. Either way the edge answers with a tagged
    ``NO [TOOBIG]`` (APPEND, RFC 7889 §4) or ``BAD`` and may close the connection.
    """

    tag: str | None
    size: int
    synchronizing: bool


@dataclass(frozen=True, slots=True)
class LineTooLong:
    """A line exceeded ``max_line``: reported as soon as detected, then drained up to its CRLF
    (and past any non-synchronising literal it announces) without buffering. The whole command
    is dropped; ``tag`` is ``None`` if it could not be read (e.g. a raw line)."""

    tag: str | None


@dataclass(frozen=True, slots=True)
class RawLine:
    """One line, CRLF removed, read after :meth:`CommandParser.expect_line` (an AUTHENTICATE
    response, RFC 3501 §6.2.2, or IDLE's ``DONE``, RFC 2177 §3). Hidden from ``repr``: it may
    carry credentials."""

    line: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class ParseLater:
    """A command assembled whole but large enough that parsing it would hold an event loop
    (more than ``DEFER_LITERALS`` literals or ``DEFER_TEXT`` bytes of text: a 60 KB LIST of
    6,000 empty literals takes ~100 ms): the edge calls :meth:`parse` where that does no harm,
    e.g. in a worker thread. Only with ``CommandParser(defer_large=True)``."""

    tag: str
    text: bytes
    literals: dict[int, bytes]
    utf8_names: bool

    def parse(self) -> c.Command | c.InvalidCommand:
        return parse_command(self.tag, self.text, self.literals, self.utf8_names)


#: ``ParseLater`` thresholds (the commands clients send every day stay far below both).
DEFER_LITERALS = 64
DEFER_TEXT = 16 * 1024

#: What a session handles; ``next_event`` may also return a ``ParseLater`` (``defer_large``),
#: which the edge turns into one of these.
Event = c.Command | c.InvalidCommand | NeedContinuation | LiteralTooLarge | LineTooLong | RawLine


# --------------------------------------------------------------------------- character classes


def _byte_set(chars: bytes) -> frozenset[int]:
    return frozenset(chars)


_PRINTABLE = frozenset(range(0x21, 0x7F))
#: RFC 3501 §9 ATOM-CHAR: CHAR except atom-specials "(" ")" "{" SP CTL "%" "*" DQUOTE "\" "]".
_ATOM_CHARS = _PRINTABLE - _byte_set(b'(){%*"\\]')
#: ASTRING-CHAR = ATOM-CHAR / resp-specials.
_ASTRING_CHARS = _ATOM_CHARS | _byte_set(b"]")
#: tag = 1*<any ASTRING-CHAR except "+">.
_TAG_CHARS = _ASTRING_CHARS - _byte_set(b"+")
#: list-char = ATOM-CHAR / list-wildcards / resp-specials.
_LIST_CHARS = _ATOM_CHARS | _byte_set(b"%*]")
_SEQ_CHARS = _byte_set(b"0123456789:,*")
_DIGITS = _byte_set(b"0123456789")
_FETCH_NAME_CHARS = _byte_set(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789.")
_STORE_ITEM_CHARS = _byte_set(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz.+-")
_SECTION_TEXT_CHARS = _byte_set(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz.")
#: RFC 5322 §3.6.8 field-name: printable US-ASCII except ":".
_FIELD_NAME_CHARS = _PRINTABLE - _byte_set(b":")

_SP, _LPAREN, _RPAREN, _DQUOTE, _BACKSLASH = 0x20, 0x28, 0x29, 0x22, 0x5C
_LBRACE, _LBRACKET, _RBRACKET, _LT, _DOT = 0x7B, 0x5B, 0x5D, 0x3C, 0x2E
_DOLLAR, _TILDE = 0x24, 0x7E

_MONTHS = {
    name: index + 1
    for index, name in enumerate(
        ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")
    )
}
_CANONICAL_FLAGS = {flag.upper(): flag for flag in c.SYSTEM_FLAGS}
#: RFC 6154 §2 special-use attributes, canonical case.
_SPECIAL_USE = {
    attr.upper(): attr
    for attr in ("\\All", "\\Archive", "\\Drafts", "\\Flagged", "\\Junk", "\\Sent", "\\Trash")
}
_STATUS_ITEMS = frozenset({"MESSAGES", "RECENT", "UIDNEXT", "UIDVALIDITY", "UNSEEN", "APPENDLIMIT",
                           "HIGHESTMODSEQ", "SIZE", "DELETED"})
#: LIST selection options (RFC 5258 §3.1, RFC 6154 §3) and return options (RFC 5258 §3.2,
#: RFC 6154 §2, RFC 5819 §2's STATUS, which takes a list of STATUS items): others are BAD.
_LIST_SELECTION = frozenset({"SUBSCRIBED", "REMOTE", "RECURSIVEMATCH", "SPECIAL-USE"})
_LIST_RETURN = frozenset({"SUBSCRIBED", "CHILDREN", "SPECIAL-USE", "STATUS"})

#: Literal announcement at the end of a line: "{" digits ["+"] "}" (RFC 3501 §9, RFC 7888 §8).
_MARKER = re.compile(rb"\{([0-9]+)(\+?)\}")
#: A possibly incomplete literal announcement, while draining a line chunk by chunk.
_PARTIAL_MARKER = re.compile(rb"\{([0-9]*)(\+?)(\}?)")
#: Marker digits beyond this are treated as "infinitely large" (avoids huge int conversions).
_MAX_MARKER_DIGITS = 20
_HUGE_LITERAL: int = 10**_MAX_MARKER_DIGITS
_DATE_TIME = re.compile(
    rb" ?([0-9]{1,2})-([A-Za-z]{3})-([0-9]{4})"
    rb" ([0-9]{2}):([0-9]{2}):([0-9]{2}) ([+-])([0-9]{2})([0-9]{2})"
)
_DATE = re.compile(rb"([0-9]{1,2})-([A-Za-z]{3})-([0-9]{4})")


def _marker_size(digits: bytes) -> int:
    significant = digits.lstrip(b"0")
    if len(significant) > _MAX_MARKER_DIGITS:
        return _HUGE_LITERAL
    return int(significant.decode("ascii")) if significant else 0


def _literal_marker(line: bytes) -> tuple[int, bool] | None:
    """``(size, synchronizing)`` if ``line`` ends with a literal announcement."""
    start = line.rfind(b"{")
    if start < 0:
        return None
    match = _MARKER.fullmatch(line, start)
    if match is None:
        return None
    return _marker_size(match[1]), not match[2]


def _split_first_line(line: bytes) -> tuple[str | None, str | None]:
    """The tag and upper-cased command name (``"UID FETCH"``) of a command's first line."""
    space = line.find(b" ")
    raw_tag = line if space < 0 else line[:space]
    if not raw_tag or any(b not in _TAG_CHARS for b in raw_tag):
        return None, None
    tag = raw_tag.decode("ascii")
    if space < 0:
        return tag, None
    words = line[space + 1 :].split(b" ", 2)
    name = words[0].upper()
    if not name:
        return tag, None
    if name == b"UID" and len(words) > 1:
        name += b" " + words[1].upper()
    return tag, name.decode("ascii", "replace")


# --------------------------------------------------------------------------- grammar


class _SyntaxError(Exception):
    """Internal: a grammar error; ``text`` becomes the BAD response text."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


class _NameError(_SyntaxError):
    """Internal: a mailbox argument that is a valid ``astring`` but no mailbox name we can
    hold (not canonical modified UTF-7, RFC 3501 §5.1.3; control characters). The grammar
    allows it, so the answer is a NO with ``code``, not a BAD (the command was understood)."""

    def __init__(self, text: str, code: str) -> None:
        super().__init__(text)
        self.code = code


class _Reader:
    """Cursor over one assembled command: its lines joined without CRLF, plus the literals,
    keyed by the offset just after their ``{n}`` announcement (RFC 3501 §4.3)."""

    def __init__(self, text: bytes, literals: dict[int, bytes], utf8: bool = False) -> None:
        self.text = text
        self.pos = 0
        self.literals = literals
        # Mailbox names in UTF-8, not modified UTF-7 (RFC 9051 §5.1, once IMAP4rev2 is enabled)
        self.utf8 = utf8
        # The literals' offsets in order, so that a quoted string finds the first literal after
        # its start by bisection: scanning them all for every string made a command with many
        # literals and quoted strings quadratic (issue 16).
        self.literal_offsets = sorted(literals)

    # -- primitives

    def peek(self) -> int:
        return self.text[self.pos] if self.pos < len(self.text) else -1

    def at_end(self) -> bool:
        return self.pos >= len(self.text)

    def expect(self, byte: int, text: str) -> None:
        if self.peek() != byte:
            raise _SyntaxError(text)
        self.pos += 1

    def sp(self) -> None:
        if self.at_end():
            raise _SyntaxError("Missing argument")
        self.expect(_SP, "Expected a space")

    def run(self, allowed: frozenset[int]) -> bytes:
        start = self.pos
        text = self.text
        while self.pos < len(text) and text[self.pos] in allowed:
            self.pos += 1
        return text[start : self.pos]

    def atom(self, what: str = "Expected an atom") -> bytes:
        value = self.run(_ATOM_CHARS)
        if not value:
            raise _SyntaxError("Missing argument" if self.at_end() else what)
        return value

    def one_of(self, known: Collection[str], what: str) -> str:
        """An atom among ``known`` (upper-case names), case-insensitively: ``Invalid <what>``
        when no atom stands here, ``Unknown <what>`` for another one."""
        name = self.atom(f"Invalid {what}").decode("ascii").upper()
        if name not in known:
            raise _SyntaxError(f"Unknown {what}")
        return name

    def word(self, allowed: frozenset[int], what: str) -> str:
        """A non-empty run of ``allowed`` bytes, upper-cased."""
        value = self.run(allowed)
        if not value:
            raise _SyntaxError("Missing argument" if self.at_end() else what)
        return value.decode("ascii").upper()

    def _digits(self, what: str, maximum: int) -> bytes:
        """The digits of an unsigned ``what`` of at most ``maximum``; more digits than
        ``maximum`` has are refused before ``int`` reads them."""
        digits = self.run(_DIGITS)
        if not digits:
            raise _SyntaxError(f"Expected a {what}")
        if len(digits) > len(str(maximum)) or int(digits) > maximum:
            raise _SyntaxError(f"{what.capitalize()} out of range")
        return digits

    def number(self, nonzero: bool = False) -> int:
        """RFC 3501 §9 ``number`` / ``nz-number``: unsigned 32-bit."""
        digits = self._digits("number", c.MAX_NUMBER)
        value = int(digits)
        if nonzero and (value == 0 or digits[0] == 0x30):
            raise _SyntaxError("Expected a non-zero number")
        return value

    def modseq(self, *, allow_zero: bool = False) -> int:
        """RFC 7162 §7 ``mod-sequence-value`` (``mod-sequence-valzer`` if ``allow_zero``)."""
        value = int(self._digits("mod-sequence", c.MAX_MODSEQ))
        if value == 0 and not allow_zero:
            raise _SyntaxError("Expected a non-zero mod-sequence")
        return value

    def quoted(self) -> bytes:
        """``quoted`` with ``\\"`` and ``\\\\`` escapes. 8-bit bytes are tolerated (clients send
        UTF-8 there, RFC 6855 §3); NUL, CR and LF are not (RFC 3501 §9 TEXT-CHAR)."""
        start = self.pos
        self.expect(_DQUOTE, "Expected a quoted string")
        out = bytearray()
        text = self.text
        while True:
            if self.pos >= len(text):
                raise _SyntaxError("Unterminated quoted string")
            byte = text[self.pos]
            self.pos += 1
            if byte == _DQUOTE:
                break
            if byte == _BACKSLASH:
                escaped = self.peek()
                if escaped not in (_DQUOTE, _BACKSLASH):
                    raise _SyntaxError("Invalid escape in quoted string")
                out.append(escaped)
                self.pos += 1
            elif byte in (0x00, 0x0A, 0x0D):
                raise _SyntaxError("Invalid character in quoted string")
            else:
                out.append(byte)
        # A quoted string cannot continue across a literal (it would swallow the announcement).
        offsets = self.literal_offsets
        after = bisect.bisect_right(offsets, start)
        if after < len(offsets) and offsets[after] <= self.pos:
            raise _SyntaxError("Unterminated quoted string")
        return bytes(out)

    def literal(self) -> bytes:
        """``literal`` / non-synchronising literal: the octets read by the framing layer."""
        match = _MARKER.match(self.text, self.pos)
        if match is None:
            raise _SyntaxError("Invalid literal")
        self.pos = match.end()
        value = self.literals.get(self.pos)
        if value is None:
            raise _SyntaxError("Literal must end the line")
        return value

    def string(self) -> bytes:
        """RFC 3501 §9 ``string = quoted / literal``."""
        first = self.peek()
        if first == _DQUOTE:
            return self.quoted()
        if first == _LBRACE:
            return self.literal()
        raise _SyntaxError("Missing argument" if first < 0 else "Expected a string")

    def astring(self) -> bytes:
        """RFC 3501 §9 ``astring = 1*ASTRING-CHAR / string``."""
        if self.peek() in (_DQUOTE, _LBRACE):
            return self.string()
        value = self.run(_ASTRING_CHARS)
        if not value:
            raise _SyntaxError("Missing argument" if self.at_end() else "Expected a string")
        return value

    def nil_ahead(self) -> bool:
        """Whether the next token is the atom ``NIL`` (consumed if so)."""
        end = self.pos + 3
        if self.text[self.pos : end].upper() == b"NIL" and (
            end >= len(self.text) or self.text[end] not in _ATOM_CHARS
        ):
            self.pos = end
            return True
        return False

    def nstring(self) -> bytes | None:
        """RFC 3501 §9 ``nstring = string / nil``."""
        return None if self.nil_ahead() else self.string()

    def keyword_ahead(self, keyword: bytes) -> bool:
        """Whether the next atom is ``keyword`` (case-insensitive); consumed if so."""
        end = self.pos + len(keyword)
        if self.text[self.pos : end].upper() == keyword and (
            end >= len(self.text) or self.text[end] not in _ATOM_CHARS
        ):
            self.pos = end
            return True
        return False

    def paren_list(self, item: Callable[[], _T], allow_empty: bool = True) -> list[_T]:
        """``"(" [item *(SP item)] ")"``."""
        self.expect(_LPAREN, "Expected a parenthesised list")
        items: list[_T] = []
        if self.peek() == _RPAREN:
            if not allow_empty:
                raise _SyntaxError("Empty list")
        else:
            items.append(item())
            while self.peek() == _SP:
                self.pos += 1
                items.append(item())
        self.expect(_RPAREN, "Expected ')'")
        return items

    # -- IMAP data types

    def mailbox(self, *, new: bool = False) -> str:
        """RFC 3501 §9 ``mailbox``: modified UTF-7 decoded, ``INBOX`` case-normalised (§5.1).
        A name that cannot be decoded names no mailbox: NO [NONEXISTENT], or NO [CANNOT] for
        a name to be created (``new``)."""
        try:
            name = _decode_name(self.astring(), self.utf8)
        except _NameError as exc:
            if new:
                raise _NameError(exc.text, "CANNOT") from None
            raise
        return "INBOX" if name.upper() == "INBOX" else name

    def list_mailbox(self) -> str:
        """RFC 3501 §9 ``list-mailbox`` (wildcards ``%`` and ``*`` allowed unquoted)."""
        if self.peek() in (_DQUOTE, _LBRACE):
            return _decode_pattern(self.string(), self.utf8)
        raw = self.run(_LIST_CHARS)
        if not raw:
            raise _SyntaxError("Missing argument" if self.at_end() else "Invalid mailbox pattern")
        return _decode_pattern(raw, self.utf8)

    def sequence_set(self) -> c.SequenceSet:
        """RFC 3501 §9 ``sequence-set``, or ``$`` (RFC 5182 §3 ``seq-last-command``)."""
        if self.peek() == _DOLLAR:
            self.pos += 1
            return c.SAVED_RESULT
        raw = self.run(_SEQ_CHARS)
        if not raw:
            raise _SyntaxError("Missing argument" if self.at_end() else "Invalid sequence set")
        try:
            return c.SequenceSet.parse(raw.decode("ascii"))
        except ValueError:
            raise _SyntaxError("Invalid sequence set") from None

    def flag(self) -> str:
        """RFC 3501 §9 ``flag``: ``\\`` atom (system flags canonicalised) or a keyword atom."""
        if self.peek() == _BACKSLASH:
            self.pos += 1
            name = "\\" + self.atom("Invalid flag").decode("ascii")
            return _CANONICAL_FLAGS.get(name.upper(), name)
        return self.atom("Invalid flag").decode("ascii")

    def flag_list(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.paren_list(self.flag)))


def _decode_name(raw: bytes, utf8: bool = False) -> str:
    """A mailbox name: modified UTF-7 (RFC 3501 §5.1.3), or UTF-8 once IMAP4rev2 is enabled
    (RFC 9051 §5.1: ``&`` is then only itself)."""
    if utf8:
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _NameError("No such mailbox (invalid UTF-8)", "NONEXISTENT") from None
    elif not raw.isascii():  # 8-bit in a string: outside the grammar (RFC 3501 §9 CHAR)
        raise _SyntaxError("Invalid mailbox name")
    else:
        try:
            name = c.decode_mailbox_name(raw)
        except ValueError:
            raise _NameError("No such mailbox (invalid name)", "NONEXISTENT") from None
    if any(ord(ch) < 0x20 or 0x7F <= ord(ch) < 0xA0 for ch in name):
        raise _NameError("No such mailbox (invalid name)", "NONEXISTENT")
    return name


def _decode_pattern(raw: bytes, utf8: bool = False) -> str:
    """A LIST/LSUB reference or pattern: decoded like a name; one that is not valid modified
    UTF-7 (or UTF-8) is kept as its characters (it then matches no stored name, and LIST
    answers an empty list as for any pattern that matches nothing)."""
    try:
        return _decode_name(raw, utf8)
    except _NameError:
        return raw.decode("utf-8" if utf8 else "ascii", "replace")


# -- command handlers: each reads the arguments after the command name (no trailing check)


_NoArgumentCommand = (
    c.Capability | c.Noop | c.Logout | c.StartTls | c.Check | c.Close | c.Unselect | c.Idle
    | c.Namespace
)


def _no_arguments(cls: type[_NoArgumentCommand]) -> Callable[[_Reader, str, bool], c.Command]:
    def handler(reader: _Reader, tag: str, uid: bool) -> c.Command:
        return cls(tag)

    return handler


def _authenticate(reader: _Reader, tag: str, uid: bool) -> c.Command:
    reader.sp()
    mechanism = reader.atom("Invalid mechanism").decode("ascii").upper()
    initial: bytes | None = None
    if not reader.at_end():
        reader.sp()
        raw = reader.atom("Invalid initial response")
        if raw == b"=":  # RFC 4959 §3: "=" is an empty initial response
            initial = b""
        else:
            if len(raw) % 4:
                raise _SyntaxError("Invalid BASE64")
            try:
                initial = base64.b64decode(raw, validate=True)
            except binascii.Error:
                raise _SyntaxError("Invalid BASE64") from None
    return c.Authenticate(tag, mechanism, initial)


def _login(reader: _Reader, tag: str, uid: bool) -> c.Command:
    reader.sp()
    raw_user = reader.astring()
    reader.sp()
    password = reader.astring()
    try:
        user = raw_user.decode("utf-8")
    except UnicodeDecodeError:
        raise _SyntaxError("Invalid user name") from None
    return c.Login(tag, user, password)


def _select(readonly: bool) -> Callable[[_Reader, str, bool], c.Command]:
    def handler(reader: _Reader, tag: str, uid: bool) -> c.Command:
        reader.sp()
        mailbox = reader.mailbox()
        condstore = False
        qresync: c.QResync | None = None
        if not reader.at_end():
            # RFC 4466 §2.1 select-params: CONDSTORE (RFC 7162 §3.1.8), QRESYNC (§3.2.5)
            reader.sp()
            params = _modifiers(reader, "SELECT parameter",
                                {"CONDSTORE": None, "QRESYNC": _qresync_param})
            condstore = "CONDSTORE" in params
            qresync = params.get("QRESYNC")
        return c.Select(tag, mailbox, readonly, condstore, qresync)

    return handler


def _modifiers(reader: _Reader, what: str,
               values: dict[str, Callable[[_Reader], _T] | None]) -> dict[str, _T | None]:
    """RFC 4466 ``"(" name [SP value] *(SP name [SP value]) ")"`` (select-params, fetch- and
    store-modifiers): the names found, each known by ``values``, which reads its value (None:
    the name takes none, and maps to None). A name given again keeps its last value."""
    found: dict[str, _T | None] = {}

    def modifier() -> None:
        name = reader.atom(f"Invalid {what}").decode("ascii").upper()
        if name not in values:
            raise _SyntaxError(f"Unknown {what}")
        read = values[name]
        if read is None:
            found[name] = None
        else:
            reader.sp()
            found[name] = read(reader)

    reader.paren_list(modifier, allow_empty=False)
    return found


def _changedsince(reader: _Reader) -> int:
    """The value of CHANGEDSINCE and UNCHANGEDSINCE (RFC 7162 §3.1.3-3.1.4): 0 allowed."""
    return reader.modseq(allow_zero=True)


def _qresync_param(reader: _Reader) -> c.QResync:
    """``(uidvalidity mod-sequence-value [SP known-uids] [SP seq-match-data])``."""
    reader.expect(_LPAREN, "Expected '('")
    uidvalidity = reader.number(nonzero=True)
    reader.sp()
    modseq = reader.modseq()
    known: c.SequenceSet | None = None
    match: tuple[c.SequenceSet, c.SequenceSet] | None = None
    if reader.peek() == _SP:
        reader.pos += 1
        if reader.peek() != _LPAREN:
            known = reader.sequence_set()
            if reader.peek() == _SP:
                reader.pos += 1
        if reader.peek() == _LPAREN:
            reader.pos += 1
            seqs = reader.sequence_set()
            reader.sp()
            uids = reader.sequence_set()
            reader.expect(_RPAREN, "Expected ')'")
            match = (seqs, uids)
    reader.expect(_RPAREN, "Expected ')'")
    return c.QResync(uidvalidity, modseq, known, match)


def _special_use_attr(reader: _Reader) -> str:
    reader.expect(_BACKSLASH, "Invalid special-use attribute")
    name = "\\" + reader.atom("Invalid special-use attribute").decode("ascii")
    return _SPECIAL_USE.get(name.upper(), name)


def _create(reader: _Reader, tag: str, uid: bool) -> c.Command:
    reader.sp()
    mailbox = reader.mailbox(new=True)
    special_use: list[str] = []
    if not reader.at_end():
        reader.sp()

        def create_param() -> None:
            # RFC 6154 §3: create-param = "USE" SP "(" [use-attr *(SP use-attr)] ")"
            if not reader.keyword_ahead(b"USE"):
                raise _SyntaxError("Unsupported CREATE parameter")
            reader.sp()
            special_use.extend(reader.paren_list(lambda: _special_use_attr(reader)))

        reader.paren_list(create_param, allow_empty=False)
    return c.Create(tag, mailbox, tuple(dict.fromkeys(special_use)))


def _one_mailbox(
    cls: type[c.Delete | c.Subscribe | c.Unsubscribe],
) -> Callable[[_Reader, str, bool], c.Command]:
    def handler(reader: _Reader, tag: str, uid: bool) -> c.Command:
        reader.sp()
        return cls(tag, reader.mailbox())

    return handler


def _rename(reader: _Reader, tag: str, uid: bool) -> c.Command:
    reader.sp()
    old = reader.mailbox()
    reader.sp()
    return c.Rename(tag, old, reader.mailbox(new=True))


def _list(reader: _Reader, tag: str, uid: bool) -> c.Command:
    # RFC 5258 §3: LIST [SP list-select-opts] SP mailbox SP mbox-or-pat [SP list-return-opts]
    reader.sp()
    selection: list[str] = []
    extended = reader.peek() == _LPAREN
    if extended:
        selection = reader.paren_list(lambda: reader.one_of(_LIST_SELECTION, "LIST option"))
        reader.sp()
        # RFC 5258 §3.1: RECURSIVEMATCH needs a selection option it can apply to
        if "RECURSIVEMATCH" in selection and not set(selection) - {"RECURSIVEMATCH", "REMOTE"}:
            raise _SyntaxError("RECURSIVEMATCH needs another selection option")
    reference = _decode_pattern(reader.astring())
    reader.sp()
    if reader.peek() == _LPAREN:
        extended = True
        patterns = reader.paren_list(reader.list_mailbox, allow_empty=False)
    else:
        patterns = [reader.list_mailbox()]
    returns: list[str] = []
    status_items: list[str] = []

    def return_option() -> str:
        option = reader.one_of(_LIST_RETURN, "LIST option")
        if option == "STATUS":  # RFC 5819 §4: "STATUS" SP "(" status-att *(SP status-att) ")"
            if status_items:
                raise _SyntaxError("STATUS given twice")
            reader.sp()
            status_items.extend(reader.paren_list(
                lambda: reader.one_of(_STATUS_ITEMS, "STATUS item"), False))
        return option

    if not reader.at_end():
        reader.sp()
        if not reader.keyword_ahead(b"RETURN"):
            raise _SyntaxError("Unexpected extra arguments")
        reader.sp()
        extended = True
        returns = reader.paren_list(return_option)
    return c.List(
        tag,
        reference,
        tuple(patterns),
        tuple(dict.fromkeys(selection)),
        tuple(dict.fromkeys(returns)),
        tuple(dict.fromkeys(status_items)),
        extended,
    )


def _lsub(reader: _Reader, tag: str, uid: bool) -> c.Command:
    reader.sp()
    reference = _decode_pattern(reader.astring())
    reader.sp()
    return c.Lsub(tag, reference, reader.list_mailbox())


def _status(reader: _Reader, tag: str, uid: bool) -> c.Command:
    reader.sp()
    mailbox = reader.mailbox()
    reader.sp()
    items = reader.paren_list(lambda: reader.one_of(_STATUS_ITEMS, "STATUS item"),
                              allow_empty=False)
    return c.Status(tag, mailbox, tuple(dict.fromkeys(items)))


def _date_time(raw: bytes) -> datetime:
    """RFC 3501 §9 ``date-time``: ``dd-Mon-yyyy hh:mm:ss +zzzz`` (day may be space-padded)."""
    match = _DATE_TIME.fullmatch(raw)
    if match is None:
        raise _SyntaxError("Invalid date-time")
    day, month_name, year, hour, minute, second, sign, zone_h, zone_m = match.groups()
    month = _MONTHS.get(month_name.decode("ascii").upper())
    if month is None or int(zone_m) > 59:
        raise _SyntaxError("Invalid date-time")
    offset = timedelta(hours=int(zone_h), minutes=int(zone_m))
    try:
        return datetime(
            int(year),
            month,
            int(day),
            int(hour),
            int(minute),
            int(second),
            tzinfo=timezone(-offset if sign == b"-" else offset),
        )
    except ValueError:
        raise _SyntaxError("Invalid date-time") from None


def _append(reader: _Reader, tag: str, uid: bool) -> c.Command:
    # RFC 3501 §6.3.11: APPEND SP mailbox [SP flag-list] [SP date-time] SP literal
    reader.sp()
    mailbox = reader.mailbox()
    reader.sp()
    flags: tuple[str, ...] = ()
    when: datetime | None = None
    if reader.peek() == _LPAREN:
        flags = reader.flag_list()
        reader.sp()
    if reader.peek() == _DQUOTE:
        when = _date_time(reader.quoted())
        reader.sp()
    binary = reader.peek() == _TILDE  # RFC 3516 §4.4 literal8: "~{" number "}"
    if binary:
        reader.pos += 1
    if reader.peek() != _LBRACE:
        raise _SyntaxError("Expected a literal message")
    return c.Append(tag, mailbox, flags, when, reader.literal(), binary)


def _expunge(reader: _Reader, tag: str, uid: bool) -> c.Command:
    if not uid:
        return c.Expunge(tag)
    reader.sp()  # RFC 4315 §2.1: UID EXPUNGE sequence-set
    return c.Expunge(tag, reader.sequence_set())


def _section(reader: _Reader) -> c.Section:
    """RFC 3501 §9 ``section``, the opening bracket already consumed."""
    part: list[int] = []
    need_text = False
    while reader.peek() in _DIGITS:
        part.append(reader.number(nonzero=True))
        need_text = False
        if reader.peek() != _DOT:
            break
        reader.pos += 1
        need_text = True
    text: c.SectionText | None = None
    fields: list[str] = []
    if need_text or (reader.peek() != _RBRACKET and not part):
        text = _SECTION_TEXTS.get(reader.word(_SECTION_TEXT_CHARS, "Invalid section"))
        if text is None or (text == "MIME" and not part):
            raise _SyntaxError("Invalid section")
        if text in ("HEADER.FIELDS", "HEADER.FIELDS.NOT"):
            reader.sp()
            fields = reader.paren_list(lambda: _field_name(reader), allow_empty=False)
    reader.expect(_RBRACKET, "Invalid section")
    return c.Section(tuple(part), text, tuple(fields))


_SECTION_TEXTS: dict[str, c.SectionText] = {
    "HEADER": "HEADER",
    "HEADER.FIELDS": "HEADER.FIELDS",
    "HEADER.FIELDS.NOT": "HEADER.FIELDS.NOT",
    "TEXT": "TEXT",
    "MIME": "MIME",
}


def _field_name(reader: _Reader) -> str:
    raw = reader.astring()
    if not raw or any(b not in _FIELD_NAME_CHARS for b in raw):
        raise _SyntaxError("Invalid header field name")
    return raw.decode("ascii")


def _section_binary(reader: _Reader) -> c.Section:
    """RFC 3516 §6 ``section-binary = "[" [section-part] "]"``, the bracket consumed."""
    part: list[int] = []
    if reader.peek() != _RBRACKET:
        part.append(reader.number(nonzero=True))
        while reader.peek() == _DOT:
            reader.pos += 1
            part.append(reader.number(nonzero=True))
    reader.expect(_RBRACKET, "Invalid binary section")
    return c.Section(tuple(part))


def _partial(reader: _Reader) -> tuple[int, int] | None:
    """``"<" number "." nz-number ">"`` after a section, if there."""
    if reader.peek() != _LT:
        return None
    reader.pos += 1
    origin = reader.number()
    reader.expect(_DOT, "Invalid partial range")
    length = reader.number(nonzero=True)
    reader.expect(0x3E, "Invalid partial range")
    return origin, length


def _fetch_attr(reader: _Reader, top_level: bool) -> tuple[c.FetchAttr, ...]:
    name = reader.word(_FETCH_NAME_CHARS, "Invalid FETCH item")
    if top_level and name in c.FETCH_MACROS:
        return c.FETCH_MACROS[name]
    base = name.removesuffix(".PEEK")
    if base in c.BINARY_NAMES and name != "BINARY.SIZE.PEEK":
        # RFC 3516 §6: BINARY[.PEEK] section-binary [partial], BINARY.SIZE section-binary
        reader.expect(_LBRACKET, "Expected a binary section")
        section = _section_binary(reader)
        partial = _partial(reader) if base == "BINARY" else None
        return (c.FetchAttr(base, section, partial, peek=name.endswith(".PEEK")),)
    if name in ("BODY", "BODY.PEEK") and reader.peek() == _LBRACKET:
        reader.pos += 1
        section = _section(reader)
        return (c.FetchAttr("BODY", section, _partial(reader), peek=name == "BODY.PEEK"),)
    if name not in c.FETCH_NAMES:
        raise _SyntaxError("Unknown FETCH item")
    return (c.FetchAttr(name),)


def _fetch(reader: _Reader, tag: str, uid: bool) -> c.Command:
    reader.sp()
    seq_set = reader.sequence_set()
    reader.sp()
    attrs: list[c.FetchAttr] = []
    if reader.peek() == _LPAREN:
        for group in reader.paren_list(lambda: _fetch_attr(reader, False), allow_empty=False):
            attrs.extend(group)
    else:
        attrs.extend(_fetch_attr(reader, True))
    changedsince: int | None = None
    vanished = False
    if not reader.at_end():
        # RFC 4466 §2.4 fetch-modifiers: CHANGEDSINCE (RFC 7162 §3.1.4.1), VANISHED (§3.2.6)
        reader.sp()
        modifiers = _modifiers(reader, "FETCH modifier",
                               {"CHANGEDSINCE": _changedsince, "VANISHED": None})
        changedsince = modifiers.get("CHANGEDSINCE")
        vanished = "VANISHED" in modifiers
        if vanished and (not uid or changedsince is None):
            raise _SyntaxError("VANISHED needs UID FETCH with CHANGEDSINCE")
    return c.Fetch(tag, seq_set, tuple(dict.fromkeys(attrs)), uid, changedsince, vanished)


def _store(reader: _Reader, tag: str, uid: bool) -> c.Command:
    # RFC 3501 §9: store-att-flags = (["+" / "-"] "FLAGS" [".SILENT"]) SP
    #                                (flag-list / (flag *(SP flag)))
    reader.sp()
    seq_set = reader.sequence_set()
    reader.sp()
    unchangedsince: int | None = None
    if reader.peek() == _LPAREN:
        # RFC 4466 §2.5 store-modifiers: UNCHANGEDSINCE (RFC 7162 §3.1.3)
        unchangedsince = _modifiers(reader, "STORE modifier",
                                    {"UNCHANGEDSINCE": _changedsince}).get("UNCHANGEDSINCE")
        reader.sp()
    item = reader.word(_STORE_ITEM_CHARS, "Invalid STORE item")
    silent = item.endswith(".SILENT")
    base = item.removesuffix(".SILENT")
    try:
        mode = c.StoreMode(base)
    except ValueError:
        raise _SyntaxError("Invalid STORE item") from None
    reader.sp()
    if reader.peek() == _LPAREN:
        flags = reader.flag_list()
    else:
        found = [reader.flag()]
        while reader.peek() == _SP:
            reader.pos += 1
            found.append(reader.flag())
        flags = tuple(dict.fromkeys(found))
    return c.Store(tag, seq_set, mode, silent, flags, uid, unchangedsince)


def _copy_or_move(cls: type[c.Copy | c.Move]) -> Callable[[_Reader, str, bool], c.Command]:
    def handler(reader: _Reader, tag: str, uid: bool) -> c.Command:
        reader.sp()
        seq_set = reader.sequence_set()
        reader.sp()
        return cls(tag, seq_set, reader.mailbox(), uid)

    return handler


def _enable(reader: _Reader, tag: str, uid: bool) -> c.Command:
    capabilities = []
    reader.sp()
    capabilities.append(reader.atom("Invalid capability").decode("ascii").upper())
    while not reader.at_end():
        reader.sp()
        capabilities.append(reader.atom("Invalid capability").decode("ascii").upper())
    return c.Enable(tag, tuple(dict.fromkeys(capabilities)))


#: RFC 2971 §3.3 limits on ID parameters.
_ID_MAX_PAIRS, _ID_MAX_FIELD, _ID_MAX_VALUE = 30, 30, 1024


def _id(reader: _Reader, tag: str, uid: bool) -> c.Command:
    reader.sp()
    if reader.nil_ahead():
        return c.Id(tag, None)
    params: dict[str, str | None] = {}

    def pair() -> None:
        key = reader.string()
        reader.sp()
        value = reader.nstring()
        if len(key) > _ID_MAX_FIELD or (value is not None and len(value) > _ID_MAX_VALUE):
            raise _SyntaxError("ID parameter too long")
        params[key.decode("utf-8", "replace")] = (
            None if value is None else value.decode("utf-8", "replace")
        )

    pairs = reader.paren_list(pair)
    if len(pairs) > _ID_MAX_PAIRS:
        raise _SyntaxError("Too many ID parameters")
    return c.Id(tag, params)


# -- SEARCH


class _SearchParser:
    """RFC 3501 §6.4.4 search keys; strings decoded with the command's charset."""

    def __init__(self, reader: _Reader, charset: str | None) -> None:
        self.reader = reader
        self.codec = "ascii" if charset == "US-ASCII" else "utf-8"

    def string(self) -> str:
        try:
            return self.reader.astring().decode(self.codec)
        except UnicodeDecodeError:
            raise _SyntaxError("Invalid characters for charset") from None

    def date(self) -> date:
        raw = self.reader.quoted() if self.reader.peek() == _DQUOTE else self.reader.atom()
        match = _DATE.fullmatch(raw)
        month = None if match is None else _MONTHS.get(match[2].decode("ascii").upper())
        if match is None or month is None:
            raise _SyntaxError("Invalid date")
        try:
            return date(int(match[3]), month, int(match[1]))
        except ValueError:
            raise _SyntaxError("Invalid date") from None

    def keys(self) -> c.SearchKey:
        """``search-key *(SP search-key)`` up to the end of the command."""
        keys = [self.key(0)]
        while not self.reader.at_end():
            self.reader.sp()
            keys.append(self.key(0))
        return keys[0] if len(keys) == 1 else c.SearchAnd(tuple(keys))

    def key(self, depth: int) -> c.SearchKey:
        if depth > MAX_SEARCH_DEPTH:
            raise _SyntaxError("Search too deeply nested")
        reader = self.reader
        first = reader.peek()
        if first == _LPAREN:
            keys = reader.paren_list(lambda: self.key(depth + 1), allow_empty=False)
            return keys[0] if len(keys) == 1 else c.SearchAnd(tuple(keys))
        if first in _SEQ_CHARS or first == _DOLLAR:
            return c.SearchSet(reader.sequence_set())
        name = reader.atom("Invalid search key").decode("ascii").upper()
        simple = _SIMPLE_SEARCH_KEYS.get(name)
        if simple is not None:
            return simple
        if name in _FLAG_SEARCH_KEYS:
            return c.SearchFlag(*_FLAG_SEARCH_KEYS[name])
        reader.sp()
        if name in ("BCC", "CC", "FROM", "SUBJECT", "TO"):
            return c.SearchHeader(name.lower(), self.string())
        if name == "HEADER":
            field_name = _field_name(reader).lower()
            reader.sp()
            return c.SearchHeader(field_name, self.string())
        if name == "BODY":
            return c.SearchBody(self.string())
        if name == "TEXT":
            return c.SearchText(self.string())
        if name in ("KEYWORD", "UNKEYWORD"):
            keyword = reader.atom("Invalid keyword").decode("ascii")
            return c.SearchFlag(keyword, name == "KEYWORD")
        if name in ("BEFORE", "ON", "SINCE"):
            return c.SearchInternalDate(c.DateRelation(name), self.date())
        if name in ("SENTBEFORE", "SENTON", "SENTSINCE"):
            return c.SearchSentDate(c.DateRelation(name.removeprefix("SENT")), self.date())
        if name == "LARGER":
            return c.SearchLarger(reader.number())
        if name == "SMALLER":
            return c.SearchSmaller(reader.number())
        if name == "UID":
            return c.SearchSet(reader.sequence_set(), uid=True)
        if name == "MODSEQ":
            if reader.peek() == _DQUOTE:  # entry-name entry-type-req: one mod-sequence here
                reader.quoted()
                reader.sp()
                entry_type = reader.atom("Invalid entry type").decode("ascii").lower()
                if entry_type not in ("priv", "shared", "all"):
                    raise _SyntaxError("Invalid entry type")
                reader.sp()
            return c.SearchModseq(reader.modseq(allow_zero=True))
        if name == "NOT":
            return c.SearchNot(self.key(depth + 1))
        if name == "OR":
            left = self.key(depth + 1)
            reader.sp()
            return c.SearchOr(left, self.key(depth + 1))
        raise _SyntaxError("Unknown search key")


_SIMPLE_SEARCH_KEYS: dict[str, c.SearchKey] = {
    "ALL": c.SearchAll(),
    "NEW": c.SearchAnd((c.SearchFlag("\\Recent", True), c.SearchFlag("\\Seen", False))),
    "OLD": c.SearchFlag("\\Recent", False),
}
_FLAG_SEARCH_KEYS: dict[str, tuple[str, bool]] = {
    **{flag.upper()[1:]: (flag, True) for flag in c.SYSTEM_FLAGS},
    **{"UN" + flag.upper()[1:]: (flag, False) for flag in c.SYSTEM_FLAGS if flag != "\\Recent"},
}


#: RFC 4731 §3.1 search-return-opts, SAVE of RFC 5182 §2.1.
_SEARCH_RETURN = frozenset({"MIN", "MAX", "ALL", "COUNT", "SAVE"})


def _search(reader: _Reader, tag: str, uid: bool) -> c.Command | c.InvalidCommand:
    reader.sp()
    returns: tuple[str, ...] | None = None
    if reader.keyword_ahead(b"RETURN"):  # RFC 4731 §3.1: ESEARCH
        reader.sp()
        returns = tuple(dict.fromkeys(reader.paren_list(
            lambda: reader.one_of(_SEARCH_RETURN, "RETURN option")))) or ("ALL",)
        reader.sp()
    charset: str | None = None
    if reader.keyword_ahead(b"CHARSET"):
        reader.sp()
        charset = reader.astring().decode("ascii", "replace").upper()
        if charset not in c.SEARCH_CHARSETS:
            return _bad_charset(tag)
        reader.sp()
    criteria = _SearchParser(reader, charset).keys()
    return c.Search(tag, charset, criteria, uid, returns)


def _charset_and_keys(reader: _Reader, tag: str) -> tuple[str, c.SearchKey] | c.InvalidCommand:
    """SORT and THREAD: a charset (required, RFC 5256 §3), then search keys."""
    charset = reader.astring().decode("ascii", "replace").upper()
    if charset not in c.SEARCH_CHARSETS:
        return _bad_charset(tag)
    reader.sp()
    return charset, _SearchParser(reader, charset).keys()


def _bad_charset(tag: str) -> c.InvalidCommand:
    """SEARCH, SORT and THREAD with a charset we do not search in (RFC 3501 §6.4.4)."""
    return c.InvalidCommand(tag, "Unsupported charset", status="NO",
                          code="BADCHARSET (" + " ".join(c.SEARCH_CHARSETS) + ")")


def _sort(reader: _Reader, tag: str, uid: bool) -> c.Command | c.InvalidCommand:
    """RFC 5256 §5: ``SORT SP sort-criteria SP search-criteria`` where search-criteria is
    ``charset 1*(SP search-key)`` (the charset is not optional here)."""
    reader.sp()

    def criterion() -> tuple[str, bool]:  # sort-criterion = ["REVERSE" SP] sort-key
        reverse = reader.keyword_ahead(b"REVERSE")
        if reverse:
            if reader.peek() != _SP:
                raise _SyntaxError("REVERSE needs a sort key")
            reader.sp()
        return reader.one_of(c.SORT_KEYS, "sort criterion"), reverse

    keys = reader.paren_list(criterion, allow_empty=False)
    reader.sp()
    found = _charset_and_keys(reader, tag)
    if isinstance(found, c.InvalidCommand):
        return found
    charset, criteria = found
    return c.Sort(tag, tuple(keys), charset, criteria, uid)


def _thread(reader: _Reader, tag: str, uid: bool) -> c.Command | c.InvalidCommand:
    """RFC 5256 §5: ``THREAD SP thread-alg SP search-criteria``."""
    reader.sp()
    algorithm = reader.one_of(c.THREAD_ALGORITHMS, "threading algorithm")
    reader.sp()
    found = _charset_and_keys(reader, tag)
    if isinstance(found, c.InvalidCommand):
        return found
    charset, criteria = found
    return c.Thread(tag, algorithm, charset, criteria, uid)


_Handler = Callable[[_Reader, str, bool], c.Command | c.InvalidCommand]

_HANDLERS: dict[str, _Handler] = {
    "CAPABILITY": _no_arguments(c.Capability),
    "NOOP": _no_arguments(c.Noop),
    "LOGOUT": _no_arguments(c.Logout),
    "STARTTLS": _no_arguments(c.StartTls),
    "AUTHENTICATE": _authenticate,
    "LOGIN": _login,
    "SELECT": _select(readonly=False),
    "EXAMINE": _select(readonly=True),
    "CREATE": _create,
    "DELETE": _one_mailbox(c.Delete),
    "RENAME": _rename,
    "SUBSCRIBE": _one_mailbox(c.Subscribe),
    "UNSUBSCRIBE": _one_mailbox(c.Unsubscribe),
    "LIST": _list,
    "LSUB": _lsub,
    "STATUS": _status,
    "APPEND": _append,
    "CHECK": _no_arguments(c.Check),
    "CLOSE": _no_arguments(c.Close),
    "UNSELECT": _no_arguments(c.Unselect),
    "EXPUNGE": _expunge,
    "SEARCH": _search,
    "SORT": _sort,
    "THREAD": _thread,
    "FETCH": _fetch,
    "STORE": _store,
    "COPY": _copy_or_move(c.Copy),
    "MOVE": _copy_or_move(c.Move),
    "IDLE": _no_arguments(c.Idle),
    "NAMESPACE": _no_arguments(c.Namespace),
    "ENABLE": _enable,
    "ID": _id,
}

#: Commands accepted after the ``UID`` prefix (RFC 3501 §6.4.8, RFC 4315 §2.1, RFC 6851 §3).
_UID_COMMANDS = frozenset({"FETCH", "STORE", "COPY", "MOVE", "SEARCH", "EXPUNGE", "SORT",
                           "THREAD"})
_KNOWN_NAMES = frozenset(_HANDLERS) | {"UID " + name for name in _UID_COMMANDS}


#: The start of a SEARCH whose RETURN options name SAVE (RFC 5182 §2.1), found in a command
#: the grammar refused: no nesting, no backtracking (``[^()]*`` stops at the first paren).
_SEARCH_SAVE = re.compile(rb"[^ ]* (?:UID )?SEARCH RETURN \(([^()]*)\)", re.IGNORECASE)


def _saves(text: bytes) -> bool:
    """Whether ``text``, a command, is a SEARCH with RETURN (... SAVE ...): a cheap scan for a
    command the grammar refused, whose failure must still empty ``$`` (RFC 5182 §2.1)."""
    found = _SEARCH_SAVE.match(text)
    return found is not None and b"SAVE" in found[1].upper().split()


def parse_command(tag: str, text: bytes, literals: dict[int, bytes],
                  utf8_names: bool = False) -> c.Command | c.InvalidCommand:
    """Parse one assembled command (RFC 3501 §9 ``command``); never raises.

    ``text`` is the command's lines joined without their CRLF, starting with the tag; ``literals``
    maps the offset just after each ``{n}`` announcement in ``text`` to the literal's octets.
    ``utf8_names``: mailbox names are UTF-8 (RFC 9051 §5.1), not modified UTF-7. A refused
    SEARCH ... RETURN (SAVE) says so (``saves``): the session empties ``$``.
    """
    command = _parse_command(tag, text, literals, utf8_names)
    if isinstance(command, c.InvalidCommand) and _saves(text):
        return dataclasses.replace(command, saves=True)
    return command


def _parse_command(tag: str, text: bytes, literals: dict[int, bytes],
                   utf8_names: bool) -> c.Command | c.InvalidCommand:
    reader = _Reader(text, literals, utf8_names)
    reader.pos = len(tag)
    try:
        reader.sp()
        name = reader.atom("Invalid command name").decode("ascii").upper()
        uid = name == "UID"
        if uid:
            reader.sp()
            name = reader.atom("Invalid command name").decode("ascii").upper()
            if name not in _UID_COMMANDS:
                return c.InvalidCommand(tag, "Unknown UID command")
        handler = _HANDLERS.get(name)
        if handler is None:
            return c.InvalidCommand(tag, "Unknown command")
        command = handler(reader, tag, uid)
        if isinstance(command, c.InvalidCommand):
            return command
        if not reader.at_end():
            raise _SyntaxError("Unexpected extra arguments")
        return command
    except _NameError as exc:
        return c.InvalidCommand(tag, exc.text, "NO", exc.code)
    except _SyntaxError as exc:
        return c.InvalidCommand(tag, exc.text)
    except (ValueError, RecursionError):  # defensive: never let a parse error escape
        return c.InvalidCommand(tag, "Invalid command syntax")


# --------------------------------------------------------------------------- framing


class _State(enum.Enum):
    LINE = enum.auto()  # reading a command line, a continuation line or a raw line
    LITERAL = enum.auto()  # reading the octets of an accepted literal
    DRAIN_LINE = enum.auto()  # discarding the rest of a refused line / command
    DRAIN_LITERAL = enum.auto()  # discarding a refused non-synchronising literal


#: Compact ``bytearray`` buffers once this many consumed bytes precede the read position.
_COMPACT_THRESHOLD = 64 * 1024


class CommandParser:
    """Incremental, sans-IO parser of the client side of an IMAP4rev1 connection.

    Feed it bytes with :meth:`feed`; call :meth:`next_event` until it returns ``None`` (more bytes
    needed). Events are the command dataclasses of :mod:`imap_store.imap.commands`,
    :class:`~imap_store.imap.commands.InvalidCommand`, :class:`NeedContinuation`,
    :class:`LiteralTooLarge`, :class:`LineTooLong` and :class:`RawLine`. Nothing is parsed ahead of
    the event returned, so the edge may change the parser's mode (:meth:`expect_line`) or limits
    between two events.
    """

    def __init__(
        self,
        max_line: int = DEFAULT_MAX_LINE,
        max_literal: int = DEFAULT_MAX_LITERAL,
        max_command: int = DEFAULT_MAX_COMMAND,
        defer_large: bool = False,
    ) -> None:
        if max_line < 1 or max_literal < 0 or max_command < 1:
            raise ValueError("invalid parser limits")
        self.max_line = max_line
        self.max_literal = max_literal
        self.max_command = max_command
        #: Large commands come back as ``ParseLater`` instead of parsed.
        self.defer_large = defer_large
        #: Mailbox names in UTF-8 (the session enabled IMAP4rev2, RFC 9051 §5.1); public like
        #: the limits: the edge sets it from the session before each command.
        self.utf8_names = False
        self._buf = bytearray()
        self._pos = 0  # read position in _buf
        self._scan = 0  # CRLF search resumes at _pos + _scan
        self._state = _State.LINE
        self._raw = False
        self._awaiting_literal = False
        # The command being assembled.
        self._lines: list[bytes] = []
        self._literals: dict[int, bytes] = {}
        self._text_len = 0
        self._size = 0
        self._tag: str | None = None
        self._name = ""
        # Literal being read / data being drained.
        self._literal = bytearray()
        self._remaining = 0
        self._drain_marker: bytes | None = None

    # -- public API

    def feed(self, data: bytes | memoryview) -> None:
        """Append bytes received from the client (any split, even one byte at a time)."""
        self._buf += data

    def expect_line(self) -> None:
        """Read the next line verbatim as a :class:`RawLine` (once): a SASL response after
        ``+`` (RFC 3501 §6.2.2) or ``DONE`` ending IDLE (RFC 2177 §3).

        Only valid between commands, i.e. right after the AUTHENTICATE/IDLE event (or a previous
        RawLine), or after a ``LineTooLong`` (the line after the over-long one is then raw).
        An over-long raw line is reported as ``LineTooLong(None)``.
        """
        if self._lines or self._state not in (_State.LINE, _State.DRAIN_LINE):
            raise RuntimeError("expect_line() called in the middle of a command")
        self._raw = True

    def unread(self, line: bytes) -> None:
        """Put a line read as a :class:`RawLine` back in front of the input, to be read as a
        command (the session expected ``DONE`` after an IDLE it already ended, and got a
        command instead)."""
        if self._lines or self._state is not _State.LINE:
            raise RuntimeError("unread() called in the middle of a command")
        self._buf[self._pos : self._pos] = line + b"\r\n"
        self._scan = 0

    def reject_literal(self) -> None:
        """Refuse the synchronising literal just announced by :class:`NeedContinuation`.

        The edge sends a tagged NO/BAD instead of ``+``; the client then does not send the
        literal (RFC 3501 §7.5), so the parser drops the command and waits for a new one.
        """
        if not self._awaiting_literal or self._literal:
            raise RuntimeError("reject_literal() without a pending NeedContinuation")
        self._reset_command()
        self._state = _State.LINE

    @property
    def literal_remaining(self) -> int:
        """How many of the bytes fed next belong to a literal (read or drained in bulk,
        cheaply) before lines (scanned one by one) come again; 0 while reading lines."""
        if self._state in (_State.LITERAL, _State.DRAIN_LITERAL):
            return max(0, self._remaining - self.buffered_bytes)
        return 0

    @property
    def buffered_bytes(self) -> int:
        """Bytes received but not yet consumed. Must be 0 when STARTTLS is accepted: data
        pipelined after STARTTLS in clear text must be discarded (RFC 3501 §6.2.1, §11.1)."""
        return len(self._buf) - self._pos

    def next_event(self) -> Event | ParseLater | None:
        """The next event, or ``None`` when more bytes must be fed. Never raises on bad input."""
        while True:
            state = self._state
            if state is _State.LINE:
                outcome = self._step_line()
            elif state is _State.LITERAL:
                outcome = self._step_literal()
            elif state is _State.DRAIN_LITERAL:
                outcome = self._step_drain_literal()
            else:
                outcome = self._step_drain_line()
            if outcome is not _PROGRESS:
                return outcome

    # -- buffer helpers

    def _consume(self, count: int) -> None:
        self._pos += count
        self._scan = 0
        if self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        elif self._pos >= _COMPACT_THRESHOLD and self._pos * 2 >= len(self._buf):
            del self._buf[: self._pos]
            self._pos = 0

    def _take(self, count: int) -> bytes:
        data = bytes(self._buf[self._pos : self._pos + count])
        self._consume(count)
        return data

    def _reset_command(self) -> None:
        self._lines = []
        self._literals = {}
        self._text_len = 0
        self._size = 0
        self._tag = None
        self._name = ""
        self._literal = bytearray()
        self._remaining = 0
        self._awaiting_literal = False

    # -- states

    def _step_line(self) -> Event | ParseLater | _Progress | None:
        buf = self._buf
        end = buf.find(b"\r\n", self._pos + self._scan)
        if end < 0:
            available = len(buf) - self._pos
            if available <= self.max_line + 1:  # a final CR may still be half of the CRLF
                self._scan = max(available - 1, 0)
                return None
            return self._line_overflow()
        if end - self._pos > self.max_line:
            return self._line_overflow()
        line = self._take(end - self._pos)
        self._consume(2)

        if self._raw:
            self._raw = False
            return RawLine(line)

        if not self._lines:  # first line of a command
            if not line:
                return _PROGRESS  # tolerate empty lines between commands
            tag, name = _split_first_line(line)
            rejection: c.InvalidCommand | None = None
            if tag is None:
                rejection = c.InvalidCommand(None, "Invalid tag")
            elif name is None:
                rejection = c.InvalidCommand(tag, "Missing command")
            elif name not in _KNOWN_NAMES:
                rejection = c.InvalidCommand(
                    tag, "Unknown UID command" if name.startswith("UID ") else "Unknown command"
                )
            if rejection is not None:
                return self._refuse(rejection, _literal_marker(line))
            assert tag is not None and name is not None
            self._tag, self._name = tag, name

        self._lines.append(line)
        self._text_len += len(line)
        self._size += len(line)
        marker = _literal_marker(line)
        if marker is None:
            return self._finish_command()
        size, synchronizing = marker
        if self._name == "APPEND":
            too_large = size > self.max_literal or self._size + size > (
                self.max_literal + self.max_command
            )
        else:
            too_large = self._size + size > self.max_command
        if too_large:
            return self._refuse(LiteralTooLarge(self._tag, size, synchronizing), marker)
        self._remaining = size
        self._literal = bytearray()
        self._state = _State.LITERAL
        if synchronizing:
            assert self._tag is not None
            self._awaiting_literal = True
            return NeedContinuation(self._tag, size, self._name)
        return _PROGRESS

    def _finish_command(self) -> Event | ParseLater:
        tag = self._tag
        assert tag is not None
        text = b"".join(self._lines)
        literals = self._literals
        self._reset_command()
        if self.defer_large and (len(literals) > DEFER_LITERALS or len(text) > DEFER_TEXT):
            return ParseLater(tag, text, literals, self.utf8_names)
        return parse_command(tag, text, literals, self.utf8_names)

    def _refuse(self, event: Event, marker: tuple[int, bool] | None) -> Event:
        """Drop the current command; if its last line announced a non-synchronising literal,
        that literal and the rest of the command are drained (RFC 7888 §4) so that none of it
        is ever interpreted as a command."""
        self._reset_command()
        if marker is not None and not marker[1]:
            self._remaining = marker[0]
            self._state = _State.DRAIN_LITERAL
        else:
            self._state = _State.LINE
        return event

    def _line_overflow(self) -> Event:
        if self._raw:
            tag = None
            self._raw = False
        elif self._lines:
            tag = self._tag
        else:
            window = bytes(self._buf[self._pos : self._pos + self.max_line])
            tag = _split_first_line(window)[0] if b" " in window else None
        self._reset_command()
        self._drain_marker = None
        self._state = _State.DRAIN_LINE
        return LineTooLong(tag)

    def _step_literal(self) -> Event | ParseLater | _Progress | None:
        available = len(self._buf) - self._pos
        if self._remaining and not available:
            return None
        count = min(self._remaining, available)
        with memoryview(self._buf) as view:
            self._literal += view[self._pos : self._pos + count]
        self._consume(count)
        self._remaining -= count
        if self._remaining:
            return None
        self._awaiting_literal = False
        self._literals[self._text_len] = bytes(self._literal)
        self._size += len(self._literal)
        self._literal = bytearray()
        self._state = _State.LINE
        return _PROGRESS

    def _step_drain_literal(self) -> _Progress | None:
        available = len(self._buf) - self._pos
        if self._remaining and not available:
            return None
        count = min(self._remaining, available)
        self._consume(count)
        self._remaining -= count
        if self._remaining:
            return None
        self._drain_marker = None
        self._state = _State.DRAIN_LINE
        return _PROGRESS

    def _step_drain_line(self) -> _Progress | None:
        buf = self._buf
        end = buf.find(b"\r\n", self._pos)
        if end < 0:
            count = len(buf) - self._pos
            if count and buf[-1] == 0x0D:
                count -= 1  # keep a trailing CR: it may start the CRLF
            self._track_marker(self._pos, self._pos + count)
            self._consume(count)
            return None
        self._track_marker(self._pos, end)
        self._consume(end + 2 - self._pos)
        marker = None if self._drain_marker is None else _literal_marker(self._drain_marker)
        self._drain_marker = None
        if marker is not None and not marker[1]:
            self._remaining = marker[0]
            self._state = _State.DRAIN_LITERAL  # the refused command goes on after a literal
        else:
            self._state = _State.LINE
        return _PROGRESS

    def _track_marker(self, start: int, end: int) -> None:
        """Remember, in bounded space, whether the line being drained ends with ``{n+}``."""
        if start == end:
            return
        brace = self._buf.rfind(b"{", start, end)
        if brace >= 0:
            candidate = bytes(self._buf[brace:end])
        elif self._drain_marker is not None:
            candidate = self._drain_marker + self._buf[start:end]
        else:
            return
        match = _PARTIAL_MARKER.fullmatch(candidate)
        if match is None:
            self._drain_marker = None
            return
        digits = match[1].lstrip(b"0") or match[1][:1]
        if len(digits) > _MAX_MARKER_DIGITS:
            digits = b"9" * (_MAX_MARKER_DIGITS + 1)
        self._drain_marker = b"{" + digits + match[2] + match[3]


class _Progress(enum.Enum):
    """Internal: a state step made progress without producing an event."""

    PROGRESS = enum.auto()


_PROGRESS = _Progress.PROGRESS
