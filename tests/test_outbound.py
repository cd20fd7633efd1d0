"""Patients write back (R3, R4, R6, R10), the outbound queue and its relay, bounces, and
notifications (SPEC §6): the real gateway, a real local SMTP server as the professional's
operator and as the notification relay."""

from __future__ import annotations

import base64
import email
import email.policy
import json
import os
import re
import smtplib
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path

import dkim
import pytest

from tests.conftest import (
    CHRISTELLE,
    DUPOND,
    INAYA,
    MARIE,
    PATIENT_PASSWORD,
    SAMPLES,
    prepare_gateway,
)
from tests.gateway_proc import Gateway, free_port, run_cli, set_routes
from tests.helpers import mailbox, sample, server_log, smtp
from tests.relay import Relay, operator_relay, running_with

PATIENT = f"{INAYA}@patient.mssante.fr"


@dataclass
class World:
    gw: Gateway
    operator: Relay
    notifier: Relay


@pytest.fixture
def world(gw_dir: Path) -> Iterator[World]:
    gw: Gateway = prepare_gateway(gw_dir)  # type: ignore[assignment]
    operator = operator_relay(gw)
    notifier = Relay(free_port(), None, None, require_tls=False)
    set_routes(gw.config, {"medecin.mssante.fr": operator.port,
                           "ch-exemple.mssante.fr": operator.port})
    text = gw.config.read_text()
    text = re.sub(r"(?m)^retry_schedule = .*$", "retry_schedule = [1]", text)
    text = re.sub(r'(?m)^relay = ""', f'relay = "127.0.0.1:{notifier.port}"', text)
    gw.config.write_text(text)
    with running_with(gw, operator, notifier):
        yield World(gw, operator, notifier)


def patient_smtp(gw: Gateway, listener: str = "submission") -> smtplib.SMTP:
    conn = smtp(gw, None, listener)
    conn.login(INAYA, PATIENT_PASSWORD)  # the bare INS is a login name
    return conn


def professional_writes(gw: Gateway, address: str, name: str) -> None:
    conn = smtp(gw, address)
    assert conn.sendmail(address, [PATIENT], sample(name)) == {}
    conn.quit()


def test_patient_reply_reaches_professional(world: World) -> None:
    gw = world.gw
    professional_writes(gw, CHRISTELLE, "01")
    conn = patient_smtp(gw)
    reply = sample("06")
    # The same professional twice (two spellings): relayed once.
    assert conn.sendmail(PATIENT, [CHRISTELLE, CHRISTELLE.upper()], reply) == {}
    conn.quit()
    got = world.operator.handler.wait(1)
    assert len(got) == 1
    assert got[0].recipients == [CHRISTELLE] and got[0].sender.lower() == PATIENT.lower()
    assert got[0].tls and "mssante.test" not in got[0].client_cert_dns
    assert got[0].client_cert_dns, "our client certificate was presented"
    assert got[0].data.endswith(reply)
    sent = mailbox(gw.directory, INAYA, "Sent")
    assert len(sent) == 1 and sent[0].endswith(reply)
    items = json.loads(run_cli(gw.config, "--json", "queue", "list", "--all",
                               prog="mssante-gateway").stdout)
    relays = [i for i in items if i["kind"] == "relay"]
    assert [i["state"] for i in relays] == ["sent"]


def test_reply_to_doctor_and_subject_rule(world: World) -> None:
    gw = world.gw
    professional_writes(gw, CHRISTELLE, "01")  # Reply-To: Dr Chanteau (R4)
    conn = patient_smtp(gw, "submissions")
    assert conn.sendmail(PATIENT, [MARIE], sample("08")) == {}  # 80 characters: accepted
    with pytest.raises(smtplib.SMTPDataError) as info:
        conn.sendmail(PATIENT, [MARIE], sample("07"))  # 81 characters, new conversation
    assert info.value.smtp_code == 550
    assert info.value.smtp_error.startswith(b"5.7.1 R6: subject too long")
    conn.quit()
    got = world.operator.handler.wait(1)
    assert [m.recipients for m in got] == [[MARIE]]


