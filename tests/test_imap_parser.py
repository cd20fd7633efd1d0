"""Tests of the sans-IO IMAP command parser (imap_store.imap.parser / commands).

Every command test goes through :func:`tests.helpers.events`, which feeds the bytes in one
piece *and* one byte at a time (h11's habit) and checks that both runs produce the same events.
The parser's security regressions have their own files: oversized literals and over-long lines
in ``test_security_oversized_literals.py``, bare LF in ``test_security_smuggling.py``, secrets
kept out of ``repr`` (hence out of logs) in ``test_security_credentials_in_logs.py``.
"""

from __future__ import annotations

import random
from datetime import UTC, date, datetime, timedelta, timezone

import pytest

from imap_store.imap import commands as c
from imap_store.imap.parser import (
    DEFAULT_MAX_LINE,
    MAX_SEARCH_DEPTH,
    CommandParser,
    Event,
    LineTooLong,
    NeedContinuation,
    RawLine,
)
from tests.helpers import bad, commands, events, one


def seq(text: str) -> c.SequenceSet:
    return c.SequenceSet.parse(text)


# --------------------------------------------------------------------------- simple commands


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"a1 CAPABILITY", c.Capability("a1")),
        (b"a2 noop", c.Noop("a2")),
        (b"A3 LoGoUt", c.Logout("A3")),
        (b"t STARTTLS", c.StartTls("t")),
        (b"t CHECK", c.Check("t")),
        (b"t CLOSE", c.Close("t")),
        (b"t UNSELECT", c.Unselect("t")),
        (b"t IDLE", c.Idle("t")),
        (b"t NAMESPACE", c.Namespace("t")),
        (b"t EXPUNGE", c.Expunge("t")),
        (b"t UID EXPUNGE 3:5,9", c.Expunge("t", seq("3:5,9"))),
        (b"t SELECT inbox", c.Select("t", "INBOX")),
        (b'u SELECT "InBoX"', c.Select("u", "INBOX")),
        (b"t EXAMINE Archive", c.Select("t", "Archive", readonly=True)),
        (b"t SELECT INBOX.Sent", c.Select("t", "INBOX.Sent")),
        (b"t SELECT {5+}\r\ninbox", c.Select("t", "INBOX")),
        (b"t CREATE Projets", c.Create("t", "Projets")),
        (b"t CREATE Brouillons (USE (\\drafts))", c.Create("t", "Brouillons", ("\\Drafts",))),
        (
            b"t CREATE X (USE (\\Sent \\Trash \\XOther))",
            c.Create("t", "X", ("\\Sent", "\\Trash", "\\XOther")),
        ),
        (b"t CREATE X (USE ())", c.Create("t", "X")),
        (b"t DELETE &AOk-t&AOk-", c.Delete("t", "été")),
        (b'r RENAME "Old box" New', c.Rename("r", "Old box", "New")),
        (b"s SUBSCRIBE Sent", c.Subscribe("s", "Sent")),
        (b"s UNSUBSCRIBE Sent", c.Unsubscribe("s", "Sent")),
        (b's LIST "" *', c.List("s", "", ("*",))),
        (b's LIST "" %', c.List("s", "", ("%",))),
        (b's LIST "" ""', c.List("s", "", ("",))),
        (b"s LIST ~/Mail/ Sent*]x", c.List("s", "~/Mail/", ("Sent*]x",))),
        (
            b's LIST (SUBSCRIBED recursivematch) "" ("INBOX" Sent*) RETURN (SPECIAL-USE children)',
            c.List(
                "s",
                "",
                ("INBOX", "Sent*"),
                ("SUBSCRIBED", "RECURSIVEMATCH"),
                ("SPECIAL-USE", "CHILDREN"),
                extended=True,
            ),
        ),
        (b's LIST () "" * RETURN ()', c.List("s", "", ("*",), extended=True)),
        (b's LIST "" ("*")', c.List("s", "", ("*",), extended=True)),
        (
            b's LIST (remote) "" % RETURN (subscribed STATUS (size messages deleted SIZE))',
            c.List("s", "", ("%",), ("REMOTE",), ("SUBSCRIBED", "STATUS"),
                 ("SIZE", "MESSAGES", "DELETED"), extended=True),
        ),
        (b's LIST "" inbox', c.List("s", "", ("inbox",))),
        (b's LSUB "" *', c.Lsub("s", "", "*")),
        (b"s LSUB INBOX. %", c.Lsub("s", "INBOX.", "%")),
        (
            b"s STATUS inbox (messages UIDNEXT uidvalidity UNSEEN RECENT APPENDLIMIT messages)",
            c.Status(
                "s",
                "INBOX",
                ("MESSAGES", "UIDNEXT", "UIDVALIDITY", "UNSEEN", "RECENT", "APPENDLIMIT"),
            ),
        ),
        (b"e ENABLE UTF8=ACCEPT condstore", c.Enable("e", ("UTF8=ACCEPT", "CONDSTORE"))),
        (b"i ID NIL", c.Id("i", None)),
        (b"i ID ()", c.Id("i", {})),
        (
            b'i ID ("name" "Thunderbird" "version" "115.0" "os" NIL)',
            c.Id("i", {"name": "Thunderbird", "version": "115.0", "os": None}),
        ),
        (b"c COPY 1:3 Archive", c.Copy("c", seq("1:3"), "Archive")),
        (b"c UID COPY 10,12 Archive", c.Copy("c", seq("10,12"), "Archive", uid=True)),
        (b"m MOVE 2 Trash", c.Move("m", seq("2"), "Trash")),
        (b'm uid move 4:* "Corbeille"', c.Move("m", seq("4:*"), "Corbeille", uid=True)),
        (b"l LOGIN patient secret", c.Login("l", "patient", b"secret")),
        (
            b'l LOGIN "dr.house@example.org" "p\\"w\\\\d"',
            c.Login("l", "dr.house@example.org", b'p"w\\d'),
        ),
        (b"l LOGIN {3+}\r\nbob {4+}\r\np\r\n\x00", c.Login("l", "bob", b"p\r\n\x00")),
        (b'l LOGIN "\xc3\xa9lise" x]y', c.Login("l", "élise", b"x]y")),
        (b"a AUTHENTICATE plain", c.Authenticate("a", "PLAIN")),
        (
            b"a AUTHENTICATE PLAIN AGJvYgBzZWNyZXQ=",
            c.Authenticate("a", "PLAIN", b"\x00bob\x00secret"),
        ),
        (b"a AUTHENTICATE EXTERNAL =", c.Authenticate("a", "EXTERNAL", b"")),
        (b"tag]with.odd-chars! NOOP", c.Noop("tag]with.odd-chars!")),
    ],
)
def test_simple_commands(line: bytes, expected: Event) -> None:
    assert commands(line + b"\r\n") == [expected]


