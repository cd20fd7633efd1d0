"""Health documents and the medical profile (issue 12): content sniffing with real files and
liars, names, the profile's PDF read back with pypdf, the store (same blob, quota, patient
scope, deleting a document or its message) on SQLite and PostgreSQL, and the portal over real
HTTPS (keep an attachment, upload, rename, delete, another patient's ids, CSRF, attach to a
reply and find it in the IMAP Sent copy, the admin's counts)."""

from __future__ import annotations

import asyncio
import email
import email.policy
import imaplib
import io
import json
import re
import zipfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import date, datetime
from pathlib import Path

import pytest
from fpdf import FPDF
from PIL import Image
from pypdf import PdfReader, PdfWriter
from sqlalchemy import func, select

from gateway.config import load_config
from imap_store.store import schema as t
from imap_store.store.db import migrate
from imap_store.store.directory import Store
from imap_store.store.documents import (
    FORBIDDEN_NAME_CHARS,
    MAX_DOCUMENT_BYTES,
    Documents,
    Profile,
    ProfileEntry,
    name_problem,
)
from imap_store.store.writer import GroupWriter
from tests.conftest import DUPOND, INAYA, MARTINE, PATIENT_PASSWORD
from tests.gateway_proc import Gateway, run_cli
from tests.helpers import sample, smtp, tls_context
from tests.portal_client import PortalClient
from web.profile_pdf import filename as profile_filename
from web.profile_pdf import profile_pdf
from web.sniff import check_document

PATIENT = f"{INAYA}@patient.mssante.fr"


# --- real files of each accepted type, and liars ------------------------------------------


def make_pdf(text: str = "Compte rendu", pad: int = 0) -> bytes:
    pdf = FPDF()
    pdf.add_page()
    pdf.set_font("Helvetica", size=12)
    pdf.cell(0, 10, text)
    data = bytes(pdf.output())
    if pad:  # a comment before ``startxref`` keeps the file valid (offsets unchanged)
        head, sep, tail = data.rpartition(b"startxref")
        data = head + b"%" + b"x" * pad + b"\n" + sep + tail
    return data


def make_image(fmt: str) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(out, format=fmt)
    return out.getvalue()


def encrypted_pdf() -> bytes:
    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(make_pdf())))
    writer.encrypt("secret", algorithm="RC4-128")
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def zip_file() -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        z.writestr("ordonnance.pdf", make_pdf())
    return out.getvalue()


RTF = b"{\\rtf1\\ansi\\deff0 {\\fonttbl {\\f0 Times;}} Ordonnance du 12/03/2021\\par}"


@pytest.mark.parametrize(("data", "media"), [
    (make_pdf(), "application/pdf"),
    ("Résultats : glycémie 0,95 g/l\r\n\tnormaux.\n".encode(), "text/plain"),
    ("Résultats en Windows-1252 : glycémie".encode("cp1252"), "text/plain"),
    (RTF, "application/rtf"),
    (make_image("JPEG"), "image/jpeg"),
    (make_image("TIFF"), "image/tiff"),
    (make_image("PNG"), "image/png"),
], ids=["pdf", "utf8-text", "cp1252-text", "rtf", "jpeg", "tiff", "png"])
def test_sniff_accepts_each_type_by_content(data: bytes, media: str) -> None:
    verdict = check_document(data)
    assert (verdict.media, verdict.reason) == (media, None)


def test_sniff_refuses_liars_and_oversized() -> None:
    # A ".pdf" that is a ZIP: its name says nothing, its content is refused.
    zipped = check_document(zip_file())
    assert zipped.media is None and zipped.reason and "n'est pas accepté" in zipped.reason
    # A PNG renamed ".txt" is a PNG.
    assert check_document(make_image("PNG")).media == "image/png"
    # An encrypted PDF, a PDF that does not parse.
    locked = check_document(encrypted_pdf())
    assert locked.media is None and locked.reason and "mot de passe" in locked.reason
    broken = check_document(b"%PDF-1.7\n1 0 obj << /Type /Catalog >>\ngarbage\n")
    assert broken.media is None and broken.reason and "illisible" in broken.reason
    # Binary that is no accepted type (an executable's header, NUL bytes).
    assert check_document(b"MZ\x90\x00\x03\x00\x00\x00").media is None
    assert check_document(b"").media is None
    # The size limit: 5,000,000 bytes pass, one more is refused, whatever the type.
    exact = make_pdf(pad=MAX_DOCUMENT_BYTES - len(make_pdf()) - 2)
    assert len(exact) == MAX_DOCUMENT_BYTES
    assert check_document(exact).media == "application/pdf"
    over = check_document(b"a" * (MAX_DOCUMENT_BYTES + 1))
    assert over.media is None and over.reason and "5 Mo" in over.reason
    assert check_document(b"a" * MAX_DOCUMENT_BYTES).media == "text/plain"


