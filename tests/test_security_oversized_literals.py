"""Security regressions: oversized literals and over-long lines, above all before login. A
literal over the limit is refused before any of it is read (synchronising) or drained without
ever being parsed (LITERAL+), an over-long line is drained, not buffered; in both cases the
next command is read as it should be and nothing hidden inside the refused bytes runs
(RFC 3501 §7.5, RFC 7888, RFC 7889 APPENDLIMIT)."""

from __future__ import annotations

import pytest

from imap_store.imap.commands import Append, InvalidCommand, Noop, Select
from imap_store.imap.parser import CommandParser, Event, LineTooLong, LiteralTooLarge
from tests.conftest import INAYA, PATIENT_PASSWORD
from tests.gateway_proc import Gateway
from tests.helpers import Raw, commands, events

# --------------------------------------------------------------------------- the parser: literals


@pytest.mark.parametrize("marker", [b"{11}", b"{0011}", b"{99999999999999999999999999}"])
def test_sync_literal_too_large_refused_before_reading(marker: bytes) -> None:
    parser = CommandParser(max_literal=10)
    parser.feed(b"a APPEND INBOX " + marker + b"\r\n")
    event = parser.next_event()
    assert isinstance(event, LiteralTooLarge)
    assert (event.tag, event.synchronizing) == ("a", True)
    assert event.size > 10
    assert parser.next_event() is None
    # The client got no "+": it does not send the literal; the next bytes are a new command.
    parser.feed(b"b NOOP\r\n")
    assert parser.next_event() == Noop("b")


def test_sync_literal_too_large_whole_and_bytewise() -> None:
    assert events(b"a APPEND INBOX {11}\r\nb NOOP\r\n", max_literal=10) == [
        LiteralTooLarge("a", 11, True),
        Noop("b"),
    ]


def test_non_sync_literal_too_large_is_drained() -> None:
    parser = CommandParser(max_literal=10)
    parser.feed(b"a APPEND INBOX {38+}\r\n")
    assert parser.next_event() == LiteralTooLarge("a", 38, False)
    assert parser.buffered_bytes == 0
    # The 38 bytes look like commands: none of them may be executed.
    smuggled = b"x LOGOUT\r\ny DELETE INBOX\r\nz LOGOUT\r\n\r\n"
    assert len(smuggled) == 38
    for byte in smuggled:
        parser.feed(bytes([byte]))
        assert parser.next_event() is None
        assert parser.buffered_bytes <= 1
    parser.feed(b"\r\nb NOOP\r\n")
    assert parser.next_event() == Noop("b")
    assert parser.next_event() is None


def test_non_sync_literal_too_large_whole_and_bytewise() -> None:
    smuggled = b"x LOGOUT\r\ny DELETE INBOX\r\nz LOGOUT\r\n\r\n"
    data = b"a APPEND INBOX {38+}\r\n" + smuggled + b"\r\nb NOOP\r\n"
    assert events(data, max_literal=10) == [LiteralTooLarge("a", 38, False), Noop("b")]


def test_drained_command_continues_after_further_literals() -> None:
    # The refused command goes on with another non-synchronising literal: drained as well.
    data = b"a LOGIN {30+}\r\n" + b"x" * 30 + b" {8+}\r\nx LOGOUT\r\nb NOOP\r\n"
    assert events(data, max_command=20) == [LiteralTooLarge("a", 30, False), Noop("b")]


def test_non_append_literals_are_bounded_by_max_command() -> None:
    assert events(b"a LOGIN {21}\r\nb NOOP\r\n", max_command=20) == [
        LiteralTooLarge("a", 21, True),
        Noop("b"),
    ]
    # The total of all literals of a command counts.
    assert events(b"a LOGIN {8+}\r\n12345678 {8}\r\nc NOOP\r\n", max_command=20) == [
        LiteralTooLarge("a", 8, True),
        Noop("c"),
    ]
    # APPEND's message literal may be as large as max_literal, whatever max_command says.
    message = b"x" * 100
    assert commands(
        b"a APPEND INBOX {100+}\r\n" + message + b"\r\n", max_command=64, max_literal=100
    ) == [Append("a", "INBOX", (), None, message)]
    assert events(
        b"a APPEND INBOX {101+}\r\n" + message + b"x\r\nb NOOP\r\n", max_command=64, max_literal=100
    ) == [LiteralTooLarge("a", 101, False), Noop("b")]


