"""Security regressions: hostile input at scale (issue 16).

Work that grows faster than the input lets one client stall the event loop. These tests show
linear work without timing it where they can: the parser's Python steps are counted (n and 4n
inputs), the regular expressions applied to unbounded header values are checked to be unable
to backtrack. One coarse bound (seconds, ten times the real cost) runs the issue's inputs.
Then the identities: only ASCII digits, no control character, no final newline; and the DATA
reader, whose outcome must not depend on how TCP cut the stream.
"""

from __future__ import annotations

import random
import re
import sys
import time
from collections.abc import Callable, Iterable
from types import FrameType, ModuleType
from typing import Any, cast

import pytest

import imap_store.imap.parser as imap_parser
from fuzz.smtp_data import reference
from imap_store.imap.commands import InvalidCommand, List, Login
from imap_store.imap.parser import CommandParser, Event
from imap_store.mime import parse_message
from imap_store.mime.addresses import _FAST_ADDR_RE, _fast_address, _parse_address_list_general
from imap_store.mime.headers import _PARAM_RE, _PARAM_SEP_RE, _parse_params
from policy.addresses import (
    InvalidIdentity,
    ins_key,
    normalize_address,
    normalize_domain,
    parse_patient_login,
    validate_ins,
    validate_rpps,
)
from policy.authn import Authenticator
from policy.rules import classify_recipient
from smtp_in.data import DataReader, DataState

PATIENT_DOMAIN = "patient.mssante.fr"

# --------------------------------------------------------------------------- helpers


def python_steps(fn: Callable[[], object], modules: Iterable[ModuleType]) -> int:
    """How many Python calls and lines of ``modules`` run during ``fn()``: a deterministic
    measure of their work (C code such as a regex search is not seen)."""
    files = {cast(str, m.__file__) for m in modules}
    count = 0

    def local(frame: FrameType, event: str, arg: Any) -> Any:
        nonlocal count
        count += 1
        return local

    def tracer(frame: FrameType, event: str, arg: Any) -> Any:
        nonlocal count
        if frame.f_code.co_filename in files:
            count += 1
            return local
        return None

    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        fn()
    finally:
        sys.settrace(previous)
    return count


def events_of(data: bytes, chunk: int | None = None, **limits: int) -> list[Event]:
    parser = CommandParser(**limits)
    events: list[Event] = []
    pieces = [data] if chunk is None else [data[i:i + chunk] for i in range(0, len(data), chunk)]
    for piece in pieces:
        parser.feed(piece)
        while (event := parser.next_event()) is not None:
            events.append(event)
    return events


def backtracking_repeats(pattern: re.Pattern[str]) -> list[str]:
    """The unbounded greedy or lazy repeats of ``pattern`` (possessive ones never give back
    what they took, so they cannot backtrack)."""
    from re import _constants as c  # type: ignore[attr-defined]
    from re import _parser as p  # type: ignore[attr-defined]

    found: list[str] = []

    def walk(items: Any) -> None:
        for op, av in items:
            if op in (c.MAX_REPEAT, c.MIN_REPEAT):
                if av[1] == c.MAXREPEAT:
                    found.append(f"{op} {av[2]}")
                walk(av[2])
            elif op is c.POSSESSIVE_REPEAT:
                walk(av[2])
            elif op is c.SUBPATTERN:
                walk(av[3])
            elif op is c.BRANCH:
                for branch in av[1]:
                    walk(branch)
            elif op is c.ATOMIC_GROUP:
                walk(av)
            elif op in (c.ASSERT, c.ASSERT_NOT):
                walk(av[1])

    walk(p.parse(pattern.pattern, pattern.flags).data)
    return found


# --------------------------------------------------------------------------- 1. IMAP parser


def _many_literals(n: int) -> bytes:
    """The issue's command: n non-synchronising empty literals, each after a quoted string."""
    return b'a LIST "" ("" {0+}\r\n' + b' "" {0+}\r\n' * n + b")\r\n"


def test_imap_command_with_many_literals_parses_and_is_the_same_in_chunks() -> None:
    data = _many_literals(50)
    whole = events_of(data, max_literal=0)
    assert len(whole) == 1 and isinstance(whole[0], List)
    assert whole[0].patterns == ("",) * 102  # 51 quoted strings, 51 empty literals
    assert events_of(data, chunk=7, max_literal=0) == whole


