"""Test helpers: real SMTP and IMAP clients with dev certificates (smtplib, imaplib and
aioimaplib sessions, raw SMTP and IMAP lines, IMAP transcripts replayed), reading a mailbox
back, and feeding the sans-IO readers (the IMAP command parser, the SMTP DATA reader)."""

from __future__ import annotations

import asyncio
import imaplib
import shutil
import smtplib
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import aioimaplib
from sqlalchemy import select

from gateway.config import load_config
from imap_store.imap.commands import InvalidCommand
from imap_store.imap.parser import (
    DEFAULT_MAX_COMMAND,
    DEFAULT_MAX_LINE,
    DEFAULT_MAX_LITERAL,
    CommandParser,
    Event,
    NeedContinuation,
)
from imap_store.store import schema as t
from imap_store.store.directory import Store
from smtp_in.data import DataReader
from tests.gateway_proc import Gateway

SAMPLES = Path(__file__).parent / "samples"


def sample(name: str) -> bytes:
    """A message of tests/samples by its number prefix, e.g. ``sample("01")``."""
    return next(SAMPLES.glob(f"{name}-*.eml")).read_bytes()


def tls_context(gw: Gateway, client: str | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(gw.ca))
    if client is not None:
        folder = gw.directory / "clients" / client
        ctx.load_cert_chain(str(folder / "cert.pem"), str(folder / "key.pem"))
    return ctx


def imap_login(gw: Gateway, user: str | None = None,
               password: str | None = None) -> imaplib.IMAP4_SSL:
    """An imaplib client over IMAPS, logged in (the demo patient unless told)."""
    from tests.conftest import INAYA, PATIENT_PASSWORD

    conn = imaplib.IMAP4_SSL("127.0.0.1", gw.ports["imaps"], ssl_context=tls_context(gw),
                             timeout=30)
    conn.login(user or INAYA, password or PATIENT_PASSWORD)
    return conn


@asynccontextmanager
async def aioimaplib_login(gw: Gateway, user: str) -> AsyncIterator[aioimaplib.IMAP4_SSL]:
    """An aioimaplib client over IMAPS, logged in as ``user`` with the patients' password; LOGOUT
    when the block ends, and its transport closed whatever happens: aioimaplib leaves it to
    the server's close, and a socket that outlives its test is a ResourceWarning in the next."""
    from tests.conftest import PATIENT_PASSWORD

    client = aioimaplib.IMAP4_SSL("127.0.0.1", gw.ports["imaps"], ssl_context=tls_context(gw),
                                  timeout=30)
    try:
        await client.wait_hello_from_server()
        assert (await client.login(user, PATIENT_PASSWORD)).result == "OK"
        yield client
        await client.logout()
    finally:
        transport = getattr(client.protocol, "transport", None)
        if transport is not None and not transport.is_closing():
            transport.close()
        await asyncio.sleep(0.05)


def smtp(gw: Gateway, client: str | None = None, listener: str = "smtp") -> smtplib.SMTP:
    """An smtplib session after STARTTLS (or implicit TLS on ``submissions``)."""
    ctx = tls_context(gw, client)
    if listener == "submissions":
        conn: smtplib.SMTP = smtplib.SMTP_SSL("127.0.0.1", gw.ports[listener], context=ctx,
                                              timeout=30)
        conn.ehlo("client.test")
        return conn
    conn = smtplib.SMTP("127.0.0.1", gw.ports[listener], timeout=30)
    conn.ehlo("client.test")
    conn.starttls(context=ctx)
    conn.ehlo("client.test")
    return conn


def mailbox(gw_dir: Path, ins: str, name: str = "INBOX") -> list[bytes]:
    """The raw messages of a patient's mailbox, in UID order, read from the database."""

    async def read() -> list[bytes]:
        store = Store.from_url(load_config(gw_dir / "gateway.toml").storage_url)
        try:
            async with store.read() as conn:
                rows = await conn.execute(
                    select(t.blob.c.data)
                    .select_from(t.message.join(t.blob, t.blob.c.id == t.message.c.blob_id)
                                 .join(t.mailbox, t.mailbox.c.id == t.message.c.mailbox_id)
                                 .join(t.patient, t.patient.c.id == t.mailbox.c.patient_id))
                    .where(t.patient.c.ins == ins, t.mailbox.c.name == name)
                    .order_by(t.message.c.uid)
                )
                return [bytes(r[0]) for r in rows]
        finally:
            await store.close()

    return asyncio.run(read())


