"""An unexpected exception inside an IMAP command, forced once: the real ``ImapService`` in this
process (implicit TLS on a free port), a store operation that raises, ``imaplib`` on a real
socket. The client gets ``* BYE [SERVERBUG]`` (or a tagged ``NO [SERVERBUG]``) and never the
exception's text; the connection ends instead of hanging; the exception is logged with its
connection id; other sessions and new connections carry on (SPEC §9, RFC 5530 SERVERBUG)."""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import gc
import imaplib
import logging
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from gateway.config import load_config
from gateway.tls import server_context
from imap_store.imap import responses as r
from imap_store.imap.server import ImapService
from imap_store.imap.settings import ImapListener, ImapSettings
from imap_store.store.directory import Store
from imap_store.store.mailboxes import PatientMailStore
from imap_store.store.writer import GroupWriter
from policy.authn import Authenticator
from policy.throttle import LoginThrottle
from tests.conftest import INAYA, MARTINE, PATIENT_PASSWORD, prepare_gateway
from tests.gateway_proc import Gateway
from tests.helpers import tls_context

SECRET = "secret detail 12345"
#: What must never reach the wire: the exception's message, its type, a traceback.
LEAKS = (b"secret detail", b"12345", b"RuntimeError", b"Traceback")


class WireIMAP4(imaplib.IMAP4_SSL):
    """imaplib over implicit TLS that keeps every byte the server sent."""

    def __init__(self, port: int, context: ssl.SSLContext) -> None:
        self.wire = bytearray()
        super().__init__("127.0.0.1", port, ssl_context=context, timeout=10)

    def readline(self) -> bytes:
        line = super().readline()
        self.wire += line
        return line

    def read(self, size: int) -> bytes:
        data = super().read(size)
        self.wire += data
        return data


@dataclass
class Served:
    gw: Gateway
    port: int
    clients: list[WireIMAP4] = field(default_factory=list)

    def connect(self, ins: str = INAYA) -> WireIMAP4:
        conn = WireIMAP4(self.port, tls_context(self.gw))
        self.clients.append(conn)
        assert conn.login(ins, PATIENT_PASSWORD)[0] == "OK"
        return conn

    def close_clients(self) -> None:
        for conn in self.clients:
            try:
                conn.shutdown()
            except OSError:
                pass


@pytest.fixture
def prepared(gw_dir: object) -> Gateway:
    return prepare_gateway(gw_dir)  # type: ignore[arg-type,return-value]


@pytest.fixture
async def served(prepared: Gateway, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Served]:
    """The IMAP service as ``serve`` builds it (gateway/service.py), on its own: one implicit
    TLS listener on 127.0.0.1, port 0."""
    config = load_config(prepared.config)
    store = Store.from_url(config.storage_url)
    writer = GroupWriter(store)
    writer.start()
    tls = server_context(config.tls.cert, config.tls.key, config.tls.client_ca)
    authenticator = Authenticator(store, LoginThrottle(5, 300), config.domains.patient)
    service = ImapService(ImapSettings(), store, writer, authenticator, tls,
                          lambda *_args: None)
    # start() sets a process-wide asyncio buffer size and freezes the GC: undone afterwards.
    monkeypatch.setattr(asyncio.sslproto.SSLProtocol, "max_size",
                        asyncio.sslproto.SSLProtocol.max_size)
    service.start()
    try:
        server = await service.start_listener(ImapListener("imaps", "127.0.0.1", 0, True))
        served = Served(prepared, server.sockets[0].getsockname()[1])
        try:
            yield served
        finally:
            served.close_clients()  # whatever the test left open: the sessions then end
    finally:
        await service.drain(grace=5)
        await service.close()
        await writer.close()
        await store.close()
        gc.unfreeze()


def _raise(*_args: Any, **_kwargs: Any) -> Any:
    raise RuntimeError(SECRET)


#: operation of PatientMailStore that fails -> what the client does before (not failing) and
#: the command that hits it.
Step = Callable[[imaplib.IMAP4], Any]
OPERATIONS: dict[str, tuple[Step | None, Step]] = {
    "status": (None, lambda c: c.status("INBOX", "(MESSAGES UIDNEXT)")),
    "fetch_rows": (lambda c: c.select("INBOX"),
                   lambda c: c.fetch("1", "(INTERNALDATE RFC822.SIZE)")),
    "append": (None, lambda c: c.append("INBOX", None, None, b"Subject: x\r\n\r\ny\r\n")),
}


def _outcome(conn: WireIMAP4, command: Step) -> str:
    """Run the failing command; what the client saw: "BYE" (the connection ended, as it
    should) or "NO"; a hang or any other answer fails."""
    try:
        typ, data = command(conn)
    except imaplib.IMAP4.abort:
        return "BYE"
    except TimeoutError:
        pytest.fail(f"the server hung after the internal error: {bytes(conn.wire)!r}")
    assert typ == "NO", (typ, data, bytes(conn.wire))
    return "NO"


def _rest_of_connection(conn: WireIMAP4) -> bytes:
    """What the server sends after its BYE, until it closes: nothing (EOF), within the
    client's timeout."""
    try:
        rest = conn.sock.recv(4096)
    except TimeoutError:
        pytest.fail("the server kept the connection open after BYE [SERVERBUG]")
    except OSError:  # a TLS connection torn down without close_notify
        rest = b""
    return rest


@pytest.mark.parametrize("operation", list(OPERATIONS))
async def test_internal_error_answers_serverbug_without_its_text(
    served: Served, operation: str, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    before, command = OPERATIONS[operation]
    bystander = await asyncio.to_thread(served.connect, MARTINE)
    conn = await asyncio.to_thread(served.connect)
    if before is not None:
        assert (await asyncio.to_thread(before, conn))[0] == "OK"
    caplog.set_level(logging.INFO, logger="imap_store.imap.server")
    seen = len(conn.wire)
    with monkeypatch.context() as fault:
        fault.setattr(PatientMailStore, operation, _raise)
        outcome = await asyncio.to_thread(_outcome, conn, command)
    answer = bytes(conn.wire[seen:])
    if outcome == "BYE":
        assert answer.endswith(r.BYE_SERVERBUG.untagged()), answer
        assert await asyncio.to_thread(_rest_of_connection, conn) == b""
    else:
        assert b" NO [SERVERBUG] " in answer, answer
        assert (await asyncio.to_thread(conn.noop))[0] == "OK"
        await asyncio.to_thread(conn.logout)
    for leak in LEAKS:
        assert leak not in conn.wire, (leak, bytes(conn.wire))
    # The exception went to the log, with the connection's id, not to the client.
    errors = [rec for rec in caplog.records if rec.exc_info is not None]
    assert len(errors) == 1, caplog.text
    exc_info = errors[0].exc_info
    assert exc_info is not None and isinstance(exc_info[1], RuntimeError)
    assert SECRET in str(exc_info[1])
    assert errors[0].getMessage().startswith("conn=")
    assert PATIENT_PASSWORD not in caplog.text
    # The failure was that connection's alone: other sessions and new ones go on.
    assert (await asyncio.to_thread(bystander.noop))[0] == "OK"
    again = await asyncio.to_thread(served.connect)
    if before is not None:
        assert (await asyncio.to_thread(before, again))[0] == "OK"
    assert (await asyncio.to_thread(command, again))[0] == "OK"
    for client in (again, bystander):
        await asyncio.to_thread(client.logout)
