"""Bad inputs of the planner seam: layout arguments (detected by content, aliases), planner choice, output
kinds, and the plan/write options checked before anything is written."""

from __future__ import annotations

from pathlib import Path

from .harness import Case, corpus_test

FIX = Path(__file__).parents[1] / "fixtures" / "mindspore"
LAYOUT = "configs/layouts/llama_dp2mp4.yaml"
MS_SRC = str(FIX / "ckpt" / "dp2mp4")
MS_STRATEGY = str(FIX / "strategy" / "dp2mp4.ckpt")
MP4 = str(FIX / "strategy" / "mp4.ckpt")


def _file(name: str, data: bytes):
    def setup(tmp: Path) -> None:
        (tmp / name).write_bytes(data)

    return setup


def _folder(tmp: Path) -> None:
    (tmp / "strategies").mkdir()
    (tmp / "strategies" / "notes.txt").write_text("no strategy here\n")


def _orbax(tmp: Path) -> None:
    from jaxreshard import convert
    from jaxreshard.example import write_llama_checkpoint

    write_llama_checkpoint(tmp / "full.safetensors")
    convert(tmp / "full.safetensors", tmp / "ock", output_format="orbax")


CONVERT = ["convert", "--src", "{llama}", "--dst", "{tmp}/out"]

CASES = [
    Case("src-layout-and-strategy", [*CONVERT, "--src-layout", LAYOUT, "--src-strategy", MS_STRATEGY], 2,
         r"give --src-layout or --src-strategy, not both"),
    Case("dst-layout-and-strategy", [*CONVERT, "--dst-layout", LAYOUT, "--dst-strategy", MP4], 2,
         r"give --dst-layout or --dst-strategy, not both"),
    Case("dst-layout-binary-junk", [*CONVERT, "--dst-layout", "{tmp}/junk.bin"], 2, r"junk\.bin",
         _file("junk.bin", bytes(range(256)) * 4)),
    Case("dst-layout-empty-file", [*CONVERT, "--dst-layout", "{tmp}/empty.yaml"], 2, r"empty\.yaml",
         _file("empty.yaml", b"")),
    Case("dst-layout-json-neither", [*CONVERT, "--dst-layout", "{tmp}/x.json"], 2, r"x\.json",
         _file("x.json", b'{"something": 1}\n')),
    Case("dst-layout-folder-without-strategies", [*CONVERT, "--dst-layout", "{tmp}/strategies"], 2,
         r"strategies", _folder),
    Case("dst-layout-missing", [*CONVERT, "--dst-layout", "{tmp}/nope.yaml"], 2, r"nope\.yaml"),
    Case("dst-strategy-given-yaml", [*CONVERT, "--dst-strategy", LAYOUT], 2, r"llama_dp2mp4\.yaml"),
    Case("dst-layout-nul-in-text", [*CONVERT, "--dst-layout", "{tmp}/nul.txt"], 2, r"nul\.txt",
         _file("nul.txt", b"mesh: {dp: 2}\x00\n")),
    Case("output-format-unknown", [*CONVERT, "--output-format", "npz"], 2,
         r"--output-format 'npz' is not supported; use one of safetensors, ckpt, orbax"),
    Case("dtype-not-floating", [*CONVERT, "--dtype", "int8"], 2, r"--dtype 'int8' is not a floating type"),
    Case("hf-with-layout", [*CONVERT, "--dst-layout", LAYOUT, "--hf"], 2,
         r"--hf writes one complete safetensors checkpoint"),
    Case("max-file-size-garbled", [*CONVERT, "--hf", "--max-file-size", "lots"], 2,
         r"size 'lots' is not understood"),
    Case("orbax-output-with-ranks", [*CONVERT, "--dst-layout", LAYOUT, "--output-format", "orbax", "--ranks",
                                     "0-3"], 2, r"--output-format orbax writes one orbax checkpoint in one process"),
    Case("verify-orbax-output", [*CONVERT, "--output-format", "orbax", "--verify"], 2,
         r"--verify compares rank files; it does not apply to orbax"),
    Case("distributed-source-without-layout", ["convert", "--src", MS_SRC, "--dst", "{tmp}/out"], 2,
         r"dp2mp4: this is a distributed checkpoint \(8 rank folders\); pass the layout it was saved with"),
    Case("orbax-source-with-src-layout", ["convert", "--src", "{tmp}/ock", "--dst", "{tmp}/out", "--src-layout",
                                          LAYOUT], 2, r"an orbax checkpoint holds whole arrays; it takes no source",
         _orbax),
    Case("strategy-layout-for-wrong-checkpoint", [*CONVERT, "--src-layout", MS_STRATEGY], 2,
         r"model\.safetensors: the checkpoint file of rank 3 \(folder rank_3\) is needed for converting rank 0's"),
    Case("ranks-beyond-strategy", ["convert", "--src", MS_SRC, "--dst", "{tmp}/out", "--src-layout", MS_STRATEGY,
                                   "--dst-layout", MP4, "--ranks", "7"], 2,
         r"destination ranks \[7\] do not exist; the destination strategy has ranks 0-3"),
    Case("ranks-beyond-layout", [*CONVERT, "--dst-layout", LAYOUT, "--ranks", "8-9"], 2,
         r"destination ranks \[8, 9\] do not exist; the destination layout has ranks 0-7"),
    Case("strategy-by-content-works", ["convert", "--src", MS_SRC, "--dst", "{tmp}/out", "--src-layout",
                                       MS_STRATEGY, "--dst-layout", MP4, "-q"], 0, ""),
]

test_case = corpus_test(CASES)
