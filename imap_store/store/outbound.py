"""The outbound queue's rows (SPEC §6.1, §6.2): enqueued in the same transaction as what caused
them (the patient's copy in Sent; the professional's message in INBOX), so nothing is lost
across a crash; read and changed by the worker of ``outbound/`` and by ``mssante-gateway queue``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import and_, delete, select, update
from sqlalchemy.engine import Connection

from imap_store.store import ops
from imap_store.store import schema as t
from imap_store.store.directory import NotFound, Store
from imap_store.store.fields import as_utc, utcnow
from imap_store.store.ops import Stmt

RELAY = "relay"
NOTIFICATION = "notification"


@dataclass(frozen=True)
class QueueItem:
    id: int
    kind: str
    patient_id: int | None
    sender: str
    recipient: str
    state: str
    attempts: int
    next_attempt_at: datetime
    created_at: datetime
    last_error: str | None
    blob_id: int | None = None  # the message a relay carries

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "kind": self.kind, "sender": self.sender,
            "recipient": self.recipient, "state": self.state, "attempts": self.attempts,
            "next_attempt_at": self.next_attempt_at.isoformat(),
            "created_at": self.created_at.isoformat(), "last_error": self.last_error,
        }


def queue_item(row: Any) -> QueueItem:
    return QueueItem(
        id=row.id, kind=row.kind, patient_id=row.patient_id, sender=row.sender,
        recipient=row.recipient, state=row.state, attempts=row.attempts,
        next_attempt_at=as_utc(row.next_attempt_at), created_at=as_utc(row.created_at),
        last_error=row.last_error, blob_id=row.blob_id,
    )


# --- enqueueing (inside the caller's transaction) ----------------------------------------


_WAITING_NOTIFICATION = Stmt(
    "SELECT id FROM outbound WHERE kind = 'notification' AND patient_id = :patient_id "
    "AND state = 'queued' AND attempts = 0 LIMIT 1")
_INSERT_OUTBOUND = Stmt(
    "INSERT INTO outbound (kind, patient_id, sender, recipient, blob_id, state, attempts, "
    "next_attempt_at, created_at) VALUES (:kind, :patient_id, :sender, :recipient, :blob_id, "
    "'queued', 0, :now, :now) RETURNING id", datetimes=("now",))


# PostgreSQL: ``enqueue_notification`` for several patients in one round trip.
_PG_ENQUEUE_NOTIFICATIONS = Stmt(
    "INSERT INTO outbound (kind, patient_id, sender, recipient, blob_id, state, attempts, "
    "next_attempt_at, created_at) SELECT 'notification', p.id, :sender, p.notify_email, NULL, "
    "'queued', 0, :now, :now FROM patient p WHERE p.id = ANY(CAST(:ids AS INTEGER[])) "
    "AND NOT EXISTS (SELECT 1 FROM outbound o WHERE o.kind = 'notification' "
    "AND o.patient_id = p.id AND o.state = 'queued' AND o.attempts = 0)", datetimes=("now",))


_DUE = Stmt(
    "SELECT id FROM outbound WHERE state = 'queued' AND next_attempt_at <= :now "
    "AND (lease_until IS NULL OR lease_until < :now) LIMIT 1",
    datetimes=("now",))


def any_due(conn: Connection, now: datetime) -> Any:
    return _DUE.first(conn, {"now": now})


def enqueue_relay(conn: Connection, patient_id: int, sender: str, recipient: str,
                  blob_id: int) -> int:
    row = _INSERT_OUTBOUND.first(conn, {
        "kind": RELAY, "patient_id": patient_id, "sender": sender, "recipient": recipient,
        "blob_id": blob_id, "now": utcnow()})
    return int(row[0])


def enqueue_notification(conn: Connection, patient_id: int, sender: str) -> int | None:
    """Queue a notification unless one for this patient is still waiting (merged)."""
    waiting = _WAITING_NOTIFICATION.first(conn, {"patient_id": patient_id})
    if waiting is not None:
        return None
    row = _INSERT_OUTBOUND.first(conn, {
        "kind": NOTIFICATION, "patient_id": patient_id, "sender": sender,
        "recipient": ops.patient_notify_email(conn, patient_id), "blob_id": None,
        "now": utcnow()})
    return int(row[0])


def enqueue_notifications(conn: Connection, patient_ids: Sequence[int], sender: str) -> None:
    """``enqueue_notification`` for each patient (once each); on PostgreSQL in one
    statement."""
    ids = list(dict.fromkeys(patient_ids))
    if conn.dialect.name != "postgresql":
        for patient_id in ids:
            enqueue_notification(conn, patient_id, sender)
        return
    if ids:
        _PG_ENQUEUE_NOTIFICATIONS.run(conn, {"ids": ids, "sender": sender, "now": utcnow()})


# --- admin (mssante-gateway queue) ---------------------------------------------------------


async def list_items(store: Store, include_done: bool = False) -> list[QueueItem]:
    query = select(t.outbound).order_by(t.outbound.c.id)
    if not include_done:
        query = query.where(t.outbound.c.state == "queued")
    async with store.read() as conn:
        return [queue_item(r) for r in await conn.execute(query)]


async def retry_items(store: Store, item_id: int | None) -> int:
    """Make queued rows due now (``item_id`` None = all); return how many."""
    where = t.outbound.c.state == "queued"
    if item_id is not None:
        where = and_(where, t.outbound.c.id == item_id)
    async with store.write() as conn:
        result = await conn.execute(
            update(t.outbound).where(where).values(next_attempt_at=utcnow(), lease_until=None))
        count = int(result.rowcount)
        await store.audit(conn, "admin", "queue.retry", str(item_id or "all"), {"rows": count})
    if item_id is not None and count == 0:
        raise NotFound(f"queue item {item_id} not found (or not queued)")
    return count


async def drop_item(store: Store, item_id: int) -> QueueItem:
    async with store.write() as conn:
        row = (await conn.execute(select(t.outbound).where(t.outbound.c.id == item_id))).first()
        if row is None:
            raise NotFound(f"queue item {item_id} not found")
        await conn.execute(delete(t.outbound).where(t.outbound.c.id == item_id))
        await store.audit(conn, "admin", "queue.drop", str(item_id),
                          {"kind": row.kind, "state": row.state})
        return queue_item(row)
