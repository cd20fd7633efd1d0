"""Change signals (issue 13, ``imap_store/store/signals.py``): an IDLE session is told of a
change committed by another ``serve`` process on the same database (PostgreSQL: LISTEN/NOTIFY;
SQLite: Unix datagram sockets) or by another listener of its own process, at the commit.

The gateways here poll for changes once an hour (``[imap] poll_interval = 3600``): whatever
reaches an idling session within the tests' waits came by a signal, not by the poll."""

from __future__ import annotations

import asyncio
import re
import shutil
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from imap_store.store.signals import ChangeSignals, socket_directory
from tests.conftest import CHRISTELLE, INAYA, PATIENT_PASSWORD, prepare_gateway, running
from tests.gateway_proc import Gateway
from tests.helpers import second_gateway, smtp, tls_context

ADDRESS = f"{INAYA}@patient.mssante.fr"
#: Seconds a test waits for a signal (far below the hour of the poll).
WAIT = 20.0


def slow_poll(gw: Gateway) -> None:
    text = gw.config.read_text(encoding="utf-8")
    text, n = re.subn(r'(?m)^(\[imap\]\nlisten = "[^"]*")', r"\1\npoll_interval = 3600", text)
    assert n == 1
    gw.config.write_text(text, encoding="utf-8")


@pytest.fixture
def pair(gw_dir: Path) -> Iterator[tuple[Gateway, Gateway]]:
    gw = prepare_gateway(gw_dir)
    assert isinstance(gw, Gateway)
    slow_poll(gw)
    other = second_gateway(gw)
    for first in running(gw):
        for second in running(other):
            yield first, second  # type: ignore[misc]


class Idler:
    """A raw IMAPS session of Inaya, INBOX selected, idling."""

    def __init__(self, gw: Gateway) -> None:
        raw = socket.create_connection(("127.0.0.1", gw.ports["imaps"]), timeout=WAIT)
        self.sock: ssl.SSLSocket = tls_context(gw).wrap_socket(raw, server_hostname="localhost")
        self.buffer = b""
        self.line()  # greeting
        self.command("l", f'LOGIN {INAYA} "{PATIENT_PASSWORD}"')
        lines = self.command("s", "SELECT INBOX")
        self.exists = next(int(m[1]) for line in lines
                           if (m := re.match(rb"\* (\d+) EXISTS", line)))
        self.sock.sendall(b"i IDLE\r\n")
        assert self.line().startswith(b"+ ")

    def line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            assert chunk, "connection closed"
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\r\n")
        return line + b"\r\n"

    def command(self, tag: str, text: str) -> list[bytes]:
        self.sock.sendall(f"{tag} {text}\r\n".encode())
        lines = [self.line()]
        while not lines[-1].startswith(tag.encode() + b" "):
            lines.append(self.line())
        assert lines[-1].startswith(tag.encode() + b" OK"), lines
        return lines

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Idler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def deliver(gw: Gateway, subject: str) -> None:
    with smtp(gw, CHRISTELLE) as s:
        s.sendmail(CHRISTELLE, [ADDRESS], (
            f"From: {CHRISTELLE}\r\nTo: {ADDRESS}\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject.replace(' ', '.')}@test>\r\n\r\nBonjour.\r\n").encode())


@pytest.mark.parametrize("by", [1, 0], ids=["another_serve_process", "smtp_in_of_its_own"])
def test_idle_hears_of_a_delivery(pair: tuple[Gateway, Gateway], by: int) -> None:
    """The delivery is made by the second ``serve`` process, or by the SMTP listener of the
    idling session's own process."""
    with Idler(pair[0]) as idler:
        deliver(pair[by], "signal one")
        assert idler.line() == f"* {idler.exists + 1} EXISTS\r\n".encode()
        deliver(pair[by], "signal two")
        lines = [idler.line()]
        while not lines[-1].endswith(b"EXISTS\r\n"):
            lines.append(idler.line())
        assert lines[-1] == f"* {idler.exists + 2} EXISTS\r\n".encode()


def test_idle_hears_of_a_flag_set_in_another_serve_process(
    pair: tuple[Gateway, Gateway],
) -> None:
    first, second = pair
    with Idler(first) as idler, Idler(second) as other:
        other.sock.sendall(b"DONE\r\n")
        assert other.line().startswith(b"i OK")
        other.command("f", "STORE 1 +FLAGS (\\Flagged)")
        line = idler.line()
        flagged = rb"\* 1 FETCH \((UID 1 )?FLAGS \([^)]*\\Flagged[^)]*\)\)\r\n"
        assert re.fullmatch(flagged, line), line


def test_a_socket_left_by_a_dead_process_is_removed(tmp_path: Path) -> None:
    database = tmp_path / "gateway.db"
    directory = socket_directory(str(database))
    directory.mkdir(mode=0o700)
    stale = directory / "999999999.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    dead.bind(str(stale))
    dead.close()  # the file stays, nobody reads it
    try:
        async def scenario() -> tuple[int, bool]:
            receiver = ChangeSignals(f"sqlite:///{database}")
            sender = ChangeSignals(f"sqlite:///{database}")
            woken = asyncio.Event()
            receiver.subscribe(woken.set)
            receiver.start()
            sender.start()
            try:
                sender.committed()
                await asyncio.wait_for(woken.wait(), WAIT)
                return receiver.received, stale.exists()
            finally:
                await sender.close()
                await receiver.close()

        received, stale_left = asyncio.run(scenario())
        assert received >= 1
        assert not stale_left
    finally:
        shutil.rmtree(directory, ignore_errors=True)
