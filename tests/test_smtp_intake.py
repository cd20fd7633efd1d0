"""SMTP intake end to end: the real server, real sockets, smtplib and swaks (SPEC §3, §4).
SMTP smuggling (bare LF/CR in DATA) is in test_security_smuggling.py."""

from __future__ import annotations

import base64
import email
import email.policy
import json
import re
import shutil
import signal
import smtplib
import subprocess
import time

import pytest

from tests.conftest import (
    CHRISTELLE,
    DUPOND,
    INAYA,
    LABO,
    MARIE,
    MARTINE,
    PRO_PASSWORD,
    SAMPLES,
)
from tests.gateway_proc import Gateway, run_cli
from tests.helpers import (
    body_after_received,
    exchange,
    mailbox,
    raw_mail,
    raw_session,
    sample,
    server_log,
    smtp,
    tls_context,
)

PATIENT = f"{INAYA}@patient.mssante.fr"


def send(conn: smtplib.SMTP, sender: str, rcpts: list[str], data: bytes) -> dict[str, object]:
    return conn.sendmail(sender, rcpts, data)  # type: ignore[return-value]


def test_ehlo_keywords_and_tls_required(gateway: Gateway) -> None:
    plain = smtplib.SMTP("127.0.0.1", gateway.ports["smtp"], timeout=30)
    code, text = plain.ehlo("client.test")
    keywords = text.decode().splitlines()[1:]
    assert code == 250
    for kw in ("SIZE 26214400", "8BITMIME", "SMTPUTF8", "PIPELINING", "ENHANCEDSTATUSCODES",
               "STARTTLS"):
        assert kw in keywords
    assert not any(k.startswith("AUTH") for k in keywords)  # no AUTH before TLS
    assert plain.mail(CHRISTELLE) == (530, b"5.7.0 Must issue a STARTTLS command first")
    assert plain.docmd("AUTH PLAIN AGNocmlzdGVsbGUAeA==")[0] == 530
    plain.starttls(context=tls_context(gateway))
    code, text = plain.ehlo("client.test")
    keywords = text.decode().splitlines()[1:]
    assert "AUTH PLAIN LOGIN" in keywords and "STARTTLS" not in keywords
    code, text = plain.mail(CHRISTELLE)  # TLS but nobody authenticated
    assert (code, text[:5]) == (530, b"5.7.0")
    plain.quit()


@pytest.mark.parametrize(
    ("client", "name", "recipient"),
    [(CHRISTELLE, "01", INAYA), (DUPOND, "02", INAYA), (LABO, "03", INAYA),
     (MARIE, "13", MARTINE)],
)
def test_professional_certificate_delivers_samples(
    gateway: Gateway, client: str, name: str, recipient: str
) -> None:
    data = sample(name)
    conn = smtp(gateway, client)
    assert send(conn, client, [f"{recipient}@patient.mssante.fr"], data) == {}
    conn.quit()
    stored = mailbox(gateway.directory, recipient)
    assert len(stored) == 2  # welcome + this one
    assert body_after_received(stored[1]) == data  # byte-exact after our trace field
    received = stored[1].split(b"\r\n\r\n")[0]
    assert b"TLSv1.3" in received and b"cipher" in received
    assert f"professional {client}".encode() in received and b"certificate" in received


def test_delivery_opens_exchange_with_reply_to(gateway: Gateway) -> None:
    conn = smtp(gateway, CHRISTELLE)
    send(conn, CHRISTELLE, [PATIENT], sample("01"))
    conn.quit()
    out = run_cli(gateway.config, "exchange", "list", "--patient", INAYA, "--json").stdout
    assert '"address": "christelle.thomas@medecin.mssante.fr"' in out
    assert '"address": "marie.chanteau@medecin.mssante.fr"' in out  # R4 Reply-To
    check = run_cli(gateway.config, "check", "--from", PATIENT, "--to", MARIE, check=False)
    assert check.returncode == 0, check.stdout


@pytest.mark.parametrize("listener", ["submission", "submissions"])
@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_professional_password_delivers(gateway: Gateway, listener: str, mechanism: str) -> None:
    conn = smtp(gateway, None, listener)
    assert "AUTH PLAIN LOGIN" in conn.ehlo_resp.decode()  # type: ignore[union-attr]
    conn.user, conn.password = CHRISTELLE, PRO_PASSWORD
    code, _ = conn.auth(mechanism, getattr(conn, f"auth_{mechanism.lower()}"),
                        initial_response_ok=mechanism == "PLAIN")
    assert code == 235
    assert send(conn, CHRISTELLE, [PATIENT], sample("01")) == {}
    conn.quit()
    received = mailbox(gateway.directory, INAYA)[1].split(b"\r\n\r\n")[0]
    assert b"ESMTPSA" in received and b"by password" in received


