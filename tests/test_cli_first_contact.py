"""The command lines as a new user meets them (issue 15, "First contact"): real subprocesses of
``mssante-gateway`` and ``mssante-policy``, exit codes and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PG_URL, _pg_reachable

BIN = Path(sys.executable).parent
INAYA = "289057512345621"


def cli(prog: str, *args: str, cwd: Path | None = None, stdin: str = "",
        config: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "MSSANTE_CONFIG"}
    if config is not None:
        env["MSSANTE_CONFIG"] = str(config)
    return subprocess.run([str(BIN / prog), *args], cwd=cwd, env=env, input=stdin, text=True,
                          capture_output=True, timeout=120)


def one_line_error(result: subprocess.CompletedProcess[str], prog: str) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def sqlite_gw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("cli") / "gw"
    r = cli("mssante-gateway", "init", "--dir", str(directory), "--domain", "mssante.test")
    assert r.returncode == 0, r.stderr
    assert (directory / "gateway.db").is_file()
    return directory


def test_version() -> None:
    r = cli("mssante-gateway", "--version")
    assert r.returncode == 0
    name, _, version = r.stdout.strip().partition(" ")
    assert name == "mssante-gateway" and version[0].isdigit() and "." in version


def test_policy_never_creates_a_sqlite_file(sqlite_gw: Path, tmp_path: Path) -> None:
    """A typo in the path used to give an empty database and ``(none)``."""
    config = tmp_path / "gateway.toml"
    text = (sqlite_gw / "gateway.toml").read_text("utf-8")
    config.write_text(text.replace('url = "sqlite:///gateway.db"',
                                   f'url = "sqlite:///{sqlite_gw / "gatewy.db"}"'), "utf-8")
    for prog, args in (("mssante-policy", ("domain", "list")),
                       ("mssante-policy", ("patient", "show", INAYA)),
                       ("mssante-gateway", ("queue", "list"))):
        r = cli(prog, "--config", str(config), *args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        line = one_line_error(r, prog)
        assert f"SQLite file {sqlite_gw / 'gatewy.db'} does not exist" in line
        assert r.stdout == ""
    assert not (sqlite_gw / "gatewy.db").exists()
    assert sorted(p.name for p in sqlite_gw.iterdir()) == ["certs", "gateway.db", "gateway.toml"]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t + "\n[bogus]\n", "unknown section [bogus]"),
        (lambda t: t.replace("[smtp]\n", "[smtp]\nlisen = 1\n"), "unknown key smtp.lisen"),
        (lambda t: t.replace('url = "sqlite:///gateway.db"', 'url = "mysql://x/y"'),
         "unsupported database 'mysql'"),
        (lambda t: t.replace('url = "sqlite:///gateway.db"', 'url = "sqlite:///nodir/g.db"'),
         "nodir"),
        (lambda t: t.replace("[tls]\ncert", "[tls]\n#cert"), "tls.cert, tls.key and tls.client_ca"),
        (lambda t: t.replace("[smtp]", "[smtp"), "invalid TOML"),
        (lambda t: t.replace("trash_days = 30", "trash_days = 0"), "web.trash_days"),
        (lambda t: t + '\n[templates]\ndir = "no-such-templates"\n', "templates.dir"),
    ],
    ids=["section", "key", "database", "sqlite-dir", "partial-tls", "toml", "value",
         "templates"],
)
def test_every_configuration_error_exits_2(sqlite_gw: Path, tmp_path: Path, edit, message: str  # type: ignore[no-untyped-def]
                                           ) -> None:
    config = tmp_path / "gateway.toml"
    text = (sqlite_gw / "gateway.toml").read_text("utf-8")
    text = text.replace('"certs/', f'"{sqlite_gw}/certs/')
    changed = edit(text)
    assert changed != text
    config.write_text(changed, "utf-8")
    for prog, args in (("mssante-policy", ("domain", "list")),
                       ("mssante-gateway", ("serve",)),
                       ("mssante-gateway", ("queue", "list"))):
        r = cli(prog, "--config", str(config), *args, cwd=tmp_path)
        assert r.returncode == 2, (prog, args, r.stderr)
        assert message in one_line_error(r, prog)


def test_serve_refuses_a_missing_dkim_key(sqlite_gw: Path, tmp_path: Path) -> None:
    """A key named but missing used to send the notifications unsigned without a word."""
    config = tmp_path / "gateway.toml"
    text = (sqlite_gw / "gateway.toml").read_text("utf-8")
    text = text.replace('"certs/', f'"{sqlite_gw}/certs/').replace(
        'url = "sqlite:///gateway.db"', f'url = "sqlite:///{sqlite_gw / "gateway.db"}"')
    for name in ("smtp", "submission", "submissions", "imap", "imaps", "web"):
        text = text.replace(f"[{name}]\nlisten = ", f"[{name}]\nlisten = \"\"\n#")
    config.write_text(text.replace("certs/dkim.key", "certs/no-dkim.key"), "utf-8")
    r = cli("mssante-gateway", "--config", str(config), "serve")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]  # after serve's first log lines
    assert last.startswith("mssante-gateway: error: configuration: notifier.dkim_key: "
                           "cannot read"), r.stderr


def test_missing_config_file_exits_2(tmp_path: Path) -> None:
    for prog, args in (("mssante-policy", ("domain", "list")), ("mssante-gateway", ("serve",))):
        r = cli(prog, *args, cwd=tmp_path)
        assert r.returncode == 2 and "gateway.toml not found" in one_line_error(r, prog)


def test_admin_commands_need_no_tls_keys(sqlite_gw: Path, tmp_path: Path) -> None:
    """An admin host may have the database URL and no certificates; serve still needs them."""
    text = (sqlite_gw / "gateway.toml").read_text("utf-8")
    start = text.index("[tls]\n")
    end = text.index("\n\n", start)
    config = tmp_path / "admin.toml"
    db = sqlite_gw / "gateway.db"
    config.write_text((text[:start] + text[end + 2:]).replace(
        'url = "sqlite:///gateway.db"', f'url = "sqlite:///{db}"'), "utf-8")
    assert "[tls]" not in config.read_text("utf-8")
    r = cli("mssante-policy", "--config", str(config), "--json", "domain", "list")
    assert r.returncode == 0, r.stderr
    r = cli("mssante-policy", "--config", str(config), "domain", "add", "tls-less.mssante.fr")
    assert r.returncode == 0, r.stderr
    r = cli("mssante-policy", "--config", str(config), "--json", "audit", "verify")
    assert r.returncode == 0 and r.stdout and json.loads(r.stdout)["ok"] is True
    r = cli("mssante-gateway", "--config", str(config), "serve")
    assert r.returncode == 2
    assert "tls.cert, tls.key and tls.client_ca are required" in one_line_error(
        r, "mssante-gateway")
    r = cli("mssante-gateway", "--config", str(config), "certs", "operator", "x.mssante.fr",
            "--out", str(tmp_path / "op"))
    assert r.returncode == 2 and not (tmp_path / "op").exists()


def test_init_with_postgresql_url_leaves_no_sqlite_file(tmp_path: Path) -> None:
    if not _pg_reachable():
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL unreachable at {PG_URL} under CI")
        pytest.skip(f"PostgreSQL unreachable at {PG_URL}")
    schema = "t_init_" + os.urandom(4).hex()
    url = f"{PG_URL}?schema={schema}"
    directory = tmp_path / "gw"
    try:
        r = cli("mssante-gateway", "--json", "init", "--dir", str(directory), "--storage-url",
                url)
        assert r.returncode == 0, r.stderr
        assert "PostgreSQL database" in json.loads(r.stdout)["database"]
        assert sorted(p.name for p in directory.iterdir()) == ["certs", "gateway.toml"]
        assert f'url = "{url}"' in (directory / "gateway.toml").read_text("utf-8")
        config = directory / "gateway.toml"
        r = cli("mssante-policy", "--config", str(config), "--json", "domain", "list")
        assert r.returncode == 0 and json.loads(r.stdout) == []
    finally:
        import asyncio

        from tests.conftest import _pg_exec
        asyncio.run(_pg_exec(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))


def test_postgresql_failures_are_named(tmp_path: Path) -> None:
    if not _pg_reachable():
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL unreachable at {PG_URL} under CI")
        pytest.skip(f"PostgreSQL unreachable at {PG_URL}")
    base = PG_URL.rsplit("/", 1)[0]
    missing = f"{base}/no_such_db_{os.urandom(3).hex()}"
    r = cli("mssante-gateway", "init", "--dir", str(tmp_path / "a"), "--storage-url", missing)
    line = one_line_error(r, "mssante-gateway")
    assert r.returncode == 2 and "does not exist" in line and missing.rsplit("/", 1)[1] in line
    assert not (tmp_path / "a").exists()  # nothing written
    # An unreachable server: a closed port, named with its address (exit 1: not the file's
    # fault, the server may come back).
    from tests.gateway_proc import free_port
    port = free_port()
    r = cli("mssante-gateway", "init", "--dir", str(tmp_path / "b"), "--storage-url",
            f"postgresql://postgres@127.0.0.1:{port}/test")
    line = one_line_error(r, "mssante-gateway")
    assert r.returncode == 1 and f"127.0.0.1:{port}" in line and "cannot reach" in line
    # The same through mssante-policy with a written configuration.
    assert cli("mssante-gateway", "init", "--dir", str(tmp_path / "c")).returncode == 0
    config = tmp_path / "c" / "gateway.toml"
    config.write_text(config.read_text("utf-8").replace(
        'url = "sqlite:///gateway.db"', f'url = "{missing}"'), "utf-8")
    r = cli("mssante-policy", "--config", str(config), "domain", "list")
    assert r.returncode == 2 and "does not exist" in one_line_error(r, "mssante-policy")


def test_init_refuses_a_bad_storage_url(tmp_path: Path) -> None:
    r = cli("mssante-gateway", "init", "--dir", str(tmp_path / "gw"), "--storage-url", "nope")
    assert r.returncode == 2 and "not a database URL" in one_line_error(r, "mssante-gateway")
    assert not (tmp_path / "gw").exists()


def test_rpps_checked_and_unique_notify_email_not_a_patient_address(
    sqlite_gw: Path,
) -> None:
    config = sqlite_gw / "gateway.toml"
    assert cli("mssante-policy", "domain", "add", "medecin.mssante.fr", config=config
               ).returncode in (0, 1)
    r = cli("mssante-policy", "professional", "add", "a.rpps@medecin.mssante.fr", "--name",
            "A", "--rpps", "10001234567", config=config)  # the old demo number: bad Luhn digit
    assert r.returncode == 1 and "Luhn" in one_line_error(r, "mssante-policy")
    r = cli("mssante-policy", "--json", "professional", "add", "a.rpps@medecin.mssante.fr",
            "--name", "A", "--rpps", "10001234565", config=config)
    assert r.returncode == 0 and json.loads(r.stdout)["rpps"] == "10001234565"
    r = cli("mssante-policy", "professional", "add", "b.rpps@medecin.mssante.fr", "--name",
            "B", "--rpps", "10001234565", config=config)
    assert r.returncode == 1
    assert "RPPS 10001234565 is already the number of a.rpps@medecin.mssante.fr" in \
        one_line_error(r, "mssante-policy")
    r = cli("mssante-policy", "patient", "add", INAYA, "--name", "Inaya", "--notify-email",
            "Someone@Patient.MSSante.fr", config=config)
    assert r.returncode == 1 and "--notify-email" in one_line_error(r, "mssante-policy")
    r = cli("mssante-policy", "patient", "show", INAYA, config=config)
    assert r.returncode == 1 and "not found" in r.stderr  # nothing was created


def test_audit_verify_json_has_the_documented_fields(sqlite_gw: Path) -> None:
    r = cli("mssante-policy", "--json", "audit", "verify", config=sqlite_gw / "gateway.toml")
    assert r.returncode == 0
    assert set(json.loads(r.stdout)) == {"ok", "rows", "first_broken_row", "reason"}


def test_one_rpps_one_professional_even_at_once(gw_dir: Path) -> None:
    """Four admins adding four addresses with one RPPS at the same moment: one wins."""
    config = gw_dir / "gateway.toml"
    assert cli("mssante-policy", "domain", "add", "medecin.mssante.fr",
               config=config).returncode == 0
    env = {**os.environ, "MSSANTE_CONFIG": str(config)}
    procs = [subprocess.Popen([str(BIN / "mssante-policy"), "professional", "add",
                               f"dr{i}@medecin.mssante.fr", "--name", f"Dr {i}", "--rpps",
                               "10001234565"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(4)]
    results = [(p.wait(timeout=120), p.stderr.read() if p.stderr else "") for p in procs]
    for p in procs:
        for stream in (p.stdout, p.stderr):
            if stream is not None:
                stream.close()
    assert sorted(code for code, _ in results) == [0, 1, 1, 1], results
    assert all("is already the number of" in err for code, err in results if code == 1)
    listed = json.loads(cli("mssante-policy", "--json", "professional", "list",
                            config=config).stdout)
    assert [p["rpps"] for p in listed] == ["10001234565"]


def test_one_rpps_one_professional_concurrent_transactions(gw_dir: Path) -> None:
    """The same through one store, ten transactions interleaved on the event loop."""
    import asyncio

    from gateway.config import load_config
    from imap_store.store.directory import Conflict, Store

    async def scenario() -> list[object]:
        store = Store.from_url(load_config(gw_dir / "gateway.toml").storage_url)
        try:
            await store.add_domains("test", ["medecin.mssante.fr"], "test")
            return await asyncio.gather(*(
                store.add_professional("test", f"dr{i}@medecin.mssante.fr", f"Dr {i}",
                                       "10001234565", None) for i in range(10)),
                return_exceptions=True)
        finally:
            await store.close()

    results = asyncio.run(scenario())
    assert sum(not isinstance(r, BaseException) for r in results) == 1, results
    assert all(isinstance(r, Conflict) for r in results if isinstance(r, BaseException))