#: Lines refused with BAD; :func:`test_invalid_arguments` takes them with the FETCH, STORE and
#: SEARCH arguments of their own sections.
INVALID_LINES = [
    b"a NOOP extra",
    b"a CAPABILITY ",
    b"a SELECT",
    b"a SELECT ",
    b"a SELECT a b",
    b"a SELECT (x)",
    b'a SELECT "unterminated',
    b'a SELECT "nul\x00inside"',
    b'a SELECT "bad \\escape"',
    b"a SELECT caf\xc3\xa9",
    b'a SELECT "caf\xc3\xa9"',
    b"a CREATE X (FOO (\\Drafts))",
    b"a CREATE X (USE (Drafts))",
    b"a CREATE X ()",
    b"a RENAME onlyone",
    b'a LIST ""',
    b'a LIST "" * EXTRA (X)',
    b'a LIST (RECURSIVEMATCH) "" *',
    b'a LIST (REMOTE RECURSIVEMATCH) "" *',
    b'a LIST (BOGUS) "" *',
    b'a LIST "" * RETURN (BOGUS)',
    b'a LIST "" * RETURN (STATUS)',
    b'a LIST "" * RETURN (STATUS ())',
    b'a LIST "" * RETURN (STATUS (MESSAGES BOGUS))',
    b'a LIST "" * RETURN (STATUS (MESSAGES) STATUS (UNSEEN))',
    b'a LIST "" * RETURN STATUS (MESSAGES)',
    b'a LIST "" ()',
    b'a LSUB "" * x',
    b"a STATUS INBOX ()",
    b"a STATUS INBOX (MESSAGES BOGUS)",
    b"a STATUS INBOX MESSAGES",
    b"a ENABLE",
    b"a ID",
    b'a ID ("name")',
    b'a ID (name "x")',
    b"a LOGIN onlyuser",
    b'a LOGIN "\xff" x',
    b"a AUTHENTICATE",
    b"a AUTHENTICATE PLAIN abc",
    b"a AUTHENTICATE PLAIN ab!=",
    b"a AUTHENTICATE PLAIN AGJv YgBz",
    b"a COPY 1:3",
    b"a COPY x INBOX",
    b"a MOVE 0 INBOX",
    b"a UID EXPUNGE",
    b"a EXPUNGE 1:3",
    b"a  NOOP",
]


@pytest.mark.parametrize(
    ("line", "code"),
    [
        (b"a SELECT &AGE-", "NONEXISTENT"),
        (b"a SELECT &AMk", "NONEXISTENT"),
        (b'a SELECT "tab\tinside"', "NONEXISTENT"),
        (b"a EXAMINE &AAk-", "NONEXISTENT"),
        (b"a SELECT !#$&'+,-.0123456789:;<=>?@^_`|[}", "NONEXISTENT"),
        (b"a STATUS &AMk (MESSAGES)", "NONEXISTENT"),
        (b"a CREATE &AMk", "CANNOT"),
        (b"a RENAME INBOX &AMk", "CANNOT"),
        (b"a RENAME &AMk x", "NONEXISTENT"),
    ],
)
def test_names_that_cannot_exist_get_no_not_bad(line: bytes, code: str) -> None:
    """A valid astring that is no modified UTF-7 name (RFC 3501 §5.1.3) is understood:
    NO, not BAD, and no count towards the BAD limit."""
    event = one(line + b"\r\n")
    assert isinstance(event, c.InvalidCommand), event
    assert (event.tag, event.status, event.code) == ("a", "NO", code)


def test_patterns_that_are_no_name_still_parse() -> None:
    event = one(b'a LIST "" !#$&\'+,-.0123456789:;<=>?@^_`|[}%*\r\n')
    assert isinstance(event, c.List), event
    assert event.patterns == ("!#$&'+,-.0123456789:;<=>?@^_`|[}%*",)


def test_id_limits() -> None:
    pairs = b" ".join(b'"k%d" "v"' % i for i in range(31))
    assert bad(b"i ID (" + pairs + b")\r\n").text == "Too many ID parameters"
    assert bad(b'i ID ("' + b"k" * 31 + b'" "v")\r\n').text == "ID parameter too long"
    assert isinstance(one(b'i ID ("k" "' + b"v" * 1024 + b'")\r\n'), c.Id)


def test_unknown_commands() -> None:
    assert commands(b'a XLIST "" *\r\nb GETQUOTAROOT INBOX\r\nc UID NOOP\r\nd UID\r\n') == [
        c.InvalidCommand("a", "Unknown command"),
        c.InvalidCommand("b", "Unknown command"),
        c.InvalidCommand("c", "Unknown UID command"),
        c.InvalidCommand("d", "Unknown command"),
    ]


@pytest.mark.parametrize(
    ("line", "tag"),
    [
        (b"* NOOP", None),
        (b"+ NOOP", None),
        (b"a+b NOOP", None),
        (b"a%b NOOP", None),
        (b"(a) NOOP", None),
        (b'"a" NOOP', None),
        (b"\xc3\xa9 NOOP", None),
        (b"tab\tx NOOP", None),
        (b"a\x00 NOOP", None),
        (b" NOOP", None),
        (b"lonelytag", "lonelytag"),
        (b"a NOOP\rb NOOP", "a"),
        (b"a NOOP\nb NOOP", "a"),
    ],
)
def test_bad_tags_and_garbage(line: bytes, tag: str | None) -> None:
    result = commands(line + b"\r\nok NOOP\r\n")
    assert len(result) == 2
    assert isinstance(result[0], c.InvalidCommand)
    assert result[0].tag == tag
    assert result[1] == c.Noop("ok")  # resynchronised on the next line


def test_empty_lines_are_ignored() -> None:
    assert commands(b"\r\n\r\na NOOP\r\n\r\n") == [c.Noop("a")]


def test_pipelined_commands_and_names() -> None:
    result = commands(b"a NOOP\r\nb UID FETCH 1 UID\r\nc SELECT INBOX\r\nd EXAMINE INBOX\r\n")
    assert [e.tag for e in result] == ["a", "b", "c", "d"]  # type: ignore[union-attr]
    assert [e.name for e in result] == [  # type: ignore[union-attr]
        "NOOP",
        "UID FETCH",
        "SELECT",
        "EXAMINE",
    ]
    assert c.Expunge("x", seq("1")).name == "UID EXPUNGE" and c.Expunge("x").name == "EXPUNGE"
    assert c.Expunge("x", seq("1")).uid and not c.Expunge("x").uid
    assert c.Store("x", seq("1"), c.StoreMode.ADD, False, ()).name == "STORE"


# --------------------------------------------------------------------------- literals


