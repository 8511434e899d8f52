"""LoRA merge (`jaxreshard merge-lora` and the drop-in `tools/transform_ckpt_lora.py`), from issue 5's contract.

Expected values come from an independent numpy computation, W' = cast_to_base_dtype(f32(W) + s * f32(B) @ f32(A))
(float64 bases in float64). Inputs are small multiples of 1/8 or 1/16 with r <= 4 so the matmul and the sum are
exact in float32 whatever the BLAS blocking: only the final cast rounds, and it must round to nearest even.
Expected shards are numpy slices following the layout contract (row-major ranks over the mesh axes as written).
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file, save_file

from jaxreshard.box import Box
from jaxreshard.cli import main
from jaxreshard.formats import open_source
from jaxreshard.formats.base import FileHandles, read_box
from jaxreshard.formats.manifest import MANIFEST_NAME
from jaxreshard.formats.mindspore_ckpt_write import write_ckpt

from .helpers import block_slices

REPO_ROOT = Path(__file__).resolve().parents[1]
BF16 = np.dtype(ml_dtypes.bfloat16)
F32, F16, F64 = np.dtype(np.float32), np.dtype(np.float16), np.dtype(np.float64)

# ------------------------------------------------------------------------------------------------ helpers


def grid(rng, shape, denom: int, lo: int = -8, hi: int = 9, dtype=F32) -> np.ndarray:
    """Small multiples of 1/denom: exactly representable, and B @ A of them is exact in float32."""
    return (rng.integers(lo, hi, size=shape).astype(np.float64) / denom).astype(dtype)


def rounding_base(rng, shape, dtype) -> np.ndarray:
    """A base whose magnitudes make the final cast to `dtype` round (bf16: ulp 1/32 in [4, 8); f16: 1/16 in
    [64, 128)), values on that ulp grid so they are exact in `dtype`."""
    if dtype == BF16:
        mag = rng.integers(128, 256, size=shape) / 32.0
    elif dtype == F16:
        mag = rng.integers(1024, 2048, size=shape) / 16.0
    else:
        raise AssertionError(dtype)
    sign = np.where(rng.integers(0, 2, size=shape) == 1, 1.0, -1.0)
    return (mag * sign).astype(dtype)


def merged(W: np.ndarray, A: np.ndarray, B: np.ndarray, s: float, transposed: bool = False) -> np.ndarray:
    work = F64 if W.dtype == F64 else F32
    delta = B.astype(work) @ A.astype(work)
    if transposed:
        delta = delta.T
    return (W.astype(work) + work.type(s) * delta).astype(W.dtype)


def naive_truncation_bf16(W: np.ndarray, A: np.ndarray, B: np.ndarray, s: float) -> np.ndarray:
    exact = W.astype(F32) + F32.type(s) * (B.astype(F32) @ A.astype(F32))
    return (exact.view(np.uint32) >> 16).astype(np.uint16)


def read_all(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a complete checkpoint (any format), read with jaxreshard's indexer."""
    source = open_source(path)
    (entries,) = source.entries.values()
    out = {}
    with FileHandles() as handles:
        for name, entry in entries.items():
            buf = np.empty(entry.shape, entry.dtype)
            read_box(handles, entry, Box.full(entry.shape), buf)
            out[name] = buf
    return out


def assert_same(got: dict[str, np.ndarray], expected: dict[str, np.ndarray], where: str = "") -> None:
    assert sorted(got) == sorted(expected), where
    for name, array in expected.items():
        assert got[name].dtype == array.dtype, (where, name, got[name].dtype, array.dtype)
        assert got[name].shape == array.shape, (where, name, got[name].shape, array.shape)
        if got[name].tobytes() != array.tobytes():
            diff = np.argwhere(got[name].astype(F64) != array.astype(F64))
            pytest.fail(f"{where} {name}: {len(diff)} element(s) differ, first at {diff[:3].tolist()}: got "
                        f"{got[name][tuple(diff[0])] if len(diff) else '?'}, expected "
                        f"{array[tuple(diff[0])] if len(diff) else '?'}")


def save(path: Path, tensors: dict[str, np.ndarray]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".ckpt":
        write_ckpt(path, tensors)
    else:
        save_file({k: np.require(v, requirements="C") for k, v in tensors.items()}, path)
    return path


def run_ok(capsys, argv) -> str:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def run_bad(capsys, argv, dst: Path, *needles: str) -> str:
    """Exit 2, exactly one `jaxreshard: error:` line (no traceback), naming `needles`; no output left."""
    code = main([str(a) for a in argv])
    _, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("jaxreshard: error:"), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert not dst.exists(), sorted(p.name for p in dst.rglob("*"))
    leftovers = [p.name for p in dst.parent.iterdir() if p.name.startswith(("." + dst.name, dst.name + "."))
                 or ".partial" in p.name]
    assert not leftovers, leftovers
    return lines[0]


def complete_out(dst: Path, fmt: str = "safetensors", prefix: str = "checkpoint_") -> Path:
    files = sorted(p for p in dst.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)
    assert files == [dst / "rank_0" / f"{prefix}0.{fmt}"], files
    return files[0]


def write_layout(path: Path, mesh: dict, rules: list[tuple[str, list]]) -> Path:
    params = [{"match": regex, "spec": spec} for regex, spec in rules]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"mesh": mesh, "params": params}, sort_keys=False))
    return path


