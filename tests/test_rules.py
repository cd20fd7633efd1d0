"""R1-R10 as pure decisions (SPEC §3): every rule allowed and refused, table-driven."""

from __future__ import annotations

import pytest

from policy.rules import (
    MAX_INBOUND_SIZE,
    ContactFacts,
    Decision,
    Identity,
    MailboxState,
    PatientFacts,
    ProfessionalFacts,
    Role,
    classify_recipient,
    decide_from_header,
    decide_mail_from,
    decide_patient_message,
    decide_patient_to_contact,
    decide_professional_to_patient,
    decide_relay_denied,
    decide_size,
    is_end_of_exchange,
)

PRO = "marie.chanteau@medecin.mssante.fr"
ACTIVE = ProfessionalFacts(PRO, in_directory=True, active=True, trusted_domain=True)
SUSPENDED = ProfessionalFacts(PRO, in_directory=True, active=False, trusted_domain=True)
UNKNOWN = ProfessionalFacts(PRO, in_directory=False, active=False, trusted_domain=True)
UNTRUSTED = ProfessionalFacts(PRO, in_directory=True, active=True, trusted_domain=False)
OPEN = PatientFacts("289057512345621", exists=True)
CLOSED = PatientFacts("289057512345621", exists=True, state=MailboxState.CLOSED)
NOBODY = PatientFacts("289057512345621", exists=False)


def expect(d: Decision, allowed: bool, rule: str, code: int, enhanced: str) -> None:
    assert (d.allowed, d.rule, d.smtp_code, d.enhanced_code) == (allowed, rule, code, enhanced)
    assert d.text.startswith(f"{rule}: ")
    assert d.reply.startswith(f"{code} {enhanced} {rule}: ")
    assert d.reply.isascii()


@pytest.mark.parametrize(
    ("sender", "patient", "invalid", "expected"),
    [
        (ACTIVE, OPEN, None, (True, "R1", 250, "2.1.5")),
        (UNKNOWN, OPEN, None, (False, "R1", 550, "5.7.1")),
        (UNTRUSTED, OPEN, None, (False, "R1", 550, "5.7.1")),
        (SUSPENDED, OPEN, None, (False, "R9", 550, "5.7.1")),
        (ACTIVE, NOBODY, None, (False, "R8", 550, "5.1.1")),
        (ACTIVE, CLOSED, None, (False, "R8", 550, "5.2.1")),
        (ACTIVE, None, "the INS key does not match", (False, "R8", 553, "5.1.3")),
    ],
)
def test_professional_to_patient(
    sender: ProfessionalFacts, patient: PatientFacts | None, invalid: str | None,
    expected: tuple[bool, str, int, str],
) -> None:
    expect(decide_professional_to_patient(sender, patient, invalid), *expected)


def test_invalid_ins_reason_in_reply() -> None:
    d = decide_professional_to_patient(ACTIVE, None, "the INS key does not match")
    assert "INS key does not match" in d.text


@pytest.mark.parametrize(
    ("contact", "to_patient", "expected"),
    [
        (ContactFacts(PRO, known=True, exchange_open=True), False, (True, "R3", 250, "2.1.5")),
        (ContactFacts(PRO, known=False), False, (False, "R3", 550, "5.7.1")),
        (ContactFacts(PRO, known=True, exchange_open=False), False, (False, "R3", 550, "5.7.1")),
        (ContactFacts(PRO, known=True, exchange_open=True, owner_active=False), False,
         (False, "R9", 550, "5.7.1")),
        (ContactFacts(PRO, known=True, exchange_open=True, recipient_active=False), False,
         (False, "R9", 550, "5.7.1")),
        (ContactFacts("x@patient.mssante.fr", known=False), True, (False, "R3", 550, "5.7.1")),
    ],
)
def test_patient_to_contact(
    contact: ContactFacts, to_patient: bool, expected: tuple[bool, str, int, str]
) -> None:
    expect(decide_patient_to_contact(contact, to_patient=to_patient), *expected)


def test_ended_exchange_says_so() -> None:
    d = decide_patient_to_contact(ContactFacts(PRO, known=True, exchange_open=False))
    assert "ended" in d.text


OPERATOR = Identity(Role.OPERATOR, domains=frozenset({"medecin.mssante.fr"}))
PATIENT = Identity(Role.PATIENT, address="289057512345621@patient.mssante.fr")
PROFESSIONAL = Identity(Role.PROFESSIONAL, address=PRO)
TRUSTED = ["medecin.mssante.fr", "ch-exemple.mssante.fr"]


