"""What happens to an accepted message: header rules at end of DATA (R5, R10) and the store
job run by the group writer (R2 exchange opened, R4 Reply-To, R5 end + notice, audit)."""

from __future__ import annotations

import email.header
import email.utils
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from email.parser import BytesHeaderParser
from email.policy import compat32

from sqlalchemy import and_, select
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway.config import Config
from gateway.queue import enqueue_notification, enqueue_relay
from imap_store import schema as t
from imap_store.derive import derive, fields_from_info
from imap_store.mime import MessageInfo
from imap_store.notices import Templates
from imap_store.store import Store
from policy.addresses import domain_of
from policy.rules import (
    Decision,
    Identity,
    decide_from_header,
    decide_patient_message,
    is_end_of_exchange,
)


@dataclass(frozen=True)
class IncomingMessage:
    """Header facts of one message, read once from its header block."""

    from_addrs: tuple[str, ...]
    from_name: str
    subject: str
    x_mss_mes: str | None
    reply_to: tuple[tuple[str, str], ...]  # (address, display name)
    message_id: str | None
    in_reply_to: str | None
    references: str | None
    date: datetime | None



def _decode(value: str | None) -> str:
    """RFC 2047 decoding that never fails (unknown charsets fall back to replacement)."""
    if value is None:
        return ""
    try:
        return str(email.header.make_header(email.header.decode_header(value)))
    except (LookupError, UnicodeError, ValueError, email.errors.HeaderParseError):
        return value.encode("ascii", "replace").decode("ascii")


def _one_line(value: str | None, limit: int = 998) -> str | None:
    if value is None:
        return None
    return " ".join(value.split())[:limit] or None


def parse_incoming(raw: bytes) -> IncomingMessage | None:
    """Read the header block (headers only, RFC 5322 §2.2). None when it cannot be read."""
    end = raw.find(b"\r\n\r\n")
    head = raw if end < 0 else raw[: end + 4]
    try:
        msg = BytesHeaderParser(policy=compat32).parsebytes(head)
        from_raw = msg.get_all("From") or []
        reply_raw = msg.get_all("Reply-To") or []
        from_pairs = email.utils.getaddresses([str(v) for v in from_raw])
        reply_pairs = email.utils.getaddresses([str(v) for v in reply_raw])
        date_value = msg.get("Date")
        date: datetime | None = None
        if date_value:
            try:
                date = email.utils.parsedate_to_datetime(str(date_value))
            except (TypeError, ValueError, IndexError):
                date = None
        x_mss = msg.get("X-MSS-MES")
        return IncomingMessage(
            from_addrs=tuple(a.lower() for _n, a in from_pairs if a),
            from_name=_decode(from_pairs[0][0]) if from_pairs else "",
            subject=_decode(msg.get("Subject")),
            x_mss_mes=str(x_mss) if x_mss is not None else None,
            reply_to=tuple((a.lower(), _decode(n)) for n, a in reply_pairs if "@" in a),
            message_id=_one_line(msg.get("Message-ID")),
            in_reply_to=_one_line(msg.get("In-Reply-To")),
            references=_one_line(msg.get("References"), 4000),
            date=date,
        )
    except (ValueError, TypeError, IndexError, LookupError, UnicodeError):
        return None


