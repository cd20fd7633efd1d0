"""Asks the pure rules (policy.rules) with the facts they need, read through a
:class:`FactSource` that the store implements (``imap_store.store.ops.ConnectionFacts``).

Shared by the SMTP intake (per RCPT) and ``mssante-policy check`` so both decide alike. The
judges are synchronous: the store runs them on one of its connections.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from policy.addresses import InvalidIdentity, domain_of
from policy.rules import (
    ContactFacts,
    Decision,
    PatientFacts,
    ProfessionalFacts,
    classify_recipient,
    decide_patient_to_contact,
    decide_professional_to_patient,
    decide_relay_denied,
    refuse,
)


class FactSource(Protocol):
    """The facts of the directory the rules read (implemented by the store)."""

    def professional(self, address: str) -> ProfessionalFacts: ...

    def patient(self, ins: str) -> tuple[PatientFacts, int]:
        """The patient's facts and id (0 when unknown)."""
        ...

    def contact(self, patient_id: int, address: str) -> ContactFacts: ...

    def sender_and_patient(self, address: str,
                           ins: str) -> tuple[ProfessionalFacts, tuple[PatientFacts, int]]:
        """``professional(address)`` and ``patient(ins)`` in one lookup (an RCPT's first
        question, asked once per transaction: one round trip to the database, not two)."""
        ...


@dataclass(frozen=True)
class RecipientVerdict:
    decision: Decision
    patient_id: int = 0  # the recipient patient's id when the recipient is a patient
    ins: str | None = None
    #: What was read about the sending professional (kept by the session for its next RCPTs).
    sender_facts: ProfessionalFacts | None = None


def judge_professional_recipient(
    source: FactSource, sender: str, recipient: str, patient_domain: str,
    sender_facts: ProfessionalFacts | None = None,
) -> RecipientVerdict:
    """R1, R8, R9 (and no open relay) for a professional's message to ``recipient``."""
    try:
        ins = classify_recipient(recipient, patient_domain)
    except InvalidIdentity as exc:
        facts = sender_facts or source.professional(sender)
        return RecipientVerdict(decide_professional_to_patient(facts, None,
                                                               invalid_ins=exc.reason))
    if ins is None:
        return RecipientVerdict(decide_relay_denied())
    if sender_facts is None:
        facts, (patient, patient_id) = source.sender_and_patient(sender, ins)
    else:
        facts = sender_facts
        patient, patient_id = source.patient(ins)
    return RecipientVerdict(decide_professional_to_patient(facts, patient), patient_id, ins,
                            facts)


def judge_patient_recipient(
    source: FactSource, patient_id: int, recipient: str, patient_domain: str
) -> RecipientVerdict:
    """R3, R4, R9 for a patient's message to one recipient."""
    if domain_of(recipient) == patient_domain.lower():
        return RecipientVerdict(
            decide_patient_to_contact(ContactFacts(recipient, known=False), to_patient=True)
        )
    return RecipientVerdict(decide_patient_to_contact(
        source.contact(patient_id, recipient)))


def judge(source: FactSource, sender: str, recipient: str,
               patient_domain: str) -> RecipientVerdict:
    """Decide for an envelope (sender, recipient) as if ``sender`` were authenticated."""
    try:
        sender_ins = classify_recipient(sender, patient_domain)
    except InvalidIdentity as exc:
        return RecipientVerdict(
            refuse("R8", 553, "5.1.3", f"invalid patient address ({exc.reason})")
        )
    if sender_ins is None:
        return judge_professional_recipient(source, sender, recipient, patient_domain)
    facts, patient_id = source.patient(sender_ins)
    if not facts.exists:
        return RecipientVerdict(refuse("R8", 550, "5.1.1", "unknown patient mailbox"))
    if facts.state.value == "closed":
        return RecipientVerdict(refuse("R8", 550, "5.2.1", "this patient mailbox is closed"))
    return judge_patient_recipient(source, patient_id, recipient, patient_domain)
