"""Properties of the pure rules R1-R10 (policy/rules.py), on arbitrary facts and strings.

Every ``decide_*`` function returns a :class:`Decision` and never raises; ``classify_recipient``
raises only :class:`InvalidIdentity`. A refusal always carries what the SMTP edge puts on the
wire: a 4xx/5xx code, an RFC 3463 enhanced code of the same class, the rule's name (R1..R10,
or the two gates that are not rules of SPEC §3: ``auth``, SPEC §4.2, and ``relay``) at the
start of its text, and a reply line with no CR/LF (the text names no client input).
"""

from __future__ import annotations

import json
import re

from hypothesis import given, settings
from hypothesis import strategies as st

from policy import rules
from policy.addresses import InvalidIdentity

RULES = {f"R{n}" for n in range(1, 11)}
#: Decisions that are not rules of SPEC §3: authentication (SPEC §4.2) and the relay gate.
GATES = {"auth", "relay"}
PATIENT_DOMAIN = "patient.mssante.fr"
_ENHANCED = re.compile(r"([245])\.[0-9]{1,3}\.[0-9]{1,3}")

#: No example database (no .hypothesis/ folder in the checkout), no deadline (shared CI).
PROPERTIES = settings(max_examples=300, deadline=None, database=None)

texts = st.one_of(
    st.text(max_size=60),
    st.emails().map(str),
    st.text("0123456789AB@.-\r\n\x00 ", max_size=40),
    st.sampled_from(["289057512345621", f"289057512345621@{PATIENT_DOMAIN}",
                     f"18503٧٥12345641@{PATIENT_DOMAIN}", "a.bc\n.", "[FIN] x", " fin "]),
)
identities = st.one_of(st.none(), st.builds(
    rules.Identity,
    role=st.sampled_from(rules.Role),
    address=st.one_of(st.none(), texts),
    domains=st.frozensets(texts, max_size=3),
    account_id=st.integers(),
    name=st.text(max_size=20),
))
professionals = st.builds(rules.ProfessionalFacts, address=texts, in_directory=st.booleans(),
                          active=st.booleans(), trusted_domain=st.booleans(),
                          name=st.text(max_size=20))
patients = st.one_of(st.none(), st.builds(rules.PatientFacts, ins=texts, exists=st.booleans(),
                                          state=st.sampled_from(rules.MailboxState)))
contacts = st.builds(rules.ContactFacts, address=texts, known=st.booleans(),
                     exchange_open=st.booleans(), owner_active=st.booleans(),
                     recipient_active=st.booleans(), owner_name=st.text(max_size=20))
sizes = st.one_of(st.integers(),
                  st.integers(rules.MAX_INBOUND_SIZE - 2, rules.MAX_INBOUND_SIZE + 2))


def check(decision: rules.Decision, names: set[str]) -> None:
    """What every decision must carry onto the wire."""
    assert isinstance(decision, rules.Decision)
    assert decision.rule in names, decision
    assert decision.text.startswith(decision.rule + ": ")
    reply = decision.reply
    assert "\r" not in reply and "\n" not in reply and reply.isascii() and reply.isprintable()
    match = _ENHANCED.fullmatch(decision.enhanced_code)
    assert match is not None, decision
    if decision.allowed:
        assert decision.smtp_code == 250 and match[1] == "2"
    else:
        assert 400 <= decision.smtp_code <= 599, decision
        assert match[1] == str(decision.smtp_code)[0], decision  # RFC 3463 §3.1: same class
    json.dumps(decision.as_dict())


def invalid_ins_reason(recipient: str) -> str | None:
    """What the SMTP edge passes as ``invalid_ins``: the reason classify_recipient gives."""
    try:
        rules.classify_recipient(recipient, PATIENT_DOMAIN)
    except InvalidIdentity as exc:
        return exc.reason
    return None


@PROPERTIES
@given(identities, texts, st.lists(texts, max_size=4))
def test_mail_from_r10(identity: rules.Identity | None, mail_from: str, trusted: list[str]) -> None:
    check(rules.decide_mail_from(identity, mail_from, trusted), {"R10", "auth"})


@PROPERTIES
@given(texts, texts)
def test_classify_recipient_raises_only_invalid_identity(address: str, domain: str) -> None:
    try:
        ins = rules.classify_recipient(address, domain)
    except InvalidIdentity as exc:
        assert exc.reason.isascii() and exc.reason.isprintable()
        return
    if ins is not None:  # an INS: ASCII digits (2A/2B), 15 characters
        assert re.fullmatch(r"[12][0-9]{4}(?:[0-9]{2}|2A|2B)[0-9]{8}", ins), ins


@PROPERTIES
@given(professionals, patients, texts)
def test_professional_to_patient_r1_r8_r9(sender: rules.ProfessionalFacts,
                                          patient: rules.PatientFacts | None,
                                          recipient: str) -> None:
    decision = rules.decide_professional_to_patient(sender, patient, invalid_ins_reason(recipient))
    check(decision, RULES)
    if decision.allowed:
        assert sender.in_directory and sender.trusted_domain and sender.active
        assert patient is not None and patient.exists and patient.state is rules.MailboxState.OPEN


@PROPERTIES
@given(contacts, st.booleans())
def test_patient_to_contact_r3_r9(contact: rules.ContactFacts, to_patient: bool) -> None:
    decision = rules.decide_patient_to_contact(contact, to_patient=to_patient)
    check(decision, RULES)
    assert decision.allowed == (not to_patient and contact.known and contact.exchange_open
                                and contact.owner_active and contact.recipient_active)


def test_relay_denied() -> None:
    decision = rules.decide_relay_denied()
    check(decision, GATES)
    assert not decision.allowed


@PROPERTIES
@given(sizes, st.one_of(st.just(rules.MAX_INBOUND_SIZE), st.integers(0, 2**40)))
def test_size_r7(size: int, limit: int) -> None:
    decision = rules.decide_size(size, limit)
    check(decision, {"R7"})
    assert decision.allowed == (size <= limit)


@PROPERTIES
@given(texts, st.lists(texts, max_size=3))
def test_from_header_r10(sender: str, from_header: list[str]) -> None:
    decision = rules.decide_from_header(sender, from_header)
    check(decision, {"R10"})
    assert decision.allowed == ([a.lower() for a in from_header] == [sender.lower()])


@PROPERTIES
@given(st.one_of(st.none(), texts), st.one_of(st.none(), texts))
def test_end_of_exchange_r5(x_mss_mes: str | None, subject: str | None) -> None:
    assert isinstance(rules.is_end_of_exchange(x_mss_mes, subject), bool)


@PROPERTIES
@given(st.one_of(texts, st.text(min_size=rules.MAX_PATIENT_SUBJECT - 1,
                                 max_size=rules.MAX_PATIENT_SUBJECT + 1)),
       st.booleans(), st.one_of(st.integers(), st.just(rules.MAX_PATIENT_ATTACHMENTS)))
def test_patient_message_r6(subject: str, starts: bool, attachments_total: int) -> None:
    decision = rules.decide_patient_message(subject, starts, attachments_total)
    check(decision, {"R6"})
    assert decision.allowed == (not (starts and len(subject) > rules.MAX_PATIENT_SUBJECT)
                                and attachments_total <= rules.MAX_PATIENT_ATTACHMENTS)
