"""The portal in a real browser (SPEC §11): Debian's chromium driven by chromium-driver through
Selenium, following the walkthroughs: login with the code, the list, a conversation, an
attachment preview, a reply, the R5 banner, deleting a conversation, the access history; the
list by keyboard alone; axe-core on every page (0 violations).

Screenshots of every screen go to a temporary folder (``$MSSANTE_SCREENSHOTS`` to choose it);
its path is printed. Chromium and axe-core are installed by ``.ci/run``; without them the test
is skipped locally and fails under ``CI=true``.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import CHRISTELLE, DUPOND, INAYA, PATIENT_PASSWORD
from tests.gateway_proc import Gateway
from tests.helpers import mailbox, sample
from tests.test_portal import deliver

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
AXE = Path(os.environ.get("MSSANTE_AXE_JS", Path.home() / ".cache" / "mssante-axe" /
                          "node_modules" / "axe-core" / "axe.min.js"))


def _missing() -> str | None:
    for path, what in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver"),
                       (str(AXE), "axe-core")):
        if not Path(path).exists():
            return f"{what} not installed ({path}); .ci/run installs it"
    return None


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[object]:
    missing = _missing()
    if missing:
        if os.environ.get("CI"):
            pytest.fail(missing)
        pytest.skip(missing)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--window-size=1280,1000",
                f"--user-data-dir={tmp_path / 'chromium'}", "--lang=fr-FR"):
        options.add_argument(arg)
    options.accept_insecure_certs = True  # the gateway's dev CA is not in the browser's store
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


class Walk:
    """One browser walk through the portal, with a screenshot and an axe-core run per screen."""

    def __init__(self, driver: object, gw: Gateway, shots: Path) -> None:
        self.d = driver
        self.base = f"https://localhost:{gw.ports['web']}"
        self.gw = gw
        self.shots = shots
        self.n = 0
        self.axe = AXE.read_text("utf-8")

    def go(self, path: str) -> None:
        self.d.get(self.base + path)  # type: ignore[attr-defined]

    def screen(self, name: str) -> None:
        """Screenshot, then axe-core: WCAG 2.1 A/AA rules, no violation allowed."""
        self.n += 1
        self.d.save_screenshot(str(self.shots / f"{self.n:02d}-{name}.png"))  # type: ignore[attr-defined]
        result = self.d.execute_async_script(  # type: ignore[attr-defined]
            self.axe + "\nconst done = arguments[arguments.length - 1];"
            "axe.run(document, {runOnly: {type: 'tag', values: "
            "['wcag2a', 'wcag2aa', 'wcag21a', 'wcag21aa']}})"
            ".then(r => done(r.violations.map(v => v.id + ': ' + v.nodes.map("
            "n => n.target.join(' ')).join(', '))));")
        assert result == [], f"axe-core on {name}: {result}"

    def find(self, css: str) -> object:
        from selenium.webdriver.common.by import By

        return self.d.find_element(By.CSS_SELECTOR, css)  # type: ignore[attr-defined]

    def click(self, element: object) -> None:
        """Click and wait until the next page has loaded."""
        self.d.execute_script("window.mssOldPage = true;")  # type: ignore[attr-defined]
        element.click()  # type: ignore[attr-defined]
        self.wait_for_new_page()

    def wait_for_new_page(self) -> None:
        from selenium.webdriver.support.wait import WebDriverWait

        WebDriverWait(self.d, 15).until(lambda d: d.execute_script(  # type: ignore[no-any-return]
            "return window.mssOldPage === undefined && document.readyState === 'complete';"))

    def text(self) -> str:
        return str(self.find("body").text)  # type: ignore[attr-defined]

    def sms_code(self) -> str:
        outbox = self.gw.directory / "sms-outbox.txt"
        return re.findall(r"code de connexion est (\d{6})", outbox.read_text("utf-8"))[-1]


def screenshot_folder(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """Where a walkthrough saves its screens: ``$MSSANTE_SCREENSHOTS/<test id>`` (one folder per
    test and database, so that walks run together never mix their screens), else a temporary
    folder; created, and its path printed."""
    chosen = os.environ.get("MSSANTE_SCREENSHOTS")
    shots = Path(chosen) / request.node.name if chosen else tmp_path / "screens"
    shots.mkdir(parents=True, exist_ok=True)
    print(f"\nscreenshots: {shots}")
    return shots


def test_walkthrough_in_chromium(gateway: Gateway, browser: object, tmp_path: Path,
                                 request: pytest.FixtureRequest) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    deliver(gateway, DUPOND, sample("02"))  # results with three PDFs
    deliver(gateway, CHRISTELLE, sample("01"))  # appointment, Cc Dr Marie Chanteau
    deliver(gateway, DUPOND, sample("05"))  # [FIN]: Dr Dupond ends the exchanges (R5)
    w = Walk(browser, gateway, screenshot_folder(request, tmp_path))
    d = browser

    # Login: identifier + password, where the code goes, the code.
    w.go("/connexion")
    w.screen("connexion")
    w.find("#identifiant").send_keys(INAYA)  # type: ignore[attr-defined]
    w.find("#mot_de_passe").send_keys(PATIENT_PASSWORD)  # type: ignore[attr-defined]
    w.click(w.find("form button[type=submit]"))
    assert "Où voulez-vous recevoir votre code" in w.text()
    w.screen("choix-du-code")
    w.find("#canal-sms").click()  # type: ignore[attr-defined]
    w.click(w.find("form.card button[type=submit]"))
    assert "Je saisis mon code" in w.text()
    w.screen("saisie-du-code")
    w.find("#code").send_keys(w.sms_code())  # type: ignore[attr-defined]
    w.click(w.find("form.card button[type=submit]"))

    # The messaging page.
    text = w.text()
    # The welcome message, 02, 01, and 05 with the end-of-exchange notice threaded to it.
    assert "1 - 4 sur 4" in text and f"{INAYA}@patient.mssante.fr" in text
    assert "Seul un professionnel de santé peut débuter un échange" in text
    w.screen("messagerie")

    # Keyboard only: Tab to the first conversation, Enter opens it.
    body = w.find("body")
    for _ in range(30):
        body.send_keys(Keys.TAB)  # type: ignore[attr-defined]
        active = d.switch_to.active_element  # type: ignore[attr-defined]
        if "/messagerie/conversations/" in (active.get_attribute("href") or ""):
            break
    else:
        pytest.fail("no conversation link reached with Tab")
    d.execute_script("window.mssOldPage = true;")  # type: ignore[attr-defined]
    active.send_keys(Keys.ENTER)
    w.wait_for_new_page()
    assert "/messagerie/conversations/" in d.current_url  # type: ignore[attr-defined]
    assert "Répondre" in w.text() or "a mis fin" in w.text()

    # Christelle's conversation: open, then reply to all.
    w.go("/messagerie")
    w.click(d.find_element(By.PARTIAL_LINK_TEXT, "Christelle Thomas"))  # type: ignore[attr-defined]
    assert "Répondre à tous" in w.text()
    w.screen("conversation")
    w.click(d.find_element(By.LINK_TEXT, "Répondre à tous"))  # type: ignore[attr-defined]
    w.screen("reponse")
    w.find("#message").send_keys("Merci, je serai présente au rendez-vous.")  # type: ignore[attr-defined]
    # The form has other buttons (documents, the medical profile): "Envoyer" by its text.
    w.click(d.find_element(By.XPATH, "//button[normalize-space()='Envoyer']"))  # type: ignore[attr-defined]
    assert "Message envoyé" in w.text()
    w.screen("message-envoye")
    assert len(mailbox(gateway.directory, INAYA, "Sent")) == 1

    # Dr Dupond ended the exchanges: the banner, no reply button; his PDF previewed.
    w.go("/messagerie")
    w.click(d.find_element(By.PARTIAL_LINK_TEXT, "Fin du suivi"))  # type: ignore[attr-defined]
    text = w.text()
    assert "Docteur Dupond a mis fin à vos échanges" in text and "Répondre" not in text
    w.screen("fin-des-echanges")
    w.click(d.find_element(By.LINK_TEXT, "En savoir plus"))  # type: ignore[attr-defined]
    w.screen("en-savoir-plus")
    w.go("/messagerie")
    w.click(d.find_element(By.PARTIAL_LINK_TEXT, "Vos résultats"))  # type: ignore[attr-defined]
    preview = d.find_element(By.PARTIAL_LINK_TEXT, "Aperçu")  # type: ignore[attr-defined]
    href = preview.get_attribute("href")
    w.screen("conversation-pieces-jointes")
    d.get(href)  # type: ignore[attr-defined]
    time.sleep(0.5)  # the PDF viewer draws
    d.save_screenshot(str(w.shots / f"{w.n + 1:02d}-apercu-pdf.png"))  # type: ignore[attr-defined]
    w.n += 1

    # Delete the welcome conversation, with the confirmation.
    w.go("/messagerie")
    w.click(d.find_element(By.PARTIAL_LINK_TEXT, "Bienvenue"))  # type: ignore[attr-defined]
    w.click(d.find_element(By.LINK_TEXT, "Supprimer la conversation"))  # type: ignore[attr-defined]
    w.screen("supprimer")
    w.click(w.find("form.card button[type=submit]"))
    assert "1 - 3 sur 3" in w.text(), w.text()
    assert len(mailbox(gateway.directory, INAYA, "Trash")) == 1

    w.go("/historique")
    assert "Connexion (code à usage unique)" in w.text()
    w.screen("historique")

    # Logout ends the session.
    w.click(w.find("form.logout button"))
    w.go("/messagerie")
    assert d.current_url.endswith("/connexion")  # type: ignore[attr-defined]
    assert len(list(w.shots.glob("*.png"))) == w.n
