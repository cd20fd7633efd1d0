"""The Jinja2 templates of the gateway (notices, notification mails) and their loader.

The notices the gateway places in a patient's mailbox (SPEC §6.3) are built from them by
``imap_store.store.notices``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

DEFAULT_TEMPLATES_DIR = Path(__file__).resolve().parent


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