class Delivery:
    def __init__(self, store: Store, config: Config, templates: Templates) -> None:
        self.store = store
        self.config = config
        self.templates = templates

    async def check_headers(self, identity: Identity, mail_from: str,
                            message: IncomingMessage) -> Decision:
        """R10 at DATA: ``From:`` is the envelope sender."""
        return decide_from_header(mail_from, message.from_addrs)

    def job(self, identity: Identity, mail_from: str, recipients: list[tuple[str, int, str]],
            raw: bytes, message: IncomingMessage) -> Callable[[AsyncConnection], Awaitable[None]]:
        sender = mail_from.lower()
        ends = is_end_of_exchange(message.x_mss_mes, message.subject)

        async def run(conn: AsyncConnection) -> None:
            store = self.store
            facts = await store.professional_facts(conn, sender)
            name = facts.name or message.from_name or sender
            trusted = set(await store.trusted_domains(conn))
            reply_to = [(a, n) for a, n in message.reply_to if domain_of(a) in trusted]
            blob_id = await store.blobs.put(conn, raw)
            fields = derive(raw)
            for address, patient_id, ins in recipients:
                inbox = await store.mailbox_id(conn, patient_id, "INBOX")
                stored = await store.append(conn, inbox, raw, fields, blob_id=blob_id)
                await store.open_exchange(conn, patient_id, sender, name, reply_to)  # R2, R4
                if ends:  # R5: delivered, then the exchange ends and the patient is told
                    await store.end_exchanges(conn, patient_id, sender)
                    await self._end_notice(conn, patient_id, inbox, address, name, message)
                await store.audit(conn, identity.describe(), "deliver", ins,
                                  {"from": sender, "uid": stored.uid, "size": len(raw),
                                   "end_of_exchange": ends})
                if self.config.notifier.relay is not None:
                    notify_email = await store.patient_notify_email(conn, patient_id)
                    await enqueue_notification(conn, patient_id, self.config.system_sender,
                                               notify_email)

        return run

    async def check_patient_message(self, identity: Identity, mail_from: str,
                                    message: IncomingMessage,
                                    info: MessageInfo) -> Decision:
        """R10 (From: is the patient) and R6 (subject of a new conversation, attachments)."""
        decision = decide_from_header(mail_from, message.from_addrs)
        if not decision.allowed:
            return decision
        starts = True
        if info.in_reply_to:
            async with self.store.read() as conn:
                starts = not await self._in_mailbox(conn, identity.account_id, info.in_reply_to)
        return decide_patient_message(info.subject, starts, info.attachments_total_size)

    async def _in_mailbox(self, conn: AsyncConnection, patient_id: int, message_id: str) -> bool:
        row = (await conn.execute(
            select(t.message.c.id)
            .join(t.mailbox, t.mailbox.c.id == t.message.c.mailbox_id)
            .where(and_(t.mailbox.c.patient_id == patient_id,
                        t.message.c.message_id == message_id[:998]))
            .limit(1)
        )).first()
        return row is not None

    def patient_job(self, identity: Identity, mail_from: str, recipients: list[str],
                    raw: bytes, info: MessageInfo) -> Callable[[AsyncConnection], Awaitable[None]]:
        """Copy in Sent and one queued relay per recipient, in one transaction (SPEC §6.1)."""
        patient_id = identity.account_id

        async def run(conn: AsyncConnection) -> None:
            store = self.store
            blob_id = await store.blobs.put(conn, raw)
            sent = await store.mailbox_id(conn, patient_id, "Sent")
            stored = await store.append(conn, sent, raw, fields_from_info(info),
                                        flags=t.FLAG_SEEN, blob_id=blob_id)
            for recipient in recipients:
                await enqueue_relay(conn, patient_id, mail_from, recipient, blob_id)
            await store.audit(conn, identity.describe(), "submit", ",".join(recipients),
                              {"uid": stored.uid, "size": len(raw)})

        return run


    async def _end_notice(self, conn: AsyncConnection, patient_id: int, inbox: int,
                          address: str, professional_name: str,
                          message: IncomingMessage) -> None:
        patient_name = await self.store.patient_name(conn, patient_id)
        service = self.config.notifier.service_name
        subject = f"{professional_name} a mis fin à vos échanges"
        references = " ".join(x for x in (message.references, message.message_id) if x) or None
        raw = self.templates.notice(
            "end_of_exchange", sender=self.config.system_sender, sender_name=service,
            to=address, subject=subject, domain=self.config.domains.service,
            in_reply_to=message.message_id, references=references,
            patient_name=patient_name, professional_name=professional_name,
            service_name=service,
        )
        await self.store.append(conn, inbox, raw, derive(raw))
