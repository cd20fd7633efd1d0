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


def canonical_detail(detail: dict[str, Any] | None) -> str:
    return json.dumps(detail or {}, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      default=str)


def chain_hash(
    prev_hash: str, at: datetime, actor: str, action: str, subject: str, detail: str
) -> str:
    """Hash of one row given the previous row's hash (``at`` in UTC, microseconds kept)."""
    payload = json.dumps(
        [prev_hash, at.strftime("%Y-%m-%dT%H:%M:%S.%f"), actor, action, subject, detail],
        separators=(",", ":"), ensure_ascii=True,
    )
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
