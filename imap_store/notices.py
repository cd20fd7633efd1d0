"""Messages the gateway itself places in a patient's mailbox (SPEC §6.3): welcome,
end-of-exchange and bounce notices, rendered from the Jinja2 templates in ``templates/``."""

from __future__ import annotations

from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime, formataddr, make_msgid
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

DEFAULT_TEMPLATES_DIR = Path(__file__).resolve().parent.parent / "templates"


class Templates:
    """A Jinja2 environment over a templates folder (editable without touching code)."""

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory or DEFAULT_TEMPLATES_DIR
        self.env = Environment(
            loader=FileSystemLoader(str(self.directory)),
            autoescape=select_autoescape(enabled_extensions=("html", "html.j2")),
            undefined=StrictUndefined,
            keep_trailing_newline=True,
        )

    def render(self, name: str, **context: Any) -> str:
        return self.env.get_template(name).render(**context)

    def notice(
        self,
        name: str,
        *,
        sender: str,
        sender_name: str,
        to: str,
        subject: str,
        domain: str,
        in_reply_to: str | None = None,
        references: str | None = None,
        **context: Any,
    ) -> bytes:
        """Render ``name.txt.j2`` and ``name.html.j2`` into one multipart/alternative message."""
        ctx = {"subject": subject, **context}
        text = self.render(f"{name}.txt.j2", **ctx)
        html = self.render(f"{name}.html.j2", **ctx)
        msg = EmailMessage()
        msg["From"] = formataddr((sender_name, sender))
        msg["To"] = to
        msg["Subject"] = subject
        msg["Date"] = format_datetime(datetime.now(UTC))
        msg["Message-ID"] = make_msgid(domain=domain)
        msg["Auto-Submitted"] = "auto-generated"
        if in_reply_to:
            msg["In-Reply-To"] = in_reply_to
            msg["References"] = references or in_reply_to
        msg.set_content(text, subtype="plain", charset="utf-8", cte="quoted-printable")
        msg.add_alternative(html, subtype="html", charset="utf-8", cte="quoted-printable")
        return msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))
