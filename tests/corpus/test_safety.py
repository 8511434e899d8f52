"""Destination safety: --prefix escapes, unusable destinations, symlinks, overlaps with what a source reads,
and a destination (or some of its ranks) held by another run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .harness import Case, corpus_test

REPO = str(Path(__file__).resolve().parents[2])  # the package the subprocesses import
DP8 = "configs/layouts/llama_dp8.yaml"
CONVERT = ["convert", "--src", "{llama}", "--dst", "{tmp}/out"]
_HOLDERS: list[subprocess.Popen] = []

HOLDER = """
import sys
from pathlib import Path
from jaxreshard.dstlock import destination_lock
ranks = None if sys.argv[2] == "-" else [int(r) for r in sys.argv[2].split(",")]
with destination_lock(Path(sys.argv[1]), ranks):
    print("locked", flush=True)
    sys.stdin.read()
"""


@pytest.fixture(autouse=True)
def _stop_holders():
    """Lock holders started by a case's setup end with the case."""
    yield
    while _HOLDERS:
        _HOLDERS.pop().communicate(timeout=30)


def _holder(ranks: str = "-"):
    def setup(tmp: Path) -> dict[str, str]:
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp.resolve() / "out"), ranks],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                env={**os.environ, "PYTHONPATH": REPO})
        _HOLDERS.append(proc)
        assert proc.stdout.readline().strip() == "locked"
        return {"pid": str(proc.pid)}

    return setup


def _file_dst(tmp: Path) -> None:
    (tmp / "out").write_bytes(b"not a folder")


def _full_dst(tmp: Path) -> None:
    (tmp / "out").mkdir()
    (tmp / "out" / "keep.bin").write_bytes(b"keep")


def _symlink_to_full(tmp: Path) -> None:
    _full_dst(tmp)
    (tmp / "link").symlink_to(tmp / "out")


def _symlink_into_source(tmp: Path) -> None:
    from jaxreshard import convert
    from jaxreshard.example import write_llama_checkpoint

    convert(write_llama_checkpoint(tmp / "model.safetensors"), tmp / "src", dst_layout=DP8)
    (tmp / "link").symlink_to(tmp / "src")


def _rank_folders_symlinked_into_dst(tmp: Path) -> None:
    """A distributed source whose rank folders are symlinks to the rank folders of --dst."""
    from jaxreshard import convert
    from jaxreshard.example import write_llama_checkpoint

    convert(write_llama_checkpoint(tmp / "model.safetensors"), tmp / "out", dst_layout=DP8)
    (tmp / "src").mkdir()
    for r in range(8):
        (tmp / "src" / f"rank_{r}").symlink_to(tmp / "out" / f"rank_{r}")


def _hf_part_symlinked_into_dst(tmp: Path) -> None:
    """A Hugging Face folder whose part file is a symlink to a file inside --dst."""
    import json

    from jaxreshard.example import write_llama_checkpoint
    from jaxreshard.formats.safetensors_io import read_safetensors_index

    (tmp / "out").mkdir()
    part = write_llama_checkpoint(tmp / "out" / "weights.safetensors")
    (tmp / "src").mkdir()
    (tmp / "src" / "model-00001-of-00001.safetensors").symlink_to(part)
    names = [e.param for e in read_safetensors_index(part)[0]]
    (tmp / "src" / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {n: "model-00001-of-00001.safetensors" for n in names}}))


def _adapter_inside_dst(tmp: Path) -> None:
    """A base checkpoint with one LoRA-able weight, and its PEFT adapter stored inside --dst."""
    import numpy as np
    from safetensors.numpy import save_file

    (tmp / "out" / "adapter").mkdir(parents=True)
    save_file({"m.q_proj.weight": np.ones((4, 4), np.float32)}, str(tmp / "base.safetensors"))
    save_file({"base_model.model.m.q_proj.lora_A.weight": np.ones((2, 4), np.float32),
               "base_model.model.m.q_proj.lora_B.weight": np.ones((4, 2), np.float32)},
              str(tmp / "out" / "adapter" / "adapter_model.safetensors"))


def _file_parent(tmp: Path) -> None:
    (tmp / "afile").write_bytes(b"x")