def test_unknown_command_with_literal_is_refused_without_reading_it() -> None:
    assert events(b"a FROB {5}\r\nb NOOP\r\n") == [
        InvalidCommand("a", "Unknown command"),
        Noop("b"),
    ]
    assert events(b"a FROB {9+}\r\nc LOGOUT\r\n\r\nb NOOP\r\n") == [
        InvalidCommand("a", "Unknown command"),
        Noop("b"),
    ]
    assert events(b"+ LOGIN {9+}\r\nc LOGOUT\r\n\r\nb NOOP\r\n") == [
        InvalidCommand(None, "Invalid tag"),
        Noop("b"),
    ]


# --------------------------------------------------------------------------- the parser: long lines


def test_over_long_line_is_drained_not_buffered() -> None:
    parser = CommandParser(max_line=100)
    parser.feed(b"a1 SEARCH SUBJECT ")
    assert parser.next_event() is None
    chunk = b"x" * 50
    reported: list[Event] = []
    for _ in range(2000):  # 100 kB line
        parser.feed(chunk)
        while (event := parser.next_event()) is not None:
            reported.append(event)
        assert parser.buffered_bytes <= 101 + len(chunk)
    assert reported == [LineTooLong("a1")]
    parser.feed(b"\r\nb NOOP\r\n")
    assert parser.next_event() == Noop("b")


def test_over_long_line_whole_and_bytewise() -> None:
    data = b"a NOOP " + b"y" * 300 + b"\r\nb NOOP\r\n"
    assert events(data, max_line=100) == [LineTooLong("a"), Noop("b")]


def test_line_of_exactly_max_line_is_accepted() -> None:
    line = b"a SELECT " + b"m" * 91
    assert len(line) == 100
    assert events(line + b"\r\n", max_line=100) == [Select("a", "m" * 91)]
    assert events(line + b"m\r\n", max_line=100) == [LineTooLong("a")]


def test_over_long_line_without_readable_tag() -> None:
    assert events(b"z" * 300 + b"\r\nb NOOP\r\n", max_line=100) == [LineTooLong(None), Noop("b")]


def test_over_long_continuation_line_keeps_the_tag() -> None:
    data = b"a LOGIN {3+}\r\nbob " + b"p" * 200 + b"\r\nb NOOP\r\n"
    assert events(data, max_line=100) == [LineTooLong("a"), Noop("b")]


@pytest.mark.parametrize("marker", [b"{10+}", b"{" + b"0" * 40 + b"10+}"])
def test_over_long_line_announcing_a_non_sync_literal(marker: bytes) -> None:
    smuggled = b"x LOGOUT\r\n"
    data = b"a LOGIN " + b"u" * 200 + b" " + marker + b"\r\n" + smuggled + b"\r\nb NOOP\r\n"
    assert events(data, max_line=100) == [LineTooLong("a"), Noop("b")]


def test_over_long_line_announcing_a_sync_literal_ends_the_command() -> None:
    data = b"a LOGIN " + b"u" * 200 + b" {10}\r\nb NOOP\r\n"
    assert events(data, max_line=100) == [LineTooLong("a"), Noop("b")]


def test_brace_inside_drained_line_is_not_a_marker() -> None:
    data = b"a LOGIN {5+} " + b"u" * 200 + b"\r\nb NOOP\r\n"
    assert events(data, max_line=100) == [LineTooLong("a"), Noop("b")]


# --------------------------------------------------------------------------- the server


def test_literals_oversize_and_limits(gateway: Gateway) -> None:
    raw = Raw(gateway)
    # Before login, an APPEND literal is refused before any of it is read.
    raw.send(b"a APPEND INBOX {100}\r\n")
    assert raw.line().startswith(b"a NO [TOOBIG]")
    raw.command("b", f'LOGIN {INAYA} "{PATIENT_PASSWORD}"')
    # RFC 7889: over APPENDLIMIT, refused with TOOBIG and never read; the session goes on.
    raw.send(b"c APPEND INBOX {26214401}\r\n")
    assert raw.line() == b"c NO [TOOBIG] Literal too large\r\n"
    assert raw.command("d", "NOOP")[-1] == b"d OK NOOP completed\r\n"
    # A synchronising literal gets its continuation; LITERAL+ needs none.
    message = b"Subject: x\r\n\r\nbody\r\n"
    raw.send(b"e APPEND INBOX {%d}\r\n" % len(message))
    assert raw.line() == b"+ Ready for literal\r\n"
    raw.send(message + b"\r\n")
    assert raw.until(b"e ")[-1].startswith(b"e OK [APPENDUID")
    raw.send(b"f APPEND INBOX {%d+}\r\n" % len(message) + message + b"\r\n")
    assert raw.until(b"f ")[-1].startswith(b"f OK [APPENDUID")
    raw.send(b"g " + b"X" * 10000 + b"\r\n")
    assert raw.line().startswith(b"g BAD")
    raw.command("h", "LOGOUT")
    raw.close()
