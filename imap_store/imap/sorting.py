"""RFC 5256 §2.1 base subject extraction (SORT SUBJECT, THREAD's subject grouping), sans-IO."""

from __future__ import annotations

import re

_WSP = re.compile(r"[ \t\r\n]+")
_TRAILER = re.compile(r"(?:[ \t]|\(fwd\))+$", re.IGNORECASE)
_BLOB = r"\[[^\[\]]*\][ \t]*"
#: subj-leader = (*subj-blob subj-refwd) / WSP;
#: subj-refwd = ("re" / ("fw" ["d"])) *WSP [subj-blob] ":"
_LEADER = re.compile(rf"(?:(?:{_BLOB})*(?:re|fwd?)[ \t]*(?:{_BLOB})?:|[ \t])", re.IGNORECASE)
_LEADING_BLOB = re.compile(_BLOB)


def base_subject(subject: str) -> str:
    """The base subject of ``subject`` (RFC 5256 §2.1 steps 1-6), case-folded for comparison."""
    text = _WSP.sub(" ", subject)  # step 1
    while True:
        text = _TRAILER.sub("", text)  # step 2
        while True:  # steps 3-5
            before = text
            while (m := _LEADER.match(text)) is not None:  # step 3
                text = text[m.end():]
            blob = _LEADING_BLOB.match(text)  # step 4: a blob, if something remains after it
            if blob is not None and text[blob.end():]:
                text = text[blob.end():]
            if text == before:
                break
        if text[:5].lower() == "[fwd:" and text.endswith("]"):  # step 6
            text = text[5:-1]
            continue
        return text.casefold()


def is_reply(subject: str) -> bool:
    """Whether extracting the base subject removed a re:/fwd: leader or a (fwd) trailer
    (RFC 5256 §2.2 step 6: a reply or forward)."""
    text = _WSP.sub(" ", subject).strip(" ")
    return base_subject(subject) != _strip_blobs(text).casefold()


def _strip_blobs(text: str) -> str:
    while (blob := _LEADING_BLOB.match(text)) is not None and text[blob.end():]:
        text = text[blob.end():]
    return text