def test_synchronizing_literal_flow() -> None:
    parser = CommandParser()
    parser.feed(b"a LOGIN {3}\r\n")
    assert parser.next_event() == NeedContinuation("a", 3, "LOGIN")
    assert parser.next_event() is None
    parser.feed(b"bo")
    assert parser.next_event() is None
    parser.feed(b"b {6}\r\n")
    assert parser.next_event() == NeedContinuation("a", 6, "LOGIN")
    parser.feed(b"se\r\n\x00t\r\n")
    assert parser.next_event() == c.Login("a", "bob", b"se\r\n\x00t")
    assert parser.next_event() is None
    assert parser.buffered_bytes == 0


def test_literal_flow_whole_and_bytewise() -> None:
    data = b"a LOGIN {3}\r\nbob {2}\r\npw\r\nb NOOP\r\n"
    assert events(data) == [
        NeedContinuation("a", 3, "LOGIN"),
        NeedContinuation("a", 2, "LOGIN"),
        c.Login("a", "bob", b"pw"),
        c.Noop("b"),
    ]


def test_non_synchronizing_literal_needs_no_continuation() -> None:
    assert events(b"a LOGIN {3+}\r\nbob {2+}\r\npw\r\n") == [c.Login("a", "bob", b"pw")]


def test_zero_length_literals() -> None:
    assert events(b"a LOGIN {0}\r\n {0+}\r\n\r\n") == [
        NeedContinuation("a", 0, "LOGIN"),
        c.Login("a", "", b""),
    ]


def test_literal_looking_text_inside_a_literal_is_data() -> None:
    assert commands(b"a LOGIN {9+}\r\nx {999}\r\n {1+}\r\nz\r\n") == [
        c.Login("a", "x {999}\r\n", b"z")
    ]


def test_literal_must_end_its_line() -> None:
    assert bad(b"a LOGIN {3}abc pw\r\n").text == "Literal must end the line"


def test_quoted_string_cannot_swallow_a_literal() -> None:
    assert bad(b'a LOGIN "x{3}\r\nabc" pw\r\n').text == "Unterminated quoted string"


def test_uid_command_name_in_continuation() -> None:
    assert events(b"s UID SEARCH SUBJECT {2}\r\nhi\r\n") == [
        NeedContinuation("s", 2, "UID SEARCH"),
        c.Search("s", None, c.SearchHeader("subject", "hi"), uid=True),
    ]


def test_reject_literal() -> None:
    parser = CommandParser()
    parser.feed(b"a APPEND INBOX {100}\r\nb NOOP\r\n")
    assert parser.next_event() == NeedContinuation("a", 100, "APPEND")
    parser.reject_literal()
    assert parser.next_event() == c.Noop("b")
    with pytest.raises(RuntimeError):
        parser.reject_literal()


# --------------------------------------------------------------------------- raw lines


def _raw_after_idle_and_auth(parser: CommandParser, event: Event) -> None:
    if isinstance(event, (c.Idle, c.Authenticate)):
        parser.expect_line()
    elif isinstance(event, RawLine) and event.line not in (b"DONE", b"*"):
        parser.expect_line()  # SASL exchange goes on until the client sends "*" or DONE


def test_idle_done() -> None:
    data = b"a IDLE\r\nDONE\r\nb NOOP\r\n"
    assert events(data, _raw_after_idle_and_auth) == [c.Idle("a"), RawLine(b"DONE"), c.Noop("b")]


def test_authenticate_continuation_lines() -> None:
    data = b"a AUTHENTICATE PLAIN\r\nAGJvYgBzZWNyZXQ=\r\n*\r\nb NOOP\r\n"
    assert events(data, _raw_after_idle_and_auth) == [
        c.Authenticate("a", "PLAIN"),
        RawLine(b"AGJvYgBzZWNyZXQ="),
        RawLine(b"*"),
        c.Noop("b"),
    ]


def test_raw_line_is_verbatim() -> None:
    data = b"a IDLE\r\n{5}\r\n"
    assert events(data, _raw_after_idle_and_auth) == [c.Idle("a"), RawLine(b"{5}")]
    data = b"a IDLE\r\n\r\n"
    assert events(data, _raw_after_idle_and_auth) == [c.Idle("a"), RawLine(b"")]


def test_raw_line_too_long() -> None:
    data = b"a IDLE\r\n" + b"D" * 300 + b"\r\nb NOOP\r\n"
    assert events(data, _raw_after_idle_and_auth, max_line=100) == [
        c.Idle("a"),
        LineTooLong(None),
        c.Noop("b"),
    ]


def test_expect_line_only_between_commands() -> None:
    parser = CommandParser()
    parser.feed(b"a LOGIN {3}\r\n")
    assert isinstance(parser.next_event(), NeedContinuation)
    with pytest.raises(RuntimeError):
        parser.expect_line()


def test_starttls_pipelining_is_detectable() -> None:
    parser = CommandParser()
    parser.feed(b"a STARTTLS\r\nb LOGIN bob pw\r\n")
    assert parser.next_event() == c.StartTls("a")
    assert parser.buffered_bytes == len(b"b LOGIN bob pw\r\n")
    parser = CommandParser()
    parser.feed(b"a STARTTLS\r\n")
    assert parser.next_event() == c.StartTls("a")
    assert parser.buffered_bytes == 0


def test_constructor_validates_limits() -> None:
    with pytest.raises(ValueError):
        CommandParser(max_line=0)
    assert DEFAULT_MAX_LINE == 8192


# --------------------------------------------------------------------------- mailbox names


@pytest.mark.parametrize(
    ("name", "encoded"),
    [
        ("INBOX", b"INBOX"),
        ("é", b"&AOk-"),
        ("É", b"&AMk-"),
        ("&", b"&-"),
        ("a&b", b"a&-b"),
        ("&&", b"&-&-"),
        ("Boîte à lettres", b"Bo&AO4-te &AOA- lettres"),
        ("~peter/mail/台北/日本語", b"~peter/mail/&U,BTFw-/&ZeVnLIqe-"),
        ("😀", b"&2D3eAA-"),
        ("résumé & co", b"r&AOk-sum&AOk- &- co"),
        ("", b""),
    ],
)
def test_modified_utf7_round_trip(name: str, encoded: bytes) -> None:
    assert c.encode_mailbox_name(name) == encoded
    assert c.decode_mailbox_name(encoded) == name


