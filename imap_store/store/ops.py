"""Synchronous store operations on a plain SQLAlchemy ``Connection``: the hot paths.

They run either in the group writer's thread on a pysqlite connection (SQLite: one thread
hop per batch instead of several per statement), or through ``AsyncConnection.run_sync`` on
asyncpg (PostgreSQL). The async ``Store`` methods delegate here, so each operation exists
once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import DateTime, LargeBinary, and_, bindparam, insert, select, text, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError

from imap_store.store import schema as t
from imap_store.store.fields import MessageFields, StoredMessage, utcnow
from policy.audit import GENESIS_HASH, canonical_detail, chain_hash, chain_stamp, chain_tail
from policy.rules import ContactFacts, MailboxState, PatientFacts, ProfessionalFacts

T = TypeVar("T")
AUDIT_LOCK_KEY = 0x617564  # "aud": serialises appends to the audit chain on PostgreSQL


class MissingMailbox(LookupError):
    pass


# Hot-path statements are built once: building SQLAlchemy constructs per call costs more than
# running them (profiled on the SMTP intake benchmark). Datetimes carry their column type so
# SQLite stores them exactly as the Core tables do.
_TS = DateTime(timezone=True)
#: How SQLAlchemy's SQLite dialect stores DateTime values (so both paths read back alike).
_SQLITE_TS = "%Y-%m-%d %H:%M:%S.%f"


class Stmt:
    """One hot-path SQL statement (``:name`` parameters), prepared once.

    On pysqlite it runs straight on the sqlite3 cursor of the caller's transaction (the same
    connection SQLAlchemy began the transaction on): a few microseconds instead of the tens
    that SQLAlchemy's execution layer adds. Elsewhere it runs as a typed ``text()``, except a
    ``direct`` statement on asyncpg: it runs on the DBAPI cursor of the caller's connection
    (SQLAlchemy's asyncpg adapter: the same transaction, begun by the adapter if it is not
    yet, its prepared-statement cache) with ``$n`` parameters, and its errors are raised as
    SQLAlchemy's, the connection invalidated when it is lost, as ``Connection.execute`` does.
    The statements SMTP intake runs per message or per batch on PostgreSQL are direct:
    SQLAlchemy's execution layer was ~0.1 ms of CPU per message there
    (bench/smtp_intake.py --db postgresql: 1,299 -> 1,427 msg/s, 0.80 -> 0.70 ms CPU/msg).
    Rows come back as tuples (asyncpg records when direct): use positions.
    """

    def __init__(self, sql: str, datetimes: tuple[str, ...] = (),
                 binary: tuple[str, ...] = (), direct: bool = False) -> None:
        self.sql = sql
        self.datetimes = datetimes
        self.clause = text(sql).bindparams(
            *(bindparam(n, type_=_TS) for n in datetimes),
            *(bindparam(n, type_=LargeBinary()) for n in binary))
        self.direct = direct
        #: ``direct``: ``sql`` with ``$1``, ``$2``... and the parameter each number stands for.
        self.numbered, self.names = _numbered(sql) if direct else (sql, ())

    def run(self, conn: Connection, params: dict[str, Any] | None = None) -> Any:
        if conn.dialect.driver == "pysqlite":
            values = dict(params or {})
            for name in self.datetimes:
                value = values.get(name)
                if value is not None:
                    values[name] = value.strftime(_SQLITE_TS)
            return conn.connection.driver_connection.execute(self.sql, values)  # type: ignore[union-attr]
        if self.direct and conn.dialect.driver == "asyncpg":
            return self._run_direct(conn, params or {})
        return conn.execute(self.clause, params or {})

    def _run_direct(self, conn: Connection, params: Mapping[str, Any]) -> _Rows:
        args = tuple(params[name] for name in self.names)
        dbapi_conn: Any = conn.connection.dbapi_connection
        cursor = dbapi_conn.cursor()
        try:
            cursor.execute(self.numbered, args)
            return _Rows(cursor.fetchall() if cursor.description is not None else [])
        except conn.dialect.loaded_dbapi.Error as exc:
            lost = conn.dialect.is_disconnect(exc, dbapi_conn, cursor)
            if lost:
                conn.invalidate(exc)
            raise DBAPIError.instance(
                self.numbered, args, exc, conn.dialect.loaded_dbapi.Error,
                hide_parameters=True, connection_invalidated=lost,
                dialect=conn.dialect) from exc
        finally:
            cursor.close()

    def run_many(self, conn: Connection, rows: Sequence[dict[str, Any]]) -> None:
        """The statement once per parameter set (executemany)."""
        if not rows:
            return
        if conn.dialect.driver == "pysqlite":
            values = [dict(r) for r in rows]
            for row in values:
                for name in self.datetimes:
                    value = row.get(name)
                    if value is not None:
                        row[name] = value.strftime(_SQLITE_TS)
            conn.connection.driver_connection.executemany(self.sql, values)  # type: ignore[union-attr]
            return
        conn.execute(self.clause, list(rows))

    def first(self, conn: Connection, params: dict[str, Any] | None = None) -> Any:
        """The first row as a tuple, or None."""
        result = self.run(conn, params)
        if conn.dialect.driver == "pysqlite":
            return result.fetchone()
        return result.first()


_PARAMETER = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")


def _numbered(sql: str) -> tuple[str, tuple[str, ...]]:
    """``sql`` with each ``:name`` made ``$n`` (the same name, the same number), and the
    names in number order."""
    names: list[str] = []

    def number(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in names:
            names.append(name)
        return f"${names.index(name) + 1}"

    return _PARAMETER.sub(number, sql), tuple(names)


class _Rows:
    """The rows of a direct statement, read as ``Result`` is by the callers of ``Stmt``."""

    __slots__ = ("rows",)

    def __init__(self, rows: Sequence[Any]) -> None:
        self.rows = rows

    def all(self) -> list[Any]:
        return list(self.rows)

    def first(self) -> Any:
        return self.rows[0] if self.rows else None


_LAST_AUDIT_HASH = Stmt("SELECT hash FROM audit ORDER BY id DESC LIMIT 1")
_INSERT_AUDIT = Stmt(
    "INSERT INTO audit (at, actor, action, subject, detail, prev_hash, hash) "
    "VALUES (:at, :actor, :action, :subject, :detail, :prev_hash, :hash)", datetimes=("at",))
_TRUSTED = Stmt("SELECT 1 FROM trusted_domain WHERE name = :name")
# The directory row (if any) and whether its domain is trusted, in one round trip.
_PROFESSIONAL = Stmt(
    "SELECT p.state, p.name, EXISTS (SELECT 1 FROM trusted_domain WHERE name = :domain) "
    "FROM (SELECT 1 AS one) AS one LEFT JOIN professional p ON p.address = :address",
    direct=True)
_PATIENT = Stmt("SELECT id, state FROM patient WHERE ins = :ins", direct=True)
# ``_PROFESSIONAL`` and ``_PATIENT`` in one round trip (an RCPT's first lookup).
_PROFESSIONAL_AND_PATIENT = Stmt(
    "SELECT p.state, p.name, EXISTS (SELECT 1 FROM trusted_domain WHERE name = :domain), "
    "pt.id, pt.state FROM (SELECT 1 AS one) AS one "
    "LEFT JOIN professional p ON p.address = :address LEFT JOIN patient pt ON pt.ins = :ins",
    direct=True)
_PATIENT_NOTIFY = Stmt("SELECT notify_email FROM patient WHERE id = :id")
_MAILBOX = Stmt("SELECT id FROM mailbox WHERE patient_id = :patient_id AND name = :name")
_INSERT_BLOB = Stmt(
    "INSERT INTO blob (sha256, size, data) VALUES (:sha256, :size, :data) RETURNING id",
    binary=("data",))
_INSERT_BLOB_SEARCH = Stmt(
    "INSERT INTO blob_search (blob_id, from_text, to_text, cc_text, bcc_text, subject_text) "
    "VALUES (:blob_id, :from_text, :to_text, :cc_text, :bcc_text, :subject_text)")
_ALLOCATE_UID = Stmt(
    "UPDATE mailbox SET uidnext = uidnext + 1, highestmodseq = highestmodseq + 1 "
    "WHERE id = :id RETURNING uidnext, highestmodseq")
_ALLOCATE_UID_BY_NAME = Stmt(
    "UPDATE mailbox SET uidnext = uidnext + 1, highestmodseq = highestmodseq + 1 "
    "WHERE patient_id = :patient_id AND name = :name RETURNING id, uidnext, highestmodseq")
_INSERT_MESSAGE = Stmt(
    'INSERT INTO message (mailbox_id, uid, modseq, flags, keywords, internal_date, size, '
    'blob_id, message_id, in_reply_to, "references", subject, from_addr, sent_date, '
    "thread_id, has_attachments, from_name, meta) VALUES (:mailbox_id, :uid, :modseq, "
    ":flags, :keywords, :internal_date, :size, :blob_id, :message_id, :in_reply_to, "
    ":references, :subject, :from_addr, :sent_date, :thread_id, :has_attachments, "
    ":from_name, :meta)",
    datetimes=("internal_date", "sent_date"))
_EXCHANGE = Stmt(
    "SELECT id, state, professional_name FROM exchange "
    "WHERE patient_id = :patient_id AND professional_address = :address")
_INSERT_EXCHANGE = Stmt(
    "INSERT INTO exchange (patient_id, professional_address, professional_name, state, since)"
    " VALUES (:patient_id, :address, :name, 'open', :since) RETURNING id",
    datetimes=("since",))


#: One audit entry before it is chained: (actor, action, subject, detail).
AuditEntry = tuple[str, str, str, "dict[str, Any] | None"]


def audit(conn: Connection, actor: str, action: str, subject: str = "",
          detail: dict[str, Any] | None = None) -> None:
    """Append one row to the hash chain inside the caller's write transaction."""
    audit_many(conn, [(actor, action, subject, detail)])


