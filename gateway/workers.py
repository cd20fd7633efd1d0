"""``[server] workers``: ``serve`` on every core (issue 14).

With one worker (``workers = 1``) ``serve`` is one process with one event loop, as it always
was. With N > 1 the process that was started becomes a supervisor with no event loop of its
own; it

- applies the migrations once, then forks N workers (never from inside a running loop: each
  child starts its own with ``asyncio.run``). Each worker runs the whole of ``serve`` — its
  listeners, group writer, queue worker, IMAP service and portal — and binds every listener
  with ``SO_REUSEPORT``, so the kernel spreads new connections over the workers;
- waits until every worker says it listens (one byte on a pipe), then prints the one
  ``mssante-gateway ready`` banner; a worker that exits before that stops the start (the
  supervisor exits with its code, its error line already printed);
- restarts a worker that dies (logged with its pid and exit status), unless workers keep
  dying within :data:`QUICK_DEATH` seconds of their start :data:`QUICK_DEATHS` times in a row:
  then it stops them all and exits 1;
- on SIGTERM or SIGINT sends SIGTERM to every worker (each drains as a single ``serve``
  does) and exits 0 once they have; a second signal kills them (SIGKILL) and exits 1 at once.

What the workers share lives in the database: the outbound queue's leases, the login
throttle's counts, UIDs and MODSEQs, the ``\\Recent`` claims; IMAP sessions of different
workers wake each other with the change signals (``imap_store/store/signals.py``). Limits
that a process holds (``[limits] connections_per_ip``, ``data_in_flight``) hold per worker.

``[metrics] listen`` is served by one more child, the *ops* process: each worker answers
``/metrics`` and ``/readyz`` on a Unix socket of a private runtime directory, and the ops
process adds their metrics up (``gateway.metrics.merge_expositions``) and is ready when every
worker is.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import select
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gateway.config import Config
from gateway.logsetup import setup_logging

log = logging.getLogger(__name__)

#: A worker that dies within this many seconds of its start counts as a quick death.
QUICK_DEATH = 2.0
#: Quick deaths in a row after which the supervisor gives up.
QUICK_DEATHS = 5
#: Seconds the supervisor waits for every worker to listen.
START_TIMEOUT = 120.0
#: Exit code of a worker whose start failed for a reason it did not name.
EXIT_WORKER_FAILED = 70
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
#: prctl(2): the signal a process gets when its parent dies.
PR_SET_PDEATHSIG = 1


def worker_count(setting: int) -> int:
    """``[server] workers``: the number set, or (0) one per core this process may use."""
    if setting > 0:
        return setting
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class WorkerRole:
    """What ``serve`` is told when it runs as one worker of several."""

    index: int
    count: int
    #: Written one byte once every listener is bound.
    ready_fd: int
    #: Where this worker answers ``/metrics`` and ``/readyz`` for the ops process.
    ops_socket: Path | None


def ops_socket(runtime: Path, index: int) -> Path:
    return runtime / f"worker-{index}.sock"


@dataclass
class _Child:
    kind: str  # "worker" or "ops"
    index: int
    pid: int
    started: float
    ready_read: int | None = None  # the supervisor's end of the ready pipe (workers)


def _die_with_parent(parent: int) -> None:
    """A worker whose supervisor is gone (even killed with SIGKILL) gets SIGTERM and drains:
    no worker outlives it (Linux ``PR_SET_PDEATHSIG``)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: nothing to ask for
        return
    if os.getppid() != parent:  # it died before the request was made
        os.kill(os.getpid(), signal.SIGTERM)


def _exit_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"exited {os.waitstatus_to_exitcode(status)}"


