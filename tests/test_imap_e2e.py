"""The IMAP server end to end: the real ``serve`` process, real sockets, clients nobody here
wrote (imaplib, aioimaplib, curl, mbsync), on SQLite and PostgreSQL (SPEC §5). Oversized
literals and over-long lines: test_security_oversized_literals.py; no secret in the logs:
test_security_credentials_in_logs.py; cross-patient access: test_security_cross_patient.py."""

from __future__ import annotations

import imaplib
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import CHRISTELLE, DUPOND, INAYA, PATIENT_PASSWORD, SAMPLES, prepare_gateway
from tests.gateway_proc import LISTENERS, Gateway, free_port, set_listen
from tests.helpers import (
    Raw,
    aioimaplib_login,
    body_after_received,
    mailbox,
    server_log,
    smtp,
    tls_context,
)

PATIENT = f"{INAYA}@patient.mssante.fr"


def sample(name: str) -> bytes:
    return next(SAMPLES.glob(f"{name}-*.eml")).read_bytes()


def deliver(gw: Gateway, client: str, name: str) -> None:
    conn = smtp(gw, client)
    try:
        assert conn.sendmail(client, [PATIENT], sample(name)) == {}
    finally:
        conn.quit()


def starttls_client(gw: Gateway) -> imaplib.IMAP4:
    conn = imaplib.IMAP4("127.0.0.1", gw.ports["imap"], timeout=30)
    conn.starttls(ssl_context=tls_context(gw))
    return conn


def ssl_client(gw: Gateway) -> imaplib.IMAP4_SSL:
    return imaplib.IMAP4_SSL("127.0.0.1", gw.ports["imaps"], ssl_context=tls_context(gw),
                             timeout=30)


def test_login_before_starttls_refused_then_read_welcome_and_delivered_mail(
    gateway: Gateway,
) -> None:
    conn = imaplib.IMAP4("127.0.0.1", gateway.ports["imap"], timeout=30)
    assert "STARTTLS" in conn.capabilities and "LOGINDISABLED" in conn.capabilities
    assert not any(c.startswith("AUTH=") for c in conn.capabilities)
    with pytest.raises(imaplib.IMAP4.error, match="PRIVACYREQUIRED"):
        conn.login(INAYA, PATIENT_PASSWORD)
    conn.starttls(ssl_context=tls_context(gateway))
    typ, caps = conn.capability()
    assert b"AUTH=PLAIN" in caps[0] and b"LOGINDISABLED" not in caps[0]
    conn.login(PATIENT, PATIENT_PASSWORD)
    typ, boxes = conn.list()
    listed = b"\n".join(b for b in boxes if isinstance(b, bytes))
    for line in (b'(\\HasNoChildren) "/" "INBOX"', b'\\Drafts) "/" "Drafts"',
                 b'\\Sent) "/" "Sent"', b'\\Trash) "/" "Trash"'):
        assert line in listed, listed
    deliver(gateway, CHRISTELLE, "01")
    deliver(gateway, DUPOND, "02")
    typ, data = conn.select("INBOX")
    assert typ == "OK" and data == [b"3"]
    typ, data = conn.fetch("1", "(BODY.PEEK[HEADER.FIELDS (SUBJECT FROM)])")
    assert b"Subject: Bienvenue" in data[0][1]
    stored = mailbox(gateway.directory, INAYA)
    typ, data = conn.uid("FETCH", "2:3", "(BODY[] BODYSTRUCTURE)")
    bodies = [part[1] for part in data if isinstance(part, tuple)]
    assert bodies == stored[1:]
    assert body_after_received(bodies[0]) == sample("01")
    structure = b" ".join(p[0] if isinstance(p, tuple) else p for p in data)
    assert b'"APPLICATION" "PDF"' in structure.upper()  # the doctor's attachments show
    typ, data = conn.search(None, "UNSEEN")
    assert data == [b"1"]  # BODY[] set \Seen on 2 and 3
    typ, data = conn.fetch("1:*", "(FLAGS)")
    assert typ == "OK" and len(data) == 3, data
    assert b"\\Seen" in data[1] and b"\\Seen" not in data[0]
    conn.close()
    conn.logout()