def expected_rank(tensors: dict[str, np.ndarray], mesh: dict, rules, rank: int) -> dict[str, np.ndarray]:
    """What `rank` holds under a one-stage layout: the first rule that fullmatches; no rule = replicated."""
    names, sizes = list(mesh), list(mesh.values())
    coords = dict(zip(names, np.unravel_index(rank, sizes)))
    out = {}
    for param, array in tensors.items():
        spec = next((r[1] for r in rules if re.fullmatch(r[0], param)), [])
        out[param] = array[block_slices(array.shape, spec, mesh, coords)]
    return out


def check_distributed(dst: Path, tensors, mesh, rules, fmt: str = "safetensors") -> None:
    n = math.prod(mesh.values())
    assert sorted(p.name for p in dst.iterdir() if p.name != MANIFEST_NAME) == sorted(f"rank_{r}" for r in range(n))
    for rank in range(n):
        files = sorted((dst / f"rank_{rank}").iterdir())
        assert [f.name for f in files] == [f"checkpoint_{rank}.{fmt}"]
        assert_same(read_all(files[0]), expected_rank(tensors, mesh, rules, rank), f"rank {rank}")


# ---------------------------------------------------------------------------------------------- every naming convention

R = 4
S = 2.0


def naming_checkpoint(seed: int = 0):
    """One module per naming convention, bf16 / f32 / f16 / f64 bases, fp32 factors, plus non-LoRA parameters
    and MindSpore optimizer states. Returns (tensors in the file, expected merged output, expected with
    --keep-optimizer-states)."""
    rng = np.random.default_rng(seed)
    t: dict[str, np.ndarray] = {}
    expect: dict[str, np.ndarray] = {}
    # mindpet: X.mindpet_delta_lora_a/_b -> X.weight; bf16 base where the final cast rounds
    W = rounding_base(rng, (16, 8), BF16)
    A, B = grid(rng, (R, 8), 8), grid(rng, (16, R), 8)
    t |= {"m.l0.wq.weight": W, "m.l0.wq.mindpet_delta_lora_a": A, "m.l0.wq.mindpet_delta_lora_b": B}
    expect["m.l0.wq.weight"] = merged(W, A, B, S)
    trunc = naive_truncation_bf16(W, A, B, S)
    assert (expect["m.l0.wq.weight"].view(np.uint16) != trunc).any(), "test data must make RNE matter"
    assert (expect["m.l0.wq.weight"].astype(F32) != W.astype(F32) + S * (B @ A)).any(), "the cast must round"
    # X.lora_a / X.lora_b -> X.weight, f32 base
    W = grid(rng, (16, 8), 16)
    A, B = grid(rng, (R, 8), 8), grid(rng, (16, R), 8)
    t |= {"m.l0.wk.weight": W, "m.l0.wk.lora_a": A, "m.l0.wk.lora_b": B}
    expect["m.l0.wk.weight"] = merged(W, A, B, S)
    # PEFT X.lora_A.weight / X.lora_B.weight -> X.weight, f16 base (rounds too), non-square the other way
    W = rounding_base(rng, (8, 16), F16)
    A, B = grid(rng, (R, 16), 8), grid(rng, (8, R), 8)
    t |= {"m.l0.wv.weight": W, "m.l0.wv.lora_A.weight": A, "m.l0.wv.lora_B.weight": B}
    expect["m.l0.wv.weight"] = merged(W, A, B, S)
    assert (expect["m.l0.wv.weight"].astype(F32) != W.astype(F32) + S * (B @ A)).any()
    # PEFT with X.base_layer.weight -> output X.weight
    W = grid(rng, (16, 16), 16)
    A, B = grid(rng, (R, 16), 8), grid(rng, (16, R), 8)
    t |= {"m.l0.wo.base_layer.weight": W, "m.l0.wo.lora_A.weight": A, "m.l0.wo.lora_B.weight": B}
    expect["m.l0.wo.weight"] = merged(W, A, B, S)
    # float64 base: computed in float64 (bits below float32's precision survive)
    W = 1.0 + grid(rng, (8, 8), 16, dtype=F64) + rng.integers(1, 2**20, size=(8, 8)) * 2.0**-45
    A, B = grid(rng, (R, 8), 8), grid(rng, (8, R), 8)
    t |= {"m.l1.w.weight": W, "m.l1.w.lora_a": A, "m.l1.w.lora_b": B}
    expect["m.l1.w.weight"] = merged(W, A, B, S)
    assert (expect["m.l1.w.weight"] != merged(W.astype(F32), A, B, S).astype(F64)).any()
    # untouched parameters (arbitrary bit patterns)
    plain = {
        "m.norm.weight": rng.standard_normal(16).astype(F32),
        "m.embed.weight": rng.standard_normal((12, 8)).astype(F32).astype(BF16),
        "m.l0.wq.bias": rng.standard_normal(16).astype(F16),
        "global_step": np.array(123456789012, dtype=np.int64),
        "current_iterator_step": np.array([7], dtype=np.int32),
    }
    t |= plain
    expect |= plain
    # optimizer states: of base weights, of non-LoRA params, and of the LoRA factors themselves
    opt = {
        "adam_m.m.l0.wq.weight": rng.standard_normal((16, 8)).astype(F32),
        "adam_v.m.l0.wq.weight": rng.standard_normal((16, 8)).astype(F32),
        "adam_v.m.norm.weight": rng.standard_normal(16).astype(F32),
        "adam_m.m.l0.wo.base_layer.weight": rng.standard_normal((16, 16)).astype(F32),
    }
    lora_opt = {  # as MindSpore saves them: adam_m and adam_v of every trainable factor
        f"{state}.{name}": rng.standard_normal(t[name].shape).astype(F32)
        for state in ("adam_m", "adam_v") for name in list(t) if "lora" in name
    }
    t |= opt | lora_opt
    keep = dict(expect)
    keep |= {k.replace(".base_layer.", "."): v for k, v in opt.items()}
    return t, expect, keep