_DEFERRED = "mssante_audit_deferred"


def audit_many(conn: Connection, entries: Sequence[AuditEntry]) -> None:
    """Append rows to the hash chain, in order, inside the caller's write transaction; inside
    ``audit_batch`` they are only collected, and written when the batch ends."""
    if not entries:
        return
    deferred: list[AuditEntry] | None = conn.info.get(_DEFERRED)
    if deferred is not None:
        deferred.extend(entries)
        return
    append_audit(conn, entries)


def chains_in_statement(conn: Connection) -> bool:
    """Whether audit rows may be chained inside the caller's next statement (PostgreSQL,
    inside a group writer's batch, which holds the chain's lock, with no rows collected yet
    to go before them)."""
    deferred = conn.info.get(_DEFERRED)
    return conn.dialect.name == "postgresql" and deferred is not None and not deferred


def with_uids(entries: Sequence[AuditEntry], uids: Sequence[int]) -> list[AuditEntry]:
    """``entries`` with each DeliveredUid replaced by the UID of its target in ``uids``."""
    out: list[AuditEntry] = []
    for actor, action, subject, detail in entries:
        uid = (detail or {}).get("uid")
        if isinstance(uid, DeliveredUid):
            detail = {**(detail or {}), "uid": uids[uid.target]}
        out.append((actor, action, subject, detail))
    return out


@contextlib.contextmanager
def audit_batch(conn: Connection) -> Iterator[list[AuditEntry]]:
    """Collect the audit rows of the jobs run inside (the group writer: one chain read and
    one insert per group commit instead of per job). The caller writes them with
    ``append_audit`` before its commit, and drops those of a job rolled back."""
    entries: list[AuditEntry] = []
    info = conn.info  # taken once: after a lost connection, conn.info itself would raise
    info[_DEFERRED] = entries
    try:
        yield entries
    finally:
        info.pop(_DEFERRED, None)  # the info dict outlives the checkout: never leave it