def auth_plain(conn: smtplib.SMTP, user: str, password: str) -> tuple[int, bytes]:
    token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
    return conn.docmd("AUTH", f"PLAIN {token}")


def test_auth_first_response_by_challenge_or_malformed(gateway: Gateway) -> None:
    """RFC 4954 §4: the first SASL response on the AUTH line or after a 334 challenge; one
    that is not base64 (PLAIN or LOGIN), or a PLAIN one without its two NULs, gets a 501."""
    conn = smtp(gateway, None, "submission")
    for line in ("PLAIN not*base64", "LOGIN not*base64"):
        code, text = conn.docmd("AUTH", line)
        assert (code, text) == (501, b"5.5.2 cannot decode base64"), line
    code, text = conn.docmd("AUTH", "PLAIN " + base64.b64encode(b"no nul at all").decode())
    assert (code, text) == (501, b"5.5.2 malformed PLAIN response")
    assert conn.docmd("AUTH", "PLAIN")[0] == 334
    token = base64.b64encode(f"\0{CHRISTELLE}\0{PRO_PASSWORD}".encode()).decode()
    assert conn.docmd(token)[0] == 235
    conn.quit()


def test_wrong_password_refused_then_throttled(gateway: Gateway) -> None:
    conn = smtp(gateway, None, "submission")
    for _ in range(5):
        code, text = auth_plain(conn, CHRISTELLE, "wrong password")
        assert (code, text[:5]) == (535, b"5.7.8")
    code, text = auth_plain(conn, CHRISTELLE, PRO_PASSWORD)  # right password, throttled now
    assert (code, text[:5]) == (454, b"4.7.0")
    # Another account from the same address is not throttled (issue 15: per account, and a
    # per-address ceiling of 100 that only slows; tests/test_security_login_throttle.py).
    code, text = auth_plain(conn, "nobody@medecin.mssante.fr", "x" * 10)
    assert (code, text[:5]) == (535, b"5.7.8")
    conn.quit()
    audit = run_cli(gateway.config, "audit", "--limit", "50").stdout
    assert "login.failed" in audit and "login.throttled" in audit
    log = server_log(gateway)
    assert "wrong password" not in log and PRO_PASSWORD not in log


def _audit_rows(gateway: Gateway, want: int) -> list[dict[str, object]]:
    """The newest audit rows, oldest first, once at least ``want`` SMTP rows are written
    (rows nobody waits for go with the next group commit)."""
    deadline = time.monotonic() + 10
    while True:
        rows = json.loads(run_cli(gateway.config, "audit", "--limit", "100", "--json").stdout)
        smtp_rows = [r for r in rows if r["action"] in ("rcpt", "deliver", "refuse")]
        if len(smtp_rows) >= want or time.monotonic() > deadline:
            return smtp_rows
        time.sleep(0.1)


def test_every_rcpt_decision_and_delivery_is_audited(gateway: Gateway) -> None:
    """RCPT decisions are audited whether the transaction delivers, is reset or abandoned."""
    other = f"{MARTINE}@patient.mssante.fr"
    unknown = "100000000000099@patient.mssante.fr"
    conn = smtp(gateway, CHRISTELLE)
    conn.mail(CHRISTELLE)
    assert conn.rcpt(PATIENT)[0] == 250
    assert conn.rcpt(unknown)[0] == 553  # R8: not a valid INS
    assert conn.data(sample("01"))[0] == 250
    conn.mail(CHRISTELLE)
    assert conn.rcpt(other)[0] == 250
    conn.rset()  # abandoned after RCPT: the decision is still audited
    conn.mail(CHRISTELLE)
    assert conn.rcpt(PATIENT)[0] == 250
    conn.close()  # vanished without DATA nor QUIT
    rows = _audit_rows(gateway, 5)
    seen = [(r["action"], r["subject"]) for r in rows]
    # The refusal is written at once; the accepted RCPT with its delivery, in one transaction.
    assert seen == [("rcpt", unknown), ("rcpt", PATIENT), ("deliver", INAYA),
                    ("rcpt", other), ("rcpt", PATIENT)], seen
    allowed = [json.loads(str(r["detail"]))["allowed"] for r in rows if r["action"] == "rcpt"]
    assert allowed == [False, True, True, True]
    verify = run_cli(gateway.config, "audit", "verify")
    assert "intact" in verify.stdout


