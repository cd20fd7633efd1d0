"""Sans-IO reader of the SMTP DATA stream (RFC 5321 §4.1.1.4, §4.5.2).

Fed raw bytes as they arrive, it finds the end-of-data ``CRLF.CRLF``, removes dot-stuffing
and checks, without ever buffering more than the limit:

- line length (RFC 5321 §4.5.3.1.6: 1000 octets with CRLF by default, ``[limits]
  smtp_line_length``; one more for a stuffed dot),
- bare LF or bare CR (SMTP smuggling, RFC 5321 §2.3.8): the message is refused whole; or,
  with ``normalize_lf`` (``[smtp] bare_newline = "normalize"``), a line ending in a bare LF is
  taken as ending in CRLF, as Postfix >= 3.9 does. The end of data stays ``CRLF.CRLF`` only,
  a bare CR is always refused, and a lone ``.`` line next to a bare LF (which a normalizing
  reader would take for the end of data, the SMTP smuggling trick) is refused whole,
- the size limit (R7) and a memory budget shared by every session.

Once something is wrong, the rest is *drained*: read and thrown away until the end-of-data,
so the reply comes at the right time and memory stays flat.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable

#: RFC 5321 §4.5.3.1.6: a text line is at most 1000 octets, its CRLF included (the default of
#: ``[limits] smtp_line_length``, which may only raise it).
LINE_LENGTH = 1000


def max_line_for(line_length: int) -> int:
    """The ``max_line`` of :class:`DataReader` for lines of ``line_length`` octets with their
    CRLF: the text (``line_length - 2``) plus one for a transparent dot."""
    return line_length - 1


#: 998 octets of text plus one for a transparent dot.
MAX_LINE = max_line_for(LINE_LENGTH)
_END = b"\r\n.\r\n"
#: A bare CR (followed by something else than LF; a final CR may still get its LF) or a bare LF.
_BARE_NEWLINE = re.compile(rb"\r(?=[^\n])|(?<!\r)\n")
#: With bare LFs normalized: a bare CR, or a ``.`` line that starts after a bare LF or ends
#: with one (a would-be end of data that is not ``CRLF.CRLF``).
_BARE_CR_OR_DOT = re.compile(rb"\r(?=[^\n])|(?<!\r)\n\.\r?\n|\n\.\n")
_BARE_LF = re.compile(rb"(?<!\r)\n")


class DataState(enum.Enum):
    OK = "ok"
    TOO_BIG = "too big"
    LINE_TOO_LONG = "line too long"
    BARE_NEWLINE = "bare newline"
    NO_MEMORY = "no memory"
    #: A ``.`` line next to a bare LF (normalizing mode only): an end of data in disguise.
    DOT_AFTER_BARE_LF = "dot line after bare LF"


class DataReader:
    """Accumulates one DATA section. ``reserve(n)`` asks a shared budget for ``n`` more
    bytes and returns False when the budget is exhausted."""

    def __init__(self, max_size: int, reserve: Callable[[int], bool] | None = None,
                 max_line: int = MAX_LINE, reserved: int = 0,
                 normalize_lf: bool = False) -> None:
        self.max_size = max_size
        self.normalize_lf = normalize_lf
        self._reserve = reserve
        self.max_line = max_line
        self.state = DataState.OK
        self.buf = bytearray(b"\r\n")  # a virtual CRLF so ".\r\n" at the start matches _END
        self.size = 0  # bytes received up to the terminator included (stuffed, drained too)
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
        self.size += len(data) - len(self.rest)
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
        C-speed scans: each byte is looked at a bounded number of times overall.

        The outcome does not depend on how the stream was cut into chunks: the state is that
        of the first byte at which something is wrong, as if the data came byte by byte (a
        line too long, then a bare newline, then the size, for the same byte). Only the shared
        memory budget (``reserve``) is asked per chunk.
        """
        buf = self.buf
        scan = self._scan
        found: tuple[int, DataState] | None = None
        for position, state in (
            (self._first_long_line(scan), DataState.LINE_TOO_LONG),
            self._first_bare_newline(scan),
            (self._first_too_big(), DataState.TOO_BIG),
        ):
            if position is not None and (found is None or position < found[0]):
                found = (position, state)
        if found is not None:
            self.state = found[1]
            return
        body = len(buf) - 2 - _pending_terminator(buf, len(buf))
        if self._reserve is not None and body > self.reserved:
            want = max(body - self.reserved, 64 * 1024)
            if not self._reserve(want):
                self.state = DataState.NO_MEMORY
                return
            self.reserved += want
        last_nl = buf.rfind(b"\n")
        if last_nl >= self._scan:
            self._scan = last_nl + 1

    def _first_long_line(self, scan: int) -> int | None:
        """Offset of the first byte that makes a line too long (max_line + 1 octets may
        precede its LF: the text and its CR)."""
        buf = self.buf
        limit = self.max_line + 1
        if len(buf) - scan <= limit:
            return None
        lengths = list(map(len, bytes(buf[scan:]).split(b"\n")))
        if max(lengths) <= limit:
            return None
        index = next(i for i, length in enumerate(lengths) if length > limit)
        return scan + sum(lengths[:index]) + index + limit

    def _first_bare_newline(self, scan: int) -> tuple[int | None, DataState]:
        """Offset of the first byte that shows a bare LF or a bare CR (the byte after it), or
        with ``normalize_lf`` a bare CR or a ``.`` line next to a bare LF (its last byte)."""
        buf = self.buf
        # Every LF must follow a CR and every CR precede an LF (a CR at the very end may
        # still get its LF in the next chunk): counted first, searched only when wrong. When
        # normalizing, the line break before ``scan`` counts too (a "." line may follow it).
        start = max(scan - 2, 0) if self.normalize_lf else scan
        crlf = buf.count(b"\r\n", start)
        lone_cr = buf.count(b"\r", start) != crlf + (1 if buf.endswith(b"\r") else 0)
        if buf.count(b"\n", start) == crlf and not lone_cr:
            return None, DataState.BARE_NEWLINE
        if not self.normalize_lf:
            match = _BARE_NEWLINE.search(buf, scan)
            assert match is not None
            return match.start() + (1 if match[0] == b"\r" else 0), DataState.BARE_NEWLINE
        # The LF before a "." line may sit just before ``scan`` (the previous chunk's last
        # line); the lookbehind sees the byte before it.
        match = _BARE_CR_OR_DOT.search(buf, max(scan - 1, 0))
        if match is None:
            return None, DataState.BARE_NEWLINE
        if match[0][:1] == b"\r":
            return match.start() + 1, DataState.BARE_NEWLINE
        return match.end() - 1, DataState.DOT_AFTER_BARE_LF

    def _first_too_big(self) -> int | None:
        """Offset of the first byte that takes the message over ``max_size``. A final ``.`` or
        ``.\r`` after a CRLF may be the start of the terminator: not counted until a later
        byte shows it is not (else the size would depend on where the chunks end)."""
        buf = self.buf
        offset = self.max_size + 2  # the virtual CRLF is not part of the message
        while offset < len(buf):
            if offset + 1 - 2 - _pending_terminator(buf, offset + 1) > self.max_size:
                return offset
            offset += 1
        return None

    def message(self, prefix: bytes = b"") -> bytes:
        """``prefix`` then the message with dot-stuffing removed, built with one copy of the
        data (call once, when done and OK)."""
        body = self.buf
        self.buf = bytearray()
        if self.normalize_lf and body.count(b"\n") != body.count(b"\r\n"):
            body = bytearray(_BARE_LF.sub(b"\r\n", body))
        # RFC 5321 §4.5.2: the first character of a line that starts with a period is
        # deleted (the virtual CRLF makes the first line count too).
        if b"\r\n." in body:
            body = bytearray(body.replace(b"\r\n.", b"\r\n"))
        body[:2] = prefix  # replaces the virtual CRLF
        return bytes(body)


def _pending_terminator(buf: bytearray, end: int) -> int:
    """How many of the last bytes of ``buf[:end]`` may be the start of the end-of-data after
    a CRLF (``.`` or ``.\r``): not message bytes until a later byte says so."""
    if buf.endswith(b"\r\n.", 0, end):
        return 1
    if buf.endswith(b"\r\n.\r", 0, end):
        return 2
    return 0
