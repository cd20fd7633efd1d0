"""The IMAP command parser (imap_store/imap/parser.py), fed whole and in random chunks.

Checks, for every input:

* nothing escapes ``feed``/``next_event`` (bad input becomes events, never exceptions);
* the events are the same whether the bytes come whole, in random chunks or byte by byte, with
  the edge's moves between events (``expect_line`` after AUTHENTICATE without an initial
  response and after IDLE, ``reject_literal`` for some APPEND literals, ``max_literal`` raised
  after LOGIN as the server does, UTF-8 mailbox names for some inputs as after ENABLE
  IMAP4rev2): nothing is parsed ahead of the event returned;
* once ``next_event`` says "more bytes", the parser holds at most a line (``max_line + 1``) of
  unread bytes and at most a command's worth of assembled command;
* every event has a ``repr`` (events are logged);
* the whole-feed parse stays within the linear time budget (fuzz.common).
"""

from __future__ import annotations

from hypothesis import strategies as st

from fuzz.common import Finding, Harness, chunkings, usual_payloads
from imap_store.imap import parser as imap
from imap_store.imap.commands import Authenticate, Idle, Login

#: (max_line, max_literal before login, after login, max_command): the server's parser, the
#: defaults, and small limits so that short inputs reach every limit path.
_LINE, _LITERAL, _COMMAND = (imap.DEFAULT_MAX_LINE, imap.DEFAULT_MAX_LITERAL,
                              imap.DEFAULT_MAX_COMMAND)
_LIMITS = [
    (_LINE, 0, _LITERAL, _COMMAND),
    (_LINE, _LITERAL, _LITERAL, _COMMAND),
    (16, 0, 8, 40),
    (64, 0, 300, 256),
    (200, 100, 100, 1000),
]


def _drive(chunks: list[bytes], control: int) -> list[imap.Event]:
    """Feed ``chunks`` as the server does and return every event."""
    max_line, max_literal, after_login, max_command = _LIMITS[control % len(_LIMITS)]
    parser = imap.CommandParser(max_line=max_line, max_literal=max_literal,
                                max_command=max_command)
    reject_appends = bool(control & 0x100)
    parser.utf8_names = bool(control & 0x200)
    events: list[imap.Event] = []
    for chunk in chunks:
        parser.feed(chunk)
        while (event := parser.next_event()) is not None:
            events.append(event)
            repr(event)
            if isinstance(event, Login):  # as the server after a login (success assumed)
                parser.max_literal = after_login
            elif isinstance(event, Authenticate) and event.initial_response is None:
                parser.expect_line()
            elif isinstance(event, Idle):
                parser.expect_line()
            elif (isinstance(event, imap.NeedContinuation) and event.command == "APPEND"
                  and reject_appends):
                parser.reject_literal()
        _check_bounds(parser, max_command)
    return events


def _check_bounds(parser: imap.CommandParser, max_command: int) -> None:
    if parser.buffered_bytes > parser.max_line + 1:
        raise Finding("memory", f"{parser.buffered_bytes} bytes left unread in the buffer "
                                f"(max_line {parser.max_line})")
    # The command being assembled (internal state: lines, literals, the literal being read).
    held = (sum(map(len, parser._lines)) + sum(map(len, parser._literals.values()))
            + len(parser._literal))
    limit = parser.max_literal + max_command + parser.max_line
    if held > limit:
        raise Finding("memory", f"{held} bytes of command held (limit {limit})")


def _target(payload: bytes, control: int) -> object:
    return _drive([payload], control)


def _run(payload: bytes, control: int) -> None:
    whole = _drive([payload], control)
    for chunks in chunkings(payload, control):
        events = _drive(chunks, control)
        if events != whole:
            first = next((i for i, (a, b) in enumerate(zip(whole, events, strict=False))
                          if a != b), min(len(whole), len(events)))
            raise Finding("mismatch", f"chunks of sizes {[len(c) for c in chunks][:20]}... "
                                      f"give other events from #{first}: whole "
                                      f"{whole[first:first + 2]!r}, chunked "
                                      f"{events[first:first + 2]!r}")


# -- inputs