@pytest.mark.parametrize(
    "raw",
    [
        b"&AMk",  # unterminated
        b"&AGE-",  # encodes a printable "a"
        b"&AMk-&AMk-",  # adjacent runs (canonical: &AMkAyQ-)
        b"&AMl-",  # non-zero padding bits
        b"&A-",  # truncated base64
        b"&AM-",  # odd UTF-16 length
        b"&2D0-",  # lone surrogate
        b"&AM/-",  # "/" is not modified base64
        b"caf\xc3\xa9",  # raw 8-bit
        b"tab\there",
    ],
)
def test_modified_utf7_rejects_invalid(raw: bytes) -> None:
    with pytest.raises(ValueError):
        c.decode_mailbox_name(raw)


def test_mailbox_names_in_commands() -> None:
    assert one(b"a SELECT &AMk-\r\n") == c.Select("a", "É")
    assert one(b'a SELECT "&-"\r\n') == c.Select("a", "&")
    assert one(b"a RENAME Inbox &AOk-t&AOk-\r\n") == c.Rename("a", "INBOX", "été")
    assert one(b"a COPY 1 inbox\r\n") == c.Copy("a", seq("1"), "INBOX")
    assert one(b"a SELECT INBOXES\r\n") == c.Select("a", "INBOXES")
    # not canonical, a control character: names that cannot exist (NO, see above)
    for line in (b"a SELECT &AMk-&AMk-\r\n", b"a SELECT &AAA-\r\n"):
        event = one(line)
        assert isinstance(event, c.InvalidCommand) and event.status == "NO", event


# --------------------------------------------------------------------------- sequence sets


@pytest.mark.parametrize(
    ("text", "ranges", "rendered"),
    [
        ("1:*", (c.SeqRange(1, None),), "1:*"),
        ("*:4", (c.SeqRange(4, None),), "4:*"),
        ("*", (c.SeqRange(None, None),), "*"),
        ("*:*", (c.SeqRange(None, None),), "*"),
        ("5:2", (c.SeqRange(2, 5),), "2:5"),
        ("2,4:7,9", (c.SeqRange(2, 2), c.SeqRange(4, 7), c.SeqRange(9, 9)), "2,4:7,9"),
        ("4294967295", (c.SeqRange(4294967295, 4294967295),), "4294967295"),
    ],
)
def test_sequence_set_parse(text: str, ranges: tuple[c.SeqRange, ...], rendered: str) -> None:
    parsed = c.SequenceSet.parse(text)
    assert parsed.ranges == ranges
    assert str(parsed) == rendered


@pytest.mark.parametrize(
    "text", ["", "0", "1:", ":1", "1::2", "a", "01", "1,", ",1", "4294967296", "1:0", "-1"]
)
def test_sequence_set_invalid(text: str) -> None:
    with pytest.raises(ValueError):
        c.SequenceSet.parse(text)


def test_sequence_set_resolve() -> None:
    assert list(seq("1:*").resolve(5)) == [1, 2, 3, 4, 5]
    assert list(seq("*:4").resolve(10)) == [4, 5, 6, 7, 8, 9, 10]
    assert list(seq("*:4").resolve(2)) == [2]
    assert list(seq("2,4:7,9").resolve(100)) == [2, 4, 5, 6, 7, 9]
    assert list(seq("2,4:7,9").resolve(6)) == [2, 4, 5, 6]
    assert list(seq("5:3,4:8,1").resolve(6)) == [1, 3, 4, 5, 6]
    assert seq("3:5,6:8").resolve(10).intervals == ((3, 8),)
    assert list(seq("*").resolve(0)) == []
    assert not seq("1:*").resolve(0)
    # RFC 3501 §6.4.8: "UID 100:*" always includes the highest UID.
    assert list(seq("100:*").resolve(50)) == [50]
    resolved = seq("1:4294967295").resolve(3)
    assert len(resolved) == 3 and 3 in resolved and 4 not in resolved and 0 not in resolved
    big = seq("2,4:7,9,20:*").resolve(4_000_000)
    assert 2 in big and 3 not in big and 7 in big and 8 not in big and 3_999_999 in big
    assert "x" not in big


def test_sequence_set_helpers() -> None:
    assert seq("2,4:7,9").contains(5, 10)
    assert not seq("2,4:7,9").contains(8, 10)
    assert seq("*").contains(10, 10) and not seq("*").contains(9, 10)
    assert seq("3:*").contains(2, 2)  # 3:* with max 2 is 2:3
    assert seq("2,4:7,9").highest_number == 9
    assert seq("*").highest_number == 0
    assert seq("1:*").has_star and not seq("1:5").has_star
    assert str(c.SequenceSet.from_values([9, 1, 2, 3, 5, 6, 3])) == "1:3,5:6,9"
    assert str(c.SequenceSet.from_values([42])) == "42"
    with pytest.raises(ValueError):
        c.SequenceSet.from_values([])


# --------------------------------------------------------------------------- FETCH


FLAGS, INTERNALDATE, SIZE, ENVELOPE = (
    c.FetchAttr("FLAGS"),
    c.FetchAttr("INTERNALDATE"),
    c.FetchAttr("RFC822.SIZE"),
    c.FetchAttr("ENVELOPE"),
)


@pytest.mark.parametrize(
    ("items", "expected"),
    [
        (b"ALL", (FLAGS, INTERNALDATE, SIZE, ENVELOPE)),
        (b"fast", (FLAGS, INTERNALDATE, SIZE)),
        (b"FULL", (FLAGS, INTERNALDATE, SIZE, ENVELOPE, c.FetchAttr("BODY"))),
        (b"FLAGS", (FLAGS,)),
        (b"(UID FLAGS)", (c.FetchAttr("UID"), FLAGS)),
        (b"(FLAGS FLAGS uid)", (FLAGS, c.FetchAttr("UID"))),
        (
            b"(RFC822 RFC822.HEADER RFC822.TEXT RFC822.SIZE BODYSTRUCTURE BODY)",
            tuple(
                c.FetchAttr(n)
                for n in (
                    "RFC822",
                    "RFC822.HEADER",
                    "RFC822.TEXT",
                    "RFC822.SIZE",
                    "BODYSTRUCTURE",
                    "BODY",
                )
            ),
        ),
        (b"BODY[]", (c.FetchAttr("BODY", c.Section()),)),
        (b"BODY.PEEK[]<0.1024>", (c.FetchAttr("BODY", c.Section(), (0, 1024), peek=True),)),
        (b"body[1.2.3]", (c.FetchAttr("BODY", c.Section((1, 2, 3))),)),
        (b"BODY[1.2.MIME]", (c.FetchAttr("BODY", c.Section((1, 2), "MIME")),)),
        (b"BODY[2.HEADER]", (c.FetchAttr("BODY", c.Section((2,), "HEADER")),)),
        (b"BODY[2.TEXT]", (c.FetchAttr("BODY", c.Section((2,), "TEXT")),)),
        (b"BODY[HEADER]", (c.FetchAttr("BODY", c.Section((), "HEADER")),)),
        (b"BODY[text]", (c.FetchAttr("BODY", c.Section((), "TEXT")),)),
        (
            b"BODY.PEEK[HEADER.FIELDS (FROM SUBJECT)]<0.100>",
            (
                c.FetchAttr(
                    "BODY", c.Section((), "HEADER.FIELDS", ("FROM", "SUBJECT")), (0, 100), peek=True
                ),
            ),
        ),
        (
            b'(BODY[header.fields.not (X-Priority "Received")] FLAGS)',
            (
                c.FetchAttr("BODY", c.Section((), "HEADER.FIELDS.NOT", ("X-Priority", "Received"))),
                FLAGS,
            ),
        ),
        (
            b"BODY[1.HEADER.FIELDS ({7+}\r\nSubject)]",
            (c.FetchAttr("BODY", c.Section((1,), "HEADER.FIELDS", ("Subject",))),),
        ),
    ],
)
def test_fetch_items(items: bytes, expected: tuple[c.FetchAttr, ...]) -> None:
    assert one(b"f FETCH 1:* " + items + b"\r\n") == c.Fetch("f", seq("1:*"), expected)


