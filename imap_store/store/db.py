"""Engine creation and schema migration for the store (SPEC §5).

``sqlite:///PATH`` and ``postgresql://USER@HOST/DB`` pick their asyncio drivers (aiosqlite,
asyncpg). SQLite runs in WAL mode with ``synchronous=FULL`` so a commit is durable. A
``?schema=NAME`` query parameter on a PostgreSQL URL keeps the tables in that schema.
Migrations are applied under a lock (PostgreSQL advisory lock; SQLite ``BEGIN IMMEDIATE``),
so several processes may start at once on one database.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import create_engine as sa_create_engine
from sqlalchemy import event, text
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.engine.url import URL
from sqlalchemy.exc import ArgumentError, DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
_MIGRATION_LOCK_KEY = 0x6D7373  # "mss": PostgreSQL advisory lock taken while migrating
_SCHEMA_RE = re.compile(r"[a-z_][a-z0-9_]{0,62}")
#: How long a SQLite writer waits for another process's write transaction (ms).
SQLITE_BUSY_TIMEOUT_MS = 30_000


class StorageError(Exception):
    """The storage URL is unusable or the database cannot be reached."""


class StorageConfigError(StorageError):
    """The URL itself is wrong: bad syntax, a missing directory or database, a refused user
    (the command lines exit 2 on it, as on any configuration error)."""


def describe_target(url: str) -> str:
    """``PostgreSQL database 'gw' on db.example:5432`` or ``SQLite file /srv/gw.db``, for
    error messages (never the password)."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        return "the database"
    if parsed.get_backend_name() == "sqlite":
        return f"SQLite file {parsed.database}"
    return (f"PostgreSQL database {parsed.database or parsed.username or ''!r} on "
            f"{parsed.host or 'localhost'}:{parsed.port or 5432}")


def _explain_connect_failure(url: str, exc: BaseException) -> StorageError:
    """Name what failed: the server (unreachable), the database (missing) or the user."""
    target = describe_target(url)
    cause = getattr(exc, "orig", None) or exc
    cause = cause.__cause__ or cause  # the driver's own exception under SQLAlchemy's adapter
    name = type(cause).__name__
    if isinstance(cause, OSError) or name in ("ConnectionDoesNotExistError", "TimeoutError"):
        detail = getattr(cause, "strerror", None) or str(cause) or name
        return StorageError(f"cannot reach the server of the {target}: {detail}")
    if name == "InvalidCatalogNameError":
        return StorageConfigError(f"the {target} does not exist (create it, or fix "
                                  f"[storage] url)")
    if name in ("InvalidAuthorizationSpecificationError", "InvalidPasswordError"):
        return StorageConfigError(f"the {target} refused the login: {cause}")
    return StorageError(f"the {target} failed: {name}: {str(cause)[:200]}")


def async_url(url: str) -> tuple[URL, dict[str, Any], str | None]:
    """Map a user URL onto an asyncio driver URL, its connect args and the PG schema."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise StorageConfigError(f"storage.url: not a database URL: {url!r}") from None
    backend = parsed.get_backend_name()
    connect_args: dict[str, Any] = {}
    schema: str | None = None
    if backend == "sqlite":
        if parsed.database in (None, "", ":memory:"):
            raise StorageConfigError("storage.url: SQLite needs a file path (sqlite:///PATH)")
        parsed = parsed.set(drivername="sqlite+aiosqlite")
    elif backend in ("postgresql", "postgres"):
        query = dict(parsed.query)
        raw_schema = query.pop("schema", None)
        if isinstance(raw_schema, tuple):
            raw_schema = raw_schema[0]
        if raw_schema:
            if not _SCHEMA_RE.fullmatch(raw_schema):
                raise StorageConfigError(f"storage.url: invalid schema name {raw_schema!r}")
            schema = raw_schema
            connect_args["server_settings"] = {"search_path": schema}
        parsed = parsed.set(drivername="postgresql+asyncpg", query=query)
    else:
        raise StorageConfigError(
            f"storage.url: unsupported database {backend!r} (use sqlite:/// or postgresql://)"
        )
    return parsed, connect_args, schema


def is_sqlite(engine: AsyncEngine) -> bool:
    return engine.dialect.name == "sqlite"


def create_engine(url: str, *, pool_size: int = 20) -> AsyncEngine:
    """An AsyncEngine for ``url`` with the durability settings of SPEC §5."""
    parsed, connect_args, _schema = async_url(url)
    if parsed.get_backend_name() == "sqlite":
        db_path = Path(parsed.database or "")
        if not db_path.parent.exists():
            raise StorageConfigError(f"storage.url: directory {db_path.parent} does not exist")
        engine = create_async_engine(parsed, connect_args=connect_args, pool_size=pool_size,
                                     max_overflow=pool_size)
        _configure_sqlite(engine)
        return engine
    return create_async_engine(
        parsed, connect_args=connect_args, pool_size=pool_size, max_overflow=pool_size,
        pool_pre_ping=True,
    )


def create_sync_sqlite_engine(url: str, pool_size: int = 8) -> Engine | None:
    """For SQLite, a synchronous pysqlite engine on the same file for the hot paths: the group
    writer, RCPT lookups and reads run in worker threads (connections may move between
    threads, never used by two at once). None for other databases."""
    parsed, _args, _schema = async_url(url)
    if parsed.get_backend_name() != "sqlite":
        return None
    engine = sa_create_engine(
        parsed.set(drivername="sqlite+pysqlite"), pool_size=pool_size, max_overflow=pool_size,
        connect_args={"check_same_thread": False},
    )
    _configure_sqlite_sync(engine)
    return engine


def _configure_sqlite(engine: AsyncEngine) -> None:
    _configure_sqlite_sync(engine.sync_engine)


def _configure_sqlite_sync(sync_engine: Engine) -> None:
    """Take transaction control from pysqlite: ``BEGIN IMMEDIATE`` for writers."""

    @event.listens_for(sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = FULL")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.close()

    @event.listens_for(sync_engine, "begin")
    def _on_begin(conn: Connection) -> None:
        if conn.get_execution_options().get("sqlite_write"):
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            conn.exec_driver_sql("BEGIN")


@asynccontextmanager
async def write_transaction(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A transaction that will write: SQLite takes its write lock up front (no upgrade
    deadlocks between processes); it commits on success and rolls back on error."""
    async with engine.connect() as conn:
        if is_sqlite(engine):
            conn = await conn.execution_options(sqlite_write=True)
        async with conn.begin():
            yield conn


async def migrate(url: str) -> None:
    """Bring the schema to the latest revision, safely when several processes start."""
    engine = create_engine(url, pool_size=1)
    _parsed, _args, schema = async_url(url)
    try:
        async with write_transaction(engine) as conn:
            if not is_sqlite(engine):
                await conn.execute(
                    text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK_KEY}
                )
                if schema:
                    await conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
            await conn.run_sync(_upgrade)
    except (OSError, DBAPIError) as exc:
        raise _explain_connect_failure(url, exc) from None
    finally:
        await engine.dispose()


def _upgrade(connection: Connection) -> None:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["connection"] = connection
    command.upgrade(cfg, "head")
