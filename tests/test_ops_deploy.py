"""deploy/: the systemd unit passes ``systemd-analyze verify`` (and its security review), the
Dockerfile passes hadolint, and the container's HEALTHCHECK command, run as written, passes
against a ready gateway and fails against a stopped one."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import prepare_gateway, running
from tests.gateway_proc import Gateway, free_port, set_listen

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
UNIT = DEPLOY / "mssante-gateway.service"
DOCKERFILE = DEPLOY / "Dockerfile"
SHIPPED_EXEC = "/opt/mssante-gateway/bin/mssante-gateway"


def tool(name: str) -> str:
    """A tool's path; missing: skipped locally, a failure under CI (CI=true)."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed")
        pytest.skip(f"{name} is not installed")
    return found


def unit_here(tmp_path: Path) -> Path:
    """The shipped unit with ExecStart pointing at this checkout's entry point (verify checks
    that the program exists; everything else is the file as shipped)."""
    text = UNIT.read_text()
    assert text.count(f"ExecStart={SHIPPED_EXEC} ") == 1
    here = Path(sys.executable).parent / "mssante-gateway"
    assert here.exists()
    copy = tmp_path / UNIT.name
    copy.write_text(text.replace(f"ExecStart={SHIPPED_EXEC} ", f"ExecStart={here} "))
    return copy


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    analyze = tool("systemd-analyze")
    result = subprocess.run([analyze, "verify", str(unit_here(tmp_path))],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "" and result.stdout.strip() == ""
    # As shipped, the only complaint on this machine is the program not installed at /opt.
    shipped = subprocess.run([analyze, "verify", str(UNIT)], capture_output=True, text=True,
                             timeout=60)
    complaints = [line for line in shipped.stderr.splitlines() if line.strip()]
    assert complaints == [f"{UNIT.name}: Command {SHIPPED_EXEC} is not executable: "
                          "No such file or directory"], shipped.stderr


def test_systemd_unit_hardening(tmp_path: Path) -> None:
    text = UNIT.read_text()
    settings = dict(re.findall(r"(?m)^(\w+)=(.*)$", text))
    for key, value in {"ProtectSystem": "strict", "NoNewPrivileges": "yes",
                       "PrivateTmp": "yes", "ProtectHome": "yes",
                       "ReadWritePaths": "/var/lib/mssante-gateway",
                       "CapabilityBoundingSet": "CAP_NET_BIND_SERVICE",
                       "User": "mssante", "KillSignal": "SIGTERM"}.items():
        assert settings.get(key) == value, key
    assert int(settings["TimeoutStopSec"]) > 30  # the drain's grace period
    analyze = tool("systemd-analyze")
    # systemd rates the unit's exposure from 0 (locked down) to 10; "OK" is below 2.0.
    result = subprocess.run([analyze, "security", "--offline=yes", "--threshold=20",
                             str(unit_here(tmp_path))], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    level = re.search(r"Overall exposure level for \S+: (\d+\.\d)", result.stdout)
    assert level is not None and float(level.group(1)) < 2.0, result.stdout[-300:]


def test_dockerfile_lints_clean() -> None:
    result = subprocess.run([tool("hadolint"), "--no-color", str(DOCKERFILE)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    text = DOCKERFILE.read_text()
    stages = re.findall(r"(?m)^FROM (\S+)", text)
    assert stages and all(s.startswith("python:3.11-slim") for s in stages)
    assert re.findall(r"(?m)^USER (\S+)$", text) == ["10025:10025"]  # not root
    assert re.findall(r"(?m)^VOLUME (.*)$", text) == ['["/var/lib/mssante-gateway"]']
    assert "MSSANTE_READYZ=http://127.0.0.1:9464/readyz" in text


def healthcheck_argv() -> list[str]:
    """The HEALTHCHECK's CMD of deploy/Dockerfile, exec form, as Docker would run it."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    match = re.search(r"(?m)^HEALTHCHECK .*?CMD (\[.*\])\s*$", text)
    assert match is not None
    argv = json.loads(match.group(1))
    assert argv[0] == "python"
    return [sys.executable, *argv[1:]]


@pytest.fixture
def ready_gateway(gw_dir: Path) -> Iterator[Gateway]:
    gw: Gateway = prepare_gateway(gw_dir)  # type: ignore[assignment]
    gw.ports["metrics"] = free_port()
    set_listen(gw.config, "metrics", f"127.0.0.1:{gw.ports['metrics']}")
    yield from running(gw)  # type: ignore[misc]


def test_healthcheck_command_follows_readiness(ready_gateway: Gateway) -> None:
    gw = ready_gateway
    env = {**os.environ, "MSSANTE_READYZ": f"http://127.0.0.1:{gw.ports['metrics']}/readyz"}
    argv = healthcheck_argv()
    ok = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0, ok.stderr
    assert gw.stop() == 0
    down = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30)
    assert down.returncode != 0
    assert "Connection refused" in down.stderr