@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
def test_every_naming_convention_complete_input(tmp_path, capsys, fmt):
    tensors, expect, _ = naming_checkpoint()
    src = save(tmp_path / "src" / f"model.{fmt}", tensors)
    dst = tmp_path / "out"
    run_ok(capsys, ["merge-lora", "--src", src, "--dst", dst, "--lora-scaling", S, "-q"])
    out = complete_out(dst, fmt)
    got = read_all(out)
    assert not [n for n in got if "lora" in n.lower() or "base_layer" in n or n.startswith(("adam_", "accu_"))]
    assert_same(got, expect, fmt)
    if fmt == "safetensors":  # loads as a plain base checkpoint with the reference reader
        assert_same(load_file(out), expect, "safetensors.load_file")


def test_keep_optimizer_states(tmp_path, capsys):
    tensors, _, keep = naming_checkpoint()
    src = save(tmp_path / "src" / "model.safetensors", tensors)
    dst = tmp_path / "out"
    run_ok(capsys, ["merge-lora", "--src", src, "--dst", dst, "--lora-scaling", S, "--keep-optimizer-states", "-q"])
    # base weights' states kept byte for byte (base_layer renamed like its weight); the factors' states dropped
    assert_same(load_file(complete_out(dst)), keep, "--keep-optimizer-states")


def test_output_format_and_prefix(tmp_path, capsys):
    tensors, expect, _ = naming_checkpoint(1)
    src = save(tmp_path / "src" / "model.safetensors", tensors)
    dst = tmp_path / "out"
    run_ok(capsys, ["merge-lora", "--src", src, "--dst", dst, "--lora-scaling", S, "--output-format", "ckpt",
                    "--prefix", "merged_", "-q"])
    assert_same(read_all(complete_out(dst, "ckpt", "merged_")), expect, "ckpt output")


def test_merged_output_converts_further(tmp_path, capsys):
    tensors, expect, _ = naming_checkpoint(2)
    src = save(tmp_path / "src" / "model.safetensors", tensors)
    dst = tmp_path / "out"
    run_ok(capsys, ["merge-lora", "--src", src, "--dst", dst, "--lora-scaling", S, "-q"])
    merged_file = complete_out(dst)
    mesh = {"dp": 2, "mp": 4}
    rules = [(r"m\.l0\.w[qk]\.weight", ["mp", None]), (r"m\.l0\.w[vo]\.weight", [None, "mp"]),
             (r"m\.norm\.weight", ["mp"]), (r".*", [])]
    layout = write_layout(tmp_path / "l.yaml", mesh, rules)
    split = tmp_path / "split"
    run_ok(capsys, ["convert", "--src", merged_file, "--dst", split, "--dst-layout", layout, "-q"])
    check_distributed(split, expect, mesh, rules)


