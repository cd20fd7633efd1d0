"""CPU of the store's part of one IMAP SELECT/EXAMINE (PatientMailStore.open, the status of
a mailbox, a change poll), in process, on SQLite or PostgreSQL.

    .venv/bin/python bench/select_cost.py [--url postgresql://...] [--opens 200] [--profile]

Makes a patient with 100 messages in INBOX (a fresh temporary SQLite database unless --url
names an empty database to migrate), then times ``--opens`` rounds of open + status +
changes and prints the process CPU (time.process_time) per round. ``--profile`` prints the
cProfile lines of SQLAlchemy's statement compilation and cache keys (whole profile saved in
$TMPDIR/select_cost.prof).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import pstats
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from imap_store.store import schema as t
from imap_store.store.db import migrate
from imap_store.store.directory import Store
from imap_store.store.mailboxes import SqlMailStores

MESSAGE = (b"From: a@pro.mssante.fr\r\nTo: p@patient.mssante.fr\r\nSubject: bench %d\r\n"
           b"Message-ID: <%d@bench>\r\n\r\nbody\r\n")


async def run(url: str, opens: int, profile: bool) -> None:
    await migrate(url)
    store = Store.from_url(url)
    try:
        async with store.write() as conn:
            patient_id = (await conn.execute(t.patient.insert().values(
                ins="100000000000001", name="Bench", notify_email="b@example.org",
                created_at=datetime.now(UTC)).returning(t.patient.c.id))).scalar_one()
        mail = SqlMailStores(store).for_patient(patient_id)
        await mail.create("INBOX")
        for i in range(100):
            await mail.append("INBOX", MESSAGE % (i, i), 0, ["$bench"] if i % 7 == 0 else [],
                              None)

        async def one() -> None:
            view = await mail.open("INBOX")
            assert view is not None
            await mail.status("INBOX")
            await mail.changes(view.mailbox.id, view.mailbox.highestmodseq)

        for _ in range(20):
            await one()
        profiler = cProfile.Profile() if profile else None
        c0 = time.process_time()
        if profiler:
            profiler.enable()
        for _ in range(opens):
            await one()
        if profiler:
            profiler.disable()
        cpu = time.process_time() - c0
        print(f"{store.engine.dialect.name}: {cpu / opens * 1000:.2f} ms CPU per "
              f"open+status+changes over {opens}")
        if profiler:
            profiler.dump_stats(str(Path(tempfile.gettempdir()) / "select_cost.prof"))
            out = io.StringIO()
            stats = pstats.Stats(profiler, stream=out).sort_stats("cumulative")
            stats.print_stats("compile|_generate_cache_key|_compiler|process_compile_state")
            print("\n".join(out.getvalue().splitlines()[:30]))
    finally:
        await store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url")
    parser.add_argument("--opens", type=int, default=200)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    if args.url:
        asyncio.run(run(args.url, args.opens, args.profile))
        return
    with tempfile.TemporaryDirectory(prefix="bench-select-") as tmp:
        asyncio.run(run(f"sqlite:///{tmp}/select.db", args.opens, args.profile))


if __name__ == "__main__":
    main()
