"""Bad inputs found by the black-box audit of issue 9 (each was mishandled before its fix)."""

from __future__ import annotations

from pathlib import Path

from .harness import Case, corpus_test


def layout(text: str):
    """Setup writing {tmp}/l.yaml."""
    def setup(tmp: Path) -> None:
        (tmp / "l.yaml").write_text(text)
    return setup


PLAN_L = ["plan", "--src", "{llama}", "--dst-layout", "{tmp}/l.yaml"]
RULE = "params:\n  - {match: '%s', spec: []}\n"

CASES = [
    Case("layout-regex-bounded-nested-repeats", PLAN_L, 2,
         r"l\.yaml: params\[0\]: match regex '\(\?:a\{1,30\}\)\{1,30\}b' could take exponential .* over 4096 ways",
         layout(RULE % "(?:a{1,30}){1,30}b")),
    Case("layout-regex-optional-run", PLAN_L, 2, r"params\[0\]: match regex .* over 4096 ways",
         layout(RULE % ("a?" * 30 + "a" * 30))),
]

test_case = corpus_test(CASES)
