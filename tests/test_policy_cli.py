"""``mssante-policy`` end to end on SQLite and PostgreSQL with the sample people."""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import text

from gateway.admin import main as policy_main
from gateway.config import load_config
from imap_store.store import ops
from imap_store.store.directory import Store

SAMPLES = Path(__file__).parent / "samples"
INAYA = "289057512345621"
MARTINE = "262112A04501213"
WRONG_KEY = "289456789012345"
CHRISTELLE = "christelle.thomas@medecin.mssante.fr"
MARIE = "marie.chanteau@medecin.mssante.fr"
DUPOND = "paul.dupond@ch-exemple.mssante.fr"
PATIENT_DOMAIN = "patient.mssante.fr"


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> object:
        return json.loads(self.out)


@pytest.fixture
def policy(gw_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch):
    config = str(gw_dir / "gateway.toml")

    def run(*args: str, stdin: str = "") -> Result:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        try:
            code = policy_main(["--config", config, *args])
        except SystemExit as exc:
            code = int(exc.code or 0)
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


def populate(policy) -> None:  # type: ignore[no-untyped-def]
    assert policy("domain", "import", str(SAMPLES / "whitelist.xml")).code == 0
    for address, name in ((CHRISTELLE, "Christelle Thomas"), (MARIE, "Marie Chanteau"),
                          (DUPOND, "Docteur Dupond")):
        assert policy("professional", "add", address, "--name", name).code == 0
    r = policy("patient", "add", INAYA, "--name", "Inaya Michel", "--notify-email",
               "inaya@example.org", "--password-stdin", stdin="un mot de passe\n")
    assert r.code == 0, r.err


def test_domain_commands(policy) -> None:  # type: ignore[no-untyped-def]
    r = policy("--json", "domain", "import", str(SAMPLES / "whitelist.xml"))
    assert r.code == 0
    data = r.json()
    assert data["domains"] == 4 and data["generated"] == "2026-11-01T03:00:00+01:00"
    assert policy("domain", "add", "autre.mssante.fr").code == 0
    r = policy("domain", "add", "autre.mssante.fr")
    assert r.code == 1 and "already trusted" in r.err
    listed = policy("domain", "list", "--json").json()
    assert {"domain": "medecin.mssante.fr"} in listed and len(listed) == 5
    assert policy("domain", "remove", "autre.mssante.fr").code == 0
    r = policy("domain", "remove", "autre.mssante.fr")
    assert r.code == 1 and "not a trusted domain" in r.err
    r = policy("domain", "add", "not_a domain")
    assert r.code == 1 and r.err.startswith("mssante-policy: error: invalid domain")


