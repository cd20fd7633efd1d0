"""CONDSTORE and QRESYNC (RFC 7162) with ENABLE (RFC 5161), against the real ``serve`` process
over implicit TLS, scripted with clients nobody here wrote (imaplib, aioimaplib), on SQLite and
PostgreSQL: HIGHESTMODSEQ on SELECT/EXAMINE/STATUS, MODSEQ in FETCH, CHANGEDSINCE,
UNCHANGEDSINCE with MODIFIED, SEARCH MODSEQ, VANISHED instead of EXPUNGE, UID FETCH ...
(CHANGEDSINCE n VANISHED) and SELECT ... (QRESYNC ...)."""

from __future__ import annotations

import asyncio
import imaplib
import re

import pytest

from tests.conftest import INAYA, PATIENT_PASSWORD
from tests.gateway_proc import Gateway
from tests.helpers import Raw, aioimaplib_login, imap_login

MESSAGES = [f"Subject: message {n}\r\n\r\ncorps {n}\r\n".encode() for n in range(1, 5)]


def client(gw: Gateway) -> imaplib.IMAP4_SSL:
    conn = imap_login(gw)
    return conn


def modseqs(data: list[object]) -> dict[int, int]:
    """``{uid: modseq}`` of FETCH responses carrying both."""
    out: dict[int, int] = {}
    for item in data:
        line = item[0] if isinstance(item, tuple) else item
        if not isinstance(line, bytes):
            continue
        uid = re.search(rb"UID (\d+)", line)
        mod = re.search(rb"MODSEQ \((\d+)\)", line)
        if uid and mod:
            out[int(uid[1])] = int(mod[1])
    return out


def untagged(conn: imaplib.IMAP4, name: str) -> list[bytes]:
    return [v for v in conn.untagged_responses.pop(name, []) if isinstance(v, bytes)]


def test_condstore_and_qresync_with_imaplib(gateway: Gateway) -> None:
    conn = client(gateway)
    caps = conn.capability()[1][0].split()
    assert b"CONDSTORE" in caps and b"QRESYNC" in caps and b"ENABLE" in caps
    # ENABLE QRESYNC (RFC 5161: in the authenticated state) implies CONDSTORE
    typ, data = conn.enable("QRESYNC")
    assert typ == "OK" and untagged(conn, "ENABLED") == [b"CONDSTORE QRESYNC"], data
    conn.create("Sync")
    for message in MESSAGES:
        assert conn.append("Sync", None, None, message)[0] == "OK"
    typ, data = conn.status("Sync", "(MESSAGES HIGHESTMODSEQ)")
    match = re.search(rb"MESSAGES 4 HIGHESTMODSEQ (\d+)", data[0])
    assert typ == "OK" and match, data
    highest = int(match[1])
    # SELECT tells HIGHESTMODSEQ
    typ, _ = conn.select("Sync")
    assert untagged(conn, "HIGHESTMODSEQ") == [str(highest).encode()]
    typ, data = conn.uid("FETCH", "1:*", "(FLAGS MODSEQ)")
    before = modseqs(data)
    assert sorted(before) == [1, 2, 3, 4] and max(before.values()) <= highest, data
    # STORE: the FETCH of the change carries the new MODSEQ
    typ, data = conn.uid("STORE", "2", "+FLAGS", "(\\Seen)")
    after = modseqs(data)
    assert typ == "OK" and list(after) == [2] and after[2] > highest, data
    # CHANGEDSINCE: only what changed since
    typ, data = conn.uid("FETCH", "1:*", f"(FLAGS) (CHANGEDSINCE {highest})")
    assert typ == "OK" and list(modseqs(data)) == [2], data
    typ, data = conn.uid("FETCH", "1:*", "(UID) (CHANGEDSINCE 0)")
    assert sorted(modseqs(data)) == [1, 2, 3, 4], data
    # UNCHANGEDSINCE: message 2 changed after ``highest``: left alone, reported MODIFIED
    # (imaplib's uid() returns the FETCH data only: read the tagged line's code this way)
    tag = conn._command("UID", "STORE", "1:3", f"(UNCHANGEDSINCE {highest}) +FLAGS",
                        "(\\Flagged)")
    typ, data = conn._command_complete("UID", tag)
    assert typ == "OK" and data[-1].startswith(b"[MODIFIED 2] "), data
    assert sorted(modseqs(untagged(conn, "FETCH"))) == [1, 3]
    typ, data = conn.uid("FETCH", "1:3", "(FLAGS)")
    flags = {uid: line for uid, line in zip((1, 2, 3), data, strict=True)}
    assert b"\\Flagged" in flags[1] and b"\\Flagged" in flags[3], data
    assert b"\\Flagged" not in flags[2], data
    # SEARCH MODSEQ: the messages changed at or after a MODSEQ, with the highest of them
    typ, data = conn.uid("SEARCH", "MODSEQ", str(highest + 1))
    match = re.fullmatch(rb"(\d+(?: \d+)*) \(MODSEQ (\d+)\)", data[0])
    assert typ == "OK" and match and match[1] == b"1 2 3", data
    typ, data = conn.uid("FETCH", "1:4", "(MODSEQ)")
    now = modseqs(data)
    assert int(match[2]) == max(now[u] for u in (1, 2, 3)), (data, now)
    # QRESYNC enabled: expunges are VANISHED
    conn.uid("STORE", "3", "+FLAGS.SILENT", "(\\Deleted)")
    typ, data = conn.uid("EXPUNGE", "3")
    assert typ == "OK" and untagged(conn, "VANISHED") == [b"3"], data
    assert untagged(conn, "EXPUNGE") == []
    typ, data = conn.uid("FETCH", "1:*", f"(FLAGS) (CHANGEDSINCE {highest} VANISHED)")
    assert typ == "OK" and untagged(conn, "VANISHED") == [b"(EARLIER) 3"], data
    assert sorted(modseqs(data)) == [1, 2], data
    # the last message expunged: ``*`` still reaches its UID
    conn.uid("STORE", "4", "+FLAGS.SILENT", "(\\Deleted)")
    typ, data = conn.uid("EXPUNGE", "4")
    assert typ == "OK" and untagged(conn, "VANISHED") == [b"4"], data
    typ, data = conn.uid("FETCH", "1:*", f"(FLAGS) (CHANGEDSINCE {highest} VANISHED)")
    assert typ == "OK" and untagged(conn, "VANISHED") == [b"(EARLIER) 3:4"], data
    typ, data = conn.uid("FETCH", "2:*", f"(UID) (CHANGEDSINCE {highest} VANISHED)")
    assert typ == "OK" and untagged(conn, "VANISHED") == [b"(EARLIER) 3:4"], data
    conn.logout()


