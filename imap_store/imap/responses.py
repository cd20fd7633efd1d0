"""Server responses of the IMAP edge and session, as named objects and small renderers
(RFC 3501 §7, §9). Shared by the server and the tests, never scattered as string literals.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from imap_store.imap.commands import encode_mailbox_name
from imap_store.store.mailboxes import SYSTEM_FLAG_BITS
from policy.rules import MAX_INBOUND_SIZE

#: RFC 7889 APPENDLIMIT: the largest message APPEND takes, equal to the SMTP SIZE of rule R7.
APPEND_LIMIT = MAX_INBOUND_SIZE

#: IMAP4rev2 (RFC 9051) advertised beside IMAP4rev1 and enabled by ``ENABLE IMAP4rev2``.
IMAP4REV2 = True

#: Flags every mailbox supports (RFC 3501 §2.3.2); ``\\*`` in PERMANENTFLAGS: keywords too.
SYSTEM_FLAGS_TEXT = b"\\Answered \\Flagged \\Deleted \\Seen \\Draft"

_FLAG_NAMES = tuple(
    (SYSTEM_FLAG_BITS[name], name.encode())
    for name in ("\\Seen", "\\Answered", "\\Flagged", "\\Deleted", "\\Draft")
)
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


@dataclass(frozen=True, slots=True)
class Reply:
    """A completion result (RFC 3501 §7.1): ``<tag> <status> [<code>] <text>``."""

    status: str
    text: str
    code: str | None = None

    def tagged(self, tag: str | None) -> bytes:
        code = f"[{self.code}] " if self.code else ""
        return f"{tag or '*'} {self.status} {code}{self.text}\r\n".encode()

    def untagged(self) -> bytes:
        return self.tagged(None)


# Greetings and goodbyes
GREETING = Reply("OK", "mssante-gateway IMAP4rev1 ready")
BYE_LOGOUT = Reply("BYE", "Logging out")
BYE_TIMEOUT = Reply("BYE", "Autologout: idle for too long")
BYE_TOO_MANY_BAD = Reply("BYE", "Too many invalid commands")
BYE_TOO_MANY_CONNECTIONS = Reply("BYE", "Too many connections from your address", "UNAVAILABLE")
BYE_SHUTTING_DOWN = Reply("BYE", "Server shutting down", "UNAVAILABLE")
BYE_SERVERBUG = Reply("BYE", "Internal error, please reconnect", "SERVERBUG")

# Refusals
BAD_STATE_SELECTED = Reply("BAD", "No mailbox selected")
BAD_STATE_AUTH = Reply("BAD", "Log in first")
BAD_STATE_NOT_AUTH = Reply("BAD", "Already logged in")
BAD_STATE_SELECTED_ALREADY = Reply("BAD", "Only valid before a mailbox is selected")
BAD_SEQUENCE = Reply("BAD", "Invalid message sequence number")
BAD_LINE_TOO_LONG = Reply("BAD", "Line too long")
BAD_EXPECTED_DONE = Reply("BAD", "Expected DONE")
BAD_STARTTLS = Reply("BAD", "TLS is already active")
BAD_STARTTLS_PIPELINED = Reply("BAD", "Nothing may follow STARTTLS before the handshake")
BAD_AUTH_CANCELLED = Reply("BAD", "Authentication cancelled")
BAD_AUTH_SYNTAX = Reply("BAD", "Invalid SASL PLAIN response")
NO_TOOBIG = Reply("NO", "Literal too large", "TOOBIG")
NO_LOGIN_DISABLED = Reply("NO", "Use STARTTLS before logging in", "PRIVACYREQUIRED")
NO_AUTH_FAILED = Reply("NO", "Invalid credentials", "AUTHENTICATIONFAILED")
NO_AUTH_THROTTLED = Reply("NO", "Too many failed logins, try again later", "UNAVAILABLE")
NO_MECHANISM = Reply("NO", "Unsupported authentication mechanism", "CANNOT")
NO_READ_ONLY = Reply("NO", "Mailbox is read-only", "READ-ONLY")
NO_EMPTY_MESSAGE = Reply("NO", "Empty message", "CANNOT")
#: APPEND of a literal with a NUL octet (RFC 3501 §4.3, §9 CHAR8; no BINARY here): the command
#: was read whole, so a NO (the message cannot be stored) rather than a BAD (a broken client).
NO_NUL_IN_MESSAGE = Reply("NO", "Message contains a NUL octet (RFC 3501 CHAR8)", "CANNOT")
#: FETCH BINARY of a part whose Content-Transfer-Encoding we cannot decode (RFC 3516 §4.3).
NO_UNKNOWN_CTE = Reply("NO", "Unknown Content-Transfer-Encoding", "UNKNOWN-CTE")
NO_NONEXISTENT = Reply("NO", "No such mailbox", "NONEXISTENT")
NO_PATTERN_TOO_LONG = Reply("NO", "Pattern too long", "LIMIT")
NO_TOO_MANY_PATTERNS = Reply("NO", "Too many mailbox patterns", "LIMIT")
BAD_QRESYNC_NOT_ENABLED = Reply("BAD", "ENABLE QRESYNC first (RFC 7162 §3.2.5)")


def modseq_value(modseq: int) -> int:
    """A mod-sequence as sent (RFC 7162 §7: positive): a mailbox never changed answers 1."""
    return max(modseq, 1)


def quote(text: str, utf8: bool = False) -> bytes:
    """A mailbox name as an IMAP quoted string: modified UTF-7 (RFC 3501 §5.1.3), or UTF-8
    once the session enabled IMAP4rev2 (RFC 9051 §5.1, quoted strings hold UTF-8 there)."""
    encoded = text.encode("utf-8") if utf8 else encode_mailbox_name(text)
    return b'"' + encoded.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def literal(data: bytes) -> bytes:
    return b"{%d}\r\n" % len(data) + data


def literal8(data: bytes) -> bytes:
    """Decoded content for FETCH BINARY: a ``literal8`` (``~{n}``, RFC 3516 §4.2) when it holds
    a NUL octet, which a plain literal may not carry; otherwise a plain literal."""
    return (b"~" if b"\x00" in data else b"") + literal(data)


def render_flags(bits: int, keywords: str, recent: bool = False) -> bytes:
    """``(\\Seen ... keyword)`` of a message (RFC 3501 §2.3.2, §7.4.2 FLAGS)."""
    names = [name for bit, name in _FLAG_NAMES if bits & bit]
    if recent:
        names.append(b"\\Recent")
    if keywords:
        names.extend(k.encode("ascii", "replace") for k in keywords.split())
    return b"(" + b" ".join(names) + b")"


def render_date(value: datetime) -> bytes:
    """INTERNALDATE ``"dd-Mon-yyyy hh:mm:ss +0000"`` in UTC (RFC 3501 §9 date-time)."""
    value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    return (
        f'"{value.day:2d}-{_MONTHS[value.month - 1]}-{value.year:04d} '
        f'{value.hour:02d}:{value.minute:02d}:{value.second:02d} +0000"'
    ).encode("ascii")


def capabilities(*, tls: bool, starttls: bool, authenticated: bool) -> bytes:
    """CAPABILITY list for the connection's state (RFC 3501 §6.1.1, §6.2.1, §6.2.3)."""
    caps = ["IMAP4rev1", *(["IMAP4rev2"] if IMAP4REV2 else []), "LITERAL+", "ID", "ENABLE",
            "IDLE", "NAMESPACE", "UNSELECT", "CONDSTORE", "QRESYNC", "ESEARCH", "SEARCHRES",
            "SORT", "THREAD=ORDEREDSUBJECT", "THREAD=REFERENCES", "BINARY"]
    if not tls:
        caps += ["STARTTLS", "LOGINDISABLED"] if starttls else ["LOGINDISABLED"]
    elif not authenticated:
        caps += ["AUTH=PLAIN", "SASL-IR"]
    if authenticated:
        caps += ["UIDPLUS", "MOVE", "SPECIAL-USE", "CHILDREN", "LIST-EXTENDED", "LIST-STATUS",
                 "STATUS=SIZE", f"APPENDLIMIT={APPEND_LIMIT}"]
    return " ".join(caps).encode("ascii")
