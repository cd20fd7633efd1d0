"""Reads the facts a rule needs from the store and asks the pure rules (policy.rules).

Shared by the SMTP intake (per RCPT) and ``mssante-policy check`` so both decide alike. The
``*_sync`` functions take a synchronous connection (run in one worker-thread hop by
``Store.run_read``, or ``AsyncConnection.run_sync`` inside a transaction).
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.engine import Connection

from imap_store import ops
from policy.addresses import InvalidIdentity, domain_of
from policy.rules import (
    ContactFacts,
    Decision,
    ProfessionalFacts,
    classify_recipient,
    decide_patient_to_contact,
    decide_professional_to_patient,
    decide_relay_denied,
    refuse,
)


@dataclass(frozen=True)
class RecipientVerdict:
    decision: Decision
    patient_id: int = 0  # the recipient patient's id when the recipient is a patient
    ins: str | None = None
    #: What was read about the sending professional (kept by the session for its next RCPTs).
    sender_facts: ProfessionalFacts | None = None


def judge_professional_recipient_sync(
    conn: Connection, sender: str, recipient: str, patient_domain: str,
    sender_facts: ProfessionalFacts | None = None,
) -> RecipientVerdict:
    """R1, R8, R9 (and no open relay) for a professional's message to ``recipient``."""
    try:
        ins = classify_recipient(recipient, patient_domain)
    except InvalidIdentity as exc:
        facts = sender_facts or ops.professional_facts(conn, sender)
        return RecipientVerdict(decide_professional_to_patient(facts, None,
                                                               invalid_ins=exc.reason))
    if ins is None:
        return RecipientVerdict(decide_relay_denied())
    facts = sender_facts or ops.professional_facts(conn, sender)
    patient, patient_id = ops.patient_facts(conn, ins)
    return RecipientVerdict(decide_professional_to_patient(facts, patient), patient_id, ins,
                            facts)


def judge_patient_recipient_sync(
    conn: Connection, patient_id: int, recipient: str, patient_domain: str
) -> RecipientVerdict:
    """R3, R4, R9 for a patient's message to one recipient."""
    if domain_of(recipient) == patient_domain.lower():
        return RecipientVerdict(
            decide_patient_to_contact(ContactFacts(recipient, known=False), to_patient=True)
        )
    return RecipientVerdict(decide_patient_to_contact(
        ops.contact_facts(conn, patient_id, recipient)))


def judge_sync(conn: Connection, sender: str, recipient: str,
               patient_domain: str) -> RecipientVerdict:
    """Decide for an envelope (sender, recipient) as if ``sender`` were authenticated."""
    try:
        sender_ins = classify_recipient(sender, patient_domain)
    except InvalidIdentity as exc:
        return RecipientVerdict(
            refuse("R8", 553, "5.1.3", f"invalid patient address ({exc.reason})")
        )
    if sender_ins is None:
        return judge_professional_recipient_sync(conn, sender, recipient, patient_domain)
    facts, patient_id = ops.patient_facts(conn, sender_ins)
    if not facts.exists:
        return RecipientVerdict(refuse("R8", 550, "5.1.1", "unknown patient mailbox"))
    if facts.state.value == "closed":
        return RecipientVerdict(refuse("R8", 550, "5.2.1", "this patient mailbox is closed"))
    return judge_patient_recipient_sync(conn, patient_id, recipient, patient_domain)
