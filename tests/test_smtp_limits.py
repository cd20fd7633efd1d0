"""Limits on what a client controls (SPEC §9): DATA memory budget, connections per IP (the
``limited`` gateway of conftest; credentials never in logs: test_security_credentials_in_logs)."""

from __future__ import annotations

import socket
import threading

from tests.conftest import DUPOND, INAYA
from tests.gateway_proc import Gateway
from tests.helpers import mailbox, smtp

PATIENT = f"{INAYA}@patient.mssante.fr"


def message(size: int) -> bytes:
    line = b"A" * 76 + b"\r\n"
    body = line * (size // len(line))
    return (f"From: {DUPOND}\r\nTo: {PATIENT}\r\nSubject: gros\r\n\r\n").encode() + body


def test_data_budget_refuses_with_452_instead_of_swelling(limited: Gateway) -> None:
    """Two 2 MB messages at once against a 3 MiB budget: one is told to come back later."""
    barrier = threading.Barrier(2)
    results: list[tuple[int, bytes]] = []

    def client() -> None:
        conn = smtp(limited, DUPOND)
        conn.mail(DUPOND)
        conn.rcpt(PATIENT)
        barrier.wait()
        code, _ = conn.docmd("DATA")
        assert code == 354
        data = message(2 * 1024 * 1024)
        conn.send(data + b"\r\n.\r\n")
        results.append(conn.getreply())
        conn.quit()

    threads = [threading.Thread(target=client) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    codes = sorted(code for code, _ in results)
    assert len(codes) == 2
    assert 250 in codes or codes == [452, 452]
    refused = [text for code, text in results if code == 452]
    assert refused and all(t.startswith(b"4.3.1") for t in refused)
    # Memory was released: a single message now fits again.
    conn = smtp(limited, DUPOND)
    assert conn.sendmail(DUPOND, [PATIENT], message(2 * 1024 * 1024)) == {}
    conn.quit()
    assert len(mailbox(limited.directory, INAYA)) == 1 + codes.count(250) + 1


def test_connections_per_ip_limited(limited: Gateway) -> None:
    socks = [socket.create_connection(("127.0.0.1", limited.ports["smtp"]), timeout=10)
             for _ in range(3)]
    try:
        for s in socks:
            assert s.recv(100).startswith(b"220")
        with socket.create_connection(("127.0.0.1", limited.ports["smtp"]), timeout=10) as extra:
            assert extra.recv(100).startswith(b"421 4.7.0")
    finally:
        for s in socks:
            s.close()
    # Once they are gone, new connections are welcome again.
    conn = smtp(limited, DUPOND)
    assert conn.noop()[0] == 250
    conn.quit()
