"""The store: directory (trusted domains, professionals, patients, exchanges), mailboxes and
messages, the audit chain. SQLAlchemy Core over an AsyncEngine (SPEC §5): no blocking
database call on the event loop.

Every query that touches mailbox data is scoped by the owner patient's id.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol, TypeVar

from sqlalchemy import Column, Integer, and_, delete, func, insert, select, text, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from imap_store.store import ops
from imap_store.store import schema as t
from imap_store.store.db import (
    create_engine,
    create_sync_sqlite_engine,
    is_sqlite,
    write_transaction,
)
from imap_store.store.deliver import deliver
from imap_store.store.fields import as_utc, utcnow
from imap_store.store.signals import ChangeSignals
from policy.audit import AuditRecord, first_broken

T = TypeVar("T")
#: PostgreSQL advisory lock keys ``_RPPS_LOCK_BASE + RPPS``, held while a professional with
#: that RPPS is added (two concurrent adds of one number: the second sees the first).
_RPPS_LOCK_BASE = 0x52505053 << 32  # "RPPS"

#: Special-use mailboxes every patient has (RFC 6154), created with the patient.
DEFAULT_MAILBOXES: tuple[tuple[str, str | None], ...] = (
    ("INBOX", None),
    ("Drafts", "\\Drafts"),
    ("Sent", "\\Sent"),
    ("Trash", "\\Trash"),
)


class NotFound(LookupError):
    """The thing asked for does not exist."""


class Conflict(ValueError):
    """The thing to create exists already, or the change is not allowed."""


@dataclass(frozen=True)
class Professional:
    id: int
    address: str
    name: str
    rpps: str | None
    state: str
    has_password: bool
    cert_fingerprint: str | None
    created_at: datetime

    def as_dict(self) -> dict[str, Any]:
        return {
            "address": self.address, "name": self.name, "rpps": self.rpps,
            "state": self.state, "has_password": self.has_password,
            "cert_fingerprint": self.cert_fingerprint,
            "created_at": self.created_at.isoformat(),
        }


@dataclass(frozen=True)
class Patient:
    id: int
    ins: str
    name: str
    notify_email: str
    state: str
    has_password: bool
    created_at: datetime
    phone: str | None = None  # where the portal's one-time code may go by SMS

    def as_dict(self) -> dict[str, Any]:
        return {
            "ins": self.ins, "name": self.name, "notify_email": self.notify_email,
            "phone": self.phone, "state": self.state, "has_password": self.has_password,
            "created_at": self.created_at.isoformat(),
        }


@dataclass(frozen=True)
class Contact:
    """One entry of ``exchange list``: a professional who wrote, or a Reply-To address."""

    address: str
    name: str
    state: str
    since: datetime
    via: str | None  # for a Reply-To address: the professional whose message named it

    def as_dict(self) -> dict[str, Any]:
        return {"address": self.address, "name": self.name, "state": self.state,
                "since": self.since.isoformat(), "via": self.via}


@dataclass(frozen=True)
class MailboxCounts:
    name: str
    messages: int
    unseen: int


class BlobStore(Protocol):
    """Immutable message bodies (SPEC §5: in the database by default)."""

    async def put(self, conn: AsyncConnection, data: bytes) -> int: ...

    async def get(self, conn: AsyncConnection, blob_id: int) -> bytes: ...


class DatabaseBlobStore:
    """Bodies in the ``blob`` table, one row per stored body."""

    async def put(self, conn: AsyncConnection, data: bytes) -> int:
        return await conn.run_sync(ops.blob_put, data)

    async def get(self, conn: AsyncConnection, blob_id: int) -> bytes:
        result = await conn.execute(select(t.blob.c.data).where(t.blob.c.id == blob_id))
        data = result.scalar_one_or_none()
        if data is None:
            raise NotFound(f"blob {blob_id}")
        return bytes(data)


class LoopReader:
    """The read API of an ``AsyncConnection`` (``execute``, ``run_sync``) over a synchronous
    connection, for ``Store.read()`` on SQLite: each call runs at once on the calling thread."""

    def __init__(self, conn: Connection) -> None:
        self.sync_connection = conn
        self.dialect = conn.dialect

    async def execute(self, statement: Any, parameters: Any = None) -> Any:
        return self.sync_connection.execute(statement, parameters)

    async def run_sync(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return fn(self.sync_connection, *args, **kwargs)


#: Idle connections ``read()`` keeps for the event loop (the others go back to the pool, which
#: worker threads and the group writer share).
LOOP_READERS_KEPT = 2
#: PostgreSQL: idle autocommit connections ``read_inline`` keeps between lookups. A pool
#: checkout pre-pings (BEGIN, an empty query, ROLLBACK): three round trips around a one-row
#: RCPT lookup (issue 14). They count in the engine's pool (``create_engine``: 20 kept, 20
#: overflow): 16 leaves the group writer's connection and a few for other reads, while 20
#: concurrent SMTP sessions rarely miss (bench/smtp_intake.py: 5.4 round trips per message
#: with 12 kept, 5.0 with 20, 6.1 with 8).
INLINE_READERS_KEPT = 16


def new_uidvalidity() -> int:
    """RFC 3501 §2.3.1.1: a non-zero 32-bit value, different for a re-created mailbox."""
    return (int(utcnow().timestamp()) & 0x7FFFFFFF) ^ secrets.randbits(16) or 1


async def _row(conn: AsyncConnection, key: Column[Any], value: str, what: str) -> Any:
    """The row of ``key``'s table whose ``key`` is ``value``: a professional by address, a
    patient by INS. NotFound (``<what> <value> not found``) when there is none."""
    row = (await conn.execute(select(key.table).where(key == value))).first()
    if row is None:
        raise NotFound(f"{what} {value} not found")
    return row


async def _update_row(
    conn: AsyncConnection, key: Column[Any], value: str, what: str, **values: Any
) -> None:
    """Sets ``values`` on the row of ``key``'s table whose ``key`` is ``value``; NotFound as
    :func:`_row` when there is none."""
    result = await conn.execute(update(key.table).where(key == value).values(**values))
    if result.rowcount == 0:
        raise NotFound(f"{what} {value} not found")


def _contacts(conn: Connection, patient_id: int) -> list[Contact]:
    """A patient's contacts: its exchanges, then the aliases (R4) of each, by name. One
    statement (each is a round trip on PostgreSQL): the exchanges outer-joined to their
    aliases."""
    a = t.exchange_alias
    rows = conn.execute(
        select(t.exchange, a.c.address.label("alias_address"), a.c.name.label("alias_name"),
               a.c.since.label("alias_since"))
        .select_from(t.exchange.outerjoin(a, a.c.exchange_id == t.exchange.c.id))
        .where(t.exchange.c.patient_id == patient_id)
        .order_by(t.exchange.c.id, a.c.id)
    ).all()
    contacts: list[Contact] = []
    for r in rows:
        if not contacts or contacts[-1].address != r.professional_address:
            contacts.append(Contact(r.professional_address, r.professional_name, r.state,
                                    as_utc(r.since), None))
    direct = {c.address for c in contacts}
    for r in rows:
        if r.alias_address is None or r.alias_address in direct:
            continue
        since = as_utc(r.alias_since) if r.state == "open" else as_utc(r.since)
        contacts.append(Contact(r.alias_address, r.alias_name, r.state, since,
                                r.professional_address))
    contacts.sort(key=lambda c: ((c.name or c.address).casefold(), c.address))
    return contacts


class Store:
    def __init__(self, engine: AsyncEngine, blobs: BlobStore | None = None,
                 sync_engine: Engine | None = None, url: str | None = None) -> None:
        self.engine = engine
        #: Commits of this process wake the IMAP sessions of every process (``signals.py``).
        self.signals = ChangeSignals(url or engine.url.render_as_string(hide_password=False))
        self.blobs: BlobStore = blobs or DatabaseBlobStore()
        #: SQLite only: the same file through pysqlite, for the hot paths (the group
        #: writer, ``read()`` and ``read_inline`` on the event loop, ``run_read`` in threads).
        self.sync_engine = sync_engine
        self._loop_readers: list[Connection] = []  # idle connections of ``read()``
        self._inline_readers: list[AsyncConnection] = []  # PostgreSQL, ``read_inline``

    @classmethod
    def from_url(cls, url: str) -> Store:
        return cls(create_engine(url), sync_engine=create_sync_sqlite_engine(url), url=url)

    async def close(self) -> None:
        await self.signals.close()
        while self._inline_readers:
            await self._inline_readers.pop().close()
        await self.engine.dispose()
        while self._loop_readers:
            self._loop_readers.pop().close()
        if self.sync_engine is not None:
            self.sync_engine.dispose()

    async def run_read(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a synchronous read ``fn(conn, *args)`` in one transaction: in a worker thread
        on SQLite (one hop for all its statements), through run_sync on PostgreSQL."""
        if self.sync_engine is not None:
            value: T = await asyncio.to_thread(self._read_in_thread, fn, *args)
            return value
        async with self.engine.connect() as conn:
            result: T = await conn.run_sync(fn, *args)
            await conn.rollback()
            return result

    async def read_inline(self, fn: Callable[..., T], *args: Any) -> T:
        """Like ``run_read`` for a few indexed lookups (the RCPT checks), in autocommit: each
        lookup reads the last commit, with no transaction around them (no BEGIN and COMMIT
        or ROLLBACK). On SQLite on the event loop (see ``read``), where a hop to a worker
        thread would cost more than the lookups; on PostgreSQL on a kept connection (no pool
        checkout). ``fn`` only reads: a kept PostgreSQL connection found lost (the server
        restarted) is dropped and ``fn`` runs again once on a fresh one."""
        if self.sync_engine is not None:
            # As on PostgreSQL, no transaction around the lookups (each reads the last
            # commit): through SQLAlchemy, BEGIN and COMMIT cost more than the lookups
            # (profiled: 4 % of SMTP intake's CPU, bench/smtp_intake.py).
            conn = await self._loop_reader()
            try:
                value: T = fn(conn, *args)
                if conn.in_transaction():  # SQLAlchemy statements began one: end it
                    conn.commit()
            except BaseException:
                conn.close()
                raise
            self._keep_loop_reader(conn)
            return value
        kept = bool(self._inline_readers)
        aconn = self._inline_readers.pop() if kept else await self._inline_reader()
        try:
            result: T = await aconn.run_sync(fn, *args)
        except Exception:
            lost = aconn.invalidated
            await aconn.close()
            if lost and kept:
                return await self._read_inline_fresh(fn, *args)
            raise
        except BaseException:  # cancelled mid-statement: its state is unknown
            await asyncio.shield(aconn.invalidate())
            raise
        if len(self._inline_readers) < INLINE_READERS_KEPT:
            self._inline_readers.append(aconn)
        else:
            await aconn.close()
        return result

    async def _inline_reader(self) -> AsyncConnection:
        aconn = await self.engine.connect()
        return await aconn.execution_options(isolation_level="AUTOCOMMIT")

    async def _read_inline_fresh(self, fn: Callable[..., T], *args: Any) -> T:
        aconn = await self._inline_reader()
        try:
            result: T = await aconn.run_sync(fn, *args)
        finally:
            await aconn.close()
        return result

    def _read_in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        assert self.sync_engine is not None
        with self.sync_engine.connect() as conn, conn.begin():
            return fn(conn, *args)

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncConnection]:
        """``async with store.write() as conn``: one durable write transaction."""
        async with write_transaction(self.engine) as conn:
            yield conn
        self.signals.committed()

    def read(self) -> Any:
        """``async with store.read() as conn``: one transaction for reads (``conn.execute``,
        ``conn.run_sync``). On SQLite it runs on the event loop over a pysqlite connection
        (in WAL mode readers never wait): the IMAP reads, each a few statements, cost less
        there than through aiosqlite's thread, where every statement crosses threads and the
        GIL twice. Elsewhere an ``AsyncConnection`` transaction."""
        if self.sync_engine is not None:
            return self._read_on_loop()
        return self.engine.begin()

    @asynccontextmanager
    async def _read_on_loop(self) -> AsyncIterator[LoopReader]:
        conn = await self._loop_reader()
        try:
            with conn.begin():  # commits on success, as engine.begin() does
                yield LoopReader(conn)
        except BaseException:
            conn.close()
            raise
        self._keep_loop_reader(conn)

    async def _loop_reader(self) -> Connection:
        """SQLite: a connection for a read on the event loop, one per read in progress
        (sessions interleave at their awaits)."""
        assert self.sync_engine is not None
        if self._loop_readers:
            return self._loop_readers.pop()
        return await asyncio.to_thread(self.sync_engine.connect)  # PRAGMAs may wait: a thread

    def _keep_loop_reader(self, conn: Connection) -> None:
        if len(self._loop_readers) < LOOP_READERS_KEPT:
            self._loop_readers.append(conn)
        else:  # many reads began at once: give the rest back, the pool is shared
            conn.close()

    # --- audit ---------------------------------------------------------------------------

    async def audit(
        self, conn: AsyncConnection, actor: str, action: str, subject: str = "",
        detail: dict[str, Any] | None = None,
    ) -> None:
        """Append one row to the hash chain, inside the caller's write transaction."""
        await conn.run_sync(ops.audit, actor, action, subject, detail)

    async def audit_records(self, limit: int | None = None) -> list[AuditRecord]:
        query = select(t.audit).order_by(t.audit.c.id.desc() if limit else t.audit.c.id)
        if limit:
            query = query.limit(limit)
        async with self.read() as conn:
            rows = (await conn.execute(query)).all()
        records = [
            AuditRecord(r.id, as_utc(r.at), r.actor, r.action, r.subject, r.detail,
                        r.prev_hash, r.hash)
            for r in rows
        ]
        return list(reversed(records)) if limit else records

    async def audit_verify(self) -> tuple[int, tuple[int, str] | None]:
        records = await self.audit_records()
        return len(records), first_broken(records)

    # --- trusted domains -----------------------------------------------------------------

    async def trusted_domains(self, conn: AsyncConnection | None = None) -> list[str]:
        if conn is not None:
            return await conn.run_sync(ops.trusted_domains)
        async with self.read() as c:
            names: list[str] = await c.run_sync(ops.trusted_domains)
            return names

    async def is_trusted_domain(self, conn: AsyncConnection, domain: str) -> bool:
        return await conn.run_sync(ops.is_trusted_domain, domain)

    async def add_domains(self, actor: str, names: Iterable[str], source: str) -> list[str]:
        """Add domains; return those that were new."""
        added: list[str] = []
        async with self.write() as conn:
            existing = set(await self.trusted_domains(conn))
            for name in names:
                if name in existing or name in added:
                    continue
                await conn.execute(
                    insert(t.trusted_domain).values(name=name, source=source, added_at=utcnow())
                )
                added.append(name)
            await self.audit(conn, actor, "domain.add", ",".join(added), {"source": source})
        return added

    async def remove_domain(self, actor: str, name: str) -> None:
        async with self.write() as conn:
            result = await conn.execute(
                delete(t.trusted_domain).where(t.trusted_domain.c.name == name)
            )
            if result.rowcount == 0:
                raise NotFound(f"domain {name} is not a trusted domain")
            await self.audit(conn, actor, "domain.remove", name)

    # --- professionals -------------------------------------------------------------------

    @staticmethod
    def _professional(row: Any) -> Professional:
        return Professional(
            id=row.id, address=row.address, name=row.name, rpps=row.rpps, state=row.state,
            has_password=row.password_hash is not None, cert_fingerprint=row.cert_fingerprint,
            created_at=as_utc(row.created_at),
        )

    async def add_professional(
        self, actor: str, address: str, name: str, rpps: str | None, password_hash: str | None,
    ) -> Professional:
        async with self.write() as conn:
            domain = address.rpartition("@")[2]
            if not await self.is_trusted_domain(conn, domain):
                raise Conflict(f"{domain} is not a trusted domain (add it with 'domain add')")
            if rpps is not None:  # one person, one RPPS number
                if not is_sqlite(self.engine):  # SQLite: BEGIN IMMEDIATE serialises writers
                    await conn.execute(text("SELECT pg_advisory_xact_lock(:k)"),
                                       {"k": _RPPS_LOCK_BASE + int(rpps)})
                holder = (await conn.execute(select(t.professional.c.address).where(
                    t.professional.c.rpps == rpps).limit(1))).scalar()
                if holder is not None:
                    raise Conflict(f"RPPS {rpps} is already the number of {holder}")
            try:
                await conn.execute(
                    insert(t.professional).values(
                        address=address, name=name, rpps=rpps, state="active",
                        password_hash=password_hash, created_at=utcnow(),
                    )
                )
            except IntegrityError:
                raise Conflict(f"professional {address} already exists") from None
            await self.audit(conn, actor, "professional.add", address, {"rpps": rpps})
            return await self._get_professional(conn, address)

    async def _rows(self, key: Column[Any]) -> list[Any]:
        """Every row of ``key``'s table, in ``key`` order."""
        async with self.read() as conn:
            return list(await conn.execute(select(key.table).order_by(key)))

    async def _get_professional(self, conn: AsyncConnection, address: str) -> Professional:
        return self._professional(
            await _row(conn, t.professional.c.address, address, "professional"))

    async def get_professional(self, address: str) -> Professional:
        async with self.read() as conn:
            return await self._get_professional(conn, address)

    async def list_professionals(self) -> list[Professional]:
        return [self._professional(r) for r in await self._rows(t.professional.c.address)]

    async def set_professional_state(self, actor: str, address: str, state: str) -> Professional:
        async with self.write() as conn:
            await _update_row(conn, t.professional.c.address, address, "professional",
                              state=state)
            await self.audit(conn, actor, f"professional.{state}", address)
            return await self._get_professional(conn, address)

    async def professional_password_hash(self, address: str) -> tuple[int, str | None] | None:
        async with self.read() as conn:
            row = (await conn.execute(
                select(t.professional.c.id, t.professional.c.password_hash)
                .where(t.professional.c.address == address)
            )).first()
        return None if row is None else (row.id, row.password_hash)

    async def professional_by_address(self, conn: AsyncConnection, address: str) -> Any:
        """The directory row (id, name, state, cert_fingerprint) or None."""
        return await conn.run_sync(ops.professional_by_address, address)

    # --- patients ------------------------------------------------------------------------

    @staticmethod
    def _patient(row: Any) -> Patient:
        return Patient(
            id=row.id, ins=row.ins, name=row.name, notify_email=row.notify_email,
            state=row.state, has_password=row.password_hash is not None,
            created_at=as_utc(row.created_at), phone=row.phone,
        )

    async def add_patient(
        self, actor: str, ins: str, name: str, notify_email: str, password_hash: str | None,
        welcome: bytes, phone: str | None = None,
    ) -> Patient:
        """Create the patient, its four special-use mailboxes and the welcome message."""
        async with self.write() as conn:
            try:
                result = await conn.execute(
                    insert(t.patient).values(
                        ins=ins, name=name, notify_email=notify_email, state="open",
                        password_hash=password_hash, created_at=utcnow(), phone=phone,
                    ).returning(t.patient.c.id)
                )
            except IntegrityError:
                raise Conflict(f"patient {ins} already exists") from None
            patient_id = int(result.scalar_one())
            boxes = await self.create_default_mailboxes(conn, patient_id)
            await conn.run_sync(deliver, [boxes["INBOX"]], welcome)
            await self.audit(conn, actor, "patient.add", ins)
            return await self._get_patient(conn, ins)

    async def create_default_mailboxes(
        self, conn: AsyncConnection, patient_id: int
    ) -> dict[str, int]:
        ids: dict[str, int] = {}
        for name, use in DEFAULT_MAILBOXES:
            result = await conn.execute(
                insert(t.mailbox).values(
                    patient_id=patient_id, name=name, special_use=use,
                    uidvalidity=new_uidvalidity(), uidnext=1, highestmodseq=1,
                ).returning(t.mailbox.c.id)
            )
            ids[name] = int(result.scalar_one())
        # subscribed from the start, as CREATE subscribes (RFC 3501 §6.3.6)
        await conn.execute(insert(t.subscription), [
            {"patient_id": patient_id, "name": name} for name, _use in DEFAULT_MAILBOXES])
        return ids

    async def _get_patient(self, conn: AsyncConnection, ins: str) -> Patient:
        return self._patient(await _row(conn, t.patient.c.ins, ins, "patient"))

    async def get_patient(self, ins: str) -> Patient:
        async with self.read() as conn:
            return await self._get_patient(conn, ins)

    async def list_patients(self) -> list[Patient]:
        return [self._patient(r) for r in await self._rows(t.patient.c.ins)]

    async def set_patient_state(self, actor: str, ins: str, state: str) -> Patient:
        async with self.write() as conn:
            await _update_row(conn, t.patient.c.ins, ins, "patient", state=state)
            await self.audit(conn, actor, f"patient.{'close' if state == 'closed' else 'reopen'}",
                             ins)
            return await self._get_patient(conn, ins)

    async def set_patient_password(self, actor: str, ins: str, password_hash: str) -> None:
        async with self.write() as conn:
            await _update_row(conn, t.patient.c.ins, ins, "patient", password_hash=password_hash)
            await self.audit(conn, actor, "patient.set-password", ins)

    async def patient_password_hash(self, ins: str) -> tuple[int, str, str | None] | None:
        async with self.read() as conn:
            row = (await conn.execute(
                select(t.patient.c.id, t.patient.c.state, t.patient.c.password_hash)
                .where(t.patient.c.ins == ins)
            )).first()
        return None if row is None else (row.id, row.state, row.password_hash)

    async def mailbox_counts(self, patient_id: int) -> list[MailboxCounts]:
        """Per-mailbox message and unseen counts (counts only, never content)."""
        seen = t.message.c.flags.op("&")(t.FLAG_SEEN)
        query = (
            select(
                t.mailbox.c.name,
                func.count(t.message.c.id),
                func.coalesce(func.sum(func.cast(seen == 0, Integer)), 0),
            )
            .select_from(t.mailbox.outerjoin(t.message, t.message.c.mailbox_id == t.mailbox.c.id))
            .where(t.mailbox.c.patient_id == patient_id)
            .group_by(t.mailbox.c.id, t.mailbox.c.name)
            .order_by(t.mailbox.c.id)
        )
        async with self.read() as conn:
            rows = (await conn.execute(query)).all()
        return [MailboxCounts(r[0], int(r[1]), int(r[2])) for r in rows]

    async def mailbox_id(self, conn: AsyncConnection, patient_id: int, name: str) -> int:
        try:
            return await conn.run_sync(ops.mailbox_id, patient_id, name)
        except ops.MissingMailbox as exc:
            raise NotFound(str(exc)) from None

    # --- messages ------------------------------------------------------------------------

    # --- exchanges -----------------------------------------------------------------------

    async def set_exchange_state(
        self, actor: str, ins: str, professional_address: str, state: str
    ) -> Contact:
        """Admin end/reopen (SPEC §7)."""
        async with self.write() as conn:
            patient = await self._get_patient(conn, ins)
            result = await conn.execute(
                update(t.exchange).where(and_(
                    t.exchange.c.patient_id == patient.id,
                    t.exchange.c.professional_address == professional_address,
                )).values(state=state, since=utcnow())
            )
            if result.rowcount == 0:
                raise NotFound(
                    f"no exchange between patient {ins} and {professional_address}"
                )
            await self.audit(conn, actor, f"exchange.{'end' if state == 'ended' else 'reopen'}",
                             ins, {"professional": professional_address})
            contacts = await self._contacts(conn, patient.id)
        return next(c for c in contacts if c.address == professional_address and c.via is None)

    async def _contacts(self, conn: AsyncConnection, patient_id: int) -> list[Contact]:
        return await conn.run_sync(_contacts, patient_id)

    async def list_contacts(self, ins: str) -> list[Contact]:
        async with self.read() as conn:
            patient = await self._get_patient(conn, ins)
            return await self._contacts(conn, patient.id)

    async def contacts_of(self, patient_id: int) -> list[Contact]:
        """The patient's contacts (as ``list_contacts``), by patient id: two lookups, with
        ``read_inline`` (the portal asks at every conversation page)."""
        return await self.read_inline(_contacts, patient_id)
