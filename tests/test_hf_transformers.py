"""Optional tier: a real client. transformers' Flax Llama (which nobody here wrote) saved with save_pretrained,
split to 4 ranks, resharded, merged with --hf, and loaded back with `FlaxLlamaForCausalLM.from_pretrained`:
the logits must equal the original model's bit for bit. Skipped unless transformers (4.x, which still has Flax
models) and flax import; README "Hugging Face models" says how to give them their own environment."""

from __future__ import annotations

import json

import numpy as np
import pytest

import jaxreshard as jr

transformers = pytest.importorskip("transformers", reason="the transformers tier needs transformers<5 and flax")
pytest.importorskip("flax", reason="the transformers tier needs flax")
if not hasattr(transformers, "FlaxLlamaForCausalLM"):
    pytest.skip(f"transformers {transformers.__version__} has no Flax models (use transformers<5)",
                allow_module_level=True)



def layout(path, mesh: dict, rules: list[tuple[str, list]]):
    body = "".join(f"  - {{match: '{m}', spec: {json.dumps(s)}}}\n" for m, s in rules)
    path.write_text(f"mesh: {json.dumps(mesh)}\nparams:\n{body}")
    return path


def test_flax_llama_round_trip_gives_the_same_logits(tmp_path):
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.FlaxLlamaForCausalLM(config, seed=0)
    src = tmp_path / "llama"
    model.save_pretrained(src, safe_serialization=True)  # model.safetensors ({"format": "flax"}), config files
    (src / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    ids = np.array([[1, 5, 9, 20, 3, 77, 100]])
    want = np.asarray(model(ids).logits)

    mp4 = layout(tmp_path / "mp4.yaml", {"mp": 4}, [(r".*kernel", [None, "mp"]), (r".*embedding", [None, "mp"])])
    dp2mp2 = layout(tmp_path / "dp2mp2.yaml", {"dp": 2, "mp": 2}, [(r".*(q|k|v|gate|up)_proj\.kernel", [None, "mp"]),
                                                                   (r".*(o|down)_proj\.kernel", ["mp", None])])
    jr.convert(src, tmp_path / "r4", dst_layout=mp4)
    jr.convert(tmp_path / "r4", tmp_path / "r22", dst_layout=dp2mp2)
    jr.convert(tmp_path / "r22", tmp_path / "hf", hf=True)
    out = tmp_path / "hf"
    for name in ("config.json", "generation_config.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes(), name
    assert (out / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()
    loaded = transformers.FlaxLlamaForCausalLM.from_pretrained(out)
    got = np.asarray(loaded(ids).logits)
    assert got.dtype == want.dtype and np.array_equal(got.view(np.uint32), want.view(np.uint32))
