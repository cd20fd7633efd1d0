"""``mssante-gateway backup`` and ``restore`` (SQLite online backup API): a backup taken while
``serve`` runs, restored into a new gateway directory, read back over IMAP."""

from __future__ import annotations

import imaplib
import json
import os
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import CHRISTELLE, INAYA, PATIENT_PASSWORD, prepare_gateway, running
from tests.gateway_proc import Gateway
from tests.helpers import sample, smtp

BIN = Path(sys.executable).parent
PATIENT = f"{INAYA}@patient.mssante.fr"


def cli(*args: str, config: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MSSANTE_CONFIG": str(config)}
    return subprocess.run([str(BIN / "mssante-gateway"), *args], env=env, text=True,
                          capture_output=True, timeout=120)


@pytest.fixture
def sqlite_gateway(gw_dir: Path) -> Iterator[Gateway]:
    gw = prepare_gateway(gw_dir)
    yield from running(gw)  # type: ignore[misc]


def imap_messages(gw: Gateway) -> list[bytes]:
    ctx = ssl.create_default_context(cafile=str(gw.ca))
    conn = imaplib.IMAP4_SSL("localhost", gw.ports["imaps"], ssl_context=ctx, timeout=30)
    try:
        conn.login(INAYA, PATIENT_PASSWORD)
        typ, data = conn.select("INBOX", readonly=True)
        assert typ == "OK"
        typ, data = conn.uid("FETCH", "1:*", "(BODY.PEEK[])")
        assert typ == "OK"
        return [part[1] for part in data if isinstance(part, tuple)]
    finally:
        conn.logout()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_backup_while_serving_then_restore_and_read_over_imap(
    sqlite_gateway: Gateway, tmp_path: Path,
) -> None:
    gw = sqlite_gateway
    conn = smtp(gw, CHRISTELLE)
    try:
        assert conn.sendmail(CHRISTELLE, [PATIENT], sample("01")) == {}
    finally:
        conn.quit()
    before = imap_messages(gw)
    assert len(before) == 2  # the welcome message and Christelle's

    dest = tmp_path / "backups" / "gw.sqlite"
    r = cli("backup", str(dest), config=gw.config)
    assert r.returncode == 2 and "no such directory" in r.stderr  # the folder is not made
    dest.parent.mkdir()
    r = cli("--json", "backup", str(dest), config=gw.config)  # serve is running
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["bytes"] == dest.stat().st_size > 0
    r = cli("backup", str(dest), config=gw.config)
    assert r.returncode == 1 and "exists" in r.stderr

    # A new place: its own directory, certificates and database, then the backup in it.
    new = Gateway(tmp_path / "restored")
    r = subprocess.run([str(BIN / "mssante-gateway"), "init", "--dir", str(new.directory),
                        "--domain", "mssante.test"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    r = cli("restore", str(dest), config=new.config)
    assert r.returncode == 1 and "--force" in r.stderr  # init's empty database is there
    not_ours = tmp_path / "other.sqlite"
    import sqlite3
    with sqlite3.connect(not_ours) as other:
        other.execute("CREATE TABLE t (x)")
    r = cli("restore", str(not_ours), "--force", config=new.config)
    assert r.returncode == 1 and "not a mssante-gateway database" in r.stderr
    r = cli("--json", "restore", str(dest), "--force", config=new.config)
    assert r.returncode == 0, r.stderr
    restored = json.loads(r.stdout)
    assert restored["audit_ok"] is True and restored["audit_rows"] > 5

    new.assign_ports()
    new.start()
    try:
        after = imap_messages(new)
    finally:
        new.kill()
    assert after == before


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_backup_on_postgresql_points_to_pg_dump(gw_dir: Path, tmp_path: Path) -> None:
    for args in (("backup", str(tmp_path / "b")), ("restore", str(tmp_path / "b"))):
        r = cli(*args, config=gw_dir / "gateway.toml")
        assert r.returncode == 2 and "pg_dump" in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "b").exists()
