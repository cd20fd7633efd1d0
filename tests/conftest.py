"""Shared fixtures: a database per test on SQLite and on PostgreSQL, a gateway directory made
by the real ``mssante-gateway init``.

PostgreSQL: ``$MSSANTE_TEST_PG`` (default ``postgresql://postgres@127.0.0.1/test``); each test
gets its own schema. When it is unreachable the PostgreSQL half is skipped locally, but fails
under CI (``CI=true``) so a missing database never hides behind a skip.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

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


async def _pg_connect() -> Any:
    import asyncpg

    parsed = urlparse(PG_URL)
    return await asyncpg.connect(
        host=parsed.hostname, port=parsed.port or 5432, user=parsed.username or "postgres",
        database=(parsed.path or "/test").lstrip("/"),
    )


async def _pg_exec(sql: str) -> None:
    conn = await _pg_connect()
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def _pg_fingerprint(schema: str) -> bytes:
    """A digest of every row of every table and every sequence's value in ``schema``."""
    conn = await _pg_connect()
    try:
        tables = [r[0] for r in await conn.fetch(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = $1 "
            "ORDER BY 1", schema)]
        sequences = [r[0] for r in await conn.fetch(
            "SELECT sequence_name FROM information_schema.sequences WHERE sequence_schema = $1 "
            "ORDER BY 1", schema)]
        parts = [f"SELECT '{name}', coalesce(string_agg(x::text, '|' ORDER BY x::text), '') "
                 f'FROM "{schema}"."{name}" x' for name in tables]
        parts += [f"SELECT '{name}', last_value::text || is_called::text "
                  f'FROM "{schema}"."{name}"' for name in sequences]
        rows = await conn.fetch(" UNION ALL ".join(parts)) if parts else []
    finally:
        await conn.close()
    return hashlib.sha256(repr(sorted(tuple(r) for r in rows)).encode()).digest()


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


class _Template:
    """One gateway directory and its database, made once per session and database kind by
    the real CLI, then copied for each test: ``init`` (what ``gw_dir`` gives) and ``prepared``
    (``init`` then ``_prepare_slowly``: what ``prepare_gateway`` gives). Each test gets its own
    copy of the directory and its own database file (SQLite) or schema (PostgreSQL, restored
    from a ``pg_dump`` of the template's schema); nothing written by one test reaches another.
    """

    def __init__(self, directory: Path, url: str, kind: str) -> None:
        self.directory = directory
        self.kind = kind
        self.url = url
        self.snapshot = _db_snapshot(url)

    def copy_to(self, directory: Path, url: str) -> None:
        """The template at ``directory`` with its storage at ``url`` (an empty place)."""
        shutil.copytree(self.directory, directory, dirs_exist_ok=True)
        set_storage_url(directory / "gateway.toml", url)
        _db_restore(url, self.snapshot)


def _pg_schema(url: str) -> str:
    return parse_qs(urlparse(url).query)["schema"][0]


def _sqlite_path(url: str) -> Path:
    return Path(url.removeprefix("sqlite:///"))


def _db_snapshot(url: str) -> bytes:
    """The whole database at ``url``: SQLite's file image, or PostgreSQL's schema as SQL."""
    if url.startswith("sqlite:"):
        import sqlite3

        with closing(sqlite3.connect(_sqlite_path(url))) as conn:
            return conn.serialize()
    parsed = urlparse(PG_URL)
    dump = subprocess.run(
        ["pg_dump", "-h", parsed.hostname or "127.0.0.1", "-p", str(parsed.port or 5432),
         "-U", parsed.username or "postgres", "--schema", _pg_schema(url), "--inserts",
         "--no-owner", (parsed.path or "/test").lstrip("/")],
        capture_output=True, check=True, timeout=60)
    # psql meta-commands (\restrict) are not SQL; the schema name becomes a placeholder.
    lines = [line for line in dump.stdout.decode().splitlines() if not line.startswith("\\")]
    return re.sub(rf"\b{re.escape(_pg_schema(url))}\b", "@SCHEMA@", "\n".join(lines)).encode()


def _db_restore(url: str, snapshot: bytes) -> None:
    """Make the database at ``url`` what ``snapshot`` was (replacing whatever is there)."""
    if url.startswith("sqlite:"):
        path = _sqlite_path(url)
        for stale in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
            stale.unlink(missing_ok=True)
        path.write_bytes(snapshot)
        return
    schema = _pg_schema(url)
    asyncio.run(_pg_exec(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE;\n'
                         + snapshot.decode().replace("@SCHEMA@", schema)))


