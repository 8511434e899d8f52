#!/usr/bin/env python3
"""Benchmark: `jaxreshard plan` of a DeepSeek-V3-shaped checkpoint (314 safetensors files) to a 64-rank and a
1024-rank destination layout.

    python tools/bench/plan_scale.py [--data DIR] [--ranks 64 1024] [--weights fp8 bf16] [--profile]

The source folder is built from DeepSeek-V3's config (61 layers, the first 3 dense, 256 routed experts + 1
shared, MLA attention; bf16 embeddings, norms and router) in two variants: `fp8`, as DeepSeek-V3 ships (FP8 e4m3
weights with 128 x 128 `weight_scale_inv` block scales: 90k tensors, 0.6 TiB) and `bf16` (dequantized weights,
no scales: 45k tensors, 1.2 TiB). Files are SPARSE: each gets its real safetensors header and is then
`os.truncate`d to its full size, so the terabyte costs no disk (planning reads headers only). Each case runs
`python -m jaxreshard plan` in a fresh process; wall time and peak RSS come from `os.wait4`. `--profile` also
runs each case under cProfile and prints the top functions by cumulative time. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402

FILES = 314
LAYERS, DENSE_LAYERS, EXPERTS = 61, 3, 256
HIDDEN, MOE_FFN, FFN, VOCAB = 7168, 2048, 18432, 129280
Q_LORA, KV_LORA, HEADS, NOPE, ROPE, V_HEAD = 1536, 512, 128, 128, 64, 128
BLOCK = 128
BF16, F32, FP8 = np.dtype(ml_dtypes.bfloat16), np.dtype(np.float32), np.dtype(ml_dtypes.float8_e4m3fn)

Tensor = tuple[str, np.dtype, tuple[int, ...]]


WEIGHTS = "fp8"  # --weights: "fp8" as DeepSeek-V3 ships (90k tensors, 0.6 TiB), "bf16" (45k tensors, 1.2 TiB)


def fp8_weight(name: str, shape: tuple[int, int]) -> list[Tensor]:
    """An FP8 weight and its block scale (one float32 per 128 x 128 block), as DeepSeek-V3 stores them; with
    `--weights bf16`, the dequantized bf16 weight alone."""
    if WEIGHTS == "bf16":
        return [(name, BF16, shape)]
    scale = tuple(-(-n // BLOCK) for n in shape)
    return [(name, FP8, shape), (name + "_scale_inv", F32, scale)]


def layer_tensors(i: int) -> list[Tensor]:
    """One decoder layer: MLA attention, then a dense MLP (first 3 layers) or 256 routed + 1 shared expert."""
    p = f"model.layers.{i}."
    out: list[Tensor] = [(p + "input_layernorm.weight", BF16, (HIDDEN,)),
                         (p + "post_attention_layernorm.weight", BF16, (HIDDEN,)),
                         (p + "self_attn.q_a_layernorm.weight", BF16, (Q_LORA,)),
                         (p + "self_attn.kv_a_layernorm.weight", BF16, (KV_LORA,))]
    out += fp8_weight(p + "self_attn.q_a_proj.weight", (Q_LORA, HIDDEN))
    out += fp8_weight(p + "self_attn.q_b_proj.weight", (HEADS * (NOPE + ROPE), Q_LORA))
    out += fp8_weight(p + "self_attn.kv_a_proj_with_mqa.weight", (KV_LORA + ROPE, HIDDEN))
    out += fp8_weight(p + "self_attn.kv_b_proj.weight", (HEADS * (NOPE + V_HEAD), KV_LORA))
    out += fp8_weight(p + "self_attn.o_proj.weight", (HIDDEN, HEADS * V_HEAD))
    if i < DENSE_LAYERS:
        return out + mlp(p + "mlp.", FFN)
    out += [(p + "mlp.gate.weight", BF16, (EXPERTS, HIDDEN)), (p + "mlp.gate.e_score_correction_bias", F32, (EXPERTS,))]
    for e in range(EXPERTS):
        out += mlp(p + f"mlp.experts.{e}.", MOE_FFN)
    return out + mlp(p + "mlp.shared_experts.", MOE_FFN)


def mlp(p: str, ffn: int) -> list[Tensor]:
    return [*fp8_weight(p + "gate_proj.weight", (ffn, HIDDEN)), *fp8_weight(p + "up_proj.weight", (ffn, HIDDEN)),
            *fp8_weight(p + "down_proj.weight", (HIDDEN, ffn))]


def deepseek_v3_tensors() -> list[Tensor]:
    out: list[Tensor] = [("model.embed_tokens.weight", BF16, (VOCAB, HIDDEN))]
    for i in range(LAYERS):
        out += layer_tensors(i)
    return out + [("model.norm.weight", BF16, (HIDDEN,)), ("lm_head.weight", BF16, (VOCAB, HIDDEN))]


def nbytes(t: Tensor) -> int:
    return int(np.prod(t[2], dtype=np.int64)) * t[1].itemsize


def build_source(folder: Path) -> tuple[int, int]:
    """Write the sparse HF folder (config.json, index, 314 part files); returns (tensors, total bytes)."""
    from jaxreshard.formats.safetensors_write import header_bytes

    tensors = deepseek_v3_tensors()
    total = sum(nbytes(t) for t in tensors)
    folder.mkdir(parents=True, exist_ok=True)
    per_file = total / FILES
    parts: list[list[Tensor]] = [[] for _ in range(FILES)]
    acc = 0
    for t in tensors:  # greedy in order, like HF's sharding: file k holds the bytes around k * total / FILES
        parts[min(FILES - 1, int(acc // per_file))].append(t)
        acc += nbytes(t)
    weight_map = {}
    for k, part in enumerate(parts):
        name = f"model-{k + 1:05d}-of-{FILES:06d}.safetensors"
        head = header_bytes(part, {"format": "pt"})
        with open(folder / name, "wb") as f:
            f.write(head)
        os.truncate(folder / name, len(head) + sum(nbytes(t) for t in part))  # sparse: no disk blocks
        weight_map.update({t[0]: name for t in part})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    config: dict[str, object] = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3"}
    if WEIGHTS == "fp8":
        config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                         "weight_block_size": [BLOCK, BLOCK]}
    (folder / "config.json").write_text(json.dumps(config))
    return len(tensors), total


def layout_yaml(stages: int) -> str:
    """dp 8 x tp 8 per stage; `stages` pipeline stages by layer. Column-parallel weights split rows, row-parallel
    ones split columns (at multiples of the 128-wide scale blocks); scales follow their weights; the rest is
    replicated. (Experts are separate tensors, so expert parallelism is not a spec of one tensor.)"""
    layer = r"model\.layers\.(\d+)\."
    by_layer = ", stage: by_layer" if stages > 1 else ""
    rules = [(r"model\.embed_tokens\.weight", "[tp, null]", ""),
             (r"lm_head\.weight", "[tp, null]", ", stage: -1" if stages > 1 else ""),
             (r"model\.norm\.weight", "[]", ", stage: -1" if stages > 1 else ""),
             (layer + r"self_attn\.(q_b_proj|kv_b_proj)\.weight", "[tp, null]", by_layer),
             (layer + r"self_attn\.o_proj\.weight", "[null, tp]", by_layer),
             (layer + r"mlp\.(experts\.\d+\.|shared_experts\.)?(gate|up)_proj\.weight", "[tp, null]", by_layer),
             (layer + r"mlp\.(experts\.\d+\.|shared_experts\.)?down_proj\.weight", "[null, tp]", by_layer),
             (layer + r".*", "[]", by_layer)]
    lines = ["mesh: {dp: 8, tp: 8}", f"pipeline_stages: {stages}", "params:"]
    lines += [f"  - {{match: '{m}', spec: {s}{extra}}}" for m, s, extra in rules]
    return "\n".join(lines) + "\n"


def run_case(src: Path, layout: Path, profile: Path | None) -> tuple[float, int, int, str]:
    """`jaxreshard plan` in a fresh process: (wall seconds, peak RSS bytes, exit code, last output line)."""
    pre = ["-m", "cProfile", "-o", str(profile)] if profile else []
    cmd = [sys.executable, *pre, "-m", "jaxreshard", "plan", "--src", str(src), "--dst-layout", str(layout)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with tempfile.TemporaryFile() as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        out.seek(0)
        text = out.read().decode(errors="replace")
    lines = text.strip().splitlines()
    if os.waitstatus_to_exitcode(status):
        print(text[-3000:], file=sys.stderr)
    return wall, usage.ru_maxrss * 1024, os.waitstatus_to_exitcode(status), f"{len(lines)} lines"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=None, help="folder for the sparse source (default: a temp dir)")
    ap.add_argument("--ranks", type=int, nargs="+", default=[64, 1024], choices=[64, 1024])
    ap.add_argument("--weights", choices=["fp8", "bf16"], nargs="+", default=["fp8", "bf16"],
                    help="fp8: as DeepSeek-V3 ships, with block scales; bf16: dequantized, no scales")
    ap.add_argument("--profile", action="store_true", help="also profile each case (cProfile, top 25)")
    args = ap.parse_args()
    global WEIGHTS
    with tempfile.TemporaryDirectory(prefix="plan_scale_") as tmp:
        data = args.data or Path(tmp)
        rows = []
        for WEIGHTS in args.weights:
            src = data / f"deepseek_v3_{WEIGHTS}"
            t0 = time.perf_counter()
            count, total = build_source(src)
            print(f"built {src}: {count} tensors in {FILES} sparse files, {total / 2**40:.2f} TiB "
                  f"({time.perf_counter() - t0:.1f} s)", flush=True)
            for ranks in args.ranks:
                layout = data / f"deepseek_{ranks}.yaml"
                layout.write_text(layout_yaml(ranks // 64))
                wall, rss, rc, lines = run_case(src, layout, None)
                rows.append(f"| {WEIGHTS} | {count} | {total / 2**40:.2f} | {ranks} | {wall:.1f} | "
                            f"{rss / 2**20:.0f} | {rc} | {lines} |")
                if args.profile:
                    prof = data / f"plan_{WEIGHTS}_{ranks}.prof"
                    run_case(src, layout, prof)
                    import pstats

                    pstats.Stats(str(prof)).sort_stats("cumulative").print_stats(25)
    print(f"\n{platform.node()} ({os.cpu_count()} CPUs), Python {platform.python_version()}\n")
    print("| weights | tensors | TiB (sparse) | destination ranks | plan wall (s) | peak RSS (MiB) | exit | output |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
