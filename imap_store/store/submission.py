"""A patient's message to professionals (SPEC §6.1), one path for every edge that takes one
(SMTP submission, the portal): R3/R4/R9 per recipient, R10 (``From:``) and R6 (subject of a new
conversation, attachments) on the message, then one transaction that files the copy in
``Sent``, queues one relay per recipient and writes the audit rows."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sqlalchemy import and_, select
from sqlalchemy.engine import Connection

from imap_store.mime import MessageInfo
from imap_store.store import ops
from imap_store.store import schema as t
from imap_store.store.deliver import MailboxName, deliver
from imap_store.store.directory import Store
from imap_store.store.outbound import enqueue_relay
from imap_store.store.sent_copies import SENT
from imap_store.store.writer import GroupWriter
from policy.engine import RecipientVerdict, judge_patient_recipient
from policy.rules import (
    Decision,
    Identity,
    decide_from_header,
    decide_patient_message,
    refuse,
)


def in_mailbox(conn: Connection, patient_id: int, message_id: str) -> bool:
    """Whether a message with this Message-ID is in one of the patient's mailboxes."""
    row = conn.execute(
        select(t.message.c.id)
        .join(t.mailbox, t.mailbox.c.id == t.message.c.mailbox_id)
        .where(and_(t.mailbox.c.patient_id == patient_id,
                    t.message.c.message_id == message_id[:998]))
        .limit(1)
    ).first()
    return row is not None


async def check_patient_message(store: Store, patient_id: int, mail_from: str,
                                from_addrs: Sequence[str], info: MessageInfo) -> Decision:
    """R10 (``From:`` is the patient) and R6 (subject of a new conversation, attachments)."""
    decision = decide_from_header(mail_from, from_addrs)
    if not decision.allowed:
        return decision
    starts = True
    if info.in_reply_to:
        starts = not await store.run_read(in_mailbox, patient_id, info.in_reply_to)
    return decide_patient_message(info.subject, starts, info.attachments_total_size)


def patient_job(identity: Identity, mail_from: str, recipients: Sequence[str], raw: bytes,
                info: MessageInfo, audit: Sequence[ops.AuditEntry] = ()
                ) -> Callable[[Connection], None]:
    """Copy in Sent and one queued relay per recipient, in one transaction, run by the group
    writer; ``audit`` holds the caller's entries not yet written (its recipient decisions)."""
    patient_id = identity.account_id

    def run(conn: Connection) -> None:
        stored = deliver(conn, [MailboxName(patient_id, SENT)], raw, info,
                         flags=t.FLAG_SEEN)[0]
        for recipient in recipients:
            enqueue_relay(conn, patient_id, mail_from, recipient, stored.blob_id)
        ops.audit_many(conn, [*audit, (identity.describe(), "submit", ",".join(recipients),
                                       {"uid": stored.uid, "size": len(raw)})])

    return run


@dataclass(frozen=True)
class Submitted:
    """The outcome of :func:`submit`: ``refusal`` is None when the message was queued."""

    refusal: Decision | None
    refused_recipients: tuple[tuple[str, Decision], ...] = ()


async def submit(store: Store, writer: GroupWriter, identity: Identity, patient_domain: str,
                 recipients: Sequence[str], raw: bytes, info: MessageInfo,
                 from_addrs: Sequence[str]) -> Submitted:
    """The whole path at once (the portal): every recipient must be allowed, then the message
    checks, then the transaction. Every decision is audited."""
    mail_from = identity.address or ""
    actor = identity.describe()
    if not recipients:
        return Submitted(refuse("R3", 550, "5.7.1", "no recipient"))
    verdicts: list[tuple[str, RecipientVerdict]] = []
    for recipient in recipients:
        verdict = await store.read_inline(ops.with_facts, judge_patient_recipient,
                                          identity.account_id, recipient.lower(),
                                          patient_domain)
        verdicts.append((recipient, verdict))
    entries: list[ops.AuditEntry] = [(actor, "rcpt", r, v.decision.as_dict())
                                     for r, v in verdicts]
    refused = tuple((r, v.decision) for r, v in verdicts if not v.decision.allowed)
    if refused:
        writer.audit_many_later(entries)
        return Submitted(refused[0][1], refused)
    decision = await check_patient_message(store, identity.account_id, mail_from, from_addrs,
                                           info)
    if not decision.allowed:
        writer.audit_many_later([*entries, (actor, "refuse", mail_from, decision.as_dict())])
        return Submitted(decision)
    await writer.submit_sync(patient_job(identity, mail_from, recipients, raw, info, entries),
                             size=len(raw))
    return Submitted(None)
