"""SIGTERM (SPEC §9): every listener drains at once within one grace period; a second SIGTERM
exits at once."""

from __future__ import annotations

import imaplib
import signal
import time

from tests.conftest import DUPOND, INAYA
from tests.gateway_proc import Gateway
from tests.helpers import smtp, tls_context

PATIENT = f"{INAYA}@patient.mssante.fr"


def test_second_sigterm_exits_at_once_while_a_transaction_is_in_flight(
        gateway: Gateway) -> None:
    conn = smtp(gateway, DUPOND)
    conn.mail(DUPOND)
    assert conn.rcpt(PATIENT)[0] == 250
    assert conn.docmd("DATA")[0] == 354
    conn.send(b"Subject: half a message\r\n\r\nnot finished")  # DATA in flight: busy
    imap = imaplib.IMAP4_SSL("127.0.0.1", gateway.ports["imaps"],
                             ssl_context=tls_context(gateway), timeout=10)
    assert gateway.proc is not None
    sent = time.monotonic()
    gateway.proc.send_signal(signal.SIGTERM)
    # IMAP drains beside SMTP, not after SMTP's grace period: the idle session is told now.
    assert imap.readline().startswith(b"* BYE")
    assert time.monotonic() - sent < 5
    assert gateway.proc.poll() is None  # still draining: the SMTP transaction may finish
    started = time.monotonic()
    assert gateway.stop(signal.SIGTERM, timeout=10) == 1
    assert time.monotonic() - started < 5  # not the 30 s grace period
    assert "second signal: exiting without draining" in gateway.log()
    conn.close()
    imap.shutdown()