def test_uid_fetch() -> None:
    assert one(b"f UID FETCH 4:2,7 (UID RFC822.SIZE)\r\n") == c.Fetch(
        "f", seq("2:4,7"), (c.FetchAttr("UID"), SIZE), uid=True
    )


#: FETCH item lists refused with BAD (see :func:`test_invalid_arguments`).
INVALID_FETCH_ITEMS = [
    b"(ALL)",
    b"(FLAGS ALL)",
    b"BINARY[1.TEXT]",  # section-binary: part numbers only (RFC 3516 §6)
    b"BODY.PEEK",
    b"BODY[MIME]",
    b"BODY[0]",
    b"BODY[1.]",
    b"BODY[1.2.BOGUS]",
    b"BODY[HEADER.FIELDS ()]",
    b"BODY[HEADER.FIELDS]",
    b"BODY[HEADER.FIELDS (FROM:)]",
    b"BODY[]<0.0>",
    b"BODY[]<5>",
    b"BODY[]<1.2.3>",
    b"BODY[",
    b"FLAGS<0.5>",
    b"()",
    b"(FLAGS",
    b"(FLAGS))",
    b"((FLAGS)",
    b"FLAGS UID",
    b"RFC822.PEEK",
]


def test_fetch_invalid_sequence() -> None:
    assert bad(b"f FETCH 0 FLAGS\r\n").text == "Invalid sequence set"
    assert bad(b"f FETCH 1:x FLAGS\r\n").tag == "f"
    assert bad(b"f FETCH FLAGS\r\n").tag == "f"


def test_fetch_attr_names() -> None:
    attr = c.FetchAttr("BODY", c.Section((), "HEADER.FIELDS", ("FROM", "SUBJECT")), (0, 100),
                       peek=True)
    assert attr.response_name() == "BODY[HEADER.FIELDS (FROM SUBJECT)]<0>"
    assert str(attr) == "BODY.PEEK[HEADER.FIELDS (FROM SUBJECT)]<0.100>"
    assert not attr.sets_seen and attr.is_body_section
    body = c.FetchAttr("BODY", c.Section((1, 2), "MIME"))
    assert body.response_name() == "BODY[1.2.MIME]" and body.sets_seen
    assert c.FetchAttr("BODY", c.Section()).response_name() == "BODY[]"
    assert c.FetchAttr("BODY", c.Section((3,))).response_name() == "BODY[3]"
    odd = c.FetchAttr("BODY", c.Section((), "HEADER.FIELDS.NOT", ('X"y', "A B")))
    assert odd.response_name() == 'BODY[HEADER.FIELDS.NOT ("X\\"y" "A B")]'
    assert c.FetchAttr("RFC822").sets_seen and c.FetchAttr("RFC822.TEXT").sets_seen
    assert not c.FetchAttr("RFC822.HEADER").sets_seen and not c.FetchAttr("BODY").sets_seen
    assert c.FetchAttr("RFC822.SIZE").response_name() == "RFC822.SIZE"
    assert not c.FetchAttr("FLAGS").is_body_section


# --------------------------------------------------------------------------- STORE


@pytest.mark.parametrize(
    ("args", "mode", "silent", "flags"),
    [
        (b"FLAGS (\\Seen)", c.StoreMode.REPLACE, False, ("\\Seen",)),
        (b"+FLAGS \\deleted", c.StoreMode.ADD, False, ("\\Deleted",)),
        (
            b"-flags.silent (\\SEEN $Label1 \\Flagged)",
            c.StoreMode.REMOVE,
            True,
            ("\\Seen", "$Label1", "\\Flagged"),
        ),
        (b"+FLAGS.SILENT \\Answered \\Draft", c.StoreMode.ADD, True, ("\\Answered", "\\Draft")),
        (b"FLAGS ()", c.StoreMode.REPLACE, False, ()),
        (b"FLAGS (\\Seen \\Seen)", c.StoreMode.REPLACE, False, ("\\Seen",)),
        (b"+FLAGS (\\XCustom)", c.StoreMode.ADD, False, ("\\XCustom",)),
    ],
)
def test_store(args: bytes, mode: c.StoreMode, silent: bool, flags: tuple[str, ...]) -> None:
    assert one(b"s STORE 1:3 " + args + b"\r\n") == c.Store("s", seq("1:3"), mode, silent, flags)
    assert one(b"s UID STORE 1:3 " + args + b"\r\n") == c.Store(
        "s", seq("1:3"), mode, silent, flags, uid=True
    )


#: STORE arguments refused with BAD (see :func:`test_invalid_arguments`).
INVALID_STORE_ARGS = [
    b"FLAGZ (\\Seen)",
    b"*FLAGS (\\Seen)",
    b"FLAGS.LOUD (\\Seen)",
    b"FLAGS",
    b"FLAGS (\\*)",
    b"FLAGS (\\Seen",
    b"FLAGS \\Seen)",
    b"FLAGS (\\)",
    b"+FLAGS",
    b"FLAGS (\\Seen) (\\Draft)",
]


# --------------------------------------------------------------------------- SEARCH


def search_key(text: bytes) -> c.SearchKey:
    event = one(b"s SEARCH " + text + b"\r\n")
    assert isinstance(event, c.Search), event
    return event.criteria