def append_audit(conn: Connection, entries: Sequence[AuditEntry], locked: bool = False) -> None:
    """Write rows at the end of the hash chain now, whatever their number: on PostgreSQL,
    after the chain's lock (``locked``: the caller holds it already), one statement that
    reads the chain's end and chains the rows itself (up to ``SQL_CHAIN_MAX`` rows);
    otherwise one read of the chain's end and one batched insert."""
    if not entries:
        return
    if conn.dialect.name == "postgresql":
        if not locked:
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": AUDIT_LOCK_KEY})
        if len(entries) <= SQL_CHAIN_MAX:
            _PG_APPEND_AUDIT.run(conn, pg_audit_params(entries))
            return
    row = _LAST_AUDIT_HASH.first(conn)
    _INSERT_AUDIT.run_many(conn, _chain(row[0] if row is not None else GENESIS_HASH, entries))


@dataclass(frozen=True, slots=True)
class DeliveredUid:
    """In an audit entry's detail, as its "uid": the UID the delivery written in the same
    statement gives the message in its ``target``-th mailbox (0-based, over the targets of
    all the statement's messages in order): ``merged_deliver_many``."""

    target: int


#: PostgreSQL: most rows one statement chains (each row's hash is one step of a recursive
#: query: 256 rows ~3 ms in PostgreSQL, 1,000 ~11 ms, growing faster than the rows).
SQL_CHAIN_MAX = 256
# Stands for a DeliveredUid while the row's texts are cut around the place of its digits.
_UID_MARK = str(-7_000_000_001)


def pg_audit_params(entries: Sequence[AuditEntry]) -> dict[str, Any]:
    """The parameters of ``_audit_ctes`` for ``entries``: each row's detail and hash payload
    (``policy.audit.chain_tail``) as the text before and after the UID a DeliveredUid stands
    for (empty when none), and the 1-based target of that UID (None when none)."""
    at = utcnow()
    stamp = chain_stamp(at)
    names = ("a_actor", "a_action", "a_subject", "a_d_pre", "a_d_post", "a_h_pre", "a_h_post",
             "a_slot")
    columns: dict[str, list[Any]] = {name: [] for name in names}
    for actor, action, subject, detail in entries:
        uid = (detail or {}).get("uid")
        if not isinstance(uid, DeliveredUid):
            body = canonical_detail(detail)
            row: tuple[Any, ...] = (actor, action, subject, body, "",
                                    chain_tail(stamp, actor, action, subject, body), "", None)
        else:
            body = canonical_detail({**(detail or {}), "uid": int(_UID_MARK)})
            # The top-level key is the only place '"uid":' stands unescaped.
            d_pre, found, d_post = body.partition('"uid":' + _UID_MARK)
            if not found or '"uid":' + _UID_MARK in d_post:
                raise ValueError("an audit detail names its uid more than once")
            d_pre += '"uid":'
            tail = chain_tail(stamp, actor, action, subject, body)
            # JSON escapes character by character: the detail's encoded text is the encoded
            # texts around the digits, and it ends the tail (before the closing bracket).
            h_post = json.dumps(d_post, ensure_ascii=True)[1:] + "]"
            h_pre = tail[:len(tail) - len(h_post) - len(_UID_MARK)]
            assert tail == h_pre + _UID_MARK + h_post
            row = (actor, action, subject, d_pre, d_post, h_pre, h_post, uid.target + 1)
        for name, value in zip(names, row, strict=True):
            columns[name].append(value)
    return {"a_at": at, "a_genesis": GENESIS_HASH, **columns}


def _audit_ctes(uids: str | None) -> str:
    """PostgreSQL: CTEs that append ``pg_audit_params``'s rows to the chain (the caller holds
    the chain's lock, taken in an earlier statement so that this one sees the chain's end):
    ``ai`` inserts them, each hashed after the one before. ``uids``: the CTE giving each
    target's UID (columns tord, uid) when rows carry DeliveredUids."""
    value = "COALESCE(CAST(r_uid.uid AS TEXT), '')" if uids else "''"
    join = f" LEFT JOIN {uids} AS r_uid ON r_uid.tord = ae.slot" if uids else ""
    step = "encode(sha256(convert_to('[\"' || {prev} || '\",' || ({tails})[{n}], 'UTF8')), 'hex')"
    tails = "SELECT a FROM tails"
    return (
        "ae AS (SELECT * FROM unnest(CAST(:a_actor AS VARCHAR[]), "  # noqa: S608
        "CAST(:a_action AS VARCHAR[]), "
        "CAST(:a_subject AS VARCHAR[]), CAST(:a_d_pre AS TEXT[]), CAST(:a_d_post AS TEXT[]), "
        "CAST(:a_h_pre AS TEXT[]), CAST(:a_h_post AS TEXT[]), CAST(:a_slot AS BIGINT[])) "
        "WITH ORDINALITY AS z(actor, action, subject, d_pre, d_post, h_pre, h_post, slot, ord)), "
        f"av AS (SELECT ae.ord, ae.actor, ae.action, ae.subject, ae.d_pre || {value} || "
        f"ae.d_post AS detail, ae.h_pre || {value} || ae.h_post AS tail FROM ae{join}), "
        # The tails as one array: the recursive step indexes it (joining the CTE instead
        # would rescan it at every step).
        "tails AS (SELECT array_agg(tail ORDER BY ord) AS a FROM av), "
        "chain_end AS (SELECT COALESCE((SELECT hash FROM audit ORDER BY id DESC LIMIT 1), "
        "CAST(:a_genesis AS VARCHAR)) AS h), "
        "chain(ord, prev, hash) AS (SELECT CAST(1 AS BIGINT), CAST(h AS TEXT), "
        + step.format(prev="h", tails=tails, n="1") + " FROM chain_end "
        "UNION ALL SELECT ord + 1, hash, " + step.format(prev="hash", tails=tails, n="ord + 1")
        + " FROM chain WHERE ord < (SELECT cardinality(a) FROM tails)), "
        "ai AS (INSERT INTO audit (at, actor, action, subject, detail, prev_hash, hash) "
        "SELECT CAST(:a_at AS TIMESTAMP WITH TIME ZONE), av.actor, av.action, av.subject, "
        "av.detail, chain.prev, chain.hash FROM av JOIN chain USING (ord) ORDER BY av.ord) ")


