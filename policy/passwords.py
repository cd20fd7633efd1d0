"""Password hashing with argon2id (memory-hard, SPEC §9); verification is constant-time.

Hashing costs tens of milliseconds of CPU: servers call these in a worker thread.

Verification of a hash with this module's parameters runs argon2 through its low-level API
with its 19 MiB work area kept per thread and reused: ``serve`` pins glibc's mmap threshold
(gateway/service.py, so big DATA buffers go back to the OS), under which argon2's own
allocation was a fresh mmap of 19 MiB at every login, every page of it faulted in again
(about 12 ms of kernel CPU per login). argon2 still wipes the area after each use (its
internal memory clearing, on by default, runs before the free callback). Hashes with other
parameters are verified by argon2-cffi's PasswordHasher as before.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hmac
import threading
from typing import Any

from argon2 import PasswordHasher, Type, extract_parameters
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from argon2.low_level import ARGON2_VERSION, core, ffi

#: argon2id parameters: 19 MiB, 2 passes, 1 lane (OWASP's minimum recommendation for argon2id).
ARGON2_MEMORY_KIB = 19 * 1024
ARGON2_TIME_COST = 2
ARGON2_PARALLELISM = 1

_hasher = PasswordHasher(
    time_cost=ARGON2_TIME_COST, memory_cost=ARGON2_MEMORY_KIB, parallelism=ARGON2_PARALLELISM
)


@functools.cache
def _dummy_hash() -> str:
    """Verified against when the account has no password, so timing does not reveal it.
    It has this module's parameters, so it takes the same (reused-area) path as a real one."""
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
    encoded = stored_hash or _dummy_hash()
    try:
        fast = _verify_in_reused_area(encoded, password)
        if fast is not None:
            return fast and stored_hash is not None
        return _hasher.verify(encoded, password) and stored_hash is not None
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


# --- argon2id with a work area kept per thread ------------------------------------------

_areas = threading.local()


def work_area_address() -> int | None:
    """Address of this thread's argon2 work area (None before its first verification):
    tests check that it is the same across verifications."""
    area = getattr(_areas, "area", None)
    return None if area is None else int(ffi.cast("uintptr_t", area))


def _allocate_area(memory: Any, size: int) -> int:
    """argon2's allocate_cbk: hand out this thread's area, made (zeroed) on first use."""
    memory[0] = ffi.NULL  # argon2 reports ARGON2_MEMORY_ALLOCATION_ERROR if left NULL
    try:
        area = getattr(_areas, "area", None)
        if area is None or getattr(_areas, "size", 0) < size:
            area = ffi.new("uint8_t[]", size)
            _areas.area, _areas.size = area, size
        memory[0] = area
    except MemoryError:
        return -1
    return 0


def _keep_area(memory: Any, size: int) -> None:
    """argon2's free_cbk: argon2 has already wiped the area; keep it for the next call."""


# C function pointers for argon2_context (kept alive here for the life of the process).
_allocate = ffi.callback("int(uint8_t **, size_t)", _allocate_area)
_keep = ffi.callback("void(uint8_t *, size_t)", _keep_area)
#: ARGON2_OK and ARGON2_DEFAULT_FLAGS of argon2.h (argon2.low_level exports no constants).
_ARGON2_OK = 0
_ARGON2_DEFAULT_FLAGS = 0


def _b64decode(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def _verify_in_reused_area(encoded: str, password: str) -> bool | None:
    """The verdict for a hash with this module's parameters; None for any other hash (the
    caller falls back to PasswordHasher). Raises InvalidHashError on a garbled hash."""
    params = extract_parameters(encoded)  # InvalidHashError on a garbled string
    if (params.type is not Type.ID or params.version != ARGON2_VERSION
            or params.memory_cost != ARGON2_MEMORY_KIB or params.time_cost != ARGON2_TIME_COST
            or params.parallelism != ARGON2_PARALLELISM):
        return None
    fields = encoded.split("$")  # '', 'argon2id', 'v=19', 'm=..,t=..,p=..', salt, hash
    if len(fields) != 6:
        raise InvalidHashError(encoded)
    try:
        salt, expected = _b64decode(fields[4]), _b64decode(fields[5])
    except (binascii.Error, ValueError) as exc:
        raise InvalidHashError(encoded) from exc
    secret = password.encode("utf-8")
    out = ffi.new("uint8_t[]", len(expected))
    pwd = ffi.new("uint8_t[]", secret)
    salt_c = ffi.new("uint8_t[]", salt)
    ctx = ffi.new("argon2_context *", dict(
        out=out, outlen=len(expected), pwd=pwd, pwdlen=len(secret), salt=salt_c,
        saltlen=len(salt), secret=ffi.NULL, secretlen=0, ad=ffi.NULL, adlen=0,
        t_cost=ARGON2_TIME_COST, m_cost=ARGON2_MEMORY_KIB, lanes=ARGON2_PARALLELISM,
        threads=ARGON2_PARALLELISM, version=ARGON2_VERSION, allocate_cbk=_allocate,
        free_cbk=_keep, flags=_ARGON2_DEFAULT_FLAGS,
    ))
    try:
        if core(ctx, Type.ID.value) != _ARGON2_OK:
            raise InvalidHashError(encoded)  # e.g. a salt or hash too short for argon2
        return hmac.compare_digest(ffi.buffer(out)[:], expected)
    finally:
        ffi.memmove(pwd, bytes(len(secret)), len(secret))  # the password copy, as argon2 would
