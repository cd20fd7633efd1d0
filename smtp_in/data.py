"""Sans-IO reader of the SMTP DATA stream (RFC 5321 §4.1.1.4, §4.5.2).

Fed raw bytes as they arrive, it finds the end-of-data ``CRLF.CRLF``, removes dot-stuffing
and checks, without ever buffering more than the limit:

- line length (RFC 5321 §4.5.3.1.6: 1000 octets with CRLF; one more for a stuffed dot),
- bare LF or bare CR (SMTP smuggling, RFC 5321 §2.3.8): the message is refused whole,
- the size limit (R7) and a memory budget shared by every session.

Once something is wrong, the rest is *drained*: read and thrown away until the end-of-data,
so the reply comes at the right time and memory stays flat.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

#: RFC 5321 §4.5.3.1.6: 998 octets of text, CRLF, plus one for a transparent dot.
MAX_LINE = 999
_END = b"\r\n.\r\n"


class DataState(enum.Enum):
    OK = "ok"
    TOO_BIG = "too big"
    LINE_TOO_LONG = "line too long"
    BARE_NEWLINE = "bare newline"
    NO_MEMORY = "no memory"


class DataReader:
    """Accumulates one DATA section. ``reserve(n)`` asks a shared budget for ``n`` more
    bytes and returns False when the budget is exhausted."""

    def __init__(self, max_size: int, reserve: Callable[[int], bool] | None = None,
                 max_line: int = MAX_LINE, reserved: int = 0) -> None:
        self.max_size = max_size
        self._reserve = reserve
        self.max_line = max_line
        self.state = DataState.OK
        self.buf = bytearray(b"\r\n")  # a virtual CRLF so ".\r\n" at the start matches _END
        self.size = 0  # bytes received (stuffed, with the terminator), drained ones too
        self.reserved = reserved  # budget already held (e.g. the declared SIZE)
        self._scan = 2  # where the next line/bare-newline scan starts
        self.done = False
        self.rest = b""  # bytes after the end-of-data (pipelined commands)

    def feed(self, data: bytes) -> bool:
        """Take more bytes; True once the end-of-data was seen (see ``rest``)."""
        if self.done:
            self.rest += data
            return True
        start = max(len(self.buf) - 4, 0)
        self.buf += data
        end = self.buf.find(_END, start)
        if end >= 0:
            self.rest = bytes(self.buf[end + 5:])
            del self.buf[end + 2:]
            self.done = True
        self.size += len(data)
        if self.state is DataState.OK:
            self._check()
        if self.done:
            return True
        if self.state is not DataState.OK:
            # Drain: keep only what can still be part of the terminator.
            del self.buf[:-4]
            self._scan = len(self.buf)
        return False

    def _check(self) -> None:
        """Checks the bytes from the start of the last incomplete line (``_scan``) on, with
        C-speed scans: each byte is looked at a bounded number of times overall."""
        buf = self.buf
        scan = self._scan
        # A line is what lies between two LFs; with its CR it may be max_line + 1 long.
        if len(buf) - scan > self.max_line + 1 and max(
                map(len, bytes(buf[scan:]).split(b"\n"))) > self.max_line + 1:
            self.state = DataState.LINE_TOO_LONG
            return
        # Every LF must follow a CR and every CR precede an LF (a CR at the very end may
        # still get its LF in the next chunk).
        crlf = buf.count(b"\r\n", scan)
        if buf.count(b"\n", scan) != crlf or \
                buf.count(b"\r", scan) != crlf + (1 if buf.endswith(b"\r") else 0):
            self.state = DataState.BARE_NEWLINE
            return
        body = len(buf) - 2
        if body > self.max_size:
            self.state = DataState.TOO_BIG
            return
        if self._reserve is not None and body > self.reserved:
            want = max(body - self.reserved, 64 * 1024)
            if not self._reserve(want):
                self.state = DataState.NO_MEMORY
                return
            self.reserved += want
        last_nl = buf.rfind(b"\n")
        if last_nl >= self._scan:
            self._scan = last_nl + 1

    def message(self, prefix: bytes = b"") -> bytes:
        """``prefix`` then the message with dot-stuffing removed, built with one copy of the
        data (call once, when done and OK)."""
        body = self.buf
        self.buf = bytearray()
        # RFC 5321 §4.5.2: the first character of a line that starts with a period is
        # deleted (the virtual CRLF makes the first line count too).
        if b"\r\n." in body:
            body = bytearray(body.replace(b"\r\n.", b"\r\n"))
        body[:2] = prefix  # replaces the virtual CRLF
        return bytes(body)
