"""Summarise a py-spy "raw" profile (collapsed stacks, ``--format raw``) as text: where the
samples are, by own time and by inclusive time, optionally restricted to stacks through a
given function.

    .venv/bin/python bench/pyspy_top.py profile.txt [--top 25] [--under NAME] [--threads]
        [--drop-idle] [--group]

A frame reads ``function (file:line)``; ``--under`` keeps stacks containing NAME (substring
of a frame). py-spy with ``--idle`` also records waiting threads; without it (the default of
the benchmarks) samples are meant to be CPU time, but py-spy's idle detection misses threads
blocked in a C call of a queue: ``--drop-idle`` drops the samples whose innermost frame is one
of ``IDLE_FRAMES`` (a pool thread in ``queue.get``, aiosqlite's thread in its ``tx.get``, the
event loop in ``epoll``), which leaves the threads that were working. ``--group`` adds the
share of each of ``GROUPS`` (what a login or a SELECT spends: argon2, TLS, database...),
counting a sample in the first group one of its frames matches.
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
from pathlib import Path

_LINE = re.compile(r"^(.*) (\d+)$")
_LINENO = re.compile(r":\d+\)$")

#: Innermost frames of a thread waiting for work, as ``frame_key`` gives them without line
#: and without ``stdlib/`` (py-spy usually writes stdlib paths short already).
IDLE_FRAMES = frozenset({
    "_worker (concurrent/futures/thread.py)",
    "_connection_worker_thread (aiosqlite/core.py)",
    "EpollSelector.select (selectors.py)",
    "Condition.wait (threading.py)",
})


def is_idle(key: str) -> bool:
    return _LINENO.sub(")", key).replace("(stdlib/", "(", 1) in IDLE_FRAMES

#: ``--group``: (name, frame substrings), first match wins, in this order.
GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("argon2 (password check)", ("argon2/",)),
    ("TLS handshake", ("do_handshake", "_do_handshake", "SSLProtocol._start_handshake")),
    ("TLS read/write", ("SSLObject.", "sslproto.py")),
    ("login throttle", ("throttle.py",)),
    ("audit rows", ("audit",)),
    ("group writer (commits)", ("writer.py",)),
    ("database (sqlalchemy, sqlite, aiosqlite)", ("sqlalchemy/", "aiosqlite/", "sqlite3",
                                                  "asyncpg/", "imap_store/store/")),
    ("IMAP session and parser", ("imap_store/imap/",)),
    ("logging", ("logging/",)),
    ("asyncio machinery", ("asyncio/", "selectors.py")),
)


def group_of(frames: list[str]) -> str:
    for name, needles in GROUPS:
        if any(needle in frame for frame in frames for needle in needles):
            return name
    return "other"


def frame_key(frame: str, keep_line: bool) -> str:
    """``func (path/to/file.py:123)`` → ``func (file.py)``, shortening site-packages paths."""
    frame = frame.strip()
    if not keep_line:
        frame = _LINENO.sub(")", frame)
    frame = re.sub(r"\(.*/site-packages/", "(", frame)
    frame = re.sub(r"\(/usr/(?:.*/)?lib/python3\.\d+/", "(stdlib/", frame)
    frame = re.sub(r"\(/work/main/", "(", frame)
    return frame


def package_of(frame: str, thread: str) -> str:
    """``func (sqlalchemy/engine/base.py)`` → ``sqlalchemy``; stdlib modules by name."""
    m = re.search(r"\(([^():]+)(?::\d+)?\)$", frame)
    path = m.group(1) if m else "?"
    if path.startswith("stdlib/"):
        name = path[len("stdlib/"):].split("/")[0].removesuffix(".py")
        return f"stdlib {name}"
    top = path.split("/")[0].removesuffix(".py")
    return top or "?"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("profile", type=Path)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--under", help="only stacks with a frame containing this text")
    parser.add_argument("--lines", action="store_true", help="keep line numbers")
    parser.add_argument("--threads", action="store_true", help="split by thread")
    parser.add_argument("--drop-idle", action="store_true",
                        help="drop samples of threads waiting for work (IDLE_FRAMES)")
    parser.add_argument("--group", action="store_true",
                        help="share of argon2, TLS, database, session... (GROUPS)")
    args = parser.parse_args(argv)

    own: collections.Counter[str] = collections.Counter()
    packages: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    groups: collections.Counter[str] = collections.Counter()
    total = idle = 0
    for line in args.profile.read_text(errors="replace").splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        stack, count = m.group(1), int(m.group(2))
        frames = stack.split(";")
        if args.under and not any(args.under in f for f in frames):
            continue
        thread, frames = (frames[0], frames[1:]) if frames[0].startswith(("thread", "process")) \
            else ("?", frames)
        keys = [frame_key(f, args.lines) for f in frames]
        if args.drop_idle and keys and is_idle(keys[-1]):
            idle += count
            continue
        total += count
        threads[thread] += count
        groups[group_of(keys)] += count
        if keys:
            own[keys[-1]] += count
            packages[package_of(keys[-1], thread)] += count
        for key in set(keys):
            inclusive[key] += count
    if not total:
        print("no samples", file=sys.stderr)
        return 1
    print(f"samples: {total}" + (f" (stacks through {args.under!r})" if args.under else "")
          + (f"; {idle} idle samples dropped" if args.drop_idle else ""))
    if args.group:
        print("\nby group (first match in GROUPS):")
        for name, n in groups.most_common():
            print(f"  {100 * n / total:5.1f}%  {name}")
    if args.threads:
        print("\nby thread:")
        for name, n in threads.most_common():
            print(f"  {100 * n / total:5.1f}%  {name}")
    print("\nown time by package of the innermost frame (C code counts for its caller):")
    for name, n in packages.most_common(args.top):
        print(f"  {100 * n / total:5.1f}%  {name}")
    print(f"\ntop {args.top} by own time:")
    for name, n in own.most_common(args.top):
        print(f"  {100 * n / total:5.1f}%  {name}")
    print(f"\ntop {args.top} by inclusive time:")
    for name, n in inclusive.most_common(args.top):
        print(f"  {100 * n / total:5.1f}%  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
