"""The login throttle (issue 15.2): per account keyed on the resolved identity (a patient's INS
however typed), shared by every ``serve`` process through the database, exponential backoff
instead of a lock, and a much higher per-address ceiling that slows a sprayer without locking
out a shared address (a hospital behind NAT).

End to end against real ``serve`` processes with smtplib and imaplib, small ``[limits]`` from
the configuration file; the backoff arithmetic and the database counts are tested directly."""

from __future__ import annotations

import asyncio
import base64
import imaplib
import json
import re
import shutil
import smtplib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from imap_store.store import schema as t
from imap_store.store.db import migrate
from imap_store.store.directory import Store
from imap_store.store.throttle import StoreFailureCounts, row_key
from policy.authn import Authenticator
from policy.passwords import hash_password
from policy.throttle import (
    HOT_IP_PAUSE,
    FailureRecord,
    Limits,
    LoginThrottle,
    MemoryFailureCounts,
    account_after_failure,
    backoff,
    decide,
    ip_after_failure,
    ip_key,
)
from tests.conftest import (
    CHRISTELLE,
    INAYA,
    MARTINE,
    PATIENT_PASSWORD,
    PRO_PASSWORD,
    prepare_gateway,
    running,
)
from tests.gateway_proc import LISTENERS, Gateway, free_port, run_cli, set_listen
from tests.helpers import smtp, tls_context

LIMITS = Limits(max_failures=3, window=60, per_ip=8, max_delay=900)

# --------------------------------------------------------------------------- arithmetic


def test_backoff_doubles_after_the_threshold_and_is_capped() -> None:
    assert [backoff(n, 5, 900) for n in range(5)] == [0.0] * 5
    assert [backoff(n, 5, 900) for n in range(5, 11)] == [1, 2, 4, 8, 16, 32]
    assert backoff(14, 5, 900) == 512 and backoff(15, 5, 900) == 900  # 1024 capped
    assert backoff(10**6, 5, 900) == 900  # no giant integers
    assert backoff(1, 1, 900) == 1 and backoff(3, 1, 900) == 4


def test_account_record_counts_backs_off_and_is_forgotten_after_the_wait() -> None:
    r = None
    for i in range(3):
        r = account_after_failure(r, 1000.0 + i, LIMITS)
    assert r is not None and (r.failures, r.first_at, r.last_at) == (3, 1000.0, 1002.0)
    assert r.expires_at == 1002.0 + 1 + 60  # the wait (2^0), then the window
    refused = decide(r, None, 1002.5, LIMITS)
    assert refused.refused and refused.retry_after == pytest.approx(0.5)
    allowed = decide(r, None, 1003.0, LIMITS)
    assert not allowed.refused and allowed.account_failures == 3 and allowed.pause == 0
    assert allowed.parallel == 1  # in backoff: one attempt at a time
    assert decide(None, None, 1003.0, LIMITS).parallel == 3  # all may fail: 3 failures
    two = account_after_failure(account_after_failure(None, 1000.0, LIMITS), 1001.0, LIMITS)
    assert decide(two, None, 1003.0, LIMITS).parallel == 1
    r4 = account_after_failure(r, 1003.0, LIMITS)
    assert r4.failures == 4 and decide(r4, None, 1004.9, LIMITS).refused  # 2 s now
    assert not decide(r4, None, 1005.0, LIMITS).refused
    # Forgotten once the window passed after the wait: counting starts again.
    late = r4.expires_at
    assert decide(r4, None, late, LIMITS).account_failures == 0
    assert account_after_failure(r4, late, LIMITS).failures == 1


