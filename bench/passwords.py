"""CPU per password verification, with glibc's mmap threshold pinned as ``serve`` pins it.

    .venv/bin/python bench/passwords.py [--count 50] [--library]

Runs the verifications in one worker thread (as the servers do) and prints the process CPU
time (user and system, from os.times) per verification. ``--library`` times argon2-cffi's
PasswordHasher.verify instead of policy.passwords.verify_password, for comparison.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.service import return_large_buffers_to_the_os
from policy.passwords import _hasher, hash_password, verify_password


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=50)
    parser.add_argument("--library", action="store_true")
    args = parser.parse_args()
    return_large_buffers_to_the_os()
    stored = hash_password("a patient's password")
    verify = (lambda: _hasher.verify(stored, "a patient's password")) if args.library else (
        lambda: verify_password(stored, "a patient's password"))
    result: dict[str, float] = {}

    def run() -> None:
        verify()  # first call: the thread's work area is made
        before = os.times()
        for _ in range(args.count):
            verify()
        after = os.times()
        result["user"] = (after.user - before.user) / args.count * 1000
        result["system"] = (after.system - before.system) / args.count * 1000

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    name = "PasswordHasher.verify" if args.library else "verify_password"
    print(f"{name}: {result['user'] + result['system']:.1f} ms CPU per verification "
          f"(user {result['user']:.1f}, system {result['system']:.1f}) over {args.count}")


if __name__ == "__main__":
    main()
