"""The documents and medical profile screens in a real browser (issue 12): Debian's chromium
through Selenium, following the walkthroughs "Ajouter une pièce jointe aux documents de Mon
espace santé", "J'ajoute un document à mon message" and "Ajouter mon profil médical": keep an
attachment, upload from the device, edit the profile, attach a document and the profile's PDF
to a reply; the PDF read back with pypdf holds every entry; axe-core on every screen.

Screenshots go to ``$MSSANTE_SCREENSHOTS`` or a temporary folder (its path is printed)."""

from __future__ import annotations

import email
import email.policy
import io
from pathlib import Path

import pytest
from PIL import Image
from pypdf import PdfReader

from tests.conftest import DUPOND, INAYA, LABO, PATIENT_PASSWORD
from tests.gateway_proc import Gateway
from tests.helpers import mailbox, sample
from tests.test_portal import deliver
from tests.test_portal_browser import Walk, browser, screenshot_folder  # noqa: F401 (fixture)

PROFILE = (
    ("maladie", "Diabète de type 2", "suivi tous les 3 mois", "2015-06-01"),
    ("traitement", "Metformine", "1000 mg matin et soir", ""),
    ("allergie", "Pénicilline", "urticaire", "2019-05-02"),
    ("vaccination", "DTP", "rappel", "2022-09-10"),
    ("mesure", "Tension artérielle", "12/8", "2024-01-15"),
)


def _login(w: Walk) -> None:
    w.go("/connexion")
    w.find("#identifiant").send_keys(INAYA)  # type: ignore[attr-defined]
    w.find("#mot_de_passe").send_keys(PATIENT_PASSWORD)  # type: ignore[attr-defined]
    w.click(w.find("form button[type=submit]"))
    w.find("#canal-sms").click()  # type: ignore[attr-defined]
    w.click(w.find("form.card button[type=submit]"))
    w.find("#code").send_keys(w.sms_code())  # type: ignore[attr-defined]
    w.click(w.find("form.card button[type=submit]"))
    assert "Messagerie" in w.text()


def _set(w: Walk, css: str, value: str) -> None:
    """A date field's value (typing into it depends on the browser's locale)."""
    w.d.execute_script("arguments[0].value = arguments[1];", w.find(css), value)  # type: ignore[attr-defined]


