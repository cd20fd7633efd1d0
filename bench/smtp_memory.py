"""Memory of the SMTP intake under large messages (SPEC §9, §10; ARCHITECTURE "never hold
the same 20 MB three times").

    .venv/bin/python bench/smtp_memory.py [--sessions 20] [--size-mb 20] [--db sqlite|postgresql]
        [--data-in-flight-mb 512] [--profile out.txt]

Starts a throw-away gateway like bench/smtp_intake.py, connects ``--sessions`` professionals
(STARTTLS, client certificates), warms each session up with one small message, then all of
them send one ``--size-mb`` MiB message at once (multipart/mixed, a base64 PDF attachment in
76-character lines). The RSS of the ``serve`` process is sampled from /proc every 10 ms; its
peak is VmHWM, reset (``/proc/PID/clear_refs``) just before the big messages are sent.
Every message must get ``250`` and be found in the store with its size.

``[limits] data_in_flight`` (the gateway's memory budget for DATA, default 256 MiB) is set to
``--data-in-flight-mb`` so that 20 x 20 MiB can all be in flight. With the default budget
(``--data-in-flight-mb 256``) the sessions grow together, exhaust it together, and at the time
of writing every one of them gets ``452 4.3.1``, although each declared its size (SIZE=).

Last line: ``peak_rss=<MiB> baseline_rss=<MiB> in_flight=<MiB> ratio=<(peak-baseline)/in_flight>``.
Target (issue): peak - baseline < 3 x data in flight.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import (
    BIN,
    GatewayDir,
    MiB,
    SmtpClient,
    attachment_message,
    base64_lines,
    bench_arguments,
    cleanup,
    client_context,
    count_stored,
    cpu_seconds,
    make_gateway_dir,
    percentile,
    process_tree,
    rss_mib,
    set_key,
    start_gateway,
    text_message,
    tree_state,
)

TARGET_RATIO = 3.0


class RssSampler(threading.Thread):
    """Samples VmRSS of ``pid`` every ``interval`` seconds until stopped."""

    def __init__(self, pid: int, interval: float = 0.01) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.interval = interval
        self.samples: list[tuple[float, float]] = []  # (monotonic time, RSS MiB)
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                rss, _hwm = rss_mib(self.pid)
            except OSError:
                return
            self.samples.append((time.monotonic(), rss))
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def reset_peak(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs)."""
    try:
        for member in process_tree(pid):  # the supervisor and its workers
            Path(f"/proc/{member}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@dataclass
class MemoryRun:
    baseline: float  # MiB, VmRSS after the warm-up, before the large messages
    hwm: float | None  # MiB, VmHWM since the reset (None: the reset was not possible)
    samples: list[tuple[float, float]]  # (monotonic time, VmRSS MiB)
    replies: list[tuple[int, bytes]]
    wall: float
    cpu: float  # serve's CPU seconds during the run
    latencies: list[float]
    rss_end: float
    sizes: list[int]  # bytes of each large message


async def run(gw_port: int, pid: int, gw: GatewayDir, sessions: int, size: int) -> MemoryRun:
    ca = gw.certs / "ca.pem"
    attachment = base64_lines(size + 64 * 1024)
    clients: list[SmtpClient] = []
    jobs = []
    for i in range(sessions):
        pro = gw.professionals[i % len(gw.professionals)]
        rcpt = gw.patient_address(i)
        jobs.append((pro, rcpt, attachment_message(pro.address, rcpt, size, i, attachment)))
    del attachment
    try:
        for pro, _rcpt, _data in jobs:
            clients.append(await SmtpClient.connect(
                "127.0.0.1", gw_port, client_context(ca, pro.cert, pro.key)))
        # Warm-up: one small message per session (pools, parsers, first-use allocations).
        warm = await asyncio.gather(*(
            c.send(pro.address, [rcpt], text_message(pro.address, rcpt, 4096, 900_000 + i))
            for i, (c, (pro, rcpt, _)) in enumerate(zip(clients, jobs, strict=True))))
        if any(code != 250 for code, _ in warm):
            raise RuntimeError(f"warm-up refused: {warm}")
        await asyncio.sleep(0.5)
        baseline, _ = rss_mib(pid)
        peak_reset = reset_peak(pid)
        sampler = RssSampler(pid)
        sampler.start()
        cpu0 = sum(cpu_seconds(pid))
        t0 = time.perf_counter()
        latencies: list[float] = []

        async def one(client: SmtpClient, sender: str, rcpt: str,
                      data: bytes) -> tuple[int, bytes]:
            start = time.perf_counter()
            reply = await client.send(sender, [rcpt], data)
            latencies.append(time.perf_counter() - start)
            return reply

        replies = await asyncio.gather(*(
            one(c, pro.address, rcpt, data)
            for c, (pro, rcpt, data) in zip(clients, jobs, strict=True)))
        wall = time.perf_counter() - t0
        cpu = sum(cpu_seconds(pid)) - cpu0
        await asyncio.sleep(0.2)
        sampler.stop()
        rss_end, hwm = rss_mib(pid)
    finally:
        for c in clients:
            await c.quit()
    return MemoryRun(baseline=baseline, hwm=hwm if peak_reset else None,
                     samples=sampler.samples, replies=list(replies), wall=wall, cpu=cpu,
                     latencies=latencies, rss_end=rss_end, sizes=[len(d) for _p, _r, d in jobs])


def main(argv: list[str] | None = None) -> int:
    parser = bench_arguments(__doc__, workers=True)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--size-mb", type=float, default=20.0, help="MiB per message")
    parser.add_argument("--data-in-flight-mb", type=int, default=512,
                        help="[limits] data_in_flight for this run, MiB (gateway default 256)")
    parser.add_argument("--profile", type=Path,
                        help="py-spy record serve during the run (.svg, .json, else raw)")
    parser.add_argument("--serve-env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment for serve, e.g. MALLOC_ARENA_MAX=2")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)
    size = int(args.size_mb * MiB)

    base = Path(tempfile.mkdtemp(prefix="bench-smtp-memory-"))
    gw = None
    try:
        gw = make_gateway_dir(base, args.db, args.sessions, min(args.sessions, 10),
                              limits={"data_in_flight": args.data_in_flight_mb * MiB})
        if args.workers is not None:
            set_key(gw.config, "server", "workers", str(args.workers))
        env = dict(kv.split("=", 1) for kv in args.serve_env)
        server = start_gateway(gw, env=env)
        print(f"tree: {tree_state()}", flush=True)
        print(f"setup: {args.db} sessions={args.sessions} message={size / MiB:.1f}MiB "
              f"data_in_flight={args.data_in_flight_mb}MiB serve pid={server.pid}"
              + (f" env={' '.join(args.serve_env)}" if args.serve_env else ""), flush=True)
        profiler = None
        if args.profile:
            fmt = {".svg": "flamegraph", ".json": "speedscope"}.get(args.profile.suffix, "raw")
            profiler = subprocess.Popen(
                [str(BIN / "py-spy"), "record", "-p", str(server.pid), "-o", str(args.profile),
                 "--format", fmt, "--rate", "100", "--nonblocking"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            result = asyncio.run(run(gw.smtp_port, server.pid, gw, args.sessions, size))
        finally:
            if profiler is not None:
                profiler.send_signal(2)
                profiler.wait(timeout=60)
            code = server.stop()
        if code != 0:
            print(f"warning: serve exited {code} after SIGTERM", flush=True)

        accepted = sum(1 for c, _ in result.replies if c == 250)
        refused = [t.decode(errors="replace").strip() for c, t in result.replies if c != 250]
        samples = result.samples
        sampled_peak = max((r for _t, r in samples), default=0.0)
        peak = max(sampled_peak, result.hwm or 0.0)
        baseline = result.baseline
        sizes = result.sizes
        in_flight = sum(sizes) / MiB
        wall = result.wall
        if samples:  # a coarse timeline: RSS at each tenth of the run
            start, end = samples[0][0], samples[-1][0]
            marks = []
            for k in range(11):
                at = start + (end - start) * k / 10
                marks.append(f"{next((r for t, r in samples if t >= at), samples[-1][1]):.0f}")
            print(f"rss timeline (MiB, every {(end - start) / 10:.1f}s): {' '.join(marks)}")
        hwm = "n/a" if result.hwm is None else f"{result.hwm:.0f}"
        print(f"run: accepted={accepted}/{len(result.replies)} wall={wall:.1f}s "
              f"({in_flight / wall:.1f} MiB/s) latency p50={percentile(result.latencies, 50):.1f}s"
              f" max={percentile(result.latencies, 100):.1f}s "
              f"serve_cpu={100 * result.cpu / wall:.0f}% rss_after={result.rss_end:.0f}MiB "
              f"peak: VmHWM={hwm} sampled={sampled_peak:.0f}", flush=True)
        if refused:
            print(f"refused: {refused}", flush=True)
        stored, stored_sizes = asyncio.run(count_stored(gw.storage_url))
        big = [s for s in stored_sizes if s > MiB]
        sizes_ok = sorted(big) and all(
            0 < s - sent < 2048 for s, sent in zip(sorted(big), sorted(sizes), strict=False))
        verdict = "match" if sizes_ok else ("n/a" if not big else "DIFFER")
        print(f"stored: {len(big)}/{accepted} large messages in the store "
              f"({stored} incl. warm-up), sizes {verdict}", flush=True)
        if args.profile:
            print(f"profile: {args.profile}", flush=True)
        growth = peak - baseline
        ratio = growth / in_flight if in_flight else float("nan")
        print(f"target: peak-baseline={growth:.0f}MiB < {TARGET_RATIO:.0f} x in_flight="
              f"{TARGET_RATIO * in_flight:.0f}MiB "
              f"{'met' if growth < TARGET_RATIO * in_flight else 'MISSED'}", flush=True)
        print(f"peak_rss={peak:.0f} baseline_rss={baseline:.0f} in_flight={in_flight:.0f} "
              f"ratio={ratio:.2f}", flush=True)
        ok = accepted == len(result.replies) and len(big) == accepted and bool(sizes_ok)
        return 0 if ok else 1
    finally:
        cleanup(base, gw.pg_schema if gw is not None else None, args.keep)


if __name__ == "__main__":
    sys.exit(main())
