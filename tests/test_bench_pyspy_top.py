"""bench/pyspy_top.py, the summary of a py-spy raw profile the benchmarks print: idle samples
dropped and shares by group, run as the command line the benchmark README gives."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "pyspy_top.py"
SP = "/x/.venv/lib/python3.11/site-packages"
STDLIB = "/usr/lib/python3.11"

#: Collapsed stacks as ``py-spy record --format raw`` writes them: a pool thread waiting in
#: queue.get (idle), one hashing a password, the loop in epoll (idle), aiosqlite's thread
#: waiting (idle), the loop executing a SELECT, the loop writing TLS records.
PROFILE = "\n".join([
    f"_bootstrap ({STDLIB}/threading.py:995);_worker ({STDLIB}/concurrent/futures/thread.py:81)"
    " 300",
    f"_bootstrap ({STDLIB}/threading.py:995);_worker ({STDLIB}/concurrent/futures/thread.py:83);"
    f"verify_password (/work/main/policy/passwords.py:60);"
    f"verify_secret ({SP}/argon2/low_level.py:193) 50",
    "run_forever (asyncio/base_events.py:607);"  # py-spy's own short form of stdlib paths
    "EpollSelector.select (selectors.py:468) 200",
    f"_bootstrap ({STDLIB}/threading.py:995);"
    f"_connection_worker_thread ({SP}/aiosqlite/core.py:59) 100",
    f"run_forever ({STDLIB}/asyncio/base_events.py:607);"
    f"select (/work/main/imap_store/imap/session/selected.py:40);"
    f"PatientMailStore.open (/work/main/imap_store/store/mailboxes.py:740);"
    f"Connection.execute ({SP}/sqlalchemy/engine/base.py:1416) 30",
    f"run_forever ({STDLIB}/asyncio/base_events.py:607);"
    f"Session.flush (/work/main/imap_store/imap/session/core.py:200);"
    f"SSLObject.write ({STDLIB}/ssl.py:930) 20",
]) + "\n"


def summary(tmp_path: Path, *options: str) -> str:
    profile = tmp_path / "serve.txt"
    profile.write_text(PROFILE)
    done = subprocess.run([sys.executable, str(SCRIPT), str(profile), *options],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def share(text: str, name: str) -> float:
    m = re.search(rf"^\s+([\d.]+)%\s+{re.escape(name)}$", text, re.M)
    assert m is not None, f"{name!r} not in:\n{text}"
    return float(m.group(1))


def test_drop_idle_keeps_only_the_working_threads(tmp_path: Path) -> None:
    out = summary(tmp_path, "--drop-idle")
    assert out.startswith("samples: 100; 600 idle samples dropped")
    assert share(out, "verify_secret (argon2/low_level.py)") == 50.0
    assert share(out, "Connection.execute (sqlalchemy/engine/base.py)") == 30.0
    assert "_worker (" not in out.split("by inclusive")[0]


def test_without_drop_idle_the_waits_count(tmp_path: Path) -> None:
    out = summary(tmp_path)
    assert out.startswith("samples: 700\n")
    assert share(out, "_worker (stdlib/concurrent/futures/thread.py)") == round(300 / 7, 1)


def test_group_shares(tmp_path: Path) -> None:
    out = summary(tmp_path, "--drop-idle", "--group")
    assert share(out, "argon2 (password check)") == 50.0
    assert share(out, "database (sqlalchemy, sqlite, aiosqlite)") == 30.0
    assert share(out, "TLS read/write") == 20.0


def test_an_empty_profile_is_refused(tmp_path: Path) -> None:
    profile = tmp_path / "empty.txt"
    profile.write_text("")
    done = subprocess.run([sys.executable, str(SCRIPT), str(profile)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 1
    assert "no samples" in done.stderr
