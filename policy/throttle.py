"""Failed-login throttling (SPEC §9), shared by SMTP, IMAP and the portal, and by every
``serve`` process: the counts live where :class:`FailureCounts` keeps them (the store's
``login_failure`` table; :class:`MemoryFailureCounts` for one process and the tests). The
arithmetic is here, pure: what a record becomes after a failure, how long an account waits.

Per account (the resolved identity: a patient's INS, however typed; a professional's or an
unknown login's lower-cased text):

- after ``max_failures`` failures, each further attempt waits ``2 ** (n - max_failures)``
  seconds after the last failure (``n`` failures so far: 1 s, 2 s, 4 s ... capped at
  ``max_delay``). An attempt during the wait is refused without checking the password (it
  does not count as a failure);
- the failures are forgotten ``window`` seconds after the wait ends with no new failure, or at
  once by a successful login;
- no more of its attempts are checked at once (in one process) than may fail before its next
  wait (``Verdict.parallel``): parallel connections get no extra guesses.

Per client address (IPv4, or the /64 of an IPv6 address): ``per_ip`` failures within
``window`` seconds of the first one make the address *hot* until that window ends. A hot
address is slowed, never locked out:

- an account that has failures of its own waits from its first failure (``2 ** (n - 1)`` s)
  when it logs in from there;
- the password checks from there are taken one at a time in each process, each after
  :data:`HOT_IP_PAUSE` seconds (see ``policy.authn``), so an address spraying many accounts
  gets about one guess a second per process, while the right password of an account with no
  failures still logs in.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

#: Seconds a password check from a hot address waits before it runs (one at a time).
HOT_IP_PAUSE = 1.0
#: Default ``[limits]`` values (gateway/config.py reads the same numbers).
DEFAULT_PER_IP = 100
DEFAULT_MAX_DELAY = 900  # 15 minutes


@dataclass(frozen=True, slots=True)
class FailureRecord:
    """Failed logins of one key: how many, the first and the last (wall-clock seconds), and
    when the record is forgotten."""

    failures: int
    first_at: float
    last_at: float
    expires_at: float

    def live(self, now: float) -> bool:
        return now < self.expires_at


#: What a key's record becomes after one more failure (None: no live record yet).
Step = Callable[["FailureRecord | None"], FailureRecord]


class FailureCounts(Protocol):
    """Where the failure records are kept (implemented by the store: one table shared by
    every process)."""

    async def read(self, keys: Sequence[str]) -> dict[str, FailureRecord]:
        """The records of ``keys`` that exist (expired ones included)."""
        ...

    async def update(self, steps: Mapping[str, Step]) -> None:
        """For each key, atomically (no other process in between): read its record and
        write ``step(record)``; durable before returning."""
        ...

    async def clear(self, key: str) -> None:
        """Forget the record of ``key``."""
        ...


# --- the arithmetic --------------------------------------------------------------------------


def backoff(failures: int, threshold: int, cap: float) -> float:
    """Seconds to wait after the last of ``failures`` failures: none below ``threshold``,
    then ``2 ** (failures - threshold)``, at most ``cap``."""
    if threshold < 1 or failures < threshold:
        return 0.0
    excess = failures - threshold
    return float(cap) if excess >= 62 else float(min(2 ** excess, cap))


@dataclass(frozen=True, slots=True)
class Limits:
    max_failures: int  # per account, before the backoff starts
    window: float  # seconds
    per_ip: int  # failures per address in ``window`` before it is hot
    max_delay: float  # seconds, the longest wait of an account


def account_after_failure(old: FailureRecord | None, now: float,
                          limits: Limits) -> FailureRecord:
    """An account's record after one more failure at ``now``."""
    if old is None or not old.live(now):
        failures, first = 1, now
    else:
        failures, first = old.failures + 1, old.first_at
    wait = backoff(failures, limits.max_failures, limits.max_delay)
    return FailureRecord(failures, first, now, now + wait + limits.window)


def ip_after_failure(old: FailureRecord | None, now: float, limits: Limits) -> FailureRecord:
    """An address's record after one more failure: counted in a window of ``window`` seconds
    from the first failure."""
    if old is None or not old.live(now):
        return FailureRecord(1, now, now, now + limits.window)
    return FailureRecord(old.failures + 1, old.first_at, now, old.expires_at)


