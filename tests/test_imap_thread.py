"""THREAD=ORDEREDSUBJECT and THREAD=REFERENCES (RFC 5256) against the real ``serve`` process
over implicit TLS with imaplib's ``thread()``, on SQLite and PostgreSQL: a missing parent (a
dummy), a reference loop, a message without Message-ID, subjects grouped by base subject."""

from __future__ import annotations

import pytest

from tests.gateway_proc import Gateway
from tests.helpers import imap_login
from tests.test_imap_slips import Wire


def _message(mid: str | None, subject: str, day: int, refs: str = "", reply: str = "") -> bytes:
    head = f"Message-ID: {mid}\r\n" if mid else ""
    head += f"References: {refs}\r\n" if refs else ""
    head += f"In-Reply-To: {reply}\r\n" if reply else ""
    return (f"{head}Date: {day:02d} Jan 2023 10:00:00 +0000\r\nSubject: {subject}\r\n"
            f"\r\nz\r\n").encode()


_MESSAGES = [
    _message("<a@x>", "hello", 1),                                   # 1
    _message("<b@x>", "Re: hello", 2, refs="<a@x>"),                 # 2
    _message("<c@x>", "Re: hello", 3, refs="<a@x> <b@x>"),           # 3
    _message("<d@x>", "Re: lost", 4, refs="<missing@x>"),            # 4: parent never seen
    _message("<e@x>", "Re: lost", 5, refs="<missing@x>"),            # 5: sibling of 4
    _message("<f@x>", "loop", 6, refs="<g@x>"),                      # 6: f and g refer
    _message("<g@x>", "Re: loop", 7, refs="<f@x>"),                  # 7: to each other
    _message(None, "Fwd: hello", 8),                                 # 8: no Message-ID
    _message("<h@x>", "other", 9, reply="junk <a@x> more"),          # 9: In-Reply-To only
]


def test_thread_with_imaplib(gateway: Gateway) -> None:
    conn = imap_login(gateway)
    caps = conn.capability()[1][0].split()
    assert b"THREAD=REFERENCES" in caps and b"THREAD=ORDEREDSUBJECT" in caps
    conn.create("Threads")
    for raw in _MESSAGES:
        conn.append("Threads", None, None, raw)
    conn.select("Threads")
    typ, data = conn.thread("REFERENCES", "UTF-8", "ALL")
    assert typ == "OK", data
    # 6 names 7 as its parent first; 7 naming 6 would make a loop, so it stays the parent
    assert data == [b"(1 (2 3)(8)(9))((4)(5))(7 6)"], data
    typ, data = conn.thread("ORDEREDSUBJECT", "UTF-8", "ALL")
    assert data == [b"(1 (2)(3)(8))(4 5)(6 7)(9)"], data
    typ, data = conn.uid("THREAD", "REFERENCES", "US-ASCII", "SUBJECT", "lost")
    assert typ == "OK" and data == [b"((4)(5))"], data
    typ, data = conn.thread("REFERENCES", "KOI8-R", "ALL")
    assert typ == "NO" and data[0].startswith(b"[BADCHARSET"), data
    conn.logout()


@pytest.mark.parametrize("bytewise", [False, True], ids=["lines", "bytes"])
def test_thread_on_the_wire(gateway: Gateway, bytewise: bool) -> None:
    client = Wire(gateway, bytewise)
    try:
        client.login()
        client.fill("T", _MESSAGES[:3])
        client.expect("t1", "THREAD REFERENCES UTF-8 ALL",
                      [b"* THREAD (1 2 3)\r\n", b"t1 OK THREAD completed\r\n"])
        client.expect("t2", "UID THREAD ORDEREDSUBJECT UTF-8 UID 2:3",
                      [b"* THREAD (2 3)\r\n", b"t2 OK UID THREAD completed\r\n"])
        client.expect("t3", "THREAD REFERENCES UTF-8 SUBJECT nothing",
                      [b"* THREAD\r\n", b"t3 OK THREAD completed\r\n"])
        client.expect("t4", "THREAD NOPE UTF-8 ALL", [b"t4 BAD Unknown threading algorithm\r\n"])
    finally:
        client.close()
