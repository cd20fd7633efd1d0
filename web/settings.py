"""What the portal is told by the composition root (``gateway/``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class WebSettings:
    host: str
    port: int
    patient_domain: str
    service_name: str = "Messagerie sécurisée de santé"
    #: Seconds without a request before a session ends.
    session_idle: int = 900
    #: The one-time code: seconds it stays valid, tries before a new one must be asked for.
    code_ttl: int = 600
    code_tries: int = 5
    #: A program run as ``PROGRAM NUMBER TEXT`` to send the code by SMS ("" = none).
    sms_command: str = ""
    #: A file the SMS are appended to instead (development; None = none).
    sms_outbox: Path | None = None
    #: Days a deleted conversation stays in Trash before it is purged.
    trash_days: int = 30
    #: Bytes of health documents one patient may keep (``[documents] quota_bytes``).
    documents_quota: int = 200_000_000
