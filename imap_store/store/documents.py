"""A patient's health documents and medical profile (issue 12, the walkthroughs' "Documents"
and "Profil médical" screens).

A document is a name, a date, a category, a visibility and bytes. Bytes are never copied: a
document kept from an attachment points at the message's blob and the attachment's MIME part
(the part is decoded when the document is read); a document uploaded from the device has a
blob of its own. Deleting a document never touches the message it came from; a blob is
deleted once no message, queued mail or document references it (``mailboxes`` checks
documents too before deleting a body).

Every query is scoped by the patient, like mailboxes: another patient's document or profile
entry id selects nothing. Every add, rename, delete and attach is audited in the hash chain.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from sqlalchemy import and_, case, delete, exists, func, insert, select, update
from sqlalchemy.engine import Connection

from imap_store.mime import decode_section
from imap_store.store import ops
from imap_store.store import schema as t
from imap_store.store.directory import Store
from imap_store.store.fields import as_utc, utcnow
from imap_store.store.writer import GroupWriter

#: Document categories (code → label), in the walkthrough's order.
CATEGORIES: dict[str, str] = {
    "SYNTHESE": "Ma santé en résumé",
    "ORD_SOIN": "Ordonnances et soins",
    "RADIO_SC": "Radio, écho, scanner, IRM",
    "BIOLOGIE": "Résultats de biologie",
    "CPT_REND": "Comptes rendus",
    "DEPISTAG": "Prévention et dépistages",
    "CERT_MED": "Certificats médicaux",
    "DOC_ADM": "Pièces administratives",
    "AUTR_DOC": "Autres documents",
    "QUEST_SANTE": "Questionnaire santé",
}
#: Administrative documents (identity card, blood group card, insurance card): listed apart.
ADMIN_CATEGORY = "DOC_ADM"
#: Visibility: visible to health professionals, or hidden from them.
VISIBILITIES: dict[str, str] = {
    "N": "Visible par mes professionnels de santé",
    "MASQUE_PS": "Masqué à mes professionnels de santé",
}
#: Largest document (the issue: at most 5,000,000 bytes).
MAX_DOCUMENT_BYTES = 5_000_000
#: Longest document name (the walkthrough's counter "28/50").
MAX_NAME_CHARS = 50
#: Characters a document name may not hold (those file systems refuse in a file name).
FORBIDDEN_NAME_CHARS = '\\/:*?"<>|'
#: Default per-patient quota of documents (``[documents] quota_bytes``).
DEFAULT_QUOTA_BYTES = 200_000_000

#: A document kept from a message larger than this is decoded in a worker thread.
OFF_LOOP_BYTES = 64 * 1024

#: Medical profile sections (code → title), in the walkthrough's order.
PROFILE_SECTIONS: dict[str, str] = {
    "maladie": "Maladies et sujets de santé",
    "traitement": "Traitements",
    "allergie": "Allergies",
    "vaccination": "Vaccinations",
    "mesure": "Mesures de santé",
}
#: Longest profile entry label and detail.
MAX_ENTRY_LABEL = 200
MAX_ENTRY_DETAIL = 1000
#: Profile entries one patient may keep.
MAX_PROFILE_ENTRIES = 500


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a document (in French, for the form), or None."""
    if not name.strip():
        return "Donnez un nom au document."
    if len(name) > MAX_NAME_CHARS:
        return f"Le nom du document ne peut dépasser {MAX_NAME_CHARS} caractères."
    bad = sorted({c for c in name if c in FORBIDDEN_NAME_CHARS}, key=FORBIDDEN_NAME_CHARS.index)
    if bad:
        return ("Le nom du document ne peut contenir les caractères suivants : "
                + " ".join(bad))
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "Le nom du document ne peut contenir de caractères de contrôle."
    return None


@dataclass(frozen=True)
class Document:
    id: int
    name: str
    doc_date: date
    category: str
    visibility: str
    size: int
    media: str
    added_by: str
    added_at: datetime
    from_message: bool

    @property
    def category_label(self) -> str:
        return CATEGORIES.get(self.category, self.category)

    @property
    def filename(self) -> str:
        """The name with the extension of its content (for a download or an attachment)."""
        ext = {"application/pdf": ".pdf", "image/jpeg": ".jpg", "image/png": ".png",
               "image/tiff": ".tif", "text/plain": ".txt", "application/rtf": ".rtf"
               }.get(self.media, "")
        return self.name if not ext or self.name.lower().endswith(ext) else self.name + ext


@dataclass(frozen=True)
class DocumentCounts:
    documents: int
    administrative: int
    bytes: int


@dataclass(frozen=True)
class Added:
    """The outcome of an add: ``document_id`` is None when refused (``refusal`` says why)."""

    document_id: int | None
    refusal: str | None = None


