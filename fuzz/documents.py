"""The portal's upload checks (issue 12 and 16): what the patient sends as a health document.

``control`` picks the check (its low two bits):

0. content sniffing (``web/sniff.py``: PDF opened with pypdf, plain text, RTF, JPEG, TIFF, PNG,
   at most 5,000,000 bytes): never raises; a file is accepted only with the media type its
   first bytes announce (text: decodable, no control character), else refused with a reason;
1. document names (``name_problem``, ``default_name``): never raise; an accepted name has at
   most 50 characters, no forbidden or control character; the name made from an attachment's
   file name is always accepted;
2. dates typed in the form (``parse_date``): a date comes only from ``AAAA-MM-JJ`` or
   ``JJ/MM/AAAA`` in ASCII digits;
3. medical profile entries (``entry_problem``): never raise; accepted only within bounds.

The time budget (fuzz.common) holds for each, pypdf included.
"""

from __future__ import annotations

import re

from fuzz.common import Finding, Harness, joined_pieces, piece_fragments, short, usual_payloads
from imap_store.store.documents import (
    FORBIDDEN_NAME_CHARS,
    MAX_DOCUMENT_BYTES,
    MAX_ENTRY_DETAIL,
    MAX_ENTRY_LABEL,
    MAX_NAME_CHARS,
    PROFILE_SECTIONS,
    entry_problem,
    name_problem,
)
from web.documents_pages import default_name, parse_date
from web.sniff import LABELS, check_document

_MAGIC = {
    "application/pdf": (b"%PDF-",),
    "image/jpeg": (b"\xff\xd8\xff",),
    "image/png": (b"\x89PNG\r\n\x1a\n",),
    "image/tiff": (b"II*\x00", b"MM\x00*"),
    "application/rtf": (b"{\\rtf",),
}
_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}|[0-9]{1,2}/[0-9]{1,2}/[0-9]{4}")
_SECTIONS = sorted(PROFILE_SECTIONS)


def _text(payload: bytes) -> str:
    return payload.decode("utf-8", "replace")


def _check_sniff(payload: bytes) -> None:
    verdict = check_document(payload)
    if verdict.media is None:
        if not verdict.reason:
            raise Finding("mismatch", "refused without a reason")
        return
    if verdict.media not in LABELS:
        raise Finding("mismatch", f"unknown media type {verdict.media!r}")
    if len(payload) > MAX_DOCUMENT_BYTES:
        raise Finding("mismatch", f"{len(payload)} bytes accepted")
    if verdict.media == "text/plain":
        text = None
        for codec in ("utf-8-sig", "cp1252"):
            try:
                text = payload.decode(codec)
                break
            except UnicodeDecodeError:
                continue
        if text is None or any(ord(c) < 32 and c not in "\t\n\f\r" for c in text):
            raise Finding("mismatch", f"not plain text accepted as text: {short(payload)}")
    elif not payload.startswith(_MAGIC[verdict.media]):
        raise Finding("mismatch", f"{verdict.media} accepted without its signature: "
                                  f"{short(payload)}")


def _check_names(payload: bytes) -> None:
    text = _text(payload)
    if name_problem(text) is None and (
            len(text) > MAX_NAME_CHARS or not text.strip()
            or any(c in FORBIDDEN_NAME_CHARS or ord(c) < 32 or ord(c) == 127 for c in text)):
        raise Finding("mismatch", f"name accepted: {text!r}")
    made = default_name(text)
    problem = name_problem(made)
    if problem is not None:
        raise Finding("mismatch", f"default_name({text!r}) = {made!r} is refused: {problem}")


def _check_date(payload: bytes) -> None:
    text = _text(payload)
    if parse_date(text) is not None and not _DATE.fullmatch(text.strip()):
        raise Finding("mismatch", f"date accepted from {text!r}: {parse_date(text)}")


def _check_entry(payload: bytes, control: int) -> None:
    text = _text(payload)
    section = _SECTIONS[(control >> 2) % len(_SECTIONS)] if control & 16 else text[:20]
    label, _, detail = text.partition("|")
    if entry_problem(section, label, detail) is None and (
            section not in PROFILE_SECTIONS or not label.strip()
            or len(label) > MAX_ENTRY_LABEL or len(detail) > MAX_ENTRY_DETAIL):
        raise Finding("mismatch", f"entry accepted: {section!r} {short(payload)}")


def _target(payload: bytes, control: int) -> object:
    kind = control & 3
    if kind == 0:
        return check_document(payload)
    if kind == 1:
        return name_problem(_text(payload)), default_name(_text(payload))
    if kind == 2:
        return parse_date(_text(payload))
    return entry_problem("", _text(payload), "")


def _run(payload: bytes, control: int) -> None:
    kind = control & 3
    if kind == 0:
        _check_sniff(payload)
    elif kind == 1:
        _check_names(payload)
    elif kind == 2:
        _check_date(payload)
    else:
        _check_entry(payload, control)


_PIECES = [b"%PDF-1.4\n", b"%%EOF\n", b"1 0 obj\n<< /Type /Catalog /Pages 2 0 R >>\nendobj\n",
           b"trailer\n<< /Root 1 0 R /Encrypt 3 0 R >>\n", b"xref\n0 1\n0000000000 65535 f \n",
           b"startxref\n9\n", b"stream\n", b"endstream\n", b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n",
           b"II*\x00", b"{\\rtf1 ", b"Bonjour\r\n", b"\x00", b"\x1b", b"\xe9", b"\xc3\xa9",
           b"/", b"-", b"2026", b"12", b"\xd9\xa3", b"_", b" ", b"\\", b":", b"*", b"|", b"<>",
           b"(", b")", b"[", b"]", b"<<", b">>", b"0 R ", b"/Length 99999999 "]


HARNESS = Harness(
    "documents", "portal uploads: content sniffing (pypdf), names, dates, profile entries",
    _run, _target,
    payloads=usual_payloads(joined_pieces(_PIECES, 40)),
    fragments=piece_fragments(_PIECES),
    openers=(b"%PDF-1.4\n", b"{\\rtf1 ", b"\x89PNG\r\n\x1a\n"),
    middles=(b"1 0 obj\n<< /Kids [", b"[[[[", b"<<<<", b"(((("),
    max_amplified=128 * 1024,
)