def test_document_names() -> None:
    assert name_problem("Compte rendu du 15 mars") is None
    assert name_problem("x" * 50) is None
    assert "50 caractères" in (name_problem("x" * 51) or "")
    problem = name_problem('ordonnance: "mars" <2021>?')
    assert problem is not None
    assert problem.endswith(': : ? " < >'), problem  # each forbidden character named, once
    for c in FORBIDDEN_NAME_CHARS:
        assert c in (name_problem(f"a{c}b") or ""), c
    assert name_problem("   ") is not None
    assert name_problem("a\x07b") is not None


def test_profile_pdf_holds_every_entry() -> None:
    sections = ["maladie", "traitement", "allergie", "vaccination", "mesure"]
    entries = [ProfileEntry(i, sections[i % 5], f"Entrée n°{i} – œdème", f"précision {i}",
                            date(2020, 1 + i % 12, 1 + i % 28) if i % 3 else None,
                            datetime(2024, 1, 1))
               for i in range(50)]
    data = profile_pdf("Inaya Michel", entries, datetime(2026, 5, 28, 14, 5))
    text = "".join(p.extract_text() for p in PdfReader(io.BytesIO(data)).pages)
    assert "Synthèse de mon profil médical" in text and "Inaya Michel" in text
    assert "Générée le 28/05/2026 à 14:05" in text
    for title in ("Maladies et sujets de santé", "Traitements", "Allergies", "Vaccinations",
                  "Mesures de santé"):
        assert title in text
    for e in entries:
        assert f"Entrée n°{e.id} - oedème" in text and f"précision {e.id}" in text
        if e.entry_date:
            assert e.entry_date.strftime("%d/%m/%Y") in text
    assert profile_filename("Inaya Michel") == "Profil_medical_InayaMichel.pdf"
    assert profile_filename("Anne-Sophie d'Arc") == "Profil_medical_Anne-SophiedArc.pdf"


def test_quota_config_key(tmp_path: Path) -> None:
    from gateway.config import ConfigError, build_config, render_default_config
    from gateway.wiring import web_settings

    path = tmp_path / "gateway.toml"
    path.write_text(render_default_config(domain="mssante.test", hostname="h"), "utf-8")
    cfg = load_config(path)
    assert cfg.documents.quota_bytes == 200_000_000
    settings = web_settings(cfg)
    assert settings is not None and settings.documents_quota == 200_000_000
    base = {"storage": {"url": "sqlite:///x.db"},
            "tls": {"cert": "a.pem", "key": "a.key", "client_ca": "ca.pem"}}
    assert build_config({**base, "documents": {"quota_bytes": 50_000_000}},
                        path).documents.quota_bytes == 50_000_000
    with pytest.raises(ConfigError, match=r"documents\.quota_bytes: must be at least"):
        build_config({**base, "documents": {"quota_bytes": 10}}, path)
    with pytest.raises(ConfigError, match=r"unknown key documents\.quota$"):
        build_config({**base, "documents": {"quota": 10}}, path)


# --- the store -----------------------------------------------------------------------------


@asynccontextmanager
async def _two_patients(db_url: str) -> AsyncIterator[tuple[Store, GroupWriter, int, int]]:
    """A migrated store, its running writer and two patients' ids."""
    await migrate(db_url)
    store = Store.from_url(db_url)
    writer = GroupWriter(store)
    writer.start()
    try:
        async with store.write() as conn:
            ids = []
            for ins in ("289057512345621", "262112A04501213"):
                result = await conn.execute(t.patient.insert().values(
                    ins=ins, name=f"P {ins}", notify_email="p@example.org",
                    created_at=datetime.now()).returning(t.patient.c.id))
                ids.append(int(result.scalar_one()))
        yield store, writer, ids[0], ids[1]
    finally:
        await writer.close()
        await store.close()


