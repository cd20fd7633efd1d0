"""Header fields RFC 5322 §3.6 allows once (issue 15.1): a message with two ``From:`` (or
``Sender``, ``Reply-To``, ``To``, ``Subject``, ``Message-ID``, ``In-Reply-To``, ``Date``) is
refused with ``554 5.6.0`` naming the field, on intake (professional -> patient) and on
submission (patient -> professional). Only the first ``From:`` was checked by R10, while mail
clients show and answer both.

End to end against the real ``serve`` with smtplib; the decision (policy) and the scan of the
header block (SMTP edge) directly."""

from __future__ import annotations

import json
import smtplib
import time

import pytest

from imap_store.mime import parse_message
from policy.rules import UNIQUE_FIELDS, decide_unique_fields
from smtp_in.delivery import unique_field_names
from tests.conftest import CHRISTELLE, DUPOND, INAYA, PATIENT_PASSWORD
from tests.gateway_proc import Gateway, run_cli
from tests.helpers import mailbox, sample, smtp

PATIENT = f"{INAYA}@patient.mssante.fr"
CHEF = "chef@ch-exemple.mssante.fr"


def message(*fields: str, body: str = "Bonjour.\r\n") -> bytes:
    return ("\r\n".join(fields) + "\r\n\r\n" + body).encode()


# --------------------------------------------------------------------------- the decision


def test_decision_names_each_repeated_field_any_case() -> None:
    assert decide_unique_fields(["received", "from", "to", "subject", "date"]).allowed
    assert decide_unique_fields(["received", "received", "cc", "cc", "references"]).allowed
    decision = decide_unique_fields(["From", "to", "FROM"])
    assert not decision.allowed
    assert (decision.rule, decision.smtp_code, decision.enhanced_code) == ("RFC5322", 554,
                                                                           "5.6.0")
    assert decision.reply.startswith("554 5.6.0 ") and "From:" in decision.reply
    both = decide_unique_fields(["subject", "reply-to", "Subject", "REPLY-TO", "subject"])
    assert "Subject:, Reply-To:" in both.text
    assert set(UNIQUE_FIELDS) == {"from", "sender", "reply-to", "to", "subject", "message-id",
                                  "in-reply-to", "date"}


def test_scan_reads_top_level_field_names_only() -> None:
    raw = (b"Received: from x\r\n\tby y; From: folded continuation\r\n"
           b"from : <a@b.fr>\r\nTo: p@q.fr\r\nSubject: s\r\n  To: continuation\r\n"
           b"Content-Type: multipart/mixed; boundary=b\r\n\r\n"
           b"From: in the body\r\n--b\r\nFrom: part header\r\nSubject: part\r\n\r\nx\r\n--b--\r\n")
    assert unique_field_names(raw, parse_message(raw)) == ["from", "to", "subject"]
    assert decide_unique_fields(unique_field_names(raw, parse_message(raw))).allowed
    big = message("From: a@b.fr", "Subject: s", body="From: x\r\n" * 300_000)  # 2.7 MB body
    started = time.perf_counter()
    names = unique_field_names(big, parse_message(big))
    assert names == ["from", "subject"] and time.perf_counter() - started < 1.0


# --------------------------------------------------------------------------- end to end


def _refusal(conn: smtplib.SMTP, sender: str, rcpt: str, data: bytes) -> tuple[int, bytes]:
    with pytest.raises(smtplib.SMTPDataError) as info:
        conn.sendmail(sender, [rcpt], data)
    error = info.value.smtp_error
    assert isinstance(error, bytes)
    return info.value.smtp_code, error


def test_second_from_refused_on_intake(gateway: Gateway) -> None:
    """The issue's case: own address first, the chief's second; then every unique field, in
    any letter case; the session goes on and a clean message is stored."""
    conn = smtp(gateway, DUPOND)
    code, text = _refusal(conn, DUPOND, PATIENT, message(
        f"From: Docteur Dupond <{DUPOND}>", f"From: Le chef <{CHEF}>", f"To: {PATIENT}",
        "Subject: compte rendu"))
    assert code == 554 and text.startswith(b"5.6.0") and b"From:" in text
    for field, value in (("Sender", DUPOND), ("reply-to", CHEF), ("TO", PATIENT),
                         ("sUbJeCt", "bis"), ("Message-Id", "<x@y.fr>"),
                         ("In-Reply-To", "<x@y.fr>"), ("date", "Mon, 2 Nov 2026 10:00 +0100")):
        data = message(f"From: {DUPOND}", f"To: {PATIENT}", "Subject: s",
                       f"{field}: {value}", "X-Other: between", f"{field.upper()} : {value}")
        code, text = _refusal(conn, DUPOND, PATIENT, data)
        assert code == 554 and text.startswith(b"5.6.0"), (field, text)
        assert UNIQUE_FIELDS[field.lower()].encode() + b":" in text, (field, text)
    assert conn.sendmail(DUPOND, [PATIENT], sample("02")) == {}
    conn.quit()
    stored = mailbox(gateway.directory, INAYA)
    assert len(stored) == 2 and CHEF.encode() not in stored[1]  # welcome + the clean one
    rows = json.loads(run_cli(gateway.config, "audit", "--limit", "100", "--json").stdout)
    refused = [json.loads(str(r["detail"])) for r in rows if r["action"] == "refuse"]
    assert len(refused) == 8 and {d["rule"] for d in refused} == {"RFC5322"}
    assert all(d["smtp_code"] == 554 and d["enhanced_code"] == "5.6.0" for d in refused)


def test_duplicate_fields_refused_on_patient_submission(gateway: Gateway) -> None:
    conn = smtp(gateway, CHRISTELLE)
    assert conn.sendmail(CHRISTELLE, [PATIENT], sample("01")) == {}  # opens the exchange (R2)
    conn.quit()
    conn = smtp(gateway, None, "submission")
    conn.login(INAYA, PATIENT_PASSWORD)
    code, text = _refusal(conn, PATIENT, CHRISTELLE, message(
        f"From: {PATIENT}", f"To: {CHRISTELLE}", "Subject: Re: rendez-vous",
        "Reply-To: quelquun@example.org", "reply-to: autre@example.org"))
    assert code == 554 and text.startswith(b"5.6.0") and b"Reply-To:" in text
    code, text = _refusal(conn, PATIENT, CHRISTELLE, message(
        f"From: {PATIENT}", f"from: {PATIENT}", f"To: {CHRISTELLE}", "Subject: Re: rdv"))
    assert code == 554 and b"From:" in text
    assert mailbox(gateway.directory, INAYA, "Sent") == []
    # One of each: accepted, a copy in Sent.
    assert conn.sendmail(PATIENT, [CHRISTELLE], message(
        f"From: {PATIENT}", f"To: {CHRISTELLE}", "Subject: Re: rendez-vous",
        "Reply-To: quelquun@example.org")) == {}
    conn.quit()
    assert len(mailbox(gateway.directory, INAYA, "Sent")) == 1
