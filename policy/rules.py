"""The health rules R1-R10 of SPEC §3 as pure decisions over facts read from the store.

Nothing here does I/O: callers (SMTP intake, the admin CLI ``check``) read the facts, call a
``decide_*`` function and turn the :class:`Decision` into a reply. Every decision is audited
by the caller.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

from policy.addresses import InvalidIdentity, domain_of, validate_ins

#: R7 - a message to patients is at most 25 MiB; advertised as ``SIZE 26214400``.
MAX_INBOUND_SIZE = 25 * 1024 * 1024
#: R6 - a patient's new conversation has a subject of at most 80 characters.
MAX_PATIENT_SUBJECT = 80
#: R6 - a patient's attachments are at most 10 MB in total, decoded (10,000,000 bytes).
MAX_PATIENT_ATTACHMENTS = 10_000_000
#: RFC 5322 §3.6: header fields a message has at most once (lower case -> as named in a
#: refusal). Two ``From:`` would let the second escape R10 while clients show and answer both.
UNIQUE_FIELDS: dict[str, str] = {
    "from": "From", "sender": "Sender", "reply-to": "Reply-To", "to": "To",
    "subject": "Subject", "message-id": "Message-ID", "in-reply-to": "In-Reply-To",
    "date": "Date",
}


@dataclass(frozen=True)
class Decision:
    """Outcome of one rule check; ``smtp_code``/``enhanced_code`` map it onto the wire."""

    allowed: bool
    rule: str
    smtp_code: int
    enhanced_code: str
    text: str

    @property
    def reply(self) -> str:
        """The SMTP reply line (RFC 3463 enhanced code, rule named in the text)."""
        return f"{self.smtp_code} {self.enhanced_code} {self.text}"

    def as_dict(self) -> dict[str, object]:
        # What dataclasses.asdict gives, written out: it is on every RCPT's audit row, and
        # asdict's generic deep copy cost more than the RCPT's lookup (profiled).
        return {"allowed": self.allowed, "rule": self.rule, "smtp_code": self.smtp_code,
                "enhanced_code": self.enhanced_code, "text": self.text}


def allow(rule: str, text: str = "accepted") -> Decision:
    return Decision(True, rule, 250, "2.1.5", f"{rule}: {text}")


def refuse(rule: str, code: int, enhanced: str, text: str) -> Decision:
    return Decision(False, rule, code, enhanced, f"{rule}: {text}")


class Role(enum.Enum):
    PROFESSIONAL = "professional"
    OPERATOR = "operator"
    PATIENT = "patient"


@dataclass(frozen=True)
class Identity:
    """Who is sending, as authenticated (SPEC §4.2): never derived from the port."""

    role: Role
    address: str | None = None  # professional or patient address
    domains: frozenset[str] = frozenset()  # operator: the dNSName SANs of its certificate
    account_id: int = 0  # patient or professional row id, when known
    name: str = ""  # display name from the directory

    def describe(self) -> str:
        if self.role is Role.OPERATOR:
            return "operator " + ",".join(sorted(self.domains))
        return f"{self.role.value} {self.address}"


@dataclass(frozen=True)
class ProfessionalFacts:
    """A sender or recipient professional, as the directory and the whitelist know it."""

    address: str
    in_directory: bool
    active: bool
    trusted_domain: bool
    name: str = ""


class MailboxState(enum.Enum):
    OPEN = "open"
    CLOSED = "closed"


@dataclass(frozen=True)
class PatientFacts:
    """A recipient patient address; ``exists`` False when the INS is not known here."""

    ins: str
    exists: bool
    state: MailboxState = MailboxState.OPEN


@dataclass(frozen=True)
class ContactFacts:
    """What a patient's mailbox knows of a recipient they write to (R3, R4, R9).

    ``exchange_open`` is the state of the exchange that makes the address reachable: the
    professional's own exchange, or for a Reply-To address (R4) the exchange of the
    professional whose message named it. ``owner_active`` is that professional's state;
    ``recipient_active`` the recipient's own directory state when it is a directory entry.
    """

    address: str
    known: bool
    exchange_open: bool = False
    owner_active: bool = True
    recipient_active: bool = True
    owner_name: str = ""


# --- envelope ---------------------------------------------------------------------------


def decide_mail_from(
    identity: Identity | None, mail_from: str, trusted_domains: Iterable[str]
) -> Decision:
    """R10 at MAIL: the envelope sender is the authenticated identity.

    An operator relay (dNSName certificate) may use any address in a domain it serves that is
    also a trusted domain. Unauthenticated senders get ``530 5.7.0`` (SPEC §4.2).
    """
    if identity is None:
        return refuse("auth", 530, "5.7.0", "authentication required")
    sender = mail_from.lower()
    if identity.role is Role.OPERATOR:
        domain = domain_of(sender)
        trusted = {d.lower() for d in trusted_domains}
        if domain in identity.domains and domain in trusted:
            return allow("R10", "sender accepted")
        return refuse(
            "R10", 550, "5.7.1", "sender domain is not served by this operator or not trusted"
        )
    if sender != (identity.address or "").lower():
        return refuse("R10", 550, "5.7.1", "envelope sender must be your own address")
    return allow("R10", "sender accepted")


def classify_recipient(address: str, patient_domain: str) -> str | None:
    """Return the INS when ``address`` is in the patient domain (may raise InvalidIdentity)."""
    local, _, domain = address.rpartition("@")
    if domain.lower() != patient_domain.lower():
        return None
    return validate_ins(local)


def decide_professional_to_patient(
    sender: ProfessionalFacts, patient: PatientFacts | None, invalid_ins: str | None = None
) -> Decision:
    """R1, R8, R9 for a message from a professional to a patient address (at RCPT).

    ``invalid_ins`` carries the reason when the recipient's INS has a wrong shape or key.
    """
    if not sender.in_directory or not sender.trusted_domain:
        return refuse(
            "R1", 550, "5.7.1", "only a professional of the directory may write to patients"
        )
    if not sender.active:
        return refuse("R9", 550, "5.7.1", "this professional is suspended")
    if invalid_ins is not None or patient is None:
        return refuse("R8", 553, "5.1.3", f"invalid patient address ({invalid_ins or 'bad INS'})")
    if not patient.exists:
        return refuse("R8", 550, "5.1.1", "unknown patient mailbox")
    if patient.state is MailboxState.CLOSED:
        return refuse("R8", 550, "5.2.1", "this patient mailbox is closed")
    return allow("R1", "professional may write to this patient")


def decide_patient_to_contact(contact: ContactFacts, *, to_patient: bool = False) -> Decision:
    """R3, R4, R9 for a patient's message to one recipient (each recipient judged alone)."""
    if to_patient:
        return refuse("R3", 550, "5.7.1", "patients may write only to professionals")
    if not contact.known:
        return refuse("R3", 550, "5.7.1", "you may only answer professionals who wrote to you")
    if not contact.owner_active or not contact.recipient_active:
        return refuse("R9", 550, "5.7.1", "this professional is suspended")
    if not contact.exchange_open:
        return refuse("R3", 550, "5.7.1", "this professional has ended the exchange")
    return allow("R3", "open exchange")


