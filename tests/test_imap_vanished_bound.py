"""The bound on ``expunged`` (issue 13, ``imap_store/store/housekeeping.py``): the housekeeping
keeps each mailbox's newest expunged UIDs and remembers the highest MODSEQ it deleted; QRESYNC
from a MODSEQ below it answers VANISHED (EARLIER) with every absent UID of the client's range
(the superset RFC 7162 §3.2.5.2 allows), from above it the exact set, and a session whose view
predates the pruned expunges still sees them all. Against the real ``serve`` over implicit TLS
with imaplib, the prune run in this process on the gateway's database (as ``serve`` runs it),
on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import imaplib
import re
from typing import Any

from sqlalchemy import select

from gateway.config import load_config
from imap_store.store import schema as t
from imap_store.store.directory import Store
from imap_store.store.housekeeping import prune_expunged
from imap_store.store.mailboxes import SqlMailStores
from tests.gateway_proc import Gateway
from tests.helpers import imap_login

BOX = "Bound"


def client(gw: Gateway) -> imaplib.IMAP4_SSL:
    conn = imap_login(gw)
    return conn


def on_store(gw: Gateway, fn: Any) -> Any:
    async def run() -> Any:
        store = Store.from_url(load_config(gw.config).storage_url)
        try:
            return await fn(store)
        finally:
            await store.close()

    return asyncio.run(run())


def prune(gw: Gateway, keep: int) -> int:
    return int(on_store(gw, lambda store: prune_expunged(SqlMailStores(store), keep)))


def kept(gw: Gateway) -> tuple[list[int], int]:
    """The UIDs ``expunged`` still holds for the mailbox, and its ``vanished_modseq``."""
    async def read(store: Store) -> tuple[list[int], int]:
        async with store.read() as conn:
            box = (await conn.execute(
                select(t.mailbox.c.id, t.mailbox.c.vanished_modseq)
                .where(t.mailbox.c.name == BOX))).one()
            uids = (await conn.execute(
                select(t.expunged.c.uid).where(t.expunged.c.mailbox_id == box[0])
                .order_by(t.expunged.c.uid))).scalars().all()
        return [int(u) for u in uids], int(box[1])

    result: tuple[list[int], int] = on_store(gw, read)
    return result


def highest(conn: imaplib.IMAP4) -> int:
    typ, data = conn.status(BOX, "(HIGHESTMODSEQ)")
    match = re.search(rb"HIGHESTMODSEQ (\d+)", data[0])
    assert typ == "OK" and match, data
    return int(match[1])


def untagged(conn: imaplib.IMAP4, name: str) -> list[bytes]:
    return [v for v in conn.untagged_responses.pop(name, []) if isinstance(v, bytes)]


def expunge(conn: imaplib.IMAP4, uid: int) -> int:
    """UID EXPUNGE of one message; the mailbox's HIGHESTMODSEQ after it."""
    conn.uid("STORE", str(uid), "+FLAGS.SILENT", "(\\Deleted)")
    assert conn.uid("EXPUNGE", str(uid))[0] == "OK"
    assert untagged(conn, "VANISHED") == [str(uid).encode()]
    return highest(conn)


def resync(gw: Gateway, uidvalidity: int, since: int, known: str = "1:*") -> list[bytes]:
    conn = client(gw)
    try:
        assert conn.enable("QRESYNC")[0] == "OK"
        tag = conn._command("SELECT", BOX, f"(QRESYNC ({uidvalidity} {since} {known}))")
        typ, data = conn._command_complete("SELECT", tag)
        assert typ == "OK", data
        return untagged(conn, "VANISHED")
    finally:
        conn.logout()


def test_pruned_expunges_answer_a_superset(gateway: Gateway) -> None:
    actor = client(gateway)
    assert actor.enable("QRESYNC")[0] == "OK"
    assert actor.create(BOX)[0] == "OK"
    for n in range(1, 7):  # UIDs 1 to 6
        assert actor.append(BOX, None, None, b"Subject: %d\r\n\r\ncorps\r\n" % n)[0] == "OK"
    typ, data = actor.status(BOX, "(UIDVALIDITY)")
    uidvalidity = int(re.search(rb"UIDVALIDITY (\d+)", data[0])[1])  # type: ignore[index]
    start = highest(actor)
    # A session whose view predates every expunge, silent until after the prune.
    stale = client(gateway)
    assert stale.select(BOX)[0] == "OK"
    actor.select(BOX)
    after_1 = expunge(actor, 1)
    after_2 = expunge(actor, 2)
    expunge(actor, 3)
    assert prune(gateway, keep=5) == 0  # three rows: nothing to prune
    assert kept(gateway) == ([1, 2, 3], 0)
    assert prune(gateway, keep=1) == 2  # the newest row stays: UID 3's
    assert kept(gateway) == ([3], after_2)
    # From at or above the highest pruned MODSEQ: exact
    assert resync(gateway, uidvalidity, after_2) == [b"(EARLIER) 3"]
    # From below it: every absent UID of the known range (here, exactly the expunged ones;
    # from ``after_1`` the exact answer would be 2:3, the superset names 1 too)
    assert resync(gateway, uidvalidity, start) == [b"(EARLIER) 1:3"]
    assert resync(gateway, uidvalidity, after_1) == [b"(EARLIER) 1:3"]
    assert resync(gateway, uidvalidity, start, "2:5") == [b"(EARLIER) 2:3"]
    typ, data = actor.uid("FETCH", "1:*", f"(FLAGS) (CHANGEDSINCE {start} VANISHED)")
    assert typ == "OK" and untagged(actor, "VANISHED") == [b"(EARLIER) 1:3"], data
    # The stale session learns of all three expunges
    typ, data = stale.noop()
    assert typ == "OK" and len(untagged(stale, "EXPUNGE")) == 3, data
    typ, data = stale.uid("FETCH", "1:*", "(UID)")
    assert typ == "OK" and re.findall(rb"UID (\d+)", b" ".join(data)) == [
        b"4", b"5", b"6"], data
    stale.logout()
    actor.logout()
