"""A patient's sent message appears once in Sent: the gateway files it, and the copy a mail
client appends right after sending is answered with the gateway's copy (issue 15, "Sent
duplicates"). Real SMTP submission and IMAP APPEND, SQLite and PostgreSQL."""

from __future__ import annotations

import imaplib
import re
import ssl
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import make_msgid

from tests.conftest import CHRISTELLE, INAYA, PATIENT_PASSWORD
from tests.gateway_proc import Gateway
from tests.helpers import sample, smtp

PATIENT = f"{INAYA}@patient.mssante.fr"


def reply(message_id: str, text: str) -> bytes:
    msg = EmailMessage()
    msg["From"] = f"Inaya Michel <{PATIENT}>"
    msg["To"] = CHRISTELLE
    msg["Subject"] = "Re: résultats"
    msg["Message-ID"] = message_id
    msg.set_content(text)
    return msg.as_bytes(policy=SMTP)


def imap(gw: Gateway) -> imaplib.IMAP4_SSL:
    ctx = ssl.create_default_context(cafile=str(gw.ca))
    conn = imaplib.IMAP4_SSL("localhost", gw.ports["imaps"], ssl_context=ctx, timeout=30)
    conn.login(INAYA, PATIENT_PASSWORD)
    return conn


def append(conn: imaplib.IMAP4_SSL, mailbox: str, raw: bytes) -> int:
    typ, data = conn.append(mailbox, "(\\Seen)", None, raw)
    assert typ == "OK", data
    found = re.search(rb"APPENDUID \d+ (\d+)", data[0] or b"")
    assert found, data
    return int(found.group(1))


def uids_with(conn: imaplib.IMAP4_SSL, mailbox: str, message_id: str) -> list[int]:
    typ, _ = conn.select(mailbox)
    assert typ == "OK"
    typ, data = conn.uid("SEARCH", "HEADER", "Message-ID", message_id)
    assert typ == "OK"
    return [int(x) for x in (data[0] or b"").split()]


def test_client_copy_in_sent_is_the_gateways_copy(gateway: Gateway) -> None:
    conn = smtp(gateway, CHRISTELLE)
    try:
        assert conn.sendmail(CHRISTELLE, [PATIENT], sample("01")) == {}
    finally:
        conn.quit()
    sent_id = make_msgid(domain="client.example")
    raw = reply(sent_id, "Merci docteur.\n")
    conn = smtp(gateway, listener="submissions")
    try:
        conn.login(INAYA, PATIENT_PASSWORD)
        assert conn.sendmail(PATIENT, [CHRISTELLE], raw) == {}
    finally:
        conn.quit()

    client = imap(gateway)
    try:
        [filed] = uids_with(client, "Sent", sent_id)  # the gateway's copy
        # The client saves its copy to Sent, as Thunderbird, iOS Mail and neomutt do.
        assert append(client, "Sent", raw) == filed
        assert append(client, "Sent", raw) == filed  # a retry too
        assert uids_with(client, "Sent", sent_id) == [filed]
        # Not the gateway's copy: another mailbox, or a message the gateway never sent.
        draft_uid = append(client, "Drafts", raw)
        assert uids_with(client, "Drafts", sent_id) == [draft_uid]
        own_id = make_msgid(domain="client.example")
        own = reply(own_id, "Jamais envoyé.\n")
        first, second = append(client, "Sent", own), append(client, "Sent", own)
        assert first != second and first > filed
        assert uids_with(client, "Sent", own_id) == [first, second]
        typ, data = client.status("Sent", "(MESSAGES)")
        assert typ == "OK" and b"MESSAGES 3" in data[0]
    finally:
        client.logout()
