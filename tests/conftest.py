"""Shared fixtures: a database per test on SQLite and on PostgreSQL, a gateway directory made
by the real ``mssante-gateway init``.

PostgreSQL: ``$MSSANTE_TEST_PG`` (default ``postgresql://postgres@127.0.0.1/test``); each test
gets its own schema. When it is unreachable the PostgreSQL half is skipped locally, but fails
under CI (``CI=true``) so a missing database never hides behind a skip.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import socket
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import pytest

PG_URL = os.environ.get("MSSANTE_TEST_PG", "postgresql://postgres@127.0.0.1/test")
SAMPLES = Path(__file__).parent / "samples"


def _pg_reachable() -> bool:
    parsed = urlparse(PG_URL)
    try:
        with socket.create_connection((parsed.hostname or "127.0.0.1", parsed.port or 5432), 2):
            return True
    except OSError:
        return False


async def _pg_exec(sql: str) -> None:
    import asyncpg

    parsed = urlparse(PG_URL)
    conn = await asyncpg.connect(
        host=parsed.hostname, port=parsed.port or 5432, user=parsed.username or "postgres",
        database=(parsed.path or "/test").lstrip("/"),
    )
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'gateway.db'}"
        return
    if not _pg_reachable():
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL unreachable at {PG_URL} under CI")
        pytest.skip(f"PostgreSQL unreachable at {PG_URL}")
    schema = "t_" + secrets.token_hex(6)
    yield f"{PG_URL}?schema={schema}"
    asyncio.run(_pg_exec(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))


def set_storage_url(config: Path, url: str) -> None:
    text = config.read_text(encoding="utf-8")
    text = re.sub(r'(?m)^url = ".*"$', f'url = "{url}"', text, count=1)
    config.write_text(text, encoding="utf-8")


@pytest.fixture
def gw_dir(tmp_path: Path, db_url: str) -> Path:
    """A directory initialised by ``mssante-gateway init``, storage pointed at ``db_url``."""
    from gateway.cli import main as gateway_main

    directory = tmp_path / "gw"
    assert gateway_main(["init", "--dir", str(directory), "--domain", "mssante.test",
                         "--storage-url", db_url]) == 0
    return directory


INAYA = "289057512345621"
MARTINE = "262112A04501213"
CHRISTELLE = "christelle.thomas@medecin.mssante.fr"
MARIE = "marie.chanteau@medecin.mssante.fr"
DUPOND = "paul.dupond@ch-exemple.mssante.fr"
LABO = "resultats@labo-biopcr-orly.mssante.fr"
PRO_PASSWORD = "mot de passe pro"
PATIENT_PASSWORD = "mot de passe patient"


def cli_in_process(config: Path, *args: str, stdin: str = "",
                   prog: str = "mssante-policy") -> None:
    """Run a CLI command in this process (much faster than a subprocess); must succeed."""
    import io
    import sys

    from gateway.admin import main as policy_main
    from gateway.cli import main as gateway_main

    main = policy_main if prog == "mssante-policy" else gateway_main
    saved = sys.stdin
    sys.stdin = io.StringIO(stdin)
    try:
        assert main(["--config", str(config), *args]) == 0, args
    finally:
        sys.stdin = saved


def prepare_gateway(gw_dir: Path) -> object:
    """Populate a gateway directory with the sample people (not started yet): professionals
    (Christelle with a password and all with certificates), patients Inaya and Martine, and
    an operator certificate for medecin.mssante.fr."""
    from tests.gateway_proc import Gateway

    gw = Gateway(gw_dir)
    gw.assign_ports()
    cfg = gw.config
    run_cli = cli_in_process
    run_cli(cfg, "domain", "import", str(SAMPLES / "whitelist.xml"))
    run_cli(cfg, "professional", "add", CHRISTELLE, "--name", "Christelle Thomas",
            "--password-stdin", stdin=PRO_PASSWORD + "\n")
    for address, name in ((MARIE, "Dr Marie Chanteau"), (DUPOND, "Docteur Dupond"),
                          (LABO, "Labo BioPCR Orly")):
        run_cli(cfg, "professional", "add", address, "--name", name)
    run_cli(cfg, "patient", "add", INAYA, "--name", "Inaya Michel", "--notify-email",
            "inaya@example.org", "--phone", "+33 6 12 34 56 78", "--password-stdin",
            stdin=PATIENT_PASSWORD + "\n")
    run_cli(cfg, "patient", "add", MARTINE, "--name", "Martine Leguellec", "--notify-email",
            "martine@example.org", "--phone", "+33698765432", "--password-stdin",
            stdin=PATIENT_PASSWORD + "\n")
    for address in (CHRISTELLE, MARIE, DUPOND, LABO):
        run_cli(cfg, "certs", "professional", address, "--out", str(gw_dir / "clients" / address),
                prog="mssante-gateway")
    run_cli(cfg, "certs", "operator", "medecin.mssante.fr", "--out",
            str(gw_dir / "clients" / "operator"), prog="mssante-gateway")
    return gw


def running(gw: object) -> Iterator[object]:
    """Start a prepared gateway, yield it, kill it whatever happens (for fixtures)."""
    gw.start()  # type: ignore[attr-defined]
    try:
        yield gw
    finally:
        gw.kill()  # type: ignore[attr-defined]


@pytest.fixture
def gateway(gw_dir: Path) -> Iterator[object]:
    """A running gateway with the sample people (see ``prepare_gateway``)."""
    yield from running(prepare_gateway(gw_dir))


@pytest.fixture
def limited(gw_dir: Path) -> Iterator[object]:
    """A running gateway with the sample people and tight limits: a 3 MiB DATA budget,
    3 connections per IP."""
    gw = prepare_gateway(gw_dir)
    with gw.config.open("a") as f:  # type: ignore[attr-defined]
        f.write("\n[limits]\ndata_in_flight = 3145728\nconnections_per_ip = 3\n")
    yield from running(gw)