D = date(2024, 2, 1)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (b"ALL", c.SearchAll()),
        (b"ANSWERED", c.SearchFlag("\\Answered", True)),
        (b"BCC bob", c.SearchHeader("bcc", "bob")),
        (b"BEFORE 1-Feb-2024", c.SearchInternalDate(c.DateRelation.BEFORE, D)),
        (b'BODY "rendez-vous"', c.SearchBody("rendez-vous")),
        (b"CC {3+}\r\nann", c.SearchHeader("cc", "ann")),
        (b"DELETED", c.SearchFlag("\\Deleted", True)),
        (b"DRAFT", c.SearchFlag("\\Draft", True)),
        (b"FLAGGED", c.SearchFlag("\\Flagged", True)),
        (b"FROM dr.house@example.org", c.SearchHeader("from", "dr.house@example.org")),
        (b"HEADER Message-ID <a@b>", c.SearchHeader("message-id", "<a@b>")),
        (b'HEADER "X-Priority" ""', c.SearchHeader("x-priority", "")),
        (b"KEYWORD $Forwarded", c.SearchFlag("$Forwarded", True)),
        (b"LARGER 1024", c.SearchLarger(1024)),
        (b"NEW", c.SearchAnd((c.SearchFlag("\\Recent", True), c.SearchFlag("\\Seen", False)))),
        (b"NOT SEEN", c.SearchNot(c.SearchFlag("\\Seen", True))),
        (b"OLD", c.SearchFlag("\\Recent", False)),
        (b"ON 01-Feb-2024", c.SearchInternalDate(c.DateRelation.ON, D)),
        (b"OR SEEN FLAGGED",
         c.SearchOr(c.SearchFlag("\\Seen", True), c.SearchFlag("\\Flagged", True))),
        (b"RECENT", c.SearchFlag("\\Recent", True)),
        (b"SEEN", c.SearchFlag("\\Seen", True)),
        (b'SENTBEFORE "1-feb-2024"', c.SearchSentDate(c.DateRelation.BEFORE, D)),
        (b"SENTON 1-FEB-2024", c.SearchSentDate(c.DateRelation.ON, D)),
        (b"SENTSINCE 1-Feb-2024", c.SearchSentDate(c.DateRelation.SINCE, D)),
        (b"SINCE 1-Feb-2024", c.SearchInternalDate(c.DateRelation.SINCE, D)),
        (b"SMALLER 0", c.SearchSmaller(0)),
        (b'SUBJECT "R\xc3\xa9sultats"', c.SearchHeader("subject", "Résultats")),
        (b"TEXT ordonnance", c.SearchText("ordonnance")),
        (b"TO patient", c.SearchHeader("to", "patient")),
        (b"UID 1:*", c.SearchSet(seq("1:*"), uid=True)),
        (b"UNANSWERED", c.SearchFlag("\\Answered", False)),
        (b"UNDELETED", c.SearchFlag("\\Deleted", False)),
        (b"UNDRAFT", c.SearchFlag("\\Draft", False)),
        (b"UNFLAGGED", c.SearchFlag("\\Flagged", False)),
        (b"UNKEYWORD $Junk", c.SearchFlag("$Junk", False)),
        (b"UNSEEN", c.SearchFlag("\\Seen", False)),
        (b"2,4:7,9", c.SearchSet(seq("2,4:7,9"))),
        (b"*", c.SearchSet(seq("*"))),
        (b"(SEEN)", c.SearchFlag("\\Seen", True)),
        (
            b"unseen deleted",
            c.SearchAnd((c.SearchFlag("\\Seen", False), c.SearchFlag("\\Deleted", True))),
        ),
    ],
)
def test_search_keys(text: bytes, expected: c.SearchKey) -> None:
    assert search_key(text) == expected


def test_search_or_not_nesting() -> None:
    text = b"OR (FROM alice TO bob) NOT OR SEEN (FLAGGED SINCE 5-Mar-2024) UID 3:*"
    assert search_key(text) == c.SearchAnd(
        (
            c.SearchOr(
                c.SearchAnd((c.SearchHeader("from", "alice"), c.SearchHeader("to", "bob"))),
                c.SearchNot(
                    c.SearchOr(
                        c.SearchFlag("\\Seen", True),
                        c.SearchAnd(
                            (
                                c.SearchFlag("\\Flagged", True),
                                c.SearchInternalDate(c.DateRelation.SINCE, date(2024, 3, 5)),
                            )
                        ),
                    )
                ),
            ),
            c.SearchSet(seq("3:*"), uid=True),
        )
    )
    assert search_key(b"NOT NOT (((ALL)))") == c.SearchNot(c.SearchNot(c.SearchAll()))
    assert search_key(b"OR OR SEEN DRAFT OR 1 2") == c.SearchOr(
        c.SearchOr(c.SearchFlag("\\Seen", True), c.SearchFlag("\\Draft", True)),
        c.SearchOr(c.SearchSet(seq("1")), c.SearchSet(seq("2"))),
    )


def test_search_charset_utf8_with_literal() -> None:
    data = b"s UID SEARCH CHARSET UTF-8 SUBJECT {9}\r\nR\xc3\xa9sultat FROM x\r\n"
    assert events(data) == [
        NeedContinuation("s", 9, "UID SEARCH"),
        c.Search(
            "s",
            "UTF-8",
            c.SearchAnd((c.SearchHeader("subject", "Résultat"), c.SearchHeader("from", "x"))),
            uid=True,
        ),
    ]
    assert one(b"s SEARCH charset utf-8 TEXT {3+}\r\n\xe6\x97\xa5\r\n") == c.Search(
        "s", "UTF-8", c.SearchText("日")
    )
    assert one(b's SEARCH CHARSET "US-ASCII" ALL\r\n') == c.Search("s", "US-ASCII", c.SearchAll())


def test_search_charset_errors() -> None:
    event = one(b"s SEARCH CHARSET KOI8-R SUBJECT x\r\n")
    assert event == c.InvalidCommand(
        "s", "Unsupported charset", status="NO", code="BADCHARSET (UTF-8 US-ASCII)"
    )
    assert bad(b"s SEARCH CHARSET UTF-8 SUBJECT {1+}\r\n\xff\r\n").text == (
        "Invalid characters for charset"
    )
    assert bad(b"s SEARCH CHARSET US-ASCII SUBJECT {2+}\r\n\xc3\xa9\r\n").tag == "s"
    bad(b"s SEARCH CHARSET UTF-8\r\n")
    bad(b"s SEARCH CHARSET\r\n")


#: SEARCH keys refused with BAD (see :func:`test_invalid_arguments`).
INVALID_SEARCH_KEYS = [
    b"",
    b"FROM",
    b"BOGUS",
    b"(SEEN",
    b"SEEN)",
    b"((SEEN)",
    b"()",
    b"OR SEEN",
    b"NOT",
    b"SINCE 32-Jan-2024",
    b"SINCE 1-Foo-2024",
    b"SINCE 2024-01-01",
    b"SINCE 29-Feb-2023",
    b"LARGER x",
    b"LARGER 4294967296",
    b"UID",
    b"UID x",
    b"KEYWORD \\Seen",
    b"HEADER From: x",
    b"HEADER",
    b"SEEN  DRAFT",
    b"0",
    b"1:x",
    b"UNRECENT",
]


