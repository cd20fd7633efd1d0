"""Which files may become health documents: decided by their content, never by their name
(issue 12). Accepted: PDF (opened with pypdf; refused when it does not parse or is encrypted),
plain text, RTF, JPEG, TIFF and PNG, at most ``MAX_DOCUMENT_BYTES``. Anything else keeps only
"Télécharger", with the reason shown."""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass

from imap_store.store.documents import MAX_DOCUMENT_BYTES

#: Images recognised by their first bytes.
_IMAGES = (
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"II*\x00", "image/tiff"),
    (b"MM\x00*", "image/tiff"),
)
#: Control characters plain text may hold (tab, line feed, form feed, carriage return).
_TEXT_CONTROLS = {9, 10, 12, 13}

LABELS = {"application/pdf": "PDF", "text/plain": "texte", "application/rtf": "RTF",
          "image/jpeg": "JPEG", "image/tiff": "TIFF", "image/png": "PNG"}


@dataclass(frozen=True)
class Verdict:
    """``media`` when the file may be kept, else ``reason`` (French, shown to the patient)."""

    media: str | None
    reason: str | None = None


_UNREADABLE = "Ce PDF est illisible : il ne peut être ajouté à vos documents."


def _refuse(reason: str) -> Verdict:
    return Verdict(None, reason)


def _pdf(data: bytes) -> Verdict:
    from pypdf import PdfReader  # here: only a PDF needs it, not each start of serve
    from pypdf.generic import DictionaryObject

    logging.getLogger("pypdf").setLevel(logging.ERROR)  # a damaged file is not our warning
    try:
        # strict: a damaged file is refused, not repaired. pypdf's repair scans the file for
        # objects again and again: a 778-byte damaged PDF cost 0.33 s of CPU and 200 KB of it
        # 8 s (fuzz/documents.py), where a sound PDF of any size opens in milliseconds.
        reader = PdfReader(io.BytesIO(data), strict=True)
        if reader.is_encrypted:
            return _refuse("Ce PDF est protégé par un mot de passe : il ne peut être ajouté "
                           "à vos documents.")
        # A trailer without a catalog makes pypdf search up to 10,000 objects for one, a regex
        # compiled per object: 0.35 s of CPU for 1.4 KB (fuzz/documents.py). Refuse instead.
        root = reader.trailer.get("/Root")
        catalog = root.get_object() if root is not None else None
        if not isinstance(catalog, DictionaryObject) or catalog.get("/Type") != "/Catalog":
            return _refuse(_UNREADABLE)
        if len(reader.pages) < 1:
            return _refuse("Ce PDF n'a aucune page.")
    except Exception:
        # Any failure of the third-party parser on hostile bytes means unreadable: the list
        # of pypdf's exceptions was never complete (an OverflowError from a huge startxref).
        return _refuse(_UNREADABLE)
    return Verdict("application/pdf")


def _is_text(data: bytes) -> bool:
    if not data.strip():
        return False
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        try:
            text = data.decode("cp1252")  # Windows' Western European text
        except UnicodeDecodeError:
            return False
    return all((ord(c) >= 32 and ord(c) != 127) or ord(c) in _TEXT_CONTROLS for c in text)


def check_document(data: bytes) -> Verdict:
    """Whether ``data`` may become a health document, by its size and content."""
    if len(data) > MAX_DOCUMENT_BYTES:
        return _refuse(f"Ce fichier dépasse {MAX_DOCUMENT_BYTES // 1_000_000} Mo : il ne peut "
                       "être ajouté à vos documents.")
    if not data:
        return _refuse("Ce fichier est vide.")
    if data.startswith(b"%PDF-"):
        return _pdf(data)
    for magic, media in _IMAGES:
        if data.startswith(magic):
            return Verdict(media)
    if data.startswith(b"{\\rtf"):
        return Verdict("application/rtf")
    if _is_text(data):
        return Verdict("text/plain")
    return _refuse("Ce type de fichier n'est pas accepté dans vos documents (acceptés : PDF, "
                   "texte, RTF, JPEG, TIFF, PNG).")