@dataclass(frozen=True)
class ProfileEntry:
    id: int
    section: str
    label: str
    detail: str
    entry_date: date | None
    updated_at: datetime


class QuotaExceeded(Exception):
    pass


def _document(row: Any) -> Document:
    return Document(id=int(row.id), name=row.name, doc_date=row.doc_date, category=row.category,
                    visibility=row.visibility, size=int(row.size), media=row.media,
                    added_by=row.added_by, added_at=as_utc(row.added_at),
                    from_message=row.source_message_id is not None)


_d = t.document
_COLUMNS = (_d.c.id, _d.c.name, _d.c.doc_date, _d.c.category, _d.c.visibility, _d.c.size,
            _d.c.media, _d.c.added_by, _d.c.added_at, _d.c.source_message_id)


def counts(conn: Connection, patient_id: int) -> DocumentCounts:
    """How many documents a patient keeps (never their content): the admin's ``patient show``."""
    row = conn.execute(
        select(func.count(), func.coalesce(func.sum(_d.c.size), 0),
               func.coalesce(func.sum(case((_d.c.category == ADMIN_CATEGORY, 1), else_=0)), 0))
        .where(_d.c.patient_id == patient_id)).one()
    total, size, admin = int(row[0]), int(row[1]), int(row[2])
    return DocumentCounts(total - admin, admin, size)


def _used(conn: Connection, patient_id: int) -> int:
    return int(conn.execute(select(func.coalesce(func.sum(_d.c.size), 0))
                            .where(_d.c.patient_id == patient_id)).scalar_one())


def _orphan_blob_delete(conn: Connection, blob_id: int) -> None:
    """Delete a body nothing references any more (health data must not linger)."""
    conn.execute(delete(t.blob).where(
        t.blob.c.id == blob_id,
        ~exists().where(t.message.c.blob_id == t.blob.c.id),
        ~exists().where(t.outbound.c.blob_id == t.blob.c.id),
        ~exists().where(_d.c.blob_id == t.blob.c.id)))