def test_reports_max_delta_per_weight(tmp_path, capsys, caplog):
    rng = np.random.default_rng(3)
    W, A, B = grid(rng, (16, 8), 16), grid(rng, (R, 8), 8), grid(rng, (16, R), 8)
    src = save(tmp_path / "src" / "model.safetensors", {"blk.proj.weight": W, "blk.proj.lora_A.weight": A,
                                                        "blk.proj.lora_B.weight": B})
    caplog.set_level(logging.INFO)
    run_ok(capsys, ["merge-lora", "--src", src, "--dst", tmp_path / "out", "--lora-scaling", "0.5"])
    want = float(np.abs(0.5 * (B.astype(F64) @ A.astype(F64))).max())
    text = caplog.text + capsys.readouterr().err
    lines = [line for line in text.splitlines() if "blk.proj" in line]
    assert lines, text
    numbers = [float(x) for line in lines for x in re.findall(r"[-+]?\d+\.?\d*(?:[eE][-+]?\d+)?", line)]
    assert any(math.isclose(x, want, rel_tol=1e-5) for x in numbers), (want, lines)


# ------------------------------------------------------------------------------------------------ distributed input

DMESH = {"dp": 2, "mp": 4}
LORA_A = r".*(lora_A\.weight|lora_a)"
LORA_B = r".*(lora_B\.weight|lora_b)"
SRC_LAYOUTS = {
    # compatible: base and B split on rows, A on columns
    # (rules name the parameters as stored: PEFT's `o` base is `layers.0.o.base_layer.weight`)
    "rows": [(LORA_A, [None, "mp"]), (LORA_B, ["mp", None]), (r".*\.(q|k)\.weight", ["mp", None]),
             (r".*\.o\.base_layer\.weight", ["mp", None]), (r"norm\.weight", ["mp"]), (r".*", [])],
    # incompatible: base split on columns while B is split on rows
    "cols": [(LORA_A, [None, "mp"]), (LORA_B, ["mp", None]), (r".*\.(q|k)\.weight", [None, "mp"]),
             (r".*\.o\.base_layer\.weight", [None, "mp"]), (r".*", [])],
    # factors split on r (A rows, B columns), base on rows over both axes
    "rank": [(LORA_A, ["mp", None]), (LORA_B, [None, "mp"]), (r".*\.(q|k)\.weight", [["dp", "mp"], None]),
             (r".*\.o\.base_layer\.weight", [["dp", "mp"], None]), (r".*", [])],
}
DST_RULES = [(r".*\.q\.weight", [None, "mp"]), (r".*\.k\.weight", [["mp", "dp"], None]),
             (r".*\.o\.weight", ["dp", "mp"]), (r"norm\.weight", ["mp"]), (r".*", [])]


def distributed_checkpoint(seed: int = 5):
    rng = np.random.default_rng(seed)
    t, expect = {}, {}
    W = rounding_base(rng, (16, 8), BF16)  # PEFT names, bf16 base
    A, B = grid(rng, (R, 8), 8), grid(rng, (16, R), 8)
    t |= {"layers.0.q.weight": W, "layers.0.q.lora_A.weight": A, "layers.0.q.lora_B.weight": B}
    expect["layers.0.q.weight"] = merged(W, A, B, S)
    W = grid(rng, (16, 8), 16)  # mindpet names, f32 base
    A, B = grid(rng, (R, 8), 8), grid(rng, (16, R), 8)
    t |= {"layers.0.k.weight": W, "layers.0.k.mindpet_delta_lora_a": A, "layers.0.k.mindpet_delta_lora_b": B}
    expect["layers.0.k.weight"] = merged(W, A, B, S)
    W = grid(rng, (8, 16), 16)  # base_layer, f32
    A, B = grid(rng, (R, 16), 8), grid(rng, (8, R), 8)
    t |= {"layers.0.o.base_layer.weight": W, "layers.0.o.lora_A.weight": A, "layers.0.o.lora_B.weight": B}
    expect["layers.0.o.weight"] = merged(W, A, B, S)
    plain = {"norm.weight": rng.standard_normal(8).astype(F32), "step": np.array(42, dtype=np.int64)}
    return t | plain, expect | plain


@pytest.fixture(scope="module")
def distributed_sources(tmp_path_factory):
    """The complete checkpoint split by `jaxreshard convert` into each source layout (safetensors and ckpt)."""
    root = tmp_path_factory.mktemp("lora_dist")
    tensors, expect = distributed_checkpoint()
    src = save(root / "complete" / "model.safetensors", tensors)
    out = {}
    for name, rules in SRC_LAYOUTS.items():
        layout = write_layout(root / f"{name}.yaml", DMESH, rules)
        for fmt in ("safetensors", "ckpt"):
            dist = root / f"dist_{name}_{fmt}"
            assert main(["convert", "--src", str(src), "--dst", str(dist), "--dst-layout", str(layout),
                         "--output-format", fmt, "-q"]) == 0
            check_distributed(dist, tensors, DMESH, rules, fmt)  # the split itself is right
            out[name, fmt] = (dist, layout)
    return out, expect, root


