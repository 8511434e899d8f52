"""Hugging Face folders both ways: a sharded PyTorch-named folder (index, config, tokenizer files) split to 4
ranks, resharded and merged with --hf gives what transformers' save_pretrained writes: `model.safetensors`
(byte for byte what safetensors' save_file writes with {"format": "pt"}), or parts + index past --max-file-size,
with every non-weight file carried through byte for byte."""

from __future__ import annotations

import json
import os
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import jaxreshard as jr
from jaxreshard.formats.manifest import MANIFEST_NAME, read_manifest

COMPANIONS = {
    "config.json": json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "vocab_size": 96}),
    "generation_config.json": json.dumps({"bos_token_id": 1, "eos_token_id": 2}, indent=2),
    "tokenizer.json": json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0, "é": 1}}}),
    "tokenizer_config.json": json.dumps({"model_max_length": 2048, "chat_template": "{{ messages }}"}),
    "special_tokens_map.json": '{"bos_token": "<s>"}',
    "chat_template.jinja": "{% for m in messages %}{{ m.content }}{% endfor %}\n",
    "README.md": "# tiny llama\n\u00fcnicode \u2713\n",
}


def llama_tensors(seed: int = 0) -> dict[str, np.ndarray]:
    """PyTorch Llama naming, [out, in] linear weights, mixed dtypes."""
    rng = np.random.default_rng(seed)
    t = {"model.embed_tokens.weight": rng.normal(size=(96, 64)).astype(np.float32)}
    for i in range(2):
        p = f"model.layers.{i}."
        for name, shape in [("self_attn.q_proj", (64, 64)), ("self_attn.k_proj", (32, 64)),
                            ("self_attn.v_proj", (32, 64)), ("self_attn.o_proj", (64, 64)),
                            ("mlp.gate_proj", (128, 64)), ("mlp.up_proj", (128, 64)),
                            ("mlp.down_proj", (64, 128))]:  # fmt: skip
            t[p + name + ".weight"] = rng.normal(size=shape).astype(ml_dtypes.bfloat16)
        t[p + "input_layernorm.weight"] = rng.normal(size=(64,)).astype(np.float32)
    t["model.norm.weight"] = rng.normal(size=(64,)).astype(np.float32)
    t["lm_head.weight"] = rng.normal(size=(96, 64)).astype(np.float32)
    return t


def hf_folder(root: Path, tensors: dict[str, np.ndarray], parts: int = 3) -> Path:
    """A Hugging Face sharded folder as save_pretrained writes it, plus its non-weight files."""
    root.mkdir(parents=True)
    names = list(tensors)
    chunks = [names[i::parts] for i in range(parts)]
    weight_map = {}
    for i, chunk in enumerate(chunks):
        file = f"model-{i + 1:05d}-of-{parts:05d}.safetensors"
        save_file({n: tensors[n] for n in chunk}, str(root / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in chunk})
    index = {"metadata": {"total_size": sum(a.nbytes for a in tensors.values())}, "weight_map": weight_map}
    (root / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    for name, text in COMPANIONS.items():
        (root / name).write_text(text, encoding="utf-8")
    return root


def layout(path: Path, mesh: dict, rules: list[tuple[str, list]], pipeline: int | None = None) -> Path:
    body = "".join(f"  - {{match: '{m}', spec: {json.dumps(s)}}}\n" for m, s in rules)
    stages = f"pipeline_stages: {pipeline}\n" if pipeline else ""
    path.write_text(f"mesh: {json.dumps(mesh)}\n{stages}params:\n{body}")
    return path


def companions_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name in COMPANIONS}


@pytest.fixture
def hf_src(tmp_path):
    tensors = llama_tensors()
    return hf_folder(tmp_path / "src", tensors), tensors


