"""Bad inputs of the self-describing outputs: a layout or strategy that contradicts what a jaxreshard output
records, damaged or lying manifests and rank metadata, two layouts in one destination, and --resume."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.numpy import load_file, save_file

import jaxreshard as jr
from jaxreshard.example import write_llama_checkpoint
from jaxreshard.formats.manifest import MANIFEST_NAME

from .harness import Case, corpus_test

REPO = Path(__file__).resolve().parents[2]
LAYOUTS = REPO / "configs" / "layouts"
MS = REPO / "tests" / "fixtures" / "mindspore"
DP2MP4 = str(LAYOUTS / "llama_dp2mp4.yaml")


def _llama_dp2mp4(tmp: Path) -> dict[str, str]:
    """The issue's example: the quickstart's llama split to dp2 x mp4."""
    full = write_llama_checkpoint(tmp / "example" / "model.safetensors")
    jr.convert(full, tmp / "dist", dst_layout=DP2MP4)
    return {"full": str(full)}


def _without_manifest(tmp: Path) -> None:
    _llama_dp2mp4(tmp)
    (tmp / "dist" / MANIFEST_NAME).unlink()


def _edit_manifest(change) -> callable:
    def setup(tmp: Path) -> None:
        _llama_dp2mp4(tmp)
        path = tmp / "dist" / MANIFEST_NAME
        data = json.loads(path.read_text())
        change(data)
        path.write_text(json.dumps(data))

    return setup


def _write_manifest_bytes(raw: bytes):
    def setup(tmp: Path) -> None:
        _llama_dp2mp4(tmp)
        (tmp / "dist" / MANIFEST_NAME).write_bytes(raw)

    return setup


def _grown_rank_file(tmp: Path) -> None:
    _llama_dp2mp4(tmp)
    with open(tmp / "dist" / "rank_3" / "checkpoint_3.safetensors", "ab") as f:
        f.write(b"\0" * 64)  # still a readable safetensors file; only the manifest knows it changed


def _replaced_rank_file(tmp: Path) -> None:
    _llama_dp2mp4(tmp)
    f = tmp / "dist" / "rank_5" / "checkpoint_5.safetensors"
    tensors = load_file(str(f))
    tensors.pop("model.norm.weight")
    save_file(tensors, str(f))


def _bad_rank_metadata(value: str):
    def setup(tmp: Path) -> None:
        _without_manifest(tmp)
        f = tmp / "dist" / "rank_1" / "checkpoint_1.safetensors"
        save_file(load_file(str(f)), str(f), metadata={"jaxreshard": value})

    return setup


def _half_written(tmp: Path) -> dict[str, str]:
    subs = _llama_dp2mp4(tmp)
    jr.convert(subs["full"], tmp / "parts", dst_layout=DP2MP4, ranks="0-3")
    return subs


def _ms_dp2mp2(tmp: Path) -> None:
    jr.convert(MS / "ckpt" / "complete", tmp / "ms", dst_strategy=MS / "strategy" / "dp2mp2.ckpt",
               output_format="safetensors")


def _drop_param(name: str):
    def change(data: dict) -> None:
        del data["params"][name]

    return change


def _set_param(name: str, **fields):
    def change(data: dict) -> None:
        data["params"][name].update(fields)

    return change


CONVERT = ["convert", "--src", "{tmp}/dist", "--dst", "{tmp}/out", "-q"]
EMBED = r"'model\.embed_tokens\.weight'"

CASES = [
    Case("issue-dp8-on-dp2mp4-output", [*CONVERT, "--src-layout", str(LAYOUTS / "llama_dp8.yaml")], 2,
         EMBED + r" on rank 0: the given source layout makes it \[128, 128\].* records \[512, 128\]", _llama_dp2mp4),
    Case("issue-mp8-gqa-on-dp2mp4-output", [*CONVERT, "--src-layout", str(LAYOUTS / "llama_mp8_gqa.yaml")], 2,
         r"parameter '.*' on rank \d+: the given source layout .*\[.*\].*\[.*\]", _llama_dp2mp4),
    Case("wrong-layout-caught-by-rank-metadata", [*CONVERT, "--src-layout", str(LAYOUTS / "llama_dp8.yaml")], 2,
         r"rank_0/checkpoint_0\.safetensors: parameter " + EMBED + r" on rank 0: .*\[128, 128\].*records \[512, 128\]",
         _without_manifest),
    Case("wrong-block-order-caught-by-rank-metadata",
         [*CONVERT, "--src-layout", "{tmp}/swapped.yaml"], 2, r"parameter '.*' on rank 1: .*block .* at \[",
         lambda tmp: (_without_manifest(tmp), (tmp / "swapped.yaml").write_text(
             (LAYOUTS / "llama_dp2mp4.yaml").read_text().replace("mesh: {dp: 2, mp: 4}", "mesh: {mp: 4, dp: 2}")))[0]),
    Case("pipeline-layout-on-flat-output", [*CONVERT, "--src-layout", str(LAYOUTS / "llama_dp2mp2pp2.yaml")], 2,
         r"parameter '.*' on rank \d+: the given source layout", _llama_dp2mp4),
    Case("contradicting-strategy-on-ms-output",
         ["convert", "--src", "{tmp}/ms", "--src-strategy", str(MS / "strategy" / "mp4.ckpt"), "--dst", "{tmp}/o",
          "-q"], 2, r"parameter '.*' on rank \d+: the given source layout", _ms_dp2mp2),
    Case("manifest-not-json", CONVERT, 2, r"jaxreshard\.manifest\.json: damaged jaxreshard manifest",
         _write_manifest_bytes(b"{not json")),
    Case("manifest-deep-nesting", CONVERT, 2, r"damaged jaxreshard manifest",
         _write_manifest_bytes(b"[" * 100_000 + b"]" * 100_000)),
    Case("manifest-other-version", CONVERT, 2, r"damaged jaxreshard manifest .*version 99",
         _edit_manifest(lambda d: d.update(version=99))),
    Case("manifest-file-escapes", CONVERT, 2, r"leaves the output folder",
         _edit_manifest(lambda d: d["files"].update({"../victim": {"size": 1, "sha256": "0"}}))),
    Case("manifest-zero-ranks", CONVERT, 2, r"damaged jaxreshard manifest .*not a positive integer",
         _edit_manifest(lambda d: d.update(num_ranks=0))),
    Case("manifest-is-a-folder", CONVERT, 2, r"not a jaxreshard manifest",
         lambda tmp: (_llama_dp2mp4(tmp), (tmp / "dist" / MANIFEST_NAME).unlink(),
                      (tmp / "dist" / MANIFEST_NAME).mkdir())[0]),
    Case("manifest-spec-axis-not-in-mesh", CONVERT, 2, r"parameter " + EMBED + r": mesh .* do not fit together",
         _edit_manifest(_set_param("model.embed_tokens.weight", spec=[["tp"]]))),
    Case("manifest-stage-beyond-ranks", CONVERT, 2,
         r"laid out on 8 devices x stages \[3\], beyond the manifest's 8 ranks",
         _edit_manifest(_set_param("model.embed_tokens.weight", stages=[3]))),
    Case("manifest-misses-a-parameter", CONVERT, 2, r"parameter 'model\.norm\.weight' is in the checkpoint files but "
         r"not in their manifest", _edit_manifest(_drop_param("model.norm.weight"))),
    Case("manifest-size-mismatch-grown", CONVERT, 2,
         r"rank_3/checkpoint_3\.safetensors: "
         r"(\d+ bytes but .*records \d+; the file was truncated or replaced|\d+ bytes after the last tensor)",
         _grown_rank_file),
    Case("manifest-size-mismatch-replaced", [*CONVERT, "--src-layout", DP2MP4], 2,
         r"rank_5/checkpoint_5\.safetensors: \d+ bytes but .* records", _replaced_rank_file),
    Case("rank-metadata-not-json", [*CONVERT, "--src-layout", DP2MP4], 2,
         r"rank_1/checkpoint_1\.safetensors: damaged 'jaxreshard' metadata", _bad_rank_metadata("{")),
    Case("rank-metadata-block-outside-tensor", [*CONVERT, "--src-layout", DP2MP4], 2,
         r"parameter 'model\.norm\.weight': its block \[128\] at \[9\] does not fit",
         _bad_rank_metadata(json.dumps({"rank": 1, "num_ranks": 8,
                                        "params": {"model.norm.weight": {"shape": [128], "start": [9]}}}))),
    Case("two-layouts-one-destination", ["convert", "--src", "{full}", "--dst", "{tmp}/parts", "--dst-layout",
                                         str(LAYOUTS / "llama_dp8.yaml"), "--ranks", "4-7", "-q"], 2,
         r"parameter '.*' is .* in this run but .* in the ranks already written; two layouts cannot share",
         _half_written),
    Case("two-formats-one-destination", ["convert", "--src", "{full}", "--dst", "{tmp}/parts", "--dst-layout",
                                         DP2MP4, "--ranks", "4-7", "--output-format", "ckpt", "-q"], 2,
         r"writes ckpt files but the destination holds safetensors files", _half_written),
    Case("resume-with-nothing-to-resume", ["convert", "--src", "{full}", "--dst", "{tmp}/fresh", "--dst-layout",
                                           DP2MP4, "--resume", "-q"], 0, "", _llama_dp2mp4),
    Case("resume-onto-a-finished-output", ["convert", "--src", "{full}", "--dst", "{tmp}/dist", "--dst-layout",
                                           DP2MP4, "--resume", "-q"], 2, r"already exists", _llama_dp2mp4),
    Case("resume-is-a-flag", ["convert", "--src", "{full}", "--dst", "{tmp}/o", "--resume", "yes"], 2, "",
         _llama_dp2mp4),
]

test_case = corpus_test(CASES)
