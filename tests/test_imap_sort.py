"""SORT (RFC 5256 §3) against the real ``serve`` process over implicit TLS with imaplib's
``sort()``, on SQLite and PostgreSQL; base subjects (§2.1) checked without a server."""

from __future__ import annotations

import imaplib
import subprocess

import pytest

from imap_store.imap.sorting import base_subject
from tests.conftest import INAYA, PATIENT_PASSWORD
from tests.gateway_proc import Gateway
from tests.helpers import imap_login
from tests.test_imap_slips import Wire


def test_base_subject_rfc5256() -> None:
    assert base_subject("Re: [list] Fwd: x (fwd)") == "x"
    assert base_subject("[Fwd: Re: hello]") == "hello"
    assert base_subject("  RE:  re [x]: Hello\t World  (fwd) (FWD) ") == "hello world"
    assert base_subject("[only a blob]") == "[only a blob]"
    assert base_subject("") == ""


_MESSAGES = [
    # (From, To, Date, Subject, padding)
    ("Zoe <zoe@example.org>", "bob@example.org", "Mon, 2 Jan 2023 10:00:00 +0000", "Re: beta", 300),
    (None, "alice@example.org", "Mon, 2 Jan 2023 09:00:00 -0300", "[list] Fwd: alpha (fwd)", 100),
    ("adam@example.org", "Carl <carl@example.org>", None, "gamma", 500),
    ("Bob <BOB@example.org>", "alice@example.org", "Sun, 1 Jan 2023 10:00:00 +0000", "alpha", 200),
]


def test_sort_with_imaplib(gateway: Gateway) -> None:
    conn = imap_login(gateway)
    assert b"SORT" in conn.capability()[1][0].split()
    conn.create("Sorted")
    for sender, to, date, subject, pad in _MESSAGES:
        head = f"From: {sender}\r\n" if sender else ""
        head += f"To: {to}\r\n" + (f"Date: {date}\r\n" if date else "")
        body = f"{head}Subject: {subject}\r\n\r\n{'x' * pad}\r\n"
        conn.append("Sorted", None, imaplib.Time2Internaldate(1700000000), body.encode())
    conn.select("Sorted")
    assert conn.sort("(SUBJECT)", "UTF-8", "ALL") == ("OK", [b"2 4 1 3"])
    assert conn.sort("(REVERSE SUBJECT)", "UTF-8", "ALL") == ("OK", [b"3 1 2 4"])
    assert conn.sort("(FROM)", "UTF-8", "ALL") == ("OK", [b"2 3 4 1"])  # "" adam bob zoe
    assert conn.sort("(TO SIZE)", "UTF-8", "ALL") == ("OK", [b"2 4 1 3"])
    assert conn.sort("(SIZE)", "US-ASCII", "ALL") == ("OK", [b"2 4 1 3"])
    # the missing Date falls back to the internal date (2023-11-14), the latest
    assert conn.sort("(DATE)", "UTF-8", "ALL") == ("OK", [b"4 1 2 3"])
    assert conn.sort("(ARRIVAL)", "UTF-8", "ALL") == ("OK", [b"1 2 3 4"])  # ties: sequence
    assert conn.sort("(REVERSE ARRIVAL)", "UTF-8", "ALL") == ("OK", [b"1 2 3 4"])
    assert conn.sort("(SUBJECT)", "UTF-8", "NOT", "SUBJECT", "gamma") == ("OK", [b"2 4 1"])
    typ, data = conn.uid("SORT", "(REVERSE SIZE)", "UTF-8", "ALL")
    assert typ == "OK" and data == [b"3 1 4 2"]
    curl = subprocess.run(
        ["curl", "-sS", "--cacert", str(gateway.ca), "-u", f"{INAYA}:{PATIENT_PASSWORD}",
         "-X", "UID SORT (REVERSE DATE) UTF-8 ALL",
         f"imaps://127.0.0.1:{gateway.ports['imaps']}/Sorted"],
        capture_output=True, timeout=30, check=True)
    assert curl.stdout == b"* SORT 3 2 1 4\r\n", curl
    typ, data = conn.sort("(SUBJECT)", "KOI8-R", "ALL")
    assert typ == "NO" and data[0].startswith(b"[BADCHARSET (UTF-8 US-ASCII)]"), data
    try:
        conn.sort("(NOPE)", "UTF-8", "ALL")
        raise AssertionError("unknown criterion accepted")
    except imaplib.IMAP4.error as exc:
        assert "Unknown sort criterion" in str(exc)
    conn.logout()


@pytest.mark.parametrize("bytewise", [False, True], ids=["lines", "bytes"])
def test_sort_on_the_wire(gateway: Gateway, bytewise: bool) -> None:
    """Exact answers, the command sent whole and one byte per TLS record; a literal search
    string, errors that keep the session."""
    client = Wire(gateway, bytewise)
    try:
        client.login()
        client.fill("W", (f"Subject: {subject}\r\n\r\nz\r\n".encode()
                          for subject in ("b", "Re: a", "[x] c")))
        client.expect("t1", "SORT (SUBJECT) UTF-8 ALL",
                      [b"* SORT 2 1 3\r\n", b"t1 OK SORT completed\r\n"])
        client.expect("t2", "UID SORT (REVERSE SUBJECT) us-ascii UID 1:2",
                      [b"* SORT 1 2\r\n", b"t2 OK UID SORT completed\r\n"])
        client.expect("t3", b"SORT (SUBJECT) UTF-8 SUBJECT {1+}\r\nc",
                      [b"* SORT 3\r\n", b"t3 OK SORT completed\r\n"])
        client.expect("t4", "SORT (SUBJECT) ISO-8859-1 ALL",
                      [b"t4 NO [BADCHARSET (UTF-8 US-ASCII)] Unsupported charset\r\n"])
        client.expect("t5", "SORT (REVERSE) UTF-8 ALL", [b"t5 BAD REVERSE needs a sort key\r\n"])
        client.expect("t6", "SORT () UTF-8 ALL", [b"t6 BAD Empty list\r\n"])
        client.expect("t9", "SORT (REVERSE REVERSE SIZE) UTF-8 ALL",
                      [b"t9 BAD Unknown sort criterion\r\n"])
        client.expect("t7", "SORT (SIZE) ALL", [b"t7 NO [BADCHARSET (UTF-8 US-ASCII)] "
                                                 b"Unsupported charset\r\n"])
        client.expect("t8", "SORT (ARRIVAL) UTF-8 ALL",
                      [b"* SORT 1 2 3\r\n", b"t8 OK SORT completed\r\n"])
    finally:
        client.close()
