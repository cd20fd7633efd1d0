"""Notices and notifications come from templates/ (SPEC §6.2, §6.3): French, text + HTML,
one look, a basic accessibility check, no health data in notifications."""

from __future__ import annotations

import email
import email.policy
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from gateway.config import load_config, render_default_config
from gateway.wiring import notifier_settings
from outbound.notification import render_notification
from templates import DEFAULT_TEMPLATES_DIR, Templates


class _Audit(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.lang: str | None = None
        self.images_without_alt = 0
        self.styles: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "html":
            self.lang = a.get("lang")
        if tag == "img" and not a.get("alt"):
            self.images_without_alt += 1
        if a.get("style"):
            self.styles.append(a["style"] or "")


def _luminance(hex_colour: str) -> float:
    channels = [int(hex_colour[i:i + 2], 16) / 255 for i in (0, 2, 4)]
    lin = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
    return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]


def contrast(fg: str, bg: str) -> float:
    hi, lo = sorted((_luminance(fg), _luminance(bg)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


def audit_html(html: str) -> _Audit:
    audit = _Audit()
    audit.feed(html)
    return audit


@pytest.mark.parametrize("name", ["welcome", "end_of_exchange", "bounce", "notification"])
def test_html_templates_are_accessible(name: str) -> None:
    html = Templates().render(
        f"{name}.html.j2", subject="Objet", patient_name="Inaya Michel",
        patient_address="x@patient.mssante.fr", service_name="Messagerie",
        professional_name="Dr X", recipient="dr@medecin.mssante.fr", reason="refus",
        original_subject="Objet", login_url="https://example.org/")
    audit = audit_html(html)
    assert audit.lang == "fr"
    assert audit.images_without_alt == 0
    pairs = 0
    for style in audit.styles:
        fg = re.search(r"(?:^|;)\s*color:#([0-9a-fA-F]{6})", style)
        bg = re.search(r"background:#([0-9a-fA-F]{6})", style)
        if fg and bg:
            pairs += 1
            assert contrast(fg.group(1), bg.group(1)) >= 4.5, style
    assert pairs >= 1
    assert "{{" not in html and "Inaya Michel" in html


def test_notification_rendering(tmp_path: Path) -> None:
    cfg_path = tmp_path / "gateway.toml"
    cfg_path.write_text(render_default_config(domain="sante.test", hostname="h"), "utf-8")
    config = load_config(cfg_path)
    assert config.notifier.dkim_key is not None
    # init writes the key; a named key that is missing is a configuration error.
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    config.notifier.dkim_key.parent.mkdir(parents=True, exist_ok=True)
    config.notifier.dkim_key.write_bytes(rsa.generate_private_key(65537, 2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    settings = notifier_settings(config)
    data = render_notification(settings, Templates(), "Inaya Michel", "inaya@example.org")
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert msg["To"] == "inaya@example.org"
    assert msg["From"].addresses[0].addr_spec == "ne-pas-repondre@sante.test"
    text = msg.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert text.startswith("Bonjour Inaya Michel,")
    assert "professionnel de santé vous a envoyé un nouveau message" in text
    assert "https://sante.test/" in text


def test_templates_editable_without_code(tmp_path: Path) -> None:
    custom = tmp_path / "templates"
    custom.mkdir()
    for f in DEFAULT_TEMPLATES_DIR.glob("*.j2"):
        (custom / f.name).write_text(f.read_text("utf-8"), "utf-8")
    (custom / "notification.txt.j2").write_text("Coucou {{ patient_name }} !\n", "utf-8")
    text = Templates(custom).render("notification.txt.j2", patient_name="Inaya")
    assert text == "Coucou Inaya !\n"
