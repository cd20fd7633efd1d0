"""Security regressions: no client holds the event loop. Hostile input that costs the
server work (issue 16's defects 1 and 2, and the densest header the MIME analysis knows: a
megabyte of address groups) is sent while another patient's session keeps working; every
command of that session must still be answered within 100 ms. Before the fix a 1 MB header
of address groups was analysed on the event loop (about one second on this machine), and
each of the two defects held it for seconds."""

from __future__ import annotations

import imaplib
import smtplib
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from tests.conftest import CHRISTELLE, INAYA, MARTINE, PATIENT_PASSWORD
from tests.gateway_proc import Gateway
from tests.helpers import noop_probe, smtp, tls_context

#: How long the other session may wait for an answer while the hostile input is handled.
MAX_WAIT = 0.100
MARTINE_ADDRESS = f"{MARTINE}@patient.mssante.fr"


@contextmanager
def busy_neighbour(gw: Gateway) -> Iterator[list[float]]:
    """Another patient's session sending NOOP after NOOP while the block runs."""
    with noop_probe(gw.ports["imaps"], tls_context(gw), INAYA, PATIENT_PASSWORD) as waits:
        yield waits


def _check(waits: list[float], what: str) -> None:
    assert len(waits) >= 10, (what, waits)  # the neighbour did work throughout
    assert max(waits) < MAX_WAIT, (
        f"{what}: the other session waited {max(waits) * 1000:.0f} ms "
        f"(median {sorted(waits)[len(waits) // 2] * 1000:.1f} ms over {len(waits)} commands)")


def _during(gw: Gateway, what: str, attack: Callable[[], None]) -> None:
    with busy_neighbour(gw) as waits:
        attack()
    _check(waits, what)


# --------------------------------------------------------------------------- the inputs


def many_zero_literals(count: int) -> bytes:
    """Defect 1: one pre-login command of ``count`` empty non-synchronising literals, each
    beside a quoted string (every quoted string used to scan all the command's literals)."""
    return b'a LIST "" ("" {0+}\r\n' + b' "" {0+}\r\n' * count + b')\r\n'


def blank_from_header() -> bytes:
    """Defect 2: a From field folded over 89 blank lines of 900 spaces (a backtracking
    regular expression took seconds)."""
    return (b"From: a" + b"\r\n".join([b" " * 900] * 89) + b"\x01\r\nTo: " +
            MARTINE_ADDRESS.encode() + b"\r\nSubject: x\r\n\r\nx\r\n")