def test_split_reshard_merge_gives_what_transformers_writes(tmp_path, hf_src):
    src, tensors = hf_src
    mp4 = layout(tmp_path / "mp4.yaml", {"dp": 1, "mp": 4}, [(r".*_proj\.weight", ["mp", None]),
                                                               (r".*embed_tokens\.weight", [None, "mp"])])
    mp2 = layout(tmp_path / "mp2.yaml", {"dp": 2, "mp": 2}, [(r".*(q|k|v|gate|up)_proj\.weight", ["mp", None]),
                                                               (r".*(o|down)_proj\.weight", [None, "mp"])])
    jr.convert(src, tmp_path / "r4", dst_layout=mp4)
    jr.convert(tmp_path / "r4", tmp_path / "r2", dst_layout=mp2)
    for stage in ("r4", "r2"):  # per-rank outputs carry the companions at their root, listed in the manifest
        out = tmp_path / stage
        assert companions_of(out) == {n: t.encode() for n, t in COMPANIONS.items()}
        files = read_manifest(out).files
        assert all(name in files for name in COMPANIONS)
        assert not (out / "model.safetensors.index.json").exists()
    jr.convert(tmp_path / "r2", tmp_path / "hf", hf=True)
    out = tmp_path / "hf"
    assert sorted(p.name for p in out.iterdir()) == sorted([*COMPANIONS, "model.safetensors", MANIFEST_NAME])
    # the bytes transformers' save_pretrained writes for a model that fits in 5GB: safetensors.save_file with
    # {"format": "pt"} (transformers calls safe_save_file(shard, ..., metadata={"format": "pt"}))
    reference = tmp_path / "reference.safetensors"
    save_file(tensors, str(reference), metadata={"format": "pt"})
    assert (out / "model.safetensors").read_bytes() == reference.read_bytes()
    assert companions_of(out) == {n: t.encode() for n, t in COMPANIONS.items()}
    # and the output folder is a source again, companions included
    jr.convert(out, tmp_path / "again", dst_layout=mp4)
    assert companions_of(tmp_path / "again") == companions_of(out)


def test_hf_parts_past_max_file_size(tmp_path, hf_src):
    src, tensors = hf_src
    jr.convert(src, tmp_path / "hf", hf=True, max_file_size="40KB")
    out = tmp_path / "hf"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    parts = sorted({*index["weight_map"].values()})
    n = len(parts)
    assert n > 1 and parts == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert not (out / "model.safetensors").exists()
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in tensors.values())
    merged = {}
    for part in parts:
        loaded = load_file(out / part)
        assert set(loaded) == {k for k, v in index["weight_map"].items() if v == part}
        merged.update(loaded)
    assert sorted(merged) == sorted(tensors)
    for name, array in tensors.items():
        assert merged[name].dtype == array.dtype and merged[name].tobytes() == array.tobytes(), name
    assert companions_of(out) == {n: t.encode() for n, t in COMPANIONS.items()}


def test_metadata_kept_and_format_pt_added(tmp_path):
    tensors = {"w": np.arange(12, dtype=np.float32).reshape(3, 4)}
    save_file(tensors, str(tmp_path / "kept.safetensors"), metadata={"format": "flax", "note": "x"})
    save_file(tensors, str(tmp_path / "none.safetensors"))
    jr.convert(tmp_path / "kept.safetensors", tmp_path / "a", hf=True)
    jr.convert(tmp_path / "none.safetensors", tmp_path / "b", hf=True)
    from safetensors import safe_open

    with safe_open(tmp_path / "a/model.safetensors", "np") as f:
        assert f.metadata() == {"format": "flax", "note": "x"}
    with safe_open(tmp_path / "b/model.safetensors", "np") as f:
        assert f.metadata() == {"format": "pt"}
    jr.convert(tmp_path / "none.safetensors", tmp_path / "c")  # not HF: nothing invented
    with safe_open(tmp_path / "c/model.safetensors" if (tmp_path / "c/model.safetensors").exists()
                   else next((tmp_path / "c").rglob("*.safetensors")), "np") as f:  # fmt: skip
        assert not f.metadata()


