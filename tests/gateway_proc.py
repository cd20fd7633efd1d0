"""Start the real ``mssante-gateway serve`` as a subprocess on free ports (test helper)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent
LISTENERS = ("smtp", "submission", "submissions", "imap", "imaps", "web")


def _subprocess_env(config: Path) -> dict[str, str]:
    """The environment of a gateway subprocess. Under ``PYTHONDONTWRITEBYTECODE`` each start
    compiled the project's modules again (about a tenth of a second): they are cached under
    a directory of the temporary area instead of next to the sources."""
    env = {**os.environ, "MSSANTE_CONFIG": str(config), "PYTHONUNBUFFERED": "1"}
    if env.pop("PYTHONDONTWRITEBYTECODE", None) and "PYTHONPYCACHEPREFIX" not in env:
        env["PYTHONPYCACHEPREFIX"] = str(Path(tempfile.gettempdir())
                                         / f"mssante-tests-pycache-{os.getuid()}")
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def set_listen(config: Path, name: str, value: str) -> None:
    text = config.read_text(encoding="utf-8")
    text, n = re.subn(rf'(?m)^(\[{name}\]\nlisten = )"[^"]*"', rf'\1"{value}"', text)
    assert n == 1, name
    config.write_text(text, encoding="utf-8")


def set_routes(config: Path, routes: dict[str, int]) -> None:
    """Route each domain of ``routes`` to that port on 127.0.0.1 ([outbound.routes])."""
    text = config.read_text(encoding="utf-8")
    lines = "".join(f'"{domain}" = "127.0.0.1:{port}"\n' for domain, port in routes.items())
    assert "[outbound.routes]\n" in text
    config.write_text(text.replace("[outbound.routes]\n", "[outbound.routes]\n" + lines, 1),
                      encoding="utf-8")


def run_cli(config: Path, *args: str, stdin: str = "", prog: str = "mssante-policy",
            check: bool = True) -> subprocess.CompletedProcess[str]:
    env = _subprocess_env(config)
    result = subprocess.run([str(BIN / prog), *args], env=env, input=stdin, text=True,
                            capture_output=True, timeout=120)
    if check:
        assert result.returncode == 0, (args, result.stdout, result.stderr)
    return result


@dataclass
class Gateway:
    directory: Path
    ports: dict[str, int] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    _log_file: Any = None
    #: ``[server] workers`` written into the configuration at each start: one process unless
    #: a test asks for more (tests/test_workers.py).
    workers: int = 1

    @property
    def config(self) -> Path:
        return self.directory / "gateway.toml"

    @property
    def ca(self) -> Path:
        return self.directory / "certs" / "ca.pem"

    def assign_ports(self) -> None:
        # Keep every probe socket open until all ports are chosen, so no two are the same.
        probes = []
        try:
            for name in LISTENERS:
                s = socket.socket()
                s.bind(("127.0.0.1", 0))
                probes.append(s)
                self.ports[name] = int(s.getsockname()[1])
        finally:
            for s in probes:
                s.close()
        for name in LISTENERS:
            set_listen(self.config, name, f"127.0.0.1:{self.ports[name]}")

    def set_workers(self) -> None:
        text = self.config.read_text(encoding="utf-8")
        line = f"workers = {self.workers}"
        text, n = re.subn(r"(?m)^workers = \d+", line, text, count=1)
        if n == 0:
            text = text.replace("[server]\n", f"[server]\n{line}\n", 1)
        self.config.write_text(text, encoding="utf-8")

    def start(self, timeout: float = 30.0) -> None:
        assert self.proc is None
        self.set_workers()
        self.log_path = self.directory / f"serve-{int(time.time() * 1000)}.log"
        self._log_file = log = self.log_path.open("wb")
        self.proc = subprocess.Popen([str(BIN / "mssante-gateway"), "serve"],
                                     env=_subprocess_env(self.config),
                                     stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited {self.proc.returncode}: {self.log()}")
            if b"mssante-gateway ready" in self.log_path.read_bytes():
                return
            time.sleep(0.01)
        raise RuntimeError(f"serve did not start: {self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout=timeout)
        self.proc = None
        self._log_file.close()
        return code

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=30)
            self.proc = None
            self._log_file.close()