def server_log(gw: Gateway) -> str:
    """The ``serve`` process's log, for checks of what it must not hold: asserted to be that
    log (it says it was ready), so that an empty or missing file cannot pass them."""
    log = gw.log()
    assert "mssante-gateway ready" in log, log
    return log


def second_gateway(gw: Gateway) -> Gateway:
    """Another ``serve`` process on the same database (a copy of the directory: same keys,
    same storage URL), on its own ports; not started."""
    directory = gw.directory.parent / "gw2"
    shutil.copytree(gw.directory, directory,
                    ignore=shutil.ignore_patterns("serve-*.log", "*.db", "*.db-*"))
    other = Gateway(directory)
    other.assign_ports()
    return other


def body_after_received(stored: bytes) -> bytes:
    """Strip our Received: trace field (first header, folded over several lines)."""
    assert stored.startswith(b"Received: ")
    lines = stored.split(b"\r\n")
    i = 1
    while lines[i][:1] in (b" ", b"\t"):
        i += 1
    return b"\r\n".join(lines[i:])


@contextmanager
def noop_probe(port: int, ctx: ssl.SSLContext, login: str, password: str) -> Iterator[list[float]]:
    """A patient's IMAP session (implicit TLS on ``port``) sending NOOP after NOOP, 2 ms
    apart, while the block runs; yields the list of its answer times in seconds (complete
    when the block has ended). Used by tests/test_security_event_loop.py and
    bench/loop_hold.py to see how long other work holds the server's event loop."""
    client = imaplib.IMAP4_SSL("127.0.0.1", port, ssl_context=ctx, timeout=60)
    client.login(login, password)
    client.select("INBOX")
    for _ in range(5):  # warm: the first commands of a session read its state
        client.noop()
    waits: list[float] = []
    failures: list[object] = []
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            start = time.perf_counter()
            typ, data = client.noop()
            waits.append(time.perf_counter() - start)
            if typ != "OK":
                failures.append(data)
            time.sleep(0.002)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        time.sleep(0.05)
        yield waits
        time.sleep(0.1)
    finally:
        stop.set()
        thread.join(30)
        client.logout()
    assert not failures, failures


# --------------------------------------------------------------------------- raw SMTP


def raw_session(gw: Gateway, client: str, port: int | None = None,
                ctx: ssl.SSLContext | None = None,
                session: ssl.SSLSession | None = None) -> ssl.SSLSocket:
    """A socket on the ``smtp`` listener (or on ``port``) after EHLO and STARTTLS, with
    ``client``'s certificate (or the given ``ctx``), offering ``session`` to resume: for
    exact wire checks."""
    ctx = ctx if ctx is not None else tls_context(gw, client)
    sock = socket.create_connection(("127.0.0.1", port or gw.ports["smtp"]), timeout=30)
    f = sock.makefile("rb")
    assert f.readline().startswith(b"220")
    sock.sendall(b"EHLO raw.test\r\n")
    while not f.readline().startswith(b"250 "):
        pass
    sock.sendall(b"STARTTLS\r\n")
    assert f.readline().startswith(b"220")
    f.close()
    return ctx.wrap_socket(sock, server_hostname="127.0.0.1", session=session)


def exchange(sock: ssl.SSLSocket, data: bytes) -> list[bytes]:
    """Send ``data``, return the lines of the SMTP reply (all of a multi-line one; fewer
    if the server closes first)."""
    sock.sendall(data)
    lines: list[bytes] = []
    buf = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return lines
        buf += chunk
        while b"\r\n" in buf:
            line, buf = buf.split(b"\r\n", 1)
            lines.append(line)
            if line[3:4] == b" ":
                return lines


def raw_mail(sock: ssl.SSLSocket, sender: str, rcpt: str) -> None:
    """EHLO, MAIL, RCPT and DATA on a raw session, each accepted: the DATA section is next."""
    assert exchange(sock, b"EHLO raw.test\r\n")[-1].startswith(b"250 ")
    assert exchange(sock, f"MAIL FROM:<{sender}>\r\n".encode())[0].startswith(b"250")
    assert exchange(sock, f"RCPT TO:<{rcpt}>\r\n".encode())[0].startswith(b"250")
    assert exchange(sock, b"DATA\r\n")[0].startswith(b"354")