_PG_APPEND_AUDIT = Stmt("WITH RECURSIVE " + _audit_ctes(None) + "SELECT 1",
                        datetimes=("a_at",), direct=True)


def _chain(prev: str, entries: Sequence[AuditEntry]) -> list[dict[str, Any]]:
    """The rows of ``entries`` chained after the hash ``prev``."""
    at = utcnow()
    rows: list[dict[str, Any]] = []
    for actor, action, subject, detail in entries:
        detail_json = canonical_detail(detail)
        digest = chain_hash(prev, at, actor, action, subject, detail_json)
        rows.append({"at": at, "actor": actor, "action": action, "subject": subject,
                     "detail": detail_json, "prev_hash": prev, "hash": digest})
        prev = digest
    return rows


def trusted_domains(conn: Connection) -> list[str]:
    query = select(t.trusted_domain.c.name).order_by(t.trusted_domain.c.name)
    return list(conn.execute(query).scalars())


def is_trusted_domain(conn: Connection, domain: str) -> bool:
    return _TRUSTED.first(conn, {"name": domain.lower()}) is not None


def professional_by_address(conn: Connection, address: str) -> Any:
    """The directory row (id, name, state, cert_fingerprint) or None."""
    return conn.execute(
        select(t.professional.c.id, t.professional.c.name, t.professional.c.state,
               t.professional.c.cert_fingerprint)
        .where(t.professional.c.address == address)
    ).first()


def professional_facts(conn: Connection, address: str) -> ProfessionalFacts:
    state, name, trusted = _PROFESSIONAL.first(
        conn, {"address": address, "domain": address.rpartition("@")[2].lower()})
    return _professional(address, state, name, trusted)


def _professional(address: str, state: str | None, name: str | None,
                  trusted: Any) -> ProfessionalFacts:
    return ProfessionalFacts(
        address=address,
        in_directory=state is not None,
        active=state == "active",
        trusted_domain=bool(trusted),
        name=name or "" if state is not None else "",
    )


def patient_facts(conn: Connection, ins: str) -> tuple[PatientFacts, int]:
    """Facts about a recipient INS and its id (0 when unknown)."""
    row = _PATIENT.first(conn, {"ins": ins})
    return _patient(ins, row[0] if row is not None else None, row[1] if row is not None else None)


def _patient(ins: str, patient_id: int | None, state: str | None) -> tuple[PatientFacts, int]:
    if patient_id is None:
        return PatientFacts(ins=ins, exists=False), 0
    return PatientFacts(ins=ins, exists=True, state=MailboxState(state)), int(patient_id)


def sender_and_patient_facts(conn: Connection, address: str,
                             ins: str) -> tuple[ProfessionalFacts, tuple[PatientFacts, int]]:
    """``professional_facts`` and ``patient_facts`` in one statement."""
    state, name, trusted, patient_id, patient_state = _PROFESSIONAL_AND_PATIENT.first(
        conn, {"address": address, "domain": address.rpartition("@")[2].lower(), "ins": ins})
    return (_professional(address, state, name, trusted),
            _patient(ins, patient_id, patient_state))


def patient_notify_email(conn: Connection, patient_id: int) -> str:
    return str(_PATIENT_NOTIFY.first(conn, {"id": patient_id})[0])


def patient_name(conn: Connection, patient_id: int) -> str:
    return str(conn.execute(
        select(t.patient.c.name).where(t.patient.c.id == patient_id)).scalar_one())


def mailbox_id(conn: Connection, patient_id: int, name: str) -> int:
    row = _MAILBOX.first(conn, {"patient_id": patient_id, "name": name})
    if row is None:
        raise MissingMailbox(f"mailbox {name} not found")
    return int(row[0])


def blob_put(conn: Connection, data: bytes) -> int:
    digest = hashlib.sha256(data).hexdigest()
    return int(_INSERT_BLOB.first(conn, {"sha256": digest, "size": len(data),
                                       "data": data})[0])


def blob_search_put(conn: Connection, blob_id: int, values: Mapping[str, str | None]) -> None:
    """The case-folded SEARCH fields of a body (``deliver.search_values``), written at
    delivery so IMAP SEARCH FROM/TO/CC/BCC/SUBJECT runs in SQL."""
    _INSERT_BLOB_SEARCH.run(conn, {"blob_id": blob_id, **values})


def append(conn: Connection, mailbox: int, raw: bytes, fields: MessageFields, *,
           blob_id: int, flags: int = 0, keywords: str = "",
           internal_date: datetime | None = None) -> StoredMessage:
    """Store one message in a mailbox; the UID and MODSEQ are allocated atomically in the
    database (the mailbox row is locked by the UPDATE until commit; RFC 3501 §2.3.1.1)."""
    row = _ALLOCATE_UID.first(conn, {"id": mailbox})
    return _insert_message(conn, mailbox, int(row[0]) - 1, int(row[1]), raw, fields,
                           blob_id, flags, keywords, internal_date)


def append_to(conn: Connection, patient_id: int, name: str, raw: bytes,
              fields: MessageFields, *, blob_id: int, flags: int = 0, keywords: str = "",
              internal_date: datetime | None = None) -> StoredMessage:
    """``append`` to a patient's mailbox named ``name``, found by the UID allocation itself
    (one statement fewer)."""
    row = _ALLOCATE_UID_BY_NAME.first(conn, {"patient_id": patient_id, "name": name})
    if row is None:
        raise MissingMailbox(f"mailbox {name} not found")
    return _insert_message(conn, int(row[0]), int(row[1]) - 1, int(row[2]), raw, fields,
                           blob_id, flags, keywords, internal_date)