class Supervisor:
    def __init__(self, config: Config, count: int,
                 run_worker: Callable[[WorkerRole], int],
                 run_ops: Callable[[Path, int], int]) -> None:
        self.config = config
        self.count = count
        self.run_worker = run_worker
        self.run_ops = run_ops
        self.runtime = Path(tempfile.mkdtemp(prefix="mssante-workers-"))  # mode 0700
        self.children: dict[int, _Child] = {}
        self.stopping = False
        self.quick_deaths = 0
        self._wake_r, self._wake_w = os.pipe()
        self.pid = os.getpid()

    # --- children ---------------------------------------------------------------------

    def _fork(self, kind: str, index: int) -> _Child:
        ready_r = ready_w = -1
        if kind == "worker":
            ready_r, ready_w = os.pipe()
        # Stop signals stay blocked in the child until its event loop handles them: a SIGTERM
        # during its start then waits for the loop instead of killing it mid-way.
        signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            pid = os.fork()
        except OSError:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
            raise
        if pid == 0:  # the child: never returns
            code = EXIT_WORKER_FAILED
            try:
                _die_with_parent(self.pid)
                for sig in (*_STOP_SIGNALS, signal.SIGCHLD):
                    signal.signal(sig, signal.SIG_DFL)
                signal.set_wakeup_fd(-1)
                os.close(self._wake_r)
                os.close(self._wake_w)
                for other in self.children.values():
                    if other.ready_read is not None:
                        os.close(other.ready_read)
                if kind == "worker":
                    os.close(ready_r)
                    code = self.run_worker(WorkerRole(
                        index, self.count, ready_w,
                        ops_socket(self.runtime, index)
                        if self.config.metrics.listen is not None else None))
                else:
                    code = self.run_ops(self.runtime, self.count)
            except SystemExit as exc:  # the CLI's error line is printed already
                code = exc.code if isinstance(exc.code, int) else EXIT_WORKER_FAILED
            except BaseException:
                log.exception("%s %d failed", kind, index)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
        if kind == "worker":
            os.close(ready_w)
        child = _Child(kind, index, pid, time.monotonic(), ready_r if kind == "worker" else None)
        self.children[pid] = child
        log.info("%s %d started, pid %d", kind, index, pid)
        return child

    def _signal_all(self, sig: int) -> None:
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def _reap(self) -> list[tuple[_Child, int]]:
        dead = []
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            child = self.children.pop(pid, None)
            if child is not None:
                if child.ready_read is not None:
                    os.close(child.ready_read)
                    child.ready_read = None
                dead.append((child, status))
        return dead

    # --- signals --------------------------------------------------------------------------

    def _on_signal(self, signum: int, _frame: object) -> None:
        if signum in _STOP_SIGNALS:
            if self.stopping:  # the second one
                log.warning("second signal: killing the workers")
                self._signal_all(signal.SIGKILL)
                os._exit(1)
            self.stopping = True

    def _install_signals(self) -> None:
        os.set_blocking(self._wake_w, False)
        signal.set_wakeup_fd(self._wake_w)
        for sig in (*_STOP_SIGNALS, signal.SIGCHLD):
            signal.signal(sig, self._on_signal)

    def _wait(self, fds: list[int], timeout: float | None) -> list[int]:
        try:
            ready, _, _ = select.select([self._wake_r, *fds], [], [], timeout)
        except InterruptedError:
            return []
        if self._wake_r in ready:
            with contextlib.suppress(BlockingIOError):
                os.read(self._wake_r, 512)
        return [fd for fd in ready if fd != self._wake_r]

    # --- the supervisor's life --------------------------------------------------------------

    def run(self) -> int:
        setup_logging(self.config.logging.format, self.config.logging.level)
        os.set_blocking(self._wake_r, False)
        self._install_signals()
        try:
            return self._run()
        finally:
            shutil.rmtree(self.runtime, ignore_errors=True)

    def _run(self) -> int:
        for index in range(self.count):
            self._fork("worker", index)
        code = self._await_ready()
        if code is not None:
            return code
        if self.config.metrics.listen is not None:
            self._fork("ops", 0)
        listening = " ".join(
            f"{n}={lst}" for n, lst in (
                ("smtp", self.config.smtp), ("submission", self.config.submission),
                ("submissions", self.config.submissions), ("imap", self.config.imap),
                ("imaps", self.config.imaps), ("web", self.config.web.listen),
                ("metrics", self.config.metrics.listen))
            if lst is not None)
        log.info("ready %s workers=%d", listening, self.count)
        if self.config.logging.format != "json":
            print(f"mssante-gateway ready: {listening} workers={self.count}", file=sys.stderr,
                  flush=True)
        while not self.stopping:
            self._wait([], None)
            for child, status in self._reap():
                if self.stopping:
                    break
                log.error("%s %d (pid %d) %s: restarting it", child.kind, child.index,
                          child.pid, _exit_status(status))
                if time.monotonic() - child.started < QUICK_DEATH:
                    self.quick_deaths += 1
                    if self.quick_deaths >= QUICK_DEATHS:
                        log.error("workers die as they start (%d times in a row): stopping",
                                  self.quick_deaths)
                        self._stop()
                        return 1
                    time.sleep(0.2 * self.quick_deaths)  # do not spin
                else:
                    self.quick_deaths = 0
                self._fork(child.kind, child.index)
        self._stop()
        log.info("stopped")
        return 0

    def _await_ready(self) -> int | None:
        """None once every worker listens; else the exit code to leave with."""
        waiting = {c.ready_read: c for c in self.children.values() if c.ready_read is not None}
        deadline = time.monotonic() + START_TIMEOUT
        while waiting:
            if self.stopping:
                self._stop()
                return 0
            left = deadline - time.monotonic()
            if left <= 0:
                log.error("workers did not start within %.0f s", START_TIMEOUT)
                self._stop()
                return 1
            for fd in self._wait(list(waiting), left):
                if os.read(fd, 1):  # readable: its byte, or EOF if it died (reaped below)
                    waiting.pop(fd)
            for child, status in self._reap():
                log.error("%s %d (pid %d) %s before it was ready", child.kind, child.index,
                          child.pid, _exit_status(status))
                self._stop()
                if os.WIFSIGNALED(status):
                    return 1
                return os.waitstatus_to_exitcode(status) or 1
        return None

    def _stop(self) -> None:
        """SIGTERM to every child and wait for all (a second signal kills them)."""
        self.stopping = True
        self._signal_all(signal.SIGTERM)
        while self.children:
            for child, status in self._reap():
                log.info("%s %d (pid %d) %s", child.kind, child.index, child.pid,
                         _exit_status(status))
            if self.children:
                self._wait([], 0.5)


def supervise(config: Config, count: int, run_worker: Callable[[WorkerRole], int],
              run_ops: Callable[[Path, int], int]) -> int:
    """Run ``count`` workers (see the module's text); call from outside any event loop."""
    assert count > 1
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise RuntimeError("supervise() forks: call it outside a running event loop")
    return Supervisor(config, count, run_worker, run_ops).run()
