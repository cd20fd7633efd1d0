"""Security regressions: SMTP smuggling and end-of-data ambiguity. Only CRLF.CRLF ends a DATA
section (a bare LF or CR anywhere in it is refused whole, RFC 5321 §2.3.8, §4.1.1.4), and only
CRLF ends an IMAP command line (RFC 3501 §2.2), so commands hidden behind a bare newline are
never run."""

from __future__ import annotations

import pytest

from imap_store.imap.commands import InvalidCommand
from imap_store.imap.parser import CommandParser
from smtp_in.data import DataState
from tests.conftest import DUPOND, INAYA
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


def test_smuggling_bare_lf_refused(gateway: Gateway) -> None:
    with raw_session(gateway, DUPOND) as sock:
        raw_mail(sock, DUPOND, PATIENT)
        reply = exchange(sock, sample("10") + b"\r\n.\r\n")
        assert reply[0].startswith(b"554 5.6.0"), reply
        # The smuggled commands were never run: the session is still in its own state.
        assert exchange(sock, b"NOOP\r\n")[0].startswith(b"250")
        assert exchange(sock, b"QUIT\r\n")[0].startswith(b"221")
        assert len(mailbox(gateway.directory, INAYA)) == 1  # welcome only


def test_bare_cr_refused(gateway: Gateway) -> None:
    with raw_session(gateway, DUPOND) as sock:
        raw_mail(sock, DUPOND, PATIENT)
        data = f"From: {DUPOND}\r\nSubject: x\r\n\r\nhello\rworld\r\n.\r\n".encode()
        assert exchange(sock, data)[0].startswith(b"554 5.6.0")


def test_bare_lf_does_not_end_an_imap_line() -> None:
    parser = CommandParser()
    parser.feed(b"a NOOP\n")
    assert parser.next_event() is None
    parser.feed(b"\r\n")
    event = parser.next_event()
    assert isinstance(event, InvalidCommand) and event.tag == "a"
