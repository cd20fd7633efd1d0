"""A local SMTP server standing for a professional's operator or the notification relay
(aiosmtpd in a thread), recording what it receives (test helper)."""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from smtp_in.identity import peer_identity
from tests.gateway_proc import Gateway, free_port


@dataclass
class Received:
    sender: str
    recipients: list[str]
    data: bytes
    tls: bool
    client_cert_dns: tuple[str, ...]
    at: float


@dataclass
class RecordingHandler:
    refuse: set[str] = field(default_factory=set)
    messages: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        if address.lower() in self.refuse:
            return "550 5.1.1 no such mailbox here"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        ssl_object = server.transport.get_extra_info("ssl_object") if server.transport else None
        peer = peer_identity(ssl_object) if ssl_object is not None else None
        with self.lock:
            self.messages.append(Received(
                sender=str(envelope.mail_from), recipients=list(envelope.rcpt_tos),
                data=bytes(envelope.original_content or b""), tls=ssl_object is not None,
                client_cert_dns=tuple(peer.dns_names) + tuple(peer.emails) if peer else (),
                at=time.monotonic()))
        return "250 2.0.0 accepted"

    def wait(self, count: int, timeout: float = 15.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.messages) >= count:
                    return list(self.messages)
            time.sleep(0.05)
        with self.lock:
            return list(self.messages)


class Relay:
    """``start()``/``stop()`` an aiosmtpd server on a fixed port, with STARTTLS when a
    certificate is given (client certificates requested and checked against ``ca``)."""

    def __init__(self, port: int, cert_dir: Path | None, ca: Path | None,
                 require_tls: bool = True) -> None:
        self.port = port
        self.handler = RecordingHandler()
        self.cert_dir = cert_dir
        self.ca = ca
        self.require_tls = require_tls
        self.controller: Controller | None = None

    def start(self) -> None:
        kwargs: dict[str, Any] = {}
        if self.cert_dir is not None:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(str(self.cert_dir / "cert.pem"), str(self.cert_dir / "key.pem"))
            if self.ca is not None:
                ctx.load_verify_locations(cafile=str(self.ca))
                ctx.verify_mode = ssl.CERT_OPTIONAL
            kwargs = {"tls_context": ctx, "require_starttls": self.require_tls}
        self.controller = Controller(self.handler, hostname="127.0.0.1", port=self.port,
                                     ready_timeout=10, **kwargs)
        self.controller.start()

    def stop(self) -> None:
        if self.controller is not None:
            self.controller.stop()
            self.controller = None


def operator_relay(gw: Gateway) -> Relay:
    """The professionals' operator: STARTTLS with the dev PKI's ``operator`` certificate,
    client certificates checked against the gateway's CA."""
    return Relay(free_port(), gw.directory / "clients" / "operator", gw.ca)


@contextmanager
def running_with(gw: Gateway, *relays: Relay) -> Iterator[Gateway]:
    """Start the relays, then the prepared gateway; at the end kill the gateway and stop the
    relays, whatever happens."""
    for relay in relays:
        relay.start()
    gw.start()
    try:
        yield gw
    finally:
        gw.kill()
        for relay in relays:
            relay.stop()