class Documents:
    """One patient's documents."""

    def __init__(self, store: Store, writer: GroupWriter, patient_id: int, actor: str,
                 quota_bytes: int = DEFAULT_QUOTA_BYTES) -> None:
        self.store = store
        self.writer = writer
        self.patient_id = patient_id
        self.actor = actor  # who is audited (the patient's address)
        self.quota_bytes = quota_bytes

    # --- reads --------------------------------------------------------------------------

    async def page(self, *, administrative: bool, category: str | None = None,
                   newest_first: bool = True, offset: int = 0, limit: int = 50
                   ) -> tuple[int, list[Document]]:
        """``(total, documents)``: the health documents (or the administrative ones), of one
        category when given, by date."""
        where = [_d.c.patient_id == self.patient_id,
                 (_d.c.category == ADMIN_CATEGORY) if administrative
                 else (_d.c.category != ADMIN_CATEGORY)]
        if category:
            where.append(_d.c.category == category)
        order = ((_d.c.doc_date.desc(), _d.c.id.desc()) if newest_first
                 else (_d.c.doc_date, _d.c.id))
        async with self.store.read() as conn:
            total = int((await conn.execute(select(func.count()).where(*where))).scalar_one())
            rows = (await conn.execute(select(*_COLUMNS).where(*where).order_by(*order)
                                       .offset(offset).limit(limit))).all()
        return total, [_document(r) for r in rows]

    async def get(self, document_id: int) -> Document | None:
        async with self.store.read() as conn:
            row = (await conn.execute(select(*_COLUMNS).where(
                _d.c.id == document_id, _d.c.patient_id == self.patient_id))).first()
        return _document(row) if row is not None else None

    async def many(self, document_ids: Sequence[int]) -> list[Document]:
        """The patient's documents among ``document_ids`` (others' ids are dropped)."""
        if not document_ids:
            return []
        async with self.store.read() as conn:
            rows = (await conn.execute(select(*_COLUMNS).where(
                _d.c.id.in_(sorted(set(document_ids))), _d.c.patient_id == self.patient_id)
                .order_by(_d.c.id))).all()
        return [_document(r) for r in rows]

    async def data(self, document_id: int) -> bytes | None:
        """The document's bytes (an attachment's part decoded from its message's blob)."""
        async with self.store.read() as conn:
            row = (await conn.execute(
                select(_d.c.part, t.blob.c.data)
                .select_from(_d.join(t.blob, t.blob.c.id == _d.c.blob_id))
                .where(_d.c.id == document_id, _d.c.patient_id == self.patient_id))).first()
        if row is None:
            return None
        raw = bytes(row.data)
        if row.part is None:
            return raw
        part = tuple(int(n) for n in json.loads(row.part))
        if len(raw) > OFF_LOOP_BYTES:  # megabytes of base64: decoded off the event loop
            return await asyncio.to_thread(decode_section, raw, part)
        return decode_section(raw, part)

    # --- writes -------------------------------------------------------------------------

    def _insert(self, conn: Connection, *, blob_id: int, part: Sequence[int] | None,
                source_message_id: int | None, name: str, doc_date: date, category: str,
                visibility: str, size: int, media: str, added_by: str) -> Added:
        used = _used(conn, self.patient_id)
        if used + size > self.quota_bytes:
            ops.audit(conn, self.actor, "document.refused", name,
                      {"reason": "quota", "size": size, "used": used})
            return Added(None, _quota_text(self.quota_bytes, used))
        document_id = int(conn.execute(insert(_d).values(
            patient_id=self.patient_id, name=name, doc_date=doc_date, category=category,
            visibility=visibility, size=size, media=media, blob_id=blob_id,
            part=json.dumps(list(part)) if part is not None else None,
            source_message_id=source_message_id, added_by=added_by, added_at=utcnow())
            .returning(_d.c.id)).scalar_one())
        ops.audit(conn, self.actor, "document.add", f"document {document_id}",
                  {"category": category, "size": size, "visibility": visibility,
                   "source": f"message {source_message_id}" if source_message_id else "upload"})
        return Added(document_id)

    async def add_from_attachment(self, message_id: int, part: Sequence[int], *, name: str,
                                  doc_date: date, category: str, visibility: str, size: int,
                                  media: str, added_by: str) -> Added:
        """Keep an attachment of one of the patient's messages: the document points at the
        message's blob and part (the bytes are not copied)."""
        _check(name, category, visibility)
        patient_id = self.patient_id

        def job(conn: Connection) -> Added:
            row = conn.execute(
                select(t.message.c.blob_id)
                .join(t.mailbox, t.mailbox.c.id == t.message.c.mailbox_id)
                .where(t.message.c.id == message_id, t.mailbox.c.patient_id == patient_id)
            ).first()
            if row is None:
                return Added(None, "Ce message n'existe plus.")
            return self._insert(conn, blob_id=int(row.blob_id), part=part,
                                source_message_id=message_id, name=name, doc_date=doc_date,
                                category=category, visibility=visibility, size=size,
                                media=media, added_by=added_by)

        return await self.writer.submit_sync(job)

    async def add_upload(self, data: bytes, *, name: str, doc_date: date, category: str,
                         visibility: str, media: str, added_by: str) -> Added:
        """A document from the patient's device: its bytes in a blob of its own."""
        _check(name, category, visibility)

        def job(conn: Connection) -> Added:
            used = _used(conn, self.patient_id)
            if used + len(data) > self.quota_bytes:  # before writing the blob
                ops.audit(conn, self.actor, "document.refused", name,
                          {"reason": "quota", "size": len(data), "used": used})
                return Added(None, _quota_text(self.quota_bytes, used))
            blob_id = ops.blob_put(conn, data)
            return self._insert(conn, blob_id=blob_id, part=None, source_message_id=None,
                                name=name, doc_date=doc_date, category=category,
                                visibility=visibility, size=len(data), media=media,
                                added_by=added_by)

        return await self.writer.submit_sync(job, size=len(data))

    async def update(self, document_id: int, *, name: str, doc_date: date, category: str,
                     visibility: str) -> bool:
        """Rename (and re-date, re-file) a document; False when it is not the patient's."""
        _check(name, category, visibility)

        def job(conn: Connection) -> bool:
            done = conn.execute(update(_d).where(_d.c.id == document_id,
                                                 _d.c.patient_id == self.patient_id)
                                .values(name=name, doc_date=doc_date, category=category,
                                        visibility=visibility)).rowcount
            if done:
                ops.audit(conn, self.actor, "document.rename", f"document {document_id}",
                          {"category": category, "visibility": visibility})
            return bool(done)

        return await self.writer.submit_sync(job)

    async def delete(self, document_id: int) -> bool:
        """Delete a document (never the message it came from); its own blob goes with it."""

        def job(conn: Connection) -> bool:
            row = conn.execute(delete(_d).where(_d.c.id == document_id,
                                                _d.c.patient_id == self.patient_id)
                               .returning(_d.c.blob_id)).first()
            if row is None:
                return False
            _orphan_blob_delete(conn, int(row.blob_id))
            ops.audit(conn, self.actor, "document.delete", f"document {document_id}", None)
            return True

        return await self.writer.submit_sync(job)

    def audit_attached(self, documents: Sequence[Document], recipients: Sequence[str]) -> None:
        """Documents attached to a sent message (written with the next group commit)."""
        self.writer.audit_many_later([
            (self.actor, "document.attach", f"document {d.id}",
             {"to": ",".join(recipients), "size": d.size}) for d in documents])


