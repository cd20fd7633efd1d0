"""The typed config (SPEC §8): defaults from init, unknown keys and bad values refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import ConfigError, build_config, load_config, render_default_config


def test_default_config_loads(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(render_default_config(domain="mssante.test", hostname="h"), "utf-8")
    cfg = load_config(path)
    assert cfg.storage_url == f"sqlite:///{tmp_path / 'gateway.db'}"
    assert str(cfg.smtp) == "127.0.0.1:2525"
    assert str(cfg.submission) == "127.0.0.1:5870"
    assert str(cfg.submissions) == "127.0.0.1:4650"
    assert str(cfg.imap) == "127.0.0.1:1143"
    assert str(cfg.imaps) == "127.0.0.1:9930"
    assert cfg.tls.cert == tmp_path / "certs/server.pem"
    assert cfg.domains.patient == "patient.mssante.fr"
    assert cfg.system_sender == "ne-pas-repondre@mssante.test"
    assert cfg.notifier.relay is None
    with pytest.raises(AttributeError):
        cfg.hostname = "x"  # type: ignore[misc]


BASE = {
    "storage": {"url": "sqlite:///x.db"},
    "tls": {"cert": "a.pem", "key": "a.key", "client_ca": "ca.pem"},
}


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"bogus": {}}, "unknown section [bogus]"),
        ({"smtp": {"listen": "127.0.0.1:2525", "lisen": "x"}}, "unknown key smtp.lisen"),
        ({"smtp": {"listen": "nope"}}, "smtp.listen"),
        ({"smtp": {"listen": "127.0.0.1:70000"}}, "smtp.listen"),
        ({"smtp": {"listen": 25}}, "smtp.listen: expected str"),
        ({"storage": {}}, "storage.url: required"),
        ({"limits": {"login_failures": 0}}, "limits.login_failures"),
        ({"limits": {"login_failures": True}}, "limits.login_failures"),
        ({"tls": {"cert": "a.pem"}}, "tls.cert, tls.key and tls.client_ca are required"),
        ({"domains": {"patient": "not a domain"}}, "[domains]"),
        ({"outbound": {"routes": {"medecin.mssante.fr": "x"}}},
         "outbound.routes.medecin.mssante.fr"),
    ],
)
def test_bad_config_names_the_key(patch: dict[str, object], message: str) -> None:
    raw = {**BASE, **patch}
    with pytest.raises(ConfigError) as info:
        build_config(raw, Path("/etc/gw/gateway.toml"))
    assert message in str(info.value)


def test_empty_listen_turns_listener_off() -> None:
    cfg = build_config({**BASE, "imap": {"listen": ""}}, Path("/etc/gw/gateway.toml"))
    assert cfg.imap is None
    assert cfg.tls.client_ca == Path("/etc/gw/ca.pem")


def test_routes_parsed() -> None:
    cfg = build_config(
        {**BASE, "outbound": {"routes": {"Medecin.MSSante.fr": "127.0.0.1:2626"}}},
        Path("/etc/gw/gateway.toml"),
    )
    assert str(cfg.outbound.routes["medecin.mssante.fr"]) == "127.0.0.1:2626"


def test_missing_file_is_clear(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")


def test_invalid_toml_is_clear(tmp_path: Path) -> None:
    path = tmp_path / "g.toml"
    path.write_text("[storage\n", "utf-8")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(path)


def test_no_tls_keys_is_enough_for_admin_but_tls_refuses(tmp_path: Path) -> None:
    """The admin commands need only [storage]; whatever needs TLS asks for ``config.tls``."""
    cfg = build_config({"storage": {"url": "sqlite:///x.db"}}, tmp_path / "gateway.toml")
    assert cfg.tls_keys is None
    with pytest.raises(ConfigError, match=r"tls\.cert, tls\.key and tls\.client_ca are required"):
        cfg.tls  # noqa: B018


@pytest.mark.parametrize("url", ["postgresql://gw@db.example/gw?schema=s1",
                                 'sqlite:///odd "name\\with".db', "sqlite:///données.db"])
def test_init_config_keeps_the_storage_url(tmp_path: Path, url: str) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(render_default_config(domain="mssante.test", hostname="h", storage_url=url),
                    "utf-8")
    expected = url.replace("sqlite:///", f"sqlite:///{tmp_path}/")
    assert load_config(path).storage_url == expected
