"""``[server] workers`` (issue 14, ``gateway/workers.py``): ``serve`` as a supervisor of
several worker processes sharing the listeners, on SQLite and PostgreSQL, driven from outside
with smtplib, imaplib and plain HTTP as an operator would."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import CHRISTELLE, INAYA, prepare_gateway
from tests.gateway_proc import Gateway, free_port
from tests.helpers import imap_login, smtp

ADDRESS = f"{INAYA}@patient.mssante.fr"


def children(pid: int) -> set[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return {int(p) for p in path.read_text().split()} if path.exists() else set()


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def connections_per_process(pids: set[int], port: int) -> dict[int, int]:
    """How many established TCP connections to ``port`` each process holds (/proc/net/tcp)."""
    local = f"{port:04X}"
    by_inode: set[int] = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1].endswith(":" + local) and fields[3] == "01":  # ESTABLISHED
            by_inode.add(int(fields[9]))
    return {pid: len(_socket_inodes(pid) & by_inode) for pid in pids}


@pytest.fixture
def workers(gw_dir: Path) -> Iterator[Gateway]:
    gw = prepare_gateway(gw_dir)
    assert isinstance(gw, Gateway)
    gw.workers = 2
    metrics = free_port()
    text = gw.config.read_text(encoding="utf-8")
    gw.config.write_text(text.replace('[metrics]\nlisten = ""', f'[metrics]\nlisten = '
                                      f'"127.0.0.1:{metrics}"', 1), encoding="utf-8")
    gw.ports["metrics"] = metrics
    gw.start(timeout=60)
    try:
        yield gw
    finally:
        if gw.proc is not None:
            for pid in children(gw.proc.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        gw.kill()


def worker_pids(gw: Gateway, count: int = 2) -> set[int]:
    assert gw.proc is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        pids = children(gw.proc.pid)
        if len(pids) >= count:
            return pids
        time.sleep(0.1)
    raise AssertionError(f"{count} workers expected, found {children(gw.proc.pid)}")


def http(gw: Gateway, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{gw.ports['metrics']}{path}",
                                    timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_workers_share_every_listener_and_the_mailboxes(workers: Gateway) -> None:
    gw = workers
    assert "workers=2" in gw.log()
    pids = worker_pids(gw, 3)  # the two workers and the ops process (it holds none)
    sessions = []
    try:
        for _ in range(16):
            session = imap_login(gw)
            session.select("INBOX")
            sessions.append(session)
        held = connections_per_process(pids, gw.ports["imaps"])
        assert sum(held.values()) == 16, held
        assert sum(1 for n in held.values() if n > 0) == 2, held  # both workers accept
        before = int(sessions[0].select("INBOX")[1][0])
        with smtp(gw, CHRISTELLE) as s:
            s.sendmail(CHRISTELLE, [ADDRESS], (
                f"From: {CHRISTELLE}\r\nTo: {ADDRESS}\r\nSubject: deux processus\r\n"
                "Message-ID: <workers@test>\r\n\r\nBonjour.\r\n").encode())
        for session in sessions:  # whichever worker holds it, the message is there
            typ, _data = session.noop()
            assert typ == "OK"
            assert session.select("INBOX")[1][0] == str(before + 1).encode()
    finally:
        for session in sessions:
            session.logout()
    # the logins of both workers, added up by the ops process
    status, text = http(gw, "/metrics")
    assert status == 200
    logins = [line for line in text.splitlines()
              if line.startswith('mssante_logins_total{channel="imap",outcome="ok"}')]
    assert logins and float(logins[0].split()[-1]) == 16.0, logins
    status, text = http(gw, "/readyz")
    assert status == 200, text
    assert "worker 0: ready" in text and "worker 1: ready" in text


def test_a_killed_worker_is_restarted_and_the_gateway_keeps_serving(workers: Gateway) -> None:
    gw = workers
    assert gw.proc is not None
    before = worker_pids(gw, 3)  # two workers and the ops process
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        now = children(gw.proc.pid)
        if victim not in now and len(now) == len(before):
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"not restarted: {children(gw.proc.pid)}")
    assert "killed by signal 9: restarting it" in gw.log()
    # give the new one time to listen, then every connection is served
    time.sleep(2)
    for _ in range(12):
        with smtp(gw, CHRISTELLE) as s:
            assert s.noop()[0] == 250
    assert gw.proc.poll() is None


def test_sigterm_drains_every_worker_and_exits_0(workers: Gateway) -> None:
    gw = workers
    assert gw.proc is not None
    pids = worker_pids(gw, 3)
    code = gw.stop(signal.SIGTERM, timeout=60)
    assert code == 0
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or \
            Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"


def test_a_second_sigterm_exits_at_once(workers: Gateway) -> None:
    gw = workers
    assert gw.proc is not None
    pids = worker_pids(gw, 3)
    # a DATA in progress keeps the workers draining (up to their 30 s grace period)
    with smtp(gw, CHRISTELLE) as s:
        s.mail(CHRISTELLE)
        s.rcpt(ADDRESS)
        s.putcmd("DATA")
        assert s.getreply()[0] == 354
        s.send(b"Subject: pas fini\r\n\r\nen cours")
        time.sleep(0.3)
        gw.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert gw.proc.poll() is None  # draining
        started = time.monotonic()
        gw.proc.send_signal(signal.SIGTERM)
        code = gw.proc.wait(timeout=10)
        assert time.monotonic() - started < 5
        assert code == 1
    time.sleep(0.5)
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or \
            Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    gw.proc = None
    gw._log_file.close()


def test_a_port_in_use_stops_the_start_with_its_reason(gw_dir: Path) -> None:
    gw = prepare_gateway(gw_dir)
    assert isinstance(gw, Gateway)
    gw.workers = 2
    gw.set_workers()
    taken = socket.socket()
    taken.bind(("127.0.0.1", gw.ports["smtp"]))
    taken.listen()
    try:
        env = {**os.environ, "MSSANTE_CONFIG": str(gw.config)}
        result = subprocess.run([str(Path(sys.executable).parent / "mssante-gateway"),
                                 "serve"], env=env, capture_output=True, text=True, timeout=120)
    finally:
        taken.close()
    assert result.returncode != 0
    assert "cannot listen" in result.stderr and str(gw.ports["smtp"]) in result.stderr
    assert "mssante-gateway ready" not in result.stderr


def test_workers_do_not_outlive_a_killed_supervisor(workers: Gateway) -> None:
    gw = workers
    assert gw.proc is not None
    pids = worker_pids(gw, 3)
    gw.kill()  # SIGKILL: the supervisor cannot tell anyone
    deadline = time.monotonic() + 40
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = {p for p in pids if Path(f"/proc/{p}").exists()
                 and Path(f"/proc/{p}/stat").read_text().split()[2] != "Z"}
        time.sleep(0.2)
    assert not alive


@pytest.mark.parametrize(("value", "expected"), [(0, None), (1, 1), (3, 3)])
def test_the_workers_setting(tmp_path: Path, value: int, expected: int | None) -> None:
    from gateway.config import build_config
    from gateway.workers import worker_count

    config = build_config({"server": {"workers": value}, "storage": {"url": "sqlite:///x.db"}},
                          tmp_path / "gateway.toml")
    assert config.workers == value
    cores = len(os.sched_getaffinity(0))
    assert worker_count(config.workers) == (cores if expected is None else expected)


@pytest.mark.parametrize("value", [-1, "two", 1.5])
def test_a_bad_workers_setting_is_refused_by_name(tmp_path: Path, value: object) -> None:
    from gateway.config import ConfigError, build_config

    with pytest.raises(ConfigError, match=r"server\.workers"):
        build_config({"server": {"workers": value}, "storage": {"url": "sqlite:///x.db"}},
                          tmp_path / "gateway.toml")


def test_the_default_configuration_says_one_worker_per_core(tmp_path: Path) -> None:
    from gateway.config import load_config, render_default_config

    text = render_default_config(domain="sante.example.fr", hostname="mx.example.fr",
                                 storage_url="sqlite:///gateway.db")
    assert "workers = 0" in text and "one per core" in text
    path = tmp_path / "gateway.toml"
    path.write_text(text, encoding="utf-8")
    assert load_config(path).workers == 0


_QUICK_DEATHS = '''
import os, sys, time, tomllib
from pathlib import Path
from gateway.config import build_config, render_default_config
from gateway.workers import Supervisor

path = Path(sys.argv[1])
config = build_config(tomllib.loads(render_default_config(domain="mssante.test",
                                                          hostname="localhost")), path)

def worker(role):  # listens, then dies within a second, every time
    os.write(role.ready_fd, b"r")
    time.sleep(0.5)
    return 3

code = Supervisor(config, 2, worker, lambda runtime, n: 0).run()
print("supervisor exit", code, flush=True)
'''


def test_workers_that_die_as_they_start_stop_the_supervisor(tmp_path: Path) -> None:
    """A worker that dies within 2 s of its start is started again, but not forever: after 5
    such deaths in a row the supervisor stops and exits 1 (gateway/workers.py)."""
    script = tmp_path / "quick_deaths.py"
    script.write_text(_QUICK_DEATHS, encoding="utf-8")
    result = subprocess.run([sys.executable, str(script), str(tmp_path / "gateway.toml")],
                            capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).resolve().parent.parent)
    assert "supervisor exit 1" in result.stdout, (result.stdout, result.stderr)
    assert "exited 3: restarting it" in result.stderr
    assert "workers die as they start (5 times in a row): stopping" in result.stderr
