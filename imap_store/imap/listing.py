"""LIST and LSUB (RFC 3501 §6.3.8-9, RFC 5258 selection options, RFC 6154 SPECIAL-USE,
RFC 3348 CHILDREN): wildcard matching and the attributes of each listed name.

``*`` matches any run of characters, ``%`` any run without the hierarchy delimiter. Matching is
a linear-time dynamic programme (no regular expression that could backtrack on hostile
patterns); ``INBOX`` matches case-insensitively (RFC 3501 §5.1).
"""

from __future__ import annotations

from collections.abc import Iterable

#: Longest pattern accepted (mailbox names are at most 200 characters).
MAX_PATTERN = 1000


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
