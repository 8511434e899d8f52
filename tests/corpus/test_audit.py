"""Bad inputs found by the black-box audit of issue 9 (each was mishandled before its fix)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from jaxreshard.cli import main
from jaxreshard.example import write_llama_checkpoint

from .harness import Case, corpus_test


def layout(text: str):
    """Setup writing {tmp}/l.yaml."""
    def setup(tmp: Path) -> None:
        (tmp / "l.yaml").write_text(text)
    return setup


def edited_manifest(edit):
    """Setup writing {tmp}/src: the example split to dp2mp4, whose manifest's params `edit` then changes."""
    def setup(tmp: Path) -> None:
        src = tmp / "src"
        write_llama_checkpoint(tmp / "llama.safetensors")
        assert main(["convert", "-q", "--src", str(tmp / "llama.safetensors"), "--dst", str(src), "--dst-layout",
                     "configs/layouts/llama_dp2mp4.yaml"]) == 0
        path = src / "jaxreshard.manifest.json"
        doc = json.loads(path.read_text())
        for record in doc["params"].values():
            edit(record)
        path.write_text(json.dumps(doc))
    return setup


def _replicated(record: dict) -> None:
    record["spec"] = [[] for _ in record["spec"]]


def _axes_swapped(record: dict) -> None:
    record["mesh"] = record["mesh"][::-1]


def strategy_folder_with_a_fifo(tmp: Path) -> None:
    """A pipeline strategy folder: stage 0's file, and a FIFO named like stage 1's."""
    (tmp / "pp").mkdir()
    fixture = Path(__file__).parents[1] / "fixtures" / "mindspore" / "strategy" / "pp_stages"
    shutil.copy(fixture / "ckpt_strategy_rank_0.ckpt", tmp / "pp" / "ckpt_strategy_rank_0.ckpt")
    os.mkfifo(tmp / "pp" / "ckpt_strategy_rank_2.ckpt")


def _wide_header(tmp: Path) -> None:
    """A safetensors file whose one tensor carries an extra key of 17 million empty objects (51 MB): the
    library ignores unknown keys, and parsing it took ~1.4 GB."""
    body = b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":[' + b",".join([b"{}"] * 17_000_000) + b"]}}"
    body += b" " * (-len(body) % 8)
    (tmp / "wide.safetensors").write_bytes(len(body).to_bytes(8, "little") + body + bytes(8))


def _wide_strategy(tmp: Path) -> None:
    body = b'{"parallel_layout_item": {}, "pad": [' + b",".join([b"[]"] * 17_000_000) + b"]}"
    (tmp / "wide.json").write_bytes(body)


PLAN_L = ["plan", "--src", "{llama}", "--dst-layout", "{tmp}/l.yaml"]
RULE = "params:\n  - {match: '%s', spec: []}\n"

CASES = [
    Case("layout-regex-bounded-nested-repeats", PLAN_L, 2,
         r"l\.yaml: params\[0\]: match regex '\(\?:a\{1,30\}\)\{1,30\}b' could take exponential .* over 4096 ways",
         layout(RULE % "(?:a{1,30}){1,30}b")),
    Case("layout-regex-optional-run", PLAN_L, 2, r"params\[0\]: match regex .* over 4096 ways",
         layout(RULE % ("a?" * 30 + "a" * 30))),
    Case("dst-name-too-long", ["convert", "--src", "{llama}", "--dst", "{tmp}/" + "a" * 300], 2,
         r"a{300}: cannot be used as the destination: File name too long; choose another destination"),
    Case("strategy-folder-holds-a-fifo", ["plan", "--src", "{llama}", "--dst-strategy", "{tmp}/pp"], 2,
         r"pp[/\\]ckpt_strategy_rank_2\.ckpt: is not a regular file \(a FIFO, device or dangling link\)",
         strategy_folder_with_a_fifo),
    Case("st-header-of-17-million-objects", ["convert", "--src", "{tmp}/wide.safetensors", "--dst", "{tmp}/out"], 2,
         r"wide\.safetensors: corrupt safetensors header: 17000005 JSON objects and arrays, over the cap of 16000000",
         _wide_header),
    Case("strategy-json-of-17-million-arrays", ["plan", "--src", "{llama}", "--dst-strategy", "{tmp}/wide.json"], 2,
         r"wide\.json: corrupt JSON strategy file: 17000003 JSON objects and arrays, over the cap", _wide_strategy),
    # a manifest's layout was trusted without comparing it with the rank files' own records: wrong tensors, exit 0
    Case("manifest-edited-to-replicated", ["convert", "--src", "{tmp}/src", "--dst", "{tmp}/out"], 2,
         r"src[/\\]rank_0[/\\]checkpoint_0\.safetensors: parameter 'model\.embed_tokens\.weight' on rank 0: the layout "
         r"jaxreshard\.manifest\.json records makes it \[128, 128\] but the file records \[512, 128\] .* the manifest "
         r"was damaged or edited", edited_manifest(_replicated)),
    Case("manifest-mesh-axes-swapped", ["convert", "--src", "{tmp}/src", "--dst", "{tmp}/out"], 2,
         r"rank_1[/\\]checkpoint_1\.safetensors: parameter '.*' on rank 1: the layout jaxreshard\.manifest\.json "
         r"records makes it .* but the file records", edited_manifest(_axes_swapped)),
]

test_case = corpus_test(CASES)
