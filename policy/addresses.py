"""Identities of the trust space: INS (patient), RPPS (professional), addresses (SPEC §2).

An INS is 15 characters: a 13-character NIR then a 2-digit key, key = 97 - (NIR mod 97),
where the NIR is read as a number after replacing ``2A`` by ``19`` and ``2B`` by ``18`` at
positions 6-7 (Corsican departments).
"""

from __future__ import annotations

import re

INS_LENGTH = 15
RPPS_LENGTH = 11
_CORSICA = {"2A": "19", "2B": "18"}
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
# Shapes are checked with fullmatch(): "$" would also match before a final newline. The local
# part refuses blanks, control characters (C0, DEL, C1: a NUL or CR must never reach a log, a
# header or the database) and the specials that would need quoting.
_ADDR_RE = re.compile(rf"[^@\s\x00-\x1f\x7f-\x9f<>()\[\],;:\"]+@{_LABEL}(?:\.{_LABEL})+")
_DOMAIN_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)+")
#: ASCII digits only: str.isdigit() and int() also accept other scripts' digits (Arabic-Indic,
#: superscripts...), which are not digits of an INS, an RPPS or a number in a protocol.
_DIGITS_RE = re.compile(r"[0-9]+")


def _ascii_digits(text: str) -> bool:
    return _DIGITS_RE.fullmatch(text) is not None


class InvalidIdentity(ValueError):
    """An address, INS, RPPS or domain that does not have the required shape.

    ``reason`` is a short ASCII phrase fit for an SMTP reply (no user input in it).
    """

    def __init__(self, message: str, reason: str = "invalid") -> None:
        super().__init__(message)
        self.reason = reason


def ins_key(nir: str) -> int:
    """Return the 2-digit key of a 13-character NIR (Corsica-aware).

    Raises :class:`InvalidIdentity` unless the NIR is 13 ASCII digits (or 2A/2B at 6-7): int()
    of a long string would raise ValueError (and take quadratic time).
    """
    number = nir[:5] + _CORSICA.get(nir[5:7].upper(), nir[5:7]) + nir[7:]
    if len(nir) != INS_LENGTH - 2 or not _ascii_digits(number):
        raise InvalidIdentity(f"invalid NIR {nir[:20]!r}: 13 digits expected (and 2A/2B)",
                              "an INS has only digits")
    return 97 - (int(number) % 97)


def validate_ins(value: str) -> str:
    """Return the INS normalised (uppercase), or raise InvalidIdentity naming what is wrong."""
    ins = value.strip().upper()
    if len(ins) != INS_LENGTH:
        raise InvalidIdentity(
            f"invalid INS {value!r}: {len(ins)} characters, an INS has {INS_LENGTH}",
            "an INS has 15 characters",
        )
    if ins[0] not in "12":
        raise InvalidIdentity(
            f"invalid INS {value!r}: the first character must be 1 or 2",
            "an INS starts with 1 or 2",
        )
    nir, key = ins[:13], ins[13:]
    department = nir[5:7]
    if department not in _CORSICA and not _ascii_digits(department):
        raise InvalidIdentity(
            f"invalid INS {value!r}: positions 6-7 must be digits, 2A or 2B",
            "bad department in the INS",
        )
    rest = nir[:5] + nir[7:]
    if not _ascii_digits(rest) or not _ascii_digits(key):
        raise InvalidIdentity(
            f"invalid INS {value!r}: only digits are allowed (and 2A/2B)",
            "an INS has only digits",
        )
    expected = ins_key(nir)
    if int(key) != expected:
        raise InvalidIdentity(
            f"invalid INS {value!r}: the key {key} does not match the NIR "
            f"(expected {expected:02d})",
            "the INS key does not match",
        )
    return ins


def validate_rpps(value: str) -> str:
    rpps = value.strip()
    if len(rpps) != RPPS_LENGTH or not _ascii_digits(rpps):
        raise InvalidIdentity(f"invalid RPPS {value!r}: an RPPS is {RPPS_LENGTH} digits")
    if not luhn_valid(rpps):
        raise InvalidIdentity(f"invalid RPPS {value!r}: its last digit is not the Luhn check "
                              "digit of the others (a mistyped number?)")
    return rpps


def luhn_valid(digits: str) -> bool:
    """The Luhn (mod 10) check an RPPS number carries in its last digit: from the right,
    every second digit is doubled (minus 9 above 9) and the sum is a multiple of 10."""
    total = 0
    for position, char in enumerate(reversed(digits)):
        digit = ord(char) - ord("0")
        if position % 2:
            digit = digit * 2 - 9 if digit > 4 else digit * 2
        total += digit
    return total % 10 == 0


def normalize_address(value: str) -> str:
    """Lowercase an e-mail address and check its shape (no display name, no brackets)."""
    address = value.strip().lower()
    if len(address) > 254 or not _ADDR_RE.fullmatch(address):
        raise InvalidIdentity(f"invalid address {value!r}")
    return address


def normalize_domain(value: str) -> str:
    domain = value.strip().lower().rstrip(".")
    if len(domain) > 253 or not _DOMAIN_RE.fullmatch(domain):
        raise InvalidIdentity(f"invalid domain {value!r}")
    return domain


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower()


def patient_address(ins: str, patient_domain: str) -> str:
    return f"{ins.upper()}@{patient_domain}"


def parse_patient_login(login: str, patient_domain: str) -> str:
    """A patient logs in with the full address or the bare INS; return the INS or raise."""
    value = login.strip()
    if "@" in value:
        local, _, domain = value.rpartition("@")
        if domain.lower() != patient_domain:
            raise InvalidIdentity(f"not a patient address of {patient_domain}")
        value = local
    return validate_ins(value)


_PHONE_RE = re.compile(r"\+?[0-9]{6,15}")


def normalize_phone(value: str) -> str:
    """A phone number for SMS: optional ``+`` then 6 to 15 ASCII digits (E.164 length);
    spaces, dots and dashes between digits are dropped."""
    compact = re.sub(r"[ .\-]", "", value.strip())
    if not _PHONE_RE.fullmatch(compact):
        raise InvalidIdentity(f"invalid phone number {value!r}: expected digits, e.g. "
                              "+33612345678", "invalid phone number")
    return compact
