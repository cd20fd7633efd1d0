"""The one durable outbound queue (SPEC §6.1, §6.2) and its worker.

Rows of ``outbound`` are written in the same transaction as what caused them (the patient's
copy in Sent; the professional's message in INBOX), so nothing is lost across a crash. The
worker claims due rows with a lease, sends, and records the outcome:

- ``relay``: a patient's message to a professional, over STARTTLS (required), the peer
  verified against the trust CA, our operator certificate presented. A permanent ``5xx`` or
  the end of the retry schedule puts a French bounce notice in the patient's INBOX.
- ``notification``: "you have a new message" to the patient's personal address, rendered
  from templates at send time (no health data), DKIM-signed. Notifications for one patient
  still waiting are merged into one.

At-most-once cannot be promised by SMTP: a crash after the peer's ``250`` and before our
commit resends that one message once the lease (``LEASE_SECONDS``) expires. The window is the
time between the peer's reply and our commit (one local transaction).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.utils import format_datetime, formataddr, make_msgid
from typing import Any

import aiosmtplib
import dkim
from sqlalchemy import and_, delete, or_, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway.config import Config, Listen
from gateway.tls import client_context
from imap_store import ops
from imap_store import schema as t
from imap_store.derive import derive
from imap_store.notices import Templates
from imap_store.ops import Stmt
from imap_store.store import NotFound, Store, as_utc, utcnow
from policy.addresses import domain_of, patient_address

log = logging.getLogger(__name__)

RELAY = "relay"
NOTIFICATION = "notification"
#: A claimed row is not claimed again before this many seconds (crash recovery).
LEASE_SECONDS = 300
#: Most rows sent per round; concurrent sends per round.
BATCH = 50
CONCURRENCY = 8
#: How often the worker looks for due rows when nothing woke it up.
POLL_SECONDS = 1.0
SMTP_TIMEOUT = 60.0


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


class PermanentFailure(Exception):
    """The peer refused for good (5xx): no retry."""


def _item(row: Any) -> QueueItem:
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


_DUE = Stmt(
    "SELECT id FROM outbound WHERE state = 'queued' AND next_attempt_at <= :now "
    "AND (lease_until IS NULL OR lease_until < :now) LIMIT 1",
    datetimes=("now",))


def _any_due(conn: Connection, now: datetime) -> Any:
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


# --- admin (mssante-gateway queue) ---------------------------------------------------------


async def list_items(store: Store, include_done: bool = False) -> list[QueueItem]:
    query = select(t.outbound).order_by(t.outbound.c.id)
    if not include_done:
        query = query.where(t.outbound.c.state == "queued")
    async with store.read() as conn:
        return [_item(r) for r in await conn.execute(query)]


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
        return _item(row)


# --- the worker ------------------------------------------------------------------------------


def backoff(attempts: int, schedule: Sequence[int]) -> float:
    """Delay before try number ``attempts + 1``: the schedule, its last step repeating,
    with +/-10 % jitter so that retries of many rows do not arrive together."""
    base = schedule[min(attempts - 1, len(schedule) - 1)]
    return float(base * random.uniform(0.9, 1.1))


class QueueWorker:
    def __init__(self, config: Config, store: Store, templates: Templates) -> None:
        self.config = config
        self.store = store
        self.templates = templates
        self.wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._relay_tls: ssl.SSLContext | None = None
        self._notify_tls: ssl.SSLContext | None = None
        self._dkim_key: bytes | None = None
        if config.notifier.dkim_key is not None and config.notifier.dkim_key.exists():
            self._dkim_key = config.notifier.dkim_key.read_bytes()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="queue-worker")

    def poke(self) -> None:
        self.wakeup.set()

    async def stop(self) -> None:
        """Finish the sends in progress (their state is committed), then stop."""
        self._stopping = True
        self.wakeup.set()
        if self._task is not None:
            await self._task
            self._task = None

    async def _run(self) -> None:
        while not self._stopping:
            try:
                worked = await self.run_once()
            except Exception:
                log.exception("queue round failed")
                worked = 0
            if worked == 0 and not self._stopping:
                try:
                    await asyncio.wait_for(self.wakeup.wait(), POLL_SECONDS)
                except TimeoutError:
                    pass
                self.wakeup.clear()

    async def run_once(self) -> int:
        items = await self._claim()
        if not items:
            return 0
        semaphore = asyncio.Semaphore(CONCURRENCY)

        async def one(item: QueueItem) -> None:
            async with semaphore:
                await self._process(item)

        await asyncio.gather(*(one(i) for i in items))
        return len(items)

    async def _claim(self) -> list[QueueItem]:
        now = utcnow()
        # A cheap read first: the write transaction below would wait for (and delay) the
        # intake's group commits on SQLite.
        if await self.store.run_read(_any_due, now) is None:
            return []
        async with self.store.write() as conn:
            query = (
                select(t.outbound)
                .where(and_(t.outbound.c.state == "queued", t.outbound.c.next_attempt_at <= now,
                            or_(t.outbound.c.lease_until.is_(None),
                                t.outbound.c.lease_until < now)))
                .order_by(t.outbound.c.next_attempt_at).limit(BATCH)
            )
            if conn.dialect.name == "postgresql":
                query = query.with_for_update(skip_locked=True)
            rows = (await conn.execute(query)).all()
            if not rows:
                return []
            items = [_item(r) for r in rows]
            await conn.execute(
                update(t.outbound).where(t.outbound.c.id.in_([i.id for i in items]))
                .values(lease_until=now + timedelta(seconds=LEASE_SECONDS))
            )
            # Merge: other waiting notifications of the same patients ride along.
            notified = {i.patient_id for i in items if i.kind == NOTIFICATION}
            if notified:
                await conn.execute(
                    update(t.outbound).where(and_(
                        t.outbound.c.kind == NOTIFICATION, t.outbound.c.state == "queued",
                        t.outbound.c.patient_id.in_(notified),
                        t.outbound.c.id.not_in([i.id for i in items]),
                    )).values(state="merged")
                )
                seen: set[int | None] = set()
                unique, merged = [], []
                for i in items:
                    if i.kind == NOTIFICATION:
                        if i.patient_id in seen:
                            merged.append(i.id)
                            continue
                        seen.add(i.patient_id)
                    unique.append(i)
                if merged:
                    await conn.execute(update(t.outbound).where(t.outbound.c.id.in_(merged))
                                       .values(state="merged"))
                items = unique
        return items

    async def _process(self, item: QueueItem) -> None:
        try:
            if item.kind == RELAY:
                await self._relay(item)
            else:
                await self._notify(item)
        except PermanentFailure as exc:
            await self._failed(item, str(exc), permanent=True)
        except (aiosmtplib.SMTPException, OSError, ssl.SSLError, TimeoutError) as exc:
            await self._failed(item, _describe(exc), permanent=False)
        except Exception as exc:
            log.exception("queue item %d: unexpected error", item.id)
            await self._failed(item, exc.__class__.__name__, permanent=False)
        else:
            async with self.store.write() as conn:
                await conn.execute(update(t.outbound).where(t.outbound.c.id == item.id).values(
                    state="sent", attempts=item.attempts + 1, lease_until=None,
                    last_error=None))
                await self.store.audit(conn, "queue", f"{item.kind}.sent", str(item.id),
                                       {"recipient": item.recipient})
            log.info("queue item %d (%s) sent", item.id, item.kind)

    async def _failed(self, item: QueueItem, reason: str, permanent: bool) -> None:
        attempts = item.attempts + 1
        age = (utcnow() - item.created_at).total_seconds()
        give_up = permanent or age >= self.config.outbound.max_age
        async with self.store.write() as conn:
            if give_up:
                await conn.execute(update(t.outbound).where(t.outbound.c.id == item.id).values(
                    state="bounced" if item.kind == RELAY else "failed", attempts=attempts,
                    lease_until=None, last_error=reason[:500]))
                if item.kind == RELAY and item.patient_id is not None:
                    await self._bounce(conn, item, reason)
                await self.store.audit(conn, "queue", f"{item.kind}.failed", str(item.id),
                                       {"recipient": item.recipient, "reason": reason[:200]})
            else:
                delay = backoff(attempts, self.config.outbound.retry_schedule)
                await conn.execute(update(t.outbound).where(t.outbound.c.id == item.id).values(
                    attempts=attempts, lease_until=None, last_error=reason[:500],
                    next_attempt_at=utcnow() + timedelta(seconds=delay)))
        log.info("queue item %d (%s) %s: %s", item.id, item.kind,
                 "gave up" if give_up else "will retry", reason[:200])

    # --- relay ------------------------------------------------------------------------------

    def route(self, recipient: str) -> Listen | None:
        domain = domain_of(recipient)
        return self.config.outbound.routes.get(domain) or self.config.outbound.default_relay

    def relay_tls(self) -> ssl.SSLContext:
        if self._relay_tls is None:
            out = self.config.outbound
            self._relay_tls = client_context(self.config.tls.client_ca, out.cert, out.key)
        return self._relay_tls

    async def _relay(self, item: QueueItem) -> None:
        route = self.route(item.recipient)
        if route is None:
            raise PermanentFailure("no route to the recipient's domain")
        assert item.blob_id is not None
        async with self.store.read() as conn:
            data = await self.store.blobs.get(conn, item.blob_id)
        tls_name = _tls_name(route.host, item.recipient)
        await self._send(route, tls_name, self.relay_tls(), item.sender, item.recipient, data,
                         require_tls=True)

    async def _send(self, route: Listen, tls_name: str, tls: ssl.SSLContext, sender: str,
                    recipient: str, data: bytes, require_tls: bool) -> None:
        client = aiosmtplib.SMTP(hostname=route.host, port=route.port, timeout=SMTP_TIMEOUT,
                                 start_tls=False, local_hostname=self.config.hostname)
        await client.connect()
        try:
            await client.ehlo()
            if client.supports_extension("starttls"):
                await client.starttls(server_hostname=tls_name, tls_context=tls)
            elif require_tls:
                raise aiosmtplib.SMTPException("the relay does not offer STARTTLS")
            try:
                errors, _ = await client.sendmail(sender, [recipient], data)
            except aiosmtplib.SMTPRecipientsRefused as exc:
                refusal = exc.recipients[0]
                if 500 <= refusal.code < 600:
                    raise PermanentFailure(f"{refusal.code} {refusal.message}") from None
                raise
            except aiosmtplib.SMTPResponseException as exc:
                if 500 <= exc.code < 600:
                    raise PermanentFailure(f"{exc.code} {exc.message}") from None
                raise
            if errors:
                response = next(iter(errors.values()))
                if 500 <= response.code < 600:
                    raise PermanentFailure(f"{response.code} {response.message}")
                raise aiosmtplib.SMTPException(f"{response.code} {response.message}")
        finally:
            try:
                await client.quit()
            except (aiosmtplib.SMTPException, OSError):
                client.close()

    async def _bounce(self, conn: AsyncConnection, item: QueueItem, reason: str) -> None:
        assert item.patient_id is not None
        row = (await conn.execute(select(t.patient.c.ins, t.patient.c.name)
                                  .where(t.patient.c.id == item.patient_id))).first()
        if row is None:
            return
        # The patient's message as derived at submission (its copy in Sent): no re-parse.
        original = (await conn.execute(
            select(t.message.c.message_id, t.message.c.subject)
            .where(t.message.c.blob_id == item.blob_id).limit(1))).first() \
            if item.blob_id is not None else None
        to = patient_address(row.ins, self.config.domains.patient)
        service = self.config.notifier.service_name
        subject = "Message non distribué"
        raw = self.templates.notice(
            "bounce", sender=self.config.system_sender, sender_name=service, to=to,
            subject=subject, domain=self.config.domains.service,
            in_reply_to=original.message_id if original else None,
            patient_name=row.name, recipient=item.recipient, reason=_french_reason(reason),
            original_subject=(original.subject if original and original.subject else
                              "(sans objet)"),
            service_name=service,
        )
        inbox = await self.store.mailbox_id(conn, item.patient_id, "INBOX")
        await self.store.append(conn, inbox, raw, derive(raw))

    # --- notification -------------------------------------------------------------------------

    async def _notify(self, item: QueueItem) -> None:
        relay = self.config.notifier.relay
        if relay is None:
            raise PermanentFailure("no notifier relay configured ([notifier] relay)")
        async with self.store.read() as conn:
            row = (await conn.execute(select(t.patient.c.name, t.patient.c.notify_email)
                                      .where(t.patient.c.id == item.patient_id))).first()
        if row is None:
            raise PermanentFailure("patient no longer exists")
        data = self.render_notification(row.name, row.notify_email)
        if self._notify_tls is None:
            self._notify_tls = client_context(self.config.tls.client_ca)
        await self._send(relay, relay.host, self._notify_tls, self.config.system_sender,
                         row.notify_email, data, require_tls=False)

    def render_notification(self, patient_name: str, notify_email: str) -> bytes:
        return render_notification(self.config, self.templates, self._dkim_key, patient_name,
                                   notify_email)


def render_notification(config: Config, templates: Templates, dkim_key: bytes | None,
                        patient_name: str, notify_email: str) -> bytes:
    """The notification e-mail: multipart/alternative, French, DKIM-signed, and nothing
    about the message itself (no sender, subject, content or attachment)."""
    cfg = config
    service = cfg.notifier.service_name
    ctx = {"patient_name": patient_name, "service_name": service,
           "login_url": cfg.notifier.login_url,
           "subject": f"Nouveau message dans votre messagerie {service}"}
    msg = EmailMessage()
    msg["From"] = formataddr((service, cfg.system_sender))
    msg["To"] = notify_email
    msg["Subject"] = ctx["subject"]
    msg["Date"] = format_datetime(datetime.now(UTC))
    msg["Message-ID"] = make_msgid(domain=cfg.domains.service)
    msg["Auto-Submitted"] = "auto-generated"
    msg.set_content(templates.render("notification.txt.j2", **ctx), subtype="plain",
                    charset="utf-8", cte="quoted-printable")
    msg.add_alternative(templates.render("notification.html.j2", **ctx),
                        subtype="html", charset="utf-8", cte="quoted-printable")
    data = msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))
    if dkim_key is not None:
        signature = dkim.sign(
            data, cfg.notifier.dkim_selector.encode(), domain_of(cfg.system_sender).encode(),
            dkim_key,
            include_headers=[b"from", b"to", b"subject", b"date", b"message-id",
                             b"mime-version", b"content-type", b"auto-submitted"],
        )
        data = signature + data
    return data


def _tls_name(host: str, recipient: str) -> str:
    """The name the relay's certificate must carry: the route's host name, or for an IP
    literal route the recipient's domain (an operator certificate names its domain)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return host
    return domain_of(recipient)


def _describe(exc: BaseException) -> str:
    text = str(exc) or exc.__class__.__name__
    return f"{exc.__class__.__name__}: {text}"[:300]


def _french_reason(reason: str) -> str:
    if reason.startswith("5") and reason[:3].isdigit():
        return f"le serveur du destinataire a refusé le message ({reason[:200]})"
    if "no route" in reason:
        return "aucune route vers le domaine du destinataire"
    return f"le serveur du destinataire est resté injoignable ({reason[:200]})"
