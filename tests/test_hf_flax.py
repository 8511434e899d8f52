"""Optional tier: a Hugging Face (PyTorch-named) Llama checkpoint loaded with `jr.load(...,
transform="configs/transforms/hf_llama_to_flax.yaml")` straight into transformers' FlaxLlamaForCausalLM params
tree in tensor-parallel shardings, run, and compared with the model transformers itself loads.

Skipped unless transformers 4.x (with its Flax models) and flax import; see README "Transforms" for a venv.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import jaxreshard as jr

transformers = pytest.importorskip("transformers")
pytest.importorskip("flax")
if not hasattr(transformers, "FlaxLlamaForCausalLM"):
    pytest.skip("this transformers has no Flax models (they were removed in 5.x)", allow_module_level=True)


TEMPLATE = Path(__file__).parents[1] / "configs" / "transforms" / "hf_llama_to_flax.yaml"


def pytorch_names(flat: dict[tuple[str, ...], np.ndarray]) -> dict[str, np.ndarray]:
    """The checkpoint transformers' PyTorch Llama saves for these params: [out, in] `weight`s (written here
    independently of the template, which the test then checks)."""
    out = {}
    for key, value in flat.items():
        name, arr = ".".join(key), np.asarray(value)
        if name.endswith(".kernel"):
            out[name[: -len("kernel")] + "weight"] = np.ascontiguousarray(arr.T)
        elif name.endswith(".embedding"):
            out[name[: -len("embedding")] + "weight"] = arr
        else:
            out[name] = arr
    return out


def tp_spec(name: str):
    from jax.sharding import PartitionSpec as P

    if name.endswith(("o_proj.kernel", "down_proj.kernel")):
        return P("mp", None)  # row parallel: [in, out] split on in
    if name.endswith(".kernel"):
        return P(None, "mp")  # column parallel (q, k, v, gate, up, lm_head)
    if name.endswith(".embedding"):
        return P(None, "mp")
    return P()


def test_hf_llama_loads_into_flax_params_in_tensor_parallel_shardings(tmp_path):
    import jax
    from flax.traverse_util import flatten_dict, unflatten_dict
    from jax.sharding import Mesh, NamedSharding
    from safetensors.numpy import save_file
    from transformers import FlaxLlamaForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=False)
    model = FlaxLlamaForCausalLM(config, seed=0)
    folder = tmp_path / "hf"
    folder.mkdir()
    config.save_pretrained(folder)
    flat = flatten_dict(model.params)
    save_file(pytorch_names(flat), str(folder / "model.safetensors"), metadata={"format": "pt"})

    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("dp", "mp"))
    target = unflatten_dict({k: NamedSharding(mesh, tp_spec(".".join(k))) for k in flat})
    params = jr.load(folder, target, transform=str(TEMPLATE))
    loaded = flatten_dict(params)
    assert set(loaded) == set(flat)
    for key, value in flat.items():
        assert loaded[key].sharding == NamedSharding(mesh, tp_spec(".".join(key))), key
        np.testing.assert_array_equal(np.asarray(loaded[key]), np.asarray(value))

    reference = FlaxLlamaForCausalLM.from_pretrained(folder)  # transformers' own PyTorch -> Flax conversion
    for key, value in flatten_dict(reference.params).items():  # the very same params, bit for bit
        assert np.asarray(loaded[key]).tobytes() == np.asarray(value).tobytes(), key
    ids = np.array([[1, 5, 9, 2, 77, 3]], np.int32)
    theirs = np.asarray(reference(ids).logits)
    ours = np.asarray(model(ids, params=params).logits)  # run tensor parallel, straight from the shardings
    assert ours.shape == (1, 6, 128)
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-6)  # sharded sums add in another order
    on_one = jax.tree_util.tree_map(lambda a: jax.device_put(a, jax.devices()[0]), params)
    assert np.asarray(model(ids, params=on_one).logits).tobytes() == theirs.tobytes()  # same math: same bits