@pytest.mark.parametrize("layout", list(SRC_LAYOUTS))
@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
def test_distributed_input_to_complete(tmp_path, capsys, distributed_sources, layout, fmt):
    sources, expect, _ = distributed_sources
    dist, layout_file = sources[layout, fmt]
    dst = tmp_path / "out"
    run_ok(capsys, ["merge-lora", "--src", dist, "--src-layout", layout_file, "--dst", dst, "--lora-scaling", S,
                    "-q"])
    assert_same(read_all(complete_out(dst, fmt)), expect, f"{layout}/{fmt}")


@pytest.mark.parametrize("layout", list(SRC_LAYOUTS))
def test_distributed_input_to_destination_layout(tmp_path, capsys, distributed_sources, layout):
    sources, expect, root = distributed_sources
    dist, layout_file = sources[layout, "safetensors"]
    dst_layout = write_layout(tmp_path / "dst.yaml", DMESH, DST_RULES)
    dst = tmp_path / "out"
    run_ok(capsys, ["merge-lora", "--src", dist, "--src-layout", layout_file, "--dst", dst,
                    "--dst-layout", dst_layout, "--lora-scaling", S, "-q"])
    check_distributed(dst, expect, DMESH, DST_RULES)


def test_complete_input_to_destination_layout(tmp_path, capsys):
    tensors, expect = distributed_checkpoint(6)
    src = save(tmp_path / "src" / "model.safetensors", tensors)
    dst_layout = write_layout(tmp_path / "dst.yaml", DMESH, DST_RULES)
    dst = tmp_path / "out"
    run_ok(capsys, ["merge-lora", "--src", src, "--dst", dst, "--dst-layout", dst_layout, "--lora-scaling", S, "-q"])
    check_distributed(dst, expect, DMESH, DST_RULES)


def test_distributed_input_needs_a_layout(tmp_path, capsys, distributed_sources):
    sources, _, _ = distributed_sources
    shared, _ = sources["rows", "safetensors"]
    dist = tmp_path / "foreign"
    shutil.copytree(shared, dist)
    (dist / MANIFEST_NAME).unlink(missing_ok=True)  # as another tool writes it: nothing records the layout
    run_bad(capsys, ["merge-lora", "--src", dist, "--dst", tmp_path / "out", "--lora-scaling", S, "-q"],
            tmp_path / "out")


# ---------------------------------------------------------------------------------------------- PEFT adapters, scaling

MODULES = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"]


def peft_case(tmp_path: Path, config: dict | None, ranks: dict[str, int] | None = None, seed: int = 7):
    """A base checkpoint and a separate PEFT adapter directory; returns (base file, adapter dir, W, A, B)."""
    rng = np.random.default_rng(seed)
    ranks = ranks or {}
    base, adapter, Ws, As, Bs = {}, {}, {}, {}, {}
    dtypes = {MODULES[0]: F32, MODULES[1]: BF16, MODULES[2]: F32}
    for m in MODULES:
        r = ranks.get(m, R)
        Ws[m] = grid(rng, (16, 8), 16) if dtypes[m] == F32 else rounding_base(rng, (16, 8), BF16)
        As[m], Bs[m] = grid(rng, (r, 8), 8), grid(rng, (16, r), 8)
        base[m + ".weight"] = Ws[m]
        adapter[f"base_model.model.{m}.lora_A.weight"] = As[m]
        adapter[f"base_model.model.{m}.lora_B.weight"] = Bs[m]
    base["model.norm.weight"] = rng.standard_normal(8).astype(F32)
    base["lm_head.weight"] = rng.standard_normal((12, 8)).astype(F32)
    base_file = save(tmp_path / "base" / "model.safetensors", base)
    adir = tmp_path / "adapter"
    save(adir / "adapter_model.safetensors", adapter)
    if config is not None:
        (adir / "adapter_config.json").write_text(json.dumps(
            {"peft_type": "LORA", "target_modules": ["q_proj", "k_proj", "v_proj"], "lora_dropout": 0.0,
             "bias": "none", "fan_in_fan_out": False, "use_rslora": False, **config}))
    return base_file, adir, base, Ws, As, Bs


def expected_peft(base, Ws, As, Bs, scales: dict[str, float]) -> dict[str, np.ndarray]:
    out = dict(base)
    for m in MODULES:
        out[m + ".weight"] = merged(Ws[m], As[m], Bs[m], scales[m])
    return out