_TEMPLATES: dict[str, dict[str, _Template]] = {}
_NO_TEMPLATE: set[str] = set()  # kinds whose template could not be made
#: gw_dir paths as their template made them: path -> (kind, config text, database digest).
_PRISTINE: dict[Path, tuple[str, str, bytes]] = {}


def _db_digest(url: str) -> bytes:
    """What the database at ``url`` holds, as a digest (SQLite: its file and no -wal file)."""
    if url.startswith("sqlite:"):
        path = _sqlite_path(url)
        wal = path.with_name(path.name + "-wal")
        return hashlib.sha256(path.read_bytes() + (b"wal" if wal.exists() else b"")).digest()
    return asyncio.run(_pg_fingerprint(_pg_schema(url)))


def _templates(kind: str, factory: pytest.TempPathFactory) -> dict[str, _Template] | None:
    """The session's templates for ``kind``, made on first use; None when PostgreSQL has no
    ``pg_dump`` at hand (each test then runs init and prepare itself)."""
    if kind == "postgresql" and shutil.which("pg_dump") is None:
        return None
    if kind in _NO_TEMPLATE:
        return None
    if kind not in _TEMPLATES:
        from gateway.cli import main as gateway_main

        base = factory.mktemp(f"template-{kind}")
        urls = {stage: f"sqlite:///{base / (stage + '.db')}" if kind == "sqlite" else
                f"{PG_URL}?schema=tmpl_{stage}_{secrets.token_hex(6)}"
                for stage in ("init", "prepared")}
        try:
            assert gateway_main(["init", "--dir", str(base / "init"), "--domain", "mssante.test",
                                 "--storage-url", urls["init"]]) == 0
            init = _Template(base / "init", urls["init"], kind)
            init.copy_to(base / "prepared", urls["prepared"])
            _prepare_slowly(base / "prepared")
            _TEMPLATES[kind] = {"init": init,
                                "prepared": _Template(base / "prepared", urls["prepared"], kind)}
        except (subprocess.SubprocessError, OSError) as exc:  # pg_dump refused (a version?)
            print(f"no {kind} template ({exc}): each test runs init and prepare",
                  file=sys.stderr)
            _NO_TEMPLATE.add(kind)
            return None
        finally:
            if kind == "postgresql":
                for url in urls.values():
                    asyncio.run(_pg_exec(f'DROP SCHEMA IF EXISTS "{_pg_schema(url)}" CASCADE'))
    return _TEMPLATES[kind]


@pytest.fixture
def gw_dir(tmp_path: Path, db_url: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory initialised by ``mssante-gateway init``, storage pointed at ``db_url``: a
    copy of the session's template made by that command (``_Template``), its own files and
    its own database."""
    directory = tmp_path / "gw"
    kind = "sqlite" if db_url.startswith("sqlite:") else "postgresql"
    templates = _templates(kind, tmp_path_factory)
    if templates is None:
        from gateway.cli import main as gateway_main

        assert gateway_main(["init", "--dir", str(directory), "--domain", "mssante.test",
                             "--storage-url", db_url]) == 0
        return directory
    templates["init"].copy_to(directory, db_url)
    _PRISTINE[directory] = (kind, (directory / "gateway.toml").read_text(encoding="utf-8"),
                            _db_digest(db_url))
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
    an operator certificate for medecin.mssante.fr.

    A ``gw_dir`` still as the fixture made it (same configuration, same database content)
    becomes a copy of the session's prepared template, made by these same commands
    (``_prepare_slowly``); any other directory runs them."""
    from tests.gateway_proc import Gateway

    pristine = _PRISTINE.pop(gw_dir, None)
    if pristine is not None:
        kind, config_text, digest = pristine
        config = gw_dir / "gateway.toml"
        url_line = re.search(r'(?m)^url = "(.*)"$', config_text)
        assert url_line is not None
        url = url_line.group(1)
        template = _TEMPLATES[kind]["prepared"]
        if config.read_text(encoding="utf-8") == config_text and _db_digest(url) == digest:
            template.copy_to(gw_dir, url)
            gw = Gateway(gw_dir)
            gw.assign_ports()
            return gw
    return _prepare_slowly(gw_dir)


def _prepare_slowly(gw_dir: Path) -> object:
    """``prepare_gateway`` by the CLI commands themselves."""
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