def test_draft_move_to_trash_expunge_over_imaps(gateway: Gateway) -> None:
    conn = ssl_client(gateway)
    conn.login(INAYA, PATIENT_PASSWORD)
    draft = (f"From: {PATIENT}\r\nTo: {CHRISTELLE}\r\nSubject: brouillon\r\n\r\n"
             "Bonjour docteur,\r\n").encode()
    typ, data = conn.append("Drafts", "(\\Draft)", None, draft)
    assert typ == "OK" and re.match(rb"\[APPENDUID \d+ 1\]", data[0]), data
    typ, data = conn.select("Drafts")
    assert data == [b"1"]
    typ, data = conn.fetch("1", "(FLAGS BODY.PEEK[])")
    assert b"\\Draft" in data[0][0] and data[0][1] == draft
    typ, data = conn.uid("MOVE", "1", "Trash")
    assert typ == "OK"
    assert conn.select("Drafts")[1] == [b"0"]
    assert conn.select("Trash")[1] == [b"1"]
    conn.store("1", "+FLAGS", "(\\Deleted)")
    typ, data = conn.expunge()
    assert data == [b"1"]
    assert conn.select("Trash")[1] == [b"0"]
    conn.logout()


def test_idle_session_told_of_new_mail_within_a_second(gateway: Gateway) -> None:
    idler = Raw(gateway)
    idler.command("a", f'LOGIN {INAYA} "{PATIENT_PASSWORD}"')
    assert b"* 1 EXISTS\r\n" in idler.command("b", "SELECT INBOX")
    idler.send(b"c IDLE\r\n")
    assert idler.line() == b"+ idling\r\n"
    deliver(gateway, CHRISTELLE, "01")
    delivered = time.monotonic()
    line = idler.line()
    elapsed = time.monotonic() - delivered
    assert line == b"* 2 EXISTS\r\n", line
    assert elapsed < 1.0, elapsed
    assert idler.line() == b"* 2 RECENT\r\n"  # the welcome message and the new one
    idler.send(b"DONE\r\n")
    assert idler.until(b"c ")[-1] == b"c OK IDLE terminated\r\n"
    idler.close()


def test_sessions_see_each_others_flags_and_expunges(gateway: Gateway) -> None:
    deliver(gateway, CHRISTELLE, "01")
    first = Raw(gateway)
    second_conn = starttls_client(gateway)
    second_conn.login(INAYA, PATIENT_PASSWORD)
    second_conn.select("INBOX")
    first.command("a", f'LOGIN {INAYA} "{PATIENT_PASSWORD}"')
    first.command("b", "SELECT INBOX")
    first.command("c", "STORE 2 +FLAGS (\\Flagged \\Deleted)")
    time.sleep(0.1)
    second_conn.noop()
    # the second session selected first: message 2 is \Recent there (RFC 3501 §2.3.2)
    assert second_conn.untagged_responses.get("FETCH") == [
        b"2 (UID 2 FLAGS (\\Flagged \\Deleted \\Recent))"]
    first.command("d", "EXPUNGE")
    time.sleep(0.1)
    second_conn.noop()
    assert second_conn.untagged_responses.get("EXPUNGE") == [b"2"]
    first.close()
    second_conn.logout()


def test_aioimaplib_login_select_fetch_idle(gateway: Gateway) -> None:
    import asyncio

    async def run() -> None:
        async with aioimaplib_login(gateway, PATIENT) as client:
            response = await client.select("INBOX")
            assert response.result == "OK"
            response = await client.fetch("1", "(UID FLAGS ENVELOPE)")
            assert response.result == "OK" and b"Bienvenue" in b" ".join(
                line for line in response.lines if isinstance(line, bytes | bytearray))
            idle = await client.idle_start(timeout=10)
            await asyncio.to_thread(deliver, gateway, DUPOND, "02")
            pushed = await client.wait_server_push(timeout=5)
            client.idle_done()
            await asyncio.wait_for(idle, 10)
            assert any(b"EXISTS" in bytes(line) for line in pushed if isinstance(line, bytes))

    asyncio.run(run())