@pytest.mark.parametrize("case", ["alpha_over_r", "rslora", "patterns", "flag_overrides_config"])
def test_peft_adapter_scaling(tmp_path, capsys, case):
    ranks = None
    extra: list[str] = []
    if case == "alpha_over_r":
        config, scales = {"r": 4, "lora_alpha": 8}, dict.fromkeys(MODULES, 2.0)
    elif case == "rslora":  # alpha / sqrt(r) = 8 / 2, not alpha / r = 2
        config, scales = {"r": 4, "lora_alpha": 8, "use_rslora": True}, dict.fromkeys(MODULES, 4.0)
    elif case == "patterns":  # q: 4/4, k: 8/4, v: 8/2 (its factors have rank 2)
        config = {"r": 4, "lora_alpha": 8, "alpha_pattern": {"q_proj": 4}, "rank_pattern": {"v_proj": 2}}
        ranks = {MODULES[2]: 2}
        scales = {MODULES[0]: 1.0, MODULES[1]: 2.0, MODULES[2]: 4.0}
    else:
        config, scales = {"r": 4, "lora_alpha": 8}, dict.fromkeys(MODULES, 0.5)
        extra = ["--lora-scaling", "0.5"]
    base_file, adir, base, Ws, As, Bs = peft_case(tmp_path, config, ranks)
    dst = tmp_path / "out"
    run_ok(capsys, ["merge-lora", "--src", base_file, "--adapter", adir, "--dst", dst, *extra, "-q"])
    got = load_file(complete_out(dst))
    assert_same(got, expected_peft(base, Ws, As, Bs, scales), case)


def test_peft_adapter_with_destination_layout(tmp_path, capsys):
    base_file, adir, base, Ws, As, Bs = peft_case(tmp_path, {"r": 4, "lora_alpha": 16}, seed=8)
    expect = expected_peft(base, Ws, As, Bs, dict.fromkeys(MODULES, 4.0))
    rules = [(r".*\.[qk]_proj\.weight", ["mp", None]), (r".*\.v_proj\.weight", [None, "mp"]), (r".*", [])]
    layout = write_layout(tmp_path / "dst.yaml", DMESH, rules)
    dst = tmp_path / "out"
    run_ok(capsys, ["merge-lora", "--src", base_file, "--adapter", adir, "--dst", dst, "--dst-layout", layout, "-q"])
    check_distributed(dst, expect, DMESH, rules)


# ------------------------------------------------------------------------------------------------ fan_in_fan_out


def test_transposed_base_non_square_detected(tmp_path, capsys):
    rng = np.random.default_rng(9)
    W = grid(rng, (8, 24), 16)  # GPT-2 Conv1D: stored [in, out]
    A, B = grid(rng, (R, 8), 8), grid(rng, (24, R), 8)
    other = grid(rng, (16, 8), 16)  # a normal one beside it
    A2, B2 = grid(rng, (R, 8), 8), grid(rng, (16, R), 8)
    src = save(tmp_path / "src" / "model.safetensors", {
        "h.0.attn.c_attn.weight": W, "h.0.attn.c_attn.lora_A.weight": A, "h.0.attn.c_attn.lora_B.weight": B,
        "h.0.mlp.fc.weight": other, "h.0.mlp.fc.lora_A.weight": A2, "h.0.mlp.fc.lora_B.weight": B2,
    })  # fmt: skip
    expect = {"h.0.attn.c_attn.weight": merged(W, A, B, S, transposed=True),
              "h.0.mlp.fc.weight": merged(other, A2, B2, S)}
    for flag in ([], ["--fan-in-fan-out"]):
        dst = tmp_path / f"out{len(flag)}"
        run_ok(capsys, ["merge-lora", "--src", src, "--dst", dst, "--lora-scaling", S, *flag, "-q"])
        if flag:  # with the flag every square-or-crossed base is transposed; the [16, 8] fc is not crossed
            assert_same(load_file(complete_out(dst)), expect, "--fan-in-fan-out")
        else:
            assert_same(load_file(complete_out(dst)), expect, "auto")


def test_square_fan_in_fan_out_from_adapter_config(tmp_path, capsys):
    rng = np.random.default_rng(10)
    W = grid(rng, (8, 8), 16)
    A, B = grid(rng, (R, 8), 8), grid(rng, (8, R), 8)
    assert not np.array_equal(B @ A, (B @ A).T)
    save(tmp_path / "base" / "model.safetensors", {"transformer.h.0.attn.c_proj.weight": W})
    adir = tmp_path / "adapter"
    save(adir / "adapter_model.safetensors", {"base_model.model.transformer.h.0.attn.c_proj.lora_A.weight": A,
                                              "base_model.model.transformer.h.0.attn.c_proj.lora_B.weight": B})
    (adir / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8, "fan_in_fan_out": True}))
    dst = tmp_path / "out"
    run_ok(capsys, ["merge-lora", "--src", tmp_path / "base" / "model.safetensors", "--adapter", adir, "--dst", dst,
                    "-q"])
    assert_same(load_file(complete_out(dst)),
                {"transformer.h.0.attn.c_proj.weight": merged(W, A, B, 2.0, transposed=True)}, "fan_in_fan_out")
    # --lora-scaling replaces the scale only: the config still says the square base is stored transposed
    run_ok(capsys, ["merge-lora", "--src", tmp_path / "base" / "model.safetensors", "--adapter", adir, "--dst",
                    tmp_path / "out2", "--lora-scaling", "0.5", "-q"])
    assert_same(load_file(complete_out(tmp_path / "out2")),
                {"transformer.h.0.attn.c_proj.weight": merged(W, A, B, 0.5, transposed=True)}, "scale flag")


