"""The SMTP DATA reader (smtp_in/data.py) against a line-by-line reference model.

:func:`reference` says, from the whole stream read line by line, what the reader must end
with: whether the end-of-data was seen, the state (the first thing wrong, by the offset of the
byte that shows it), the size, the bytes after the end-of-data and the message. The reader is
fed whole, in random chunks and byte by byte; each must agree with the reference, never raise,
and never hold more than the limit (plus the four bytes that may start the end-of-data).
"""

from __future__ import annotations

from dataclasses import dataclass

from fuzz.common import Finding, Harness, chunkings, joined_pieces, piece_fragments, usual_payloads
from smtp_in.data import MAX_LINE, DataReader, DataState

_END = b"\r\n.\r\n"


@dataclass(frozen=True)
class Outcome:
    done: bool
    state: DataState
    size: int
    rest: bytes
    message: bytes | None  # when done and OK


def _pending(stream: bytes, end: int) -> int:
    """Bytes at the end of ``stream[:end]`` that may begin the end-of-data after a CRLF."""
    if stream[:end].endswith(b"\r\n."):
        return 1
    if stream[:end].endswith(b"\r\n.\r"):
        return 2
    return 0


def reference(data: bytes, max_size: int, max_line: int) -> Outcome:
    """What a DATA reader fed ``data`` must say (RFC 5321 §4.1.1.4, §4.5.2, §4.5.3.1.6,
    §2.3.8). Offsets are in ``stream``: a CRLF, as if before the first line, then ``data``."""
    stream = b"\r\n" + data
    end = stream.find(_END)
    done = end >= 0
    content = stream[:end + 2] if done else stream  # the message with its last CRLF
    # (offset of the byte that shows the problem, precedence for the same byte, state)
    problems: list[tuple[int, int, DataState]] = []
    start = 2
    while start < len(content):
        lf = content.find(b"\n", start)
        stop = len(content) if lf < 0 else lf  # the line's text, its CR included
        if stop - start > max_line + 1:
            problems.append((start + max_line + 1, 0, DataState.LINE_TOO_LONG))
        if lf >= 0 and content[lf - 1] != 0x0D:
            problems.append((lf, 1, DataState.BARE_NEWLINE))
        cr = content.find(b"\r", start, stop)
        while cr >= 0:
            if cr + 1 < len(content) and content[cr + 1] != 0x0A:
                problems.append((cr + 1, 1, DataState.BARE_NEWLINE))
            cr = content.find(b"\r", cr + 1, stop)
        start = stop + 1
    # Too big: the first byte after which the message bytes so far (not counting a final "."
    # or ".\r" that may begin the end-of-data) exceed max_size.
    for offset in range(max_size + 2, len(content)):
        if offset + 1 - 2 - _pending(content, offset + 1) > max_size:
            problems.append((offset, 2, DataState.TOO_BIG))
            break
    state = min(problems)[2] if problems else DataState.OK
    message = None
    if done and state is DataState.OK:
        lines = content[2:].split(b"\r\n")
        message = b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)
    return Outcome(
        done=done,
        state=state,
        size=end + 3 if done else len(data),
        rest=stream[end + 5:] if done else b"",
        message=message,
    )


def _feed(chunks: list[bytes], max_size: int, max_line: int) -> Outcome:
    granted: list[int] = []

    def reserve(n: int) -> bool:
        granted.append(n)
        return True

    reader = DataReader(max_size, reserve=reserve, max_line=max_line)
    for chunk in chunks:
        reader.feed(chunk)
        held = len(reader.buf)
        limit = 4 if reader.state is not DataState.OK else max_size + 4
        if not reader.done and held > limit:
            raise Finding("memory", f"{held} bytes buffered in state {reader.state.name} "
                                    f"(limit {limit})")
    if reader.reserved != sum(granted) or (reader.done and reader.state is DataState.OK
                                           and len(reader.buf) - 2 > reader.reserved):
        raise Finding("budget", f"reserved {reader.reserved}, granted {sum(granted)}, "
                                f"buffered {len(reader.buf)}")
    message = reader.message() if reader.done and reader.state is DataState.OK else None
    return Outcome(reader.done, reader.state, reader.size, reader.rest, message)


_MAX_SIZES = [0, 1, 5, 16, 64, 1000, 100_000]
_MAX_LINES = [4, 8, 16, MAX_LINE]


def _knobs(control: int) -> tuple[int, int]:
    return (_MAX_SIZES[control % len(_MAX_SIZES)],
            _MAX_LINES[(control // len(_MAX_SIZES)) % len(_MAX_LINES)])


def _target(payload: bytes, control: int) -> object:
    max_size, max_line = _knobs(control)
    return _feed([payload], max_size, max_line)


def _run(payload: bytes, control: int) -> None:
    max_size, max_line = _knobs(control)
    expected = reference(payload, max_size, max_line)
    cuts: list[list[bytes]] = [[payload], *chunkings(payload, control)]
    for chunks in cuts:
        got = _feed(chunks, max_size, max_line)
        if got != expected:
            raise Finding("mismatch", f"max_size={max_size} max_line={max_line}, chunks of "
                                      f"sizes {[len(c) for c in chunks][:20]}: got {got!r}, "
                                      f"the reference says {expected!r}")


_PIECES = [b"a", b"b", b"xyz", b".", b"..", b"\r\n", b"\r\n.", b".\r", b"\r", b"\n", b"\x00",
           b"\r\n.\r\n", b"\r\n..\r\n", b"QUIT\r\n", b" ", b"x" * 20, b"y" * 1000]


HARNESS = Harness(
    "smtp_data", "SMTP DATA reader: whole, chunked and bytewise against a line-by-line model",
    _run, _target,
    payloads=usual_payloads(joined_pieces(_PIECES, 40), binary_size=128),
    fragments=piece_fragments(_PIECES),
    max_amplified=256 * 1024,
)
