"""What every harness shares: the time budget, findings, input amplification, chunkings.

A harness checks one input, ``(payload, control)``: ``payload`` is what a client would send
(bytes), ``control`` a 32-bit number that picks the harness's knobs (limits, how the payload is
cut into chunks...), so that one saved input replays exactly. A harness raises :class:`Finding`
when something is wrong; any other exception escaping it is a finding too (``crash``).
"""

from __future__ import annotations

import gc
import hashlib
import json
import random
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from hypothesis import strategies as st

#: Every input gets at least this long...
TIME_FLOOR = 0.050
#: ... and this long per byte: a linear budget (issue 16), about 50 KB/s, far above the real
#: speed of the parsers, so that only superlinear work or a pathological constant exceeds it.
TIME_PER_BYTE = 20e-6
#: Amplified inputs (a fragment repeated many times) are also timed at a quarter of their
#: repetitions: four times the input may take at most this many times longer...
GROWTH_LIMIT = 8.0
#: ... once the full input takes this long at least (shorter times are too noisy to compare).
GROWTH_MIN_SECONDS = 0.25

ROOT = Path(__file__).resolve().parent.parent
CORPUS = Path(__file__).resolve().parent / "corpus"


def short(value: object, limit: int = 200) -> str:
    """``repr(value)``, cut to ``limit`` characters for reports (inputs can be 100 KB)."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


def time_budget(size: int) -> float:
    """Seconds an input of ``size`` bytes may take: max(50 ms, 20 µs per byte)."""
    return max(TIME_FLOOR, TIME_PER_BYTE * size)


class Finding(Exception):
    """A harness found a defect: ``kind`` names it (``crash``, ``slow``, ``mismatch``...)."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


@dataclass(frozen=True)
class Harness:
    """One parser under test.

    ``run(payload, control)`` does every check (allowed errors, equivalences, invariants) and
    raises :class:`Finding`; ``target(payload, control)`` is the single operation whose time
    must stay linear (e.g. parsing the payload fed whole). ``payloads(seeds)`` is the Hypothesis
    strategy of payloads given the seed corpus; ``fragments`` the strategy of small pieces that
    :func:`amplified` repeats.
    """

    name: str
    description: str
    run: Callable[[bytes, int], None]
    target: Callable[[bytes, int], object]
    payloads: Callable[[list[bytes]], st.SearchStrategy[bytes]]
    fragments: st.SearchStrategy[bytes]
    extra_seeds: Callable[[], list[bytes]] = lambda: []
    #: Beginnings and repeated middles that known attacks use (e.g. a command with many
    #: literals); amplified inputs draw them half of the time, else plain fragments.
    openers: tuple[bytes, ...] = ()
    middles: tuple[bytes, ...] = ()
    #: Largest amplified input (bytes): enough for quadratic work to show.
    max_amplified: int = 96 * 1024

    def seeds(self) -> list[bytes]:
        folder = CORPUS / self.name
        files = sorted(folder.iterdir()) if folder.is_dir() else []
        return [p.read_bytes() for p in files if p.is_file()] + self.extra_seeds()


def cpu_clock() -> float:
    """The process's CPU time: the budget is about the work an input costs, and CPU time does
    not grow when the machine is busy (a 2.6 KB input measured 0.585 s of wall time while the
    fuzzer ran at low priority beside a loaded test suite, and 2 ms when replayed)."""
    return time.process_time()


def measure(fn: Callable[[bytes, int], object], payload: bytes, control: int,
            repeat: int = 1) -> float:
    """The shortest of ``repeat`` runs, in CPU seconds, without the garbage collector (its
    full collections cost in proportion to the live objects: they would make linear work that
    allocates much look superlinear)."""
    best = float("inf")
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for _ in range(repeat):
            start = cpu_clock()
            fn(payload, control)
            best = min(best, cpu_clock() - start)
    finally:
        if enabled:
            gc.enable()
    return best