@pytest.mark.parametrize(
    "line",
    INVALID_LINES
    + [b"a FETCH 1 " + items for items in INVALID_FETCH_ITEMS]
    + [b"a STORE 1 " + args for args in INVALID_STORE_ARGS]
    + [b"a SEARCH " + text for text in INVALID_SEARCH_KEYS],
)
def test_invalid_arguments(line: bytes) -> None:
    event = bad(line + b"\r\n")
    assert event.tag == "a"
    assert event.text and "\n" not in event.text


@pytest.mark.parametrize(
    ("line", "text"),
    [
        (b"a SEARCH LARGER 4294967295", None),  # the largest number (RFC 3501 section 9)
        (b"a SEARCH LARGER 4294967296", "Number out of range"),
        (b"a SEARCH LARGER 99999999999", "Number out of range"),  # refused by its length
        (b"a SEARCH LARGER x", "Expected a number"),
        (b"a FETCH 1 BODY[]<0.0>", "Expected a non-zero number"),
        (b"a SEARCH MODSEQ 9223372036854775807", None),  # the largest (RFC 7162 section 7)
        (b"a SEARCH MODSEQ 9223372036854775808", "Mod-sequence out of range"),
        (b"a SEARCH MODSEQ 99999999999999999999", "Mod-sequence out of range"),
        (b"a SEARCH MODSEQ x", "Expected a mod-sequence"),
    ],
)
def test_number_bounds_and_their_refusals(line: bytes, text: str | None) -> None:
    """``number`` and ``mod-sequence-value`` up to their maximum; past it, or not digits,
    BAD with the text that says which."""
    if text is None:
        assert not isinstance(one(line + b"\r\n"), c.InvalidCommand)
    else:
        assert bad(line + b"\r\n").text == text


def test_search_depth_limit() -> None:
    ok = b"NOT " * MAX_SEARCH_DEPTH + b"ALL"
    assert isinstance(search_key(ok), c.SearchNot)
    too_deep = b"NOT " * (MAX_SEARCH_DEPTH + 1) + b"ALL"
    assert bad(b"s SEARCH " + too_deep + b"\r\n").text == "Search too deeply nested"
    parens = b"(" * 2000 + b"ALL" + b")" * 2000
    assert bad(b"s SEARCH " + parens + b"\r\n").text == "Search too deeply nested"


# --------------------------------------------------------------------------- APPEND


def test_append_with_flags_date_and_binary_literal() -> None:
    message = b"Subject: x\r\n\r\nNUL\x00 and bare CR\r here\nand LF\r\n"
    data = (
        b'a APPEND "Sent" (\\Seen \\draft $MDNSent) "05-Mar-2024 14:30:00 +0100" {'
        + str(len(message)).encode()
        + b"}\r\n"
        + message
        + b"\r\n"
    )
    expected = c.Append(
        "a",
        "Sent",
        ("\\Seen", "\\Draft", "$MDNSent"),
        datetime(2024, 3, 5, 14, 30, tzinfo=timezone(timedelta(hours=1))),
        message,
    )
    assert events(data) == [NeedContinuation("a", len(message), "APPEND"), expected]
    result = commands(data.replace(b"}\r\n", b"+}\r\n", 1))
    assert result == [expected]
    assert isinstance(result[0], c.Append) and result[0].message == message


@pytest.mark.parametrize(
    ("args", "flags", "when"),
    [
        (b"", (), None),
        (b" ()", (), None),
        (b" (\\Seen)", ("\\Seen",), None),
        (
            b' " 5-Mar-2024 00:00:59 -0530"',
            (),
            datetime(2024, 3, 5, 0, 0, 59, tzinfo=timezone(-timedelta(hours=5, minutes=30))),
        ),
        (
            b' "5-mar-2024 23:59:59 +0000"',
            (),
            datetime(2024, 3, 5, 23, 59, 59, tzinfo=UTC),
        ),
    ],
)
def test_append_variants(args: bytes, flags: tuple[str, ...], when: datetime | None) -> None:
    data = b"a APPEND inbox" + args + b" {2+}\r\nhi\r\n"
    assert one(data) == c.Append("a", "INBOX", flags, when, b"hi")


@pytest.mark.parametrize(
    "data",
    [
        b'a APPEND INBOX "message as quoted"\r\n',
        b"a APPEND INBOX\r\n",
        b'a APPEND INBOX "32-Mar-2024 00:00:00 +0000" {1+}\r\nx\r\n',
        b'a APPEND INBOX "05-Mar-2024 24:00:00 +0000" {1+}\r\nx\r\n',
        b'a APPEND INBOX "05-Mar-2024 10:00:00 +0070" {1+}\r\nx\r\n',
        b'a APPEND INBOX "05-Mar-2024 10:00:00" {1+}\r\nx\r\n',
        b'a APPEND INBOX "05-Mar-2024 10:00:00 +0000" (\\Seen) {1+}\r\nx\r\n',
        b"a APPEND INBOX {1+}\r\nx extra\r\n",
        b"a APPEND INBOX (\\Seen {1+}\r\nx\r\n",
    ],
)
def test_append_invalid(data: bytes) -> None:
    bad(data)


# --------------------------------------------------------------------------- robustness


def test_random_garbage_never_raises() -> None:
    rng = random.Random(3501)
    pieces = [
        b"a",
        b"1",
        b" ",
        b"(",
        b")",
        b"[",
        b"]",
        b"<",
        b">",
        b"{",
        b"}",
        b"{3}",
        b"{2+}",
        b"\r\n",
        b"\r",
        b"\n",
        b'"',
        b"\\",
        b"*",
        b"%",
        b"+",
        b"\x00",
        b"\xff",
        b"UID",
        b"FETCH",
        b"SEARCH",
        b"BODY[",
        b"HEADER.FIELDS",
        b"OR",
        b"NOT",
        b"APPEND",
        b"LOGIN",
        b"STORE",
        b"FLAGS",
        b"&",
        b"-",
        b"&AMk-",
        b"1:*",
        b"NIL",
        b"CHARSET",
        b"LIST",
    ]
    for _ in range(300):
        data = b"".join(rng.choice(pieces) for _ in range(rng.randint(1, 40))) + b"\r\n"
        parser = CommandParser(max_line=64, max_literal=16, max_command=32)
        position = 0
        while position < len(data):
            step = rng.randint(1, 7)
            parser.feed(data[position : position + step])
            position += step
            while (event := parser.next_event()) is not None:
                if isinstance(event, c.InvalidCommand):
                    assert event.status in ("BAD", "NO") and event.text
        parser.feed(b"\r\n")
        while parser.next_event() is not None:
            pass