async def _blobs(store: Store) -> int:
    async with store.read() as conn:
        return int((await conn.execute(select(func.count()).select_from(t.blob))).scalar_one())


async def test_store_quota_scope_and_delete(db_url: str) -> None:
    async with _two_patients(db_url) as (store, writer, mine, theirs):
        docs = Documents(store, writer, mine, "me@patient", quota_bytes=3_000_000)
        other = Documents(store, writer, theirs, "them@patient")
        pdf = make_pdf(pad=1_400_000)
        added = await docs.add_upload(pdf, name="Ordonnance", doc_date=date(2021, 3, 12),
                                      category="ORD_SOIN", visibility="N",
                                      media="application/pdf", added_by="Moi")
        assert added.document_id is not None and added.refusal is None
        again = await docs.add_upload(pdf, name="Copie", doc_date=date(2021, 3, 12),
                                      category="ORD_SOIN", visibility="MASQUE_PS",
                                      media="application/pdf", added_by="Moi")
        assert again.document_id is not None
        blobs = await _blobs(store)
        full = await docs.add_upload(pdf, name="Trop", doc_date=date(2021, 3, 12),
                                     category="ORD_SOIN", visibility="N",
                                     media="application/pdf", added_by="Moi")
        assert full.document_id is None and full.refusal is not None
        assert "Espace de documents plein" in full.refusal and "3 Mo" in full.refusal
        assert await _blobs(store) == blobs  # nothing written for a refused document
        # Another patient's id never resolves, for any operation.
        doc_id = added.document_id
        assert await other.get(doc_id) is None and await other.data(doc_id) is None
        assert await other.many([doc_id]) == []
        assert not await other.delete(doc_id)
        assert not await other.update(doc_id, name="x", doc_date=date(2020, 1, 1),
                                      category="AUTR_DOC", visibility="N")
        assert await docs.data(doc_id) == pdf
        total, listed = await docs.page(administrative=False, category="ORD_SOIN")
        assert total == 2 and {d.name for d in listed} == {"Ordonnance", "Copie"}
        assert (await other.page(administrative=False))[0] == 0
        assert await docs.update(doc_id, name="Ordonnance mars", doc_date=date(2021, 3, 13),
                                 category="DOC_ADM", visibility="N")
        assert (await docs.page(administrative=True))[0] == 1
        assert (await docs.page(administrative=False))[0] == 1
        with pytest.raises(ValueError):
            await docs.update(doc_id, name="a/b", doc_date=date(2021, 3, 13),
                              category="DOC_ADM", visibility="N")
        # Deleting an uploaded document deletes its body (no other reference).
        assert await docs.delete(doc_id)
        assert await _blobs(store) == blobs - 1
        assert await docs.get(doc_id) is None
        # The profile, scoped the same way.
        profile = Profile(store, writer, mine, "me@patient")
        entry = await profile.add("allergie", "Pénicilline", "urticaire", date(2019, 5, 2))
        assert entry is not None
        assert await Profile(store, writer, theirs, "x").get(entry) is None
        assert not await Profile(store, writer, theirs, "x").delete(entry)
        assert [e.label for e in await profile.entries()] == ["Pénicilline"]
        async with store.read() as conn:
            actions = [r[0] for r in await conn.execute(
                select(t.audit.c.action).where(t.audit.c.actor == "me@patient")
                .order_by(t.audit.c.id))]
        assert actions == ["document.add", "document.add", "document.refused",
                           "document.rename", "document.delete", "profile.add"]


async def test_store_pages_by_date_and_category(db_url: str) -> None:
    async with _two_patients(db_url) as (store, writer, mine, _theirs):
        docs = Documents(store, writer, mine, "me@patient")
        for i in range(23):
            category = "BIOLOGIE" if i % 3 == 0 else "ORD_SOIN"
            await docs.add_upload(f"document {i}".encode(), name=f"Document {i}",
                                  doc_date=date(2020, 1 + i % 12, 1 + i),
                                  category=category, visibility="N", media="text/plain",
                                  added_by="Moi")
        total, first = await docs.page(administrative=False, limit=20)
        assert total == 23 and len(first) == 20
        dates = [d.doc_date for d in first]
        assert dates == sorted(dates, reverse=True)
        _total, rest = await docs.page(administrative=False, offset=20, limit=20)
        assert len(rest) == 3 and max(d.doc_date for d in rest) <= min(dates)
        _total, oldest = await docs.page(administrative=False, newest_first=False, limit=5)
        assert [d.doc_date for d in oldest] == sorted(d.doc_date for d in [*first, *rest])[:5]
        bio_total, bio = await docs.page(administrative=False, category="BIOLOGIE")
        assert bio_total == 8 and {d.category for d in bio} == {"BIOLOGIE"}
        assert (await docs.page(administrative=True))[0] == 0


