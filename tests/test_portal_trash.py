"""The Trash purge (issue 11, ``[web] trash_days``, ``imap_store/store/housekeeping.py``): a
conversation deleted in the portal, and a message an IMAP client moved to Trash, are expunged
for good ``trash_days`` after they entered Trash (their bodies freed); younger ones stay; a
message moved back out of Trash is never purged; IMAP sessions with Trash selected see the
EXPUNGE. The rows' time in Trash is aged with SQL on the gateway's own database."""

from __future__ import annotations

import asyncio
import imaplib
import json
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.engine import Connection

from gateway.config import load_config
from imap_store.store import schema as t
from imap_store.store.directory import Store
from imap_store.store.housekeeping import purge_trash
from imap_store.store.mailboxes import SqlMailStores
from tests.conftest import CHRISTELLE, DUPOND, INAYA, PATIENT_PASSWORD
from tests.gateway_proc import Gateway
from tests.helpers import sample, smtp, tls_context

PATIENT = f"{INAYA}@patient.mssante.fr"


def deliver(gw: Gateway, raw: bytes, sender: str = DUPOND) -> None:
    conn = smtp(gw, sender)
    try:
        conn.sendmail(sender, [PATIENT], raw)
    finally:
        conn.quit()


def on_db(gw: Gateway, fn: Callable[[Connection], Any], write: bool = False) -> Any:
    async def run() -> Any:
        store = Store.from_url(load_config(gw.config).storage_url)
        try:
            if write:
                async with store.write() as conn:
                    return await conn.run_sync(fn)
            async with store.read() as conn:
                return await conn.run_sync(fn)
        finally:
            await store.close()

    return asyncio.run(run())


def purge(gw: Gateway, days: int = 30) -> int:
    """The purge of ``serve``, run in this process on the gateway's database."""
    async def run() -> int:
        store = Store.from_url(load_config(gw.config).storage_url)
        try:
            return await purge_trash(SqlMailStores(store), days)
        finally:
            await store.close()

    return asyncio.run(run())


def in_trash(conn: Connection) -> Any:
    return t.message.c.mailbox_id.in_(
        select(t.mailbox.c.id).where(t.mailbox.c.name == "Trash"))


def age_trash(gw: Gateway, days: int) -> None:
    """Every message now in Trash entered it ``days`` days ago."""
    when = datetime.now(UTC) - timedelta(days=days)
    on_db(gw, lambda c: c.execute(update(t.message).where(in_trash(c))
                                  .values(trashed_at=when)), write=True)


def trash_blob_ids(gw: Gateway) -> set[int]:
    return set(on_db(gw, lambda c: c.execute(
        select(t.message.c.blob_id).where(in_trash(c))).scalars().all()))


def blobs_present(gw: Gateway, ids: set[int]) -> set[int]:
    return set(on_db(gw, lambda c: c.execute(
        select(t.blob.c.id).where(t.blob.c.id.in_(ids))).scalars().all()))


