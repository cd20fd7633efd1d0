"""RFC 5256 §2.2 threading (ORDEREDSUBJECT and REFERENCES) over plain records, sans-IO; the
session renders the thread list of :func:`render`."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime

from imap_store.imap.sorting import base_subject, is_reply

_MSG_ID = re.compile(r"<[^<>\s]+>")


@dataclass(slots=True)
class Message:
    number: int  # sequence number or UID, as answered
    seq: int  # ties are broken by sequence number
    date: datetime  # the sent date, else the internal date (UTC)
    subject: str
    message_id: str | None
    references: list[str]
    in_reply_to: str | None


@dataclass(eq=False, slots=True)
class Node:
    message: Message | None = None
    parent: Node | None = None
    children: list[Node] = field(default_factory=list)


def _sort_key(node: Node) -> tuple[datetime, int]:
    first = node
    while first.message is None and first.children:
        first = first.children[0]
    assert first.message is not None
    return first.message.date, first.message.seq


def _sort_tree(nodes: list[Node]) -> None:
    for node in nodes:
        _sort_tree(node.children)
    nodes.sort(key=_sort_key)


def _ancestor(node: Node, other: Node) -> bool:
    """``node`` is ``other`` or one of its ancestors."""
    walk: Node | None = other
    while walk is not None:
        if walk is node:
            return True
        walk = walk.parent
    return False


def _link(parent: Node, child: Node) -> None:
    if child.parent is not None:
        child.parent.children.remove(child)
    child.parent = parent
    parent.children.append(child)


def _unlink(child: Node) -> None:
    if child.parent is not None:
        child.parent.children.remove(child)
        child.parent = None


def _prune(nodes: list[Node], at_root: bool) -> list[Node]:
    """Step 4: drop dummies without children, promote a dummy's children (but at the root
    only when it has one)."""
    out: list[Node] = []
    for node in nodes:
        node.children = _prune(node.children, False)
        for child in node.children:
            child.parent = node
        if node.message is None:
            if not node.children:
                continue
            if not at_root or len(node.children) == 1:
                for child in node.children:
                    child.parent = None
                out.extend(node.children)
                continue
        out.append(node)
    return out


def references(messages: list[Message]) -> list[Node]:
    table: dict[str, Node] = {}
    every: dict[int, Node] = {}  # every node made, by id()

    def node_of(ref: str) -> Node:
        node = table.get(ref)
        if node is None:
            node = table[ref] = Node()
            every[id(node)] = node
        return node

    for message in messages:  # step 1
        refs = [r for r in message.references if _MSG_ID.fullmatch(r)]
        if not refs and message.in_reply_to:
            found = _MSG_ID.search(message.in_reply_to)
            refs = [found.group()] if found else []
        own_id = message.message_id
        if not own_id or (own_id in table and table[own_id].message is not None):
            own = Node(message)  # missing or duplicate Message-ID: a unique one
            every[id(own)] = own
        else:
            own = node_of(own_id)
            own.message = message
        previous: Node | None = None
        for ref in refs:  # 1A
            node = node_of(ref)
            if (previous is not None and node.parent is None and node is not previous
                    and not _ancestor(node, previous)):
                _link(previous, node)
            previous = node
        if previous is None or previous is own or _ancestor(own, previous):  # 1B
            _unlink(own)
        else:
            _link(previous, own)
    roots = [node for node in every.values() if node.parent is None]
    roots = _prune(roots, True)  # steps 2-4
    _sort_tree(roots)  # step 5
    subjects: dict[str, Node] = {}  # step 6
    for root in roots:
        subject = _subject(root)
        if subject is None:
            continue
        key = base_subject(subject)
        if not key:
            continue
        known = subjects.get(key)
        known_subject = _subject(known) if known is not None else None
        if (known is None or (root.message is None and known.message is not None)
                or (known.message is not None and root.message is not None
                    and known_subject is not None and is_reply(known_subject)
                    and not is_reply(subject))):
            subjects[key] = root
    merged: list[Node] = []
    for root in roots:
        subject = _subject(root)
        key = base_subject(subject) if subject is not None else ""
        known = subjects.get(key) if key else None
        if known is None or known is root:
            merged.append(root)
            continue
        if known.message is None and root.message is None:
            for child in list(root.children):
                _link(known, child)
        elif known.message is None:
            _link(known, root)
        elif root.message is None:
            _link(root, known)
            subjects[key] = root
            merged[merged.index(known)] = root
        elif root.message is not None and is_reply(subject or "") and not is_reply(
                _subject(known) or ""):
            _link(known, root)
        else:
            dummy = Node()
            merged[merged.index(known)] = dummy
            _link(dummy, known)
            _link(dummy, root)
            subjects[key] = dummy
    _sort_tree(merged)  # step 7
    return merged


def _subject(node: Node | None) -> str | None:
    if node is None:
        return None
    if node.message is not None:
        return node.message.subject
    if node.children and node.children[0].message is not None:
        return node.children[0].message.subject
    return None


def ordered_subject(messages: list[Message]) -> list[Node]:
    ordered = sorted(messages, key=lambda m: (base_subject(m.subject), m.date, m.seq))
    roots: list[Node] = []
    last_key: str | None = None
    for message in ordered:
        key = base_subject(message.subject)
        if roots and key == last_key:
            _link(roots[-1], Node(message))
        else:
            roots.append(Node(message))
        last_key = key
    roots.sort(key=_sort_key)
    return roots


def render(roots: list[Node]) -> bytes:
    return b"".join(b"(" + _render(root) + b")" for root in roots)


def _render(node: Node) -> bytes:
    numbers: list[bytes] = []
    walk = node
    while True:
        if walk.message is not None:
            numbers.append(b"%d" % walk.message.number)
        if len(walk.children) != 1:
            break
        walk = walk.children[0]
    branches = b"".join(b"(" + _render(child) + b")" for child in walk.children)
    if numbers and branches:
        return b" ".join(numbers) + b" " + branches
    return b" ".join(numbers) or branches