CASES = [
    Case("prefix-parent-escape", [*CONVERT, "--prefix", "../../x"], 2,
         r"--prefix '\.\./\.\./x' contains the character '/'"),
    Case("prefix-subfolder", [*CONVERT, "--prefix", "a/b"], 2, r"--prefix 'a/b' contains the character '/'"),
    Case("prefix-backslash", [*CONVERT, "--prefix", "a\\b"], 2, r"contains the character '\\\\'"),
    Case("prefix-nul", [*CONVERT, "--prefix", "a\0b"], 2, r"--prefix 'a\\x00b' contains the character '\\x00'"),
    Case("prefix-newline", [*CONVERT, "--prefix", "a\nb"], 2, r"contains the character '\\n'"),
    Case("prefix-hidden", [*CONVERT, "--prefix", ".x"], 2, r"--prefix '\.x' contains a leading '\.'"),
    Case("prefix-absolute", [*CONVERT, "--prefix", "/etc/x"], 2, r"plain file-name prefix"),
    Case("prefix-too-long", [*CONVERT, "--prefix", "p" * 300], 2, r"--prefix is 300 bytes long; at most 128"),
    Case("prefix-merge-lora", ["merge-lora", "--src", "{llama}", "--dst", "{tmp}/out", "--prefix", "../x"], 2,
         r"--prefix '\.\./x' contains the character '/'"),
    Case("prefix-plan", ["plan", "--src", "{llama}", "--dst-layout", DP8, "--prefix", "a/../../b"], 2, r"--prefix"),
    Case("lora-adapter-inside-dst", ["merge-lora", "--src", "{tmp}/base.safetensors", "--adapter", "{tmp}/out/adapter",
                                     "--lora-scaling", "1", "--dst", "{tmp}/out", "--overwrite"], 2,
         r"out: the destination overlaps the source .*out/adapter", _adapter_inside_dst),
    Case("dst-is-a-file", CONVERT, 2, r"out: exists and is not a directory", _file_dst),
    Case("dst-is-a-file-overwrite", [*CONVERT, "--overwrite"], 2, r"out: exists and is not a directory", _file_dst),
    Case("dst-not-empty", CONVERT, 2, r"out: already exists and is not empty; pass --overwrite", _full_dst),
    Case("dst-parent-is-a-file", ["convert", "--src", "{llama}", "--dst", "{tmp}/afile/out"], 2,
         r"cannot create .*afile/?: .*afile is a file, not a folder", _file_parent),
    Case("dst-read-only-parent", ["convert", "--src", "{llama}", "--dst", "/sys/jaxreshard-out"], 2,
         r"cannot create the lock file /sys/\.jaxreshard-out\.lock: "
         r"(Permission denied|Operation not permitted|Read-only)"),
    Case("dst-missing-filesystem-path", ["convert", "--src", "{llama}", "--dst", "/proc/jaxreshard/out"], 2,
         r"cannot create /proc/jaxreshard: No such file or directory"),
    Case("dst-symlink-to-full-folder", ["convert", "--src", "{llama}", "--dst", "{tmp}/link"], 2,
         r"link: already exists and is not empty", _symlink_to_full),
    Case("dst-symlink-into-source", ["convert", "--src", "{tmp}/src", "--src-layout", DP8, "--dst",
          "{tmp}/link/out"], 2,
         r"the destination overlaps the source", _symlink_into_source),
    Case("rank-folders-symlinked-into-dst", ["convert", "--src", "{tmp}/src", "--src-layout", DP8, "--dst",
                                             "{tmp}/out", "--overwrite"], 2,
         r"out: the destination overlaps the source .*out/rank_0", _rank_folders_symlinked_into_dst),
    Case("hf-part-symlinked-into-dst", ["convert", "--src", "{tmp}/src", "--dst", "{tmp}/out", "--overwrite"], 2,
         r"(the destination overlaps the source|is a link to) .*out/weights\.safetensors", _hf_part_symlinked_into_dst),
    Case("dst-held-by-another-run", CONVERT, 2,
         r"out: process \d+ is writing this destination \(it holds .*\.out\.lock\)",
         _holder()),
    Case("dst-held-overwrite", [*CONVERT, "--overwrite"], 2, r"process \d+ is writing this destination", _holder()),
    Case("ranks-overlap-a-running-ranks-run", [*CONVERT, "--dst-layout", DP8, "--ranks", "3-5"], 2,
         r"process \d+ is writing this destination \(or some of the ranks requested\)", _holder("0,1,2,3")),
    Case("ranks-while-a-whole-run-holds-it", [*CONVERT, "--dst-layout", DP8, "--ranks", "7"], 2,
         r"process \d+ is writing", _holder()),
    Case("unify-held", ["unify", "--src", "{llama}", "--dst", "{tmp}/out"], 2, r"process \d+ is writing", _holder()),
    Case("strategy-out-held", ["strategy", "--src", "{llama}", "--layout", DP8, "--out", "{tmp}/out"], 2,
         r"process \d+ is writing", _holder()),
]

test_case = corpus_test(CASES)
