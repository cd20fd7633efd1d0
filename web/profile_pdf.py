"""The medical profile's PDF summary ("Synthèse de mon profil médical"), attached to a reply as
``Profil_medical_<Prénom><Nom>.pdf`` (walkthrough "J'ajoute un document à mon message").

Written with fpdf2 (pure Python, small, kept up to date) and its core Helvetica font, whose
encoding is Latin-1 (Windows-1252 in practice): French text fits; other characters are
replaced by close ASCII forms or "?"."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from datetime import date, datetime

from fpdf import FPDF

from imap_store.store.documents import PROFILE_SECTIONS, ProfileEntry

_REPLACE = {"’": "'", "‘": "'", "“": '"', "”": '"', "–": "-", "—": "-", "…": "...",
            "œ": "oe", "Œ": "OE", "€": "EUR", "\u00a0": " ", "\u202f": " "}


def _latin1(text: str) -> str:
    """``text`` as the core font can draw it."""
    out = []
    for c in text:
        c = _REPLACE.get(c, c)
        if len(c) == 1 and ((ord(c) < 32 and c not in "\n") or 127 <= ord(c) < 160):
            c = " "
        try:
            c.encode("latin-1")
        except UnicodeEncodeError:
            c = unicodedata.normalize("NFKD", c).encode("ascii", "ignore").decode() or "?"
        out.append(c)
    return "".join(out)


def filename(name: str) -> str:
    """``Profil_medical_<Prénom><Nom>.pdf``: the patient's name without spaces nor signs."""
    compact = re.sub(r"[^\w-]", "", name.replace(" ", ""))
    return f"Profil_medical_{compact or 'patient'}.pdf"


def _fr(value: date) -> str:
    return f"{value:%d/%m/%Y}"


def profile_pdf(patient_name: str, entries: Sequence[ProfileEntry], generated: datetime) -> bytes:
    """The summary: title, the patient's name, every section with its entries, the date."""
    pdf = FPDF(format="A4")
    pdf.set_title("Synthèse de mon profil médical")
    pdf.set_author(_latin1(patient_name))
    pdf.set_creator("mssante-gateway")
    pdf.set_auto_page_break(auto=True, margin=15)
    pdf.add_page()
    width = pdf.epw
    pdf.set_font("Helvetica", "B", 18)
    pdf.multi_cell(width, 10, _latin1("Synthèse de mon profil médical"),
                   new_x="LMARGIN", new_y="NEXT")
    pdf.set_font("Helvetica", "", 12)
    pdf.multi_cell(width, 7, _latin1(patient_name), new_x="LMARGIN", new_y="NEXT")
    pdf.multi_cell(width, 7, _latin1(f"Générée le {_fr(generated.date())} à "
                                     f"{generated:%H:%M}"), new_x="LMARGIN", new_y="NEXT")
    for section, title in PROFILE_SECTIONS.items():
        pdf.ln(4)
        pdf.set_font("Helvetica", "B", 14)
        pdf.multi_cell(width, 8, _latin1(title), new_x="LMARGIN", new_y="NEXT")
        pdf.set_font("Helvetica", "", 11)
        rows = [e for e in entries if e.section == section]
        if not rows:
            pdf.multi_cell(width, 6, _latin1("Aucune information renseignée."),
                           new_x="LMARGIN", new_y="NEXT")
        for e in rows:
            line = e.label + (f" ({_fr(e.entry_date)})" if e.entry_date else "")
            if e.detail:
                line += f" : {e.detail}"
            pdf.multi_cell(width, 6, _latin1(f"- {line}"), new_x="LMARGIN", new_y="NEXT")
    return bytes(pdf.output())
