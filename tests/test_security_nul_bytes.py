"""NUL octets (issue 15.3): RFC 5322 text and RFC 6152 8BITMIME data have none, and an IMAP
literal is CHAR8 (RFC 3501 §4.3, §9), NUL excluded; this server offers neither BINARYMIME nor
BINARY. SMTP DATA with a NUL is refused with ``554 5.6.0`` once the data is read; IMAP APPEND
with a tagged ``NO [CANNOT]`` (the command was read whole: the message, not the protocol, is
at fault). Nothing is stored; the sessions go on.

Real sockets and clients nobody here wrote: smtplib and imaplib."""

from __future__ import annotations

import smtplib

import pytest

from tests.conftest import CHRISTELLE, DUPOND, INAYA, PATIENT_PASSWORD
from tests.gateway_proc import Gateway
from tests.helpers import imap_login, mailbox, sample, smtp

PATIENT = f"{INAYA}@patient.mssante.fr"


def message(sender: str, body: bytes, extra: bytes = b"") -> bytes:
    return (b"From: " + sender.encode() + b"\r\nTo: " + PATIENT.encode() +
            b"\r\nSubject: nul\r\n" + extra + b"\r\n" + body)


def _refused(conn: smtplib.SMTP, sender: str, rcpt: str, data: bytes) -> None:
    with pytest.raises(smtplib.SMTPDataError) as info:
        conn.sendmail(sender, [rcpt], data)
    error = info.value.smtp_error
    assert isinstance(error, bytes) and info.value.smtp_code == 554
    assert error.startswith(b"5.6.0") and b"NUL" in error


def test_nul_in_smtp_data_refused_after_the_data(gateway: Gateway) -> None:
    conn = smtp(gateway, DUPOND)
    _refused(conn, DUPOND, PATIENT, message(DUPOND, b"avant \x00 apres\r\n"))
    _refused(conn, DUPOND, PATIENT, message(DUPOND, b"ok\r\n", extra=b"X-Nul: a\x00b\r\n"))
    # A NUL at the start of 3 MB: the whole data is read first, then the one reply.
    big = message(DUPOND, b"\x00" + b"ligne de texte ordinaire\r\n" * 120_000)
    _refused(conn, DUPOND, PATIENT, big)
    assert conn.noop()[0] == 250  # in step: the next transaction works
    assert conn.sendmail(DUPOND, [PATIENT], message(DUPOND, b"sans octet nul\r\n")) == {}
    conn.quit()
    stored = mailbox(gateway.directory, INAYA)
    assert len(stored) == 2 and not any(b"\x00" in m for m in stored)


def test_nul_in_patient_submission_refused(gateway: Gateway) -> None:
    conn = smtp(gateway, CHRISTELLE)
    assert conn.sendmail(CHRISTELLE, [PATIENT], sample("01")) == {}  # opens the exchange
    conn.quit()
    conn = smtp(gateway, None, "submissions")
    conn.login(INAYA, PATIENT_PASSWORD)
    reply = (b"From: " + PATIENT.encode() + b"\r\nTo: " + CHRISTELLE.encode() +
             b"\r\nSubject: Re: rendez-vous\r\n\r\nmerci\x00\r\n")
    _refused(conn, PATIENT, CHRISTELLE, reply)
    assert conn.sendmail(PATIENT, [CHRISTELLE], reply.replace(b"\x00", b"")) == {}
    conn.quit()
    assert len(mailbox(gateway.directory, INAYA, "Sent")) == 1


def test_nul_in_imap_append_refused_with_no(gateway: Gateway) -> None:
    conn = imap_login(gateway)
    typ, data = conn.append("INBOX", None, None, message(CHRISTELLE, b"un \x00 nul\r\n"))
    assert typ == "NO" and data[0] is not None and data[0].startswith(b"[CANNOT]"), data
    assert b"NUL" in data[0]
    typ, data = conn.append("Drafts", None, None, message(CHRISTELLE, b"\x00"))
    assert typ == "NO"
    typ, data = conn.append("INBOX", None, None, message(CHRISTELLE, b"sans nul\r\n"))
    assert typ == "OK" and b"APPENDUID" in data[0]
    assert conn.select("INBOX")[1] == [b"2"]  # the welcome and the clean one
    assert conn.select("Drafts")[1] == [b"0"]
    conn.logout()
    assert not any(b"\x00" in m for m in mailbox(gateway.directory, INAYA))
