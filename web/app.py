"""The portal's pages (SPEC §11, the walkthroughs of the patient's messaging space).

Login as in the walkthrough: identifier (INS or address) + password, then where the one-time
code goes (e-mail or SMS), then the 6-digit code. Then the messaging page (the conversations,
50 a page), a conversation (messages, attachments, replies limited to what R3/R4 allow, the
R5 banner), replies through the same submission path as SMTP, deleting a conversation, and the
patient's access history. Every form carries a CSRF token; every object id is looked up within
the logged-in patient (another patient's id is a 404).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.parser import BytesHeaderParser
from email.utils import format_datetime, formataddr, make_msgid
from pathlib import Path
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

import aiosmtplib
from sqlalchemy import desc, func, select
from starlette.applications import Starlette
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from imap_store.mime import parse_message_async
from imap_store.store import ops
from imap_store.store import schema as t
from imap_store.store.directory import Store
from imap_store.store.documents import ADMIN_CATEGORY, CATEGORIES, OFF_LOOP_BYTES
from imap_store.store.fields import utcnow
from imap_store.store.mailboxes import SqlMailStores
from imap_store.store.portal import (
    DRAFTS,
    Conversations,
    MessageSummary,
    Sessions,
    WebSession,
)
from imap_store.store.submission import submit
from imap_store.store.writer import GroupWriter
from policy.addresses import patient_address
from policy.authn import Authenticator
from policy.rules import MAX_PATIENT_ATTACHMENTS, Identity, Role
from templates import Templates
from web import content
from web.codes import CodeMailer, mask_email, mask_phone, new_code, send_sms, sms_available
from web.documents_pages import DocumentPages
from web.profile_pdf import filename as profile_filename
from web.profile_pdf import profile_pdf
from web.settings import WebSettings

log = logging.getLogger(__name__)
T = TypeVar("T")

COOKIE = "mss_session"
PRE_COOKIE = "mss_pre"  # double-submit CSRF token of the login form (before any session)
PAGE_SIZE = 50
#: One-time codes one login (password step) may ask for.
MAX_CODES = 3
#: One-time codes one patient may be sent in an hour, whatever the number of logins.
MAX_CODES_PER_HOUR = 10
#: Largest request body (a reply with its attachments): R6's 10 MB plus MIME overhead.
MAX_BODY = 15 * 1024 * 1024
PARIS = ZoneInfo("Europe/Paris")
STATIC_DIR = Path(__file__).resolve().parent / "static"
#: Draft headers keeping the documents chosen in the reply form and whether the medical
#: profile's summary is attached (the files themselves are added when the reply is sent).
DRAFT_DOCUMENTS = "X-MSSante-Documents"
DRAFT_PROFILE = "X-MSSante-Profil-Medical"
#: Documents the reply form offers (health and administrative ones, each).
REPLY_DOCUMENTS = 200

CSP = ("default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self'; "
       "frame-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"strict-transport-security", b"max-age=31536000; includeSubDomains"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cache-control", b"no-store"),
    (b"cross-origin-opener-policy", b"same-origin"),
]


class SecurityHeaders:
    """Every response gets the security headers (a response may set its own CSP: an
    attachment preview is framed by the conversation page)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length", b"0") or b"0"
        if not length.isdigit() or len(length) > 12 or int(length) > MAX_BODY:
            await HTMLResponse("Requête trop volumineuse", 413,
                               headers=dict((k.decode(), v.decode()) for k, v in SECURITY_HEADERS)
                               )(scope, receive, send)
            return
        received = 0

        async def counted_receive() -> Message:
            """The body as it arrives, chunked or not, refused past MAX_BODY (413)."""
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > MAX_BODY:
                    raise HTTPException(413)
            return message

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {k.lower() for k, _ in headers}
                headers.extend(h for h in SECURITY_HEADERS if h[0] not in present)
                message["headers"] = headers
            await send(message)

        await self.app(scope, counted_receive, send_with_headers)


class LoginRequired(Exception):
    """No logged-in session: the patient is sent to the login page."""


@dataclass
class Page:
    """What every logged-in page knows."""

    session: WebSession
    identity: Identity
    name: str
    address: str