def test_documents_walkthrough_in_chromium(gateway: Gateway, browser: object,  # noqa: F811
                                           tmp_path: Path,
                                           request: pytest.FixtureRequest) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.select import Select

    deliver(gateway, DUPOND, sample("02"))  # results with three PDFs
    deliver(gateway, LABO, sample("03"))  # a JPEG and a spreadsheet
    w = Walk(browser, gateway, screenshot_folder(request, tmp_path))
    d = browser
    _login(w)

    # "Ajouter à mes documents santé" on the second PDF of Dr Dupond's message.
    w.click(d.find_element(By.PARTIAL_LINK_TEXT, "Vos résultats"))  # type: ignore[attr-defined]
    links = d.find_elements(By.PARTIAL_LINK_TEXT, "Ajouter à mes documents santé")  # type: ignore[attr-defined]
    assert len(links) == 3
    w.click(links[1])
    name = w.find("#nom")
    assert name.get_attribute("value") == "Résultats_d'analyses_MLeguellec"  # type: ignore[attr-defined]
    assert w.find("#date").get_attribute("value") == "2026-02-15"  # type: ignore[attr-defined]
    w.screen("ajouter-piece-jointe")
    name.clear()  # type: ignore[attr-defined]
    name.send_keys("Résultats: février?")  # type: ignore[attr-defined]
    Select(w.find("#categorie")).select_by_value("BIOLOGIE")
    w.find("#v-MASQUE_PS").click()  # type: ignore[attr-defined]
    w.click(w.find("form.card button[type=submit]"))
    assert "ne peut contenir les caractères suivants : : ?" in w.text()
    w.screen("nom-refuse")
    name = w.find("#nom")
    name.clear()  # type: ignore[attr-defined]
    name.send_keys("Résultats d'analyses février")  # type: ignore[attr-defined]
    w.click(w.find("form.card button[type=submit]"))
    assert "Document ajouté" in w.text()
    w.screen("document-ajoute")

    # The documents page, then an upload from the device (an administrative document).
    w.click(d.find_element(By.LINK_TEXT, "Documents"))  # type: ignore[attr-defined]
    text = w.text()
    assert "Résultats d'analyses février" in text and "Résultats de biologie" in text
    assert "Docteur Dupond" in text and "Masqué" in text
    w.screen("documents")
    card = tmp_path / "Carte de mutuelle 2021.png"
    Image.new("RGB", (40, 25), (20, 90, 160)).save(card, format="PNG")
    w.click(d.find_element(By.LINK_TEXT, "Ajouter un document"))  # type: ignore[attr-defined]
    w.screen("televerser")
    w.find("#fichier").send_keys(str(card))  # type: ignore[attr-defined]
    _set(w, "#date", "2021-12-19")
    Select(w.find("#categorie")).select_by_value("DOC_ADM")
    w.click(w.find("form.card button[type=submit]"))
    text = w.text()
    assert "Document ajouté" in text and "Carte de mutuelle 2021" in text
    assert "19/12/2021" in text
    w.screen("document-televerse")
    Select(w.find("#categorie")).select_by_value("CERT_MED")
    w.click(w.find("form.filters button[type=submit]"))
    assert "Je n'ai pas de documents de santé dans cette catégorie" in w.text()
    w.screen("documents-filtres")

    # An attachment that is no accepted type keeps only "Télécharger", with the reason.
    w.click(d.find_element(By.LINK_TEXT, "Messagerie"))  # type: ignore[attr-defined]
    w.click(d.find_element(By.PARTIAL_LINK_TEXT, "Labo BioPCR"))  # type: ignore[attr-defined]
    w.click(d.find_element(By.XPATH, "//a[contains(@href, '/pieces-jointes/1/documents')]"))  # type: ignore[attr-defined]
    text = w.text()
    assert "Ce type de fichier n'est pas accepté" in text and "Télécharger" in text
    assert not d.find_elements(By.ID, "categorie")  # type: ignore[attr-defined]
    w.screen("piece-jointe-refusee")

    # Delete a document (a second copy of the results), with the confirmation.
    w.go("/messagerie")
    w.click(d.find_element(By.PARTIAL_LINK_TEXT, "Vos résultats"))  # type: ignore[attr-defined]
    w.click(d.find_elements(By.PARTIAL_LINK_TEXT, "Ajouter à mes documents santé")[2])  # type: ignore[attr-defined]
    Select(w.find("#categorie")).select_by_value("ORD_SOIN")
    w.click(w.find("form.card button[type=submit]"))
    w.go("/documents")
    w.click(d.find_element(  # type: ignore[attr-defined]
        By.XPATH, "//a[contains(@href, '/supprimer')][span[contains(., 'Ordonnance')]]"))
    assert "Voulez-vous vraiment supprimer le document" in w.text()
    w.screen("supprimer-document")
    w.click(w.find("form.card button[type=submit]"))
    assert "Document supprimé" in w.text() and "Ordonnance_MLeguellec" not in w.text()

    # The medical profile: one entry per section, then one edited.
    w.click(d.find_element(By.LINK_TEXT, "Profil médical"))  # type: ignore[attr-defined]
    w.screen("profil-vide")
    for section, label, detail, when in PROFILE:
        Select(w.find("#rubrique")).select_by_value(section)
        w.find("#intitule").send_keys(label)  # type: ignore[attr-defined]
        w.find("#detail").send_keys(detail)  # type: ignore[attr-defined]
        if when:
            _set(w, "#date-info", when)
        w.click(w.find("form.card button[type=submit]"))
        assert "Information ajoutée" in w.text()
    w.click(d.find_element(  # type: ignore[attr-defined]
        By.XPATH, "//a[contains(@href, '/modifier')][span[contains(., 'Metformine')]]"))
    w.screen("profil-modifier")
    detail = w.find("#detail")
    detail.clear()  # type: ignore[attr-defined]
    detail.send_keys("850 mg matin et soir")  # type: ignore[attr-defined]
    w.click(w.find("form.card button[type=submit]"))
    text = w.text()
    assert "Information modifiée" in text and "850 mg matin et soir" in text
    w.screen("profil")

    # Reply with the kept document and "Ajouter mon profil médical".
    w.click(d.find_element(By.LINK_TEXT, "Messagerie"))  # type: ignore[attr-defined]
    w.click(d.find_element(By.PARTIAL_LINK_TEXT, "Vos résultats"))  # type: ignore[attr-defined]
    w.click(d.find_element(By.LINK_TEXT, "Répondre"))  # type: ignore[attr-defined]
    assert "Place restante : 10,0 Mo sur 10 Mo" in w.text()
    w.find("#message").send_keys("Bonjour Docteur, voici mon profil médical.")  # type: ignore[attr-defined]
    d.find_elements(By.TAG_NAME, "summary")[0].click()  # type: ignore[attr-defined]
    d.find_element(By.XPATH, "//label[contains(., \"Résultats d'analyses février\")]").click()  # type: ignore[attr-defined]
    w.screen("reponse-documents")
    w.click(d.find_element(By.XPATH, "//button[contains(., 'Ajouter mon profil médical')]"))  # type: ignore[attr-defined]
    text = w.text()
    assert "Profil_medical_InayaMichel.pdf" in text and "Place restante : 9,9 Mo sur 10 Mo" in text
    assert "voici mon profil médical" in w.find("#message").get_attribute("value")  # type: ignore[attr-defined]
    w.screen("reponse-profil-medical")
    w.click(d.find_element(By.XPATH, "//button[normalize-space()='Envoyer']"))  # type: ignore[attr-defined]
    assert "Message envoyé" in w.text()
    w.screen("envoye")

    sent = mailbox(gateway.directory, INAYA, "Sent")
    assert len(sent) == 1
    msg = email.message_from_bytes(sent[0], policy=email.policy.default)
    files = {p.get_filename(): p.get_payload(decode=True) for p in msg.iter_attachments()}
    assert set(files) == {"Résultats d'analyses février.pdf", "Profil_medical_InayaMichel.pdf"}
    pdf_text = "".join(p.extract_text() for p in PdfReader(
        io.BytesIO(files["Profil_medical_InayaMichel.pdf"])).pages)
    assert "Synthèse de mon profil médical" in pdf_text and "Inaya Michel" in pdf_text
    for _section, label, detail, when in PROFILE:
        assert label in pdf_text, label
        expected = "850 mg matin et soir" if label == "Metformine" else detail
        assert expected in pdf_text, expected
        if when:
            y, m, day = when.split("-")
            assert f"{day}/{m}/{y}" in pdf_text
    assert len(list(w.shots.glob("*.png"))) == w.n
