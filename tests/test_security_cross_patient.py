"""Security regressions: a patient reaches only their own mailboxes over IMAP, whatever name,
pattern, number or UID they try (SPEC §5 "a patient never sees another patient's data").

A refusal counts only as a tagged NO or BAD with the connection still alive afterwards (or, for
LIST and SEARCH, an OK with nothing of hers): a server that crashes or drops the connection on
such a request fails these tests instead of passing them."""

from __future__ import annotations

import imaplib

import pytest

from tests.conftest import INAYA, MARIE, MARTINE, PATIENT_PASSWORD
from tests.gateway_proc import Gateway
from tests.helpers import mailbox, smtp, tls_context

SECRET = b"SECRET-MARTINE-7731"


def client(gw: Gateway, ins: str) -> imaplib.IMAP4_SSL:
    conn = imaplib.IMAP4_SSL("127.0.0.1", gw.ports["imaps"], ssl_context=tls_context(gw),
                             timeout=30)
    conn.login(ins, PATIENT_PASSWORD)
    return conn


def refused(conn: imaplib.IMAP4, command: str, *args: object,
            answers: tuple[str, ...] = ("NO", "BAD")) -> None:
    """``conn.<command>(*args)`` gets a tagged answer in ``answers`` (imaplib returns NO and
    raises IMAP4.error on BAD), then the connection still answers NOOP. A dropped connection
    (IMAP4.abort, a BYE included) fails."""
    try:
        typ, data = getattr(conn, command)(*args)
    except imaplib.IMAP4.abort as exc:
        pytest.fail(f"{command} {args!r}: the connection was dropped ({exc})")
    except imaplib.IMAP4.error as exc:
        assert "BAD" in answers and " command error: BAD " in str(exc), (command, args, exc)
    else:
        assert typ in answers and typ != "OK", (command, args, typ, data)
    try:
        typ, data = conn.noop()
    except imaplib.IMAP4.abort as exc:
        pytest.fail(f"{command} {args!r}: the connection died after the answer ({exc})")
    assert typ == "OK", (command, args, typ, data)


NAMES = [
    MARTINE, f"{MARTINE}@patient.mssante.fr", f"{MARTINE}/INBOX", "../INBOX",
    f"../{MARTINE}/INBOX", "#shared/INBOX", "#public", "~" + MARTINE, "%", "*", "INBOX/*",
    "Martine secret", "&AE0-artine secret", "1", "2", "5", "8", "0", "-1", "..",
    "INBOX/../Martine secret", "/INBOX", "",
]


@pytest.fixture
def two_patients(gateway: Gateway) -> Gateway:
    conn = smtp(gateway, MARIE)
    message = (f"From: {MARIE}\r\nTo: {MARTINE}@patient.mssante.fr\r\n"
               f"Subject: {SECRET.decode()}\r\n\r\n{SECRET.decode()} body\r\n").encode()
    assert conn.sendmail(MARIE, [f"{MARTINE}@patient.mssante.fr"], message) == {}
    conn.quit()
    martine = client(gateway, MARTINE)
    assert martine.create('"Martine secret"')[0] == "OK"
    assert martine.append('"Martine secret"', None, None, message)[0] == "OK"
    martine.logout()
    return gateway


def test_other_patients_mailboxes_cannot_be_named(two_patients: Gateway) -> None:
    conn = client(two_patients, INAYA)
    for name in NAMES:
        quoted = '"' + name + '"'
        for command, args in (("select", (quoted,)), ("select", (quoted, True)),
                              ("status", (quoted, "(MESSAGES UIDNEXT)")),
                              ("append", (quoted, None, None, b"Subject: x\r\n\r\ny\r\n"))):
            refused(conn, command, *args)
    martine_box = mailbox(two_patients.directory, MARTINE, "Martine secret")
    assert len(martine_box) == 1  # nothing was appended to her mailbox
    conn.logout()


def test_listing_and_searching_never_show_other_patients(two_patients: Gateway) -> None:
    conn = client(two_patients, INAYA)
    seen: list[bytes] = []
    for ref, pattern in (("", "*"), ("", "%"), ("#shared", "*"), ("..", "*"), ("", "*/*"),
                         (MARTINE, "*"), ("", "%/%"), ("", "Martine*")):
        typ, data = conn.list(f'"{ref}"', f'"{pattern}"')
        assert typ == "OK", (ref, pattern, data)
        seen.extend(d for d in data if isinstance(d, bytes))
        typ, data = conn.lsub(f'"{ref}"', f'"{pattern}"')
        assert typ == "OK", (ref, pattern, data)
        seen.extend(d for d in data if isinstance(d, bytes))
    listed = b"\n".join(seen)
    assert b'"INBOX"' in listed, listed  # her own mailboxes are listed: the answers were real
    assert b"Martine" not in listed and MARTINE.encode() not in listed
    for box in ("INBOX", "Drafts", "Sent", "Trash"):
        assert conn.select(box)[0] == "OK", box
        typ, data = conn.search(None, "TEXT", SECRET.decode())
        assert typ == "OK" and data == [b""], box
        typ, data = conn.uid("SEARCH", "ALL")
        assert typ == "OK", (box, data)
        uids = data[0].split()
        for probe in ("1:*", "1:4294967295", "4294967295", "2147483648:*"):
            typ, data = conn.uid("FETCH", probe, "(BODY.PEEK[])")
            assert typ == "OK", (box, probe, data)
            assert SECRET not in b"".join(
                p[1] if isinstance(p, tuple) else (p or b"") for p in data), (box, probe)
        assert len(uids) <= 1
    assert conn.select("INBOX")[0] == "OK"
    for target in (MARTINE, "Martine secret", f"../{MARTINE}/INBOX"):
        typ, data = conn.copy("1", f'"{target}"')
        assert typ == "NO" and b"TRYCREATE" in data[0], (target, data)
        typ, data = conn.uid("MOVE", "1", f'"{target}"')
        assert typ == "NO", (target, data)
    for bad in ("-1", "0", "4294967296", "99999999999"):
        refused(conn, "fetch", bad, "(BODY[])", answers=("BAD",))
    conn.logout()
    # Martine's data are intact and Inaya's mailbox holds nothing of hers
    assert all(SECRET not in m for m in mailbox(two_patients.directory, INAYA))
    assert len(mailbox(two_patients.directory, MARTINE)) == 2


def test_deleting_or_renaming_by_another_name_touches_nothing(two_patients: Gateway) -> None:
    conn = client(two_patients, INAYA)
    for name in ("Martine secret", f"{MARTINE}/INBOX", MARTINE):
        assert conn.delete(f'"{name}"')[0] == "NO"
        assert conn.rename(f'"{name}"', '"Mine"')[0] == "NO"
        assert conn.subscribe(f'"{name}"')[0] == "NO"
    # A mailbox of her own with the same name is hers alone
    assert conn.create('"Martine secret"')[0] == "OK"
    conn.select('"Martine secret"')
    assert conn.search(None, "ALL")[1] == [b""]
    conn.logout()
    assert len(mailbox(two_patients.directory, MARTINE, "Martine secret")) == 1