@pytest.mark.parametrize(
    ("identity", "mail_from", "expected"),
    [
        (None, PRO, (False, "auth", 530, "5.7.0")),
        (PROFESSIONAL, PRO, (True, "R10", 250, "2.1.5")),
        (PROFESSIONAL, PRO.upper(), (True, "R10", 250, "2.1.5")),
        (PROFESSIONAL, "paul.dupond@ch-exemple.mssante.fr", (False, "R10", 550, "5.7.1")),
        (PATIENT, "289057512345621@patient.mssante.fr", (True, "R10", 250, "2.1.5")),
        (PATIENT, "262112A04501213@patient.mssante.fr", (False, "R10", 550, "5.7.1")),
        (OPERATOR, "anyone@medecin.mssante.fr", (True, "R10", 250, "2.1.5")),
        (OPERATOR, "paul.dupond@ch-exemple.mssante.fr", (False, "R10", 550, "5.7.1")),
        (Identity(Role.OPERATOR, domains=frozenset({"evil.example"})), "x@evil.example",
         (False, "R10", 550, "5.7.1")),
    ],
)
def test_mail_from(
    identity: Identity | None, mail_from: str, expected: tuple[bool, str, int, str]
) -> None:
    expect(decide_mail_from(identity, mail_from, TRUSTED), *expected)


@pytest.mark.parametrize(
    ("envelope", "header", "allowed"),
    [
        (PRO, [PRO], True),
        (PRO, [PRO.upper()], True),
        (PRO, ["paul.dupond@ch-exemple.mssante.fr"], False),
        (PRO, [], False),
        (PRO, [PRO, "paul.dupond@ch-exemple.mssante.fr"], False),
    ],
)
def test_from_header_r10(envelope: str, header: list[str], allowed: bool) -> None:
    d = decide_from_header(envelope, header)
    assert d.allowed is allowed and d.rule == "R10"
    if not allowed:
        assert (d.smtp_code, d.enhanced_code) == (550, "5.7.1")


@pytest.mark.parametrize(
    ("size", "allowed"), [(1, True), (MAX_INBOUND_SIZE, True), (MAX_INBOUND_SIZE + 1, False)]
)
def test_size_r7(size: int, allowed: bool) -> None:
    d = decide_size(size)
    assert d.allowed is allowed and d.rule == "R7"
    if not allowed:
        assert (d.smtp_code, d.enhanced_code) == (552, "5.3.4")
    assert MAX_INBOUND_SIZE == 26214400


@pytest.mark.parametrize(
    ("mes", "subject", "ends"),
    [
        ("FIN", "Suivi", True),
        (" fin ", None, True),
        (None, "[FIN] Fin de suivi", True),
        (None, "[fin] fin", True),
        (None, "Re: [FIN] x", False),
        ("AUTRE", "Suivi", False),
        (None, None, False),
    ],
)
def test_end_of_exchange_r5(mes: str | None, subject: str | None, ends: bool) -> None:
    assert is_end_of_exchange(mes, subject) is ends


@pytest.mark.parametrize(
    ("subject_len", "new", "attachments", "expected"),
    [
        (80, True, 0, (True, "R6", 250, "2.1.5")),
        (81, True, 0, (False, "R6", 550, "5.7.1")),
        (150, False, 0, (True, "R6", 250, "2.1.5")),  # a reply keeps the conversation subject
        (10, True, 10_000_000, (True, "R6", 250, "2.1.5")),
        (10, True, 11_000_000, (False, "R6", 552, "5.3.4")),
    ],
)
def test_patient_message_r6(
    subject_len: int, new: bool, attachments: int, expected: tuple[bool, str, int, str]
) -> None:
    expect(decide_patient_message("é" * subject_len, new, attachments), *expected)


def test_relay_denied() -> None:
    d = decide_relay_denied()
    assert not d.allowed and (d.smtp_code, d.enhanced_code) == (550, "5.7.1")


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("289057512345621@patient.mssante.fr", "289057512345621"),
        ("262112a04501213@PATIENT.mssante.fr", "262112A04501213"),
        (PRO, None),
    ],
)
def test_classify_recipient(address: str, expected: str | None) -> None:
    assert classify_recipient(address, "patient.mssante.fr") == expected


def test_decision_as_dict_is_every_field() -> None:
    """``Decision.as_dict`` is written out for speed: it must stay what ``asdict`` gives
    (a field added to Decision and not to as_dict would vanish from the audit rows)."""
    from dataclasses import asdict

    from policy.rules import allow, refuse

    for decision in (allow("R1"), refuse("R5", 550, "5.7.1", "exchange ended")):
        assert decision.as_dict() == asdict(decision)
