"""The audit chain (SPEC §9): each row carries the SHA-256 of the previous row's hash and its
own canonical content, so altering, deleting or reordering any row breaks verification."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

GENESIS_HASH = "0" * 64


@dataclass(frozen=True)
class AuditRecord:
    id: int
    at: datetime
    actor: str
    action: str
    subject: str
    detail: str  # canonical JSON
    prev_hash: str
    hash: str


_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                              default=str)
_PAYLOAD = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True)


def canonical_detail(detail: dict[str, Any] | None) -> str:
    return _CANONICAL.encode(detail or {})


def chain_stamp(at: datetime) -> str:
    """How a row's time stands in its hashed payload (UTC, microseconds kept)."""
    return at.strftime("%Y-%m-%dT%H:%M:%S.%f")


def chain_tail(stamp: str, actor: str, action: str, subject: str, detail: str) -> str:
    """What follows the previous row's hash in a row's hashed payload (``stamp``:
    :func:`chain_stamp`): the payload is ``'["' + prev_hash + '",' + tail`` (a hash is hex:
    nothing to escape), so a database can chain rows from tails alone."""
    return _PAYLOAD.encode([stamp, actor, action, subject, detail])[1:]


def chain_hash(
    prev_hash: str, at: datetime, actor: str, action: str, subject: str, detail: str
) -> str:
    """Hash of one row given the previous row's hash (``at`` in UTC, microseconds kept): the
    SHA-256 of the JSON list [prev_hash, at, actor, action, subject, detail]."""
    payload = "[" + _PAYLOAD.encode(prev_hash) + "," + chain_tail(
        chain_stamp(at), actor, action, subject, detail)
    return hashlib.sha256(payload.encode("ascii")).hexdigest()


def first_broken(records: list[AuditRecord]) -> tuple[int, str] | None:
    """Return (row id, reason) of the first row that does not verify, or None."""
    prev = GENESIS_HASH
    for rec in records:
        if rec.prev_hash != prev:
            return rec.id, "previous-hash link broken (a row was removed, inserted or altered)"
        expected = chain_hash(prev, rec.at, rec.actor, rec.action, rec.subject, rec.detail)
        if rec.hash != expected:
            return rec.id, "content does not match its hash (the row was altered)"
        prev = rec.hash
    return None
