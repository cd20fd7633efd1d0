"""``mssante-gateway serve`` with counters, for diagnosing a benchmark (no product change):
SQL statements by kind and by caller (group writer or a session), database connections
opened, group-commit batch sizes and the writer's busy time, event-loop lag. Written as JSON
to ``$MSSANTE_BENCH_TRACE`` when serve stops.

    MSSANTE_BENCH_TRACE=trace.json python bench/serve_traced.py --config gateway.toml serve

``$MSSANTE_BENCH_WHATIF`` (comma-separated) applies candidate fixes *in this process only*,
to measure them before anyone edits the product:

- ``dataline``: ``smtp_in.data._LONG_LINE`` as ``(?<=[\\r\\n])[^\\r\\n]{1000}`` (same matches;
  linear instead of ~line-length x more work).
- ``datafast``: ``DataReader._check`` with ``bytes.split``/``bytearray.count`` scans.
- ``release``: once a group commit is done, drop its jobs: ``GroupWriter._run`` keeps the
  last batch (``batch``, ``first``) and with it every message of that batch until the next
  job arrives.
- ``onecopy``: the stored message built once from the DATA buffer (one copy alive per
  message until its commit instead of two).
- ``pool``: SQLite engine with a pool of 40 connections and no overflow churn (instead of
  SQLAlchemy's default 5 + 10 overflow); PostgreSQL 40, no overflow, no pre-ping.
- ``domains``: ``Store.trusted_domains()`` cached for 5 s.

The hooks are SQLAlchemy events and wrappers; they cost a few microseconds per statement.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import contextvars
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.pool import Pool

from gateway.cli import main
from imap_store import writer as writer_module

_in_writer: contextvars.ContextVar[bool] = contextvars.ContextVar("in_writer", default=False)
stats: dict[str, Any] = {
    "statements": collections.Counter(),  # "writer SELECT", "other INSERT", ...
    "by_text": collections.Counter(),  # first 90 characters of each statement
    "connects": 0,
    "batches": [],  # (jobs, seconds)
    "lag": [],  # (monotonic time, event-loop lag in seconds)
    "whatif": [],
}


@event.listens_for(Engine, "before_cursor_execute")
def _count(conn: Any, cursor: Any, statement: str, params: Any, context: Any,
           many: bool) -> None:
    who = "writer" if _in_writer.get() else "other"
    verb = statement.lstrip().split(None, 1)[0].upper() if statement.strip() else "?"
    stats["statements"][f"{who} {verb}"] += 1
    stats["by_text"][f"{who}: " + " ".join(statement.split())[:90]] += 1


@event.listens_for(Engine, "commit")
def _commit(conn: Any) -> None:
    stats["statements"][("writer" if _in_writer.get() else "other") + " COMMIT"] += 1


@event.listens_for(Pool, "connect")
def _connect(dbapi_connection: Any, record: Any) -> None:
    stats["connects"] += 1


_RELEASE = False
_original_write = writer_module.GroupWriter._write
_original_start = writer_module.GroupWriter.start


async def _traced_write(self: Any, batch: list[Any]) -> None:
    token = _in_writer.set(True)
    t0 = time.perf_counter()
    try:
        await _original_write(self, batch)
    finally:
        stats["batches"].append((len(batch), time.perf_counter() - t0))
        _in_writer.reset(token)
        if _RELEASE:  # what-if "release": drop the jobs (and the messages they hold)
            for pending in batch:
                pending.job = None
            batch.clear()


async def _lag_monitor(interval: float = 0.01) -> None:
    """How late a 10 ms sleep wakes up: every await in the serial writer pays about this."""
    loop = asyncio.get_running_loop()
    while True:
        t0 = loop.time()
        await asyncio.sleep(interval)
        stats["lag"].append((t0, loop.time() - t0 - interval))


_lag_task: asyncio.Task[None] | None = None


def _traced_start(self: Any) -> None:
    global _lag_task
    _original_start(self)
    if _lag_task is None:
        _lag_task = asyncio.get_running_loop().create_task(_lag_monitor())


writer_module.GroupWriter._write = _traced_write  # type: ignore[method-assign]
writer_module.GroupWriter.start = _traced_start  # type: ignore[method-assign]


def _patch_data_reader() -> None:
    """DataReader._check with C-speed scans: the longest line from ``bytes.split`` and bare
    CR/LF from ``bytearray.count`` (instead of two regular expressions run per byte).
    The tail (size, budget, scan position) is the product's, as of this writing."""
    from smtp_in import data

    def _check(self: Any) -> None:
        buf = self.buf
        scan = self._scan
        limit = self.max_line
        lines = bytes(buf[scan:]).split(b"\n")
        if max(map(len, lines)) > limit and any(  # runs between CR or LF, as the regex
                len(run) > limit for line in lines if len(line) > limit
                for run in line.split(b"\r")):
            self.state = data.DataState.LINE_TOO_LONG
            return
        start = max(scan, 2)  # a line start: an LF at or after it has its CR after it too
        crlf = buf.count(b"\r\n", start)
        if buf.count(b"\n", start) != crlf or \
                buf.count(b"\r", start) != crlf + (1 if buf.endswith(b"\r") else 0):
            self.state = data.DataState.BARE_NEWLINE
            return
        body = len(buf) - 2
        if body > self.max_size:
            self.state = data.DataState.TOO_BIG
            return
        if self._reserve is not None and body > self.reserved:
            want = max(body - self.reserved, 64 * 1024)
            if not self._reserve(want):
                self.state = data.DataState.NO_MEMORY
                return
            self.reserved += want
        last_nl = buf.rfind(b"\n")
        if last_nl >= self._scan:
            self._scan = last_nl + 1

    data.DataReader._check = _check  # type: ignore[method-assign]