_NAMES = [
    b"CAPABILITY", b"NOOP", b"LOGOUT", b"STARTTLS", b"AUTHENTICATE PLAIN", b"LOGIN", b"SELECT",
    b"EXAMINE", b"CREATE", b"DELETE", b"RENAME", b"SUBSCRIBE", b"UNSUBSCRIBE", b"LIST", b"LSUB",
    b"STATUS", b"APPEND", b"CHECK", b"CLOSE", b"UNSELECT", b"EXPUNGE", b"SEARCH", b"FETCH",
    b"STORE", b"COPY", b"MOVE", b"IDLE", b"NAMESPACE", b"ENABLE", b"ID", b"UID FETCH",
    b"UID SEARCH", b"UID STORE", b"UID COPY", b"UID MOVE", b"UID EXPUNGE", b"XYZZY", b"UID X",
    b"SORT", b"UID SORT", b"THREAD", b"UID THREAD",
]
_TOKENS = [
    b" ", b"  ", b"(", b")", b"[", b"]", b"<", b">", b".", b"*", b"%", b"\\", b'"', b'""',
    b'"a b"', b'"\\"\\\\"', b"NIL", b"INBOX", b"inbox", b"&-", b"&AOk-", b"&Jjo-", b"1", b"1:*",
    b"1,3:5", b"*", b"0", b"4294967295", b"4294967296", b"\\Seen", b"\\seen", b"$Forwarded",
    b"FLAGS", b"+FLAGS.SILENT", b"BODY[]", b"BODY.PEEK[HEADER.FIELDS (From To)]", b"BODY[1.2]",
    b"BODY[1.MIME]<0.10>", b"RFC822.SIZE", b"ALL", b"FULL", b"ENVELOPE", b"BODYSTRUCTURE",
    b"CHARSET UTF-8", b"CHARSET X", b"OR", b"NOT", b"SINCE 1-Jan-2024", b'"1-Jan-2024"',
    b"HEADER Subject x", b"TEXT", b"LARGER 10", b'"17-Jul-1996 02:44:25 -0700"', b"RETURN",
    b"(SUBSCRIBED RECURSIVEMATCH)", b"(REMOTE)", b"RECURSIVEMATCH", b"(CHILDREN SUBSCRIBED)",
    b"STATUS", b"(STATUS (MESSAGES SIZE DELETED))", b"(HIGHESTMODSEQ UIDNEXT)", b'("a" % *)',
    b"(REVERSE DATE SUBJECT)", b"(ARRIVAL)", b"REFERENCES", b"ORDEREDSUBJECT", b"UTF-8",
    b"US-ASCII", b"(SPECIAL-USE)", b"(USE (\\Sent))", b"(MESSAGES UNSEEN)", b"{0}", b"{0+}",
    b"{3}", b"{3+}", b"~{3}", b"~{3+}", b"~{0+}", b"BINARY[1]", b"BINARY.PEEK[1.2]<0.5>",
    b"BINARY.SIZE[]", b"BINARY[1.TEXT]", b"$", b"(SAVE)", b"(SAVE MIN)", b"IMAP4rev2",
    b'"\xc3\xa9t\xc3\xa9"',
    b"{99999999999999999999999}", b"{", b"}", b"=", b"AGZvbwBiYXI=", b"\xc3\xa9", b"\xff",
    b"\x00", b"\r", b"\n", b"\t", b"\x7f",
]


@st.composite
def _command(draw: st.DrawFn) -> bytes:
    tag = draw(st.sampled_from([b"a", b"A1", b"*", b"+", b"", b"t.1", b"a{", b"\xff"]))
    parts = [tag, b" ", draw(st.sampled_from(_NAMES))]
    for _ in range(draw(st.integers(0, 8))):
        parts.append(draw(st.sampled_from([b" ", b""])))
        token = draw(st.sampled_from(_TOKENS))
        parts.append(token)
        marker = token.removeprefix(b"~")  # literal8 (RFC 3516 §4.4)
        digits = marker[1:-1].rstrip(b"+")
        if marker.startswith(b"{") and marker.endswith(b"}") and digits.isdigit():
            size = int(digits)
            if size < 10:
                parts.append(b"\r\n" + draw(st.binary(min_size=size, max_size=size)))
    parts.append(draw(st.sampled_from([b"\r\n", b"\r\n", b"\n", b"\r", b""])))
    return b"".join(parts)


_fragments = st.one_of(
    _command(),
    st.sampled_from(_TOKENS),
    st.sampled_from([b' "" {0+}\r\n', b" {0+}\r\n", b'"', b"(", b" NOT", b" OR ALL",
                     b"\r\n", b"a NOOP\r\n", b" 1", b",1", b"x" * 100]),
)

HARNESS = Harness(
    "imap_parser", "IMAP command parser: whole vs chunked events, bounded memory, linear time",
    _run, _target,
    payloads=usual_payloads(st.lists(_command(), max_size=6).map(b"".join)),
    fragments=_fragments,
    openers=(b'a LIST "" (', b"a ID (", b"a SEARCH ", b"a UID SEARCH CHARSET UTF-8 ",
             b"a FETCH 1:* (", b"a STORE 1 FLAGS (", b"a STATUS x (", b"a LOGIN ",
             b"a APPEND x (", b"a CREATE x (USE (", b"a LIST (", b"a ENABLE",
             b"a FETCH $ (BINARY", b"a SEARCH RETURN (SAVE", b"a APPEND x ~"),
    middles=(b'"" {0+}\r\n ', b' "" {0+}\r\n', b'"a" {0+}\r\n', b" {0+}\r\n", b'"\\"" ',
             b"NOT ", b"OR ALL ", b"(", b"FROM x ", b"BODY[1.2.3] ", b"\\Seen ", b"1,",
             b"a NOOP\r\n", b"{1+}\r\n{", b'"x', b" X"),
)
