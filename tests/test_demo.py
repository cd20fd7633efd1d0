"""``demo.sh`` end to end: the settings it prints work as printed, and a patient's reply reaches
the demo operator, which prints it (issue 15, "First contact"). Runs the real script (with
the existing .venv: ``DEMO_SKIP_INSTALL=1``) on free ports, then the printed swaks command,
a reply over the printed submissions port, mbsync with the ready-made configuration, and
neomutt: batch mode to send, under ``script`` (a pseudo-terminal) to open the INBOX."""

from __future__ import annotations

import os
import re
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PRO = "marie.chanteau@medecin.mssante.fr"
INS = "289057512345621"
PATIENT = f"{INS}@patient.mssante.fr"
PATIENT_PASSWORD = "demo-patient"


def tool(name: str) -> str | None:
    found = shutil.which(name)
    if found is None and os.environ.get("CI"):
        pytest.fail(f"{name} is not installed (CI installs it)")
    return found


def free_port_block(count: int) -> int:
    """A first port such that ``count`` consecutive ports are free now."""
    for _ in range(200):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = int(probe.getsockname()[1])
        if base + count >= 65535:
            continue
        sockets = []
        try:
            for port in range(base, base + count):
                s = socket.socket()
                sockets.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError("no block of free ports")


@dataclass
class Demo:
    directory: Path
    base: int
    out: Path
    proc: subprocess.Popen[bytes]

    def output(self) -> str:
        return self.out.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float = 60.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.output())
            if found:
                return found
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"{pattern!r} not seen; demo output:\n{self.output()}")


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    tmp = tmp_path_factory.mktemp("demo")
    base = free_port_block(7)
    out = tmp / "demo.out"
    env = {**os.environ, "DEMO_DIR": str(tmp / "demo"), "DEMO_PORT_BASE": str(base),
           "DEMO_SKIP_INSTALL": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("MSSANTE_CONFIG", None)
    with out.open("wb") as log:
        proc = subprocess.Popen(["bash", str(ROOT / "demo.sh")], env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    d = Demo(tmp / "demo", base, out, proc)
    try:
        d.wait_for(r"mssante-gateway ready", timeout=180)
        d.wait_for(r"demo operator listening")
        yield d
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # demo.sh, serve and the operator
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)


def banner_port(d: Demo, label: str) -> int:
    return int(d.wait_for(rf"{label}\s+localhost port (\d+)").group(1))


def test_banner_names_localhost_not_an_ip(demo: Demo) -> None:
    text = demo.output()
    assert "127.0.0.1:" not in text.split("demo operator")[0]  # clients are given host names
    assert f"https://localhost:{demo.base + 5}/" in text
    assert f"IMAP  localhost port {demo.base + 4}, TLS" in text
    # The demo has no notification relay: serve says so, once.
    assert text.count("notifications off: [notifier] relay is empty") == 1


def test_printed_swaks_then_reply_reaches_the_demo_operator(demo: Demo) -> None:
    swaks = tool("swaks")
    if swaks is None:
        pytest.skip("swaks not installed")
    printed = demo.wait_for(r"(?ms)^  swaks .*?Subject: Bonjour\"$").group(0)
    r = subprocess.run(["bash", "-c", printed], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "250 2.0.0" in r.stdout

    # The patient answers with the printed SMTP settings: localhost, implicit TLS, INS login.
    ctx = ssl.create_default_context(cafile=str(demo.directory / "certs" / "ca.pem"))
    reply = EmailMessage()
    reply["From"] = f"Inaya Michel <{PATIENT}>"
    reply["To"] = PRO
    reply["Subject"] = "Re: Bonjour"
    reply["Message-ID"] = make_msgid(domain="patient.mssante.fr")
    marker = f"réponse de démonstration {os.urandom(4).hex()}"
    reply.set_content(f"Bonjour Docteur,\n\n{marker}\n")
    port = banner_port(demo, "SMTP")
    with smtplib.SMTP_SSL("localhost", port, context=ctx, timeout=30) as conn:
        conn.login(INS, PATIENT_PASSWORD)
        conn.send_message(reply)

    shown = demo.wait_for(r"(?s)demo operator: message received from (.*?)\n=+\n", 60)
    block = shown.group(0)
    assert f"RCPT TO:   {PRO}" in block and "Subject:     Re: Bonjour" in block
    assert marker in block
    assert "client certificate" in shown.group(1)  # the gateway showed its certificate


def test_mbsync_with_the_ready_made_settings(demo: Demo) -> None:
    mbsync = tool("mbsync")
    if mbsync is None:
        pytest.skip("mbsync not installed")
    rc = demo.directory / "mbsyncrc"
    text = rc.read_text()
    assert "Host localhost" in text and f"Port {demo.base + 4}" in text
    r = subprocess.run([mbsync, "-c", str(rc), "-a"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    inbox = demo.directory / "maildir" / "INBOX" / "cur"
    new = demo.directory / "maildir" / "INBOX" / "new"
    files = [*inbox.glob("*"), *new.glob("*")]
    assert files and any(b"Bienvenue" in f.read_bytes() for f in files)
    assert (demo.directory / "maildir" / "Sent").is_dir()


def test_neomutt_sends_with_the_ready_made_settings(demo: Demo) -> None:
    """neomutt's batch mode sends over the printed submissions port with the printed CA; the
    message lands in Sent once (``record`` is off: the gateway files it)."""
    neomutt = tool("neomutt")
    if neomutt is None:
        pytest.skip("neomutt not installed")
    swaks = tool("swaks")
    if swaks is None:
        pytest.skip("swaks not installed")
    # Needs an open exchange: the professional writes first (swaks, as printed).
    printed = demo.wait_for(r"(?ms)^  swaks .*?Subject: Bonjour\"$").group(0)
    assert subprocess.run(["bash", "-c", printed], cwd=ROOT, capture_output=True,
                          timeout=120).returncode == 0
    marker = f"neomutt {os.urandom(4).hex()}"
    home = demo.directory.parent / "home"
    home.mkdir(exist_ok=True)
    r = subprocess.run([neomutt, "-n", "-F", str(demo.directory / "neomuttrc"), "-s",
                        f"Re: Bonjour ({marker})", "--", PRO], input=f"{marker}\n",
                       capture_output=True, text=True, timeout=120,
                       env={**os.environ, "HOME": str(home), "TERM": "dumb"})
    assert r.returncode == 0, r.stdout + r.stderr
    demo.wait_for(rf"Subject:\s+Re: Bonjour \({marker}\)", 60)


def test_neomutt_opens_the_inbox_with_the_ready_made_settings(demo: Demo) -> None:
    neomutt, script = tool("neomutt"), tool("script")
    if neomutt is None or script is None:
        pytest.skip("neomutt or script (util-linux) not installed")
    home = demo.directory.parent / "home-imap"
    home.mkdir(exist_ok=True)
    typescript = demo.directory.parent / "neomutt.typescript"
    command = f"{neomutt} -F {demo.directory / 'neomuttrc'} -e 'push <quit>y'"
    r = subprocess.run([script, "-qfc", command, str(typescript)], capture_output=True,
                       timeout=120, env={**os.environ, "HOME": str(home), "TERM": "xterm"})
    screen = typescript.read_text(errors="replace")
    assert r.returncode == 0, screen
    assert f"Reading imaps://{INS}@localhost:{demo.base + 4}/INBOX" in screen
    assert "Fetching message headers" in screen, screen
    assert "rror" not in screen and "ertificate" not in screen, screen


def test_demo_never_removes_a_folder_that_is_not_its_own(tmp_path: Path) -> None:
    precious = tmp_path / "notes.txt"
    precious.write_text("keep me")
    env = {**os.environ, "DEMO_DIR": str(tmp_path), "DEMO_SKIP_INSTALL": "1"}
    r = subprocess.run(["bash", str(ROOT / "demo.sh")], env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "not a demo folder" in r.stderr
    assert precious.read_text() == "keep me"