@dataclass(frozen=True, slots=True)
class Verdict:
    """Whether a login attempt may check its password now."""

    refused: bool
    retry_after: float = 0.0  # when refused: seconds until the account may try again
    pause: float = 0.0  # when allowed: seconds to wait first (hot address)
    account_failures: int = 0  # live failures of the account (a success clears them)
    hot_ip: bool = False
    #: Attempts of the account that may be checked at once: if they all fail, the account has
    #: no more failures than it may make before its next wait (parallel connections get no
    #: extra guesses).
    parallel: int = 1


def decide(account: FailureRecord | None, ip: FailureRecord | None, now: float,
           limits: Limits) -> Verdict:
    """The throttle's decision for one attempt, from the account's and the address's
    records."""
    failures = account.failures if account is not None and account.live(now) else 0
    hot = ip is not None and ip.live(now) and ip.failures >= limits.per_ip
    threshold = 1 if hot else limits.max_failures
    if account is not None and failures:
        ready = account.last_at + backoff(failures, threshold, limits.max_delay)
        if now < ready:
            return Verdict(True, retry_after=ready - now, account_failures=failures,
                           hot_ip=hot)
    return Verdict(False, pause=HOT_IP_PAUSE if hot else 0.0, account_failures=failures,
                   hot_ip=hot, parallel=max(1, threshold - failures))


def ip_key(ip: str) -> str:
    """An address as counted: IPv4 as is (IPv4-mapped IPv6 too), IPv6 by its /64 (one
    subscriber's prefix)."""
    try:
        addr = ipaddress.ip_address(ip.strip().strip("[]"))
    except ValueError:
        return ip.strip().lower()
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr)


# --- the throttle ----------------------------------------------------------------------------


class LoginThrottle:
    """The throttle of one process over a shared :class:`FailureCounts` (in memory when none
    is given). ``account`` arguments are resolved identities (see ``policy.authn``)."""

    def __init__(self, max_failures: int, window: float,
                 clock: Callable[[], float] = time.time, *, per_ip: int = DEFAULT_PER_IP,
                 max_delay: float = DEFAULT_MAX_DELAY,
                 counts: FailureCounts | None = None) -> None:
        self.limits = Limits(max_failures, window, per_ip, max_delay)
        self.clock = clock
        self.counts: FailureCounts = counts if counts is not None else MemoryFailureCounts()

    @staticmethod
    def _keys(account: str, ip: str) -> tuple[str, str]:
        return f"account:{account}", f"ip:{ip_key(ip)}"

    async def check(self, account: str, ip: str) -> Verdict:
        akey, ikey = self._keys(account, ip)
        records = await self.counts.read([akey, ikey])
        return decide(records.get(akey), records.get(ikey), self.clock(), self.limits)

    async def failure(self, account: str, ip: str) -> None:
        akey, ikey = self._keys(account, ip)
        now, limits = self.clock(), self.limits
        await self.counts.update({
            akey: lambda old: account_after_failure(old, now, limits),
            ikey: lambda old: ip_after_failure(old, now, limits),
        })

    async def success(self, account: str) -> None:
        await self.counts.clear(f"account:{account}")


class MemoryFailureCounts:
    """:class:`FailureCounts` in this process's memory (one process, tests)."""

    #: Most keys remembered; expired ones, then the oldest, are forgotten first.
    MAX_KEYS = 100_000

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._records: dict[str, FailureRecord] = {}

    async def read(self, keys: Sequence[str]) -> dict[str, FailureRecord]:
        return {k: self._records[k] for k in keys if k in self._records}

    async def update(self, steps: Mapping[str, Step]) -> None:
        for key, step in steps.items():
            record = step(self._records.pop(key, None))
            if len(self._records) >= self.MAX_KEYS:
                self._forget()
            self._records[key] = record  # (re)inserted last: the dict is oldest first

    async def clear(self, key: str) -> None:
        self._records.pop(key, None)

    def _forget(self) -> None:
        now = self.clock()
        for key in [k for k, r in self._records.items() if not r.live(now)]:
            del self._records[key]
        if len(self._records) >= self.MAX_KEYS:  # all live: drop the oldest tenth at once
            for key in list(self._records)[: self.MAX_KEYS // 10 or 1]:
                del self._records[key]
