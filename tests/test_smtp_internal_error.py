"""An unexpected failure of the store during an SMTP session (ARCHITECTURE practice 4: errors
never put exception text on the wire): the real server objects run in this process, a store
operation is made to raise ``RuntimeError("secret detail 12345")`` at MAIL, RCPT and DATA,
and smtplib (STARTTLS, client certificate of the dev PKI) must read exactly ``451 4.3.0``,
nothing of the exception, and a session that still works."""

from __future__ import annotations

import asyncio
import base64
import smtplib
import ssl
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gateway import wiring
from gateway.config import load_config
from gateway.tls import server_context
from imap_store.store import ops
from imap_store.store.deliver import deliver
from imap_store.store.directory import Store
from imap_store.store.writer import GroupWriter
from policy.authn import Authenticator
from policy.throttle import LoginThrottle
from smtp_in import replies
from smtp_in.server import DataBudget, IntakeContext, start_listener
from tests.conftest import CHRISTELLE, DUPOND, INAYA, PRO_PASSWORD, prepare_gateway
from tests.gateway_proc import Gateway
from tests.helpers import mailbox, raw_session, tls_context

PATIENT = f"{INAYA}@patient.mssante.fr"
SECRET = "secret detail 12345"
#: What must never reach the client.
LEAKS = (SECRET.encode(), b"RuntimeError", b"Traceback", b"Error: (")
INTERNAL = (replies.INTERNAL_ERROR.code,
            f"{replies.INTERNAL_ERROR.enhanced} {replies.INTERNAL_ERROR.text}".encode())
assert INTERNAL == (451, b"4.3.0 internal error, try again later")


def message(subject: str) -> bytes:
    return (f"From: {DUPOND}\r\nTo: {PATIENT}\r\nSubject: {subject}\r\n\r\n"
            "Bonjour,\r\nle compte rendu suit.\r\n").encode()


