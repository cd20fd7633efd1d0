"""The worker of the durable outbound queue (SPEC §6.1, §6.2): claims due rows with a lease,
sends, and records the outcome.

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
from datetime import timedelta

import aiosmtplib
from sqlalchemy import and_, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from imap_store.store import schema as t
from imap_store.store.deliver import MailboxName, deliver
from imap_store.store.directory import Store
from imap_store.store.fields import utcnow
from imap_store.store.notices import Notices
from imap_store.store.outbound import NOTIFICATION, RELAY, QueueItem, any_due, queue_item
from outbound import metrics
from outbound.notification import render_notification
from outbound.settings import OutboundSettings, Relay
from policy.addresses import domain_of, patient_address
from templates import Templates

log = logging.getLogger(__name__)

#: A claimed row is not claimed again before this many seconds (crash recovery).
LEASE_SECONDS = 300
#: Most rows sent per round; concurrent sends per round.
BATCH = 50
CONCURRENCY = 8
#: How often the worker looks for due rows when nothing woke it up.
POLL_SECONDS = 1.0
SMTP_TIMEOUT = 60.0


class PermanentFailure(Exception):
    """The peer refused for good (5xx): no retry."""


def backoff(attempts: int, schedule: Sequence[int]) -> float:
    """Delay before try number ``attempts + 1``: the schedule, its last step repeating,
    with +/-10 % jitter so that retries of many rows do not arrive together."""
    base = schedule[min(attempts - 1, len(schedule) - 1)]
    return float(base * random.uniform(0.9, 1.1))


class QueueWorker:
    def __init__(self, settings: OutboundSettings, store: Store, templates: Templates,
                 notices: Notices) -> None:
        self.settings = settings
        self.store = store
        self.templates = templates
        self.notices = notices
        self.wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="queue-worker")

    @property
    def alive(self) -> bool:
        """The worker's task runs (for ``/readyz``)."""
        return self._task is not None and not self._task.done()

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
        if await self.store.run_read(any_due, now) is None:
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
            items = [queue_item(r) for r in rows]
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
            metrics.sent(item.kind)

    async def _failed(self, item: QueueItem, reason: str, permanent: bool) -> None:
        attempts = item.attempts + 1
        age = (utcnow() - item.created_at).total_seconds()
        give_up = permanent or age >= self.settings.max_age
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
                delay = backoff(attempts, self.settings.retry_schedule)
                await conn.execute(update(t.outbound).where(t.outbound.c.id == item.id).values(
                    attempts=attempts, lease_until=None, last_error=reason[:500],
                    next_attempt_at=utcnow() + timedelta(seconds=delay)))
        log.info("queue item %d (%s) %s: %s", item.id, item.kind,
                 "gave up" if give_up else "will retry", reason[:200])
        metrics.failed(item.kind, permanent, give_up)

    # --- relay ------------------------------------------------------------------------------

    def route(self, recipient: str) -> Relay | None:
        domain = domain_of(recipient)
        return self.settings.routes.get(domain) or self.settings.default_relay

    async def _relay(self, item: QueueItem) -> None:
        route = self.route(item.recipient)
        if route is None:
            raise PermanentFailure("no route to the recipient's domain")
        assert item.blob_id is not None
        async with self.store.read() as conn:
            data = await self.store.blobs.get(conn, item.blob_id)
        tls_name = _tls_name(route.host, item.recipient)
        if self.settings.relay_tls is None:
            raise PermanentFailure("no TLS context for relays")
        await self._send(route, tls_name, self.settings.relay_tls, item.sender, item.recipient,
                         data, require_tls=True)

    async def _send(self, route: Relay, tls_name: str, tls: ssl.SSLContext | None, sender: str,
                    recipient: str, data: bytes, require_tls: bool) -> None:
        client = aiosmtplib.SMTP(hostname=route.host, port=route.port, timeout=SMTP_TIMEOUT,
                                 start_tls=False, local_hostname=self.settings.hostname)
        await client.connect()
        try:
            await client.ehlo()
            if client.supports_extension("starttls") and tls is not None:
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
            select(t.message.c.message_id, t.message.c.subject, t.message.c.references)
            .where(t.message.c.blob_id == item.blob_id).limit(1))).first() \
            if item.blob_id is not None else None
        raw = self.notices.bounce(
            patient_name=row.name, address=patient_address(row.ins, self.settings.patient_domain),
            recipient=item.recipient, reason=_french_reason(reason),
            original_subject=original.subject if original else None,
            in_reply_to=original.message_id if original else None,
            references=" ".join(x for x in (original.references, original.message_id) if x)
            if original else None)
        await conn.run_sync(deliver, [MailboxName(item.patient_id, "INBOX")], raw)

    # --- notification -------------------------------------------------------------------------

    async def _notify(self, item: QueueItem) -> None:
        relay = self.settings.notifier.relay
        if relay is None:
            raise PermanentFailure("no notifier relay configured ([notifier] relay)")
        async with self.store.read() as conn:
            row = (await conn.execute(select(t.patient.c.name, t.patient.c.notify_email)
                                      .where(t.patient.c.id == item.patient_id))).first()
        if row is None:
            raise PermanentFailure("patient no longer exists")
        data = render_notification(self.settings.notifier, self.templates, row.name,
                                   row.notify_email)
        await self._send(relay, relay.host, self.settings.notify_tls,
                         self.settings.notifier.system_sender, row.notify_email, data,
                         require_tls=False)


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