def test_qresync_select_with_aioimaplib(gateway: Gateway) -> None:
    import aioimaplib

    # a first session makes the history: 4 messages, a flag change, an expunge
    conn = client(gateway)
    conn.create("Sync")
    for message in MESSAGES:
        conn.append("Sync", None, None, message)
    conn.select("Sync")
    uidvalidity = int(untagged(conn, "UIDVALIDITY")[0])
    known = int(untagged(conn, "HIGHESTMODSEQ")[0])
    conn.uid("STORE", "1", "+FLAGS", "($lu)")
    conn.uid("STORE", "4", "+FLAGS", "(\\Deleted)")
    conn.expunge()

    async def run() -> None:
        async with aioimaplib_login(gateway, INAYA) as imap:
            assert imap.has_capability("QRESYNC")
            # QRESYNC before ENABLE is refused (RFC 7162 §3.2.5)
            refused = await imap.protocol.execute(aioimaplib.Command(
                "SELECT", imap.protocol.new_tag(), "Sync",
                f"(QRESYNC ({uidvalidity} {known}))", loop=imap.protocol.loop))
            assert refused.result == "BAD", refused
            enabled = await imap.enable("QRESYNC")
            assert enabled.result == "OK"
            assert b"ENABLED CONDSTORE QRESYNC" in b" ".join(
                bytes(line) for line in enabled.lines)
            assert (await imap.select("Sync")).result == "OK"  # aioimaplib's own state
            response = await imap.protocol.execute(aioimaplib.Command(
                "SELECT", imap.protocol.new_tag(), "Sync",
                f"(QRESYNC ({uidvalidity} {known} 1:*))", loop=imap.protocol.loop))
            assert response.result == "OK", response
            lines = [bytes(line) for line in response.lines]
            assert b"VANISHED (EARLIER) 4" in lines, lines
            fetches = [line for line in lines if b"FETCH" in line]
            assert len(fetches) == 1 and b"UID 1 " in fetches[0], lines
            assert b"$lu" in fetches[0] and b"MODSEQ (" in fetches[0], lines
            assert any(line.startswith(b"OK [HIGHESTMODSEQ ") for line in lines), lines
            # known UIDs that exclude the expunged one: nothing vanished to report
            response = await imap.protocol.execute(aioimaplib.Command(
                "SELECT", imap.protocol.new_tag(), "Sync",
                f"(QRESYNC ({uidvalidity} {known} 1:3))", loop=imap.protocol.loop))
            lines = [bytes(line) for line in response.lines]
            assert response.result == "OK" and not any(b"VANISHED" in x for x in lines), lines
            # a stale UIDVALIDITY: a plain SELECT, nothing resynchronised
            response = await imap.protocol.execute(aioimaplib.Command(
                "SELECT", imap.protocol.new_tag(), "Sync",
                f"(QRESYNC ({uidvalidity + 1} {known}))", loop=imap.protocol.loop))
            lines = [bytes(line) for line in response.lines]
            assert response.result == "OK" and not any(b"VANISHED" in x for x in lines), lines

    asyncio.run(run())
    conn.logout()


