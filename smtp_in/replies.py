"""SMTP replies as named objects shared by the server and the tests (RFC 5321 §4.2, RFC 3463
enhanced status codes). Policy refusals come from ``policy.rules.Decision.reply``."""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Reply:
    code: int
    enhanced: str
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}"


SENDER_OK = Reply(250, "2.1.0", "sender accepted")
QUEUED = Reply(250, "2.0.0", "message stored")
QUEUED_OUT = Reply(250, "2.0.0", "message queued for delivery, copy in Sent")
AUTH_OK = Reply(235, "2.7.0", "authentication succeeded")
AUTH_FAILED = Reply(535, "5.7.8", "authentication failed")
AUTH_THROTTLED = Reply(454, "4.7.0", "too many failed logins, try again later")
AUTH_BAD_BASE64 = Reply(501, "5.5.2", "cannot decode base64")
AUTH_BAD_PLAIN = Reply(501, "5.5.2", "malformed PLAIN response")
AUTH_REQUIRED = Reply(530, "5.7.0", "authentication required: client certificate or AUTH")
TLS_REQUIRED = Reply(530, "5.7.0", "must issue a STARTTLS command first")
BARE_NEWLINE = Reply(554, "5.6.0", "message refused: bare LF or CR in the data (RFC 5321 2.3.8)")
BARE_CR = Reply(554, "5.6.0", "message refused: bare CR in the data (RFC 5321 2.3.8)")
DOT_AFTER_BARE_LF = Reply(554, "5.6.0", "message refused: a \".\" line next to a bare LF (only "
                                        "CRLF.CRLF ends the data, RFC 5321 4.1.1.4)")
NUL_BYTE = Reply(554, "5.6.0", "message refused: NUL octet in the data (RFC 5322 2.3, "
                             "RFC 6152)")
NO_MEMORY = Reply(452, "4.3.1", "insufficient system resources, try again later")
INTERNAL_ERROR = Reply(451, "4.3.0", "internal error, try again later")
SHUTTING_DOWN = Reply(421, "4.3.2", "service shutting down, try again later")
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "too many connections from your address")
NO_VALID_RECIPIENTS = Reply(554, "5.5.1", "no valid recipients")


def line_too_long(line_length: int) -> Reply:
    """The refusal of a message with a line over ``line_length`` octets, CRLF included
    (``[limits] smtp_line_length``); the text counts octets without the CRLF."""
    return Reply(554, "5.6.0", f"message refused: line longer than {line_length - 2} octets "
                               "(RFC 5321 4.5.3.1.6)")


#: Default enhanced codes added to replies that aiosmtpd writes without one (RFC 3463).
DEFAULT_ENHANCED: dict[int, str] = {
    211: "2.0.0", 214: "2.0.0", 220: "2.0.0", 221: "2.0.0", 235: "2.7.0", 250: "2.0.0",
    251: "2.1.5", 252: "2.0.0",
    421: "4.3.2", 450: "4.2.0", 451: "4.3.0", 452: "4.3.1", 454: "4.7.0",
    500: "5.5.2", 501: "5.5.4", 502: "5.5.1", 503: "5.5.1", 504: "5.5.4", 530: "5.7.0",
    534: "5.7.9", 535: "5.7.8", 538: "5.7.11", 550: "5.0.0", 552: "5.3.4", 553: "5.1.3",
    554: "5.0.0", 555: "5.5.4",
}
_HAS_ENHANCED = re.compile(r"^\d{3}[ -][245]\.\d{1,3}\.\d{1,3}( |$)")
_CODE = re.compile(r"^(\d{3})([ -])(.*)$", re.DOTALL)


def with_enhanced(line: str) -> str:
    """Add a default enhanced code to a reply line that lacks one (354 and 334 are exempt:
    intermediate replies carry none)."""
    if _HAS_ENHANCED.match(line):
        return line
    m = _CODE.match(line)
    if m is None:
        return line
    code = int(m.group(1))
    if code in (334, 354):
        return line
    enhanced = DEFAULT_ENHANCED.get(code) or f"{code // 100}.0.0"
    return f"{m.group(1)}{m.group(2)}{enhanced} {m.group(3)}"
