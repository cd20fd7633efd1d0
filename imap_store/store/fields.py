"""Small value types shared by the store and its synchronous operations."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(value: datetime) -> datetime:
    """SQLite gives naive datetimes back: they were written in UTC."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


@dataclass(frozen=True)
class StoredMessage:
    mailbox_id: int
    uid: int
    modseq: int
    blob_id: int


@dataclass(frozen=True)
class MessageFields:
    """Header fields derived once at delivery (ARCHITECTURE: compute once)."""

    message_id: str | None = None
    in_reply_to: str | None = None
    references: str | None = None
    subject: str | None = None
    from_addr: str | None = None
    sent_date: datetime | None = None
    thread_id: str | None = None  # the conversation (deliver.thread_id)
    has_attachments: bool = False
    from_name: str | None = None  # decoded display name of the first From: address
    meta: str | None = None  # JSON
    #: The case-folded ``blob_search`` columns (``deliver.search_values``), None without any.
    search: Mapping[str, str | None] | None = None