# --- the portal over HTTPS -----------------------------------------------------------------


def deliver(gw: Gateway, raw: bytes, sender: str = DUPOND, to: str = PATIENT) -> None:
    conn = smtp(gw, sender)
    try:
        conn.sendmail(sender, [to], raw)
    finally:
        conn.quit()


def with_attachments(subject: str, files: list[tuple[str, str, bytes]]) -> bytes:
    msg = email.message.EmailMessage()
    msg["From"] = f"Docteur Dupond <{DUPOND}>"
    msg["To"] = PATIENT
    msg["Subject"] = subject
    msg["Date"] = "Mon, 15 Feb 2021 10:00:00 +0100"
    msg["Message-ID"] = email.utils.make_msgid(domain="ch-exemple.mssante.fr")
    msg.set_content("Bonjour, vos documents.")
    for name, media, data in files:
        main, _, sub = media.partition("/")
        msg.add_attachment(data, maintype=main, subtype=sub, filename=name)
    return msg.as_bytes(policy=email.policy.SMTP)


def conversation_key(client: PortalClient, subject: str) -> int:
    page = client.get("/messagerie").text
    for key in re.findall(r'href="/messagerie/conversations/(\d+)"', page):
        if subject in client.get(f"/messagerie/conversations/{key}").text:
            return int(key)
    raise AssertionError(subject)


def db(gw: Gateway, fn):  # type: ignore[no-untyped-def]
    """Run ``fn(conn)`` on the gateway's database (checks the tests make beside the HTTP)."""

    async def run():  # type: ignore[no-untyped-def]
        store = Store.from_url(load_config(gw.config).storage_url)
        try:
            async with store.read() as conn:
                return await conn.run_sync(fn)
        finally:
            await store.close()

    return asyncio.run(run())


