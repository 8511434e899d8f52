"""Sandboxes for the README's runnable bash examples: the inputs each block names, and what it must write.

`RUN` maps a block (its section, or section/snippet) to (prepare, check): prepare puts the files the example
names into its folder (the quickstart model, the MindSpore reference fixtures, a tiny Mixtral, an FP8 model
under `~/models`); check looks at what the example wrote, against the inputs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

import jaxreshard as jr
from jaxreshard.example import write_fp8_checkpoint, write_llama_checkpoint
from jaxreshard.formats import open_source
from jaxreshard.formats.manifest import MANIFEST_NAME

from .test_readme import _tensors

MS = Path(__file__).parent / "fixtures" / "mindspore"


def llama_folder(folder: Path) -> Path:
    write_llama_checkpoint(folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    return folder


def prepare_verify(root: Path) -> None:
    """llama.safetensors, its dp2mp4 split (ckpt/dp2mp4), the split without its manifest (another tool's)."""
    src = write_llama_checkpoint(root / "llama.safetensors")
    jr.convert(src, root / "ckpt" / "dp2mp4", dst_layout=root / "configs" / "layouts" / "llama_dp2mp4.yaml")
    shutil.copytree(root / "ckpt" / "dp2mp4", root / "ckpt" / "from_elsewhere")
    (root / "ckpt" / "from_elsewhere" / MANIFEST_NAME).unlink()
    write_llama_checkpoint(root / "A" / "model.safetensors")
    shutil.copy(root / "configs" / "layouts" / "llama_dp2mp4.yaml", root / "L.yaml")


def prepare_mindspore(root: Path) -> None:
    """The MindSpore reference fixtures under the names the example uses."""
    for src, dst in [("ckpt/complete", "ckpt/complete"), ("ckpt/dp1mp2pp2", "ckpt/pp"),
                     ("ckpt/dp2mp2", "ckpt/dp2mp2"), ("strategy/pp_stages", "strategy_dir")]:
        shutil.copytree(MS / src, root / dst)
    for src, dst in [("strategy/dp2mp4.ckpt", "strategy/dp2mp4.ckpt"), ("strategy/dp2mp2.ckpt", "new.ckpt"),
                     ("strategy/dp2mp2.ckpt", "dp2mp2.ckpt")]:
        (root / dst).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(MS / src, root / dst)


def prepare_strategy(root: Path) -> None:
    write_llama_checkpoint(root / "model.safetensors")


def prepare_hf(root: Path) -> None:
    llama_folder(root / "models" / "Llama-3-8B")  # ~ is the sandbox folder


def prepare_moe(root: Path) -> None:
    """A tiny Mixtral (8 experts) and an 8-way expert x 2-way tensor parallel layout for it."""
    rng = np.random.default_rng(0)
    tensors = {f"model.layers.{i}.block_sparse_moe.experts.{e}.{w}.weight":
               rng.standard_normal((8, 16) if w == "w2" else (16, 8)).astype(np.float32)
               for i in range(2) for e in range(8) for w in ("w1", "w2", "w3")}
    tensors["model.embed_tokens.weight"] = rng.standard_normal((32, 8)).astype(np.float32)
    (root / "mixtral").mkdir()
    save_file(tensors, root / "mixtral" / "model.safetensors", metadata={"format": "pt"})
    (root / "ep8_mp2.yaml").write_text("mesh: {ep: 8, mp: 2}\nparams:\n"
                                       "  - {match: '.*experts\\.w[13]', spec: [ep, mp, null]}\n"
                                       "  - {match: '.*experts\\.w2', spec: [ep, null, mp]}\n"
                                       "  - {match: '.*', spec: []}\n")


def prepare_fp8(root: Path) -> None:
    """An FP8 block-scaled checkpoint (scales follow their weights' specs) and a 2-way tensor parallel layout."""
    write_fp8_checkpoint(root / "models" / "DeepSeek-V3" / "model.safetensors")
    (root / "my_layout.yaml").write_text("mesh: {mp: 2}\nparams:\n"
                                         "  - {match: '.*\\.([qkv]|gate|up)_proj\\.weight', spec: [mp, null]}\n"
                                         "  - {match: '.*\\.(o|down)_proj\\.weight', spec: [null, mp]}\n"
                                         "  - {match: '.*', spec: []}\n")


def same_tensors(a: Path, b: Path, ordered: bool = True) -> bool:
    left, right = _tensors(a), _tensors(b)
    names = (list(left) == list(right)) if ordered else (sorted(left) == sorted(right))
    return names and all(left[k].tobytes() == right[k].tobytes() for k in left)


def check_verify(root: Path, out: str) -> None:
    assert out.count("verified:") == 4, out
    assert (root / "B" / MANIFEST_NAME).is_file()


def check_mindspore(root: Path, out: str) -> None:
    outs = [p for p in root.iterdir() if p.is_dir() and (p / MANIFEST_NAME).is_file()]
    assert len(outs) == 3, outs
    first = next(p for p in outs if "dp2mp4" in p.name)
    assert sorted(p.name for p in first.glob("rank_*/*.ckpt")) == [f"checkpoint_{r}.ckpt" for r in range(8)]
    for rank in range(8):  # what MindSpore's transform_checkpoints wrote for the same conversion
        assert ((first / f"rank_{rank}" / f"checkpoint_{rank}.ckpt").read_bytes()
                == (MS / "ckpt" / "dp2mp4" / f"rank_{rank}" / f"checkpoint_{rank}.ckpt").read_bytes())
    assert any(list(p.glob("rank_0/*.safetensors")) for p in outs)


def check_strategy(root: Path, out: str) -> None:
    names = sorted(p.name for p in (root / "strategy").iterdir())
    assert names == sorted([f"ckpt_strategy_rank_{r}.ckpt" for r in range(8)] + ["merged_ckpt_strategy.ckpt"])


def check_hf(root: Path, out: str) -> None:
    assert sorted(p.name for p in (root / "llama_hf").iterdir()) == \
        ["config.json", MANIFEST_NAME, "model.safetensors"]
    assert same_tensors(root / "llama_hf" / "model.safetensors", root / "models/Llama-3-8B/model.safetensors",
                        ordered=False)  # --hf writes save_file's order


def check_moe(root: Path, out: str) -> None:
    assert len(list((root / "mixtral_ep").glob("rank_*/*.safetensors"))) == 16
    assert same_tensors(root / "mixtral_again" / "rank_0" / "checkpoint_0.safetensors",
                        root / "mixtral" / "model.safetensors", ordered=False)


def check_fp8(root: Path, out: str) -> None:
    kept = open_source(root / "ds_ep" / "rank_0").entries[0]
    assert any(n.endswith("_scale_inv") for n in kept) and any(e.dtype.itemsize == 1 for e in kept.values())
    dequantized = open_source(root / "ds_bf16" / "rank_0").entries[0]
    assert not any(n.endswith("_scale_inv") for n in dequantized)
    assert {e.dtype.name for e in dequantized.values()} >= {"bfloat16"}


RUN = {
    "Verify": (prepare_verify, check_verify),
    "MindSpore checkpoints and strategies/--dst-strategy strategy/dp2mp4.ckpt": (prepare_mindspore, check_mindspore),
    "MindSpore checkpoints and strategies/jaxreshard strategy --src model.safetensors": (prepare_strategy,
                                                                                          check_strategy),
    "Hugging Face models": (prepare_hf, check_hf),
    "MoE": (prepare_moe, check_moe),
    "FP8": (prepare_fp8, check_fp8),
}
