"""Housekeeping of ``serve``, at start then hourly: the Trash purge (issue 11, ``[web]
trash_days``) and the bound on ``expunged`` (issue 13).

A message that has been in a patient's ``\\Trash`` mailbox longer than ``trash_days`` is
expunged for good, whichever way it got there: "Supprimer la conversation" in the portal, or an
IMAP client's COPY/MOVE into Trash (Trash is Trash; Dovecot's ``autoexpunge`` does the same).
The time it entered Trash is ``message.trashed_at``, set by COPY/MOVE (mailboxes.py); a message
that reached Trash otherwise (APPEND) is stamped by the first purge that sees it, so it stays
at least ``trash_days`` too. A message moved out of Trash leaves its time behind.

The purge expunges as EXPUNGE does (``PatientMailStore.expunge_in``: one MODSEQ per mailbox
and batch, ``expunged`` rows so IMAP sessions with Trash selected see EXPUNGE/VANISHED,
bodies deleted once nothing else uses them), in batches of :data:`PURGE_BATCH` messages
through the group writer, so it never holds the writer long. Each batch is audited with its
mailbox id and count only.

``expunged`` remembers the UIDs of every EXPUNGE with its MODSEQ, for the other sessions of the
mailbox (EXPUNGE/VANISHED) and for QRESYNC's VANISHED (EARLIER) (RFC 7162). Each mailbox keeps
its newest :data:`EXPUNGED_KEEP` rows; older ones are deleted (whole MODSEQs at a time) and
``mailbox.vanished_modseq`` remembers the highest MODSEQ deleted. A client resynchronizing from
a MODSEQ below it gets a superset in VANISHED (EARLIER): every UID of its known range, below
UIDNEXT, that no message has (RFC 7162 §3.2.5.2 allows it; ``PatientMailStore.vanished``); a
session whose view is that old gets the same set as its expunges (``changes``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.engine import Connection

from imap_store.store import ops
from imap_store.store import schema as t
from imap_store.store.directory import Store
from imap_store.store.mailboxes import SqlMailStores
from imap_store.store.tasks import cancel_and_wait

log = logging.getLogger(__name__)

#: The special use of the mailbox that is purged (RFC 6154).
TRASH = "\\Trash"
#: Messages expunged (or stamped) per write transaction.
PURGE_BATCH = 500
#: Seconds between two purges of a running ``serve`` (the first runs at start).
PURGE_EVERY = 3600.0
#: Expunged UIDs kept per mailbox for the exact VANISHED (EARLIER) of QRESYNC; more are pruned.
EXPUNGED_KEEP = 5000


def _in_trash() -> Any:
    return t.message.c.mailbox_id.in_(
        select(t.mailbox.c.id).where(t.mailbox.c.special_use == TRASH))


async def _stamp_unknown(stores: SqlMailStores, now: datetime) -> int:
    """Give messages in Trash without a time (APPENDed there, say) the time ``now``."""
    stamped = 0
    while True:
        async with stores.store.read() as conn:
            ids = [int(i) for i in (await conn.execute(
                select(t.message.c.id).where(_in_trash(), t.message.c.trashed_at.is_(None))
                .limit(PURGE_BATCH))).scalars()]
        if not ids:
            return stamped

        def job(conn: Connection, ids: list[int] = ids) -> int:
            result = conn.execute(
                update(t.message).where(t.message.c.id.in_(ids), t.message.c.trashed_at.is_(None))
                .values(trashed_at=now))
            return int(result.rowcount or 0)

        stamped += await stores.write_sync(job)


async def purge_trash(stores: SqlMailStores, days: int, now: datetime | None = None) -> int:
    """Expunge every message in a Trash mailbox since more than ``days`` days; the count."""
    now = now or datetime.now(UTC)
    await _stamp_unknown(stores, now)
    cutoff = now - timedelta(days=days)
    purged = 0
    while True:
        async with stores.store.read() as conn:
            rows = (await conn.execute(
                select(t.mailbox.c.patient_id, t.message.c.mailbox_id)
                .select_from(t.message.join(t.mailbox, t.mailbox.c.id == t.message.c.mailbox_id))
                .where(t.message.c.trashed_at < cutoff, t.mailbox.c.special_use == TRASH)
                .order_by(t.message.c.trashed_at).limit(PURGE_BATCH))).all()
        if not rows:
            return purged
        done = 0
        for patient_id, mailbox_id in dict.fromkeys((int(p), int(m)) for p, m in rows):
            done += await stores.write_sync(_purge_job(stores, patient_id, mailbox_id, cutoff))
        if not done:  # what was seen is gone already (another process purged it)
            return purged
        purged += done


def _purge_job(stores: SqlMailStores, patient_id: int, mailbox_id: int,
               cutoff: datetime) -> Callable[[Connection], int]:
    mail = stores.for_patient(patient_id)

    def job(conn: Connection) -> int:
        # Read again in the transaction, rows locked on PostgreSQL: a message moved out of
        # Trash meanwhile, or purged by another serve process, is not expunged twice.
        uids = [int(u) for u in conn.execute(
            select(t.message.c.uid)
            .where(t.message.c.mailbox_id == mailbox_id, t.message.c.trashed_at < cutoff)
            .order_by(t.message.c.uid).limit(PURGE_BATCH).with_for_update()).scalars()]
        if not uids:
            return 0
        mail.expunge_in(conn, mailbox_id, uids)
        ops.audit(conn, "housekeeping", "trash.purge", f"mailbox {mailbox_id}",
                  {"messages": len(uids)})
        return len(uids)

    return job


async def prune_expunged(stores: SqlMailStores, keep: int = EXPUNGED_KEEP) -> int:
    """Delete the ``expunged`` rows of each mailbox but its newest ``keep`` (whole MODSEQs:
    the MODSEQ of the row just past ``keep`` and all older go) and raise the mailbox's
    ``vanished_modseq`` to the highest MODSEQ deleted; the count of rows deleted."""
    async with stores.store.read() as conn:
        mailbox_ids = [int(m) for m in (await conn.execute(
            select(t.expunged.c.mailbox_id).group_by(t.expunged.c.mailbox_id)
            .having(func.count(t.expunged.c.id) > keep))).scalars()]
    pruned = 0
    for mailbox_id in mailbox_ids:
        pruned += await stores.write_sync(_prune_job(mailbox_id, keep))
    return pruned


def _prune_job(mailbox_id: int, keep: int) -> Callable[[Connection], int]:
    def job(conn: Connection) -> int:
        floor = conn.execute(
            select(t.expunged.c.modseq).where(t.expunged.c.mailbox_id == mailbox_id)
            .order_by(t.expunged.c.modseq.desc()).offset(keep).limit(1)).scalar()
        if floor is None:  # pruned meanwhile (another process)
            return 0
        # The mailbox row first (locked on PostgreSQL), as every EXPUNGE takes it.
        conn.execute(update(t.mailbox)
                     .where(t.mailbox.c.id == mailbox_id, t.mailbox.c.vanished_modseq < floor)
                     .values(vanished_modseq=floor))
        result = conn.execute(delete(t.expunged).where(
            t.expunged.c.mailbox_id == mailbox_id, t.expunged.c.modseq <= floor))
        return int(result.rowcount or 0)

    return job


class TrashPurge:
    """Runs :func:`purge_trash` and :func:`prune_expunged` at start, then every ``every``
    seconds, until stopped."""

    def __init__(self, store: Store, submit: Callable[..., Awaitable[Any]], days: int,
                 every: float = PURGE_EVERY,
                 submit_sync: Callable[..., Awaitable[Any]] | None = None) -> None:
        self.stores = SqlMailStores(store, submit, submit_sync)
        self.days = days
        self.every = every
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="trash-purge")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)

    async def _run(self) -> None:
        while True:
            try:
                count = await purge_trash(self.stores, self.days)
                if count:
                    log.info("trash purge: %d messages older than %d days expunged",
                             count, self.days)
            except Exception:  # a failed run is retried at the next one, serve goes on
                log.exception("trash purge failed")
            try:
                pruned = await prune_expunged(self.stores)
                if pruned:
                    log.info("expunged: %d old rows pruned", pruned)
            except Exception:
                log.exception("pruning expunged failed")
            await asyncio.sleep(self.every)