def test_imap_quoted_string_may_not_span_a_literal() -> None:
    """The check the quadratic scan did, still done: a quoted string that would swallow a
    literal's announcement is unterminated."""
    [event] = events_of(b'a LOGIN "x {0+}\r\n" y\r\n', max_literal=0)
    assert isinstance(event, InvalidCommand) and event.text == "Unterminated quoted string"
    [event] = events_of(b'a LOGIN "x" {1+}\r\ny\r\n', max_literal=0)
    assert isinstance(event, Login) and event.password == b"y"


def test_imap_parser_work_is_linear_in_literals_and_quoted_strings() -> None:
    """Issue 16 #1: every quoted string scanned all the command's literals (n² steps)."""

    def steps(n: int) -> int:
        return python_steps(lambda: events_of(_many_literals(n), max_literal=0), [imap_parser])

    small, large = steps(100), steps(400)
    assert large < 5 * small, (small, large)  # linear: about 4 times; quadratic: about 13


# --------------------------------------------------------------------------- 2. MIME


@pytest.mark.parametrize("pattern", [
    pytest.param(_FAST_ADDR_RE, id="_FAST_ADDR_RE"),
    pytest.param(_PARAM_RE, id="_PARAM_RE"),
    pytest.param(_PARAM_SEP_RE, id="_PARAM_SEP_RE"),
])
def test_header_value_regexes_cannot_backtrack(pattern: re.Pattern[str]) -> None:
    """Issue 16 #2: ``_FAST_ADDR_RE`` backtracked quadratically on a phrase of blanks not
    followed by ``<`` (fullmatch of "a" + 60,000 blanks + "\\x01" took seconds); ``_PARAM_RE``
    rescanned a run of ``; ; ;`` for every ``;``. Header values are unbounded (a folded header
    may be most of a 25 MiB message), so their regexes may only use possessive repeats."""
    assert backtracking_repeats(pattern) == []


def test_parameter_separators_are_skipped_once() -> None:
    """The loop of ``_parse_params`` skips the separators with their own regex: a failed
    parameter then costs its own length, not the rest of the value."""
    assert _PARAM_RE.match("; a=b") is None  # separators are not part of a parameter
    assert _parse_params("; " * 1000 + "x") == []
    assert _parse_params(" ; ;a=b ;; c = \"d;e\" ; f") == [("a", "b"), ("c", "d;e")]


@pytest.mark.parametrize("value", [
    "a" + " " * 5000 + "\x01",
    " " * 5000,
    "Marie   Chanteau <m@x.fr>",
    "  \"Dr  X\"   <a@b.fr>  ",
    "\t<a@b.fr>",
    "a@b.fr",
    "Name\t \t<a@b.fr> ",
    "x <a@b.fr",
])
def test_fast_address_path_agrees_with_the_general_parser(value: str) -> None:
    fast = _fast_address(value)
    assert fast is None or [fast] == _parse_address_list_general(value)


def test_from_header_of_blank_continuations_is_parsed() -> None:
    """The issue's message, smaller: the From: value is not simple, so the general parser
    reads it; the analysis does not degrade."""
    raw = b"From: a" + b"\r\n".join([b" " * 900] * 5) + b"\x01\r\n\r\nx\r\n"
    info = parse_message(raw)
    assert info.size == len(raw) and info.envelope[2] == [[None, None, "a\x01", ""]]


def test_issue_inputs_take_well_under_a_second() -> None:
    """The one coarse bound (ten times the cost after the fix; seconds before it): the
    issue's 80 KB inputs."""
    imap = _many_literals(8000)
    mime = b"From: a" + b"\r\n".join([b" " * 900] * 89) + b"\x01\r\n\r\nx\r\n"
    for run in (
        lambda: events_of(imap, max_literal=0),
        lambda: parse_message(mime),
        lambda: _FAST_ADDR_RE.fullmatch("a" + " " * 60000 + "\x01"),
        lambda: _parse_params("; " * 40000 + "x"),
    ):
        start = time.perf_counter()
        run()
        assert time.perf_counter() - start < 1.0


# --------------------------------------------------------------------------- 3, 4. digits

#: Digits that str.isdigit() accepts; int() accepts some (Arabic-Indic...), not others.
FOREIGN_DIGITS = {
    "arabic-indic": "٠١٢٣٤٥٦٧٨٩",
    "extended-arabic-indic": "۰۱۲۳۴۵۶۷۸۹",
    "devanagari": "०१२३४५६७८९",
    "fullwidth": "０１２３４５６７８９",
    "superscript": "⁰¹²³⁴⁵⁶⁷⁸⁹",
    "mathematical": "𝟎𝟏𝟐𝟑𝟒𝟓𝟔𝟕𝟖𝟗",
}


