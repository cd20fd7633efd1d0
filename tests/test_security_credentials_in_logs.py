"""Security regressions: credentials never reach the logs. Passwords given to SMTP AUTH (PLAIN,
LOGIN) or IMAP LOGIN/AUTHENTICATE, in clear or base64, are never logged, nor is health data
(message contents, envelope addresses that are INS); the parsed commands keep secrets out of
their ``repr`` so that no log line or traceback can show them (SPEC §9)."""

from __future__ import annotations

import base64
import smtplib

import pytest

from imap_store.imap.commands import Append, Authenticate, Login
from imap_store.imap.parser import RawLine
from tests.conftest import CHRISTELLE, INAYA, PATIENT_PASSWORD, PRO_PASSWORD
from tests.gateway_proc import Gateway
from tests.helpers import Raw, one, sample, server_log, smtp

PATIENT = f"{INAYA}@patient.mssante.fr"


def test_credentials_never_logged(limited: Gateway) -> None:
    conn = smtp(limited, None, "submission")
    conn.user, conn.password = CHRISTELLE, PRO_PASSWORD
    assert conn.auth("LOGIN", conn.auth_login, initial_response_ok=False)[0] == 235
    # A message to the patient puts her INS in the envelope the session handles.
    assert conn.sendmail(CHRISTELLE, [PATIENT], sample("01")) == {}
    conn.quit()
    conn = smtp(limited, None, "submission")
    with pytest.raises(smtplib.SMTPAuthenticationError):
        conn.login(CHRISTELLE, "un autre secret")
    conn.quit()
    log = server_log(limited)
    # The log is the server's and recorded both sessions: what it lacks, it left out.
    assert "authenticated professional by password" in log, log
    assert "stored a message for 1 recipient(s)" in log, log
    for secret in (PRO_PASSWORD, "un autre secret"):
        assert secret not in log
        assert base64.b64encode(secret.encode()).decode() not in log
    assert INAYA not in log  # envelope addresses (INS) are not logged either


def test_no_exception_text_and_no_secret_in_logs(gateway: Gateway) -> None:
    raw = Raw(gateway)
    assert raw.command("a", f'LOGIN {INAYA} "{PATIENT_PASSWORD}"')[-1].startswith(b"a OK")
    assert raw.command("b", "SELECT INBOX")[-1].startswith(b"b OK")
    fetched = raw.command("c", "FETCH 1 (BODY[])")
    assert fetched[-1].startswith(b"c OK")
    assert b"Bienvenue" in b"".join(fetched)  # the content the log must not show
    raw.send(b"\x00\xff garbage\r\n")
    assert raw.line().startswith(b"* BAD")
    raw.command("d", "LOGOUT")
    raw.close()
    log = server_log(gateway)
    assert "patient logged in" in log, log  # the session was logged, without its secrets
    assert PATIENT_PASSWORD not in log and "Bienvenue" not in log and "Traceback" not in log


def test_secrets_are_not_in_repr() -> None:
    # Each event holds the secret (so its absence from repr is no accident of parsing) and
    # its repr still names it.
    login = one(b"a LOGIN bob hunter2\r\n")
    assert isinstance(login, Login) and login.password == b"hunter2"
    assert repr(login).startswith("Login(tag='a', user='bob'")
    assert "hunter2" not in repr(login)
    auth = one(b"a AUTHENTICATE PLAIN AGJvYgBodW50ZXIy\r\n")
    assert isinstance(auth, Authenticate) and auth.initial_response == b"\0bob\0hunter2"
    assert repr(auth).startswith("Authenticate(tag='a', mechanism='PLAIN'")
    assert "hunter2" not in repr(auth) and "AGJv" not in repr(auth)
    assert repr(RawLine(b"hunter2")).startswith("RawLine(")
    assert "hunter2" not in repr(RawLine(b"hunter2"))
    append = one(b"a APPEND INBOX {7+}\r\nhunter2\r\n")
    assert isinstance(append, Append) and append.message == b"hunter2"
    assert repr(append).startswith("Append(tag='a', mailbox='INBOX'")
    assert "hunter2" not in repr(append)