def _insert_message(conn: Connection, mailbox: int, uid: int, modseq: int, raw: bytes,
                    fields: MessageFields, blob_id: int, flags: int, keywords: str,
                    internal_date: datetime | None) -> StoredMessage:
    _INSERT_MESSAGE.run(conn, {
        "mailbox_id": mailbox, "uid": uid, "modseq": modseq, "flags": flags,
        "keywords": keywords, "internal_date": internal_date or utcnow(), "size": len(raw),
        "blob_id": blob_id, "message_id": fields.message_id,
        "in_reply_to": fields.in_reply_to, "references": fields.references,
        "subject": fields.subject, "from_addr": fields.from_addr,
        "sent_date": fields.sent_date, "thread_id": fields.thread_id,
        "has_attachments": int(fields.has_attachments), "from_name": fields.from_name,
        "meta": fields.meta,
    })
    return StoredMessage(mailbox, uid, modseq, blob_id)


# PostgreSQL: a delivery in one round trip per target mailbox instead of four (blob, SEARCH
# row, UID/MODSEQ allocation, message row), as data-modifying CTEs (issue 14: the intake's
# throughput there is the writer's round trips). SQLite has no data-modifying CTEs, and its
# statements cost microseconds on the writer's own connection: it keeps the four statements.
# Parameters selected into an INSERT carry explicit casts (PostgreSQL does not infer them from
# the target columns there). The UPDATE locks the mailbox row until commit, as ``append`` does.
_PG_MESSAGE_VALUES = (
    "CAST(:flags AS INTEGER), CAST(:keywords AS TEXT), "
    "CAST(:internal_date AS TIMESTAMP WITH TIME ZONE), CAST(:size AS BIGINT), {blob}, "
    "CAST(:message_id AS VARCHAR), CAST(:in_reply_to AS VARCHAR), "
    "CAST(:references AS TEXT), CAST(:subject AS TEXT), CAST(:from_addr AS VARCHAR), "
    "CAST(:sent_date AS TIMESTAMP WITH TIME ZONE), CAST(:thread_id AS VARCHAR), "
    "CAST(:has_attachments AS INTEGER), CAST(:from_name AS VARCHAR), CAST(:meta AS TEXT)")


def _pg_deliver_sql(with_blob: bool, by_name: bool) -> str:
    # Only constant fragments are joined (chosen by the two flags); values are parameters.
    ctes: list[str] = []
    if with_blob:
        ctes.append("b AS (INSERT INTO blob (sha256, size, data) "
                    "VALUES (:sha256, :size, :data) RETURNING id)")
        ctes.append("s AS (INSERT INTO blob_search (blob_id, from_text, to_text, cc_text, "
                    "bcc_text, subject_text) SELECT b.id, CAST(:from_text AS TEXT), "
                    "CAST(:to_text AS TEXT), CAST(:cc_text AS TEXT), CAST(:bcc_text AS TEXT), "
                    "CAST(:subject_text AS TEXT) FROM b WHERE CAST(:with_search AS BOOLEAN))")
    where = "patient_id = :patient_id AND name = :name" if by_name else "id = :mailbox_id"
    ctes.append("m AS (UPDATE mailbox SET uidnext = uidnext + 1, "  # noqa: S608
                f"highestmodseq = highestmodseq + 1 WHERE {where} "
                "RETURNING id, uidnext - 1 AS uid, highestmodseq)")
    blob = "b.id" if with_blob else "CAST(:blob_id AS INTEGER)"
    ctes.append(
        'i AS (INSERT INTO message (mailbox_id, uid, modseq, flags, keywords, internal_date, '  # noqa: S608
        'size, blob_id, message_id, in_reply_to, "references", subject, from_addr, sent_date, '
        "thread_id, has_attachments, from_name, meta) SELECT m.id, m.uid, m.highestmodseq, "
        + _PG_MESSAGE_VALUES.format(blob=blob) + (" FROM m, b)" if with_blob else " FROM m)"))
    # With the blob: one row even when the mailbox is missing (its columns then NULL).
    tail = ("SELECT b.id, m.id, m.uid, m.highestmodseq FROM b LEFT JOIN m ON TRUE"
            if with_blob else "SELECT CAST(:blob_id AS INTEGER), m.id, m.uid, m.highestmodseq "
            "FROM m")
    return "WITH " + ", ".join(ctes) + " " + tail


#: (with the blob, the mailbox by name) -> the merged statement.
_PG_DELIVER = {
    (with_blob, by_name): Stmt(_pg_deliver_sql(with_blob, by_name),
                               datetimes=("internal_date", "sent_date"),
                               binary=("data",) if with_blob else ())
    for with_blob in (True, False) for by_name in (True, False)
}
_NO_SEARCH = dict.fromkeys(("from_text", "to_text", "cc_text", "bcc_text", "subject_text"))


def merged_deliver(conn: Connection, targets: Sequence[int | tuple[int, str]], raw: bytes,
                   fields: MessageFields, *, flags: int = 0, keywords: str = "",
                   internal_date: datetime | None = None) -> list[StoredMessage]:
    """PostgreSQL: the blob, its SEARCH row and the message in every target mailbox (an id,
    or a patient's mailbox as (patient id, name)), one statement per target (the first one
    writes the blob too). Same rows as ``blob_put`` + ``blob_search_put`` + ``append``."""
    params: dict[str, Any] = {
        "flags": flags, "keywords": keywords, "internal_date": internal_date or utcnow(),
        "size": len(raw), "message_id": fields.message_id, "in_reply_to": fields.in_reply_to,
        "references": fields.references, "subject": fields.subject,
        "from_addr": fields.from_addr, "sent_date": fields.sent_date,
        "thread_id": fields.thread_id, "has_attachments": int(fields.has_attachments),
        "from_name": fields.from_name, "meta": fields.meta,
        "sha256": hashlib.sha256(raw).hexdigest(), "data": raw,
        "with_search": fields.search is not None, **(fields.search or _NO_SEARCH),
    }
    stored: list[StoredMessage] = []
    blob_id: int | None = None
    for target in targets:
        if isinstance(target, tuple):
            params["patient_id"], params["name"] = target
        else:
            params["mailbox_id"] = target
        if blob_id is not None:
            params["blob_id"] = blob_id
        row = _PG_DELIVER[blob_id is None, isinstance(target, tuple)].first(conn, params)
        if row is None or row[1] is None:
            raise MissingMailbox(f"mailbox {target[1] if isinstance(target, tuple) else target}"
                                 " not found")
        if blob_id is None:  # the blob's columns are not sent again
            blob_id = int(row[0])
            for key in ("sha256", "data", "with_search", *_NO_SEARCH):
                params.pop(key, None)
        stored.append(StoredMessage(int(row[1]), int(row[2]), int(row[3]), blob_id))
    return stored