@pytest.mark.parametrize("enable", ["CONDSTORE", "QRESYNC", None])
def test_other_sessions_changes_with_modseq_or_vanished(gateway: Gateway,
                                                        enable: str | None) -> None:
    """What a session is told of another session's changes depends on what it enabled:
    MODSEQ in the unsolicited FETCH (CONDSTORE), VANISHED instead of EXPUNGE (QRESYNC)."""
    watcher = Raw(gateway)
    actor = client(gateway)
    try:
        watcher.command("a", f'LOGIN {INAYA} "{PATIENT_PASSWORD}"')
        if enable:
            assert watcher.command("e", f"ENABLE {enable}")[0].startswith(b"* ENABLED")
        for message in MESSAGES[:2]:
            actor.append("INBOX", None, None, message)
        watcher.command("s", "SELECT INBOX")
        actor.select("INBOX")
        actor.store("2", "+FLAGS", "(\\Answered)")
        actor.store("1", "+FLAGS", "(\\Deleted)")
        actor.expunge()
        lines = watcher.command("n", "NOOP")
        if enable == "QRESYNC":
            assert lines[0] == b"* VANISHED 1\r\n", lines
        else:
            assert lines[0] == b"* 1 EXPUNGE\r\n", lines
        change = [line for line in lines if b"FETCH" in line]
        assert len(change) == 1 and b"\\Answered" in change[0], lines
        assert (b"MODSEQ (" in change[0]) is (enable is not None), lines
    finally:
        watcher.close()
        actor.logout()


def test_enable_answers_and_syntax(gateway: Gateway) -> None:
    raw = Raw(gateway)
    try:
        raw.command("a", f'LOGIN {INAYA} "{PATIENT_PASSWORD}"')
        assert raw.command("e1", "ENABLE FOO") == [b"* ENABLED\r\n", b"e1 OK ENABLE completed\r\n"]
        assert raw.command("e2", "ENABLE CONDSTORE") == [
            b"* ENABLED CONDSTORE\r\n", b"e2 OK ENABLE completed\r\n"]
        assert raw.command("e3", "ENABLE CONDSTORE QRESYNC") == [
            b"* ENABLED QRESYNC\r\n", b"e3 OK ENABLE completed\r\n"]
        lines = raw.command("s", "EXAMINE INBOX (CONDSTORE)")
        assert any(line.startswith(b"* OK [HIGHESTMODSEQ ") for line in lines), lines
        assert raw.command("f", "FETCH 1 (FLAGS) (CHANGEDSINCE x)")[-1].startswith(b"f BAD")
        assert raw.command("g", "FETCH 1 (FLAGS) (VANISHED)")[-1].startswith(b"g BAD")
        assert raw.command("h", "STORE 1 (UNCHANGEDSINCE) +FLAGS (a)")[-1].startswith(b"h BAD")
        assert raw.command("i", "SELECT INBOX (QRESYNC (0 1))")[-1].startswith(b"i BAD")
        lines = raw.command("j", "FETCH 1 (MODSEQ)")
        assert re.fullmatch(rb"\* 1 FETCH \(MODSEQ \(\d+\)\)\r\n", lines[0]), lines
    finally:
        raw.close()


def test_closed_code_when_a_select_closes_a_mailbox_under_qresync(gateway: Gateway) -> None:
    """RFC 7162 §3.2.11: with QRESYNC enabled, a SELECT or EXAMINE that closes the mailbox
    selected before says so first (``OK [CLOSED]``); without QRESYNC nothing changes."""
    raw = Raw(gateway)
    try:
        raw.command("a", f'LOGIN {INAYA} "{PATIENT_PASSWORD}"')
        raw.command("s1", "SELECT INBOX")
        assert not any(b"[CLOSED]" in line for line in raw.command("s2", "EXAMINE INBOX"))
        raw.command("u", "UNSELECT")
        raw.command("e", "ENABLE QRESYNC")
        first = raw.command("s3", "SELECT INBOX")
        assert not any(b"[CLOSED]" in line for line in first), first
        again = raw.command("s4", "EXAMINE INBOX")
        assert again[0] == b"* OK [CLOSED] Previous mailbox closed\r\n", again
        assert again[-1].startswith(b"s4 OK [READ-ONLY]"), again
    finally:
        raw.close()