def test_square_fan_in_fan_out_flag(tmp_path, capsys):
    rng = np.random.default_rng(11)
    W = grid(rng, (8, 8), 16)
    A, B = grid(rng, (R, 8), 8), grid(rng, (8, R), 8)
    src = save(tmp_path / "src" / "model.safetensors", {"c.weight": W, "c.lora_a": A, "c.lora_b": B})
    for flag, transposed in (([], False), (["--fan-in-fan-out"], True)):
        dst = tmp_path / f"out{len(flag)}"
        run_ok(capsys, ["merge-lora", "--src", src, "--dst", dst, "--lora-scaling", S, *flag, "-q"])
        assert_same(load_file(complete_out(dst)), {"c.weight": merged(W, A, B, S, transposed)}, str(flag))


# ------------------------------------------------------------------------------------------------ bad input


def small(rng):
    return grid(rng, (16, 8), 16), grid(rng, (R, 8), 8), grid(rng, (16, R), 8)


def test_missing_base_weight(tmp_path, capsys):
    W, A, B = small(np.random.default_rng(12))
    src = save(tmp_path / "src" / "model.safetensors", {"x.weight": W, "y.lora_A.weight": A, "y.lora_B.weight": B})
    run_bad(capsys, ["merge-lora", "--src", src, "--dst", tmp_path / "out", "--lora-scaling", S, "-q"],
            tmp_path / "out", "y.weight")


def test_lone_lora_a(tmp_path, capsys):
    W, A, _ = small(np.random.default_rng(13))
    src = save(tmp_path / "src" / "model.safetensors", {"x.weight": W, "x.lora_A.weight": A})
    run_bad(capsys, ["merge-lora", "--src", src, "--dst", tmp_path / "out", "--lora-scaling", S, "-q"],
            tmp_path / "out", "x.lora_A.weight", "x.lora_B.weight")


def test_lone_mindpet_b(tmp_path, capsys):
    W, _, B = small(np.random.default_rng(13))
    src = save(tmp_path / "src" / "model.ckpt", {"x.weight": W, "x.mindpet_delta_lora_b": B})
    run_bad(capsys, ["merge-lora", "--src", src, "--dst", tmp_path / "out", "--lora-scaling", S, "-q"],
            tmp_path / "out", "x.mindpet_delta_lora_b")


@pytest.mark.parametrize("shapes", [((4, 8), (16, 3)), ((4, 6), (16, 4)), ((4, 8), (12, 4))])
def test_shape_incompatible_factors(tmp_path, capsys, shapes):
    rng = np.random.default_rng(14)
    a_shape, b_shape = shapes
    src = save(tmp_path / "src" / "model.safetensors", {"x.weight": grid(rng, (16, 8), 16),
                                                        "x.lora_a": grid(rng, a_shape, 8),
                                                        "x.lora_b": grid(rng, b_shape, 8)})
    run_bad(capsys, ["merge-lora", "--src", src, "--dst", tmp_path / "out", "--lora-scaling", S, "-q"],
            tmp_path / "out", "x")


def test_no_scaling(tmp_path, capsys):
    W, A, B = small(np.random.default_rng(15))
    src = save(tmp_path / "src" / "model.safetensors", {"x.weight": W, "x.lora_a": A, "x.lora_b": B})
    line = run_bad(capsys, ["merge-lora", "--src", src, "--dst", tmp_path / "out", "-q"], tmp_path / "out")
    assert "scal" in line.lower(), line


def test_adapter_without_config_and_no_flag(tmp_path, capsys):
    base_file, adir, *_ = peft_case(tmp_path, None)
    run_bad(capsys, ["merge-lora", "--src", base_file, "--adapter", adir, "--dst", tmp_path / "out", "-q"],
            tmp_path / "out")


def test_nonexistent_adapter(tmp_path, capsys):
    W = grid(np.random.default_rng(16), (16, 8), 16)
    src = save(tmp_path / "src" / "model.safetensors", {"x.weight": W})
    run_bad(capsys, ["merge-lora", "--src", src, "--adapter", tmp_path / "nope", "--dst", tmp_path / "out",
                     "--lora-scaling", S, "-q"], tmp_path / "out", "nope")


