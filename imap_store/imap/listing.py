"""LIST and LSUB (RFC 3501 §6.3.8-9, RFC 5258 LIST-EXTENDED, RFC 6154 SPECIAL-USE,
RFC 3348 CHILDREN): wildcard matching and which names a LIST answers, with what.

``*`` matches any run of characters, ``%`` any run without the hierarchy delimiter. Matching is
a linear-time dynamic programme (no regular expression that could backtrack on hostile
patterns); ``INBOX`` matches case-insensitively (RFC 3501 §5.1).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

#: Longest pattern accepted (mailbox names are at most 200 characters).
MAX_PATTERN = 1000
#: Most distinct patterns in one extended LIST (RFC 5258 sets no limit). Matching costs each
#: pattern against each name on the event loop: 6,000 one-character patterns (a 60 KB
#: command) held the other sessions over 100 ms before this limit and the merging of repeats.
MAX_PATTERNS = 100


def canonical_pattern(reference: str, pattern: str) -> str:
    """Reference and pattern combined (RFC 3501 §6.3.8): the reference is a prefix."""
    return reference + pattern


def matches(pattern: str, name: str, delimiter: str = "/") -> bool:
    """Whether ``name`` matches the LIST ``pattern``."""
    if name == "INBOX" or name.upper().startswith("INBOX" + delimiter):
        head = pattern[:5]
        if head.upper() == "INBOX":
            pattern = "INBOX" + pattern[5:]
    # reachable[j]: the first i characters of the pattern can match name[:j]
    reachable = [True] + [False] * len(name)
    for char in pattern:
        if char == "*":
            seen = False
            for j in range(len(name) + 1):
                seen = seen or reachable[j]
                reachable[j] = seen
        elif char == "%":
            seen = False
            for j in range(len(name) + 1):
                if j and name[j - 1] == delimiter:
                    seen = False
                seen = seen or reachable[j]
                reachable[j] = seen
        else:
            for j in range(len(name), 0, -1):
                reachable[j] = reachable[j - 1] and name[j - 1] == char
            reachable[0] = False
        if not any(reachable):
            return False
    return reachable[len(name)]


def with_parents(names: Iterable[str], delimiter: str = "/") -> dict[str, bool]:
    """Every name plus its implied parents: ``{name: exists}`` (a parent that is only
    implied answers ``\\Noselect``, RFC 3501 §6.3.8)."""
    result: dict[str, bool] = {}
    for name in names:
        result[name] = True
        parts = name.split(delimiter)
        for depth in range(1, len(parts)):
            result.setdefault(delimiter.join(parts[:depth]), False)
    return result


def parents(names: Iterable[str], delimiter: str = "/") -> set[str]:
    """The names that have a name of ``names`` right below them."""
    return {n.rpartition(delimiter)[0] for n in names if delimiter in n}


def lsub_names(subscribed: Iterable[str], pattern: str,
               delimiter: str = "/") -> list[tuple[str, bool]]:
    """LSUB's answer (RFC 3501 §6.3.9), INBOX first then by name: ``(name, noselect)`` for
    each subscribed name the pattern matches (``noselect`` False), and for each unsubscribed
    ancestor of a subscribed name that the pattern matches while that subscribed name lies
    below what it reaches (``%`` stops at a delimiter): ``noselect`` True."""
    chosen = set(subscribed)
    out: dict[str, bool] = {}
    for name in chosen:
        if matches(pattern, name, delimiter):
            out[name] = False
            continue
        if "%" not in pattern:
            continue
        parts = name.split(delimiter)
        for depth in range(len(parts) - 1, 0, -1):
            parent = delimiter.join(parts[:depth])
            if parent not in chosen and matches(pattern, parent, delimiter):
                out.setdefault(parent, True)
                break
    return sorted(out.items(), key=lambda item: (item[0] != "INBOX", item[0]))


@dataclass(frozen=True, slots=True)
class Listed:
    """One name of a LIST answer: whether a mailbox of that name exists, has children (any
    name below it, RFC 5258 §4 CHILDREN) and, under RECURSIVEMATCH, a descendant that meets
    the selection criteria without matching the patterns (CHILDINFO, RFC 5258 §3.5)."""

    name: str
    exists: bool
    has_children: bool
    childinfo: bool


def list_names(names: dict[str, bool], patterns: Sequence[str], meets: Callable[[str], bool],
               recursive: bool = False, delimiter: str = "/",
               children: set[str] | None = None) -> list[Listed]:
    """LIST's answer (RFC 5258 §3), INBOX first then by name: each name of ``names``
    (``{name: exists}``, see :func:`with_parents`) that a pattern matches and that meets the
    selection criteria, or, with RECURSIVEMATCH, has a descendant that meets them while no
    pattern matches that descendant. Linear in names times depth: a meeting name that no
    pattern matches marks its ancestors. ``children``: the names that have children (by
    default, the parents of ``names``)."""
    matched = [n for n in names if any(matches(p, n, delimiter) for p in patterns)]
    childinfo: set[str] = set()
    if recursive:
        chosen = set(matched)
        for name in names:
            if name in chosen or delimiter not in name or not meets(name):
                continue
            parts = name.split(delimiter)
            childinfo.update(delimiter.join(parts[:depth]) for depth in range(1, len(parts)))
    if children is None:
        children = parents(names, delimiter)
    return [
        Listed(name, names[name], name in children, name in childinfo)
        for name in sorted(matched, key=lambda n: (n != "INBOX", n))
        if name in childinfo or meets(name)
    ]