def _date(value: datetime, with_time: bool = False) -> str:
    local = value.astimezone(PARIS)
    months = ("janv.", "févr.", "mars", "avr.", "mai", "juin", "juil.", "août", "sept.",
              "oct.", "nov.", "déc.")
    text = f"{local.day} {months[local.month - 1]} {local.year}"
    return f"{text} à {local:%H:%M}" if with_time else text


def _uids_by_mailbox(messages: list[MessageSummary]) -> dict[int, list[int]]:
    """``{mailbox id: sorted UIDs}`` of ``messages`` (flag changes and moves go by mailbox)."""
    out: dict[int, list[int]] = {}
    for m in messages:
        out.setdefault(m.mailbox_id, []).append(m.uid)
    return {mailbox_id: sorted(uids) for mailbox_id, uids in out.items()}


def _one_line(text: str) -> str:
    """A header value without control characters (decoded names and subjects may hold CR/LF)."""
    return "".join(" " if ord(c) < 32 or ord(c) == 127 else c for c in text).strip()


def _ids(values: Any) -> list[int]:
    """Document ids from a form or a draft header (anything else is dropped)."""
    out = []
    for v in values:
        v = v.strip() if isinstance(v, str) else ""
        if v.isascii() and v.isdigit() and len(v) < 10:
            out.append(int(v))
    return list(dict.fromkeys(out))[:REPLY_DOCUMENTS]


async def _now(fn: Callable[..., T], *args: Any) -> T:
    return fn(*args)


def _room(n: int) -> str:
    """Room left (or the excess when negative) in megabytes, rounded down: never more room
    than there is."""
    if n < 0:
        return _size(-n)
    return f"{math.floor(n / 100_000) / 10:.1f} Mo".replace(".", ",")


def _size(n: int) -> str:
    if n >= 1_000_000:
        return f"{n / 1_000_000:.1f} Mo".replace(".", ",")
    return f"{max(1, math.ceil(n / 1000))} Ko"