def test_ip_record_is_a_fixed_window_and_a_hot_address_only_slows() -> None:
    ip = None
    for i in range(8):
        ip = ip_after_failure(ip, 100.0 + i, LIMITS)
    assert ip is not None and ip.failures == 8 and ip.expires_at == 160.0
    # An account with no failures: allowed, after a pause.
    fresh = decide(None, ip, 108.0, LIMITS)
    assert not fresh.refused and fresh.hot_ip and fresh.pause == HOT_IP_PAUSE
    assert fresh.parallel == 1
    # An account with failures of its own waits from its first one: 2^(n-1) s.
    one = FailureRecord(1, 107.0, 107.0, 167.0)
    assert decide(one, ip, 107.5, LIMITS).refused
    assert not decide(one, ip, 108.0, LIMITS).refused
    two = FailureRecord(2, 106.0, 107.0, 167.0)
    assert decide(two, ip, 108.5, LIMITS).refused and not decide(two, ip, 109.0, LIMITS).refused
    # Below the ceiling, or once its window ended, the address is not hot.
    assert not decide(two, ip, 160.0, LIMITS).hot_ip
    assert not decide(two, FailureRecord(7, 100.0, 106.0, 160.0), 108.5, LIMITS).refused
    assert ip_after_failure(ip, 160.0, LIMITS).failures == 1


def test_ip_key_groups_an_ipv6_subscriber_prefix() -> None:
    assert ip_key("192.0.2.7") == "192.0.2.7"
    assert ip_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert ip_key("2001:db8:1:2:aaaa::1") == ip_key("2001:db8:1:2:bbbb::9") == \
        "2001:db8:1:2::/64"
    assert ip_key("2001:db8:1:3::1") != ip_key("2001:db8:1:2::1")
    assert ip_key("unknown") == "unknown"


# --------------------------------------------------------------------------- in process


class Hashes:
    """The store's PasswordHashes for one patient and one professional; counts how many
    professional lookups run at once."""

    def __init__(self) -> None:
        self.patient = (1, "open", hash_password(PATIENT_PASSWORD))
        self.pro = (2, hash_password(PRO_PASSWORD))
        self.running = self.most = 0

    async def patient_password_hash(self, ins: str) -> tuple[int, str, str | None] | None:
        return self.patient if ins == MARTINE else None

    async def professional_password_hash(self, address: str) -> tuple[int, str | None] | None:
        self.running += 1
        self.most = max(self.most, self.running)
        await asyncio.sleep(0.05)
        self.running -= 1
        return self.pro if address == CHRISTELLE else None


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def _authenticator(clock: Clock) -> tuple[Authenticator, list[tuple[str, str]]]:
    audit: list[tuple[str, str]] = []
    throttle = LoginThrottle(3, 60, clock, per_ip=8, counts=MemoryFailureCounts(clock))
    auth = Authenticator(Hashes(), throttle, "patient.mssante.fr",
                         audit=lambda who, action, _s, _d: audit.append((who, action)))
    return auth, audit


async def test_ins_and_address_in_any_case_are_one_account() -> None:
    clock = Clock()
    auth, audit = _authenticator(clock)
    keys = {auth.account_key(login) for login in (
        MARTINE, MARTINE.lower(), f" {MARTINE.lower()}@Patient.MSSANTE.fr ",
        f"{MARTINE}@patient.mssante.fr")}
    assert keys == {f"ins:{MARTINE}"}
    assert auth.account_key(CHRISTELLE.upper()) == f"login:{CHRISTELLE}"
    assert auth.account_key(" Nobody@Example.ORG") == "login:nobody@example.org"
    for login in (MARTINE.lower(), f"{MARTINE}@PATIENT.MSSANTE.FR", MARTINE):
        assert (await auth.login(login, "wrong password", "192.0.2.1", "imap")).identity is None
    result = await auth.login(f"{MARTINE}@patient.mssante.fr", PATIENT_PASSWORD, "192.0.2.1",
                              "imap")
    assert result.throttled and result.identity is None
    clock.now += 1.0  # the wait (2^0 s) is over: the right password works, the count goes
    assert (await auth.login(MARTINE, PATIENT_PASSWORD, "192.0.2.1", "imap")).identity
    assert not (await auth.throttle.check(f"ins:{MARTINE}", "192.0.2.1")).account_failures
    assert [a for _w, a in audit] == ["login.failed"] * 3 + ["login.throttled", "login"]