def big_message(megabytes: list[int], subject: str = "Mes documents") -> bytes:
    msg = EmailMessage()
    msg["From"] = PATIENT
    msg["To"] = CHRISTELLE
    msg["Subject"] = subject
    msg.set_content("Bonjour, voici mes documents.")
    for i, size in enumerate(megabytes):
        msg.add_attachment(os.urandom(size * 1_000_000), maintype="application",
                           subtype="pdf", filename=f"document-{i}.pdf")
    return msg.as_bytes(policy=email.policy.SMTP)


def test_attachments_over_10_mb_refused(world: World) -> None:
    gw = world.gw
    professional_writes(gw, CHRISTELLE, "01")
    conn = patient_smtp(gw)
    with pytest.raises(smtplib.SMTPDataError) as info:
        conn.sendmail(PATIENT, [CHRISTELLE], big_message([6, 5]))
    assert info.value.smtp_code == 552
    assert info.value.smtp_error.startswith(b"5.3.4 R6: attachments too large")
    assert conn.sendmail(PATIENT, [CHRISTELLE], big_message([6, 3])) == {}
    conn.quit()
    assert len(world.operator.handler.wait(1)) == 1


def test_after_end_of_exchange_reply_refused(world: World) -> None:
    gw = world.gw
    professional_writes(gw, CHRISTELLE, "01")
    professional_writes(gw, CHRISTELLE, "04")  # X-MSS-MES: FIN
    conn = patient_smtp(gw)
    conn.mail(PATIENT)
    code, text = conn.rcpt(CHRISTELLE)
    assert (code, text[:9]) == (550, b"5.7.1 R3:") and b"ended" in text
    code, text = conn.rcpt(MARIE)  # the Reply-To address of that exchange ended with it
    assert code == 550
    code, text = conn.rcpt(DUPOND)  # never wrote
    assert (code, text[:9]) == (550, b"5.7.1 R3:")
    conn.quit()


def test_patient_identity_alignment_r10(world: World) -> None:
    gw = world.gw
    professional_writes(gw, CHRISTELLE, "01")
    conn = patient_smtp(gw)
    code, text = conn.mail("262112A04501213@patient.mssante.fr")
    assert (code, text[:9]) == (550, b"5.7.1 R10")
    conn.rset()
    forged = sample("06").replace(b"From: Inaya Michel <289057512345621@",
                                  b"From: Inaya Michel <262112A04501213@")
    with pytest.raises(smtplib.SMTPDataError) as info:
        conn.sendmail(PATIENT, [CHRISTELLE], forged)
    assert info.value.smtp_code == 550 and info.value.smtp_error.startswith(b"5.7.1 R10")
    code, _ = conn.mail(PATIENT)
    code, text = conn.rcpt(f"{'262112A04501213'}@patient.mssante.fr")  # patient to patient
    assert (code, text[:9]) == (550, b"5.7.1 R3:")
    conn.quit()


def test_relay_refusal_bounces_to_inbox(world: World) -> None:
    gw = world.gw
    world.operator.handler.refuse.add(CHRISTELLE)
    professional_writes(gw, CHRISTELLE, "01")
    conn = patient_smtp(gw)
    assert conn.sendmail(PATIENT, [CHRISTELLE], sample("06")) == {}
    conn.quit()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and len(mailbox(gw.directory, INAYA)) < 3:
        time.sleep(0.2)
    inbox = mailbox(gw.directory, INAYA)
    assert len(inbox) == 3  # welcome, 01, bounce
    bounce = email.message_from_bytes(inbox[2], policy=email.policy.default)
    assert bounce["Subject"] == "Message non distribué"
    text = bounce.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert CHRISTELLE in text and "550" in text and "refusé" in text
    items = json.loads(run_cli(gw.config, "--json", "queue", "list", "--all",
                               prog="mssante-gateway").stdout)
    assert [i["state"] for i in items if i["kind"] == "relay"] == ["bounced"]


def test_relay_down_keeps_message_across_restart(world: World) -> None:
    gw = world.gw
    professional_writes(gw, CHRISTELLE, "01")
    world.operator.stop()
    conn = patient_smtp(gw)
    assert conn.sendmail(PATIENT, [CHRISTELLE], sample("06")) == {}
    conn.quit()
    time.sleep(2.5)  # a few tries fail (retry_schedule = [1])
    items = json.loads(run_cli(gw.config, "--json", "queue", "list",
                               prog="mssante-gateway").stdout)
    relays = [i for i in items if i["kind"] == "relay"]
    assert len(relays) == 1 and relays[0]["state"] == "queued" and relays[0]["attempts"] >= 1
    assert relays[0]["last_error"]
    gw.kill()
    gw.start()
    world.operator.start()
    run_cli(gw.config, "queue", "retry", "--all", prog="mssante-gateway")
    got = world.operator.handler.wait(1)
    assert len(got) == 1 and got[0].data.endswith(sample("06"))
    assert len(mailbox(gw.directory, INAYA)) == 2  # no bounce


