"""aiosmtpd's internals that smtp_in/aiosmtpd_adapter.py relies on are still there (each check
names the attribute), the installed aiosmtpd is within the range pinned in pyproject.toml, and
``[limits] smtp_line_length`` reaches the DATA reader and its refusal."""

from __future__ import annotations

import asyncio
import collections
import inspect
import ssl
import tomllib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import aiosmtpd
import pytest
from aiosmtpd.smtp import SMTP, Envelope
from packaging.requirements import Requirement

from gateway.pki import create_dev_pki
from gateway.tls import server_context
from smtp_in import replies
from smtp_in.aiosmtpd_adapter import (
    CLASS_INTERNALS,
    INSTANCE_INTERNALS,
    READER_INTERNALS,
    AdaptedSMTP,
)
from smtp_in.data import LINE_LENGTH, DataReader, DataState, max_line_for
from smtp_in.settings import SmtpSettings
from tests.conftest import DUPOND, INAYA, prepare_gateway, running
from tests.gateway_proc import Gateway
from tests.helpers import mailbox, smtp

ROOT = Path(__file__).resolve().parent.parent
PATIENT = f"{INAYA}@patient.mssante.fr"


def _where() -> str:
    return (f"aiosmtpd {aiosmtpd.__version__}; smtp_in/aiosmtpd_adapter.py relies on it: "
            "adapt the adapter, then the pin in pyproject.toml")


# --- the pin ---------------------------------------------------------------------------------


def test_installed_aiosmtpd_is_within_the_pinned_range() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))["project"]
    pins = [Requirement(d) for d in project["dependencies"]
            if Requirement(d).name.lower() == "aiosmtpd"]
    assert len(pins) == 1, "pyproject.toml must list aiosmtpd once"
    specifier = pins[0].specifier
    assert any(s.operator in ("<", "<=", "~=", "==") for s in specifier), (
        f"aiosmtpd is pinned without an upper bound ({specifier}): its internals may change")
    assert specifier.contains(aiosmtpd.__version__), (
        f"installed aiosmtpd {aiosmtpd.__version__} is outside the pinned range {specifier}")


# --- the internals, on the class ---------------------------------------------------------------


@pytest.mark.parametrize("name", CLASS_INTERNALS)
def test_class_internal_exists(name: str) -> None:
    assert hasattr(SMTP, name), f"aiosmtpd.smtp.SMTP.{name} is missing ({_where()})"


@pytest.mark.parametrize(("name", "parameters"), [
    ("_getaddr", ["self", "arg"]),
    ("_set_post_data_state", ["self"]),
    ("_cb_client_connected", ["self", "reader", "writer"]),
])
def test_internal_method_signature(name: str, parameters: list[str]) -> None:
    method = getattr(SMTP, name, None)
    assert callable(method), f"aiosmtpd.smtp.SMTP.{name} is missing ({_where()})"
    found = list(inspect.signature(method).parameters)
    assert found == parameters, (
        f"aiosmtpd.smtp.SMTP.{name} now takes {found}, not {parameters} ({_where()})")


def test_command_size_limits_is_still_a_shared_class_dict() -> None:
    """Why each session gets its own dict: aiosmtpd's is one per class, raised at each EHLO."""
    assert isinstance(SMTP.command_size_limit, int), \
        f"aiosmtpd.smtp.SMTP.command_size_limit is not an int ({_where()})"
    assert isinstance(SMTP.command_size_limits, collections.defaultdict), \
        f"aiosmtpd.smtp.SMTP.command_size_limits is not a defaultdict ({_where()})"
    assert "command_size_limits['MAIL'] +=" in inspect.getsource(SMTP.smtp_EHLO), \
        f"aiosmtpd.smtp.SMTP.smtp_EHLO no longer raises command_size_limits ({_where()})"


def test_documented_attributes_we_set_exist() -> None:
    for name in ("line_length_limit", "local_part_limit"):
        assert hasattr(SMTP, name), f"aiosmtpd.smtp.SMTP.{name} is missing ({_where()})"