def test_operator_relays_for_its_domain(gateway: Gateway) -> None:
    conn = smtp(gateway, "operator")
    assert send(conn, MARIE, [f"{MARTINE}@patient.mssante.fr"], sample("13")) == {}
    # An address in a domain the operator does not serve: R10 at MAIL.
    code, text = conn.mail(DUPOND)
    assert (code, text[:5]) == (550, b"5.7.1") and b"R10" in text
    conn.rset()
    # Its domain, but not a directory entry: R1 at RCPT.
    assert conn.mail("inconnu@medecin.mssante.fr")[0] == 250
    code, text = conn.rcpt(PATIENT)
    assert (code, text[:5]) == (550, b"5.7.1") and b"R1" in text
    conn.quit()
    received = mailbox(gateway.directory, MARTINE)[1].split(b"\r\n\r\n")[0]
    assert b"operator medecin.mssante.fr" in received


def test_refusals_answer_with_their_codes(gateway: Gateway) -> None:
    cfg = gateway.config
    conn = smtp(gateway, MARIE)
    assert conn.mail(MARIE)[0] == 250
    code, text = conn.rcpt("289456789012345@patient.mssante.fr")  # sample 14: wrong key
    assert (code, text[:5]) == (553, b"5.1.3") and b"R8" in text and b"key" in text
    code, text = conn.rcpt("279035121518989@patient.mssante.fr")  # valid INS, no mailbox
    assert (code, text[:5]) == (550, b"5.1.1") and b"R8" in text
    code, text = conn.rcpt("someone@gmail.com")  # no open relay
    assert (code, text[:5]) == (550, b"5.7.1")
    assert conn.rcpt(PATIENT)[0] == 250
    conn.rset()
    # R10: From: is not the envelope sender.
    wrong_from = sample("13").replace(b"marie.chanteau@medecin", b"paul.dupond@ch-exemple")
    with pytest.raises(smtplib.SMTPDataError) as info:
        conn.sendmail(MARIE, [PATIENT], wrong_from)
    assert info.value.smtp_code == 550 and info.value.smtp_error.startswith(b"5.7.1 R10")
    # R10: envelope sender is not the certificate's identity.
    code, text = conn.mail(CHRISTELLE)
    assert (code, text[:9]) == (550, b"5.7.1 R10")
    # R7: declared SIZE above 25 MiB.
    code, text = conn.mail(MARIE, ["SIZE=26214401"])
    assert (code, text[:9]) == (552, b"5.3.4 R7:")
    conn.quit()
    # R8: closed mailbox; R9: suspended professional.
    run_cli(cfg, "patient", "close", MARTINE)
    run_cli(cfg, "professional", "suspend", DUPOND)
    conn = smtp(gateway, MARIE)
    conn.mail(MARIE)
    code, text = conn.rcpt(f"{MARTINE}@patient.mssante.fr")
    assert (code, text[:9]) == (550, b"5.2.1 R8:")
    conn.quit()
    conn = smtp(gateway, DUPOND)
    conn.mail(DUPOND)
    code, text = conn.rcpt(PATIENT)
    assert (code, text[:9]) == (550, b"5.7.1 R9:")
    conn.quit()


def test_end_of_exchange_by_header_and_subject(gateway: Gateway) -> None:
    conn = smtp(gateway, CHRISTELLE)
    send(conn, CHRISTELLE, [PATIENT], sample("01"))
    send(conn, CHRISTELLE, [PATIENT], sample("04"))  # X-MSS-MES: FIN
    conn.quit()
    conn = smtp(gateway, DUPOND)
    send(conn, DUPOND, [PATIENT], sample("02"))
    send(conn, DUPOND, [PATIENT], sample("05"))  # [FIN] subject
    conn.quit()
    stored = mailbox(gateway.directory, INAYA)
    # welcome, 01, 04, notice, 02, 05, notice
    assert len(stored) == 7
    notice = stored[3]
    assert b"In-Reply-To: " in notice and b"Auto-Submitted: auto-generated" in notice
    parsed = email.message_from_bytes(notice, policy=email.policy.default)
    assert parsed["Subject"] == "Christelle Thomas a mis fin à vos échanges"
    text_part = parsed.get_body(("plain",))
    assert text_part is not None and "Christelle Thomas a mis fin" in text_part.get_content()
    msg04_id = [ln for ln in sample("04").split(b"\r\n") if ln.lower().startswith(b"message-id:")]
    assert msg04_id[0].split(b":", 1)[1].strip() in notice
    contacts = run_cli(gateway.config, "exchange", "list", "--patient", INAYA, "--json").stdout
    assert contacts.count('"state": "ended"') == 3  # Christelle, her Reply-To Marie, Dupond
    refused = run_cli(gateway.config, "check", "--from", PATIENT, "--to", CHRISTELLE, check=False)
    assert refused.returncode == 1 and "R3" in refused.stdout
    # A later message re-opens (R2).
    conn = smtp(gateway, CHRISTELLE)
    send(conn, CHRISTELLE, [PATIENT], sample("01"))
    conn.quit()
    assert run_cli(gateway.config, "check", "--from", PATIENT, "--to", CHRISTELLE,
                   check=False).returncode == 0


