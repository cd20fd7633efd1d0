"""INS, RPPS and address validation (SPEC §2), table-driven."""

from __future__ import annotations

import pytest

from policy import addresses

VALID = [
    ("289057512345621", "289057512345621"),  # Inaya Michel (samples)
    ("262112A04501213", "262112A04501213"),  # Corsica 2A (samples)
    ("262112a04501213", "262112A04501213"),  # lower-case 2a normalised
    ("279035121518989", "279035121518989"),  # SPEC example
    (" 289057512345621 ", "289057512345621"),
]

INVALID = [
    ("289456789012345", "key 45 does not match", "the INS key does not match"),
    ("28905751234562", "14 characters", "an INS has 15 characters"),
    ("2890575123456210", "16 characters", "an INS has 15 characters"),
    ("389057512345621", "must be 1 or 2", "an INS starts with 1 or 2"),
    ("28905X512345621", "positions 6-7", "bad department in the INS"),
    ("2890575123456A1", "only digits", "an INS has only digits"),
    ("262112A04501214", "does not match", "the INS key does not match"),
    ("", "0 characters", "an INS has 15 characters"),
]


@pytest.mark.parametrize(("value", "expected"), VALID)
def test_valid_ins(value: str, expected: str) -> None:
    assert addresses.validate_ins(value) == expected


@pytest.mark.parametrize(("value", "message", "reason"), INVALID)
def test_invalid_ins_names_the_problem(value: str, message: str, reason: str) -> None:
    with pytest.raises(addresses.InvalidIdentity) as info:
        addresses.validate_ins(value)
    assert message in str(info.value)
    assert info.value.reason == reason


def test_corsican_key_uses_19_and_18() -> None:
    assert addresses.ins_key("262112A045012") == 97 - int("2621119045012") % 97
    assert addresses.ins_key("262112B045012") == 97 - int("2621118045012") % 97


def test_wrong_key_message_gives_expected_key() -> None:
    with pytest.raises(addresses.InvalidIdentity, match=r"expected 25"):
        addresses.validate_ins("289456789012345")


@pytest.mark.parametrize("value", ["12345678903", " 12345678903 "])
def test_rpps_valid(value: str) -> None:
    assert addresses.validate_rpps(value) == "12345678903"


@pytest.mark.parametrize("value", ["1234567890", "123456789032", "1234567890a"])
def test_rpps_invalid(value: str) -> None:
    with pytest.raises(addresses.InvalidIdentity, match="11 digits"):
        addresses.validate_rpps(value)


@pytest.mark.parametrize("value", ["12345678901", "10001234567", "10001234566", "12345678930"])
def test_rpps_with_a_wrong_luhn_digit_is_refused(value: str) -> None:
    """The last digit of an RPPS is its Luhn check digit: one mistyped or swapped digit is
    caught (12345678930: the last two digits of a valid number swapped)."""
    with pytest.raises(addresses.InvalidIdentity, match="Luhn"):
        addresses.validate_rpps(value)


@pytest.mark.parametrize("value", ["10001234565", "10000000009", "12345678903", "10101010105"])
def test_rpps_luhn_valid(value: str) -> None:
    assert addresses.validate_rpps(value) == value


@pytest.mark.parametrize(
    ("value", "expected"),
    [("Marie.Chanteau@Medecin.MSSante.fr", "marie.chanteau@medecin.mssante.fr")],
)
def test_address_normalised(value: str, expected: str) -> None:
    assert addresses.normalize_address(value) == expected


@pytest.mark.parametrize(
    "value", ["no-at-sign", "a@b", "<a@b.fr>", "a b@c.fr", "Name <a@b.fr>", "a@-b.fr", ""]
)
def test_address_invalid(value: str) -> None:
    with pytest.raises(addresses.InvalidIdentity):
        addresses.normalize_address(value)


@pytest.mark.parametrize("value", ["bad_domain.fr", "nodot", "-a.fr", ""])
def test_domain_invalid(value: str) -> None:
    with pytest.raises(addresses.InvalidIdentity):
        addresses.normalize_domain(value)


@pytest.mark.parametrize(
    "login", ["289057512345621", "289057512345621@patient.mssante.fr",
              "289057512345621@PATIENT.mssante.fr"],
)
def test_patient_login_full_address_or_bare_ins(login: str) -> None:
    assert addresses.parse_patient_login(login, "patient.mssante.fr") == "289057512345621"


def test_patient_login_other_domain_refused() -> None:
    with pytest.raises(addresses.InvalidIdentity):
        addresses.parse_patient_login("289057512345621@elsewhere.fr", "patient.mssante.fr")