# --- the internals, on a live session -------------------------------------------------------------


class Probe(AdaptedSMTP):
    """A bare adapted server that remembers its sessions and counts ``parse_path`` calls."""

    sessions: ClassVar[list[Probe]] = []

    def __init__(self, tls: ssl.SSLContext) -> None:
        super().__init__(object(), tls_context=tls, loop=asyncio.get_running_loop())
        self.parsed: list[str] = []
        Probe.sessions.append(self)

    def parse_path(self, arg: str) -> tuple[str | None, str | None]:
        self.parsed.append(arg)
        return super().parse_path(arg)


@dataclass
class Line:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    async def command(self, text: str) -> list[bytes]:
        self.writer.write(text.encode() + b"\r\n")
        return await self.reply()

    async def reply(self) -> list[bytes]:
        lines: list[bytes] = []
        while True:
            line = await asyncio.wait_for(self.reader.readline(), 10)
            assert line, lines
            lines.append(line)
            if line[3:4] == b" ":
                return lines


@pytest.fixture
async def probe(tmp_path: Path) -> AsyncIterator[tuple[Probe, Line, ssl.SSLContext]]:
    pki = create_dev_pki(tmp_path / "certs", domain="adapter.test", hostnames=("localhost",),
                         dkim_selector="s1")
    tls = server_context(pki.server_cert, pki.server_key, None)
    client_tls = ssl.create_default_context(cafile=str(pki.ca_cert))
    Probe.sessions = []
    server = await asyncio.get_running_loop().create_server(lambda: Probe(tls), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    line = Line(reader, writer)
    try:
        assert (await line.reply())[0].startswith(b"220")
        assert len(Probe.sessions) == 1
        yield Probe.sessions[0], line, client_tls
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except (ConnectionError, ssl.SSLError):
            pass
        server.close()
        await server.wait_closed()


async def test_instance_internals_exist(probe: tuple[Probe, Line, ssl.SSLContext]) -> None:
    session, _line, _tls = probe
    for name in INSTANCE_INTERNALS:
        assert hasattr(session, name), \
            f"a connected aiosmtpd.smtp.SMTP has no {name} ({_where()})"
    assert isinstance(session._reader, asyncio.StreamReader), \
        f"aiosmtpd.smtp.SMTP._reader is not an asyncio.StreamReader ({_where()})"
    assert isinstance(session._writer, asyncio.StreamWriter), \
        f"aiosmtpd.smtp.SMTP._writer is not an asyncio.StreamWriter ({_where()})"
    for name in READER_INTERNALS:
        assert isinstance(getattr(session._reader, name, None), bytearray), \
            f"asyncio.StreamReader.{name} is not a bytearray (Python, {_where()})"


async def test_stream_methods(probe: tuple[Probe, Line, ssl.SSLContext]) -> None:
    session, line, _tls = probe
    assert session.buffered_bytes() is session._reader._buffer  # type: ignore[attr-defined]
    assert not session.has_buffered_line()
    # A command put back in front of the reader is read first, as if the client had sent it
    # (the server unreads from inside a command: here the client's next line wakes it up).
    session.unread(b"HELO unread.test\r\n")
    line.writer.write(b"NOOP\r\n")
    assert await line.reply() == [f"250 {session.hostname}\r\n".encode()]
    assert await line.reply() == [b"250 OK\r\n"]
    await session.send_raw(b"250 sent raw\r\n")
    assert await line.reply() == [b"250 sent raw\r\n"]


async def test_starttls_is_seen(probe: tuple[Probe, Line, ssl.SSLContext]) -> None:
    session, line, client_tls = probe
    assert (await line.command("EHLO client.test"))[-1] == b"250 HELP\r\n"
    assert not session.starttls_done
    assert (await line.command("STARTTLS"))[0].startswith(b"220")
    await line.writer.start_tls(client_tls, server_hostname="localhost")
    assert (await line.command("EHLO client.test"))[-1] == b"250 HELP\r\n"
    assert session.starttls_done, \
        f"aiosmtpd.smtp.SMTP._tls_protocol is not set by STARTTLS ({_where()})"


async def test_transaction_and_paths(probe: tuple[Probe, Line, ssl.SSLContext]) -> None:
    session, line, _tls = probe
    await line.command("EHLO client.test")
    assert SMTP.command_size_limits is not session.command_size_limits
    assert await line.command("MAIL FROM:<a@b.c> SIZE=10") == [b"250 OK\r\n"]
    assert session.parsed == ["<a@b.c> SIZE=10"], \
        f"aiosmtpd.smtp.SMTP.smtp_MAIL no longer parses through _getaddr ({_where()})"
    assert await line.command("RCPT TO:<d@e.f>") == [b"250 OK\r\n"]
    assert session.parsed[-1] == "<d@e.f>", \
        f"aiosmtpd.smtp.SMTP.smtp_RCPT no longer parses through _getaddr ({_where()})"
    assert session.full_parse_path('<"x y"@b.c> BODY=8BITMIME') == ('"x y"@b.c', "BODY=8BITMIME")
    envelope = session.envelope
    assert envelope is not None and envelope.mail_from == "a@b.c"
    session.set_post_data_state()
    assert isinstance(session.envelope, Envelope) and session.envelope is not envelope
    assert session.envelope.mail_from is None and session.envelope.rcpt_tos == []
    # Each EHLO raises aiosmtpd's MAIL limit: in this session's dict only.
    mine, shared = dict(session.command_size_limits), dict(SMTP.command_size_limits)
    await line.command("EHLO client.test")
    assert session.command_size_limits["MAIL"] > mine["MAIL"]
    assert dict(SMTP.command_size_limits) == shared


# --- [limits] smtp_line_length --------------------------------------------------------------------


def _data_reader(settings: SmtpSettings) -> DataReader:
    """The DATA reader as GatewaySMTP.smtp_DATA builds it for ``settings``."""
    return DataReader(100_000, max_line=max_line_for(settings.line_length))


def _feed(reader: DataReader, data: bytes) -> DataReader:
    assert reader.feed(data)
    return reader


def test_line_length_setting_reaches_the_reader() -> None:
    default = SmtpSettings(hostname="gw.test", patient_domain="patient.test")
    larger = SmtpSettings(hostname="gw.test", patient_domain="patient.test", line_length=2000)
    assert default.line_length == LINE_LENGTH == 1000
    line = b"x" * 1500 + b"\r\n.\r\n"
    assert _feed(_data_reader(default), line).state is DataState.LINE_TOO_LONG
    reader = _feed(_data_reader(larger), line)
    assert reader.state is DataState.OK and reader.message() == b"x" * 1500 + b"\r\n"
    # The RFC limit still holds by default, exactly: 998 octets of text (one more when dot-
    # stuffed); the larger limit, 1998.
    assert _feed(_data_reader(default), b"." + b"x" * 998 + b"\r\n.\r\n").state is DataState.OK
    assert _feed(_data_reader(default), b"x" * 1000 + b"\r\n.\r\n").state \
        is DataState.LINE_TOO_LONG
    assert _feed(_data_reader(larger), b"." + b"x" * 1998 + b"\r\n.\r\n").state is DataState.OK
    assert _feed(_data_reader(larger), b"x" * 2000 + b"\r\n.\r\n").state \
        is DataState.LINE_TOO_LONG


def test_line_too_long_reply_names_the_configured_limit() -> None:
    assert str(replies.line_too_long(1000)) == \
        "554 5.6.0 message refused: line longer than 998 octets (RFC 5321 4.5.3.1.6)"
    assert "1998 octets" in str(replies.line_too_long(2000))


@pytest.fixture
def long_lines_gateway(gw_dir: Path) -> Iterator[Gateway]:
    gw: Gateway = prepare_gateway(gw_dir)  # type: ignore[assignment]
    with gw.config.open("a") as f:
        f.write("\n[limits]\nsmtp_line_length = 2000\n")
    yield from running(gw)  # type: ignore[misc]


def test_configured_line_length_end_to_end(long_lines_gateway: Gateway) -> None:
    """``[limits] smtp_line_length = 2000`` in gateway.toml: a 1500-octet line is taken, a
    2500-octet one refused with the configured figure."""
    head = f"From: {DUPOND}\r\nTo: {PATIENT}\r\nSubject: long\r\n\r\n".encode()
    conn = smtp(long_lines_gateway, DUPOND)
    try:
        assert conn.sendmail(DUPOND, [PATIENT], head + b"y" * 1500 + b"\r\n") == {}
        conn.mail(DUPOND)
        conn.rcpt(PATIENT)
        assert conn.data(head + b"z" * 2500 + b"\r\n") == (
            554, b"5.6.0 message refused: line longer than 1998 octets (RFC 5321 4.5.3.1.6)")
        assert conn.noop()[0] == 250
        conn.quit()
    finally:
        conn.close()
    stored = mailbox(long_lines_gateway.directory, INAYA)
    assert len(stored) == 2 and stored[1].endswith(b"y" * 1500 + b"\r\n")


# --- the constructor's fast path -----------------------------------------------------------------


def _normalized(value: object, owner: object) -> object:
    """A value of a session's attribute, comparable across sessions: methods bound to the
    session itself and per-session objects named by their type."""
    if inspect.ismethod(value):
        return ("method", value.__func__, "self" if value.__self__ is owner
                else type(value.__self__))
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # _AuthMechAttr
        return tuple(_normalized(v, owner) for v in value)
    if isinstance(value, dict):
        return {k: _normalized(v, owner) for k, v in value.items()}
    if isinstance(value, (str, int, float, bool, type(None), ssl.SSLContext)):
        return value
    return ("object", type(value))


async def test_fast_init_sets_what_aiosmtpd_init_sets() -> None:
    """The second session of a kind skips aiosmtpd's per-connection introspection: it must end
    up with the same attributes as the first, built by aiosmtpd's own ``__init__``; and
    ``INIT_ATTRIBUTES`` must still be all that ``SMTP.__init__`` sets."""
    from smtp_in import aiosmtpd_adapter
    from smtp_in.server import DataBudget, GatewaySMTP, IntakeContext

    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx = IntakeContext(settings=SmtpSettings("mx.test", "patient.test"), store=None,  # type: ignore[arg-type]
                        writer=None, authenticator=None, notices=None,  # type: ignore[arg-type]
                        tls=tls, budget=DataBudget(1))
    for implicit in (False, True):
        aiosmtpd_adapter._TABLES.clear()
        full = GatewaySMTP(ctx, "smtp", implicit)
        fast = GatewaySMTP(ctx, "smtp", implicit)
        assert aiosmtpd_adapter._TABLES, "the first session did not record its tables"
        assert set(vars(full)) == set(vars(fast))
        for name in sorted(vars(full)):
            if name in ("conn_id", "_stream_reader_wr", "_strong_reader"):
                continue
            assert _normalized(getattr(fast, name), fast) == \
                _normalized(getattr(full, name), full), name
        assert "PLAIN" in fast._auth_methods and "EHLO" in fast._smtp_methods
        assert fast._smtp_methods["MAIL"].__self__ is fast
    bare = SMTP(object(), hostname="h", ident="i", loop=asyncio.get_running_loop())
    protocol = asyncio.StreamReaderProtocol(asyncio.StreamReader(),
                                            client_connected_cb=lambda _r, _w: None)
    assert set(vars(bare)) - set(vars(protocol)) == aiosmtpd_adapter.INIT_ATTRIBUTES, _where()