def test_attachment_to_documents_upload_rename_delete(gateway: Gateway) -> None:
    deliver(gateway, sample("02"))  # three PDFs
    zipped = zip_file()
    deliver(gateway, with_attachments("Pièces diverses", [
        ("faux.pdf", "application/pdf", zipped), ("photo.txt", "text/plain",
                                                   make_image("PNG"))]))
    client = PortalClient(gateway)
    client.login(INAYA, PATIENT_PASSWORD)
    key = conversation_key(client, "Aucune inquiétude")
    convo = client.get(f"/messagerie/conversations/{key}")
    links = re.findall(r'href="(/messagerie/conversations/\d+/messages/\d+/pieces-jointes/'
                       r'(\d+))/documents"', convo.text)
    assert len(links) == 3 and "Ajouter à mes documents santé" in convo.text
    form = client.get(links[1][0] + "/documents")
    assert form.status == 200
    # Prefilled: the attachment's name without extension, the message's date (15 Feb 2026).
    assert 'value="Résultats_d\'analyses_MLeguellec"' in form.text
    assert 'value="2026-02-15"' in form.text
    for code in ("SYNTHESE", "ORD_SOIN", "RADIO_SC", "BIOLOGIE", "CPT_REND", "DEPISTAG",
                 "CERT_MED", "DOC_ADM", "AUTR_DOC", "QUEST_SANTE"):
        assert f'value="{code}"' in form.text
    assert 'value="N"' in form.text and 'value="MASQUE_PS"' in form.text
    # Forbidden characters: refused, each named.
    bad = client.post(links[1][0] + "/documents", {
        "csrf": form.csrf(), "nom": "Résultats: mars?", "date": "2026-02-15",
        "categorie": "BIOLOGIE", "visibilite": "N"})
    assert bad.status == 400 and "caractères suivants : : ?" in bad.text
    # CSRF missing: refused, nothing added.
    assert client.post(links[1][0] + "/documents", {
        "nom": "Résultats", "date": "2026-02-15", "categorie": "BIOLOGIE",
        "visibilite": "N"}).status == 403
    blobs_before = db(gateway, lambda c: c.execute(
        select(func.count()).select_from(t.blob)).scalar_one())
    done = client.post(links[1][0] + "/documents", {
        "csrf": form.csrf(), "nom": "Résultats d'analyses", "date": "2026-02-15",
        "categorie": "BIOLOGIE", "visibilite": "MASQUE_PS"})
    assert done.status == 200 and "Document ajouté" in done.text, done.text[:1500]
    # The same blob as the message: no second copy of the bytes.
    row = db(gateway, lambda c: c.execute(select(t.document)).one())
    message_blob = db(gateway, lambda c: c.execute(
        select(t.message.c.blob_id).where(t.message.c.id == row.source_message_id)
    ).scalar_one())
    assert row.blob_id == message_blob and row.size == 1030
    assert db(gateway, lambda c: c.execute(
        select(func.count()).select_from(t.blob)).scalar_one()) == blobs_before
    listing = client.get("/documents")
    assert "Résultats d'analyses" in listing.text and "Résultats de biologie" in listing.text
    assert "15/02/2026" in listing.text and "Docteur Dupond" in listing.text
    doc_id = int(re.search(r'href="/documents/(\d+)/modifier"', listing.text).group(1))
    attachment = client.get(links[1][0])
    assert client.get(f"/documents/{doc_id}").body == attachment.body
    preview = client.get(f"/documents/{doc_id}?apercu=1")
    assert preview.headers["content-type"] == "application/pdf"

    # Liars in a message: the ZIP named .pdf keeps only "Télécharger", with the reason.
    key2 = conversation_key(client, "Pièces diverses")
    convo2 = client.get(f"/messagerie/conversations/{key2}").text
    zip_link, png_link = re.findall(r'href="(/messagerie/conversations/\d+/messages/\d+/'
                                    r'pieces-jointes/\d+)/documents"', convo2)
    refused = client.get(zip_link + "/documents")
    assert "n'est pas accepté" in refused.text and "Télécharger" in refused.text
    assert 'name="categorie"' not in refused.text
    assert client.post(zip_link + "/documents", {
        "csrf": form.csrf(), "nom": "faux", "date": "2026-02-15", "categorie": "AUTR_DOC",
        "visibilite": "N"}).status == 200  # the refusal page again, nothing added
    png_form = client.get(png_link + "/documents")
    assert 'name="categorie"' in png_form.text  # a PNG named .txt is a PNG

    # Upload from the device, rename, delete.
    upload = client.post_multipart("/documents/ajouter", {
        "csrf": form.csrf(), "nom": "", "date": "2021-01-04", "categorie": "DOC_ADM",
        "visibilite": "N"}, [("fichier", "Carte de groupe sanguin.jpg", "image/jpeg",
                              make_image("JPEG"))])
    assert upload.status == 200 and "Document ajouté" in upload.text
    assert "Carte de groupe sanguin" in upload.text, upload.text[upload.text.find("<main"):]
    liar = client.post_multipart("/documents/ajouter", {
        "csrf": form.csrf(), "nom": "ordonnance", "date": "2021-01-04",
        "categorie": "ORD_SOIN", "visibilite": "N"}, [("fichier", "ordonnance.pdf",
                                                        "application/pdf", zipped)])
    assert liar.status == 400 and "n'est pas accepté" in liar.text
    big = client.post_multipart("/documents/ajouter", {
        "csrf": form.csrf(), "nom": "gros", "date": "2021-01-04", "categorie": "AUTR_DOC",
        "visibilite": "N"}, [("fichier", "gros.txt", "text/plain",
                              b"a" * (MAX_DOCUMENT_BYTES + 1))])
    assert big.status == 400 and "dépasse 5 Mo" in big.text
    rename = client.get(f"/documents/{doc_id}/modifier")
    renamed = client.post(f"/documents/{doc_id}/modifier", {
        "csrf": rename.csrf(), "nom": "Analyses février", "date": "2021-02-16",
        "categorie": "BIOLOGIE", "visibilite": "N"})
    assert "Document modifié" in renamed.text and "Analyses février" in renamed.text
    deleted = client.post(f"/documents/{doc_id}/supprimer", {"csrf": rename.csrf()})
    assert "Document supprimé" in deleted.text and "Analyses février" not in deleted.text
    # The message and its attachment are still there.
    assert client.get(links[1][0]).body == attachment.body

    # Martine sees none of it: Inaya's ids are 404 for her.
    martine = PortalClient(gateway)
    martine.login(MARTINE, PATIENT_PASSWORD)
    upload_id = int(re.search(r'href="/documents/(\d+)/modifier">Renommer<span class="sr"> '
                              r'Carte de groupe sanguin', upload.text).group(1))
    for path in (f"/documents/{upload_id}", f"/documents/{upload_id}/modifier",
                 f"/documents/{upload_id}/supprimer"):
        assert martine.get(path).status == 404, path
    page = martine.get("/documents")
    assert martine.post(f"/documents/{upload_id}/supprimer",
                        {"csrf": page.csrf()}).status == 404
    assert "Carte de groupe sanguin" not in page.text
    assert client.get(f"/documents/{upload_id}").status == 200

    # Every add, rename and delete is audited.
    actions = db(gateway, lambda c: [r[0] for r in c.execute(
        select(t.audit.c.action).where(t.audit.c.action.like("document.%"))
        .order_by(t.audit.c.id))])
    assert actions == ["document.add", "document.add", "document.rename", "document.delete"]
    # The admin's patient show: counts, never content.
    shown = json.loads(run_cli(gateway.config, "--json", "patient", "show", INAYA).stdout)
    assert shown["documents"] == {"health": 0, "administrative": 1,
                                  "bytes": len(make_image("JPEG"))}
    assert "groupe sanguin" not in json.dumps(shown)