def address_groups(size: int) -> bytes:
    """The densest header for the MIME analysis: ``size`` bytes of address groups."""
    groups = [b"g%d: a@b.fr;" % i for i in range(size // 17)]
    return (b"From: " + CHRISTELLE.encode() + b"\r\nTo: " + MARTINE_ADDRESS.encode() +
            b"\r\nCc: " + b",\r\n ".join(groups) + b"\r\nSubject: groups\r\n\r\nbody\r\n")


# --------------------------------------------------------------------------- the tests


def _literal_storm(gw: Gateway, login: bool) -> list[bytes]:
    """Send defect 1's command (before or after LOGIN) and return the lines up to its answer."""
    sock = socket.create_connection(("127.0.0.1", gw.ports["imaps"]), timeout=30)
    with tls_context(gw).wrap_socket(sock, server_hostname="127.0.0.1") as tls:
        reader = tls.makefile("rb")
        assert reader.readline().startswith(b"* OK")
        if login:
            tls.sendall(f'l LOGIN {MARTINE} "{PATIENT_PASSWORD}"\r\n'.encode())
            while not (line := reader.readline()).startswith(b"l "):
                assert line, "connection closed at LOGIN"
            assert line.startswith(b"l OK"), line
        tls.sendall(many_zero_literals(6000) + b"b LOGOUT\r\n")  # ~60 KB
        lines: list[bytes] = []
        while not (line := reader.readline()).startswith(b"a "):
            assert line, lines
            lines.append(line)
        return [*lines, line]


# Before login a command may not exceed PRE_LOGIN_MAX_COMMAND (32 KiB): refused unparsed;
# after login it is parsed and answered. Either way no other session waits.
@pytest.mark.parametrize(("login", "answer"), [
    pytest.param(False, b"a NO [TOOBIG]", id="pre-login-refused"),
    pytest.param(True, b"a OK", id="authenticated-answered"),
])
def test_literal_storm_does_not_hold_other_sessions(gateway: Gateway, login: bool,
                                                    answer: bytes) -> None:
    answers: list[bytes] = []

    def attack() -> None:
        for _ in range(3):
            answers.append(_literal_storm(gateway, login=login)[-1])

    _during(gateway, f"defect 1 (literals {'after' if login else 'before'} login)", attack)
    assert all(a.startswith(answer) for a in answers), answers


def test_backtracking_from_header_over_smtp_does_not_hold_other_sessions(
        gateway: Gateway) -> None:
    message = blank_from_header()

    def attack() -> None:
        with smtp(gateway, CHRISTELLE) as conn:
            # Analysed whole, then refused: its From is not the sender's address (R10).
            with pytest.raises(smtplib.SMTPDataError) as refused:
                conn.sendmail(CHRISTELLE, [MARTINE_ADDRESS], message)
            assert refused.value.smtp_code == 550

    _during(gateway, "defect 2 (From of blank lines, SMTP)", attack)


def test_megabyte_of_address_groups_does_not_hold_other_sessions(
        gateway: Gateway, monkeypatch: pytest.MonkeyPatch) -> None:
    message = address_groups(1_000_000)
    monkeypatch.setattr(imaplib, "_MAXLINE", 20_000_000)  # its ENVELOPE is one long line

    def attack() -> None:
        with smtp(gateway, CHRISTELLE) as conn:
            conn.sendmail(CHRISTELLE, [MARTINE_ADDRESS], message)
        client = imaplib.IMAP4_SSL("127.0.0.1", gateway.ports["imaps"],
                                   ssl_context=tls_context(gateway), timeout=60)
        try:
            client.login(MARTINE, PATIENT_PASSWORD)
            typ, _ = client.append("Drafts", None, None, message)
            assert typ == "OK"
            client.select("INBOX")
            typ, data = client.uid("FETCH", "1:*", "(ENVELOPE)")
            assert typ == "OK" and b"g1" in b"".join(
                part[1] if isinstance(part, tuple) else part for part in data if part)
        finally:
            client.logout()

    _during(gateway, "1 MB of address groups (SMTP, APPEND, FETCH)", attack)


# ------------------------------------------------------------------- bounded by construction


def test_envelope_keeps_the_first_addresses_and_closes_a_cut_group() -> None:
    from imap_store.mime import parse_message
    from imap_store.mime.addresses import MAX_ENVELOPE_ADDRESSES

    # Groups of two: start marker, one address, end marker: a cut falls inside one.
    raw = address_groups(200_000)
    cc = parse_message(raw).envelope[6]
    assert len(cc) <= MAX_ENVELOPE_ADDRESSES
    assert cc[0] == [None, None, "g0", None] and cc[1][2:] == ["a", "b.fr"]
    assert cc[-1] == [None, None, None, None]  # the last group is closed
    starts = sum(1 for a in cc if a[2] is not None and a[3] is None)
    ends = sum(1 for a in cc if a[2] is None and a[3] is None)
    assert starts == ends > 300


def test_envelope_of_a_huge_address_field_is_bounded() -> None:
    from imap_store.mime import parse_message
    from imap_store.mime.addresses import MAX_ENVELOPE_ADDRESSES

    many = b",\r\n ".join(b"n%d <a%d@b.fr>" % (i, i) for i in range(60_000))
    info = parse_message(b"From: a@b.fr\r\nTo: " + many + b"\r\n\r\nx\r\n")
    to = info.envelope[5]
    assert 1000 <= len(to) <= MAX_ENVELOPE_ADDRESSES
    assert to[0] == ["n0", None, "a0", "b.fr"]
    assert to[-1] == [f"n{len(to) - 1}", None, f"a{len(to) - 1}", "b.fr"]  # whole addresses


def test_parameters_kept_per_field_are_bounded() -> None:
    from imap_store.mime import parse_message
    from imap_store.mime.headers import MAX_PARAMETERS

    params = b";\r\n ".join(b"p%d=v" % i for i in range(10_000))
    info = parse_message(b"Content-Type: text/plain; charset=utf-8; " + params +
                         b"\r\n\r\nx\r\n")
    kept = info.bodystructure["params"]
    assert kept[:2] == [["CHARSET", "utf-8"], ["P0", "v"]]
    assert len(kept) == MAX_PARAMETERS