def subjects(imap: imaplib.IMAP4_SSL, box: str) -> list[str]:
    assert imap.select(box)[0] == "OK"
    typ, data = imap.uid("FETCH", "1:*", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    assert typ == "OK"
    return sorted(bytes(part[1]).decode().strip() for part in data
                  if isinstance(part, tuple))


def login_imap(gw: Gateway) -> imaplib.IMAP4_SSL:
    imap = imaplib.IMAP4_SSL("127.0.0.1", gw.ports["imaps"], ssl_context=tls_context(gw))
    imap.login(PATIENT, PATIENT_PASSWORD)
    return imap


def delete_in_portal(gw: Gateway, words: str) -> None:
    from tests.portal_client import PortalClient

    client = PortalClient(gw)
    page = client.login(INAYA, PATIENT_PASSWORD)
    for key in re.findall(r'href="/messagerie/conversations/(\d+)"', page.text):
        if words in client.get(f"/messagerie/conversations/{key}").text:
            confirm = client.get(f"/messagerie/conversations/{key}/supprimer")
            done = client.post(f"/messagerie/conversations/{key}/supprimer",
                               {"csrf": confirm.csrf()})
            assert done.status == 200
            return
    raise AssertionError(f"no conversation with {words!r}")


def test_old_trash_is_purged_young_and_moved_out_stay(gateway: Gateway) -> None:
    deliver(gateway, sample("02"))  # Docteur Dupond, three PDFs: deleted in the portal
    deliver(gateway, sample("01"), CHRISTELLE)  # moved to Trash and back out over IMAP
    delete_in_portal(gateway, "Aucune inquiétude")
    imap = login_imap(gateway)
    moved = next(s for s in subjects(imap, "INBOX") if "Bienvenue" not in s)
    typ, data = imap.uid("SEARCH", "HEADER", "From", "christelle")
    assert typ == "OK" and data[0]
    assert imap.uid("MOVE", data[0].decode(), "Trash")[0] == "OK"
    old_blobs = trash_blob_ids(gateway)
    age_trash(gateway, 31)
    # Moved back out of Trash after 31 days there: it keeps no Trash time.
    assert imap.select("Trash")[0] == "OK"
    typ, data = imap.uid("SEARCH", "HEADER", "From", "christelle")
    assert imap.uid("MOVE", data[0].decode(), "INBOX")[0] == "OK"
    # The welcome message enters Trash now: young.
    assert imap.select("INBOX")[0] == "OK"
    typ, data = imap.uid("SEARCH", "SUBJECT", "Bienvenue")
    assert imap.uid("MOVE", data[0].decode(), "Trash")[0] == "OK"
    assert imap.select("Trash")[1] == [b"2"]
    assert purge(gateway) == 1
    # The session with Trash selected is told (RFC 3501 §7.4.1).
    assert imap.noop()[0] == "OK"
    assert imap.response("EXPUNGE") == ("EXPUNGE", [b"1"])
    remaining = subjects(imap, "Trash")
    assert len(remaining) == 1 and "Bienvenue" in remaining[0]
    assert moved in subjects(imap, "INBOX")
    imap.logout()
    # The portal message's body is freed (the one moved back out keeps its own).
    dupond = {b for b in old_blobs if b not in set(on_db(gateway, lambda c: c.execute(
        select(t.message.c.blob_id)).scalars().all()))}
    assert len(dupond) == 1 and blobs_present(gateway, dupond) == set()
    assert on_db(gateway, lambda c: c.execute(
        select(func.count()).select_from(t.message)
        .where(t.message.c.subject.like("%analyses%"))).scalar_one()) == 0
    audit = on_db(gateway, lambda c: c.execute(
        select(t.audit.c.actor, t.audit.c.subject, t.audit.c.detail)
        .where(t.audit.c.action == "trash.purge")).all())
    assert len(audit) == 1 and audit[0].actor == "housekeeping"
    assert audit[0].subject.startswith("mailbox ")
    assert json.loads(audit[0].detail) == {"messages": 1}
    # The one moved out left its Trash time behind (moved in again, it counts from then).
    assert on_db(gateway, lambda c: c.execute(
        select(func.count()).select_from(t.message)
        .where(~in_trash(c), t.message.c.trashed_at.isnot(None))).scalar_one()) == 0
    # A second purge finds nothing; the young one stays until its own 30 days.
    assert purge(gateway) == 0
    age_trash(gateway, 29)
    assert purge(gateway) == 0
    age_trash(gateway, 30)
    assert purge(gateway) == 1


def test_serve_purges_at_start_and_appended_trash_gets_a_time(gateway: Gateway) -> None:
    deliver(gateway, sample("02"))
    delete_in_portal(gateway, "Aucune inquiétude")
    imap = login_imap(gateway)
    # APPENDed straight into Trash with an old date: its time in Trash starts at the purge.
    appended = (b"From: " + PATIENT.encode() + b"\r\nSubject: brouillon jete\r\n\r\nx\r\n")
    old = imaplib.Time2Internaldate(time.time() - 90 * 86400)
    assert imap.append("Trash", "", old, appended)[0] == "OK"
    imap.logout()
    age_trash(gateway, 31)
    on_db(gateway, lambda c: c.execute(
        update(t.message).where(in_trash(c), t.message.c.subject == "brouillon jete")
        .values(trashed_at=None)), write=True)
    gateway.stop()
    gateway.start()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        left = on_db(gateway, lambda c: c.execute(
            select(t.message.c.subject, t.message.c.trashed_at).where(in_trash(c))).all())
        if len(left) == 1:
            break
        time.sleep(0.2)
    assert [r.subject for r in left] == ["brouillon jete"] and left[0].trashed_at is not None
    imap = login_imap(gateway)
    assert subjects(imap, "Trash") == ["Subject: brouillon jete"]
    imap.logout()
    assert "trash purge: 1 messages older than 30 days expunged" in gateway.log()
