"""Password logins for SMTP AUTH and IMAP LOGIN (SPEC §4.2, §9): patients by address or bare
INS, professionals by address. Throttled per account (the resolved identity) and per client
address, counts shared by every process (``policy.throttle``); argon2 runs in a thread."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

from policy.addresses import InvalidIdentity, parse_patient_login, patient_address
from policy.passwords import verify_password
from policy.rules import Identity, Role
from policy.throttle import LoginThrottle, Verdict, ip_key

#: argon2 runs on a small dedicated pool: each hash allocates 19 MiB, and glibc keeps freed
#: memory in per-thread arenas, so hashing on every default-executor thread let the process
#: grow by ~0.5 MiB per logged-in connection (bench/imap.py); two threads bound it.
_HASHERS = ThreadPoolExecutor(max_workers=2, thread_name_prefix="argon2")


async def _verify(stored: str | None, password: str) -> bool:
    return await asyncio.get_running_loop().run_in_executor(
        _HASHERS, verify_password, stored, password)


AuditHook = Callable[[str, str, str, dict[str, object]], None]  # actor, action, subject, detail


class PasswordHashes(Protocol):
    """Where the stored password hashes are read (implemented by the store)."""

    async def patient_password_hash(self, ins: str) -> tuple[int, str, str | None] | None:
        """``(patient id, state, argon2 hash or None)`` of a patient, None if unknown."""
        ...

    async def professional_password_hash(self, address: str) -> tuple[int, str | None] | None:
        """``(professional id, argon2 hash or None)`` of a professional, None if unknown."""
        ...


@dataclass(frozen=True)
class LoginResult:
    identity: Identity | None
    throttled: bool = False


@dataclass(eq=False)
class _Gate:
    """The attempts of one account in progress in this process."""

    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    checking: int = 0  # admitted, password being checked
    users: int = 0  # admitted or waiting


class Authenticator:
    def __init__(self, store: PasswordHashes, throttle: LoginThrottle, patient_domain: str,
                 audit: AuditHook | None = None) -> None:
        self.store = store
        self.throttle = throttle
        self.patient_domain = patient_domain
        self.audit = audit
        #: Accounts with attempts in progress in this process, and hot client addresses
        #: (their password checks run one at a time).
        self._gates: dict[str, _Gate] = {}
        self._hot: dict[str, tuple[asyncio.Lock, int]] = {}

    def account_key(self, login: str) -> str:
        """The identity a login's failures count against: a patient's INS (bare INS or full
        address, any letter case), else the lower-cased login (a professional's address)."""
        account = login.strip().lower()
        if "@" not in account or account.endswith("@" + self.patient_domain.lower()):
            try:
                return "ins:" + parse_patient_login(account, self.patient_domain.lower())
            except InvalidIdentity:
                pass
        return "login:" + account

    async def login(self, username: str, password: str, ip: str, service: str,
                    *, patients_only: bool = False) -> LoginResult:
        account = username.strip().lower()
        key = self.account_key(account)
        gate = self._gates.get(key) or _Gate()
        self._gates[key] = gate
        gate.users += 1
        try:
            verdict = await self._admit(gate, key, ip)
            if verdict.refused:  # during the account's wait: the password is not looked at
                self._audit(account, "login.throttled", service, ip,
                            retry_after=round(verdict.retry_after, 1))
                return LoginResult(None, throttled=True)
            try:
                identity = await self._verified(account, password, patients_only, ip,
                                                verdict.pause)
                if identity is None:
                    await self.throttle.failure(key, ip)
                elif verdict.account_failures:
                    await self.throttle.success(key)
            finally:
                async with gate.changed:
                    gate.checking -= 1
                    gate.changed.notify_all()
        finally:
            gate.users -= 1
            if not gate.users:
                del self._gates[key]
        if identity is None:
            self._audit(account, "login.failed", service, ip)
            return LoginResult(None)
        self._audit(identity.address or account, "login", service, ip)
        return LoginResult(identity)

    async def _admit(self, gate: _Gate, key: str, ip: str) -> Verdict:
        """The throttle's verdict once this attempt may be checked: no more attempts of the
        account are checked at once in this process than ``Verdict.parallel``."""
        async with gate.changed:
            while True:
                verdict = await self.throttle.check(key, ip)
                if verdict.refused:
                    return verdict
                if gate.checking < verdict.parallel:
                    gate.checking += 1
                    return verdict
                await gate.changed.wait()  # another attempt's outcome may change the verdict

    async def _verified(self, account: str, password: str, patients_only: bool, ip: str,
                        pause: float) -> Identity | None:
        """The password check; from a hot address one at a time, each after ``pause``."""
        if not pause:
            return await self._check(account, password, patients_only)
        name = ip_key(ip)
        lock, users = self._hot.get(name) or (asyncio.Lock(), 0)
        self._hot[name] = (lock, users + 1)
        try:
            async with lock:
                await asyncio.sleep(pause)
                return await self._check(account, password, patients_only)
        finally:
            lock, users = self._hot[name]
            if users <= 1:
                del self._hot[name]
            else:
                self._hot[name] = (lock, users - 1)

    async def _check(self, account: str, password: str, patients_only: bool) -> Identity | None:
        looks_like_patient = "@" not in account or account.endswith("@" + self.patient_domain)
        if looks_like_patient:
            try:
                ins = parse_patient_login(account, self.patient_domain)
            except InvalidIdentity:
                await _verify(None, password)
                return None
            row = await self.store.patient_password_hash(ins)
            # A missing account is verified against a dummy hash: the same time either way.
            if not await _verify(row and row[2], password) or row is None or row[1] != "open":
                return None
            return Identity(Role.PATIENT, address=patient_address(ins, self.patient_domain),
                            account_id=row[0])
        if patients_only:
            await _verify(None, password)
            return None
        pro = await self.store.professional_password_hash(account)
        if not await _verify(pro and pro[1], password) or pro is None:
            return None
        return Identity(Role.PROFESSIONAL, address=account, account_id=pro[0])

    def _audit(self, who: str, action: str, service: str, ip: str, **extra: object) -> None:
        if self.audit is not None:
            self.audit(who, action, service, {"ip": ip, **extra})