def test_curl_reads_a_message_over_imaps(gateway: Gateway) -> None:
    result = subprocess.run(
        ["curl", "-sS", "--cacert", str(gateway.ca), "-u", f"{INAYA}:{PATIENT_PASSWORD}",
         f"imaps://127.0.0.1:{gateway.ports['imaps']}/INBOX;UID=1"],
        capture_output=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == mailbox(gateway.directory, INAYA)[0]
    listing = subprocess.run(
        ["curl", "-sS", "--cacert", str(gateway.ca), "-u", f"{INAYA}:{PATIENT_PASSWORD}",
         f"imap://127.0.0.1:{gateway.ports['imap']}/", "--ssl-reqd"],
        capture_output=True, timeout=60, check=False,
    )
    assert listing.returncode == 0, listing.stderr
    assert b"\\Drafts" in listing.stdout and b"Trash" in listing.stdout


def test_mbsync_synchronises_the_mailbox(gateway: Gateway, tmp_path: Path) -> None:
    deliver(gateway, CHRISTELLE, "01")
    local = tmp_path / "mail"
    local.mkdir()
    rc = tmp_path / "mbsyncrc"
    rc.write_text(f"""
IMAPAccount gw
Host localhost
Port {gateway.ports['imaps']}
User {INAYA}
Pass "{PATIENT_PASSWORD}"
SSLType IMAPS
CertificateFile {gateway.ca}
AuthMechs PLAIN

IMAPStore remote
Account gw

MaildirStore local
Path {local}/
Inbox {local}/INBOX
SubFolders Verbatim

Channel sync
Far :remote:
Near :local:
Patterns *
Create Near
Sync Pull
SyncState *
""")
    result = subprocess.run(["mbsync", "-c", str(rc), "-a"], capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, (result.stdout, result.stderr)
    files = sorted((local / "INBOX" / "cur").glob("*")) + sorted(
        (local / "INBOX" / "new").glob("*"))
    assert len(files) == 2
    contents = {f.read_bytes() for f in files}
    # Maildir keeps local line ends (LF) and mbsync adds its X-TUID field: compare bodies.
    bodies = {c.replace(b"\nX-TUID: ", b"\n").split(b"\n\n", 1)[1] for c in contents}
    stored = mailbox(gateway.directory, INAYA)
    assert bodies == {m.replace(b"\r\n", b"\n").split(b"\n\n", 1)[1] for m in stored}
    assert (local / "Drafts").is_dir() and (local / "Trash").is_dir()


def test_connections_per_ip_and_autologout(gw_dir: Path) -> None:
    gw: Gateway = prepare_gateway(gw_dir)  # type: ignore[assignment]
    with gw.config.open("a") as f:
        f.write("\n[limits]\nconnections_per_ip = 2\n")
    gw.start()
    try:
        first, second = Raw(gw), Raw(gw)
        third = Raw(gw)
        assert third.greeting.startswith(b"* BYE [UNAVAILABLE]")
        assert third.line() == b""
        third.close()
        first.close()
        second.close()
    finally:
        gw.kill()
    log = server_log(gw)
    assert "refused (connections per IP)" in log, log
    assert "Traceback" not in log and PATIENT_PASSWORD not in log


@pytest.fixture
def second_process(gateway: Gateway) -> Iterator[Gateway]:
    """Another ``serve`` process on the same database and directory, on other ports."""
    import shutil

    other_dir = gateway.directory.parent / "gw2"
    shutil.copytree(gateway.directory, other_dir,
                    ignore=shutil.ignore_patterns("serve-*.log", "*.db*"))
    config = other_dir / "gateway.toml"  # the storage URL is absolute: same database
    other = Gateway(other_dir)
    for name in LISTENERS:  # every listener, or the two processes would share a port
        other.ports[name] = free_port()
        set_listen(config, name, f"127.0.0.1:{other.ports[name]}")
    other.start()
    try:
        yield other
    finally:
        other.kill()


def test_sessions_in_two_processes_see_each_other(gateway: Gateway,
                                                 second_process: Gateway) -> None:
    here, there = Raw(gateway), Raw(second_process)
    for raw in (here, there):
        raw.command("a", f'LOGIN {INAYA} "{PATIENT_PASSWORD}"')
        raw.command("b", "SELECT INBOX")
    there.send(b"c IDLE\r\n")
    assert there.line() == b"+ idling\r\n"
    here.command("d", "STORE 1 +FLAGS (\\Flagged)")
    changed = time.monotonic()
    line = there.line()
    assert time.monotonic() - changed < 1.0
    # \Recent went to the session that selected first (here), never to both.
    assert line == b"* 1 FETCH (UID 1 FLAGS (\\Flagged))\r\n", line
    deliver(gateway, CHRISTELLE, "01")
    assert there.line() == b"* 2 EXISTS\r\n"
    there.send(b"DONE\r\n")
    there.until(b"c ")
    here.close()
    there.close()