async def test_parallel_attempts_cannot_all_pass_before_the_count() -> None:
    """Twenty connections trying one account at once: three guesses, then the backoff. The
    right password from several connections at once is still checked in parallel."""
    clock = Clock()
    auth, audit = _authenticator(clock)
    results = await asyncio.gather(*(
        auth.login(CHRISTELLE, PRO_PASSWORD, "192.0.2.1", "smtp") for _ in range(6)))
    assert all(r.identity is not None for r in results)
    assert auth.store.most == 3  # type: ignore[attr-defined]  # login_failures at once
    results = await asyncio.gather(*(
        auth.login(CHRISTELLE, f"guess {i}", "192.0.2.1", "smtp") for i in range(20)))
    assert sum(r.throttled for r in results) == 17
    assert [a for _w, a in audit].count("login.failed") == 3
    assert not auth._gates  # nothing left behind


async def test_a_hot_address_slows_but_does_not_lock_out() -> None:
    clock = Clock()
    auth, _audit = _authenticator(clock)
    for i in range(7):
        await auth.login(f"nobody{i}@medecin.mssante.fr", "x" * 10, "192.0.2.9", "smtp")
    await auth.login(MARTINE, "wrong password", "192.0.2.9", "imap")  # the 8th: hot now
    started = time.monotonic()
    ok = await auth.login(CHRISTELLE, PRO_PASSWORD, "192.0.2.9", "smtp")
    assert ok.identity is not None and time.monotonic() - started >= HOT_IP_PAUSE * 0.9
    # An account with a failure of its own waits from its first failure when the address is
    # hot; the same account from another address is not slowed.
    assert (await auth.login(MARTINE, PATIENT_PASSWORD, "192.0.2.9", "imap")).throttled
    assert (await auth.login(MARTINE, PATIENT_PASSWORD, "198.51.100.1", "imap")).identity


# --------------------------------------------------------------------------- the table


async def test_counts_in_the_database_are_shared_hashed_and_pruned(db_url: str) -> None:
    await migrate(db_url)
    one, two = Store.from_url(db_url), Store.from_url(db_url)  # two processes' stores
    clock = Clock()
    try:
        here, there = StoreFailureCounts(one, clock), StoreFailureCounts(two, clock)
        for counts in (here, there, here):
            await counts.update({
                "account:ins:X": lambda old: account_after_failure(old, clock.now, LIMITS),
                "ip:192.0.2.1": lambda old: ip_after_failure(old, clock.now, LIMITS)})
        seen = await there.read(["account:ins:X", "ip:192.0.2.1", "account:other"])
        assert seen["account:ins:X"].failures == 3 and seen["ip:192.0.2.1"].failures == 3
        assert "account:other" not in seen
        async with one.read() as conn:
            keys = set((await conn.execute(select(t.login_failure.c.key))).scalars())
        assert keys == {row_key("account:ins:X"), row_key("ip:192.0.2.1")}  # no login stored
        await here.clear("account:ins:X")
        assert set(await there.read(["account:ins:X", "ip:192.0.2.1"])) == {"ip:192.0.2.1"}
        # Expired rows are deleted at a later failure.
        clock.now += 3600
        await there.update({"ip:198.51.100.1": lambda old: ip_after_failure(old, clock.now,
                                                                            LIMITS)})
        assert set(await here.read(["ip:192.0.2.1", "ip:198.51.100.1"])) == {"ip:198.51.100.1"}
    finally:
        await one.close()
        await two.close()


# --------------------------------------------------------------------------- end to end

PATIENT = f"{INAYA}@patient.mssante.fr"
#: Small numbers so that the tests wait a second or two: the backoff starts after 3 failures
#: (1 s, then 2 s ...), an address is hot after 8 failures in the window.
LIMITS_TOML = ("\n[limits]\nlogin_failures = 3\nlogin_window = 60\n"
               "login_failures_per_ip = 8\n")


@pytest.fixture
def throttled(gw_dir: Path) -> Iterator[Gateway]:
    gw = prepare_gateway(gw_dir)
    assert isinstance(gw, Gateway)
    with gw.config.open("a") as f:
        f.write(LIMITS_TOML)
    for started in running(gw):
        assert isinstance(started, Gateway)
        yield started