# PostgreSQL: ``open_exchange`` (R2) for distinct (patient, professional, name) triples given
# as arrays, as data-modifying CTEs: an exchange that exists is re-opened or renamed when it
# must be, one that does not is inserted (no sequence value drawn for the others).
_PG_EXCHANGES_CTES = (
    "xs AS (SELECT * FROM unnest(CAST(:x_patient AS INTEGER[]), CAST(:x_address AS VARCHAR[]), "
    "CAST(:x_name AS VARCHAR[])) AS x(patient_id, address, name)), "
    "xu AS (UPDATE exchange SET professional_name = xs.name, state = 'open', "
    "since = CASE WHEN exchange.state <> 'open' THEN CAST(:since AS TIMESTAMP WITH TIME ZONE) "
    "ELSE exchange.since END FROM xs WHERE exchange.patient_id = xs.patient_id "
    "AND exchange.professional_address = xs.address "
    "AND (exchange.state <> 'open' OR exchange.professional_name <> xs.name)), "
    "xi AS (INSERT INTO exchange (patient_id, professional_address, professional_name, state, "
    "since) SELECT xs.patient_id, xs.address, xs.name, 'open', "
    "CAST(:since AS TIMESTAMP WITH TIME ZONE) FROM xs WHERE NOT EXISTS (SELECT 1 FROM "
    "exchange e WHERE e.patient_id = xs.patient_id AND e.professional_address = xs.address)) ")


# PostgreSQL: the deliveries of several messages (a group writer's batch of SMTP intake) in one
# round trip: every blob and its SEARCH row, the UIDs and MODSEQs of every target mailbox
# allocated by one UPDATE per mailbox row (a mailbox named n times in the batch moves by n), and
# every message row. Parameters are arrays, so the statement is prepared once whatever the
# batch's size. Blob ids are drawn from the blob sequence first, so each message row is joined
# to its own blob by position and not by the order INSERT ... RETURNING happens to give.
# Same rows as ``merged_deliver`` once per message (flags 0, no keywords).
# Only constant fragments are joined; values are parameters.
_PG_DELIVER_MANY_CTES = (
    "msg AS (SELECT * FROM unnest(CAST(:sha256 AS TEXT[]), CAST(:size AS BIGINT[]), "  # noqa: S608
    "CAST(:data AS BYTEA[]), CAST(:with_search AS BOOLEAN[]), CAST(:from_text AS TEXT[]), "
    "CAST(:to_text AS TEXT[]), CAST(:cc_text AS TEXT[]), CAST(:bcc_text AS TEXT[]), "
    "CAST(:subject_text AS TEXT[]), "
    "CAST(:internal_date AS TIMESTAMP WITH TIME ZONE[]), CAST(:message_id AS VARCHAR[]), "
    "CAST(:in_reply_to AS VARCHAR[]), CAST(:references AS TEXT[]), "
    "CAST(:subject AS TEXT[]), CAST(:from_addr AS VARCHAR[]), "
    "CAST(:sent_date AS TIMESTAMP WITH TIME ZONE[]), CAST(:thread_id AS VARCHAR[]), "
    "CAST(:has_attachments AS INTEGER[]), CAST(:from_name AS VARCHAR[]), "
    "CAST(:meta AS TEXT[])) WITH ORDINALITY AS x(sha256, size, data, with_search, from_text, "
    "to_text, cc_text, bcc_text, subject_text, internal_date, message_id, in_reply_to, refs, "
    "subject, from_addr, sent_date, thread_id, has_attachments, from_name, meta, ord)), "
    "ids AS MATERIALIZED (SELECT ord, nextval(pg_get_serial_sequence('blob', 'id')) AS blob_id "
    "FROM msg), "
    "b AS (INSERT INTO blob (id, sha256, size, data) SELECT ids.blob_id, msg.sha256, msg.size, "
    "msg.data FROM msg JOIN ids USING (ord)), "
    "s AS (INSERT INTO blob_search (blob_id, from_text, to_text, cc_text, bcc_text, "
    "subject_text) SELECT ids.blob_id, msg.from_text, msg.to_text, msg.cc_text, msg.bcc_text, "
    "msg.subject_text FROM msg JOIN ids USING (ord) WHERE msg.with_search), "
    "tg AS (SELECT * FROM unnest(CAST(:t_msg AS BIGINT[]), CAST(:t_patient AS INTEGER[]), "
    "CAST(:t_name AS VARCHAR[])) WITH ORDINALITY AS y(msg_ord, patient_id, name, tord)), "
    "per_box AS (SELECT patient_id, name, count(*) AS n FROM tg GROUP BY patient_id, name), "
    "m AS (UPDATE mailbox SET uidnext = mailbox.uidnext + per_box.n, "
    "highestmodseq = mailbox.highestmodseq + per_box.n FROM per_box "
    "WHERE mailbox.patient_id = per_box.patient_id AND mailbox.name = per_box.name "
    "RETURNING mailbox.id, mailbox.patient_id, mailbox.name, "
    "mailbox.uidnext - per_box.n AS first_uid, mailbox.highestmodseq - per_box.n AS base), "
    "r AS (SELECT tg.tord, tg.msg_ord, m.id AS mailbox_id, "
    "m.first_uid + row_number() OVER w - 1 AS uid, m.base + row_number() OVER w AS modseq "
    "FROM tg JOIN m ON m.patient_id = tg.patient_id AND m.name = tg.name "
    "WINDOW w AS (PARTITION BY m.id ORDER BY tg.tord)), "
    'i AS (INSERT INTO message (mailbox_id, uid, modseq, flags, keywords, internal_date, '
    'size, blob_id, message_id, in_reply_to, "references", subject, from_addr, sent_date, '
    "thread_id, has_attachments, from_name, meta) SELECT r.mailbox_id, r.uid, r.modseq, 0, '', "
    "msg.internal_date, msg.size, ids.blob_id, msg.message_id, msg.in_reply_to, msg.refs, "
    "msg.subject, msg.from_addr, msg.sent_date, msg.thread_id, msg.has_attachments, "
    "msg.from_name, msg.meta FROM r JOIN msg ON msg.ord = r.msg_ord "
    "JOIN ids ON ids.ord = r.msg_ord), "
    # R2 for the batch (``open_exchanges``) in the same round trip.
    + _PG_EXCHANGES_CTES)
