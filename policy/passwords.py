"""Password hashing with argon2id (memory-hard, SPEC §9); verification is constant-time.

Hashing costs tens of milliseconds of CPU: servers call these in a worker thread.
"""

from __future__ import annotations

import functools

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

#: argon2id parameters: 19 MiB, 2 passes, 1 lane (OWASP's minimum recommendation for argon2id).
ARGON2_MEMORY_KIB = 19 * 1024
ARGON2_TIME_COST = 2
ARGON2_PARALLELISM = 1

_hasher = PasswordHasher(
    time_cost=ARGON2_TIME_COST, memory_cost=ARGON2_MEMORY_KIB, parallelism=ARGON2_PARALLELISM
)


@functools.cache
def _dummy_hash() -> str:
    """Verified against when the account has no password, so timing does not reveal it."""
    return _hasher.hash("not a password of anyone")

MAX_PASSWORD_LENGTH = 1024


class WeakPassword(ValueError):
    pass


def hash_password(password: str) -> str:
    if len(password) < 8:
        raise WeakPassword("password too short: at least 8 characters")
    if len(password) > MAX_PASSWORD_LENGTH:
        raise WeakPassword(f"password too long: at most {MAX_PASSWORD_LENGTH} characters")
    return _hasher.hash(password)


def verify_password(stored_hash: str | None, password: str) -> bool:
    """True when ``password`` matches; a missing hash still costs one verification."""
    if len(password) > MAX_PASSWORD_LENGTH:
        return False
    try:
        return _hasher.verify(stored_hash or _dummy_hash(), password) and stored_hash is not None
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False