@pytest.fixture
def other_process(throttled: Gateway) -> Iterator[Gateway]:
    """A second ``serve`` process on the same database, same limits, other ports."""
    other_dir = throttled.directory.parent / "gw2"
    shutil.copytree(throttled.directory, other_dir,
                    ignore=shutil.ignore_patterns("serve-*.log", "*.db*"))
    other = Gateway(other_dir)
    for name in LISTENERS:
        other.ports[name] = free_port()
        set_listen(other.config, name, f"127.0.0.1:{other.ports[name]}")
    other.start()
    try:
        yield other
    finally:
        other.kill()


class Imap:
    """One imaplib connection (implicit TLS); ``login`` answers OK or the response code."""

    def __init__(self, gw: Gateway) -> None:
        self.conn = imaplib.IMAP4_SSL("127.0.0.1", gw.ports["imaps"],
                                      ssl_context=tls_context(gw), timeout=30)

    def login(self, user: str, password: str) -> str:
        try:
            self.conn.login(user, password)
        except imaplib.IMAP4.error as exc:
            code = re.search(r"\[([A-Z-]+)\]", str(exc))
            return code.group(1) if code else str(exc)
        return "OK"

    def close(self) -> None:
        self.conn.logout()


def imap_login(gw: Gateway, user: str, password: str) -> str:
    conn = Imap(gw)
    try:
        return conn.login(user, password)
    finally:
        conn.close()


def auth_plain(conn: smtplib.SMTP, user: str, password: str) -> int:
    token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
    return conn.docmd("AUTH", f"PLAIN {token}")[0]


def audit_actions(gw: Gateway, action: str, want: int) -> list[dict[str, object]]:
    deadline = time.monotonic() + 10
    while True:  # audit rows go with the next group commit
        rows = json.loads(run_cli(gw.config, "audit", "--limit", "200", "--json").stdout)
        found = [r for r in rows if r["action"] == action]
        if len(found) >= want or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def test_failures_in_one_process_count_in_the_other(throttled: Gateway,
                                                    other_process: Gateway) -> None:
    assert imap_login(throttled, INAYA, "wrong 1") == "AUTHENTICATIONFAILED"
    assert imap_login(throttled, INAYA, "wrong 2") == "AUTHENTICATIONFAILED"
    there = Imap(other_process)
    assert there.login(INAYA, "wrong 3") == "AUTHENTICATIONFAILED"  # the third, over there
    assert there.login(INAYA, PATIENT_PASSWORD) == "UNAVAILABLE"  # waits 1 s, not checked
    time.sleep(1.1)
    here = Imap(throttled)
    assert here.login(INAYA, "wrong 4") == "AUTHENTICATIONFAILED"  # now 2 s, in both
    assert here.login(INAYA, PATIENT_PASSWORD) == "UNAVAILABLE"
    assert there.login(INAYA, PATIENT_PASSWORD) == "UNAVAILABLE"
    time.sleep(2.1)
    assert there.login(INAYA, PATIENT_PASSWORD) == "OK"  # after the backoff
    here.close()
    there.close()
    # The success cleared the count, for both processes.
    here = Imap(throttled)
    assert here.login(INAYA, "wrong 5") == "AUTHENTICATIONFAILED"
    assert here.login(INAYA, PATIENT_PASSWORD) == "OK"
    here.close()


def smtp_from(gw: Gateway, source: str) -> smtplib.SMTP:
    """A ``submission`` session after STARTTLS, from another loopback address."""
    conn = smtplib.SMTP("127.0.0.1", gw.ports["submission"], timeout=30,
                        source_address=(source, 0))
    conn.ehlo("client.test")
    conn.starttls(context=tls_context(gw))
    conn.ehlo("client.test")
    return conn


