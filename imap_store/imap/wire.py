"""IMAP wire syntax of the stored MIME structures (RFC 3501 §7.4.2, §9).

The delivery-time analysis (:mod:`imap_store.mime`) stores the ENVELOPE and
the body structure as JSON-compatible values; this module renders them as
``envelope`` and ``body`` (BODY / BODYSTRUCTURE) syntax.  It works on those
plain values only and imports nothing from the MIME analysis.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from imap_store.mime.bodystructure import empty_part

__all__ = ["render_bodystructure", "render_envelope"]

# Strings longer than this are sent as IMAP literals rather than quoted.
_MAX_QUOTED = 1024

# What a multipart without any part is rendered with (a multipart needs at least one body
# part in IMAP syntax): the analysis's own empty part.
_EMPTY_BODY: dict[str, Any] = empty_part()

_LITERAL_NEEDED_RE = re.compile(rb"[\r\n\x80-\xff]")


def _imap_string(value: object) -> bytes:
    """nstring: NIL, quoted string, or literal when quoting is impossible."""
    if value is None:
        return b"NIL"
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value).encode("ascii")
    data = str(value).encode("utf-8", errors="replace")
    if b"\x00" in data:
        data = data.replace(b"\x00", b"")
    if len(data) > _MAX_QUOTED or _LITERAL_NEEDED_RE.search(data):
        return b"{%d}\r\n" % len(data) + data
    return b'"' + data.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def _imap_number(value: object) -> bytes:
    n = value if isinstance(value, int) else 0
    return b"%d" % max(0, n)


def _imap_address_list(value: object) -> bytes:
    if not isinstance(value, list) or not value:
        return b"NIL"
    out = [b"("]
    for a in value:
        fields = list(a)[:4] if isinstance(a, list | tuple) else []
        fields += [None] * (4 - len(fields))
        out.append(b"(" + b" ".join(_imap_string(f) for f in fields) + b")")
    out.append(b")")
    return b"".join(out)


def render_envelope(envelope: Sequence[Any]) -> bytes:
    """RFC 3501 ``envelope`` syntax for a stored envelope."""
    f = list(envelope)[:10]
    f += [None] * (10 - len(f))
    items = [_imap_string(f[0]), _imap_string(f[1])]
    items += [_imap_address_list(x) for x in f[2:8]]
    items += [_imap_string(f[8]), _imap_string(f[9])]
    return b"(" + b" ".join(items) + b")"


def _imap_params(value: object) -> bytes:
    if not isinstance(value, list) or not value:
        return b"NIL"
    items: list[bytes] = []
    for p in value:
        if isinstance(p, list | tuple) and len(p) >= 2:
            items.append(_imap_string(str(p[0]).upper()))
            items.append(_imap_string("" if p[1] is None else p[1]))
    return b"(" + b" ".join(items) + b")" if items else b"NIL"


def _imap_disposition(value: object) -> bytes:
    if not isinstance(value, list | tuple) or not value or not value[0]:
        return b"NIL"
    params = value[1] if len(value) > 1 else None
    return b"(" + _imap_string(str(value[0]).upper()) + b" " + _imap_params(params) + b")"


def _imap_language(value: object) -> bytes:
    if isinstance(value, str):
        return _imap_string(value)
    if not isinstance(value, list) or not value:
        return b"NIL"
    if len(value) == 1:
        return _imap_string(value[0])
    return b"(" + b" ".join(_imap_string(x) for x in value) + b")"


def _dsp_lang_loc(node: dict[str, Any]) -> list[bytes]:
    """The end both extension data share (RFC 3501 §9 ``body-ext-mpart`` after its
    parameters, ``body-ext-1part`` after its MD5): disposition, language, location."""
    return [_imap_disposition(node.get("dsp")), _imap_language(node.get("lang")),
            _imap_string(node.get("loc"))]


def _render_body(node: dict[str, Any], extended: bool) -> bytes:
    if str(node.get("type", "")).upper() == "MULTIPART" or "parts" in node:
        parts = [p for p in node.get("parts") or () if isinstance(p, dict)] or [_EMPTY_BODY]
        out = [b"".join(_render_body(p, extended) for p in parts)]
        out.append(_imap_string(str(node.get("subtype") or "MIXED").upper()))
        if extended:
            out += [_imap_params(node.get("params")), *_dsp_lang_loc(node)]
        return b"(" + b" ".join(out) + b")"
    mtype = str(node.get("type") or "TEXT").upper()
    items = [
        _imap_string(mtype),
        _imap_string(str(node.get("subtype") or "PLAIN").upper()),
        _imap_params(node.get("params")),
        _imap_string(node.get("id")),
        _imap_string(node.get("desc")),
        _imap_string(str(node.get("enc") or "7BIT").upper()),
        _imap_number(node.get("size", 0)),
    ]
    body = node.get("body")
    if isinstance(body, dict):
        items.append(render_envelope(node.get("envelope") or []))
        items.append(_render_body(body, extended))
        items.append(_imap_number(node.get("lines", 0)))
    elif mtype == "TEXT":
        items.append(_imap_number(node.get("lines", 0)))
    if extended:
        items += [_imap_string(node.get("md5")), *_dsp_lang_loc(node)]
    return b"(" + b" ".join(items) + b")"


def render_bodystructure(bs: dict[str, Any], extended: bool) -> bytes:
    """RFC 3501 ``body`` syntax: BODYSTRUCTURE if ``extended`` else BODY."""
    return _render_body(bs, extended)
