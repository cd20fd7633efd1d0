"""The patient portal over real HTTPS (SPEC §11): login with the one-time code, the
conversation list, a conversation, attachments, a reply through the submission path, the R5
banner, deleting a conversation, the access history, and every refusal (wrong or expired code,
missing CSRF token, another patient's ids, oversized upload)."""

from __future__ import annotations

import email
import email.policy
import re
import time

import pytest

from tests.conftest import CHRISTELLE, DUPOND, INAYA, MARTINE, PATIENT_PASSWORD
from tests.gateway_proc import Gateway
from tests.helpers import mailbox, sample, smtp
from tests.portal_client import PortalClient

PATIENT = f"{INAYA}@patient.mssante.fr"


def deliver(gw: Gateway, sender: str, raw: bytes) -> None:
    conn = smtp(gw, sender)
    try:
        conn.sendmail(sender, [PATIENT], raw)
    finally:
        conn.quit()


def conversation_keys(page: str) -> list[int]:
    return [int(k) for k in re.findall(r'href="/messagerie/conversations/(\d+)"', page)]


def test_security_headers_and_login_required(gateway: Gateway) -> None:
    client = PortalClient(gateway, follow=False)
    reply = client.get("/messagerie")
    assert (reply.status, reply.headers["location"]) == (303, "/connexion")
    page = client.get("/connexion")
    assert page.status == 200
    headers = page.headers
    assert "frame-ancestors 'none'" in headers["content-security-policy"]
    assert "unsafe-inline" not in headers["content-security-policy"]
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["strict-transport-security"].startswith("max-age=")
    assert headers["cache-control"] == "no-store"
    assert '<html lang="fr">' in page.text
    cookie = headers["set-cookie"]
    assert "HttpOnly" in cookie and "Secure" in cookie and "SameSite=strict" in cookie


def test_login_with_code_list_open_reply(gateway: Gateway) -> None:
    deliver(gateway, DUPOND, sample("02"))  # three PDFs
    deliver(gateway, CHRISTELLE, sample("01"))  # Cc and Reply-To Dr Marie Chanteau
    client = PortalClient(gateway)
    page = client.login(INAYA, PATIENT_PASSWORD)
    assert page.url.endswith("/messagerie"), page.text[:500]
    text = page.text
    assert PATIENT in text
    assert "Seul un professionnel de santé peut débuter un échange" in text
    assert "1 - 3 sur 3" in text
    assert text.count("Non lu : ") == 3
    assert "Documents attachés" in text
    keys = conversation_keys(text)
    assert len(keys) == 3
    # Newest first: Christelle's message (28 May was delivered last), the welcome is oldest.
    assert text.index("Christelle Thomas") < text.index("Docteur Dupond")

    convo = client.get(f"/messagerie/conversations/{keys[1]}")
    assert convo.status == 200
    assert "Docteur Dupond" in convo.text and "Aucune inquiétude" in convo.text
    assert "Répondre à tous" not in convo.text  # one correspondent
    pdf = re.search(r'href="(/messagerie/conversations/\d+/messages/\d+/pieces-jointes/0)'
                    r'\?apercu=1"', convo.text)
    assert pdf
    preview = client.get(pdf.group(1) + "?apercu=1")
    assert preview.status == 200 and preview.body.startswith(b"%PDF-")
    assert preview.headers["content-type"] == "application/pdf"
    assert preview.headers["content-disposition"].startswith("inline;")
    download = client.get(pdf.group(1))
    assert download.headers["content-type"] == "application/octet-stream"
    assert download.headers["content-disposition"].startswith("attachment;")
    listing = client.get("/messagerie")
    assert listing.text.count("Non lu : ") == 2  # opening marked it \Seen

    # Christelle's message names Dr Marie Chanteau in Cc and Reply-To: reply to all.
    convo = client.get(f"/messagerie/conversations/{keys[0]}")
    assert "Répondre à tous" in convo.text
    form = client.get(f"/messagerie/conversations/{keys[0]}/repondre?tous=1")
    assert CHRISTELLE in form.text and "marie.chanteau@medecin.mssante.fr" in form.text
    sent = client.post_multipart(
        f"/messagerie/conversations/{keys[0]}/repondre?tous=1",
        {"csrf": form.csrf(), "destinataires": [CHRISTELLE, "marie.chanteau@medecin.mssante.fr"],
         "message": "Merci, je serai présente."},
        [("fichiers", "ordonnance.pdf", "application/pdf", b"%PDF-1.4\n%%EOF\n")])
    assert sent.status == 200 and "Message envoyé" in sent.text, sent.text[:1000]
    copies = mailbox(gateway.directory, INAYA, "Sent")
    assert len(copies) == 1
    msg = email.message_from_bytes(copies[0], policy=email.policy.default)
    assert msg["From"].addresses[0].addr_spec == PATIENT
    assert {a.addr_spec for a in msg["To"].addresses} == {
        CHRISTELLE, "marie.chanteau@medecin.mssante.fr"}
    assert msg["In-Reply-To"] == "<179530649177.16049.17724126056944860785@medecin.mssante.fr>"
    assert [p.get_filename() for p in msg.iter_attachments()] == ["ordonnance.pdf"]
    # The reply joined the conversation: still three.
    assert "1 - 3 sur 3" in client.get("/messagerie").text


