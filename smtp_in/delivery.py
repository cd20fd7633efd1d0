"""What happens to an accepted message: header rules at end of DATA (R5, R10) and the store
job run by the group writer (R2 exchange opened, R4 Reply-To, R5 end + notice, audit)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.engine import Connection

from imap_store.mime import MessageInfo
from imap_store.store import ops
from imap_store.store.deliver import MailboxName, deliver, deliver_many, fields_from_info
from imap_store.store.directory import Store
from imap_store.store.fields import MessageFields
from imap_store.store.notices import Notices
from imap_store.store.outbound import enqueue_notification, enqueue_notifications
from imap_store.store.writer import MergeableJob
from policy.addresses import domain_of
from policy.rules import (
    UNIQUE_FIELDS,
    Identity,
    is_end_of_exchange,
)
from smtp_in.settings import SmtpSettings


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


#: A field line of one of the fields RFC 5322 §3.6 allows once, any letter case, with the MIME
#: parser's syntax (``name [blanks] :``). Continuation lines start with a blank: never matched.
_UNIQUE_FIELD_LINE = re.compile(
    rb"^(" + b"|".join(re.escape(name.encode("ascii")) for name in UNIQUE_FIELDS) +
    rb")[ \t]*:", re.IGNORECASE | re.MULTILINE)


def unique_field_names(raw: bytes, info: MessageInfo) -> list[str]:
    """The top-level header fields of ``raw`` that ``policy.rules.UNIQUE_FIELDS`` names, in
    order (lower case): one C-speed scan of the header block the parse at DATA delimited
    (``info.header_size``), never of the body."""
    return [name.decode("ascii").lower()
            for name in _UNIQUE_FIELD_LINE.findall(raw, 0, info.header_size)]


def _addresses(entries: list[Any] | None) -> list[tuple[str, str]]:
    """(addr-spec lowercased, display name) from ENVELOPE address lists (groups skipped)."""
    out: list[tuple[str, str]] = []
    for entry in entries or []:
        name, _adl, mailbox, host = entry
        if mailbox and host:
            out.append((f"{mailbox}@{host}".lower(), name or ""))
    return out


def incoming_from_info(info: MessageInfo) -> IncomingMessage:
    """Header facts for the rules, taken from the parse done once at delivery."""
    envelope = info.envelope
    senders = _addresses(envelope[2])
    return IncomingMessage(
        from_addrs=tuple(a for a, _n in senders),
        from_name=senders[0][1] if senders else "",
        subject=info.subject,
        x_mss_mes=info.search_headers.get("x-mss-mes"),
        reply_to=tuple(_addresses(envelope[4])) if info.reply_to_addrs else (),
        message_id=info.message_id,
        in_reply_to=info.in_reply_to,
        references=" ".join(info.references) or None,
        date=info.date,
    )


class Delivery:
    def __init__(self, store: Store, settings: SmtpSettings, notices: Notices) -> None:
        self.store = store
        self.settings = settings
        self.notices = notices

    def job(self, identity: Identity, mail_from: str, recipients: list[tuple[str, int, str]],
            raw: bytes, message: IncomingMessage, info: MessageInfo,
            directory_name: str, trusted: frozenset[str],
            audit: Sequence[ops.AuditEntry] = ()) -> DeliveryJob:
        """The store job of a professional's message, run by the group writer.

        ``directory_name`` and ``trusted`` come from the RCPT and MAIL checks, so the writer
        does not read them again; ``audit`` holds the session's entries not yet written (its
        RCPT decisions), written in the same transaction before the deliveries."""
        sender = mail_from.lower()
        return DeliveryJob(
            delivery=self, actor=identity.describe(), sender=sender,
            name=directory_name or message.from_name or sender,
            reply_to=tuple((a, n) for a, n in message.reply_to
                           if domain_of(a) in trusted and a != sender),
            recipients=tuple(recipients), raw=raw, message=message,
            fields=fields_from_info(info),
            ends=is_end_of_exchange(message.x_mss_mes, message.subject), audit=tuple(audit))

    def _end_notice(self, conn: Connection, patient_id: int, inbox: int, address: str,
                    professional_name: str, message: IncomingMessage) -> None:
        references = " ".join(x for x in (message.references, message.message_id) if x) or None
        raw = self.notices.end_of_exchange(
            patient_name=ops.patient_name(conn, patient_id), address=address,
            professional_name=professional_name, in_reply_to=message.message_id,
            references=references)
        deliver(conn, [inbox], raw)


@dataclass(frozen=True, slots=True, eq=False)
class DeliveryJob(MergeableJob):
    """A professional's message accepted at DATA: delivered to each recipient's INBOX, R2
    (the exchange opened), R4 (its Reply-To addresses reachable), R5 (an end of exchange ends
    it and stores the notice), the notification queued, the audit rows. The group writer runs
    the jobs of a batch that end no exchange and name no Reply-To together
    (:meth:`run_together`): on PostgreSQL one statement for the whole batch (two with
    notifications) instead of three per message (issue 14)."""

    delivery: Delivery
    actor: str
    sender: str
    name: str
    reply_to: tuple[tuple[str, str], ...]
    recipients: tuple[tuple[str, int, str], ...]  # (address, patient id, INS)
    raw: bytes
    message: IncomingMessage
    fields: MessageFields  # derived here, before the writer's turn
    ends: bool
    audit: tuple[ops.AuditEntry, ...]

    def mergeable(self) -> bool:
        return not self.ends and not self.reply_to

    def __call__(self, conn: Connection) -> None:
        delivered = deliver(conn, self._targets(), self.raw, self.fields)
        for (address, patient_id, _ins), stored in zip(self.recipients, delivered, strict=True):
            ops.open_exchange(conn, patient_id, self.sender, self.name, self.reply_to)  # R2, R4
            if self.ends:  # R5: delivered, then the exchange ends and the patient is told
                ops.end_exchanges(conn, patient_id, self.sender)
                self.delivery._end_notice(conn, patient_id, stored.mailbox_id, address,
                                          self.name, self.message)
            if self.delivery.settings.notify:
                enqueue_notification(conn, patient_id, self.delivery.settings.system_sender)
        ops.audit_many(conn, self._entries([stored.uid for stored in delivered]))

    @classmethod
    def run_together(cls, conn: Connection, jobs: Sequence[Any]) -> list[Any]:
        batch: Sequence[DeliveryJob] = jobs
        entries: list[ops.AuditEntry] = []
        targets = 0  # each recipient's UID stands as its place among the batch's targets
        for job in batch:
            entries.extend(job._entries([ops.DeliveredUid(targets + k)
                                         for k in range(len(job.recipients))]))
            targets += len(job.recipients)
        deliver_many(  # and R2: the exchanges opened, and the audit rows
            conn, [(job._targets(), job.raw, job.fields) for job in batch],
            [(patient_id, job.sender, job.name) for job in batch
             for _address, patient_id, _ins in job.recipients], entries)
        notify = [job for job in batch if job.delivery.settings.notify]
        if notify:
            enqueue_notifications(conn, [pid for job in notify for _a, pid, _i in job.recipients],
                                  notify[0].delivery.settings.system_sender)
        return [None] * len(batch)

    def _targets(self) -> list[MailboxName]:
        return [MailboxName(patient_id, "INBOX") for _a, patient_id, _i in self.recipients]

    def _entries(self, uids: Sequence[int | ops.DeliveredUid]) -> list[ops.AuditEntry]:
        """Its audit rows, ``uids`` the UIDs its recipients' copies got."""
        return [*self.audit, *((self.actor, "deliver", ins,
                                {"from": self.sender, "uid": uid, "size": len(self.raw),
                                 "end_of_exchange": self.ends})
                               for (_a, _p, ins), uid in zip(self.recipients, uids,
                                                             strict=True))]