def dkim_dns(gw: Gateway):  # type: ignore[no-untyped-def]
    line = (gw.directory / "certs" / "dkim.txt").read_text().strip()
    name, record = line.split(" IN TXT ")
    value = record.strip('"').encode()

    def lookup(query: bytes, timeout: int = 5) -> bytes | None:
        return value if query.decode().rstrip(".") == name else None

    return lookup


def test_notification_is_dkim_signed_and_says_nothing(world: World) -> None:
    gw = world.gw
    start = time.monotonic()
    professional_writes(gw, DUPOND, "02")
    got = world.notifier.handler.wait(1)
    assert len(got) == 1
    elapsed = got[0].at - start
    assert got[0].recipients == ["inaya@example.org"]
    data = got[0].data
    assert dkim.verify(data, dnsfunc=dkim_dns(gw))
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert msg["From"].addresses[0].addr_spec == "ne-pas-repondre@mssante.test"
    assert msg.get_content_type() == "multipart/alternative"
    text = msg.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    html = msg.get_body(("html",)).get_content()  # type: ignore[union-attr]
    assert "Bonjour Inaya Michel" in text and "Inaya Michel" in html
    assert 'lang="fr"' in html
    original = email.message_from_bytes(sample("02"), policy=email.policy.default)
    secrets = ["Dupond", "dupond", str(original["Subject"])[:30]]
    secrets += [part.get_filename() for part in original.iter_attachments()]  # type: ignore[misc]
    for secret in secrets:
        assert secret and secret not in text and secret not in html, secret
        assert secret.encode() not in data
    print(f"notification at the relay {elapsed:.2f}s after the 250")


def test_notification_outage_restart_merges_into_one(world: World) -> None:
    gw = world.gw
    world.notifier.stop()
    professional_writes(gw, DUPOND, "02")
    professional_writes(gw, CHRISTELLE, "01")
    time.sleep(1.5)
    gw.kill()
    gw.start()
    world.notifier.start()
    run_cli(gw.config, "queue", "retry", "--all", prog="mssante-gateway")
    got = world.notifier.handler.wait(1)
    time.sleep(2.0)  # anything else would have arrived by now
    got = world.notifier.handler.wait(2, timeout=0.1)
    assert len(got) == 1 and got[0].recipients == ["inaya@example.org"]


def test_no_notification_for_notices_or_patient_mail(world: World) -> None:
    gw = world.gw
    professional_writes(gw, CHRISTELLE, "01")
    assert len(world.notifier.handler.wait(1)) == 1
    conn = patient_smtp(gw)
    assert conn.sendmail(PATIENT, [CHRISTELLE], sample("06")) == {}
    conn.quit()
    assert len(world.operator.handler.wait(1)) == 1
    time.sleep(1.5)
    assert len(world.notifier.handler.messages) == 1


def test_swaks_patient_reply(world: World) -> None:
    import shutil

    if shutil.which("swaks") is None:
        pytest.skip("swaks not installed (.ci/run installs it)")
    gw = world.gw
    professional_writes(gw, CHRISTELLE, "01")
    result = subprocess.run(
        ["swaks", "--server", f"127.0.0.1:{gw.ports['submission']}", "--tls",
         "--tls-ca-path", str(gw.ca), "--auth", "PLAIN", "--auth-user", PATIENT,
         "--auth-password", PATIENT_PASSWORD, "--from", PATIENT, "--to", CHRISTELLE,
         "--data", "@" + str(SAMPLES / "06-patient-reply-with-pdf.eml")],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "250 2.0.0 message queued" in result.stdout
    log = server_log(gw)
    assert "authenticated patient by password" in log, log
    assert PATIENT_PASSWORD not in log
    assert base64.b64encode(PATIENT_PASSWORD.encode()).decode() not in log
    assert len(world.operator.handler.wait(1)) == 1