def test_many_pipelined_commands_in_one_feed() -> None:
    data = b"".join(b"t%d NOOP\r\n" % i for i in range(20000))
    parser = CommandParser()
    parser.feed(data)
    count = 0
    while (event := parser.next_event()) is not None:
        assert isinstance(event, c.Noop)
        count += 1
    assert count == 20000 and parser.buffered_bytes == 0


def test_large_literal_in_chunks() -> None:
    message = bytes(range(256)) * 4096  # 1 MiB, every byte value
    parser = CommandParser()
    parser.feed(b"a APPEND INBOX {%d+}\r\n" % len(message))
    assert parser.next_event() is None
    for start in range(0, len(message), 65536):
        parser.feed(message[start : start + 65536])
        assert parser.next_event() is None
    parser.feed(b"\r\n")
    event = parser.next_event()
    assert isinstance(event, c.Append) and event.message == message


def test_reject_literal_only_before_its_first_byte() -> None:
    parser = CommandParser()
    parser.feed(b"a LOGIN {5}\r\n")
    assert isinstance(parser.next_event(), NeedContinuation)
    parser.feed(b"ab")
    assert parser.next_event() is None
    with pytest.raises(RuntimeError):
        parser.reject_literal()
    parser.feed(b"cde pw\r\n")
    assert parser.next_event() == c.Login("a", "abcde", b"pw")


# --------------------------------------------------------------------------- RFC 7162, 4731


def test_condstore_qresync_and_esearch_syntax() -> None:
    big = 2**63 - 1
    assert one(b"a SELECT INBOX (CONDSTORE)\r\n") == c.Select("a", "INBOX", condstore=True)
    assert one(b"a EXAMINE INBOX (QRESYNC (7 %d 1:5,9 (1:3 2:4)))\r\n" % big) == c.Select(
        "a", "INBOX", True, qresync=c.QResync(7, big, seq("1:5,9"), (seq("1:3"), seq("2:4"))))
    assert one(b"a SELECT INBOX (QRESYNC (7 12 (1 2)))\r\n") == c.Select(
        "a", "INBOX", qresync=c.QResync(7, 12, None, (seq("1"), seq("2"))))
    fetch = one(b"a UID FETCH 1:* (FLAGS) (CHANGEDSINCE 0 VANISHED)\r\n")
    assert isinstance(fetch, c.Fetch) and (fetch.changedsince, fetch.vanished) == (0, True)
    store = one(b"a STORE 1 (UNCHANGEDSINCE 5) -FLAGS.SILENT (x)\r\n")
    assert isinstance(store, c.Store) and store.unchangedsince == 5 and store.silent
    assert one(b'a SEARCH MODSEQ "/flags/\\\\seen" all 4\r\n') == c.Search(
        "a", None, c.SearchModseq(4))
    assert one(b"a STATUS INBOX (HIGHESTMODSEQ)\r\n") == c.Status("a", "INBOX", ("HIGHESTMODSEQ",))
    assert one(b"a SEARCH RETURN () ALL\r\n") == c.Search("a", None, c.SearchAll(),
                                                          returns=("ALL",))
    assert one(b"a UID SEARCH RETURN (COUNT MIN) ALL\r\n") == c.Search(
        "a", None, c.SearchAll(), True, ("COUNT", "MIN"))
    for line in (
        b"a SELECT INBOX (QRESYNC (0 1))",  # UIDVALIDITY is non-zero
        b"a SELECT INBOX (QRESYNC (1 0))",  # so is the mod-sequence
        b"a SELECT INBOX (QRESYNC (1 %d))" % (big + 1),
        b"a SELECT INBOX (FOO)",
        b"a SELECT INBOX ()",
        b"a FETCH 1 FLAGS (VANISHED)",  # VANISHED needs UID FETCH and CHANGEDSINCE
        b"a FETCH 1 FLAGS (CHANGEDSINCE 1 VANISHED)",
        b"a FETCH 1 FLAGS (CHANGEDSINCE)",
        b"a STORE 1 (UNCHANGEDSINCE x) FLAGS (a)",
        b"a STORE 1 (FOO 1) FLAGS (a)",
        b"a SEARCH MODSEQ \"/flags/x\" nope 4",
        b"a SEARCH RETURN (SAVE NOPE) ALL",
        b"a SEARCH RETURN ALL",
    ):
        assert bad(line + b"\r\n").tag == "a", line


def test_large_commands_come_back_to_be_parsed_elsewhere() -> None:
    """``defer_large``: a command of more than DEFER_LITERALS literals or DEFER_TEXT bytes
    comes back as ParseLater (the server parses it in a worker thread, so that a 60 KB LIST of
    6,000 empty literals does not hold the event loop), and its ``parse`` gives what parsing
    at once gives; smaller commands, and every command without ``defer_large``, are parsed at
    once."""
    from imap_store.imap.parser import DEFER_LITERALS, DEFER_TEXT, ParseLater

    storm = b'a LIST "" ("" {0+}\r\n' + b' "" {0+}\r\n' * (DEFER_LITERALS + 1) + b')\r\n'
    long_text = b"b UID SEARCH UID " + b",".join(b"%d" % n for n in range(1, DEFER_TEXT // 4))
    small = b'c LIST "" ("" {0+}\r\n' + b' "" {0+}\r\n' * (DEFER_LITERALS - 1) + b')\r\n'
    for data, deferred in ((storm, True), (long_text + b"\r\n", True), (small, False)):
        later = CommandParser(max_line=4 * DEFER_TEXT, defer_large=True)
        now = CommandParser(max_line=4 * DEFER_TEXT)
        later.feed(data)
        now.feed(data)
        event, expected = later.next_event(), now.next_event()
        assert isinstance(event, ParseLater) is deferred, data[:20]
        assert not isinstance(expected, ParseLater)
        assert (event.parse() if isinstance(event, ParseLater) else event) == expected
        assert isinstance(expected, (c.List, c.Search)), expected


def test_literal_remaining_counts_what_a_literal_still_needs() -> None:
    """``literal_remaining``: 0 while lines are read; after a literal's announcement, the
    bytes of it not fed yet (the server feeds those whole and lines in small slices)."""
    parser = CommandParser()
    assert parser.literal_remaining == 0
    parser.feed(b"a APPEND Drafts {10}\r\n")
    assert isinstance(parser.next_event(), NeedContinuation)
    assert parser.literal_remaining == 10
    parser.feed(b"0123")
    assert parser.next_event() is None
    assert parser.literal_remaining == 6
    parser.feed(b"456789\r\n")
    assert isinstance(parser.next_event(), c.Append)
    assert parser.literal_remaining == 0
