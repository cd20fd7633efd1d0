"""The portal's "Documents" and "Profil médical" pages (issue 12; walkthroughs "Ajouter une pièce
jointe aux documents de Mon espace santé", "J'ajoute un document à mon message", "Ajouter mon
profil médical"): the health documents (administrative ones apart), upload, rename, delete, keep
an attachment, and the medical profile's entries. Every id is looked up within the logged-in
patient (another patient's id is a 404); every form carries the CSRF token."""

from __future__ import annotations

import asyncio
import math
import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlencode
from zoneinfo import ZoneInfo

from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from imap_store.store.documents import (
    ADMIN_CATEGORY,
    CATEGORIES,
    FORBIDDEN_NAME_CHARS,
    MAX_DOCUMENT_BYTES,
    MAX_NAME_CHARS,
    OFF_LOOP_BYTES,
    PROFILE_SECTIONS,
    VISIBILITIES,
    Document,
    Documents,
    Profile,
    ProfileEntry,
    entry_problem,
    name_problem,
)
from imap_store.store.portal import Conversations
from web import content
from web.sniff import Verdict, check_document

if TYPE_CHECKING:
    from web.app import Page, Portal

T = TypeVar("T")
PARIS = ZoneInfo("Europe/Paris")
#: Documents a page of the list shows.
DOCUMENTS_PAGE = 20
#: Date bounds a form accepts (a typo like 0202 or 20201 is refused).
_MIN_DATE = date(1900, 1, 1)
_MAX_DATE = date(2100, 12, 31)


_DATE_FORMS = re.compile(r"(?P<y>[0-9]{4})-(?P<m>[0-9]{2})-(?P<dd>[0-9]{2})"
                         r"|(?P<d>[0-9]{1,2})/(?P<m2>[0-9]{1,2})/(?P<y2>[0-9]{4})")


def parse_date(value: str) -> date | None:
    """``AAAA-MM-JJ`` (the date input) or ``JJ/MM/AAAA`` (typed by hand), within bounds."""
    value = value.strip()
    # ASCII digits only: int() would also take "1_0" and other scripts' digits (issue 16).
    match = _DATE_FORMS.fullmatch(value)
    if match is None:
        return None
    try:
        if match["d"] is not None:
            parsed = date(int(match["y2"]), int(match["m2"]), int(match["d"]))
        else:
            parsed = date(int(match["y"]), int(match["m"]), int(match["dd"]))
    except ValueError:
        return None
    return parsed if _MIN_DATE <= parsed <= _MAX_DATE else None


def default_name(filename: str) -> str:
    """An attachment's name as a document name: without extension nor forbidden characters,
    cut to 50 characters (the patient may change it)."""
    stem = filename.rsplit(".", 1)[0] if "." in filename[1:] else filename
    cleaned = "".join("_" if c in FORBIDDEN_NAME_CHARS or ord(c) < 32 or ord(c) == 127
                      else c for c in stem).strip()
    return (cleaned or "Document")[:MAX_NAME_CHARS]


def _or_404(found: T | None) -> T:
    """What the patient's own documents or profile hold under that id, else Not Found (an id
    of someone else's is not found either)."""
    if found is None:
        raise HTTPException(404)
    return found


@dataclass
class DocumentFields:
    """A document form's fields as posted (name, date as typed, category, visibility)."""

    name: str
    when: str
    category: str
    visibility: str

    @classmethod
    def of(cls, form: FormData) -> DocumentFields:
        return cls(str(form.get("nom") or "")[:200], str(form.get("date") or "")[:20],
                   str(form.get("categorie") or ""), str(form.get("visibilite") or ""))

    def values(self) -> dict[str, str]:
        """The form's values to show again."""
        return {"nom": self.name, "date": self.when, "categorie": self.category,
                "visibilite": self.visibility}

    def problem(self) -> str | None:
        """What the patient must correct, or None."""
        return (name_problem(self.name)
                or (None if parse_date(self.when) else "Indiquez la date du document (JJ/MM/AAAA).")
                or (None if self.category in CATEGORIES else "Choisissez le type de document.")
                or (None if self.visibility in VISIBILITIES else "Choisissez la confidentialité."))

    def doc_date(self) -> date:
        """The document's date, once :meth:`problem` found nothing."""
        when = parse_date(self.when)
        assert when is not None
        return when