def test_long_header_line_refused_and_server_answers(gateway: Gateway) -> None:
    conn = smtp(gateway, DUPOND)
    with pytest.raises(smtplib.SMTPDataError) as info:
        conn.sendmail(DUPOND, [PATIENT], sample("12"))
    assert info.value.smtp_code == 554 and b"998" in info.value.smtp_error
    assert conn.noop()[0] == 250
    assert send(conn, DUPOND, [PATIENT], sample("02")) == {}
    conn.quit()


def test_broken_mime_stored_cleanly(gateway: Gateway) -> None:
    # Without its NUL octet: a NUL is refused (tests/test_security_nul_bytes.py).
    data = sample("11").replace(b"\x00", b"")
    conn = smtp(gateway, DUPOND)
    assert send(conn, DUPOND, [PATIENT], data) == {}
    conn.quit()
    assert body_after_received(mailbox(gateway.directory, INAYA)[1]) == data


def test_client_vanishing_mid_data_stores_nothing(gateway: Gateway) -> None:
    with raw_session(gateway, DUPOND) as sock:
        raw_mail(sock, DUPOND, PATIENT)
        sock.sendall(b"From: " + DUPOND.encode() + b"\r\nSubject: half\r\n\r\n" + b"x" * 5000)
        sock.close()
        time.sleep(0.3)
        conn = smtp(gateway, DUPOND)  # the server still answers
        assert conn.noop()[0] == 250
        conn.quit()
        assert len(mailbox(gateway.directory, INAYA)) == 1


def test_pipelined_commands_after_data(gateway: Gateway) -> None:
    with raw_session(gateway, DUPOND) as sock:
        raw_mail(sock, DUPOND, PATIENT)
        data = f"From: {DUPOND}\r\nSubject: p\r\n\r\nbody\r\n.\r\nNOOP\r\n".encode()
        sock.sendall(data)
        with sock.makefile("rb") as f:
            assert f.readline().startswith(b"250 2.0.0")
            assert f.readline().startswith(b"250")  # the NOOP sent in the same packet


def test_pipelined_group_replies_come_together_in_order(gateway: Gateway) -> None:
    """RFC 2920: MAIL, RCPT (one refused) and DATA sent at once get their replies in order;
    the gateway holds the replies of MAIL and RCPT while the next command is already there,
    so the whole group's replies come back in one TLS record."""
    with raw_session(gateway, DUPOND) as sock:
        assert exchange(sock, b"EHLO raw.test\r\n")[-1].startswith(b"250 ")
        sock.sendall(f"MAIL FROM:<{DUPOND}>\r\nRCPT TO:<{PATIENT}>\r\n"
                     f"RCPT TO:<100000000000099@patient.mssante.fr>\r\nDATA\r\n".encode())
        first = sock.recv(65536)  # one record: every reply of the group
        lines = first.split(b"\r\n")
        assert lines[0].startswith(b"250 2.1.0") and lines[1].startswith(b"250 2.1.5"), lines
        assert lines[2].startswith(b"553 5.1.3") and lines[3].startswith(b"354"), lines
        reply = exchange(sock, f"From: {DUPOND}\r\nSubject: p\r\n\r\nbody\r\n.\r\n".encode())
        assert reply[0].startswith(b"250 2.0.0"), reply
        # A command alone is answered at once (nothing held when nothing follows).
        assert exchange(sock, b"RSET\r\n")[0].startswith(b"250")
        assert exchange(sock, f"MAIL FROM:<{DUPOND}>\r\n".encode())[0].startswith(b"250")
        assert exchange(sock, b"QUIT\r\n")[0].startswith(b"221")
    assert len(mailbox(gateway.directory, INAYA)) == 2