def test_ended_exchange_banner_and_no_reply(gateway: Gateway) -> None:
    deliver(gateway, DUPOND, sample("02"))
    deliver(gateway, DUPOND, sample("05"))  # [FIN]: ends the exchange (R5)
    client = PortalClient(gateway)
    page = client.login(PATIENT, PATIENT_PASSWORD)
    key = next(k for k in conversation_keys(page.text)
               if "Fin du suivi" in client.get(f"/messagerie/conversations/{k}").text)
    convo = client.get(f"/messagerie/conversations/{key}")
    assert "Docteur Dupond a mis fin à vos échanges" in convo.text
    assert "/messagerie/fin-des-echanges" in convo.text
    assert ">Répondre<" not in convo.text
    assert client.get(f"/messagerie/conversations/{key}/repondre").status == 403
    explained = client.get("/messagerie/fin-des-echanges")
    assert "mettre fin aux échanges" in explained.text


def test_delete_conversation_goes_to_trash(gateway: Gateway) -> None:
    deliver(gateway, DUPOND, sample("02"))
    client = PortalClient(gateway)
    page = client.login(INAYA, PATIENT_PASSWORD)
    key = conversation_keys(page.text)[0]
    confirm = client.get(f"/messagerie/conversations/{key}/supprimer")
    assert "ne seront plus accessibles" in confirm.text
    # Without the CSRF token: refused, nothing moved.
    assert client.post(f"/messagerie/conversations/{key}/supprimer", {}).status == 403
    assert len(mailbox(gateway.directory, INAYA)) == 2
    done = client.post(f"/messagerie/conversations/{key}/supprimer", {"csrf": confirm.csrf()})
    assert "1 - 1 sur 1" in done.text
    assert len(mailbox(gateway.directory, INAYA, "Trash")) == 1
    assert client.get(f"/messagerie/conversations/{key}").status == 404


def test_refusals(gateway: Gateway) -> None:
    deliver(gateway, DUPOND, sample("02"))
    inaya = PortalClient(gateway)
    keys = conversation_keys(inaya.login(INAYA, PATIENT_PASSWORD).text)

    # Another patient asks for Inaya's conversation and attachment: 404, none of her data.
    martine = PortalClient(gateway)
    assert martine.login(MARTINE, PATIENT_PASSWORD).url.endswith("/messagerie")
    for key in keys:
        reply = martine.get(f"/messagerie/conversations/{key}")
        assert reply.status == 404 and "Dupond" not in reply.text
        assert martine.get(f"/messagerie/conversations/{key}/messages/{key}/"
                           "pieces-jointes/0").status == 404

    # Wrong password, then a wrong code, then the code after 5 tries.
    client = PortalClient(gateway)
    page = client.get("/connexion")
    bad = client.post("/connexion", {"csrf": page.csrf(), "identifiant": INAYA,
                                     "mot_de_passe": "faux"})
    assert bad.status == 401 and "incorrect" in bad.text
    page = client.post("/connexion", {"csrf": bad.csrf(), "identifiant": INAYA,
                                      "mot_de_passe": PATIENT_PASSWORD})
    page = client.post("/connexion/code", {"csrf": page.csrf(), "canal": "sms"})
    code = client.last_sms_code()
    wrong = f"{(int(code) + 1) % 10**6:06d}"
    for _ in range(4):
        reply = client.post("/connexion/code/saisie", {"csrf": page.csrf(), "code": wrong})
        assert reply.status == 400 and "Code incorrect" in reply.text
    reply = client.post("/connexion/code/saisie", {"csrf": page.csrf(), "code": wrong})
    assert "Trop d'essais" in reply.text
    reply = client.post("/connexion/code/saisie", {"csrf": page.csrf(), "code": code})
    assert reply.status == 400 and "/messagerie" not in reply.url  # used up: ask again

    # The login form without its CSRF token.
    fresh = PortalClient(gateway)
    fresh.get("/connexion")
    assert fresh.post("/connexion", {"identifiant": INAYA,
                                     "mot_de_passe": PATIENT_PASSWORD}).status == 403

    # An upload over R6's 10 MB is refused before it is read.
    form = inaya.get(f"/messagerie/conversations/{keys[0]}/repondre")
    big = inaya.post_multipart(f"/messagerie/conversations/{keys[0]}/repondre",
                               {"csrf": form.csrf(), "destinataires": DUPOND, "message": "x"},
                               [("fichiers", "scan.pdf", "application/pdf",
                                 b"%PDF-" + b"0" * 10_000_001)])
    assert big.status == 400 and "dépassent 10 Mo" in big.text
    assert mailbox(gateway.directory, INAYA, "Sent") == []