def _foreign(text: str, script: str, positions: Iterable[int]) -> str:
    chars = list(text)
    for at in positions:
        chars[at] = FOREIGN_DIGITS[script][int(chars[at])]
    return "".join(chars)


def test_superscript_digits_in_a_login_are_an_invalid_identity() -> None:
    """Issue 16 #3: ``LOGIN {15+}\\r\\n10000¹¹00000000 pass`` made validate_ins raise a plain
    ValueError (``int("¹¹")``), answered ``BYE [SERVERBUG]`` before login."""
    [event] = events_of("a LOGIN {17+}\r\n10000¹¹00000000 pass\r\n".encode())
    assert isinstance(event, Login) and event.user == "10000¹¹00000000"
    with pytest.raises(InvalidIdentity):
        validate_ins(event.user)
    with pytest.raises(InvalidIdentity):
        parse_patient_login(event.user, PATIENT_DOMAIN)
    with pytest.raises(InvalidIdentity):
        classify_recipient(f"{event.user}@{PATIENT_DOMAIN}", PATIENT_DOMAIN)
    # What the login path does first: a bad INS counts as an ordinary login, no exception.
    authenticator = Authenticator(cast(Any, None), cast(Any, None), PATIENT_DOMAIN)
    assert authenticator.account_key(event.user) == "login:" + event.user


@pytest.mark.parametrize("script", sorted(FOREIGN_DIGITS))
@pytest.mark.parametrize("positions", [(5, 6), (0,), (13, 14), (2, 9)])
def test_ins_with_other_scripts_digits_is_refused(script: str, positions: tuple[int, ...]) -> None:
    """Issue 16 #4: ``validate_ins('18503٧٥12345641')`` passed (int() reads Arabic-Indic
    digits, and the key matched). An INS is ASCII digits (and 2A/2B)."""
    valid = "289057512345621"
    assert validate_ins(valid) == valid
    value = _foreign(valid, script, positions)
    with pytest.raises(InvalidIdentity):
        validate_ins(value)
    with pytest.raises(InvalidIdentity):
        parse_patient_login(f"{value}@{PATIENT_DOMAIN}", PATIENT_DOMAIN)


def test_issue_arabic_indic_ins_is_refused() -> None:
    with pytest.raises(InvalidIdentity):
        validate_ins("18503٧٥12345641")


@pytest.mark.parametrize("script", sorted(FOREIGN_DIGITS))
def test_rpps_and_nir_with_other_scripts_digits_are_refused(script: str) -> None:
    with pytest.raises(InvalidIdentity):
        validate_rpps(_foreign("12345678903", script, (3,)))
    with pytest.raises(InvalidIdentity):
        ins_key(_foreign("2890575123456", script, (5, 6)))


@pytest.mark.parametrize("nir", ["", "1", "0" * 5000, "28905751234567", "x" * 13])
def test_ins_key_of_a_malformed_nir_is_an_invalid_identity(nir: str) -> None:
    """Found by fuzz/identities.py: ``ins_key`` of a long digit string raised ValueError
    (int() refuses more than 4,300 digits)."""
    with pytest.raises(InvalidIdentity):
        ins_key(nir)


# --------------------------------------------------------------------------- 5. addresses

CONTROLS = [chr(c) for c in (*range(0x20), 0x7F, 0x80, 0x85, 0x9F)]


@pytest.mark.parametrize("char", CONTROLS, ids=[f"U+{ord(c):04X}" for c in CONTROLS])
def test_control_characters_in_an_address_are_refused(char: str) -> None:
    """Issue 16 #5: ``normalize_address('a\\x00b@c.fr')`` kept the NUL."""
    with pytest.raises(InvalidIdentity):
        normalize_address(f"a{char}b@c.fr")


@pytest.mark.parametrize("value", ["a.bc\n.", "a.bc\n", "a.bc\n.."])
def test_domain_with_a_final_newline_is_refused(value: str) -> None:
    """Issue 16 #5: ``$`` matches before a final newline: ``normalize_domain('a.bc\\n.')``
    returned ``'a.bc\\n'``. (A newline at the very end is stripped, as any blank.)"""
    try:
        domain = normalize_domain(value)
    except InvalidIdentity:
        return
    assert "\n" not in domain


@pytest.mark.parametrize("value", ["a@b.fr\n.", "a@b.fr\nx", "a\n@b.fr"])
def test_address_with_an_inner_newline_is_refused(value: str) -> None:
    with pytest.raises(InvalidIdentity):
        normalize_address(value)


