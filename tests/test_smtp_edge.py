"""SMTP edge behaviour against the real server (SPEC §4.2, §4.3): a certificate of the trust CA
that names nobody allowed here, and bare line feeds in DATA (``[smtp] bare_newline``)."""

from __future__ import annotations

import asyncio
import json
import smtplib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from gateway import wiring
from gateway.config import ConfigError, load_config
from imap_store.store import schema as t
from imap_store.store.directory import Store
from tests.conftest import DUPOND, INAYA, cli_in_process, prepare_gateway, running
from tests.gateway_proc import Gateway
from tests.helpers import (
    body_after_received,
    exchange,
    mailbox,
    raw_mail,
    raw_session,
    smtp,
    tls_context,
)

PATIENT = f"{INAYA}@patient.mssante.fr"
#: In a trusted domain, with a certificate of the trust CA, but not in the directory.
STRANGER = "inconnu@medecin.mssante.fr"


def _issue(gw: Gateway, address: str) -> None:
    cli_in_process(gw.config, "certs", "professional", address, "--out",
                   str(gw.directory / "clients" / address), prog="mssante-gateway")


def _rcpt_audit(gw: Gateway) -> list[tuple[str, str, dict[str, object]]]:
    async def read() -> list[tuple[str, str, dict[str, object]]]:
        store = Store.from_url(load_config(gw.config).storage_url)
        try:
            async with store.read() as conn:
                rows = await conn.execute(
                    select(t.audit.c.actor, t.audit.c.subject, t.audit.c.detail)
                    .where(t.audit.c.action == "rcpt").order_by(t.audit.c.id))
                return [(r[0], r[1], json.loads(r[2]))
                        for r in rows]
        finally:
            await store.close()

    return asyncio.run(read())


def test_unlisted_certificate_refused_at_rcpt_naming_r1(gateway: Gateway) -> None:
    """Authenticated (the certificate chains to the CA) but not allowed: MAIL is taken, each
    RCPT gets 550 5.7.1 (R1 to a patient, no relay elsewhere), never 530 5.7.0."""
    _issue(gateway, STRANGER)
    conn = smtp(gateway, STRANGER)
    assert conn.mail(STRANGER)[0] == 250
    code, text = conn.rcpt(PATIENT)
    assert (code, text[:5]) == (550, b"5.7.1") and b"R1:" in text, text
    code, text = conn.rcpt("someone@example.org")
    assert (code, text[:5]) == (550, b"5.7.1") and b"relay" in text, text
    # Another sender address changes nothing: no directory entry is borrowed from MAIL FROM.
    assert conn.rset()[0] == 250
    assert conn.mail(DUPOND)[0] == 250
    code, text = conn.rcpt(PATIENT)
    assert (code, text[:5]) == (550, b"5.7.1") and b"R1:" in text, text
    code, text = conn.docmd("DATA")
    assert code == 554, text  # no valid recipients
    conn.quit()
    assert len(mailbox(gateway.directory, INAYA)) == 1  # the welcome message only
    deadline = time.monotonic() + 10  # refusals are audited by the group writer, soon after
    while True:
        refused = [(actor, subject, d) for actor, subject, d in _rcpt_audit(gateway)
                   if actor.startswith("certificate ")]
        if len(refused) >= 3 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert [(s, d["rule"], d["allowed"]) for _a, s, d in refused] == [
        (PATIENT, "R1", False), ("someone@example.org", "relay", False),
        (PATIENT, "R1", False)]
    assert STRANGER in refused[0][0] and "sha256:" in refused[0][0]


def test_no_certificate_still_530(gateway: Gateway) -> None:
    """TLS without a certificate and without AUTH is not authenticated at all."""
    conn = smtp(gateway)
    code, text = conn.mail(STRANGER)
    assert (code, text[:5]) == (530, b"5.7.0")
    conn.quit()


def test_listed_certificate_unchanged(gateway: Gateway) -> None:
    conn = smtp(gateway, DUPOND)
    assert conn.mail(DUPOND)[0] == 250
    code, text = conn.rcpt(PATIENT)
    assert code == 250, text
    conn.quit()


# ------------------------------------------------------------------ returning clients


def test_returning_client_resumes_tls_and_keeps_its_identity(gateway: Gateway) -> None:
    """TLS session tickets: a client's second connection resumes its session (no new
    certificate exchange) and is still the professional its certificate names."""
    ctx = tls_context(gateway, DUPOND)
    session = None
    for attempt in range(3):
        with raw_session(gateway, DUPOND, ctx=ctx, session=session) as sock:
            assert sock.session_reused is (attempt > 0)
            assert exchange(sock, b"EHLO returning.test\r\n")[-1].startswith(b"250 ")
            assert exchange(sock, f"MAIL FROM:<{DUPOND}>\r\n".encode())[0].startswith(b"250")
            reply = exchange(sock, f"RCPT TO:<{PATIENT}>\r\n".encode())
            assert reply[0].startswith(b"250 2.1.5"), reply
            assert exchange(sock, b"QUIT\r\n")[0].startswith(b"221")
            session = sock.session  # the ticket came after the handshake
        assert session is not None