#: Attachments already checked (verdict, size), by the SHA-256 of their message's stored bytes
#: and their index: the form's view checks, its post reuses (equal bytes, equal verdict).
_CHECKED: OrderedDict[tuple[str, int], tuple[Verdict, int]] = OrderedDict()
_CHECKED_KEPT = 4096


def _checked(digest: str, index: int) -> tuple[Verdict, int] | None:
    found = _CHECKED.get((digest, index))
    if found is not None:
        _CHECKED.move_to_end((digest, index))
    return found


def _remember(digest: str, index: int, checked: tuple[Verdict, int]) -> None:
    _CHECKED[(digest, index)] = checked
    while len(_CHECKED) > _CHECKED_KEPT:
        _CHECKED.popitem(last=False)


async def _off_loop(size: int, fn: Callable[..., T], *args: Any) -> T:
    if size > OFF_LOOP_BYTES:
        return await asyncio.to_thread(fn, *args)
    return fn(*args)


def _decode_and_check(raw: bytes, meta: dict[str, Any], index: int
                      ) -> tuple[Verdict, int] | None:
    data = content.attachment_bytes(raw, meta, index)
    if data is None:
        return None
    return check_document(data), len(data)


class DocumentPages:
    """The pages, over the portal's plumbing (session, forms, templates)."""

    def __init__(self, portal: Portal) -> None:
        self.portal = portal

    def documents(self, page: Page) -> Documents:
        p = self.portal
        return Documents(p.store, p.writer, page.identity.account_id, page.address,
                         p.settings.documents_quota)

    def profile(self, page: Page) -> Profile:
        p = self.portal
        return Profile(p.store, p.writer, page.identity.account_id, page.address)

    def _render(self, request: Request, name: str, status: int = 200, **context: Any
                ) -> Response:
        context = {"filename": "", "download": "", "reason": None, "cancel": "", **context}
        return self.portal._render(request, name, status, categories=CATEGORIES,
                                   visibilities=VISIBILITIES, max_name=MAX_NAME_CHARS,
                                   **context)

    def _document_form(self, request: Request, page: Page, mode: str, fields: DocumentFields,
                       error: str | None, back: str, title: str, **context: Any) -> Response:
        """The document form (``mode``: upload, edit, attachment, refused) showing ``fields``:
        400 with the ``error`` to correct, else 200."""
        return self._render(request, "document_form", 400 if error else 200, page=page,
                            mode=mode, values=fields.values(), error=error, back=back,
                            title=title, **context)

    async def _document(self, page: Page, request: Request) -> Document:
        return _or_404(await self.documents(page).get(int(request.path_params["doc"])))

    # --- the list -------------------------------------------------------------------------

    async def list(self, request: Request) -> Response:
        page = await self.portal._page(request)
        q = request.query_params
        category = q.get("categorie") or ""
        if category not in CATEGORIES or category == ADMIN_CATEGORY:
            category = ""
        newest = q.get("tri") != "anciens"
        try:
            number = max(1, int(q.get("page", "1")))
        except ValueError:
            number = 1
        docs = self.documents(page)
        total, items = await docs.page(administrative=False, category=category or None,
                                       newest_first=newest,
                                       offset=(number - 1) * DOCUMENTS_PAGE, limit=DOCUMENTS_PAGE)
        pages = max(1, math.ceil(total / DOCUMENTS_PAGE))
        if number > pages:
            number = pages
            total, items = await docs.page(administrative=False, category=category or None,
                                           newest_first=newest,
                                           offset=(number - 1) * DOCUMENTS_PAGE,
                                           limit=DOCUMENTS_PAGE)
        admin_total, admin = await docs.page(administrative=True, newest_first=newest,
                                             limit=200)
        first = (number - 1) * DOCUMENTS_PAGE + 1 if items else 0

        def link(n: int) -> str:
            return "/documents?" + urlencode({k: v for k, v in (
                ("categorie", category), ("tri", "" if newest else "anciens"),
                ("page", str(n))) if v})

        return self._render(request, "documents", page=page, items=items, total=total,
                            first=first, last=first + len(items) - 1 if items else 0,
                            number=number, pages=pages, prev=link(number - 1),
                            next=link(number + 1), category=category, newest=newest,
                            admin=admin, admin_total=admin_total,
                            health_categories={k: v for k, v in CATEGORIES.items()
                                               if k != ADMIN_CATEGORY},
                            notice={"ajoute": "Document ajouté", "modifie": "Document modifié",
                                    "supprime": "Document supprimé"}.get(q.get("fait", "")))

    # --- upload, rename, delete, download ---------------------------------------------------

    async def upload(self, request: Request) -> Response:
        page = await self.portal._page(request)
        fields = DocumentFields("", date.today().isoformat(), "", "N")
        error = None
        if request.method == "POST":
            form = await self.portal._form(request, page.session.csrf, files=True)
            fields = DocumentFields.of(form)
            upload = form.get("fichier")
            data = b""
            if isinstance(upload, UploadFile) and upload.filename:
                data = await upload.read(MAX_DOCUMENT_BYTES + 1)
                if not fields.name.strip():
                    fields.name = default_name(upload.filename)
            error = fields.problem() if data else "Choisissez un fichier sur votre appareil."
            if error is None:
                verdict = await _off_loop(len(data), check_document, data)
                if verdict.media is None:
                    error = verdict.reason
                else:
                    added = await self.documents(page).add_upload(
                        data, name=fields.name, doc_date=fields.doc_date(),
                        category=fields.category, visibility=fields.visibility,
                        media=verdict.media, added_by=page.name)
                    if added.document_id is not None:
                        return RedirectResponse("/documents?fait=ajoute", 303)
                    error = added.refusal
        return self._document_form(request, page, "upload", fields, error, "/documents",
                                   "Ajouter un document")

    async def edit(self, request: Request) -> Response:
        page = await self.portal._page(request)
        document = await self._document(page, request)
        fields = DocumentFields(document.name, document.doc_date.isoformat(), document.category,
                                document.visibility)
        error = None
        if request.method == "POST":
            fields = DocumentFields.of(await self.portal._form(request, page.session.csrf))
            error = fields.problem()
            if error is None:
                if not await self.documents(page).update(
                        document.id, name=fields.name, doc_date=fields.doc_date(),
                        category=fields.category, visibility=fields.visibility):
                    raise HTTPException(404)
                return RedirectResponse("/documents?fait=modifie", 303)
        return self._document_form(request, page, "edit", fields, error, "/documents",
                                   "Modifier le document")

    async def delete(self, request: Request) -> Response:
        page = await self.portal._page(request)
        document = await self._document(page, request)
        if request.method == "POST":
            await self.portal._form(request, page.session.csrf)
            if not await self.documents(page).delete(document.id):
                raise HTTPException(404)
            return RedirectResponse("/documents?fait=supprime", 303)
        return self._render(request, "document_delete", page=page, document=document)

    async def download(self, request: Request) -> Response:
        page = await self.portal._page(request)
        document = await self._document(page, request)
        data = await self.documents(page).data(document.id)
        if data is None:
            raise HTTPException(404)
        media = content.sniff(data)
        return content.file_response(data, document.filename, media,
                                     request.query_params.get("apercu") == "1")

    # --- an attachment kept as a document -----------------------------------------------------

    async def from_attachment(self, request: Request) -> Response:
        """"Ajouter à mes documents santé": the form prefilled with the attachment's name and
        the message's date; refused (only "Télécharger" stays) when its content is not one of
        the accepted types or is too large."""
        page = await self.portal._page(request)
        key, mid = int(request.path_params["key"]), int(request.path_params["mid"])
        index = int(request.path_params["index"])
        messages = await self.portal._conversation(page, key)
        message = next((m for m in messages if m.id == mid), None)
        views = content.attachments(message.meta) if message is not None else []
        if message is None or not 0 <= index < len(views):
            raise HTTPException(404)
        checked = _checked(message.digest, index)
        if checked is None:  # the form's first view: decode and check the attachment once
            raw = await Conversations(self.portal.store, page.identity.account_id).body(mid)
            # Decoding and pypdf take tens of milliseconds for megabytes: off the event loop.
            found = await _off_loop(len(raw or b""), _decode_and_check, raw or b"",
                                    message.meta, index)
            if found is None:
                raise HTTPException(404)
            checked = found
            _remember(message.digest, index, checked)
        verdict, size = checked
        download = f"/messagerie/conversations/{key}/messages/{mid}/pieces-jointes/{index}"
        back = f"/messagerie/conversations/{key}"
        fields = DocumentFields(default_name(views[index].filename),
                                message.date.astimezone(PARIS).date().isoformat(), "", "N")
        if verdict.media is None:
            return self._document_form(request, page, "refused", fields, None, back,
                                       "Ajouter à mes documents santé", reason=verdict.reason,
                                       download=download, filename=views[index].filename)
        error = None
        if request.method == "POST":
            fields = DocumentFields.of(await self.portal._form(request, page.session.csrf))
            error = fields.problem()
            if error is None:
                part = message.meta["attachment_parts"][index]
                added = await self.documents(page).add_from_attachment(
                    mid, [int(n) for n in part], name=fields.name, doc_date=fields.doc_date(),
                    category=fields.category, visibility=fields.visibility, size=size,
                    media=verdict.media, added_by=message.from_name or message.from_addr
                    or page.name)
                if added.document_id is not None:
                    return RedirectResponse(f"{back}?document=1", 303)
                error = added.refusal
        return self._document_form(request, page, "attachment", fields, error, back,
                                   "Ajouter à mes documents santé",
                                   filename=views[index].filename, download=download)

    # --- the medical profile ------------------------------------------------------------------

    async def profile_page(self, request: Request) -> Response:
        page = await self.portal._page(request)
        profile = self.profile(page)
        error = None
        values = {"rubrique": request.query_params.get("rubrique", ""), "intitule": "",
                  "detail": "", "date": ""}
        if request.method == "POST":
            form = await self.portal._form(request, page.session.csrf)
            values, when, error = self._entry_fields(form)
            if error is None:
                entry_id = await profile.add(values["rubrique"], values["intitule"],
                                             values["detail"], when)
                if entry_id is None:
                    error = "Votre profil médical est complet : supprimez des informations."
                else:
                    return RedirectResponse("/profil-medical?fait=ajoute", 303)
        entries = await profile.entries()
        sections = [(code, title, [e for e in entries if e.section == code])
                    for code, title in PROFILE_SECTIONS.items()]
        notice = {"ajoute": "Information ajoutée", "modifie": "Information modifiée",
                  "supprime": "Information supprimée"}.get(request.query_params.get("fait", ""))
        return self._render(request, "profile", 400 if error else 200, page=page,
                            sections=sections, values=values, error=error, notice=notice,
                            profile_sections=PROFILE_SECTIONS)

    @staticmethod
    def _entry_fields(form: FormData) -> tuple[dict[str, str], date | None, str | None]:
        values = {"rubrique": str(form.get("rubrique") or ""),
                  "intitule": str(form.get("intitule") or "")[:400].strip(),
                  "detail": str(form.get("detail") or "")[:2000].strip(),
                  "date": str(form.get("date") or "")[:20]}
        when = parse_date(values["date"]) if values["date"].strip() else None
        error = entry_problem(values["rubrique"], values["intitule"], values["detail"])
        if error is None and values["date"].strip() and when is None:
            error = "Indiquez une date valide (JJ/MM/AAAA)."
        return values, when, error

    async def _entry(self, page: Page, request: Request) -> ProfileEntry:
        return _or_404(await self.profile(page).get(int(request.path_params["entry"])))

    async def profile_edit(self, request: Request) -> Response:
        page = await self.portal._page(request)
        entry = await self._entry(page, request)
        values = {"rubrique": entry.section, "intitule": entry.label, "detail": entry.detail,
                  "date": entry.entry_date.isoformat() if entry.entry_date else ""}
        error = None
        if request.method == "POST":
            form = await self.portal._form(request, page.session.csrf)
            values, when, error = self._entry_fields(form)
            if error is None:
                if not await self.profile(page).update(entry.id, values["rubrique"],
                                                       values["intitule"], values["detail"],
                                                       when):
                    raise HTTPException(404)
                return RedirectResponse("/profil-medical?fait=modifie", 303)
        return self._render(request, "profile_entry", 400 if error else 200, page=page,
                            entry=entry, values=values, error=error,
                            profile_sections=PROFILE_SECTIONS)

    async def profile_delete(self, request: Request) -> Response:
        page = await self.portal._page(request)
        entry = await self._entry(page, request)
        await self.portal._form(request, page.session.csrf)
        if not await self.profile(page).delete(entry.id):
            raise HTTPException(404)
        return RedirectResponse("/profil-medical?fait=supprime", 303)
