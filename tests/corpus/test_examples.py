"""Bad inputs the CLI already refused before the trust work; the pattern every corpus file follows."""

from __future__ import annotations

from pathlib import Path

from .harness import Case, corpus_test


def _two_rank_dirs(tmp: Path) -> None:
    for r in (0, 1):
        (tmp / "src" / f"rank_{r}").mkdir(parents=True)


CASES = [
    Case("src-missing", ["convert", "--src", "{tmp}/nope", "--dst", "{tmp}/out"], 2,
         r"nope: source checkpoint does not exist"),
    Case("empty-rank-folders", ["convert", "--src", "{tmp}/src", "--dst", "{tmp}/out", "--src-layout",
                                "configs/layouts/llama_dp8.yaml"], 2, r"rank_0: no checkpoint file", _two_rank_dirs),
    Case("ranks-not-a-list", ["convert", "--src", "{llama}", "--dst", "{tmp}/out", "--ranks", "x"], 2,
         r"--ranks 'x' is not a rank list"),
]

test_case = corpus_test(CASES)