def test_suspension_acts_at_once_despite_the_certificate_cache(gateway: Gateway) -> None:
    """The certificate -> identity cache does not hold suspension (R9): read at each
    transaction, so a suspended professional's next connection is refused at once."""
    conn = smtp(gateway, DUPOND)  # puts the certificate in the cache
    assert conn.mail(DUPOND)[0] == 250 and conn.rcpt(PATIENT)[0] == 250
    conn.quit()
    cli_in_process(gateway.config, "professional", "suspend", DUPOND)
    conn = smtp(gateway, DUPOND)
    assert conn.mail(DUPOND)[0] == 250
    code, text = conn.rcpt(PATIENT)
    assert (code, text[:5]) == (550, b"5.7.1") and b"R9:" in text, text
    conn.quit()
    cli_in_process(gateway.config, "professional", "reinstate", DUPOND)
    conn = smtp(gateway, DUPOND)
    assert conn.mail(DUPOND)[0] == 250 and conn.rcpt(PATIENT)[0] == 250
    conn.quit()


# --------------------------------------------------------------------------- bare LF


@pytest.fixture
def rejecting(gw_dir: Path) -> Iterator[object]:
    """A running gateway with ``[smtp] bare_newline = "reject"``."""
    gw = prepare_gateway(gw_dir)
    text = gw.config.read_text(encoding="utf-8")  # type: ignore[attr-defined]
    head, sep, tail = text.partition("[smtp]\n")
    assert sep
    gw.config.write_text(  # type: ignore[attr-defined]
        head + sep + 'bare_newline = "reject"\n' + tail, encoding="utf-8")
    yield from running(gw)


LF_MESSAGE = (f"From: {DUPOND}\nTo: {PATIENT}\nSubject: lignes LF\n\nbonjour\n..point\n"
              "fin\r\n.\r\n").encode()


def test_bare_lf_normalized_by_default(gateway: Gateway) -> None:
    with raw_session(gateway, DUPOND) as sock:
        raw_mail(sock, DUPOND, PATIENT)
        reply = exchange(sock, LF_MESSAGE)
        assert reply[0].startswith(b"250 2.0.0"), reply
        assert exchange(sock, b"QUIT\r\n")[0].startswith(b"221")
    stored = mailbox(gateway.directory, INAYA)[-1]
    assert body_after_received(stored) == (
        f"From: {DUPOND}\r\nTo: {PATIENT}\r\nSubject: lignes LF\r\n\r\nbonjour\r\n.point\r\n"
        "fin\r\n").encode()


def test_bare_lf_refused_when_reject(rejecting: Gateway) -> None:
    with raw_session(rejecting, DUPOND) as sock:
        raw_mail(sock, DUPOND, PATIENT)
        reply = exchange(sock, LF_MESSAGE)
        assert reply[0].startswith(b"554 5.6.0") and b"bare LF" in reply[0], reply
        assert exchange(sock, b"NOOP\r\n")[0].startswith(b"250")
    assert len(mailbox(rejecting.directory, INAYA)) == 1  # welcome only


def test_crlf_message_same_in_both_modes(rejecting: Gateway) -> None:
    conn = smtp(rejecting, DUPOND)
    data = f"From: {DUPOND}\r\nTo: {PATIENT}\r\nSubject: ok\r\n\r\nbonjour\r\n".encode()
    assert conn.sendmail(DUPOND, [PATIENT], data) == {}
    conn.quit()
    assert body_after_received(mailbox(rejecting.directory, INAYA)[-1]) == data


def test_unknown_bare_newline_value_refused(gw_dir: Path) -> None:
    config = gw_dir / "gateway.toml"
    text = config.read_text(encoding="utf-8")
    assert load_config(config).smtp_bare_newline == "normalize"  # the default
    config.write_text(text.replace("[smtp]\n", '[smtp]\nbare_newline = "accept"\n', 1),
                      encoding="utf-8")
    with pytest.raises(ConfigError, match=r"smtp\.bare_newline"):
        load_config(config)
    config.write_text(text.replace("[smtp]\n", '[smtp]\nbare_newline = "reject"\n', 1),
                      encoding="utf-8")
    assert wiring.smtp_settings(load_config(config)).bare_newline == "reject"


def test_smtplib_sends_lf_only_text_as_crlf(gateway: Gateway) -> None:
    """smtplib converts line ends itself: the ordinary client path is unaffected."""
    conn: smtplib.SMTP = smtp(gateway, DUPOND)
    assert conn.sendmail(DUPOND, [PATIENT], f"From: {DUPOND}\nSubject: a\n\nb\n") == {}
    conn.quit()
