"""Summarise a py-spy "raw" profile (collapsed stacks, ``--format raw``) as text: where the
samples are, by own time and by inclusive time, optionally restricted to stacks through a
given function.

    .venv/bin/python bench/pyspy_top.py profile.txt [--top 25] [--under NAME] [--threads]

A frame reads ``function (file:line)``; ``--under`` keeps stacks containing NAME (substring
of a frame). py-spy with ``--idle`` also records waiting threads; without it (the default of
the benchmarks) samples are CPU (or GIL-holding) time.
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
from pathlib import Path

_LINE = re.compile(r"^(.*) (\d+)$")
_LINENO = re.compile(r":\d+\)$")


def frame_key(frame: str, keep_line: bool) -> str:
    """``func (path/to/file.py:123)`` → ``func (file.py)``, shortening site-packages paths."""
    frame = frame.strip()
    if not keep_line:
        frame = _LINENO.sub(")", frame)
    frame = re.sub(r"\(.*/site-packages/", "(", frame)
    frame = re.sub(r"\(/usr/.*/lib/python3\.\d+/", "(stdlib/", frame)
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
    args = parser.parse_args(argv)

    own: collections.Counter[str] = collections.Counter()
    packages: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    total = 0
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
        total += count
        threads[thread] += count
        keys = [frame_key(f, args.lines) for f in frames]
        if keys:
            own[keys[-1]] += count
            packages[package_of(keys[-1], thread)] += count
        for key in set(keys):
            inclusive[key] += count
    if not total:
        print("no samples", file=sys.stderr)
        return 1
    print(f"samples: {total}" + (f" (stacks through {args.under!r})" if args.under else ""))
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
