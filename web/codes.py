"""Where the portal's one-time code goes (SPEC §11): the patient's personal address, through
the notifier relay, or their phone, through a configured SMS program (in development, a file)."""

from __future__ import annotations

import asyncio
import secrets
from typing import Protocol

from web.settings import WebSettings

SMS_TIMEOUT = 30.0


class CodeMailer(Protocol):
    """Sends a code by e-mail (implemented by ``outbound.notification.CodeMailer``)."""

    @property
    def available(self) -> bool: ...

    async def send_code(self, to: str, patient_name: str, code: str) -> None: ...


def new_code() -> str:
    return f"{secrets.randbelow(10**6):06d}"


def sms_available(settings: WebSettings) -> bool:
    return bool(settings.sms_command) or settings.sms_outbox is not None


async def send_sms(settings: WebSettings, number: str, text: str) -> None:
    """Run ``sms_command NUMBER TEXT`` (never through a shell), or append to the outbox."""
    if settings.sms_command:
        proc = await asyncio.create_subprocess_exec(
            settings.sms_command, number, text, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        try:
            code = await asyncio.wait_for(proc.wait(), SMS_TIMEOUT)
        except TimeoutError:
            proc.kill()
            raise OSError("the SMS program did not finish in time") from None
        if code != 0:
            raise OSError(f"the SMS program exited {code}")
        return
    if settings.sms_outbox is not None:
        line = f"{number}\t{text}\n"
        await asyncio.to_thread(_append, settings.sms_outbox, line)
        return
    raise OSError("no SMS sender configured ([web] sms_command)")


def _append(path: object, line: str) -> None:
    with open(str(path), "a", encoding="utf-8") as f:
        f.write(line)


def mask_email(address: str) -> str:
    local, _, domain = address.partition("@")
    return f"{local[:1]}{'•' * max(1, min(len(local) - 1, 6))}@{domain}"


def mask_phone(number: str) -> str:
    digits = "".join(c for c in number if c.isdigit())
    return "•• •• •• •• " + digits[-2:] if len(digits) >= 2 else "••"
