"""The bad-input corpus: each case builds files in a fresh folder, runs the CLI in process, and states the exit
code and the one-line message it must give.

A case is `Case(name, argv, code, message, setup)`: `setup(tmp)` writes whatever the case needs under `tmp`
(and may return a dict of extra `{placeholder: value}` substitutions); `argv` may use `{tmp}`, `{llama}` (the
shared example checkpoint) and those placeholders. `message` is a regex that must be found in the single line
the CLI printed on stderr (exit 2 prints exactly one `jaxreshard: error: ...` line, never a traceback).
Each corpus file ends with `test_case = corpus_test(CASES)`, so pytest lists every case by name.
"""

from __future__ import annotations

import contextlib
import io
import re
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from jaxreshard.cli import main

TIME_LIMIT_S = 30  # every bad input is refused well within this (the issue asks for "within seconds")


@dataclass(frozen=True)
class Case:
    name: str
    argv: Sequence[str]
    code: int
    message: str  # regex searched in the stderr line
    setup: Callable[[Path], dict[str, str] | None] | None = None
    stdin: str | None = None
    marks: tuple = field(default_factory=tuple)


def run_cli(argv: Sequence[str], time_limit: int = TIME_LIMIT_S) -> tuple[int, str, str]:
    """`jaxreshard.cli.main(argv)` in process: (exit code, stdout, stderr); fails past `time_limit` seconds."""
    out, err = io.StringIO(), io.StringIO()

    def too_slow(signum, frame):  # noqa: ARG001
        raise TimeoutError(f"jaxreshard {' '.join(argv)} took over {time_limit} s")

    old = signal.signal(signal.SIGALRM, too_slow)
    signal.alarm(time_limit)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(argv))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    return code, out.getvalue(), err.getvalue()


def check_case(case: Case, tmp: Path, llama: Path) -> None:
    subs = {"tmp": str(tmp), "llama": str(llama)}
    if case.setup is not None:
        subs.update(case.setup(tmp) or {})
    argv = [a.format(**subs) for a in case.argv]
    start = time.monotonic()
    code, _, err = run_cli(argv)
    lines = [line for line in err.splitlines() if line.startswith("jaxreshard: error:")]
    assert code == case.code, f"{case.name}: exit {code}, wanted {case.code}; stderr:\n{err}"
    if case.code == 2:
        assert "Traceback" not in err, f"{case.name}: a traceback on bad input:\n{err}"
        assert len(lines) == 1, f"{case.name}: wanted one error line, got:\n{err}"
        assert "\n" not in lines[0]
        assert re.search(case.message, lines[0]), f"{case.name}: {lines[0]!r} does not match {case.message!r}"
    assert time.monotonic() - start < TIME_LIMIT_S


def corpus_test(cases: Sequence[Case]):
    """A parametrized pytest function over `cases` (ids are the case names)."""
    names = [c.name for c in cases]
    assert len(set(names)) == len(names), "corpus case names must be unique"

    @pytest.mark.parametrize("case", [pytest.param(c, id=c.name, marks=c.marks) for c in cases])
    def test_case(case: Case, tmp_path: Path, llama: Path) -> None:
        check_case(case, tmp_path, llama)

    return test_case