def test_message_deleted_document_kept(gateway: Gateway) -> None:
    """Deleting the conversation (and purging Trash) keeps a document kept from it."""
    deliver(gateway, sample("02"))
    client = PortalClient(gateway)
    client.login(INAYA, PATIENT_PASSWORD)
    key = conversation_key(client, "Aucune inquiétude")
    convo = client.get(f"/messagerie/conversations/{key}")
    link = re.findall(r'href="(/messagerie/conversations/\d+/messages/\d+/pieces-jointes/\d+)'
                      r'/documents"', convo.text)[2]
    original = client.get(link).body
    form = client.get(link + "/documents")
    client.post(link + "/documents", {"csrf": form.csrf(), "nom": "Ordonnance",
                                      "date": "2026-02-15", "categorie": "ORD_SOIN",
                                      "visibilite": "N"})
    page = client.get(f"/messagerie/conversations/{key}/supprimer")
    client.post(f"/messagerie/conversations/{key}/supprimer", {"csrf": page.csrf()})
    # Purge Trash through IMAP: the message is gone, its body stays for the document.
    imap = imaplib.IMAP4_SSL("127.0.0.1", gateway.ports["imaps"],
                             ssl_context=tls_context(gateway))
    imap.login(PATIENT, PATIENT_PASSWORD)
    assert imap.select("Trash")[0] == "OK"
    assert imap.store("1:*", "+FLAGS", "\\Deleted")[0] == "OK"
    assert imap.expunge()[0] == "OK"
    imap.logout()
    documents = client.get("/documents").text
    doc_id = int(re.search(r'href="/documents/(\d+)/modifier"', documents).group(1))
    assert client.get(f"/documents/{doc_id}").body == original
    assert db(gateway, lambda c: c.execute(
        select(func.count()).select_from(t.message).where(
            t.message.c.subject.like("%analyses%"))).scalar_one()) == 0