def check_input(harness: Harness, payload: bytes, control: int) -> None:
    """Run every check on one input; raise :class:`Finding` (only) on a defect."""
    start = cpu_clock()
    try:
        harness.run(payload, control)
    except Finding:
        raise
    except Exception as exc:  # everything else is a defect of the parser (or the harness)
        raise Finding("crash", "".join(traceback.format_exception(exc))) from exc
    elapsed = cpu_clock() - start
    budget = time_budget(len(payload))
    if elapsed > budget:
        # The checks took too long: time the parser alone, best of two (noise, GC, load),
        # unless they took so long that there is no doubt.
        spent = (elapsed if elapsed > 10 * budget
                 else measure(harness.target, payload, control, repeat=2))
        if spent > budget:
            raise Finding("slow", f"{spent:.3f} s for {len(payload)} bytes "
                                  f"(budget {budget:.3f} s)")


@dataclass(frozen=True)
class Amplified:
    """``prefix + middle * count + suffix``: hostile inputs are usually a fragment repeated."""

    prefix: bytes
    middle: bytes
    suffix: bytes
    count: int

    def build(self, count: int | None = None) -> bytes:
        return self.prefix + self.middle * (self.count if count is None else count) + self.suffix


def check_growth(harness: Harness, example: Amplified, control: int) -> None:
    """Time the input at full and at a quarter of its repetitions: linear work grows about
    four times, quadratic work sixteen. Raise :class:`Finding` (``superlinear``)."""
    full = example.build()
    spent = measure(harness.target, full, control)
    if spent < GROWTH_MIN_SECONDS:
        return
    quarter = example.build(max(example.count // 4, 1))
    for _ in range(2):  # a second round confirms (load, caches)
        spent = min(spent, measure(harness.target, full, control, repeat=2))
        base = measure(harness.target, quarter, control, repeat=3)
        ratio = spent / max(base, 1e-6)
        if spent < GROWTH_MIN_SECONDS or ratio <= GROWTH_LIMIT:
            return
    raise Finding("superlinear", f"{len(full)} bytes take {spent:.3f} s, a quarter of the "
                                 f"repetitions {base:.3f} s (x{ratio:.1f})")


def amplified(harness: Harness) -> st.SearchStrategy[Amplified]:
    """Fragments of the harness repeated up to :attr:`Harness.max_amplified` bytes."""

    openers = (st.one_of(st.sampled_from(harness.openers), harness.fragments)
               if harness.openers else harness.fragments)
    middles = (st.one_of(st.sampled_from(harness.middles), harness.fragments)
               if harness.middles else harness.fragments)

    @st.composite
    def build(draw: st.DrawFn) -> Amplified:
        prefix = draw(openers)
        middle = draw(middles.filter(bool))
        suffix = draw(harness.fragments)
        size = draw(st.sampled_from([4096, 16 * 1024, 48 * 1024, harness.max_amplified]))
        return Amplified(prefix, middle, suffix, max(size // len(middle), 1))

    return build()


def mutated(seeds: list[bytes]) -> st.SearchStrategy[bytes]:
    """Byte-level mutations of the seed corpus: a few edits (replace, insert, delete, repeat,
    splice with another seed) at random places."""
    if not seeds:
        return st.binary(max_size=512)

    @st.composite
    def build(draw: st.DrawFn) -> bytes:
        data = bytearray(draw(st.sampled_from(seeds)))
        for _ in range(draw(st.integers(0, 6))):
            op = draw(st.integers(0, 5))
            at = draw(st.integers(0, len(data)))
            if op == 0 and at < len(data):
                data[at] = draw(st.integers(0, 255))
            elif op == 1:
                data[at:at] = draw(st.binary(min_size=1, max_size=8))
            elif op == 2:
                del data[at:at + draw(st.integers(1, 64))]
            elif op == 3:
                piece = bytes(data[at:at + draw(st.integers(1, 32))])
                data[at:at] = piece * draw(st.integers(1, 64))
            elif op == 4:
                other = draw(st.sampled_from(seeds))
                cut = draw(st.integers(0, len(other)))
                data[at:] = other[cut:]
            else:
                data[at:at] = draw(st.sampled_from(
                    [b"\r\n", b"\n", b"\r", b"\x00", b"\xff", b'"', b"\\", b"{0+}\r\n", b"=?",
                     b";", b"(", b")", b"<", b">", b"@", b".", b" " * 40]))
        return bytes(data)

    return build()


def usual_payloads(structured: st.SearchStrategy[bytes], binary_size: int = 256
                   ) -> Callable[[list[bytes]], st.SearchStrategy[bytes]]:
    """The payloads most harnesses draw: their structure-aware inputs, mutations of the seed
    corpus (:func:`mutated`) and random bytes of up to ``binary_size``."""

    def payloads(seeds: list[bytes]) -> st.SearchStrategy[bytes]:
        return st.one_of(structured, mutated(seeds), st.binary(max_size=binary_size))

    return payloads


def joined_pieces(pieces: list[bytes], max_size: int) -> st.SearchStrategy[bytes]:
    """Up to ``max_size`` of ``pieces`` (the tokens that matter to a parser) end to end."""
    return st.lists(st.sampled_from(pieces), max_size=max_size).map(b"".join)


def piece_fragments(pieces: list[bytes]) -> st.SearchStrategy[bytes]:
    """Fragments for :func:`amplified` from a harness's pieces: one piece or a few joined."""
    return st.one_of(st.sampled_from(pieces), joined_pieces(pieces, 6))


def chunkings(payload: bytes, control: int) -> Iterator[list[bytes]]:
    """Ways to cut ``payload`` as the network might: random chunk sizes chosen by ``control``
    (mostly small, sometimes large), and byte by byte when it is short."""
    rng = random.Random(control)
    chunks: list[bytes] = []
    at = 0
    while at < len(payload):
        size = rng.choice((1, 2, 3, 5, 7, 16, 64, 512, 4096))
        chunks.append(payload[at:at + size])
        at += size
    yield chunks
    if len(payload) <= 2048:
        yield [payload[i:i + 1] for i in range(len(payload))]


def save_finding(folder: Path, harness: str, finding: Finding, payload: bytes,
                 control: int, example: Amplified | None = None) -> Path:
    """Write the input (``.bin``) and what was found (``.txt``); return the ``.bin`` path.
    An amplified input also gets its parts (``.amp.json``) so that a replay can time it at
    a quarter of its repetitions again."""
    if not folder.is_dir():
        folder.mkdir(parents=True)
        (folder / ".gitignore").write_text("# Fuzz findings: inputs, not sources.\n*\n")
    folder = folder / harness
    folder.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha1(payload + control.to_bytes(4, "little"), usedforsecurity=False)
    path = folder / f"{finding.kind}-{digest.hexdigest()[:12]}-c{control}.bin"
    path.write_bytes(payload)
    path.with_suffix(".txt").write_text(
        f"harness: {harness}\nkind: {finding.kind}\ncontrol: {control}\n"
        f"size: {len(payload)} bytes\n"
        f"replay: .venv/bin/python -m fuzz.run --only {harness} --replay {path}\n\n"
        f"{finding.detail}\n", "utf-8")
    if example is not None:
        path.with_suffix(".amp.json").write_text(json.dumps({
            "prefix": example.prefix.hex(), "middle": example.middle.hex(),
            "suffix": example.suffix.hex(), "count": example.count}), "utf-8")
    return path


def load_amplified(path: Path) -> Amplified | None:
    """The parts saved beside an amplified finding, if any."""
    parts = path.with_suffix(".amp.json")
    if not parts.is_file():
        return None
    saved = json.loads(parts.read_text("utf-8"))
    return Amplified(bytes.fromhex(saved["prefix"]), bytes.fromhex(saved["middle"]),
                     bytes.fromhex(saved["suffix"]), int(saved["count"]))


def control_of(path: Path) -> int:
    """The control number saved in a finding's file name (``...-c<control>.bin``), else 0."""
    tail = path.stem.rpartition("-c")[2]
    return int(tail) if tail.isascii() and tail.isdigit() else 0
