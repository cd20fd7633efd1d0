"""The JSON body structure computed once at delivery (rendered later by the IMAP edge)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from imap_store.mime.addresses import _envelope
from imap_store.mime.headers import _hval, _l1, _strip_comments
from imap_store.mime.structure import _cte, _disposition, _Entity

# --------------------------------------------------------------------------
# BODYSTRUCTURE tree
# --------------------------------------------------------------------------


def empty_part() -> dict[str, Any]:
    return {
        "type": "TEXT",
        "subtype": "PLAIN",
        "params": [["CHARSET", "US-ASCII"]],
        "id": None,
        "desc": None,
        "enc": "7BIT",
        "size": 0,
        "lines": 0,
        "md5": None,
        "dsp": None,
        "lang": None,
        "loc": None,
    }


def _params_json(params: Sequence[tuple[str, str]]) -> list[list[str]] | None:
    if not params:
        return None
    return [[_l1(n).upper(), _l1(v)] for n, v in params]


def _count_lines(raw: bytes, start: int, end: int) -> int:
    """body-fld-lines: text lines in raw[start:end].

    An unterminated last line counts as a line (the CRLF before a boundary
    belongs to the delimiter, so a part's last line is normally unterminated).
    """
    if end <= start:
        return 0
    n = raw.count(b"\n", start, end)
    return n if raw[end - 1] == 0x0A else n + 1


def _bs_node(raw: bytes, ent: _Entity) -> dict[str, Any]:
    dsp = _disposition(raw, ent)
    mime = ent.mime

    def opt(name: str) -> str | None:
        h = mime.get(name)
        return _l1(_hval(raw, h)) if h is not None else None

    lang_h = mime.get("content-language")
    lang: list[str] | None = None
    if lang_h is not None:
        lang = [x.strip() for x in _strip_comments(_l1(_hval(raw, lang_h))).split(",")]
        lang = [x for x in lang if x] or None
    ext: dict[str, Any] = {
        "dsp": [_l1(dsp[0]).upper(), _params_json(dsp[1])] if dsp is not None and dsp[0] else None,
        "lang": lang,
        "loc": opt("content-location"),
    }
    if ent.children is not None:
        return {
            "type": "MULTIPART",
            "subtype": ent.subtype.upper(),
            "parts": [_bs_node(raw, c) for c in ent.children] or [empty_part()],
            "params": _params_json(ent.params),
            **ext,
        }
    node: dict[str, Any] = {
        "type": ent.mtype.upper(),
        "subtype": ent.subtype.upper(),
        "params": [["CHARSET", "US-ASCII"]] if ent.default_ct else _params_json(ent.params),
        "id": opt("content-id"),
        "desc": opt("content-description"),
        "enc": _l1(_cte(raw, ent)).upper(),
        "size": ent.end - ent.body_start,
    }
    if ent.message is not None:
        node["envelope"] = _envelope(raw, ent.message)
        node["body"] = _bs_node(raw, ent.message)
        node["lines"] = _count_lines(raw, ent.body_start, ent.end)
    elif ent.mtype == "text":
        node["lines"] = _count_lines(raw, ent.body_start, ent.end)
    node["md5"] = opt("content-md5")
    node.update(ext)
    return node
