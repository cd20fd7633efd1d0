"""Run the fuzz harnesses: ``python -m fuzz.run [--seconds N | --minutes N] [--only NAME]``.

Each harness first replays its seed corpus (``fuzz/corpus/<harness>/``), then runs Hypothesis
(random and structure-aware inputs, mutations of the seeds, fragments repeated up to about
100 KB to expose superlinear work) for its share of the time. A finding is saved, input and
report, under ``--findings`` (default ``fuzz/findings/<harness>/``) and the exit status is 1.

``--engine atheris`` runs the same checks under atheris (coverage-guided libFuzzer; install it
with ``pip install atheris``), one process per harness. ``--replay FILE`` re-runs one saved
input (the harness is given by ``--only``).
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from fuzz.common import (
    Amplified,
    Finding,
    Harness,
    amplified,
    check_growth,
    check_input,
    control_of,
    load_amplified,
    save_finding,
)

HARNESSES = ("imap_parser", "smtp_data", "mime", "identities", "documents")
DEFAULT_FINDINGS = Path(__file__).resolve().parent / "findings"
#: Examples per Hypothesis run; runs repeat, with new seeds, until the time is up.
_BATCH = 200


class _TimeUp(BaseException):
    """Raised in a Hypothesis test when the time is up: a BaseException, so that Hypothesis
    lets it through at once instead of shrinking it as a failure."""


def load(name: str) -> Harness:
    module = importlib.import_module(f"fuzz.{name}")
    harness: Harness = module.HARNESS
    return harness


@dataclass
class Report:
    name: str
    executions: int = 0
    seconds: float = 0.0
    #: atheris only: libFuzzer's edge coverage and feature count at the end of the run.
    coverage: str = ""
    findings: list[Path] = field(default_factory=list)


# --------------------------------------------------------------------------- hypothesis


def run_hypothesis(harness: Harness, seconds: float, findings: Path, seed: int) -> Report:
    from hypothesis import HealthCheck, Phase, Verbosity, given, settings
    from hypothesis import seed as hypothesis_seed
    from hypothesis import strategies as st
    from hypothesis.errors import HypothesisException, HypothesisWarning

    warnings.simplefilter("ignore", HypothesisWarning)  # e.g. "overly large repr" of 100 KB

    report = Report(harness.name)
    started = time.monotonic()
    deadline = started + seconds
    # Shrinking a finding may go on a little after the deadline.
    hard_deadline = deadline + max(5.0, seconds / 5)
    smallest: dict[str, tuple[bytes, int, Finding, Amplified | None]] = {}

    def found(finding: Finding, payload: bytes, control: int, example: Amplified | None) -> None:
        if not smallest:  # keep the first one whatever happens next
            report.findings.append(save_finding(findings, harness.name, finding, payload,
                                                control, example))
        best = smallest.get(finding.kind)
        if best is None or len(payload) < len(best[0]):
            smallest[finding.kind] = (payload, control, finding, example)

    def one(payload: bytes, control: int, example: Amplified | None = None) -> None:
        report.executions += 1
        try:
            check_input(harness, payload, control)
            if example is not None:
                check_growth(harness, example, control)
        except Finding as finding:
            found(finding, payload, control, example)
            raise

    # 1. The seed corpus, as is, with a few controls.
    for payload in harness.seeds():
        for control in (0, 1, 2, 3, 7, 0x100 + 4):
            try:
                one(payload, control)
            except Finding:
                pass
    # 2. Hypothesis until the time is up.
    seeds = harness.seeds()
    plain = st.tuples(harness.payloads(seeds), st.integers(0, 2**32 - 1))
    amplify = st.tuples(amplified(harness), st.integers(0, 2**32 - 1))
    # One example in eight is amplified: they are big and slow, but find superlinear work.
    examples = st.integers(0, 7).flatmap(
        lambda pick: amplify.map(lambda t: (t[0].build(), t[1], t[0])) if pick == 0
        else plain.map(lambda t: (t[0], t[1], None)))
    run = 0
    while time.monotonic() < deadline and not smallest:

        @hypothesis_seed(seed * 1_000_003 + run)
        @settings(max_examples=_BATCH, deadline=None, database=None, derandomize=False,
                  phases=(Phase.generate, Phase.shrink), report_multiple_bugs=False,
                  suppress_health_check=list(HealthCheck), print_blob=False,
                  verbosity=Verbosity.quiet)  # findings are saved and summarised instead
        @given(examples)
        def test(example: tuple[bytes, int, Amplified | None]) -> None:
            if time.monotonic() > (hard_deadline if smallest else deadline):
                raise _TimeUp  # not an Exception: Hypothesis stops at once, no shrinking
            one(*example)

        run += 1
        try:
            test()
        except (Finding, _TimeUp):
            pass
        except HypothesisException:
            pass  # flaky: a timing finding did not replay (it is saved all the same)
    for kind, (payload, control, finding, example) in smallest.items():
        path = save_finding(findings, harness.name, finding, payload, control, example)
        if path not in report.findings:
            report.findings.append(path)
        print(f"  {harness.name}: {kind}: {finding.detail.splitlines()[-1][:200]}")
    report.seconds = time.monotonic() - started
    return report


# --------------------------------------------------------------------------- atheris


def run_atheris_child(name: str, seconds: float, findings: Path) -> None:  # pragma: no cover
    """In a child process: fuzz one harness with atheris (libFuzzer) until the time is up."""
    import atheris  # type: ignore[import-untyped, import-not-found, unused-ignore]

    with atheris.instrument_imports():
        harness = load(name)
    executions = 0

    def test_one_input(data: bytes) -> None:
        nonlocal executions
        executions += 1
        control = int.from_bytes(data[:4], "little") if len(data) >= 4 else 0
        payload = data[4:]
        try:
            check_input(harness, payload, control)
        except Finding as finding:
            path = save_finding(findings, name, finding, payload, control)
            print(f"FINDING {path}", flush=True)
            raise

    corpus = Path(tempfile.mkdtemp(prefix=f"fuzz-{name}-"))
    for index, seed in enumerate(harness.seeds()):
        (corpus / f"seed-{index}").write_bytes(b"\0\0\0\0" + seed)
    try:
        atheris.Setup([sys.argv[0], f"-max_total_time={max(int(seconds), 1)}",
                       "-print_final_stats=1", "-rss_limit_mb=4096", "-max_len=131072",
                       f"-artifact_prefix={findings / name}{os.sep}", str(corpus)],
                      test_one_input)
        (findings / name).mkdir(parents=True, exist_ok=True)
        atheris.Fuzz()
    finally:
        shutil.rmtree(corpus, ignore_errors=True)


def run_atheris(name: str, seconds: float, findings: Path) -> Report:
    started = time.monotonic()
    before = set((findings / name).glob("*.bin")) if (findings / name).is_dir() else set()
    proc = subprocess.run(  # noqa: S603 - this interpreter, this module, fixed arguments
        [sys.executable, "-m", "fuzz.run", "--engine", "atheris", "--only", name,
         "--seconds", str(seconds), "--findings", str(findings), "--atheris-child"],
        capture_output=True, text=True, errors="replace", check=False)
    report = Report(name, seconds=time.monotonic() - started)
    match = re.search(r"stat::number_of_executed_units:\s*(\d+)", proc.stderr)
    report.executions = int(match[1]) if match else 0
    progress = re.findall(r"\bcov: (\d+) ft: (\d+)", proc.stderr)
    if progress:
        report.coverage = f"cov {progress[-1][0]} ft {progress[-1][1]}"
    after = set((findings / name).glob("*.bin")) if (findings / name).is_dir() else set()
    report.findings = sorted(after - before)
    if proc.returncode != 0 and not report.findings:
        print(proc.stdout[-4000:], proc.stderr[-4000:], sep="\n")
        report.findings.append(Path(f"<atheris exited with {proc.returncode}>"))
    return report


# --------------------------------------------------------------------------- main


def replay(name: str, path: Path) -> int:
    harness = load(name)
    control = control_of(path)
    example = load_amplified(path)
    try:
        check_input(harness, path.read_bytes(), control)
        if example is not None:
            check_growth(harness, example, control)
    except Finding as finding:
        print(f"{name}: {finding.kind}\n{finding.detail}")
        return 1
    print(f"{name}: no finding for {path} (control {control})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fuzz.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--seconds", type=float, help="time per harness (default 20)")
    length.add_argument("--minutes", type=float, help="time per harness, in minutes")
    parser.add_argument("--only", action="append", choices=HARNESSES,
                        help="run only this harness (repeatable)")
    parser.add_argument("--engine", choices=("hypothesis", "atheris"), default="hypothesis")
    parser.add_argument("--findings", type=Path, default=DEFAULT_FINDINGS,
                        help="where findings are saved (default fuzz/findings/)")
    parser.add_argument("--seed", type=int, default=None,
                        help="Hypothesis seed (default: random, printed)")
    parser.add_argument("--replay", type=Path, help="re-run one saved input")
    parser.add_argument("--atheris-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    seconds = (args.minutes * 60 if args.minutes is not None
               else args.seconds if args.seconds is not None else 20.0)
    names = args.only or list(HARNESSES)
    if args.replay is not None:
        if len(names) != 1:
            parser.error("--replay needs one --only HARNESS")
        return replay(names[0], args.replay)
    if args.atheris_child:
        run_atheris_child(names[0], seconds, args.findings)
        return 0
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    print(f"fuzz: {', '.join(names)}; {seconds:g} s each; engine {args.engine}; seed {seed}",
          flush=True)
    reports: list[Report] = []
    for name in names:
        if args.engine == "atheris":
            report = run_atheris(name, seconds, args.findings)
        else:
            report = run_hypothesis(load(name), seconds, args.findings, seed)
        reports.append(report)
        rate = report.executions / report.seconds if report.seconds else 0.0
        status = f"{len(report.findings)} FINDING(S)" if report.findings else "ok"
        coverage = f"; {report.coverage}" if report.coverage else ""
        print(f"{name:12} {report.executions:9d} executions in {report.seconds:6.1f} s "
              f"({rate:,.0f}/s){coverage}: {status}", flush=True)
        for path in report.findings:
            print(f"    saved {path}")
    return 1 if any(r.findings for r in reports) else 0


if __name__ == "__main__":
    sys.exit(main())