def _patch_one_copy() -> None:
    """The stored message (Received: + body) built once, straight from the DATA buffer,
    instead of ``raw = reader.message()`` then ``received + raw`` with both alive until the
    commit. Done from outside: while ``_finish_data`` runs, ``DataReader.message`` prepends
    the trace field and ``_received_header`` returns b"" (``b"" + raw`` is ``raw``)."""
    from smtp_in import data, server

    finishing: contextvars.ContextVar[Any] = contextvars.ContextVar("finishing", default=None)
    finish_data = server.GatewaySMTP._finish_data
    received_header = server.GatewaySMTP._received_header
    message = data.DataReader.message

    async def _finish_data(self: Any, reader: Any) -> str:
        token = finishing.set(self)
        try:
            return await finish_data(self, reader)  # type: ignore[no-any-return]
        finally:
            finishing.reset(token)

    def _received_header(self: Any) -> bytes:
        return b"" if finishing.get() is self else received_header(self)

    def _message(self: Any) -> bytes:
        session = finishing.get()
        if session is None:
            return message(self)  # type: ignore[no-any-return]
        body = self.buf
        del body[:2]
        if body.startswith(b".."):
            del body[0]
        if b"\r\n.." in body:
            body = bytearray(body.replace(b"\r\n..", b"\r\n."))
        body[:0] = received_header(session)
        self.buf = bytearray()
        out = bytes(body)
        del body
        return out

    server.GatewaySMTP._finish_data = _finish_data  # type: ignore[method-assign]
    server.GatewaySMTP._received_header = _received_header  # type: ignore[method-assign]
    data.DataReader.message = _message  # type: ignore[method-assign]


def _apply_whatif(names: list[str]) -> None:
    if "dataline" in names:
        from smtp_in import data

        data._LONG_LINE = re.compile(rb"(?<=[\r\n])[^\r\n]{%d}" % (data.MAX_LINE + 1))
    if "release" in names:
        global _RELEASE
        _RELEASE = True
    if "datafast" in names:
        _patch_data_reader()
    if "onecopy" in names:
        _patch_one_copy()
    if "pool" in names:
        from sqlalchemy.ext.asyncio import create_async_engine

        from imap_store import db, store

        def create_engine(url: str, *, pool_size: int = 10) -> Any:
            parsed, connect_args, _schema = db.async_url(url)
            if parsed.get_backend_name() == "sqlite":
                engine = create_async_engine(parsed, connect_args=connect_args,
                                             pool_size=40, max_overflow=0)
                db._configure_sqlite(engine)
                return engine
            return create_async_engine(parsed, connect_args=connect_args,
                                       pool_size=max(pool_size, 40), max_overflow=0)

        store.create_engine = create_engine  # type: ignore[assignment]
    if "domains" in names:
        from imap_store.store import Store

        original = Store.trusted_domains
        cache: dict[int, tuple[float, list[str]]] = {}

        async def trusted_domains(self: Store, conn: Any = None) -> list[str]:
            hit = cache.get(id(self))
            if hit is not None and time.monotonic() - hit[0] < 5.0:
                return hit[1]
            value = await original(self, conn)
            cache[id(self)] = (time.monotonic(), value)
            return value

        Store.trusted_domains = trusted_domains  # type: ignore[method-assign]
    stats["whatif"] = names


def _dump() -> None:
    path = os.environ.get("MSSANTE_BENCH_TRACE")
    if not path:
        return
    out = {
        "statements": dict(stats["statements"]),
        "by_text": dict(stats["by_text"].most_common(60)),
        "connects": stats["connects"],
        "batches": stats["batches"],
        "lag": stats["lag"],
        "whatif": stats["whatif"],
    }
    Path(path).write_text(json.dumps(out, indent=1), encoding="utf-8")


atexit.register(_dump)

if __name__ == "__main__":
    _apply_whatif([n for n in os.environ.get("MSSANTE_BENCH_WHATIF", "").split(",") if n])
    sys.exit(main(sys.argv[1:]))