def test_inf_after_cast_to_f16(tmp_path, capsys):
    """Finite in float32 but beyond float16's range: the result is Inf and must fail."""
    rng = np.random.default_rng(17)
    W = grid(rng, (16, 8), 16, dtype=F16)
    A, B = np.full((R, 8), 1.0, F32), np.full((16, R), 1.0, F32)
    src = save(tmp_path / "src" / "model.safetensors", {"x.weight": W, "x.lora_a": A, "x.lora_b": B})
    run_bad(capsys, ["merge-lora", "--src", src, "--dst", tmp_path / "out", "--lora-scaling", "1e6", "-q"],
            tmp_path / "out", "x")


def test_inf_after_cast_to_bf16_distributed(tmp_path, capsys):
    """Same, bf16 base (max ~3.4e38, as float32) overflowing in the float32 sum, on distributed input."""
    rng = np.random.default_rng(18)
    W = np.full((16, 8), 3e38, F32).astype(BF16)
    A, B = np.full((R, 8), 0.5, F32), np.full((16, R), 0.5, F32)  # s * B @ A = 1e38, finite; W + it is not
    src = save(tmp_path / "src" / "model.safetensors", {"x.weight": W, "x.lora_a": A, "x.lora_b": B,
                                                        "n.weight": grid(rng, (8,), 8)})
    rules = [(r"x\.lora_a", [None, "mp"]), (r"x\.lora_b", ["mp", None]), (r"x\.weight", ["mp", None]), (r".*", [])]
    layout = write_layout(tmp_path / "l.yaml", DMESH, rules)
    run_ok(capsys, ["convert", "--src", src, "--dst", tmp_path / "dist", "--dst-layout", layout, "-q"])
    run_bad(capsys, ["merge-lora", "--src", tmp_path / "dist", "--src-layout", layout, "--dst", tmp_path / "out",
                     "--lora-scaling", "1e38", "-q"], tmp_path / "out", "x")


def test_nan_factor(tmp_path, capsys):
    W, A, B = small(np.random.default_rng(19))
    A[1, 2] = np.nan
    src = save(tmp_path / "src" / "model.safetensors", {"x.weight": W, "x.lora_a": A, "x.lora_b": B})
    run_bad(capsys, ["merge-lora", "--src", src, "--dst", tmp_path / "out", "--lora-scaling", S, "-q"],
            tmp_path / "out", "x")


# ------------------------------------------------------------------------------------------------ drop-in tool


def tool(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "tools/transform_ckpt_lora.py", *map(str, args)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)


def test_drop_in_tool_matches_cli(tmp_path, capsys):
    tensors, expect, _ = naming_checkpoint(21)
    src = save(tmp_path / "src" / "model.ckpt", tensors)
    cli_dst = tmp_path / "cli"
    run_ok(capsys, ["merge-lora", "--src", src, "--dst", cli_dst, "--lora-scaling", S, "-q"])
    cli = read_all(complete_out(cli_dst, "ckpt"))
    dst = tmp_path / "does" / "not" / "exist"  # MindFormers needs it to exist; the drop-in creates it
    proc = tool("--src_ckpt_path_or_dir", src, "--dst_ckpt_dir", dst, "--lora_scaling", S)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in dst.iterdir() if p.name != MANIFEST_NAME) == ["merged_lora.ckpt"]
    got = read_all(dst / "merged_lora.ckpt")
    assert_same(got, cli, "tool vs CLI")
    assert_same(got, expect, "tool vs numpy")


def test_drop_in_tool_requires_scaling(tmp_path):
    tensors, _, _ = naming_checkpoint(22)
    src = save(tmp_path / "src" / "model.ckpt", tensors)
    dst = tmp_path / "dst"
    proc = tool("--src_ckpt_path_or_dir", src, "--dst_ckpt_dir", dst)
    assert proc.returncode == 2, proc.stderr
    assert "lora_scaling" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (dst / "merged_lora.ckpt").exists()


@pytest.mark.parametrize("dtype", [np.int8, np.uint8, np.int32, np.int64, np.bool_])
def test_integer_base_is_refused(tmp_path, capsys, dtype):
    """int8 100 + 40 would wrap to -116: an integer or bool base is refused, naming the parameter; nothing written."""
    W = np.full((4, 4), 100).astype(dtype)
    A, B = np.ones((2, 4), F32), np.full((4, 2), 20.0, F32)  # B @ A = 40 everywhere
    src = save(tmp_path / "src" / "model.safetensors", {"m.q.weight": W, "m.q.lora_a": A, "m.q.lora_b": B})
    code = main(["merge-lora", "--src", str(src), "--dst", str(tmp_path / "out"), "--lora-scaling", "1", "-q"])
    err = capsys.readouterr().err
    assert code == 2 and f"base weight 'm.q.weight' is {np.dtype(dtype).name}, not floating point" in err, err
    assert not (tmp_path / "out").exists()