def test_ins_and_full_address_count_together(throttled: Gateway) -> None:
    """Each failure from another address (no address is near its ceiling): only the account,
    the INS behind every spelling, counts; SMTP AUTH and IMAP LOGIN alike."""
    for source, login in (("127.0.0.2", INAYA), ("127.0.0.3", PATIENT.upper()),
                          ("127.0.0.4", PATIENT)):
        conn = smtp_from(throttled, source)
        assert auth_plain(conn, login, "wrong password") == 535
        conn.quit()
    conn = smtp_from(throttled, "127.0.0.5")
    assert auth_plain(conn, INAYA, PATIENT_PASSWORD) == 454  # waits 1 s, not checked
    conn.quit()
    assert imap_login(throttled, PATIENT, PATIENT_PASSWORD) == "UNAVAILABLE"
    # A Corsican INS: its letters in any case, bare or in the address, are one account too.
    for source, login in (("127.0.0.6", MARTINE.lower()),
                          ("127.0.0.7", f"{MARTINE}@patient.mssante.fr"),
                          ("127.0.0.8", MARTINE)):
        conn = smtp_from(throttled, source)
        assert auth_plain(conn, login, "wrong password") == 535
        conn.quit()
    assert imap_login(throttled, MARTINE.lower(), PATIENT_PASSWORD) == "UNAVAILABLE"
    throttled_rows = audit_actions(throttled, "login.throttled", 3)
    assert len(throttled_rows) == 3
    for row in throttled_rows:
        detail = json.loads(str(row["detail"]))
        assert detail["ip"] in ("127.0.0.1", "127.0.0.5") and 0 < detail["retry_after"] <= 1
    time.sleep(1.0)
    assert imap_login(throttled, f"{MARTINE.lower()}@patient.mssante.fr",
                      PATIENT_PASSWORD) == "OK"


def test_right_password_refused_during_backoff_then_accepted(throttled: Gateway) -> None:
    conn = smtp(throttled, None, "submission")
    for login in (CHRISTELLE.upper(), CHRISTELLE, "Christelle.Thomas@Medecin.MSSante.fr"):
        assert auth_plain(conn, login, "wrong password") == 535
    started = time.monotonic()
    assert auth_plain(conn, CHRISTELLE, PRO_PASSWORD) == 454  # during the 1 s wait
    assert auth_plain(conn, CHRISTELLE, "wrong again") == 454  # not checked, not counted
    time.sleep(max(0.0, 1.1 - (time.monotonic() - started)))
    assert auth_plain(conn, CHRISTELLE, PRO_PASSWORD) == 235
    assert conn.sendmail(CHRISTELLE, [PATIENT], b"Subject: ok\r\nFrom: " +
                         CHRISTELLE.encode() + b"\r\n\r\nok\r\n") == {}
    conn.quit()


def test_many_accounts_failing_from_one_address_do_not_lock_out_the_others(
        throttled: Gateway) -> None:
    conn = smtp(throttled, None, "submission")
    for i in range(7):  # a sprayer, or a hospital's patients mistyping behind one NAT
        assert auth_plain(conn, f"nobody{i}@medecin.mssante.fr", "x" * 10) == 535
    conn.quit()
    assert imap_login(throttled, MARTINE, "wrong") == "AUTHENTICATIONFAILED"  # 8th: hot now
    # Martine has a failure of her own: from this address she waits from the first one.
    assert imap_login(throttled, MARTINE, PATIENT_PASSWORD) == "UNAVAILABLE"
    # An account with no failures logs in: slowed (a pause), not locked out.
    conn = smtp(throttled, None, "submission")
    started = time.monotonic()
    assert auth_plain(conn, CHRISTELLE, PRO_PASSWORD) == 235
    assert time.monotonic() - started >= 0.9
    conn.quit()
    assert imap_login(throttled, INAYA, PATIENT_PASSWORD) == "OK"
    # Two pauses later her 1 s is over: she logs in too.
    assert imap_login(throttled, MARTINE, PATIENT_PASSWORD) == "OK"


def test_default_limits_do_not_lock_out_a_shared_address(gateway: Gateway) -> None:
    """With the shipped numbers, six accounts failing from one address (five locked every
    account of the address before) leave the others alone."""
    conn = smtp(gateway, None, "submission")
    for i in range(6):
        assert auth_plain(conn, f"nobody{i}@medecin.mssante.fr", "x" * 10) == 535
    assert auth_plain(conn, CHRISTELLE, PRO_PASSWORD) == 235
    conn.quit()
    assert imap_login(gateway, INAYA, PATIENT_PASSWORD) == "OK"