def test_expired_code(gateway: Gateway) -> None:
    """A code past its 10 minutes is refused (the expiry is moved back in the database)."""
    import asyncio

    from sqlalchemy import update

    from gateway.config import load_config
    from imap_store.store import schema as t
    from imap_store.store.directory import Store
    from imap_store.store.fields import utcnow

    client = PortalClient(gateway)
    page = client.get("/connexion")
    page = client.post("/connexion", {"csrf": page.csrf(), "identifiant": INAYA,
                                      "mot_de_passe": PATIENT_PASSWORD})
    page = client.post("/connexion/code", {"csrf": page.csrf(), "canal": "sms"})

    async def expire() -> None:
        store = Store.from_url(load_config(gateway.config).storage_url)
        try:
            async with store.write() as conn:
                await conn.execute(update(t.web_session).values(code_expires=utcnow()))
        finally:
            await store.close()

    asyncio.run(expire())
    time.sleep(0.01)
    reply = client.post("/connexion/code/saisie", {"csrf": page.csrf(),
                                                   "code": client.last_sms_code()})
    assert reply.status == 400 and "expiré" in reply.text


def test_access_history_lists_logins_and_failures(gateway: Gateway) -> None:
    client = PortalClient(gateway)
    page = client.get("/connexion")
    client.post("/connexion", {"csrf": page.csrf(), "identifiant": PATIENT,
                               "mot_de_passe": "faux"})
    client.login(INAYA, PATIENT_PASSWORD)
    deadline = time.monotonic() + 5
    while True:  # audit rows ride with the next group commit
        history = client.get("/historique")
        if "Connexion (code à usage unique)" in history.text or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert "Échec de connexion (mot de passe)" in history.text
    assert "Connexion (code à usage unique)" in history.text
    assert "Portail" in history.text


@pytest.mark.parametrize("path", ["/messagerie/conversations/999999",
                                  "/messagerie/conversations/abc", "/nope"])
def test_unknown_pages_are_404_without_detail(gateway: Gateway, path: str) -> None:
    client = PortalClient(gateway)
    client.login(INAYA, PATIENT_PASSWORD)
    reply = client.get(path)
    assert reply.status == 404
    assert "Traceback" not in reply.text and "Page introuvable" in reply.text


def test_drafts_are_kept_in_imap_drafts_resumed_and_removed_once_sent(
        gateway: Gateway) -> None:
    deliver(gateway, DUPOND, sample("02"))
    client = PortalClient(gateway)
    keys = conversation_keys(client.login(INAYA, PATIENT_PASSWORD).text)
    key = keys[0]
    form = client.get(f"/messagerie/conversations/{key}/repondre")
    for text in ("Bonjour Docteur,", "Bonjour Docteur, merci pour les résultats."):
        saved = client.post_multipart(f"/messagerie/conversations/{key}/repondre",
                                      {"csrf": form.csrf(), "destinataires": DUPOND,
                                       "message": text, "action": "brouillon"}, [])
        assert saved.status == 200 and "Brouillon enregistré" in saved.text
    drafts = mailbox(gateway.directory, INAYA, "Drafts")
    assert len(drafts) == 1  # the second save replaced the first
    draft = email.message_from_bytes(drafts[0], policy=email.policy.default)
    assert draft.get_content().strip() == "Bonjour Docteur, merci pour les résultats."
    listing = client.get("/messagerie")
    assert "Brouillon" in listing.text and "1 - 2 sur 2" in listing.text
    resumed = client.get(f"/messagerie/conversations/{key}/repondre")
    assert "Bonjour Docteur, merci pour les résultats." in resumed.text
    assert "Vous reprenez votre brouillon" in resumed.text
    sent = client.post_multipart(f"/messagerie/conversations/{key}/repondre",
                                 {"csrf": form.csrf(), "destinataires": DUPOND,
                                  "message": "Bonjour Docteur, merci."}, [])
    assert "Message envoyé" in sent.text
    assert mailbox(gateway.directory, INAYA, "Drafts") == []
    assert "Brouillon" not in client.get("/messagerie").text