def test_reply_with_documents_and_profile_in_sent(gateway: Gateway) -> None:
    deliver(gateway, sample("02"))
    client = PortalClient(gateway)
    client.login(INAYA, PATIENT_PASSWORD)
    profile = client.get("/profil-medical")
    assert profile.status == 200 and "Maladies et sujets de santé" in profile.text
    for section, label, detail, when in (
            ("maladie", "Diabète de type 2", "depuis 2015", "2015-06-01"),
            ("traitement", "Metformine", "1000 mg matin et soir", ""),
            ("allergie", "Pénicilline", "", "2019-05-02"),
            ("vaccination", "DTP", "rappel", "2022-09-10"),
            ("mesure", "Tension artérielle", "12/8", "2024-01-15")):
        added = client.post("/profil-medical", {"csrf": profile.csrf(), "rubrique": section,
                                                "intitule": label, "detail": detail,
                                                "date": when})
        assert "Information ajoutée" in added.text and label in added.text
    entry = int(re.search(r'href="/profil-medical/(\d+)/modifier"', added.text).group(1))
    edit = client.post(f"/profil-medical/{entry}/modifier", {
        "csrf": profile.csrf(), "rubrique": "maladie", "intitule": "Diabète de type 2",
        "detail": "depuis juin 2015", "date": "2015-06-01"})
    assert "Information modifiée" in edit.text and "depuis juin 2015" in edit.text
    assert client.post("/profil-medical", {"csrf": profile.csrf(), "rubrique": "autre",
                                           "intitule": "x"}).status == 400
    martine = PortalClient(gateway)
    martine.login(MARTINE, PATIENT_PASSWORD)
    assert martine.get(f"/profil-medical/{entry}/modifier").status == 404

    upload = client.post_multipart("/documents/ajouter", {
        "csrf": profile.csrf(), "nom": "Certificat sport", "date": "2021-10-19",
        "categorie": "CERT_MED", "visibilite": "N"},
        [("fichier", "certificat.pdf", "application/pdf", make_pdf("Certificat"))])
    assert "Document ajouté" in upload.text
    doc_id = int(re.search(r'href="/documents/(\d+)/modifier"', upload.text).group(1))
    key = conversation_key(client, "Aucune inquiétude")
    form = client.get(f"/messagerie/conversations/{key}/repondre")
    assert "Certificat sport" in form.text and "Place restante : 10,0 Mo sur 10 Mo" in form.text
    # "Ajouter mon profil médical" on the draft, with the document chosen.
    drafted = client.post_multipart(f"/messagerie/conversations/{key}/repondre", {
        "csrf": form.csrf(), "destinataires": DUPOND, "message": "Voici mon profil.",
        "documents": str(doc_id), "action": "profil"}, [])
    assert "Profil_medical_InayaMichel.pdf" in drafted.text
    assert re.search(rf'value="{doc_id}"[^>]*checked', drafted.text)
    resumed = client.get(f"/messagerie/conversations/{key}/repondre")  # the draft keeps both
    assert "Profil_medical_InayaMichel.pdf" in resumed.text and "Voici mon profil." in resumed.text
    assert re.search(rf'value="{doc_id}"[^>]*checked', resumed.text)
    # Martine's document id is dropped, never attached.
    other = martine.post_multipart("/documents/ajouter", {
        "csrf": martine.get("/documents").csrf(), "nom": "Secret de Martine",
        "date": "2021-10-19", "categorie": "CERT_MED", "visibilite": "N"},
        [("fichier", "m.txt", "text/plain", b"secret de Martine")])
    other_id = int(re.search(r'href="/documents/(\d+)/modifier"', other.text).group(1))
    sent = client.post_multipart(f"/messagerie/conversations/{key}/repondre", {
        "csrf": form.csrf(), "destinataires": DUPOND, "message": "Voici mon profil.",
        "documents": [str(doc_id), str(other_id)], "profil": "1"}, [])
    assert "Message envoyé" in sent.text, sent.text[:1500]
    # The Sent copy as IMAP shows it holds the document and the profile's PDF.
    imap = imaplib.IMAP4_SSL("127.0.0.1", gateway.ports["imaps"],
                             ssl_context=tls_context(gateway))
    imap.login(PATIENT, PATIENT_PASSWORD)
    assert imap.select("Sent", readonly=True)[0] == "OK"
    status, data = imap.uid("FETCH", "1:*", "(BODY.PEEK[])")
    imap.logout()
    assert status == "OK"
    raw = data[0][1]
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    parts = {p.get_filename(): p.get_payload(decode=True) for p in msg.iter_attachments()}
    assert set(parts) == {"Certificat sport.pdf", "Profil_medical_InayaMichel.pdf"}
    assert parts["Certificat sport.pdf"] == client.get(f"/documents/{doc_id}").body
    assert b"secret de Martine" not in raw
    assert "X-MSSante" not in str(msg)  # the draft's marks are not sent
    text = "".join(p.extract_text() for p in PdfReader(
        io.BytesIO(parts["Profil_medical_InayaMichel.pdf"])).pages)
    for expected in ("Synthèse de mon profil médical", "Inaya Michel", "Diabète de type 2",
                     "depuis juin 2015", "Metformine", "Pénicilline", "02/05/2019", "DTP",
                     "Tension artérielle", "12/8"):
        assert expected in text, expected
    actions = db(gateway, lambda c: [r[0] for r in c.execute(
        select(t.audit.c.action).where(t.audit.c.action.like("%.attach"))
        .order_by(t.audit.c.id))])
    assert sorted(actions) == ["document.attach", "profile.attach"]


