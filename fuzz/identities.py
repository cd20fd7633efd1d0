"""Identities read from clients (policy/addresses.py, policy/rules.py, policy/authn.py).

Addresses, domains, INS, RPPS, phone numbers, patient logins and recipient classification get
arbitrary text (other scripts' digits, control characters, final newlines...). Checks:

* only :class:`~policy.addresses.InvalidIdentity` may be raised;
* what is accepted has the documented shape: ASCII digits (and 2A/2B) with the right key for an
  INS, eleven ASCII digits for an RPPS, no blank or control character in an address, LDH labels
  for a domain, and normalising twice gives the same result;
* the linear time budget (fuzz.common).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import cast

from hypothesis import strategies as st

from fuzz.common import Finding, Harness, short
from policy.addresses import (
    InvalidIdentity,
    ins_key,
    normalize_address,
    normalize_domain,
    normalize_phone,
    parse_patient_login,
    validate_ins,
    validate_rpps,
)
from policy.authn import Authenticator
from policy.rules import classify_recipient

PATIENT_DOMAIN = "patient.mssante.fr"
_INS = re.compile(r"[12][0-9]{4}(?:[0-9]{2}|2A|2B)[0-9]{8}")
_DOMAIN = re.compile(r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)+")
_AUTHENTICATOR = Authenticator(cast("object", None), cast("object", None),  # type: ignore[arg-type]
                               PATIENT_DOMAIN)


def _check_ins(ins: str, what: str) -> None:
    if _INS.fullmatch(ins) is None or int(ins[13:]) != ins_key(ins[:13]):
        raise Finding("accepted", f"{what} accepted the INS {short(ins)}")


def _check_address(address: str) -> None:
    local, _, domain = address.rpartition("@")
    if (not local or len(address) > 254 or _DOMAIN.fullmatch(domain) is None
            or any(c.isspace() or ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in local)):
        raise Finding("accepted", f"normalize_address accepted {short(address)}")
    if normalize_address(address) != address:
        raise Finding("idempotence", f"normalize_address({short(address)}) changes it again")


def _check_domain(domain: str) -> None:
    if _DOMAIN.fullmatch(domain) is None or len(domain) > 253:
        raise Finding("accepted", f"normalize_domain accepted {short(domain)}")
    if normalize_domain(domain) != domain:
        raise Finding("idempotence", f"normalize_domain({short(domain)}) changes it again")


def _checks(text: str) -> list[tuple[str, Callable[[], None]]]:
    def ins() -> None:
        _check_ins(validate_ins(text), "validate_ins")

    def login() -> None:
        _check_ins(parse_patient_login(text, PATIENT_DOMAIN), "parse_patient_login")

    def recipient() -> None:
        found = classify_recipient(text, PATIENT_DOMAIN)
        if found is not None:
            _check_ins(found, "classify_recipient")

    def rpps() -> None:
        value = validate_rpps(text)
        if not re.fullmatch(r"[0-9]{11}", value):
            raise Finding("accepted", f"validate_rpps accepted {short(value)}")

    def phone() -> None:
        value = normalize_phone(text)
        if not re.fullmatch(r"\+?[0-9]{6,15}", value):
            raise Finding("accepted", f"normalize_phone accepted {short(value)}")

    def account_key() -> None:
        key = _AUTHENTICATOR.account_key(text)
        if key.startswith("ins:"):
            _check_ins(key[4:], "account_key")

    def nir_key() -> None:
        key = ins_key(text)
        if not 1 <= key <= 97:
            raise Finding("accepted", f"ins_key({short(text)}) = {key}")

    return [
        ("validate_ins", ins),
        ("parse_patient_login", login),
        ("classify_recipient", recipient),
        ("validate_rpps", rpps),
        ("normalize_phone", phone),
        ("account_key", account_key),
        ("ins_key", nir_key),
        ("normalize_address", lambda: _check_address(normalize_address(text))),
        ("normalize_domain", lambda: _check_domain(normalize_domain(text))),
    ]


def _target(payload: bytes, control: int) -> object:
    text = payload.decode("utf-8", "replace")
    for _name, check in _checks(text):
        try:
            check()
        except (InvalidIdentity, Finding):
            pass
    return None


def _run(payload: bytes, control: int) -> None:
    text = payload.decode("utf-8", "replace")
    for name, check in _checks(text):
        try:
            check()
        except InvalidIdentity:
            pass
        except Finding:
            raise
        except Exception as exc:
            raise Finding("crash", f"{name}({short(text)}) raised {type(exc).__name__}: {exc}") \
                from exc


# -- inputs

#: Digits of other scripts: str.isdigit() and int() accept many of them.
_FOREIGN_DIGITS = "٠١٢٣٤٥٦٧٨٩۰۱۲۳۴۵۶۷۸۹०१२३४५६७८९０１２３４５６７８９⁰¹²³⁴⁵⁶⁷⁸⁹₀₁₂₃₄₅₆₇₈₉𝟎𝟏"
_ALPHABET = ("0123456789" * 4 + "2AB@.-+ aZ_\"<>()[],;:\\\x00\x01\t\n\r\x7f\x85\xa0\u2028é"
             + _FOREIGN_DIGITS)


def _with_key(nir: str) -> str:
    number = nir[:5] + {"2A": "19", "2B": "18"}.get(nir[5:7], nir[5:7]) + nir[7:]
    return nir + f"{97 - int(number) % 97:02d}"


@st.composite
def _near_valid(draw: st.DrawFn) -> str:
    """A valid INS, address or domain, then a few characters replaced or added."""
    kind = draw(st.integers(0, 3))
    if kind == 0:
        nir = draw(st.sampled_from("12")) + draw(st.text("0123456789", min_size=4, max_size=4))
        nir += draw(st.sampled_from(["2A", "2B", "75", "99"]))
        text = _with_key(nir + draw(st.text("0123456789", min_size=6, max_size=6)))
    elif kind == 1:
        text = draw(st.sampled_from(["paul.dupond", "a", "x+y"])) + "@ch-exemple.mssante.fr"
    elif kind == 2:
        text = draw(st.sampled_from(["289057512345621@", ""])) + PATIENT_DOMAIN
    else:
        text = draw(st.sampled_from(["12345678903", "+33612345678"]))
    chars = list(text)
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(chars)))
        char = draw(st.sampled_from(_ALPHABET))
        if at < len(chars) and draw(st.booleans()):
            digit = "0123456789".find(chars[at])
            chars[at] = _FOREIGN_DIGITS[digit] if digit >= 0 and draw(st.booleans()) else char
        else:
            chars.insert(at, char)
    return "".join(chars)


def _payloads(seeds: list[bytes]) -> st.SearchStrategy[bytes]:
    texts = st.one_of(_near_valid(), st.text(_ALPHABET, max_size=40), st.text(max_size=40))
    return st.one_of(texts.map(lambda t: t.encode("utf-8")), st.sampled_from(seeds or [b""]),
                     st.binary(max_size=40))


HARNESS = Harness(
    "identities", "addresses, domains, INS, RPPS, phones, logins: only InvalidIdentity escapes",
    _run, _target,
    payloads=_payloads,
    fragments=st.text(_ALPHABET, min_size=1, max_size=8).map(lambda t: t.encode("utf-8")),
    max_amplified=64 * 1024,
)
