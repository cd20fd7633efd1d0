"""ESEARCH (RFC 4731) against the real ``serve`` process over implicit TLS, scripted with imaplib
(its untagged ESEARCH data) and checked line by line with a raw client, on SQLite and
PostgreSQL; with CONDSTORE's MODSEQ (RFC 7162 §3.1.5)."""

from __future__ import annotations

import re

from tests.conftest import INAYA, PATIENT_PASSWORD
from tests.gateway_proc import Gateway
from tests.helpers import Raw, imap_login


def test_esearch_with_imaplib_and_on_the_wire(gateway: Gateway) -> None:
    conn = imap_login(gateway)
    assert b"ESEARCH" in conn.capability()[1][0].split()
    conn.create("Tri")
    for n in range(1, 7):
        conn.append("Tri", "(\\Seen)" if n % 2 else None, None,
                    f"Subject: essai {n}\r\n\r\ncorps {n}\r\n".encode())
    conn.select("Tri")
    conn.uid("STORE", "5", "+FLAGS", "(\\Deleted)")
    conn.expunge()  # UIDs 1 2 3 4 6 remain: sequence numbers 1-5
    typ, _ = conn._simple_command("SEARCH", "RETURN", "(MIN MAX COUNT ALL)", "UNSEEN")
    assert typ == "OK"
    found = conn.untagged_responses.pop("ESEARCH")
    assert len(found) == 1 and re.fullmatch(
        rb'\(TAG "[A-Z0-9]+"\) MIN 2 MAX 5 COUNT 3 ALL 2,4:5', found[0]), found
    conn.logout()

    raw = Raw(gateway)
    try:
        raw.command("a", f'LOGIN {INAYA} "{PATIENT_PASSWORD}"')
        raw.command("s", "SELECT Tri")
        raw.play("""
            C: e1 SEARCH RETURN (MIN MAX COUNT ALL) UNSEEN
            S: * ESEARCH (TAG "e1") MIN 2 MAX 5 COUNT 3 ALL 2,4:5
            S: e1 OK SEARCH completed
            C: e2 UID SEARCH RETURN () UNSEEN
            S: * ESEARCH (TAG "e2") UID ALL 2,4,6
            S: e2 OK UID SEARCH completed
            C: e3 UID SEARCH RETURN (COUNT MIN) SUBJECT absent
            S: * ESEARCH (TAG "e3") UID COUNT 0
            S: e3 OK UID SEARCH completed
            C: e4 SEARCH RETURN (MAX) ALL
            S: * ESEARCH (TAG "e4") MAX 5
            S: e4 OK SEARCH completed
        """)
        lines = raw.command("e5", "UID SEARCH RETURN (ALL) MODSEQ 1")
        assert re.fullmatch(rb'\* ESEARCH \(TAG "e5"\) UID ALL 1:4,6 MODSEQ \d+\r\n',
                            lines[0]), lines
        assert raw.command("e6", "SEARCH RETURN (NOPE) ALL")[-1].startswith(b"e6 BAD")
        assert raw.command("e7", "SEARCH ALL") == [b"* SEARCH 1 2 3 4 5\r\n",
                                                   b"e7 OK SEARCH completed\r\n"]
    finally:
        raw.close()