_PG_DELIVERED = ("SELECT r.tord, r.mailbox_id, r.uid, r.modseq, ids.blob_id FROM r "
                 "JOIN ids ON ids.ord = r.msg_ord ORDER BY r.tord")
_PG_DELIVER_MANY = Stmt("WITH " + _PG_DELIVER_MANY_CTES + _PG_DELIVERED, datetimes=("since",),
                        direct=True)
# The same with the batch's audit rows chained in it too (their DeliveredUids read from ``r``):
# one round trip less while the writer holds its turn.
_PG_DELIVER_MANY_AUDITED = Stmt(
    "WITH RECURSIVE " + _PG_DELIVER_MANY_CTES + ", " + _audit_ctes("r") + _PG_DELIVERED,
    datetimes=("since", "a_at"), direct=True)


def merged_deliver_many(conn: Connection,
                        messages: Sequence[tuple[Sequence[tuple[int, str]], bytes,
                                                 MessageFields]],
                        exchanges: Sequence[tuple[int, str, str]] = (),
                        internal_date: datetime | None = None,
                        audit: Sequence[AuditEntry] = ()) -> list[list[StoredMessage]]:
    """PostgreSQL: ``merged_deliver`` of several messages, each to its patients' mailboxes
    named (patient id, name), ``open_exchanges(exchanges)`` and ``append_audit(audit)`` (the
    caller holds the chain's lock; a DeliveredUid in a detail is filled in), in one
    statement; the result in the order of ``messages`` and of each one's targets.
    MissingMailbox when a target mailbox does not exist (nothing is then written that the
    caller's rollback would not undo)."""
    now = internal_date or utcnow()
    columns: dict[str, list[Any]] = {name: [] for name in (
        "sha256", "size", "data", "with_search", *_NO_SEARCH, "internal_date", "message_id",
        "in_reply_to", "references", "subject", "from_addr", "sent_date", "thread_id",
        "has_attachments", "from_name", "meta", "t_msg", "t_patient", "t_name")}
    for ordinal, (targets, raw, fields) in enumerate(messages, start=1):
        search = fields.search or _NO_SEARCH
        for name, value in (
                ("sha256", hashlib.sha256(raw).hexdigest()), ("size", len(raw)), ("data", raw),
                ("with_search", fields.search is not None), ("internal_date", now),
                ("message_id", fields.message_id), ("in_reply_to", fields.in_reply_to),
                ("references", fields.references), ("subject", fields.subject),
                ("from_addr", fields.from_addr), ("sent_date", fields.sent_date),
                ("thread_id", fields.thread_id),
                ("has_attachments", int(fields.has_attachments)),
                ("from_name", fields.from_name), ("meta", fields.meta)):
            columns[name].append(value)
        for name in _NO_SEARCH:
            columns[name].append(search.get(name))
        for patient_id, mailbox in targets:
            columns["t_msg"].append(ordinal)
            columns["t_patient"].append(patient_id)
            columns["t_name"].append(mailbox)
    last = _distinct_exchanges(exchanges)
    params = {**columns, "x_patient": [k[0] for k in last], "x_address": [k[1] for k in last],
              "x_name": list(last.values()), "since": now}
    if audit:
        if len(audit) > SQL_CHAIN_MAX:
            raise ValueError("too many audit rows for one statement")
        rows = _PG_DELIVER_MANY_AUDITED.run(conn, {**params, **pg_audit_params(audit)}).all()
    else:
        rows = _PG_DELIVER_MANY.run(conn, params).all()
    if len(rows) != len(columns["t_msg"]):
        found = {int(row[0]) for row in rows}
        missing = next(i for i in range(1, len(columns["t_msg"]) + 1) if i not in found)
        raise MissingMailbox(f"mailbox {columns['t_name'][missing - 1]} of patient "
                             f"{columns['t_patient'][missing - 1]} not found")
    stored = iter(StoredMessage(int(r[1]), int(r[2]), int(r[3]), int(r[4])) for r in rows)
    return [[next(stored) for _target in targets] for targets, _raw, _fields in messages]


# PostgreSQL: ``open_exchange``'s read and its insert or update in one round trip (the
# exchange's id comes back whichever happened). Same rows as the statements below.
_PG_OPEN_EXCHANGE = Stmt(
    "WITH cur AS (SELECT id, state, professional_name FROM exchange "
    "WHERE patient_id = :patient_id AND professional_address = :address), "
    "ins AS (INSERT INTO exchange (patient_id, professional_address, professional_name, "
    "state, since) SELECT CAST(:patient_id AS INTEGER), CAST(:address AS VARCHAR), "
    "CAST(:name AS VARCHAR), 'open', CAST(:since AS TIMESTAMP WITH TIME ZONE) "
    "WHERE NOT EXISTS (SELECT 1 FROM cur) RETURNING id), "
    "upd AS (UPDATE exchange SET professional_name = CAST(:name AS VARCHAR), state = 'open', "
    "since = CASE WHEN cur.state <> 'open' THEN CAST(:since AS TIMESTAMP WITH TIME ZONE) "
    "ELSE exchange.since END FROM cur WHERE exchange.id = cur.id "
    "AND (cur.state <> 'open' OR cur.professional_name <> CAST(:name AS VARCHAR))) "
    "SELECT id FROM cur UNION ALL SELECT id FROM ins", datetimes=("since",))


