"""Password logins for SMTP AUTH and IMAP LOGIN (SPEC §4.2, §9): patients by address or bare
INS, professionals by address. Throttled per account and per IP; argon2 runs in a thread."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from policy.addresses import InvalidIdentity, parse_patient_login, patient_address
from policy.passwords import verify_password
from policy.rules import Identity, Role
from policy.throttle import LoginThrottle

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


class Authenticator:
    def __init__(self, store: PasswordHashes, throttle: LoginThrottle, patient_domain: str,
                 audit: AuditHook | None = None) -> None:
        self.store = store
        self.throttle = throttle
        self.patient_domain = patient_domain
        self.audit = audit

    async def login(self, username: str, password: str, ip: str, service: str,
                    *, patients_only: bool = False) -> LoginResult:
        account = username.strip().lower()
        if self.throttle.blocked(account, ip):
            self._audit(account, "login.throttled", service, ip)
            return LoginResult(None, throttled=True)
        identity = await self._check(account, password, patients_only)
        if identity is None:
            self.throttle.failure(account, ip)
            self._audit(account, "login.failed", service, ip)
        else:
            self.throttle.success(account)
            self._audit(identity.address or account, "login", service, ip)
        return LoginResult(identity)

    async def _check(self, account: str, password: str, patients_only: bool) -> Identity | None:
        looks_like_patient = "@" not in account or account.endswith("@" + self.patient_domain)
        if looks_like_patient:
            try:
                ins = parse_patient_login(account, self.patient_domain)
            except InvalidIdentity:
                await _verify(None, password)
                return None
            row = await self.store.patient_password_hash(ins)
            stored = row[2] if row is not None else None
            ok = await _verify(stored, password)
            if not ok or row is None or row[1] != "open":
                return None
            return Identity(Role.PATIENT, address=patient_address(ins, self.patient_domain),
                            account_id=row[0])
        if patients_only:
            await _verify(None, password)
            return None
        pro = await self.store.professional_password_hash(account)
        stored = pro[1] if pro is not None else None
        ok = await _verify(stored, password)
        if not ok or pro is None:
            return None
        return Identity(Role.PROFESSIONAL, address=account, account_id=pro[0])

    def _audit(self, who: str, action: str, service: str, ip: str) -> None:
        if self.audit is not None:
            self.audit(who, action, service, {"ip": ip})