def decide_relay_denied() -> Decision:
    """A professional's mail to an address that is not a patient here: we are no open relay."""
    return refuse("relay", 550, "5.7.1", "relaying denied: not a patient address of this service")


# --- message -----------------------------------------------------------------------------


def decide_size(size: int, limit: int = MAX_INBOUND_SIZE) -> Decision:
    """R7: messages to patients are at most 25 MiB (RFC 1870 SIZE)."""
    if size > limit:
        return refuse("R7", 552, "5.3.4", f"message too big (limit {limit} bytes)")
    return allow("R7", "size accepted")


def decide_from_header(envelope_sender: str, from_header: Iterable[str]) -> Decision:
    """R10 at DATA: the ``From:`` header is exactly the envelope sender."""
    addresses = [a.lower() for a in from_header]
    if addresses != [envelope_sender.lower()]:
        return refuse("R10", 550, "5.7.1", "the From: header must be the envelope sender")
    return allow("R10", "From: matches the sender")


def decide_unique_fields(names: Iterable[str]) -> Decision:
    """RFC 5322 §3.6 at DATA: refuse a message whose top-level header has one of
    :data:`UNIQUE_FIELDS` more than once (``names``: its field names in order, any case)."""
    seen: set[str] = set()
    repeated: list[str] = []
    for name in names:
        lower = name.strip().lower()
        if lower not in UNIQUE_FIELDS:
            continue
        if lower in seen and UNIQUE_FIELDS[lower] not in repeated:
            repeated.append(UNIQUE_FIELDS[lower])
        seen.add(lower)
    if repeated:
        fields = ", ".join(f"{name}:" for name in repeated)
        return refuse("RFC5322", 554, "5.6.0",
                      f"more than one {fields} header field (RFC 5322 3.6)")
    return allow("RFC5322", "header fields accepted")


def is_end_of_exchange(x_mss_mes: str | None, subject: str | None) -> bool:
    """R5: ``X-MSS-MES: FIN`` (preferred) or a subject starting with ``[FIN]``."""
    if x_mss_mes is not None and x_mss_mes.strip().upper() == "FIN":
        return True
    return subject is not None and subject.lstrip().upper().startswith("[FIN]")


def decide_patient_message(
    subject: str, starts_conversation: bool, attachments_total: int
) -> Decision:
    """R6: subject length for new conversations, decoded attachment total."""
    if starts_conversation and len(subject) > MAX_PATIENT_SUBJECT:
        return refuse(
            "R6", 550, "5.7.1",
            f"subject too long for a new conversation ({len(subject)} > {MAX_PATIENT_SUBJECT})",
        )
    if attachments_total > MAX_PATIENT_ATTACHMENTS:
        return refuse(
            "R6", 552, "5.3.4",
            f"attachments too large ({attachments_total} > {MAX_PATIENT_ATTACHMENTS} bytes)",
        )
    return allow("R6", "message accepted")


__all__ = [
    "MAX_INBOUND_SIZE",
    "UNIQUE_FIELDS",
    "ContactFacts",
    "Decision",
    "Identity",
    "InvalidIdentity",
    "MailboxState",
    "PatientFacts",
    "ProfessionalFacts",
    "Role",
    "classify_recipient",
    "decide_from_header",
    "decide_mail_from",
    "decide_patient_message",
    "decide_patient_to_contact",
    "decide_professional_to_patient",
    "decide_relay_denied",
    "decide_size",
    "decide_unique_fields",
    "is_end_of_exchange",
]