def open_exchange(conn: Connection, patient_id: int, professional_address: str,
                  professional_name: str, reply_to: Sequence[tuple[str, str]] = ()) -> int:
    """R2: a delivered professional message opens (or re-opens) the exchange; R4: its
    Reply-To addresses become reachable within it."""
    now = utcnow()
    if conn.dialect.name == "postgresql":
        exchange_id = int(_PG_OPEN_EXCHANGE.first(conn, {
            "patient_id": patient_id, "address": professional_address,
            "name": professional_name, "since": now})[0])
        _add_aliases(conn, exchange_id, professional_address, reply_to, now)
        return exchange_id
    row = _EXCHANGE.first(conn, {"patient_id": patient_id,
                               "address": professional_address})
    if row is None:
        exchange_id = int(_INSERT_EXCHANGE.first(conn, {
            "patient_id": patient_id, "address": professional_address,
            "name": professional_name, "since": now})[0])
    else:
        exchange_id = int(row[0])
        values: dict[str, Any] = {}
        if row[2] != professional_name:
            values["professional_name"] = professional_name
        if row[1] != "open":
            values.update(state="open", since=now)
        if values:
            conn.execute(update(t.exchange).where(t.exchange.c.id == exchange_id)
                         .values(**values))
    _add_aliases(conn, exchange_id, professional_address, reply_to, now)
    return exchange_id


def _distinct_exchanges(pairs: Sequence[tuple[int, str, str]]) -> dict[tuple[int, str], str]:
    """Repeats merged, the last name winning, as running them one after the other would."""
    return {(patient_id, address): name for patient_id, address, name in pairs}


def open_exchanges(conn: Connection, pairs: Sequence[tuple[int, str, str]]) -> None:
    """``open_exchange`` (R2) for each (patient id, professional address, name), in order,
    with no Reply-To aliases (PostgreSQL does these inside ``merged_deliver_many``)."""
    for patient_id, address, name in pairs:
        open_exchange(conn, patient_id, address, name)


def _add_aliases(conn: Connection, exchange_id: int, professional_address: str,
                 reply_to: Sequence[tuple[str, str]], now: datetime) -> None:
    for address, name in reply_to:
        if address == professional_address:
            continue
        exists = conn.execute(select(t.exchange_alias.c.id).where(and_(
            t.exchange_alias.c.exchange_id == exchange_id,
            t.exchange_alias.c.address == address))).first()
        if exists is None:
            conn.execute(insert(t.exchange_alias).values(
                exchange_id=exchange_id, address=address, name=name, since=now))


def end_exchanges(conn: Connection, patient_id: int, professional_address: str) -> bool:
    """R5: end the exchange of this professional with the patient; False if none open."""
    result = conn.execute(update(t.exchange).where(and_(
        t.exchange.c.patient_id == patient_id,
        t.exchange.c.professional_address == professional_address,
        t.exchange.c.state == "open",
    )).values(state="ended", since=utcnow()))
    return bool(result.rowcount)


def contact_facts(conn: Connection, patient_id: int, address: str) -> ContactFacts:
    """R3/R4/R9 facts for a patient writing to ``address``: the most favourable of the
    direct exchange and any exchange whose Reply-To named this address."""
    candidates: list[tuple[str, str]] = []  # (exchange state, owner professional)
    direct = conn.execute(select(t.exchange.c.state, t.exchange.c.professional_address)
                          .where(and_(t.exchange.c.patient_id == patient_id,
                                      t.exchange.c.professional_address == address))).all()
    candidates.extend((r[0], r[1]) for r in direct)
    via = conn.execute(select(t.exchange.c.state, t.exchange.c.professional_address)
                       .join(t.exchange_alias, t.exchange.c.id == t.exchange_alias.c.exchange_id)
                       .where(and_(t.exchange.c.patient_id == patient_id,
                                   t.exchange_alias.c.address == address))).all()
    candidates.extend((r[0], r[1]) for r in via)
    if not candidates:
        return ContactFacts(address=address, known=False)
    states = professional_states(conn, {address, *(owner for _state, owner in candidates)})
    recipient_active = states.get(address, "active") == "active"
    best: ContactFacts | None = None
    for state, owner in candidates:
        facts = ContactFacts(
            address=address, known=True, exchange_open=state == "open",
            owner_active=states.get(owner, "active") == "active",
            recipient_active=recipient_active,
        )
        if best is None or (facts.exchange_open and facts.owner_active):
            best = facts
    assert best is not None
    return best


class ConnectionFacts:
    """The directory facts the rules read (``policy.engine.FactSource``), on one connection."""

    __slots__ = ("conn",)

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def professional(self, address: str) -> ProfessionalFacts:
        return professional_facts(self.conn, address)

    def patient(self, ins: str) -> tuple[PatientFacts, int]:
        return patient_facts(self.conn, ins)

    def contact(self, patient_id: int, address: str) -> ContactFacts:
        return contact_facts(self.conn, patient_id, address)

    def sender_and_patient(self, address: str,
                           ins: str) -> tuple[ProfessionalFacts, tuple[PatientFacts, int]]:
        return sender_and_patient_facts(self.conn, address, ins)


def with_facts(conn: Connection, judge: Callable[..., T], *args: Any) -> T:
    """Run a ``policy.engine`` judge over the facts read on ``conn``."""
    return judge(ConnectionFacts(conn), *args)


def professional_states(conn: Connection, addresses: Iterable[str]) -> dict[str, str]:
    rows = conn.execute(select(t.professional.c.address, t.professional.c.state)
                        .where(t.professional.c.address.in_(list(addresses))))
    return {r[0]: r[1] for r in rows}