def test_single_file_source_carries_nothing_and_links_out_are_refused(tmp_path, hf_src):
    src, _ = hf_src
    jr.convert(src / "model-00001-of-00003.safetensors", tmp_path / "one")  # a file, not a folder: no companions
    assert companions_of(tmp_path / "one") == {}
    secret = tmp_path / "secret.txt"
    secret.write_text("not part of the model")
    os.symlink(secret, src / "tokenizer.model")
    with pytest.raises(jr.JaxreshardError, match=r"tokenizer\.model: a link to .*outside the source folder"):
        jr.convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _readme_python(section: str) -> str:
    text = (Path(__file__).parents[1] / "README.md").read_text()
    body = text.split(f"## {section}\n")[1].split("\n## ")[0]
    (block,) = [part.split("```")[0] for part in body.split("```python")[1:]]
    return block


def run_readme_example(section: str, tmp_path: Path) -> str:
    """Run the one Python example of a README section as written, in a folder holding only `configs/`."""
    import subprocess
    import sys

    repo = Path(__file__).parents[1]
    (tmp_path / "configs").symlink_to(repo / "configs")
    script = tmp_path / "example.py"
    script.write_text(_readme_python(section))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = os.pathsep.join([str(repo), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_readme_hugging_face_example_runs(tmp_path):
    out = run_readme_example("Hugging Face models", tmp_path)
    assert out.strip() == str(['config.json', 'jaxreshard.manifest.json', 'model.safetensors', 'tokenizer_config.json'])
    from jaxreshard.formats import open_source

    a, b = open_source(tmp_path / "hf_llama").entries[0], open_source(tmp_path / "llama_hf").entries[0]
    assert sorted(a) == sorted(b) and all(a[n].shape == b[n].shape and a[n].dtype == b[n].dtype for n in a)


def test_unify_carries_the_companions(tmp_path, hf_src):
    from jaxreshard.unify import unify

    src, _ = hf_src
    mp2 = layout(tmp_path / "mp2.yaml", {"mp": 2}, [(r".*_proj\.weight", ["mp", None])])
    jr.convert(src, tmp_path / "r2", dst_layout=mp2)
    unify(tmp_path / "r2", tmp_path / "u")
    assert companions_of(tmp_path / "u") == {n: t.encode() for n, t in COMPANIONS.items()}
    assert all(name in read_manifest(tmp_path / "u").files for name in COMPANIONS)


def test_ranks_runs_place_the_companions_once(tmp_path, hf_src):
    src, _ = hf_src
    mp2 = layout(tmp_path / "mp2.yaml", {"mp": 2}, [(r".*_proj\.weight", ["mp", None])])
    jr.convert(src, tmp_path / "r2", dst_layout=mp2, ranks="0")
    jr.convert(src, tmp_path / "r2", dst_layout=mp2, ranks="1")  # the second node finds them there, identical
    out = tmp_path / "r2"
    assert companions_of(out) == {n: t.encode() for n, t in COMPANIONS.items()}
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []
    files = read_manifest(out).files
    assert all(name in files for name in COMPANIONS) and "rank_0/checkpoint_0.safetensors" in files
    (out / "README.md").write_text("someone else's readme")
    with pytest.raises(jr.JaxreshardError, match=r"README.md: the destination already has a different README.md"):
        jr.convert(src, out, dst_layout=mp2, ranks="1", overwrite=True)
    assert (out / "README.md").read_text() == "someone else's readme"  # never overwritten


def test_what_counts_as_a_companion():
    from jaxreshard.formats.companions import is_companion_name

    kept = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer.model", "vocab.txt", "merges.txt",
            "chat_template.jinja", "README.md", "LICENSE", "preprocessor_config.json"]
    left = ["model.safetensors", "model-00001-of-00002.safetensors", "model.safetensors.index.json",
            "pytorch_model.bin", "pytorch_model.bin.index.json", "flax_model.msgpack", "tf_model.h5", "rank0.ckpt",
            "param_name_map.json", "jaxreshard.manifest.json", ".gitattributes", ".jaxreshard.lock", "m.gguf"]
    assert [n for n in kept if is_companion_name(n)] == kept
    assert [n for n in left if is_companion_name(n)] == []
