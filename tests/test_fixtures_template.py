"""The per-session templates of ``tests/conftest.py``: each test's copy is its own, and
``prepare_gateway`` runs the commands itself when the directory is no longer as made."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from tests import conftest
from tests.conftest import cli_in_process, prepare_gateway


def test_prepare_gateway_copies_the_template_of_an_untouched_directory(
        gw_dir: Path, db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    slow: list[Path] = []
    monkeypatch.setattr(conftest, "_prepare_slowly", slow.append)
    prepare_gateway(gw_dir)
    kind = "sqlite" if db_url.startswith("sqlite:") else "postgresql"
    if kind not in conftest._TEMPLATES:  # PostgreSQL without a working pg_dump
        pytest.skip(f"no {kind} template (no working pg_dump)")
    assert slow == []
    assert (gw_dir / "clients" / "operator" / "cert.pem").is_file()


def test_prepare_gateway_runs_the_commands_once_the_database_changed(
        gw_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cli_in_process(gw_dir / "gateway.toml", "domain", "add", "medecin.mssante.fr")
    slow: list[Path] = []
    monkeypatch.setattr(conftest, "_prepare_slowly", slow.append)
    prepare_gateway(gw_dir)
    assert slow == [gw_dir]


def test_a_write_to_one_copy_leaves_the_next_copy_as_made(
        gw_dir: Path, db_url: str, tmp_path: Path) -> None:
    kind = "sqlite" if db_url.startswith("sqlite:") else "postgresql"
    template = conftest._TEMPLATES.get(kind, {}).get("init")
    if template is None:  # PostgreSQL without a working pg_dump: each test runs init itself
        pytest.skip(f"no {kind} template (no working pg_dump)")
    made = conftest._db_digest(db_url)
    cli_in_process(gw_dir / "gateway.toml", "domain", "add", "medecin.mssante.fr")
    assert conftest._db_digest(db_url) != made
    if kind == "sqlite":
        other = f"sqlite:///{tmp_path / 'other.db'}"
    else:
        other = f"{conftest.PG_URL}?schema=t_{secrets.token_hex(6)}"
    try:
        template.copy_to(tmp_path / "other", other)
        assert conftest._db_digest(other) == made
        assert (tmp_path / "other" / "gateway.toml").read_text(encoding="utf-8") == \
            (gw_dir / "gateway.toml").read_text(encoding="utf-8").replace(db_url, other)
    finally:
        if kind == "postgresql":
            import asyncio
            asyncio.run(conftest._pg_exec(
                f'DROP SCHEMA IF EXISTS "{conftest._pg_schema(other)}" CASCADE'))