@dataclass
class Intake:
    """The SMTP listener of ``mssante-gateway serve``, built the same way, in this process."""

    gw: Gateway
    ctx: IntakeContext
    server: asyncio.Server

    @property
    def port(self) -> int:
        return int(self.server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        self.server.close()
        for session in list(self.ctx.sessions):
            if session.transport is not None:
                session.transport.close()
        await self.server.wait_closed()
        await self.ctx.writer.close()
        await self.ctx.store.close()


async def start_intake(gw: Gateway) -> Intake:
    config = load_config(gw.config)
    store = Store.from_url(config.storage_url)
    writer = GroupWriter(store)
    writer.start()
    settings = wiring.smtp_settings(config)
    ctx = IntakeContext(
        settings=settings, store=store, writer=writer,
        authenticator=Authenticator(
            store, LoginThrottle(config.limits.login_failures, config.limits.login_window),
            config.domains.patient, audit=writer.audit_later),
        notices=wiring.notices(config),
        tls=server_context(config.tls.cert, config.tls.key, config.tls.client_ca),
        budget=DataBudget(settings.data_in_flight))
    server = await start_listener(ctx, "smtp", "127.0.0.1", 0, implicit_tls=False)
    intake = Intake(gw, ctx, server)
    gw.ports["smtp"] = intake.port
    return intake


@pytest.fixture
def prepared(gw_dir: Path) -> Gateway:
    gw: Gateway = prepare_gateway(gw_dir)  # type: ignore[assignment]
    return gw


@pytest.fixture
async def intake(prepared: Gateway) -> AsyncIterator[Intake]:
    running = await start_intake(prepared)
    try:
        yield running
    finally:
        await running.close()


class Fault:
    """Wraps a function so that it raises while ``armed``."""

    def __init__(self, armed: bool = True) -> None:
        self.armed = armed
        self.raised = 0

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        if asyncio.iscoroutinefunction(fn):
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                self._maybe_raise()
                return await fn(*args, **kwargs)
            return async_wrapper

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            self._maybe_raise()
            return fn(*args, **kwargs)
        return wrapper

    def _maybe_raise(self) -> None:
        if self.armed:
            self.raised += 1
            raise RuntimeError(SECRET)


class Recording(smtplib.SMTP):
    """smtplib recording every reply it reads (code and text, as on the wire)."""

    def __init__(self, port: int) -> None:
        self.wire: list[bytes] = []
        super().__init__("127.0.0.1", port, timeout=30)

    def getreply(self) -> tuple[int, bytes]:
        code, text = super().getreply()
        self.wire.append(b"%d %s" % (code, text))
        return code, text

    def assert_nothing_leaked(self) -> None:
        wire = b"\n".join(self.wire)
        for leak in LEAKS:
            assert leak not in wire, (leak, self.wire)

    def send_kept_and_quit(self, fault: Fault) -> None:
        """With the fault disarmed, a message "kept" goes through on the same connection; no
        internal detail was on the wire."""
        fault.armed = False
        assert self.sendmail(DUPOND, [PATIENT], message("kept")) == {}
        assert self.quit()[0] == 221
        self.assert_nothing_leaked()


async def assert_kept_stored(intake: Intake) -> None:
    """Inaya's mailbox holds the welcome message, then "kept" (the retry): nothing of the
    failed tries."""
    stored = await asyncio.to_thread(mailbox, intake.gw.directory, INAYA)
    assert len(stored) == 2 and b"Subject: kept" in stored[1]


@pytest.fixture
def client(intake: Intake) -> Iterator[Callable[[str | None], Recording]]:
    opened: list[Recording] = []

    def connect(certificate: str | None = DUPOND) -> Recording:
        conn = Recording(intake.port)
        opened.append(conn)
        conn.ehlo("client.test")
        conn.starttls(context=tls_context(intake.gw, certificate))
        conn.ehlo("client.test")
        return conn

    yield connect
    for conn in opened:
        conn.close()


async def test_store_failure_at_rcpt(intake: Intake, client: Callable[..., Recording],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    fault = Fault()
    monkeypatch.setattr(ops, "with_facts", fault.wrap(ops.with_facts))

    def talk() -> None:
        conn = client()
        assert conn.mail(DUPOND) == (250, b"2.1.0 sender accepted")
        assert conn.rcpt(PATIENT) == INTERNAL
        assert conn.noop()[0] == 250
        fault.armed = False
        assert conn.rcpt(PATIENT)[0] == 250  # the same transaction goes on
        assert conn.data(message("after a failed RCPT"))[0] == 250
        assert conn.quit()[0] == 221
        conn.assert_nothing_leaked()

    await asyncio.to_thread(talk)
    assert fault.raised == 1
    assert len(await asyncio.to_thread(mailbox, intake.gw.directory, INAYA)) == 2


async def test_store_failure_in_delivery(intake: Intake, client: Callable[..., Recording],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The group writer's transaction raises: nothing is stored, the client may retry."""
    fault = Fault()
    monkeypatch.setattr("smtp_in.delivery.deliver", fault.wrap(deliver))

    def talk() -> None:
        conn = client()
        assert conn.mail(DUPOND)[0] == 250
        assert conn.rcpt(PATIENT)[0] == 250
        assert conn.data(message("lost")) == INTERNAL
        assert conn.noop()[0] == 250
        assert conn.rset()[0] == 250
        conn.send_kept_and_quit(fault)

    await asyncio.to_thread(talk)
    assert fault.raised == 1
    await assert_kept_stored(intake)


async def test_store_failure_at_mail_and_end_of_data(
        intake: Intake, client: Callable[..., Recording],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The trusted-domain read fails at MAIL, then at the end of the data (before the
    writer): 451 each time, and the transaction is over after the DATA reply."""
    fault = Fault()
    monkeypatch.setattr(ops, "trusted_domains", fault.wrap(ops.trusted_domains))
    intake.ctx._trusted = None

    def talk() -> None:
        conn = client()
        assert conn.mail(DUPOND) == INTERNAL
        assert conn.noop()[0] == 250
        fault.armed = False
        assert conn.mail(DUPOND)[0] == 250
        assert conn.rcpt(PATIENT)[0] == 250
        fault.armed = True
        intake.ctx._trusted = None  # no cached copy: DATA reads the list again
        assert conn.data(message("lost")) == INTERNAL
        assert conn.docmd("DATA") == (554, b"5.5.1 no valid recipients")  # transaction over
        conn.send_kept_and_quit(fault)

    await asyncio.to_thread(talk)
    assert fault.raised == 2
    await assert_kept_stored(intake)


async def test_store_failure_at_auth(intake: Intake, client: Callable[..., Recording],
                               monkeypatch: pytest.MonkeyPatch) -> None:
    fault = Fault()
    authenticator = intake.ctx.authenticator
    monkeypatch.setattr(authenticator, "login", fault.wrap(authenticator.login))
    plain = base64.b64encode(f"\0{CHRISTELLE}\0{PRO_PASSWORD}".encode()).decode()

    def talk() -> None:
        conn = client(None)
        assert conn.docmd("AUTH", f"PLAIN {plain}") == INTERNAL
        assert conn.noop()[0] == 250
        fault.armed = False
        assert conn.docmd("AUTH", f"PLAIN {plain}")[0] == 235
        assert conn.quit()[0] == 221
        conn.assert_nothing_leaked()

    await asyncio.to_thread(talk)
    assert fault.raised == 1


def _raw_tls(intake: Intake, certificate: str) -> tuple[ssl.SSLSocket, Any]:
    tls = raw_session(intake.gw, certificate, port=intake.port)
    return tls, tls.makefile("rb")


async def test_failure_inside_a_pipelined_group(
        intake: Intake, monkeypatch: pytest.MonkeyPatch) -> None:
    """Replies held for a pipelined group (RFC 2920) go out before the 451, in order."""
    fault = Fault()
    monkeypatch.setattr(ops, "with_facts", fault.wrap(ops.with_facts))

    def talk() -> list[bytes]:
        tls, f = _raw_tls(intake, DUPOND)
        try:
            tls.sendall(b"EHLO raw.test\r\n")
            while not f.readline().startswith(b"250 "):
                pass
            tls.sendall(f"MAIL FROM:<{DUPOND}>\r\nRCPT TO:<{PATIENT}>\r\nRSET\r\n"
                        "NOOP\r\n".encode())
            lines = [f.readline() for _ in range(4)]
            tls.sendall(b"QUIT\r\n")
            lines.append(f.readline())
            lines.append(f.read())  # then the server closes: nothing more
            return lines
        finally:
            f.close()
            tls.close()

    lines = await asyncio.to_thread(talk)
    assert lines == [b"250 2.1.0 sender accepted\r\n", f"{replies.INTERNAL_ERROR}\r\n".encode(),
                     b"250 2.0.0 reset\r\n", b"250 2.0.0 OK\r\n", lines[4], b""]
    assert lines[4].startswith(b"221 ")
    assert fault.raised == 1