def test_a_draft_can_be_deleted(gateway: Gateway) -> None:
    deliver(gateway, DUPOND, sample("02"))
    client = PortalClient(gateway)
    key = conversation_keys(client.login(INAYA, PATIENT_PASSWORD).text)[0]
    form = client.get(f"/messagerie/conversations/{key}/repondre")
    client.post_multipart(f"/messagerie/conversations/{key}/repondre",
                          {"csrf": form.csrf(), "destinataires": DUPOND, "message": "x",
                           "action": "brouillon"}, [])
    assert len(mailbox(gateway.directory, INAYA, "Drafts")) == 1
    gone = client.post_multipart(f"/messagerie/conversations/{key}/repondre",
                                 {"csrf": form.csrf(), "action": "supprimer-brouillon"}, [])
    assert gone.url.endswith(f"/messagerie/conversations/{key}")
    assert mailbox(gateway.directory, INAYA, "Drafts") == []


def test_attachments_previewed_only_when_their_content_is_pdf_jpeg_or_png(
        gateway: Gateway) -> None:
    from tests.conftest import LABO

    deliver(gateway, LABO, sample("03"))  # a JPEG and an Excel file
    client = PortalClient(gateway)
    key = conversation_keys(client.login(INAYA, PATIENT_PASSWORD).text)[0]
    page = client.get(f"/messagerie/conversations/{key}")
    assert page.text.count("Aperçu") == 1 and "Aucun aperçu disponible" in page.text
    links = re.findall(r'href="(/messagerie/conversations/\d+/messages/\d+/pieces-jointes/\d+)',
                       page.text)
    jpeg, xls = sorted(set(links))
    shown = client.get(jpeg + "?apercu=1")
    assert shown.headers["content-type"] == "image/jpeg" and shown.body[:3] == b"\xff\xd8\xff"
    assert "sandbox" in shown.headers["content-security-policy"]
    # Asking a preview of the Excel file still gives a download, never a rendered type.
    refused = client.get(xls + "?apercu=1")
    assert refused.headers["content-type"] == "application/octet-stream"
    assert refused.headers["content-disposition"].startswith("attachment;")


def test_a_login_asks_for_three_codes_at_most(gateway: Gateway) -> None:
    client = PortalClient(gateway)
    page = client.get("/connexion")
    page = client.post("/connexion", {"csrf": page.csrf(), "identifiant": INAYA,
                                      "mot_de_passe": PATIENT_PASSWORD})
    for _ in range(3):
        page = client.get("/connexion/code")
        assert client.post("/connexion/code", {"csrf": page.csrf(), "canal": "sms"}
                           ).url.endswith("/connexion/code/saisie")
    page = client.get("/connexion/code")
    refused = client.post("/connexion/code", {"csrf": page.csrf(), "canal": "sms"})
    assert refused.status == 400 and "Trop de codes demandés" in refused.text


def test_the_session_token_changes_once_logged_in(gateway: Gateway) -> None:
    """The cookie issued after the password step is worth nothing after the code step
    (no session fixation), and a new password step ends the older login in progress."""
    client = PortalClient(gateway)
    page = client.get("/connexion")
    page = client.post("/connexion", {"csrf": page.csrf(), "identifiant": INAYA,
                                      "mot_de_passe": PATIENT_PASSWORD})
    assert page.url.endswith("/connexion/code")
    other = PortalClient(gateway)  # a second login in progress for the same patient
    other_page = other.get("/connexion")
    other_page = other.post("/connexion", {"csrf": other_page.csrf(), "identifiant": INAYA,
                                           "mot_de_passe": PATIENT_PASSWORD})
    assert client.get("/connexion/code").url.endswith("/connexion")  # ended by the other
    before = {c.name: c.value for c in other.jar}["mss_session"]
    page = other.post("/connexion/code", {"csrf": other_page.csrf(), "canal": "sms"})
    done = other.post("/connexion/code/saisie", {"csrf": page.csrf(),
                                                 "code": other.last_sms_code()})
    assert done.url.endswith("/messagerie")
    after = {c.name: c.value for c in other.jar}["mss_session"]
    assert after != before
    assert other.get("/messagerie").status == 200
    stale = PortalClient(gateway, follow=False)
    assert stale.request("/messagerie", headers={"Cookie": f"mss_session={before}"}
                         ).status == 303


def test_the_list_dates_are_arrival_dates_in_the_list_order(gateway: Gateway) -> None:
    """The list is ordered by the arrival of each conversation's last message; the date shown
    is that arrival, not the sender's Date: field (sample 02 is dated 15 February 2026 and
    arrives after the welcome message: shown in the list with today's date, first)."""
    deliver(gateway, DUPOND, sample("02"))
    client = PortalClient(gateway)
    page = client.login(PATIENT, PATIENT_PASSWORD).text
    dates = re.findall(r'<span class="date">([^<]+)</span>', page)
    assert len(dates) == 2, dates
    assert dates[0] == dates[1]  # both arrived today
    assert "févr." not in dates[0]
    keys = conversation_keys(page)
    assert "Vos résultats" in client.get(f"/messagerie/conversations/{keys[0]}").text
