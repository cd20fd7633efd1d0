"""Section extraction (FETCH BODY[...]) and the decoded text used by SEARCH.

The public entry point for the search text, :func:`imap_store.mime.text_for_search`,
is in :mod:`.message` because it reuses the tree cached in ``MessageInfo``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from imap_store.mime.headers import (
    _decode_body,
    _decode_charset,
    _hval,
    _l1,
    _param_text,
    _parse_headers,
    decode_rfc2047,
)
from imap_store.mime.structure import _build_tree, _cte, _Entity, _iter_message_parts, _resolve

# The name the single module had: log filters and tests rely on it.
log = logging.getLogger("imap_store.mime")

# --------------------------------------------------------------------------
# Sections and search text
# --------------------------------------------------------------------------


def _header_fields(raw: bytes, m: _Entity, names: Sequence[str], negate: bool) -> bytes:
    wanted = {n.strip().lower() for n in names}
    out: list[bytes] = []
    for h in m.headers:
        if (h.name in wanted) != negate:
            chunk = raw[h.start : h.end]
            out.append(chunk if chunk.endswith(b"\n") else chunk + b"\r\n")
    out.append(b"\r\n")
    return b"".join(out)


def _message_section(raw: bytes, m: _Entity, kind: str, fields: Sequence[str]) -> bytes:
    if kind == "HEADER":
        return raw[m.start : m.body_start]
    if kind == "TEXT":
        return raw[m.body_start : m.end]
    if kind == "HEADER.FIELDS":
        return _header_fields(raw, m, fields, False)
    if kind == "HEADER.FIELDS.NOT":
        return _header_fields(raw, m, fields, True)
    return b""


def _get_section(raw: bytes, part: Sequence[int], kind: str | None, fields: Sequence[str]) -> bytes:
    k = kind.strip().upper() if kind else None
    if not part and k is None:
        return raw
    if not part:
        if k == "MIME":
            return b""
        headers, body_start = _parse_headers(raw, 0, len(raw))  # no need for the tree
        root = _Entity(0, body_start, len(raw), headers, {})
        return _message_section(raw, root, k or "", fields)
    ent = _resolve(_build_tree(raw), part)
    if ent is None:
        return b""
    if k is None:
        return raw[ent.body_start : ent.end]
    if k == "MIME":
        return raw[ent.start : ent.body_start]
    if ent.message is None:
        return b""
    return _message_section(raw, ent.message, k, fields)


def get_section(
    raw: bytes, part: tuple[int, ...], kind: str | None, fields: tuple[str, ...] = ()
) -> bytes:
    """Bytes of ``BODY[<part>.<kind> (<fields>)]`` per RFC 3501 §6.4.5.

    ``part`` is the numeric part path (``()`` for the message itself); ``kind``
    is ``None`` (the part's body / the whole message), ``"HEADER"``,
    ``"TEXT"``, ``"MIME"``, ``"HEADER.FIELDS"`` or ``"HEADER.FIELDS.NOT"``
    (with ``fields``).  The result is an exact slice of ``raw`` (the
    HEADER.FIELDS forms are the matching field lines verbatim plus an empty
    line).  Missing parts and meaningless combinations give ``b""``.
    """
    try:
        return _get_section(raw, part, kind, fields)
    except Exception:
        log.exception("section extraction failed")
        return b""


def decode_section(raw: bytes, part: tuple[int, ...]) -> bytes:
    """Body of a part with its Content-Transfer-Encoding removed (b"" if missing)."""
    try:
        ent = _resolve(_build_tree(raw), part)
        if ent is None:
            return b""
        return _decode_body(raw, ent.body_start, ent.end, _cte(raw, ent))
    except Exception:
        log.exception("section decoding failed")
        return b""


#: The Content-Transfer-Encodings ``BINARY[...]`` removes (RFC 2045 §6.1; RFC 3516 §4.3:
#: any other one is refused with UNKNOWN-CTE).
KNOWN_CTES = frozenset({"7bit", "8bit", "binary", "base64", "quoted-printable"})


def binary_section(raw: bytes, part: tuple[int, ...]) -> bytes | None:
    """``BINARY[<part>]`` (RFC 3516 §4.2): the part's body with its Content-Transfer-Encoding
    removed; the message itself for ``()``; ``b""`` for a part that does not exist; ``None``
    when the part's encoding is none of :data:`KNOWN_CTES`."""
    if not part:
        return raw
    try:
        ent = _resolve(_build_tree(raw), part)
        if ent is None:
            return b""
        cte = _cte(raw, ent)
        if cte not in KNOWN_CTES:
            return None
        return _decode_body(raw, ent.body_start, ent.end, cte)
    except Exception:
        log.exception("binary section decoding failed")
        return b""


def binary_refused(structure: dict[str, Any], part: tuple[int, ...]) -> bool:
    """Whether ``BINARY[<part>]`` of a message would be refused for an unknown
    Content-Transfer-Encoding (see :func:`binary_section`), read from its stored body
    structure (:mod:`imap_store.mime.bodystructure`) instead of its bytes. Parts are numbered
    as :func:`binary_section` numbers them (RFC 3501 §6.4.5); a part that does not exist is not
    refused (its section is empty)."""
    node = structure
    as_message = True  # node is numbered as a message, not a body part
    for k in part:
        if k < 1:
            return False
        if "parts" not in node and not as_message:
            if "body" not in node:
                return False
            node = node["body"]  # number into the encapsulated message
        if "parts" in node:
            if k > len(node["parts"]):
                return False
            node = node["parts"][k - 1]
        elif k != 1:
            return False
        as_message = False
    return bool(part) and "parts" not in node and str(node.get("enc", "7BIT")).lower() \
        not in KNOWN_CTES


def _search_text(raw: bytes, root: _Entity) -> str:
    chunks: list[str] = []
    for _path, ent in _iter_message_parts(root, (), lambda _e: False):
        if ent.message is not None:
            for h in ent.message.headers:
                name = raw[h.start : h.vstart - 1].rstrip(b" \t").decode("ascii")
                chunks.append(f"{name}: {decode_rfc2047(_l1(_hval(raw, h)))}")
        elif ent.mtype == "text":
            data = _decode_body(raw, ent.body_start, ent.end, _cte(raw, ent))
            chunks.append(_decode_charset(data, _param_text(ent.params, "charset")))
    return "\n".join(chunks)
