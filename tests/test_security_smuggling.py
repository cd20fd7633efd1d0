"""Security regressions: SMTP smuggling and end-of-data ambiguity. Only CRLF.CRLF ends a DATA
section, and only CRLF ends an IMAP command line (RFC 3501 §2.2), so commands hidden behind a
bare newline are never run. With ``[smtp] bare_newline = "reject"`` a bare LF or CR anywhere
in DATA refuses the message whole (RFC 5321 §2.3.8, §4.1.1.4); with ``"normalize"`` (the
default) a line ending in a bare LF is taken as CRLF, but a bare CR, or a "." line next to a
bare LF (the smuggled end of data), still refuses it whole."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from imap_store.imap.commands import InvalidCommand
from imap_store.imap.parser import CommandParser
from smtp_in.data import DataState
from tests.conftest import DUPOND, INAYA, prepare_gateway, running
from tests.gateway_proc import Gateway
from tests.helpers import exchange, feed_data_reader, mailbox, raw_mail, raw_session, sample

PATIENT = f"{INAYA}@patient.mssante.fr"

#: DATA sections with a bare LF or CR; each ends with a real CRLF.CRLF.
BARE_NEWLINES = [
    b"a\nb\r\n.\r\n",
    b"a\rb\r\n.\r\n",
    b"hello\n.\r\nMAIL FROM:<x@y>\r\n.\r\n",  # smuggling
    b"a\r\r\n.\r\n",
]


@pytest.mark.parametrize("data", BARE_NEWLINES)
@pytest.mark.parametrize("chunk", [None, 1, 2, 3, 7, 64])
def test_data_reader_refuses_bare_newlines(data: bytes, chunk: int | None) -> None:
    """The sans-IO DATA reader, fed whole, byte by byte and in chunks."""
    reader = feed_data_reader(data, chunk)
    assert reader.done and reader.state is DataState.BARE_NEWLINE


#: With bare LFs normalized, each of these still hides an end of data or has a bare CR.
SMUGGLED_WHEN_NORMALIZING = [
    (b"a\rb\r\n.\r\n", DataState.BARE_NEWLINE),
    (b"hello\n.\r\nMAIL FROM:<x@y>\r\n.\r\n", DataState.DOT_AFTER_BARE_LF),
    (b"hello\r\n.\nMAIL FROM:<x@y>\r\n.\r\n", DataState.DOT_AFTER_BARE_LF),
    (b"hello\n.\nMAIL FROM:<x@y>\r\n.\r\n", DataState.DOT_AFTER_BARE_LF),
    (b".\nMAIL FROM:<x@y>\r\n.\r\n", DataState.DOT_AFTER_BARE_LF),
    (b"a\r\r\n.\r\n", DataState.BARE_NEWLINE),
    (b"hello\r.\r\nRSET\r\n.\r\n", DataState.BARE_NEWLINE),
]


@pytest.mark.parametrize(("data", "state"), SMUGGLED_WHEN_NORMALIZING)
@pytest.mark.parametrize("chunk", [None, 1, 2, 3, 7, 64])
def test_data_reader_normalizing_refuses_smuggling(data: bytes, state: DataState,
                                                  chunk: int | None) -> None:
    reader = feed_data_reader(data, chunk, normalize_lf=True)
    assert reader.done and reader.state is state


@pytest.mark.parametrize("chunk", [None, 1, 2, 3, 7, 64])
def test_data_reader_normalizes_bare_lf(chunk: int | None) -> None:
    reader = feed_data_reader(b"A: b\n\nline\n..dot\n\nend\r\n.\r\nNOOP\r\n", chunk,
                              normalize_lf=True)
    assert reader.done and reader.state is DataState.OK
    assert reader.message() == b"A: b\r\n\r\nline\r\n.dot\r\n\r\nend\r\n"


@pytest.fixture
def rejecting(gw_dir: Path) -> Iterator[object]:
    """A running gateway with ``[smtp] bare_newline = "reject"`` (the default normalizes)."""
    gw = prepare_gateway(gw_dir)
    text = gw.config.read_text(encoding="utf-8")  # type: ignore[attr-defined]
    gw.config.write_text(  # type: ignore[attr-defined]
        text.replace("[smtp]\n", '[smtp]\nbare_newline = "reject"\n', 1), encoding="utf-8")
    yield from running(gw)


def _smuggle(gw: Gateway, expected: bytes) -> None:
    """Sample 10 (a bare LF, then ".", then commands) is refused whole and its commands are
    never run, whichever the setting."""
    with raw_session(gw, DUPOND) as sock:
        raw_mail(sock, DUPOND, PATIENT)
        reply = exchange(sock, sample("10") + b"\r\n.\r\n")
        assert reply[0].startswith(b"554 5.6.0") and expected in reply[0], reply
        # The smuggled commands were never run: the session is still in its own state.
        assert exchange(sock, b"NOOP\r\n")[0].startswith(b"250")
        assert exchange(sock, b"RCPT TO:<" + PATIENT.encode() + b">\r\n")[0].startswith(b"503")
        assert exchange(sock, b"QUIT\r\n")[0].startswith(b"221")
    assert len(mailbox(gw.directory, INAYA)) == 1  # welcome only


def test_smuggling_bare_lf_refused_normalizing(gateway: Gateway) -> None:
    _smuggle(gateway, b"next to a bare LF")


def test_smuggling_bare_lf_refused_rejecting(rejecting: Gateway) -> None:
    _smuggle(rejecting, b"bare LF or CR")


def _bare_cr(gw: Gateway) -> None:
    with raw_session(gw, DUPOND) as sock:
        raw_mail(sock, DUPOND, PATIENT)
        data = f"From: {DUPOND}\r\nSubject: x\r\n\r\nhello\rworld\r\n.\r\n".encode()
        assert exchange(sock, data)[0].startswith(b"554 5.6.0")
    assert len(mailbox(gw.directory, INAYA)) == 1  # welcome only


def test_bare_cr_refused(gateway: Gateway) -> None:
    _bare_cr(gateway)


def test_bare_cr_refused_rejecting(rejecting: Gateway) -> None:
    _bare_cr(rejecting)


def test_bare_lf_does_not_end_an_imap_line() -> None:
    parser = CommandParser()
    parser.feed(b"a NOOP\n")
    assert parser.next_event() is None
    parser.feed(b"\r\n")
    event = parser.next_event()
    assert isinstance(event, InvalidCommand) and event.tag == "a"