def test_valid_addresses_and_domains_still_pass() -> None:
    assert normalize_address(" Paul.Dupond@CH-exemple.mssante.fr\n") == \
        "paul.dupond@ch-exemple.mssante.fr"
    assert normalize_address("é+x@b.fr") == "é+x@b.fr"
    assert normalize_domain("Sante.Example.FR.") == "sante.example.fr"


# --------------------------------------------------------------------------- 6. DATA reader


def _outcome(reader: DataReader) -> tuple[bool, DataState, int, bytes, bytes | None]:
    message = reader.message() if reader.done and reader.state is DataState.OK else None
    return reader.done, reader.state, reader.size, reader.rest, message


def _fed(data: bytes, cuts: list[int], max_size: int, max_line: int) -> DataReader:
    reader = DataReader(max_size, max_line=max_line)
    for start, end in zip([0, *cuts], [*cuts, len(data)], strict=True):
        reader.feed(data[start:end])
    return reader


def test_terminator_split_across_chunks_is_not_counted_as_message() -> None:
    """Issue 16 #6: the ``.`` (or ``.\\r``) of the end-of-data still in the buffer was
    counted as message bytes: the same DATA was OK whole and TOO_BIG in two chunks."""
    for cuts in ([], [6], [7], [6, 7], [4, 5, 6, 7]):
        reader = _fed(b"abc\r\n.\r\n", cuts, max_size=5, max_line=998)
        assert (reader.state, reader.size, reader.message()) == (DataState.OK, 8, b"abc\r\n")


def test_size_counts_the_stream_up_to_the_terminator_only() -> None:
    whole = _fed(b"ab\r\n.\r\nQUIT\r\n", [], 100, 998)
    split = _fed(b"ab\r\n.\r\nQUIT\r\n", [7], 100, 998)
    assert whole.size == split.size == 7 and whole.rest == split.rest == b"QUIT\r\n"


def test_data_reader_outcome_does_not_depend_on_chunking() -> None:
    """Fed whole, byte by byte and in random chunks, the reader says the same (state, size,
    rest, message) as the line-by-line model of fuzz/smtp_data.py, for many streams where
    several problems meet (small limits)."""
    rng = random.Random(16)
    pieces = [b"a", b"bc", b".", b"..", b"\r\n", b"\r\n.", b".\r", b"\r", b"\n", b"\x00",
              b"\r\n.\r\n", b"x" * 9, b"QUIT\r\n"]
    for _ in range(600):
        data = b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 14)))
        max_size, max_line = rng.choice([0, 1, 3, 5, 8, 20, 1000]), rng.choice([2, 4, 8, 998])
        expected = reference(data, max_size, max_line)
        expected_tuple = (expected.done, expected.state, expected.size, expected.rest,
                          expected.message)
        bytewise = list(range(1, len(data)))
        random_cuts = sorted(rng.sample(range(1, len(data)), min(3, len(data) - 1))) \
            if len(data) > 1 else []
        for cuts in ([], bytewise, random_cuts):
            reader = _fed(data, cuts, max_size, max_line)
            assert _outcome(reader) == expected_tuple, (data, max_size, max_line, cuts)


@pytest.mark.parametrize(("data", "state"), [
    (b"toolongline\n\r\n.\r\n", DataState.LINE_TOO_LONG),  # long line before the bare LF
    (b"a\nlonglongline\r\n.\r\n", DataState.BARE_NEWLINE),  # bare LF first
    (b"abcdefgh\rx\r\n.\r\n", DataState.LINE_TOO_LONG),  # the same byte: the line comes first
])
@pytest.mark.parametrize("chunk", [None, 1, 3])
def test_first_problem_in_the_stream_wins(data: bytes, state: DataState,
                                          chunk: int | None) -> None:
    cuts = [] if chunk is None else list(range(chunk, len(data), chunk))
    reader = _fed(data, cuts, max_size=1000, max_line=8)
    assert reader.done and reader.state is state


@pytest.mark.parametrize("typed", ["1_0/0_1/2_020", "٣/١/٢٠٢٠", "２６/１１/２０２６", " 1/ 1/2020",
                                   "2026-1_1-26", "+1/11/2026"])
def test_document_dates_take_ascii_digits_only(typed: str) -> None:
    """The portal's document date (fuzz/documents.py found it): int() took underscores and
    other scripts' digits."""
    from web.documents_pages import parse_date

    assert parse_date(typed) is None
    assert parse_date("26/11/2026") == parse_date("2026-11-26") is not None
