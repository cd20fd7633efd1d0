"""What a message shows in the portal: its text (HTML sanitised, remote content blocked) and its
attachments, typed by their content rather than their name."""

from __future__ import annotations

import codecs
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import nh3
from starlette.responses import Response

from imap_store.mime import decode_section

#: Media types the portal previews, recognised by their first bytes (never by their name).
_MAGIC = (
    (b"%PDF-", "application/pdf"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"\x89PNG\r\n\x1a\n", "image/png"),
)
#: HTML kept from a message: structure and text only (no images: no remote content, no
#: tracking pixels; no forms, scripts or styles).
_TAGS = {"a", "b", "blockquote", "br", "code", "div", "em", "h1", "h2", "h3", "h4", "hr", "i",
         "li", "ol", "p", "pre", "span", "strong", "table", "tbody", "td", "th", "thead", "tr",
         "u", "ul"}


@dataclass(frozen=True)
class AttachmentView:
    index: int  # position in the message's attachment list (URLs)
    filename: str
    size: int
    declared_type: str
    preview: bool = False  # declared PDF, JPEG or PNG (its content is checked when served)


@dataclass(frozen=True)
class Body:
    text: str | None  # plain text, shown as text
    html: str | None  # sanitised HTML, safe to insert


def sniff(data: bytes) -> str | None:
    """The previewable media type of ``data`` by its content, or None."""
    for magic, media in _MAGIC:
        if data.startswith(magic):
            return media
    return None


def _leaves(node: dict[str, Any], path: tuple[int, ...]) -> Iterator[tuple[tuple[int, ...],
                                                                           dict[str, Any]]]:
    if node.get("type") == "MULTIPART":
        for i, child in enumerate(node.get("parts") or (), start=1):
            if isinstance(child, dict):
                yield from _leaves(child, (*path, i))
    else:
        yield (path or (1,)), node


def _charset(node: dict[str, Any]) -> str:
    for pair in node.get("params") or ():
        if isinstance(pair, list) and len(pair) == 2 and str(pair[0]).upper() == "CHARSET":
            name = str(pair[1])
            try:
                info = codecs.lookup(name)
            except LookupError:
                return "utf-8"
            # rot13, base64, zlib... are codecs but not text encodings.
            return name if getattr(info, "_is_text_encoding", False) else "utf-8"
    return "us-ascii"


#: Bodies already extracted, by the SHA-256 of the stored bytes (equal bytes, equal text; never
#: by row id, which SQLite may reuse after a delete); bounded by count and by characters.
_BODIES: OrderedDict[str, Body] = OrderedDict()
_BODIES_KEPT = 2048
_BODIES_MAX_CHARS = 32 * 1024 * 1024
_bodies_chars = 0


def _chars(body_: Body) -> int:
    return len(body_.text or "") + len(body_.html or "")


def cached_body(digest: str) -> Body | None:
    body_ = _BODIES.get(digest)
    if body_ is not None:
        _BODIES.move_to_end(digest)
    return body_


def remember_body(digest: str, body_: Body) -> None:
    global _bodies_chars
    if digest in _BODIES or _chars(body_) > _BODIES_MAX_CHARS // 8:
        return
    _BODIES[digest] = body_
    _bodies_chars += _chars(body_)
    while len(_BODIES) > _BODIES_KEPT or _bodies_chars > _BODIES_MAX_CHARS:
        _bodies_chars -= _chars(_BODIES.popitem(last=False)[1])


def _decode(data: bytes, charset: str) -> str:
    try:
        return data.decode(charset, "replace")
    except (LookupError, UnicodeError, ValueError):
        return data.decode("utf-8", "replace")


def _absolute_links_only(tag: str, attribute: str, value: str) -> str | None:
    """Links of a message lead outside (https:, mailto:), never to the portal's own pages."""
    if attribute == "href" and not value.lower().startswith(("https://", "mailto:")):
        return None
    return value


def body(raw: bytes, meta: dict[str, Any]) -> Body:
    """The first text/plain part that is not an attachment, else the first text/html one."""
    structure = meta.get("bodystructure")
    if not isinstance(structure, dict):
        return Body(None, None)
    attached = {tuple(p) for p in meta.get("attachment_parts") or ()}
    plain = html = None
    for path, node in _leaves(structure, ()):
        if path in attached or node.get("type") != "TEXT":
            continue
        subtype = node.get("subtype")
        if subtype == "PLAIN" and plain is None:
            plain = (path, node)
        elif subtype == "HTML" and html is None:
            html = (path, node)
    if plain is not None:
        return Body(_decode(decode_section(raw, plain[0]), _charset(plain[1])), None)
    if html is not None:
        text = _decode(decode_section(raw, html[0]), _charset(html[1]))
        return Body(None, nh3.clean(text, tags=_TAGS, link_rel="noopener noreferrer nofollow",
                                    url_schemes={"https", "mailto"},
                                    attribute_filter=_absolute_links_only))
    return Body(None, None)


#: Declared types offered a preview link; the preview itself is served only when the content
#: is one of ``_MAGIC`` (else the file is downloaded), so a wrong label never renders.
_PREVIEWED = {media for _magic, media in _MAGIC} | {"image/jpg", "image/pjpeg"}


def attachments(meta: dict[str, Any]) -> list[AttachmentView]:
    out = []
    for i, entry in enumerate(meta.get("attachments") or ()):
        if isinstance(entry, list) and len(entry) == 3:
            out.append(AttachmentView(i, str(entry[0] or f"piece-jointe-{i + 1}"),
                                      int(entry[2]), str(entry[1]),
                                      preview=str(entry[1]).lower() in _PREVIEWED))
    return out


def attachment_bytes(raw: bytes, meta: dict[str, Any], index: int) -> bytes | None:
    parts = meta.get("attachment_parts") or ()
    if not 0 <= index < len(parts):
        return None
    return decode_section(raw, tuple(int(n) for n in parts[index]))


def file_response(data: bytes, name: str, media: str | None, preview: bool) -> Response:
    """A file of a message or of the documents space: shown inline only when ``preview`` was
    asked and its content was recognised (``media``), else downloaded as octets; its name in
    both RFC 6266 forms (ASCII with ``_`` for anything else, and UTF-8); a CSP that lets a PDF
    be framed by the portal only and sandboxes anything else."""
    preview = preview and media is not None
    ascii_name = "".join(c if c.isascii() and c.isprintable() and c not in '"\\' else "_"
                         for c in name)
    disposition = (f"{'inline' if preview else 'attachment'}; filename=\"{ascii_name}\"; "
                   f"filename*=UTF-8''{quote(name)}")
    csp = ("default-src 'none'; frame-ancestors 'self'" if media == "application/pdf"
           else "default-src 'none'; img-src 'self'; frame-ancestors 'self'; sandbox")
    return Response(data, media_type=media if preview and media else "application/octet-stream",
                    headers={"content-disposition": disposition,
                             "content-security-policy": csp})