def test_reply_documents_over_ten_megabytes_refused(gateway: Gateway) -> None:
    deliver(gateway, sample("02"))
    client = PortalClient(gateway)
    client.login(INAYA, PATIENT_PASSWORD)
    csrf = client.get("/documents").csrf()
    ids = []
    for i in range(3):
        page = client.post_multipart("/documents/ajouter", {
            "csrf": csrf, "nom": f"Scanner {i}", "date": "2021-09-13",
            "categorie": "RADIO_SC", "visibilite": "N"},
            [("fichier", f"s{i}.pdf", "application/pdf", make_pdf(pad=3_900_000 + i))])
        assert "Document ajouté" in page.text, page.text[:800]
        ids.append(re.search(rf'href="/documents/(\d+)/modifier"[^<]*<span class="sr"> '
                             rf'Scanner {i}', page.text).group(1))
    key = conversation_key(client, "Aucune inquiétude")
    form = client.get(f"/messagerie/conversations/{key}/repondre")
    chosen = client.post_multipart(f"/messagerie/conversations/{key}/repondre", {
        "csrf": csrf, "destinataires": DUPOND, "message": "trois scanners",
        "documents": ids, "action": "filtrer", "doc_categorie": "RADIO_SC"}, [])
    assert "La sélection dépasse 10 Mo" in chosen.text, re.search(r"Place restante[^<]*",
                                                                   chosen.text)
    refused = client.post_multipart(f"/messagerie/conversations/{key}/repondre", {
        "csrf": form.csrf(), "destinataires": DUPOND, "message": "trois scanners",
        "documents": ids}, [])
    assert refused.status == 400 and "dépassent 10 Mo" in refused.text
    assert db(gateway, lambda c: c.execute(select(func.count()).select_from(t.outbound)
                                           ).scalar_one()) == 0



def test_a_damaged_pdf_is_refused_without_repair() -> None:
    """fuzz/documents.py found it: pypdf's repair of a damaged file scanned it again and again
    (0.33 s of CPU for these 778 bytes, 8 s once padded to 200 KB). A damaged PDF is refused
    as unreadable, at once, whatever its size."""
    import time

    from web.sniff import check_document

    seed = Path(__file__).resolve().parent.parent / "fuzz" / "corpus" / "documents"
    damaged = (seed / "pdf-repair-storm.pdf").read_bytes()
    for data in (damaged, damaged[:-200] + b"\xff" * 200_000 + damaged[-200:]):
        start = time.process_time()
        verdict = check_document(data)
        assert verdict.media is None and "illisible" in (verdict.reason or "")
        assert time.process_time() - start < 0.2  # milliseconds now; seconds before


def test_a_pdf_that_breaks_the_parser_in_any_way_is_unreadable() -> None:
    """fuzz/documents.py: a startxref too large for a C integer made pypdf raise OverflowError,
    which the content check did not expect."""
    from web.sniff import check_document

    seed = Path(__file__).resolve().parent.parent / "fuzz" / "corpus" / "documents"
    verdict = check_document((seed / "pdf-huge-startxref.pdf").read_bytes())
    assert verdict.media is None and "illisible" in (verdict.reason or "")


def test_a_pdf_without_a_catalog_is_refused_without_searching_for_one() -> None:
    """fuzz/documents.py: with no usable /Root, pypdf searched up to 10,000 objects for a
    catalog (0.35 s of CPU for 1.4 KB, on the event loop for small uploads)."""
    import time

    from web.sniff import check_document

    seed = Path(__file__).resolve().parent.parent / "fuzz" / "corpus" / "documents"
    start = time.process_time()
    verdict = check_document((seed / "pdf-no-catalog.pdf").read_bytes())
    assert verdict.media is None and "illisible" in (verdict.reason or "")
    assert time.process_time() - start < 0.1  # about 1 ms now
