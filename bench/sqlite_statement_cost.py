"""Cost of one small SQL statement on SQLite through the stacks the store can use: SQLAlchemy
asyncio over aiosqlite (what ``imap_store`` uses: each execute hops to the connection's
thread and back, several times), SQLAlchemy Core on a plain synchronous pysqlite connection,
and the ``sqlite3`` module alone. The reference for "how many statements can the serial
group writer afford per message".

    .venv/bin/python bench/sqlite_statement_cost.py [--statements 3000]

Last line: ``aiosqlite=<us> sync=<us> raw=<us> (per SELECT by primary key, wall; cpu=<us>)``.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.ext.asyncio import create_async_engine


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--statements", type=int, default=3000)
    args = parser.parse_args(argv)
    n = args.statements
    with tempfile.TemporaryDirectory(prefix="bench-sqlite-") as tmp:
        path = Path(tmp) / "x.db"
        with sqlite3.connect(path) as db:
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT)")
            db.execute("INSERT INTO t (name) VALUES ('a')")
        query = text("SELECT name FROM t WHERE id = :i")

        async def via_aiosqlite() -> tuple[float, float]:
            engine = create_async_engine(f"sqlite+aiosqlite:///{path}")
            try:
                async with engine.connect() as conn:
                    await conn.execute(query, {"i": 1})
                    t0, c0 = time.perf_counter(), time.process_time()
                    for _ in range(n):
                        (await conn.execute(query, {"i": 1})).first()
                    return time.perf_counter() - t0, time.process_time() - c0
            finally:
                await engine.dispose()

        async_wall, async_cpu = asyncio.run(via_aiosqlite())

        engine = create_engine(f"sqlite:///{path}")
        with engine.connect() as conn:
            conn.execute(query, {"i": 1})
            t0 = time.perf_counter()
            for _ in range(n):
                conn.execute(query, {"i": 1}).first()
            sync_wall = time.perf_counter() - t0
        engine.dispose()

        raw = sqlite3.connect(path)
        t0 = time.perf_counter()
        for _ in range(n):
            raw.execute("SELECT name FROM t WHERE id = ?", (1,)).fetchone()
        raw_wall = time.perf_counter() - t0
        raw.close()
    us = 1e6 / n
    print(f"aiosqlite={async_wall * us:.0f}us sync={sync_wall * us:.0f}us "
          f"raw={raw_wall * us:.1f}us (per SELECT by primary key, wall; "
          f"cpu={async_cpu * us:.0f}us for aiosqlite, both threads)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