def test_whitelist_refuses_entities(policy, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "bad.xml"
    bad.write_text('<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "b">]><ListeBlanche/>')
    r = policy("domain", "import", str(bad))
    assert r.code == 1 and "DTD" in r.err
    bad.write_text("<ListeBlanche><Domaine>")
    r = policy("domain", "import", str(bad))
    assert r.code == 1 and "not a whitelist" in r.err


def test_professionals(policy) -> None:  # type: ignore[no-untyped-def]
    populate(policy)
    r = policy("professional", "add", "someone@gmail.com", "--name", "X")
    assert r.code == 1 and "gmail.com is not a trusted domain" in r.err
    r = policy("professional", "add", MARIE, "--name", "Marie")
    assert r.code == 1 and "already exists" in r.err
    r = policy("professional", "add", "a@medecin.mssante.fr", "--name", "A", "--rpps", "123")
    assert r.code == 1 and "11 digits" in r.err
    r = policy("--json", "professional", "add", "b@medecin.mssante.fr", "--name", "B",
               "--rpps", "10001234565", "--password-stdin", stdin="long enough password\n")
    assert r.code == 0
    record = r.json()
    assert record["rpps"] == "10001234565" and record["has_password"] is True
    assert "password" not in json.dumps({k: v for k, v in record.items() if k != "has_password"})
    assert policy("professional", "suspend", MARIE).code == 0
    shown = policy("professional", "show", MARIE, "--json").json()
    assert shown["state"] == "suspended" and shown["name"] == "Marie Chanteau"
    assert policy("professional", "reinstate", MARIE).code == 0
    listed = policy("professional", "list", "--json").json()
    assert [p["address"] for p in listed] == sorted(p["address"] for p in listed)
    assert {p["state"] for p in listed} == {"active"}
    r = policy("professional", "show", "nobody@medecin.mssante.fr")
    assert r.code == 1 and "not found" in r.err


def test_patients(policy, gw_dir: Path) -> None:  # type: ignore[no-untyped-def]
    populate(policy)
    r = policy("patient", "add", WRONG_KEY, "--name", "X", "--notify-email", "x@example.org")
    assert r.code == 1
    assert "the key 45 does not match the NIR (expected 25)" in r.err
    assert len(r.err.strip().splitlines()) == 1
    r = policy("--json", "patient", "add", MARTINE, "--name", "Martine Leguellec",
               "--notify-email", "martine@example.org")
    assert r.code == 0, r.err
    assert r.json()["address"] == f"{MARTINE}@{PATIENT_DOMAIN}"
    r = policy("patient", "add", INAYA, "--name", "Again", "--notify-email", "x@example.org")
    assert r.code == 1 and "already exists" in r.err
    shown = policy("patient", "show", INAYA, "--json").json()
    assert shown["name"] == "Inaya Michel" and shown["has_password"] is True
    assert shown["mailboxes"] == [
        {"name": "INBOX", "messages": 1, "unseen": 1},
        {"name": "Drafts", "messages": 0, "unseen": 0},
        {"name": "Sent", "messages": 0, "unseen": 0},
        {"name": "Trash", "messages": 0, "unseen": 0},
    ]
    text_out = policy("patient", "show", INAYA).out
    assert "INBOX" in text_out and "Inaya Michel" in text_out
    assert policy("patient", "close", INAYA).code == 0
    assert policy("patient", "show", INAYA, "--json").json()["state"] == "closed"
    assert policy("patient", "reopen", INAYA).code == 0
    listed = policy("patient", "list", "--json").json()
    assert [p["ins"] for p in listed] == sorted([INAYA, MARTINE])
    r = policy("patient", "set-password", INAYA, "--password-stdin", stdin="short\n")
    assert r.code == 1 and "too short" in r.err
    r = policy("patient", "set-password", INAYA, "--password-stdin", stdin="\n")
    assert r.code == 2
    assert policy("patient", "set-password", INAYA, "--password-stdin",
                  stdin="nouveau mot de passe\n").code == 0
    # The welcome message came from templates/ and greets the patient by name.
    welcome = asyncio.run(_first_blob(gw_dir))
    assert b"Bienvenue" in welcome and b"multipart/alternative" in welcome
    assert b"Inaya Michel" in welcome


async def _first_blob(gw_dir: Path) -> bytes:
    store = Store.from_url(load_config(gw_dir / "gateway.toml").storage_url)
    try:
        async with store.read() as conn:
            row = (await conn.execute(text("SELECT data FROM blob ORDER BY id LIMIT 1"))).one()
        return bytes(row[0])
    finally:
        await store.close()


def test_check_rules(policy) -> None:  # type: ignore[no-untyped-def]
    populate(policy)
    inaya = f"{INAYA}@{PATIENT_DOMAIN}"

    def check(sender: str, recipient: str) -> tuple[int, dict[str, object]]:
        r = policy("check", "--from", sender, "--to", recipient, "--json")
        return r.code, r.json()

    code, d = check(CHRISTELLE, inaya)
    assert code == 0 and d["rule"] == "R1" and d["allowed"] is True
    code, d = check(CHRISTELLE, f"{WRONG_KEY}@{PATIENT_DOMAIN}")
    assert (code, d["rule"], d["smtp_code"], d["enhanced_code"]) == (1, "R8", 553, "5.1.3")
    assert "INS key does not match" in str(d["text"])
    code, d = check(CHRISTELLE, f"{MARTINE}@{PATIENT_DOMAIN}")  # valid Corsican INS, unknown
    assert (code, d["rule"], d["smtp_code"], d["enhanced_code"]) == (1, "R8", 550, "5.1.1")
    code, d = check("intrus@gmail.com", inaya)
    assert (code, d["rule"], d["smtp_code"]) == (1, "R1", 550)
    code, d = check("inconnu@medecin.mssante.fr", inaya)
    assert (code, d["rule"]) == (1, "R1")
    code, d = check(inaya, CHRISTELLE)  # a patient writing first
    assert (code, d["rule"], d["smtp_code"], d["enhanced_code"]) == (1, "R3", 550, "5.7.1")
    assert policy("professional", "suspend", MARIE).code == 0
    code, d = check(MARIE, inaya)
    assert (code, d["rule"], d["smtp_code"], d["enhanced_code"]) == (1, "R9", 550, "5.7.1")
    assert policy("patient", "close", INAYA).code == 0
    code, d = check(CHRISTELLE, inaya)
    assert (code, d["rule"], d["smtp_code"], d["enhanced_code"]) == (1, "R8", 550, "5.2.1")
    r = policy("check", "--from", CHRISTELLE, "--to", inaya)
    assert r.code == 1 and r.out.startswith("REFUSE R8: 550 5.2.1")


def test_exchanges(policy, gw_dir: Path) -> None:  # type: ignore[no-untyped-def]
    populate(policy)
    inaya = f"{INAYA}@{PATIENT_DOMAIN}"
    assert policy("exchange", "list", "--patient", INAYA, "--json").json() == []
    asyncio.run(_open_exchange(gw_dir, CHRISTELLE, "Christelle Thomas", [(MARIE, "")]))
    asyncio.run(_open_exchange(gw_dir, DUPOND, "docteur Dupond", []))
    contacts = policy("exchange", "list", "--patient", INAYA, "--json").json()
    assert [(c["address"], c["state"]) for c in contacts] == [
        (CHRISTELLE, "open"), (DUPOND, "open"), (MARIE, "open")]  # names case-insensitive
    assert contacts[2]["via"] == CHRISTELLE and all(c["since"] for c in contacts)
    assert policy("check", "--from", inaya, "--to", MARIE).code == 0  # R4 Reply-To
    assert policy("check", "--from", inaya, "--to", CHRISTELLE).code == 0
    r = policy("exchange", "end", "--patient", INAYA, "--professional", CHRISTELLE, "--json")
    assert r.code == 0 and r.json()["state"] == "ended"
    contacts = policy("exchange", "list", "--patient", INAYA, "--json").json()
    assert {c["address"]: c["state"] for c in contacts} == {
        CHRISTELLE: "ended", DUPOND: "open", MARIE: "ended"}
    r = policy("check", "--from", inaya, "--to", CHRISTELLE, "--json")
    assert r.code == 1 and r.json()["rule"] == "R3" and "ended" in r.json()["text"]
    assert policy("check", "--from", inaya, "--to", MARIE).code == 1
    assert policy("exchange", "reopen", "--patient", INAYA, "--professional", CHRISTELLE).code == 0
    assert policy("check", "--from", inaya, "--to", CHRISTELLE).code == 0
    r = policy("exchange", "end", "--patient", INAYA, "--professional", MARIE)
    assert r.code == 1 and "no exchange" in r.err
    text_out = policy("exchange", "list", "--patient", INAYA).out
    assert text_out.splitlines()[0].split() == ["NAME", "ADDRESS", "STATE", "SINCE", "(UTC)", "VIA"]


async def _open_exchange(
    gw_dir: Path, pro: str, name: str, reply_to: list[tuple[str, str]]
) -> None:
    store = Store.from_url(load_config(gw_dir / "gateway.toml").storage_url)
    try:
        async with store.write() as conn:
            _facts, patient_id = await conn.run_sync(ops.patient_facts, INAYA)
            await conn.run_sync(ops.open_exchange, patient_id, pro, name, reply_to)
    finally:
        await store.close()


def test_audit_chain_detects_tampering(policy, gw_dir: Path) -> None:  # type: ignore[no-untyped-def]
    populate(policy)
    r = policy("audit", "verify", "--json")
    assert r.code == 0 and r.json()["ok"] is True and r.json()["rows"] >= 5
    rows = policy("audit", "--limit", "2", "--json").json()
    assert len(rows) == 2 and rows[0]["id"] < rows[1]["id"]
    asyncio.run(_sql(gw_dir, "UPDATE audit SET subject = 'someone else' WHERE id = 3"))
    r = policy("audit", "verify")
    assert r.code == 1 and "row 3" in r.out and "row 3" in r.err


@pytest.mark.parametrize(
    "sql",
    ["DELETE FROM audit WHERE id = 2",
     "UPDATE audit SET action = 'patient.close' WHERE id = 4",
     "UPDATE audit SET detail = '{\"rpps\":\"1\"}' WHERE id = 2"],
)
def test_audit_verify_each_tampering(policy, gw_dir: Path, sql: str) -> None:  # type: ignore[no-untyped-def]
    populate(policy)
    asyncio.run(_sql(gw_dir, sql))
    r = policy("audit", "verify", "--json")
    assert r.code == 1 and r.json()["ok"] is False
    assert r.json()["first_broken_row"] in (3, 4, 2)


async def _sql(gw_dir: Path, sql: str) -> None:
    store = Store.from_url(load_config(gw_dir / "gateway.toml").storage_url)
    try:
        async with store.write() as conn:
            await conn.execute(text(sql))
    finally:
        await store.close()


def test_usage_errors_exit_2(policy) -> None:  # type: ignore[no-untyped-def]
    assert policy("patient").code == 2
    assert policy("patient", "add", INAYA).code == 2  # --name missing
    assert policy("audit", "--limit", "0").code == 2


def test_subprocess_exit_codes_and_env_config(gw_dir: Path, tmp_path: Path) -> None:
    env = {**os.environ, "MSSANTE_CONFIG": str(gw_dir / "gateway.toml")}
    exe = Path(sys.executable).parent / "mssante-policy"
    ok = subprocess.run([exe, "--json", "domain", "list"], env=env, capture_output=True,
                        text=True, timeout=60)
    assert ok.returncode == 0 and json.loads(ok.stdout) == []
    bad = subprocess.run([exe, "professional", "show", "x@y.fr"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1
    assert bad.stderr == "mssante-policy: error: professional x@y.fr not found\n"
    missing = subprocess.run([exe, "domain", "list"], cwd=tmp_path, capture_output=True,
                             text=True, timeout=60, env={k: v for k, v in os.environ.items()
                                                         if k != "MSSANTE_CONFIG"})
    assert missing.returncode == 2 and "gateway.toml not found" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_concurrent_first_start_migrates_once(gw_dir: Path) -> None:
    """Several processes pointed at an empty database at once all succeed: a new PostgreSQL
    schema, or an empty SQLite file (one that exists: mssante-policy creates none)."""
    cfg = gw_dir / "gateway.toml"
    url = load_config(cfg).storage_url
    if url.startswith("sqlite"):
        fresh = gw_dir / "fresh.db"
        fresh.touch()
        new_url = f"sqlite:///{fresh}"
    else:
        new_url = url.replace("?schema=", "?schema=f")
    cfg.write_text(cfg.read_text("utf-8").replace(f'url = "{url}"', f'url = "{new_url}"'),
                   "utf-8")
    assert load_config(cfg).storage_url == new_url
    env = {**os.environ, "MSSANTE_CONFIG": str(cfg)}
    exe = Path(sys.executable).parent / "mssante-policy"
    try:
        procs = [subprocess.Popen([exe, "domain", "list"], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(4)]
        results = [(*p.communicate(timeout=120), p.returncode) for p in procs]
        assert all(code == 0 for _out, _err, code in results), results
    finally:
        if not new_url.startswith("sqlite"):
            asyncio.run(_drop_schema(new_url))


async def _drop_schema(url: str) -> None:
    store = Store.from_url(url.split("?")[0])
    schema = url.split("?schema=")[1]
    try:
        async with store.write() as conn:
            await conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    finally:
        await store.close()