class Portal:
    def __init__(self, settings: WebSettings, store: Store, writer: GroupWriter,
                 authenticator: Authenticator, mailer: CodeMailer | None,
                 templates: Templates) -> None:
        self.settings = settings
        self.store = store
        self.writer = writer
        self.authenticator = authenticator
        self.mailer = mailer
        self.templates = templates
        self.sessions = Sessions(store, settings.session_idle)
        self.mail = SqlMailStores(store, writer.submit, writer.submit_sync)
        self.docs = DocumentPages(self)
        env = templates.env
        env.filters.setdefault("date_fr", _date)
        env.filters.setdefault("size_fr", _size)

    # --- plumbing ---------------------------------------------------------------------------

    def app(self) -> Starlette:
        routes = [
            Route("/", self.home),
            Route("/connexion", self.login, methods=["GET", "POST"]),
            Route("/connexion/code", self.code_choice, methods=["GET", "POST"]),
            Route("/connexion/code/saisie", self.code_entry, methods=["GET", "POST"]),
            Route("/deconnexion", self.logout, methods=["POST"]),
            Route("/messagerie", self.conversations),
            Route("/messagerie/fin-des-echanges", self.end_explained),
            Route("/messagerie/conversations/{key:int}", self.conversation),
            Route("/messagerie/conversations/{key:int}/repondre", self.reply,
                  methods=["GET", "POST"]),
            Route("/messagerie/conversations/{key:int}/supprimer", self.delete,
                  methods=["GET", "POST"]),
            Route("/messagerie/conversations/{key:int}/messages/{mid:int}/"
                  "pieces-jointes/{index:int}", self.attachment),
            Route("/messagerie/conversations/{key:int}/messages/{mid:int}/"
                  "pieces-jointes/{index:int}/documents", self.docs.from_attachment,
                  methods=["GET", "POST"]),
            Route("/documents", self.docs.list),
            Route("/documents/ajouter", self.docs.upload, methods=["GET", "POST"]),
            Route("/documents/{doc:int}", self.docs.download),
            Route("/documents/{doc:int}/modifier", self.docs.edit, methods=["GET", "POST"]),
            Route("/documents/{doc:int}/supprimer", self.docs.delete, methods=["GET", "POST"]),
            Route("/profil-medical", self.docs.profile_page, methods=["GET", "POST"]),
            Route("/profil-medical/{entry:int}/modifier", self.docs.profile_edit,
                  methods=["GET", "POST"]),
            Route("/profil-medical/{entry:int}/supprimer", self.docs.profile_delete,
                  methods=["POST"]),
            Route("/historique", self.history),
            Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
        ]
        return Starlette(routes=routes, middleware=[Middleware(SecurityHeaders)],
                         exception_handlers={HTTPException: self._http_error,
                                             LoginRequired: self._login_required,
                                             Exception: self._server_error})

    def _render(self, request: Request, name: str, status: int = 200,
                **context: Any) -> HTMLResponse:
        html = self.templates.render(f"web/{name}.html.j2", service_name=
                                     self.settings.service_name, path=request.url.path,
                                     **context)
        return HTMLResponse(html, status)

    async def _http_error(self, request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        titles = {404: "Page introuvable", 403: "Action refusée", 405: "Action refusée",
                  413: "Envoi trop volumineux"}
        return self._render(request, "error", status, title=titles.get(status, "Erreur"),
                            page=None)

    async def _login_required(self, request: Request, exc: Exception) -> Response:
        return self._to_login()

    async def _server_error(self, request: Request, exc: Exception) -> Response:
        log.error("portal error on %s: %s", request.url.path, exc.__class__.__name__,
                  exc_info=exc)
        response = self._render(request, "error", 500, title="Le service est indisponible",
                                page=None)
        # This handler runs outside SecurityHeaders (Starlette's outermost middleware).
        for name, value in SECURITY_HEADERS:
            response.headers[name.decode()] = value.decode()
        return response

    @staticmethod
    def _ip(request: Request) -> str:
        return request.client.host if request.client else "?"

    def _set_cookie(self, response: Response, name: str, value: str) -> None:
        response.set_cookie(name, value, httponly=True, secure=True, samesite="strict",
                            path="/")

    async def _session(self, request: Request, *stages: str) -> WebSession | None:
        """The cookie's live session when it is at one of ``stages`` (default: logged in)."""
        session = await self.sessions.find(request.cookies.get(COOKIE))
        if session is None or session.stage not in (stages or ("ok",)):
            return None
        return session

    async def _page(self, request: Request) -> Page:
        """The logged-in patient's page context; LoginRequired without a live session."""
        session = await self._session(request)
        if session is None or session.patient_state != "open":
            raise LoginRequired
        address = patient_address(session.ins, self.settings.patient_domain)
        return Page(session, Identity(Role.PATIENT, address=address,
                                      account_id=session.patient_id, name=session.name),
                    session.name, address)

    @staticmethod
    async def _form(request: Request, session_csrf: str | None, *,
                    files: bool = False) -> FormData:
        """The posted form, refused (403) without the right CSRF token. Only the reply form
        takes files (and its 10 MB of R6); the others take a few short fields."""
        if files:
            form = await request.form(max_files=20, max_fields=50, max_part_size=1024 * 1024)
        else:
            form = await request.form(max_files=0, max_fields=20, max_part_size=8192)
        sent = form.get("csrf")
        expected = session_csrf if session_csrf is not None else request.cookies.get(PRE_COOKIE)
        if not isinstance(sent, str) or not expected or not hmac.compare_digest(
                sent.encode(), expected.encode()):
            raise HTTPException(403)
        return form

    def _to_login(self) -> Response:
        return RedirectResponse("/connexion", 303)

    def _audit(self, actor: str, action: str, subject: str, detail: dict[str, object]) -> None:
        self.writer.audit_later(actor, action, subject, detail)

    async def _audit_now(self, actor: str, action: str, subject: str,
                         detail: dict[str, object]) -> None:
        """An audit row committed before the response (what a limit counts)."""
        await self.writer.submit_sync(lambda conn: ops.audit(conn, actor, action, subject,
                                                              detail))

    async def _codes_last_hour(self, session: WebSession) -> int:
        """Codes sent to the session's patient in the last hour (the session carries the INS:
        no second patient read)."""
        address = patient_address(session.ins, self.settings.patient_domain)
        async with self.store.read() as conn:
            return int((await conn.execute(
                select(func.count()).select_from(t.audit)
                .where(t.audit.c.actor == address,
                       t.audit.c.action == "login.code.sent",
                       t.audit.c.at > utcnow() - timedelta(hours=1)))).scalar_one())

    # --- login ------------------------------------------------------------------------------

    async def home(self, request: Request) -> Response:
        session = await self._session(request)
        return RedirectResponse("/messagerie" if session else "/connexion", 303)

    async def login(self, request: Request) -> Response:
        error = None
        identifier = ""
        if request.method == "POST":
            form = await self._form(request, None)
            identifier = str(form.get("identifiant") or "").strip()[:254]
            password = str(form.get("mot_de_passe") or "")[:1024]
            result = await self.authenticator.login(identifier, password, self._ip(request),
                                                    "web", patients_only=True)
            if result.identity is not None:
                token, _session = await self.sessions.open(result.identity.account_id,
                                                           self._ip(request))
                redirect = RedirectResponse("/connexion/code", 303)
                self._set_cookie(redirect, COOKIE, token)
                redirect.delete_cookie(PRE_COOKIE, path="/")
                return redirect
            error = ("Trop de tentatives : réessayez dans quelques minutes."
                     if result.throttled else "Identifiant ou mot de passe incorrect.")
        pre = secrets.token_urlsafe(24)
        response = self._render(request, "login", 401 if error else 200, page=None, csrf=pre,
                                error=error, identifier=identifier)
        self._set_cookie(response, PRE_COOKIE, pre)
        return response

    async def _patient_contact(self, patient_id: int) -> tuple[str, str, str | None]:
        async with self.store.read() as conn:
            row = (await conn.execute(select(t.patient.c.name, t.patient.c.notify_email,
                                             t.patient.c.phone)
                                      .where(t.patient.c.id == patient_id))).one()
        return row.name, row.notify_email, row.phone

    async def code_choice(self, request: Request) -> Response:
        session = await self._session(request, "password", "code")
        if session is None:
            return self._to_login()
        name, email, phone = await self._patient_contact(session.patient_id)
        channels = []
        if self.mailer is not None and self.mailer.available:
            channels.append(("email", f"Par courriel ({mask_email(email)})"))
        if phone and sms_available(self.settings):
            channels.append(("sms", f"Par SMS ({mask_phone(phone)})"))
        error = None
        if request.method == "POST":
            form = await self._form(request, session.csrf)
            channel = form.get("canal")
            if channel not in {c for c, _ in channels}:
                error = "Choisissez où recevoir votre code."
            elif (await self._codes_last_hour(session) >= MAX_CODES_PER_HOUR
                  or not await self.sessions.reserve_code(session, MAX_CODES)):
                error = ("Trop de codes demandés : reconnectez-vous plus tard avec votre "
                         "identifiant et votre mot de passe.")
            else:
                code = new_code()
                try:
                    if channel == "email":
                        assert self.mailer is not None
                        await self.mailer.send_code(email, name, code)
                    else:
                        assert phone is not None
                        await send_sms(self.settings, phone,
                                       f"{self.settings.service_name} : votre code de "
                                       f"connexion est {code}. Il est valable 10 minutes.")
                except (OSError, aiosmtplib.SMTPException) as exc:
                    log.warning("one-time code not sent (%s): %s", channel,
                                exc.__class__.__name__)
                    error = ("Le code n'a pas pu être envoyé. Réessayez ou choisissez un "
                             "autre moyen.")
                else:
                    await self.sessions.code_sent(session, code, str(channel),
                                                  self.settings.code_ttl)
                    await self._audit_now(patient_address(session.ins,
                                                          self.settings.patient_domain),
                                          "login.code.sent", "web",
                                          {"ip": self._ip(request), "channel": str(channel)})
                    return RedirectResponse("/connexion/code/saisie", 303)
        return self._render(request, "code_choice", 400 if error else 200, page=None,
                            csrf=session.csrf, channels=channels, error=error)

    async def code_entry(self, request: Request) -> Response:
        session = await self._session(request, "code")
        if session is None:
            return self._to_login()
        error = None
        if request.method == "POST":
            form = await self._form(request, session.csrf)
            code = str(form.get("code") or "")
            if not (len(code.strip()) == 6 and code.strip().isascii()
                    and code.strip().isdigit()):
                code = "not-a-code"  # still counts as a try
            outcome, token = await self.sessions.check_code(session, code,
                                                            self.settings.code_tries)
            address = patient_address(session.ins, self.settings.patient_domain)
            if outcome == "ok" and token is not None:
                self._audit(address, "login.code", "web", {"ip": self._ip(request),
                                                           "channel": session.code_channel})
                redirect = RedirectResponse("/messagerie", 303)
                self._set_cookie(redirect, COOKIE, token)  # a new token once logged in
                return redirect
            self._audit(address, "login.code.failed", "web",
                        {"ip": self._ip(request), "reason": outcome})
            error = {"wrong": "Code incorrect.",
                     "expired": "Ce code a expiré : demandez-en un nouveau.",
                     "exhausted": "Trop d'essais : demandez un nouveau code."}[outcome]
        return self._render(request, "code_entry", 400 if error else 200, page=None,
                            csrf=session.csrf, channel=session.code_channel, error=error)

    async def logout(self, request: Request) -> Response:
        token = request.cookies.get(COOKIE)
        session = await self.sessions.find(token)
        if session is not None and token:
            await self._form(request, session.csrf)
            await self.sessions.close(token)
        response = self._to_login()
        response.delete_cookie(COOKIE, path="/")
        return response

    # --- messaging ----------------------------------------------------------------------------

    async def conversations(self, request: Request) -> Response:
        page = await self._page(request)
        try:
            number = max(1, int(request.query_params.get("page", "1")))
        except ValueError:
            number = 1
        convo = Conversations(self.store, page.identity.account_id)
        total, items = await convo.page((number - 1) * PAGE_SIZE, PAGE_SIZE)
        pages = max(1, math.ceil(total / PAGE_SIZE))
        if number > pages:  # past the end: the last page
            number = pages
            total, items = await convo.page((number - 1) * PAGE_SIZE, PAGE_SIZE)
        first = (number - 1) * PAGE_SIZE + 1 if items else 0
        return self._render(request, "conversations", page=page, items=items, total=total,
                            number=number, pages=pages, first=first,
                            last=first + len(items) - 1 if items else 0)

    async def _conversation(self, page: Page, key: int) -> list[MessageSummary]:
        messages = await Conversations(self.store, page.identity.account_id).messages(key)
        if not messages:
            raise HTTPException(404)
        return messages

    async def _correspondents(self, page: Page, messages: list[MessageSummary]
                              ) -> tuple[list[tuple[str, str]], list[tuple[str, str]], list[str]]:
        """Every correspondent of the conversation and those R3/R4 let the patient write to,
        as (name, address), the latest sender first; and the names of the professionals of
        the conversation who ended the exchanges (R5)."""
        me = page.address.lower()
        seen: dict[str, str] = {}
        for m in reversed([m for m in messages if not m.draft]):
            for name, address in (*m.reply_to, (m.from_name, m.from_addr), *m.to, *m.cc):
                if address and address != me and address not in seen:
                    seen[address] = name
        contacts = {c.address: c for c in await self.store.contacts_of(
            page.identity.account_id)}
        everyone = [(seen[a] or (contacts[a].name if a in contacts else a), a) for a in seen]
        allowed = [(n, a) for n, a in everyone
                   if a in contacts and contacts[a].state == "open"]
        senders = {m.from_addr for m in messages if not m.draft}
        ended = [c.name or c.address for c in contacts.values()
                 if c.address in senders and c.state == "ended" and c.via is None]
        return everyone, allowed, ended

    async def conversation(self, request: Request) -> Response:
        page = await self._page(request)
        key = int(request.path_params["key"])
        messages = await self._conversation(page, key)
        bodies = {m.digest: b for m in messages
                  if (b := content.cached_body(m.digest)) is not None}
        missing = [m for m in messages if m.digest not in bodies]
        raws = await Conversations(self.store, page.identity.account_id).bodies(
            [m.id for m in missing])
        for m in missing:
            bodies[m.digest] = content.body(raws.get(m.id, b""), m.meta)
            content.remember_body(m.digest, bodies[m.digest])
        views = [{"m": m, "body": bodies[m.digest], "attachments": content.attachments(m.meta)}
                 for m in messages]
        unseen = _uids_by_mailbox([m for m in messages if not m.seen and not m.draft])
        mail = self.mail.for_patient(page.identity.account_id)
        for mailbox_id, uids in unseen.items():  # opening marks them \Seen, as IMAP shows
            await mail.store_flags(mailbox_id, uids, "+FLAGS", t.FLAG_SEEN, [])
        if unseen:
            self._audit(page.address, "web.read", f"conversation {key}",
                        {"messages": sum(len(u) for u in unseen.values())})
        everyone, allowed, ended = await self._correspondents(page, messages)
        return self._render(request, "conversation", page=page, key=key, views=views,
                            subject=messages[0].subject, everyone=everyone, allowed=allowed,
                            ended=ended, sent=request.query_params.get("envoye") == "1",
                            document_added=request.query_params.get("document") == "1")

    async def end_explained(self, request: Request) -> Response:
        page = await self._page(request)
        return self._render(request, "end_explained", page=page)

    async def attachment(self, request: Request) -> Response:
        page = await self._page(request)
        key, mid = int(request.path_params["key"]), int(request.path_params["mid"])
        index = int(request.path_params["index"])
        messages = await self._conversation(page, key)
        message = next((m for m in messages if m.id == mid), None)
        if message is None:
            raise HTTPException(404)
        raw = await Conversations(self.store, page.identity.account_id).body(mid)
        if len(raw or b"") > OFF_LOOP_BYTES:  # megabytes of base64: off the event loop
            data = await asyncio.to_thread(content.attachment_bytes, raw or b"", message.meta,
                                           index)
        else:
            data = content.attachment_bytes(raw or b"", message.meta, index)
        views = content.attachments(message.meta)
        if data is None or index >= len(views):
            raise HTTPException(404)
        media = content.sniff(data)
        return content.file_response(data, views[index].filename, media,
                                     request.query_params.get("apercu") == "1")

    # --- reply --------------------------------------------------------------------------------

    async def reply(self, request: Request) -> Response:
        """Reply / reply to all (walkthrough "Je réponds à un message"). The text is kept as
        a draft in the IMAP ``Drafts`` mailbox (saved by the page's script while typing and
        on leaving, or with "Enregistrer le brouillon"), resumed here and removed once sent.
        Documents of the patient's space and the medical profile's PDF summary may be
        attached (walkthrough "J'ajoute un document à mon message"), within R6's 10 MB."""
        page = await self._page(request)
        key = int(request.path_params["key"])
        messages = await self._conversation(page, key)
        everyone, allowed, _ended = await self._correspondents(page, messages)
        to_all = request.query_params.get("tous") == "1"
        offered = allowed if to_all else allowed[:1]
        if not offered:
            raise HTTPException(403)
        last = [m for m in messages if not m.draft][-1]
        subject = last.subject if last.subject.lower().startswith(("re:", "re :")) \
            else f"RE: {last.subject}"
        drafts = [m for m in messages if m.draft]
        docs = self.docs.documents(page)
        error = None
        text = ""
        chosen: list[int] = []
        with_profile = False
        doc_category = request.query_params.get("doc_categorie", "")
        doc_newest = request.query_params.get("doc_tri") != "anciens"
        if drafts:
            raw = await Conversations(self.store, page.identity.account_id).body(drafts[-1].id)
            text = content.body(raw or b"", drafts[-1].meta).text or ""
            headers = BytesHeaderParser().parsebytes(raw or b"")
            chosen = _ids(str(headers.get(DRAFT_DOCUMENTS) or "").split(","))
            with_profile = str(headers.get(DRAFT_PROFILE) or "") == "1"
        saved = draft_kept = False
        if request.method == "POST":
            form = await self._form(request, page.session.csrf, files=True)
            action = form.get("action")
            text = str(form.get("message") or "")[:100_000]
            recipients = [a for _n, a in offered
                          if a in [x for x in form.getlist("destinataires")
                                   if isinstance(x, str)]]
            chosen = _ids(form.getlist("documents"))
            with_profile = form.get("profil") == "1"
            doc_category = str(form.get("doc_categorie") or "")
            doc_newest = form.get("doc_tri") != "anciens"
            if action == "supprimer-brouillon":
                await self._drop_drafts(page, drafts)
                return RedirectResponse(f"/messagerie/conversations/{key}", 303)
            if action in {"profil", "retirer-profil"}:
                with_profile = action == "profil"
            selected = await docs.many(chosen)
            chosen = [d.id for d in selected]
            marks = {DRAFT_DOCUMENTS: ",".join(map(str, chosen)),
                     DRAFT_PROFILE: "1" if with_profile else "0"}
            if action in {"brouillon", "profil", "retirer-profil", "filtrer"}:
                raw = self._compose(page, recipients, everyone, subject, text, last, [],
                                    marks)
                await self._save_draft(page, raw, drafts)
                if action == "brouillon" and request.headers.get("x-requested-with") == "fetch":
                    return Response(status_code=204)
                saved = action == "brouillon"
                draft_kept = True
            else:
                files = [f for f in form.getlist("fichiers") if isinstance(f, UploadFile)
                         and f.filename]
                uploads = [(f.filename or "piece-jointe", f.content_type or
                            "application/octet-stream", await f.read()) for f in files]
                for d in selected:
                    data = await docs.data(d.id)
                    if data is not None:
                        uploads.append((d.filename, d.media, data))
                entries = await self.docs.profile(page).entries() if with_profile else []
                if with_profile:
                    uploads.append((profile_filename(page.name), "application/pdf",
                                    await asyncio.to_thread(profile_pdf, page.name, entries,
                                                            datetime.now(PARIS))))
                total = sum(len(d) for _n, _t, d in uploads)
                if not recipients:
                    error = "Choisissez au moins un destinataire."
                elif not text.strip() and not uploads:
                    error = "Votre message est vide."
                elif total > MAX_PATIENT_ATTACHMENTS:
                    error = (f"Les pièces jointes dépassent 10 Mo ({_size(total)}) : "
                             "retirez-en pour envoyer le message.")
                else:
                    compose = (asyncio.to_thread if total > OFF_LOOP_BYTES
                               else _now)  # megabytes encoded off the event loop
                    raw = await compose(self._compose, page, recipients, everyone, subject,
                                        text, last, uploads)
                    info = await parse_message_async(raw)
                    outcome = await submit(self.store, self.writer, page.identity,
                                           self.settings.patient_domain, recipients, raw, info,
                                           [page.address])
                    if outcome.refusal is None:
                        docs.audit_attached(selected, recipients)
                        if with_profile:
                            self.docs.profile(page).audit_attached(recipients, len(entries))
                        await self._drop_drafts(page, drafts)
                        return RedirectResponse(
                            f"/messagerie/conversations/{key}?envoye=1", 303)
                    error = f"Message refusé : {outcome.refusal.text}"
        if doc_category not in CATEGORIES or doc_category == ADMIN_CATEGORY:
            doc_category = ""
        _n, health = await docs.page(administrative=False, category=doc_category or None,
                                     newest_first=doc_newest, limit=REPLY_DOCUMENTS)
        _n, admin = await docs.page(administrative=True, newest_first=doc_newest,
                                    limit=REPLY_DOCUMENTS)
        selected = await docs.many(chosen)
        shown = {d.id for d in (*health, *admin)}
        profile_size = 0
        if with_profile:
            profile_size = len(await asyncio.to_thread(
                profile_pdf, page.name, await self.docs.profile(page).entries(),
                datetime.now(PARIS)))
        used = sum(d.size for d in selected) + profile_size
        return self._render(request, "reply", 400 if error else 200, page=page, key=key,
                            offered=offered, subject=subject, text=text, error=error,
                            saved=saved, room=MAX_PATIENT_ATTACHMENTS - used,
                            room_text=_room(MAX_PATIENT_ATTACHMENTS - used),
                            to_all=to_all, has_draft=bool(drafts) or draft_kept,
                            health=health, admin=admin,
                            chosen=set(chosen), hidden_chosen=[d for d in selected
                                                                if d.id not in shown],
                            with_profile=with_profile,
                            profile_name=profile_filename(page.name),
                            profile_size=profile_size, doc_category=doc_category,
                            max_total=MAX_PATIENT_ATTACHMENTS,
                            fixed_size=profile_size + sum(d.size for d in selected
                                                          if d.id not in shown),
                            doc_newest=doc_newest,
                            health_categories={k: v for k, v in CATEGORIES.items()
                                               if k != ADMIN_CATEGORY})

    async def _save_draft(self, page: Page, raw: bytes, old: list[MessageSummary]) -> None:
        """The new draft in ``Drafts`` (\\Draft \\Seen), then the previous ones removed."""
        mail = self.mail.for_patient(page.identity.account_id)
        await mail.append(DRAFTS, raw, t.FLAG_DRAFT | t.FLAG_SEEN, [], None)
        await self._drop_drafts(page, old)

    async def _drop_drafts(self, page: Page, drafts: list[MessageSummary]) -> None:
        mail = self.mail.for_patient(page.identity.account_id)
        for mailbox_id, uids in _uids_by_mailbox(drafts).items():
            await mail.store_flags(mailbox_id, uids, "+FLAGS", t.FLAG_DELETED, [])
            await mail.expunge(mailbox_id, [(u, u) for u in uids])

    def _compose(self, page: Page, recipients: list[str], everyone: list[tuple[str, str]],
                 subject: str, text: str, parent: MessageSummary,
                 uploads: list[tuple[str, str, bytes]],
                 marks: dict[str, str] | None = None) -> bytes:
        names = dict((a, n) for n, a in everyone)
        msg = EmailMessage()
        msg["From"] = formataddr((_one_line(page.name), page.address))
        msg["To"] = ", ".join(formataddr((_one_line(names.get(a, "")), a)) for a in recipients)
        msg["Subject"] = _one_line(subject)
        msg["Date"] = format_datetime(datetime.now(UTC))
        msg["Message-ID"] = make_msgid(domain=self.settings.patient_domain)
        if parent.message_id:
            # RFC 5322 §3.6.4: the parent's References (else its In-Reply-To), then its id.
            msg["In-Reply-To"] = parent.message_id
            msg["References"] = " ".join(
                x for x in (parent.references or parent.in_reply_to, parent.message_id) if x)
        for name, value in (marks or {}).items():  # a draft's chosen documents
            msg[name] = value
        msg.set_content(text or "", charset="utf-8", cte="quoted-printable")
        for filename, media, data in uploads:
            maintype, _, subtype = media.partition(";")[0].strip().lower().partition("/")
            if maintype not in {"application", "image", "text", "audio", "video"} \
                    or not re.fullmatch(r"[a-z0-9][a-z0-9.+-]{0,100}", subtype):
                maintype, subtype = "application", "octet-stream"
            msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=filename)
        # Long Message-IDs stay as they are (never folded into encoded words).
        return msg.as_bytes(policy=msg.policy.clone(linesep="\r\n", max_line_length=998))

    # --- delete, history ----------------------------------------------------------------------

    async def delete(self, request: Request) -> Response:
        page = await self._page(request)
        key = int(request.path_params["key"])
        messages = await self._conversation(page, key)
        if request.method == "POST":
            await self._form(request, page.session.csrf)
            mail = self.mail.for_patient(page.identity.account_id)
            for mailbox_id, uids in _uids_by_mailbox(messages).items():
                await mail.copy(mailbox_id, uids, "Trash", move=True)
            self._audit(page.address, "web.delete", f"conversation {key}",
                        {"messages": len(messages)})
            return RedirectResponse("/messagerie?supprimee=1", 303)
        return self._render(request, "delete", page=page, key=key,
                            subject=messages[0].subject)

    async def history(self, request: Request) -> Response:
        page = await self._page(request)
        ins = page.address.split("@")[0]
        async with self.store.read() as conn:
            rows = (await conn.execute(
                select(t.audit.c.at, t.audit.c.action, t.audit.c.subject, t.audit.c.detail)
                .where(t.audit.c.actor.in_([page.address, ins]),
                       t.audit.c.action.like("login%"))
                .order_by(desc(t.audit.c.id)).limit(200))).all()
        labels = {"login": "Connexion", "login.failed": "Échec de connexion (mot de passe)",
                  "login.throttled": "Connexion bloquée (trop de tentatives)",
                  "login.code": "Connexion (code à usage unique)",
                  "login.code.sent": "Code de connexion envoyé",
                  "login.code.failed": "Échec de connexion (code)"}
        entries = []
        for r in rows:
            try:
                detail = json.loads(r.detail or "{}")
            except ValueError:
                detail = {}
            at = r.at if r.at.tzinfo else r.at.replace(tzinfo=UTC)
            entries.append({"at": at, "what": labels.get(r.action, r.action),
                            "channel": {"web": "Portail", "imap": "IMAP", "imaps": "IMAP",
                                        "submission": "SMTP", "submissions": "SMTP"}.get(
                                            r.subject, r.subject),
                            "ip": str(detail.get("ip", "")) if isinstance(detail, dict)
                            else ""})
        return self._render(request, "history", page=page, entries=entries)