# --------------------------------------------------------------------------- raw IMAP


class Raw:
    """A line-level IMAP client over implicit TLS, for exact wire checks and timing."""

    def __init__(self, gw: Gateway, port: str = "imaps") -> None:
        sock = socket.create_connection(("127.0.0.1", gw.ports[port]), timeout=30)
        self.sock = tls_context(gw).wrap_socket(sock, server_hostname="127.0.0.1")
        self.file = self.sock.makefile("rb")
        self.greeting = self.file.readline()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        return self.file.readline()

    def until(self, prefix: bytes) -> list[bytes]:
        lines: list[bytes] = []
        while True:
            line = self.line()
            assert line, lines
            lines.append(line)
            if line.startswith(prefix):
                return lines

    def command(self, tag: str, text: str) -> list[bytes]:
        self.send(f"{tag} {text}\r\n".encode())
        return self.until(tag.encode() + b" ")

    def play(self, transcript: str) -> None:
        """Replay a transcript written as in the RFCs, one line each: ``C: <tag> <command>`` is
        sent, and its answer must be exactly the ``S:`` lines under it, in order (CRLF added)."""
        steps: list[tuple[str, list[bytes]]] = []
        for line in transcript.strip().splitlines():
            who, _, text = line.lstrip().partition(": ")
            if who == "C":
                steps.append((text, []))
            else:
                assert who == "S" and steps, line
                steps[-1][1].append(text.encode() + b"\r\n")
        assert steps, transcript
        for text, answer in steps:
            tag, _, command = text.partition(" ")
            got = self.command(tag, command)
            assert got == answer, (text, got)

    def close(self) -> None:
        self.file.close()
        self.sock.close()


# --------------------------------------------------------------------------- IMAP parser

React = Callable[[CommandParser, Event], None]


def _drain(parser: CommandParser, out: list[Event], react: React | None) -> None:
    while (event := parser.next_event()) is not None:
        out.append(event)
        if react is not None:
            react(parser, event)


def _run(
    chunks: list[bytes], react: React | None, max_line: int, max_literal: int, max_command: int
) -> list[Event]:
    parser = CommandParser(max_line=max_line, max_literal=max_literal, max_command=max_command)
    out: list[Event] = []
    for chunk in chunks:
        parser.feed(chunk)
        _drain(parser, out, react)
    return out


def events(
    data: bytes,
    react: React | None = None,
    *,
    max_line: int = DEFAULT_MAX_LINE,
    max_literal: int = DEFAULT_MAX_LITERAL,
    max_command: int = DEFAULT_MAX_COMMAND,
) -> list[Event]:
    """All events for ``data``, checked identical when fed whole and byte by byte."""
    limits = (max_line, max_literal, max_command)
    whole = _run([data], react, *limits)
    bytewise = _run([data[i : i + 1] for i in range(len(data))], react, *limits)
    assert whole == bytewise
    return whole


def commands(data: bytes, **limits: int) -> list[Event]:
    """Events of ``data`` without the NeedContinuation ones (the literal flow is implicit)."""
    return [e for e in events(data, None, **limits) if not isinstance(e, NeedContinuation)]


def one(data: bytes, **limits: int) -> Event:
    result = commands(data, **limits)
    assert len(result) == 1, result
    return result[0]


def bad(data: bytes, **limits: int) -> InvalidCommand:
    event = one(data, **limits)
    assert isinstance(event, InvalidCommand), event
    assert event.status == "BAD"
    return event


# --------------------------------------------------------------------------- SMTP DATA reader


def feed_data_reader(data: bytes, chunk: int | None, **kw: object) -> DataReader:
    """A DATA reader fed ``data`` whole (``chunk=None``) or in chunks of ``chunk`` bytes."""
    reader = DataReader(100_000, **kw)  # type: ignore[arg-type]
    if chunk is None:
        reader.feed(data)
        return reader
    for i in range(0, len(data), chunk):
        if reader.feed(data[i:i + chunk]):
            break
    return reader