def test_long_pipelined_group_answered_in_order(gateway: Gateway) -> None:
    """150 RCPTs in one write (every other one refused), then DATA: 152 replies in order; the
    session gives the loop away every few dozen replies, and the message is delivered once."""
    with raw_session(gateway, DUPOND) as sock:
        assert exchange(sock, b"EHLO raw.test\r\n")[-1].startswith(b"250 ")
        rcpts = [PATIENT if i % 2 == 0 else "100000000000099@patient.mssante.fr"
                 for i in range(150)]
        sock.sendall(f"MAIL FROM:<{DUPOND}>\r\n".encode()
                     + b"".join(f"RCPT TO:<{r}>\r\n".encode() for r in rcpts) + b"DATA\r\n")
        lines: list[bytes] = []
        buf = b""
        while len(lines) < 152:
            chunk = sock.recv(65536)
            assert chunk, lines[-3:]
            buf += chunk
            *done, buf = buf.split(b"\r\n")
            lines.extend(done)
        assert lines[0].startswith(b"250 2.1.0")
        for i, line in enumerate(lines[1:151]):
            assert line.startswith(b"250 2.1.5" if i % 2 == 0 else b"553 5.1.3"), (i, line)
        assert lines[151].startswith(b"354")
        reply = exchange(sock, f"From: {DUPOND}\r\nSubject: p\r\n\r\nbody\r\n.\r\n".encode())
        assert reply[0].startswith(b"250 2.0.0"), reply
    assert len(mailbox(gateway.directory, INAYA)) == 2  # welcome + one copy, not 75


def test_help_lists_the_commands(gateway: Gateway) -> None:
    conn = smtp(gateway, DUPOND)
    for command, text in (("MAIL", b"MAIL FROM: <address>"), ("RCPT", b"RCPT TO: <address>"),
                          ("RSET", b"RSET"), ("DATA", b"DATA"), ("EHLO", b"EHLO hostname")):
        code, reply = conn.docmd("HELP", command)
        assert code == 250 and text in reply, (command, code, reply)
    conn.quit()


def test_sigkill_after_250_loses_nothing(gateway: Gateway) -> None:
    conn = smtp(gateway, DUPOND)
    assert send(conn, DUPOND, [PATIENT], sample("02")) == {}
    gateway.kill()  # SIGKILL right after the 250
    conn.close()
    gateway.start()
    stored = mailbox(gateway.directory, INAYA)
    assert len(stored) == 2 and body_after_received(stored[1]) == sample("02")


def test_sigterm_exits_zero(gateway: Gateway) -> None:
    conn = smtp(gateway, DUPOND)
    conn.mail(DUPOND)
    assert gateway.stop(signal.SIGTERM) == 0
    code, text = conn.rcpt(PATIENT)  # the session was told the service is stopping
    assert (code, text[:5]) == (421, b"4.3.2")
    conn.close()
    assert "stopped" in gateway.log()
    assert "Traceback" not in gateway.log()


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks not installed (.ci/run "
                    "installs it)")
def test_swaks_delivers_with_certificate(gateway: Gateway) -> None:
    folder = gateway.directory / "clients" / CHRISTELLE
    result = subprocess.run(
        ["swaks", "--server", f"127.0.0.1:{gateway.ports['smtp']}", "--tls",
         "--tls-ca-path", str(gateway.ca), "--tls-cert", str(folder / "cert.pem"),
         "--tls-key", str(folder / "key.pem"), "--from", CHRISTELLE, "--to", PATIENT,
         "--data", "@" + str(SAMPLES / "01-secretary-appointment.eml")],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "<~  250 2.0.0 message stored" in result.stdout
    assert len(mailbox(gateway.directory, INAYA)) == 2


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks not installed")
def test_swaks_refusal_r8(gateway: Gateway) -> None:
    folder = gateway.directory / "clients" / MARIE
    result = subprocess.run(
        ["swaks", "--server", f"127.0.0.1:{gateway.ports['smtp']}", "--tls",
         "--tls-ca-path", str(gateway.ca), "--tls-cert", str(folder / "cert.pem"),
         "--tls-key", str(folder / "key.pem"), "--from", MARIE,
         "--to", "289456789012345@patient.mssante.fr",
         "--data", "@" + str(SAMPLES / "14-to-invalid-ins-key.eml")],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode != 0
    assert re.search(r"553 5\.1\.3 R8: invalid patient address", result.stdout), result.stdout


def test_malformed_commands_refused_with_codes(gateway: Gateway) -> None:
    conn = smtp(gateway, DUPOND)
    code, text = conn.docmd("MAIL FROM:<<<>>>")
    assert (code, text[:5]) == (553, b"5.1.3")
    code, text = conn.docmd("RCPT TO:<x>")  # no sender accepted yet
    assert (code, text[:5]) == (503, b"5.5.1")
    code, text = conn.docmd("BOGUS")
    assert (code, text[:5]) == (500, b"5.5.2")
    assert conn.noop()[0] == 250  # the session goes on
    conn.quit()
    assert "Traceback" not in server_log(gateway)
