"""Compute-once MIME analysis of stored messages.

Everything the IMAP server (FETCH ENVELOPE/BODY/BODYSTRUCTURE, SEARCH) and the
gateway rules need from a message is derived here once, at delivery, from the
raw bytes.  The results are plain JSON-serialisable structures that are stored
beside the message, so the message never has to be parsed again with the
``email`` package.  Their IMAP wire syntax is produced by
:mod:`imap_store.imap.wire`.

Modules (each imports only those above it)
------------------------------------------

* :mod:`.headers`: charsets and transfer encodings, RFC 2047 encoded-words,
  header blocks, comments, parameters (RFC 2231), Content-Type/-Disposition.
* :mod:`.structure`: the entity tree (multipart splitting, encapsulated
  messages, the ``MAX_DEPTH`` / ``MAX_PARTS`` caps, IMAP part numbering).
* :mod:`.addresses`: address lists, the ENVELOPE, message-ids and dates.
* :mod:`.bodystructure`: the JSON body structure.
* :mod:`.sections`: ``BODY[section]`` extraction and the text for SEARCH.
* :mod:`.message`: :class:`MessageInfo`, :func:`parse_message` and
  :func:`text_for_search`.

Design notes
------------

* The structure is found by our own scanner working on byte offsets into the
  original message: header blocks, boundary delimiter lines (RFC 2046 §5.1.1)
  and encapsulated messages.  ``get_section`` therefore returns exact slices of
  the stored bytes, as RFC 3501 §6.4.5 requires, and never a re-serialisation.
* Line terminators are LF with an optional preceding CR.  The line break that
  precedes a boundary delimiter belongs to the delimiter, not to the part.
* A multipart whose closing delimiter is missing has its last part extending to
  the end of the enclosing entity.  A multipart without a ``boundary``
  parameter, or with an unparsable Content-Type, is treated as
  ``text/plain; charset=us-ascii`` (RFC 2045 §5.2).
* Nesting is capped at ``MAX_DEPTH`` and the total number of entities at
  ``MAX_PARTS``; a composite entity beyond a cap is reported as an opaque
  ``application/octet-stream`` leaf (its bytes stay reachable).
* Header strings in the stored structures are ``str``: header bytes are decoded
  as UTF-8 (RFC 6532) and, when that fails, as Windows-1252.  NUL characters are
  removed from every stored string because neither IMAP nor PostgreSQL text
  accept them.
* Every public function is total: any input bytes give a result.
"""

from __future__ import annotations

from imap_store.mime.headers import decode_rfc2047
from imap_store.mime.message import (
    INLINE_PARSE_MAX,
    Attachment,
    MessageInfo,
    parse_message,
    parse_message_async,
    text_for_search,
)
from imap_store.mime.sections import binary_refused, binary_section, decode_section, get_section
from imap_store.mime.structure import MAX_DEPTH, MAX_PARTS

__all__ = [
    "INLINE_PARSE_MAX",
    "MAX_DEPTH",
    "MAX_PARTS",
    "Attachment",
    "MessageInfo",
    "binary_refused",
    "binary_section",
    "decode_rfc2047",
    "decode_section",
    "get_section",
    "parse_message",
    "parse_message_async",
    "text_for_search",
]