def _quota_text(quota: int, used: int) -> str:
    return (f"Espace de documents plein : {used / 1e6:.1f} Mo utilisés sur "
            f"{quota / 1e6:.0f} Mo. Supprimez des documents pour en ajouter."
            ).replace(".", ",", 1)


def _check(name: str, category: str, visibility: str) -> None:
    problem = name_problem(name)
    if problem is not None:
        raise ValueError(problem)
    if category not in CATEGORIES or visibility not in VISIBILITIES:
        raise ValueError("category or visibility")


# --- medical profile ---------------------------------------------------------------------

_p = t.profile_entry


def _entry(row: Any) -> ProfileEntry:
    return ProfileEntry(id=int(row.id), section=row.section, label=row.label,
                        detail=row.detail, entry_date=row.entry_date,
                        updated_at=as_utc(row.updated_at))


def entry_problem(section: str, label: str, detail: str) -> str | None:
    if section not in PROFILE_SECTIONS:
        return "Choisissez une rubrique."
    if not label.strip():
        return "Donnez un intitulé."
    if len(label) > MAX_ENTRY_LABEL or len(detail) > MAX_ENTRY_DETAIL:
        return (f"L'intitulé est limité à {MAX_ENTRY_LABEL} caractères et le détail à "
                f"{MAX_ENTRY_DETAIL}.")
    return None


class Profile:
    """One patient's medical profile entries."""

    def __init__(self, store: Store, writer: GroupWriter, patient_id: int, actor: str) -> None:
        self.store = store
        self.writer = writer
        self.patient_id = patient_id
        self.actor = actor

    async def entries(self) -> list[ProfileEntry]:
        """Every entry, by section, newest date first."""
        order = list(PROFILE_SECTIONS)
        async with self.store.read() as conn:
            rows = (await conn.execute(select(_p).where(_p.c.patient_id == self.patient_id)
                                       .order_by(_p.c.id))).all()
        entries = [_entry(r) for r in rows]
        entries.sort(key=lambda e: (order.index(e.section) if e.section in order else 99,
                                    -(e.entry_date.toordinal() if e.entry_date else 0), e.id))
        return entries

    async def get(self, entry_id: int) -> ProfileEntry | None:
        async with self.store.read() as conn:
            row = (await conn.execute(select(_p).where(
                _p.c.id == entry_id, _p.c.patient_id == self.patient_id))).first()
        return _entry(row) if row is not None else None

    async def add(self, section: str, label: str, detail: str, entry_date: date | None
                  ) -> int | None:
        """The new entry's id, or None when the profile is full."""
        problem = entry_problem(section, label, detail)
        if problem is not None:
            raise ValueError(problem)

        def job(conn: Connection) -> int | None:
            n = conn.execute(select(func.count()).where(
                _p.c.patient_id == self.patient_id)).scalar_one()
            if n >= MAX_PROFILE_ENTRIES:
                return None
            now = utcnow()
            entry_id = int(conn.execute(insert(_p).values(
                patient_id=self.patient_id, section=section, label=label, detail=detail,
                entry_date=entry_date, created_at=now, updated_at=now)
                .returning(_p.c.id)).scalar_one())
            ops.audit(conn, self.actor, "profile.add", f"entry {entry_id}",
                      {"section": section})
            return entry_id

        return await self.writer.submit_sync(job)

    async def update(self, entry_id: int, section: str, label: str, detail: str,
                     entry_date: date | None) -> bool:
        problem = entry_problem(section, label, detail)
        if problem is not None:
            raise ValueError(problem)

        def job(conn: Connection) -> bool:
            done = conn.execute(update(_p).where(and_(_p.c.id == entry_id,
                                                      _p.c.patient_id == self.patient_id))
                                .values(section=section, label=label, detail=detail,
                                        entry_date=entry_date, updated_at=utcnow())).rowcount
            if done:
                ops.audit(conn, self.actor, "profile.edit", f"entry {entry_id}",
                          {"section": section})
            return bool(done)

        return await self.writer.submit_sync(job)

    async def delete(self, entry_id: int) -> bool:
        def job(conn: Connection) -> bool:
            done = conn.execute(delete(_p).where(_p.c.id == entry_id,
                                                 _p.c.patient_id == self.patient_id)).rowcount
            if done:
                ops.audit(conn, self.actor, "profile.delete", f"entry {entry_id}", None)
            return bool(done)

        return await self.writer.submit_sync(job)

    def audit_attached(self, recipients: Sequence[str], entries: int) -> None:
        self.writer.audit_later(self.actor, "profile.attach", ",".join(recipients),
                                {"entries": entries})
