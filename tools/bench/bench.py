#!/usr/bin/env python3
"""Benchmark: split a complete checkpoint into 8 ranks (dp2 x mp4) and merge it back, in .ckpt and safetensors,
against the I/O floor measured in the same run and, when importable, real MindSpore `transform_checkpoints`.

    python tools/bench/bench.py [--size-gib 2] [--data DIR] [--mindspore-python PY] [--flatness]

Every step runs in a fresh process; wall time and peak RSS come from `os.wait4` (what `/usr/bin/time -v`
reports). Cold steps first fsync and `posix_fadvise(DONTNEED)` the files involved (only files this script
made). The floor of a split is reading the source once and writing as many bytes as the split writes; the
floor of a merge is copying the complete file; both fsync like jaxreshard does. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402

MIB = 1 << 20
LAYOUT = REPO / "configs" / "layouts" / "llama_dp2mp4.yaml"
DATA = REPO / "bench_data"  # set from --data


def llama_params(size_gib: float) -> list[tuple[str, np.dtype, tuple[int, ...]]]:
    """Llama-7B-like shapes (bf16, hidden 4096, largest tensor 250 MiB) with as many layers as the size needs."""
    bf16, f32 = np.dtype(ml_dtypes.bfloat16), np.dtype(np.float32)
    h, ffn, vocab = 4096, 11008, 32000
    per_layer = (4 * h * h + 3 * h * ffn) * 2
    layers = max(1, round((size_gib * 1024 * MIB - 2 * vocab * h * 2) / per_layer))
    params = [("model.embed_tokens.weight", bf16, (vocab, h))]
    for i in range(layers):
        p = f"model.layers.{i}."
        params += [(p + f"self_attn.{x}_proj.weight", bf16, (h, h)) for x in "qkvo"]
        params += [(p + "mlp.gate_proj.weight", bf16, (ffn, h)), (p + "mlp.up_proj.weight", bf16, (ffn, h)),
                   (p + "mlp.down_proj.weight", bf16, (h, ffn)),
                   (p + "input_layernorm.weight", f32, (h,)), (p + "post_attention_layernorm.weight", f32, (h,))]
    params += [("model.norm.weight", f32, (h,)), ("lm_head.weight", bf16, (vocab, h)),
               ("train_state.step", np.dtype(np.int64), ())]
    return params


def write_checkpoint(path: Path, params, fmt: str) -> None:
    """Stream a synthetic checkpoint to disk one tensor at a time (never the whole model in memory)."""
    from jaxreshard.formats.mindspore_ckpt_write import CkptRankWriter
    from jaxreshard.formats.safetensors_io import SafetensorsWriter

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    writer = CkptRankWriter(tmp, params) if fmt == "ckpt" else SafetensorsWriter(tmp, params, {"format": "ms"})
    rng = np.random.default_rng(0)
    for name, dtype, shape in params:
        raw = rng.integers(0, 0x7F00, size=int(np.prod(shape)), dtype=np.uint16)  # finite bf16/f32 bit patterns
        writer.write(name, (raw.astype(np.uint32) << 16).view(np.float32).astype(dtype).reshape(shape)
                     if dtype.kind == "f" or dtype == ml_dtypes.bfloat16 else raw.astype(dtype)[: 1].reshape(shape))
    writer.close()
    os.rename(tmp, path)


def drop_cache(*roots: Path) -> None:
    """fsync and evict our own files from the page cache (cold-cache steps)."""
    for root in roots:
        files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()] if root.exists() else []
        for p in files:
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def measure(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MiB) of one fresh process, started by a small wrapper process: a child forked
    from this (large) process would be charged this process's RSS in ru_maxrss."""
    wrapper = subprocess.Popen([sys.executable, "-S", "-c", MEASURE_WAIT4, *cmd], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    out, err = wrapper.communicate()
    if wrapper.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.decode()}\n{err.decode()[-3000:]}")
    wall, rss_kib = json.loads(out)
    return wall, rss_kib / 1024


MEASURE_WAIT4 = """
import json, os, sys, time
start = time.perf_counter()
pid = os.posix_spawnp(sys.argv[1], sys.argv[1:], dict(os.environ), file_actions=[(os.POSIX_SPAWN_DUP2, 2, 1)])
_, status, usage = os.wait4(pid, 0)
wall = time.perf_counter() - start
if os.waitstatus_to_exitcode(status):
    sys.exit(f"exit {os.waitstatus_to_exitcode(status)}")
print(json.dumps([wall, usage.ru_maxrss]))
"""


FLOOR = """
import os, sys
src, outs = sys.argv[1], sys.argv[2:]
os.makedirs(os.path.dirname(outs[0]), exist_ok=True)
chunk = 64 << 20
fds = [os.open(o, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644) for o in outs]
with open(src, "rb", buffering=0) as f:
    while True:
        data = f.read(chunk)
        if not data:
            break
        for fd in fds:
            os.write(fd, data)
for fd in fds:
    os.fsync(fd); os.close(fd)
"""

MINDSPORE = """
import sys, mindspore as ms
src, dst, s_src, s_dst = sys.argv[1:5]
ms.transform_checkpoints(src, dst, "checkpoint_", None if s_src == "-" else s_src, None if s_dst == "-" else s_dst,
                         output_format=sys.argv[5])
"""


def find_mindspore(explicit: str | None) -> str | None:
    for py in [explicit, os.environ.get("JAXRESHARD_MINDSPORE_PYTHON"), sys.executable]:
        if py and subprocess.run([py, "-c", "import mindspore"], capture_output=True).returncode == 0:
            return py
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gib", type=float, default=2.0)
    ap.add_argument("--data", type=Path, default=REPO / "bench_data")
    ap.add_argument("--formats", default="ckpt,safetensors")
    ap.add_argument("--mindspore-python",
                    help="a python with mindspore installed (else env JAXRESHARD_MINDSPORE_PYTHON)")
    ap.add_argument("--no-mindspore", action="store_true")
    ap.add_argument("--flatness", action="store_true", help="also compare peak RSS on 1 GiB vs 4 GiB checkpoints")
    ap.add_argument("--transforms", action="store_true",
                    help="also compare a transform (stack + transpose of MoE experts) with a plain conversion of the "
                         "same bytes (--formats '' for only that)")
    args = ap.parse_args()
    global DATA
    DATA = args.data
    ms_py = None if args.no_mindspore else find_mindspore(args.mindspore_python)
    py = sys.executable
    rows = []
    for fmt in filter(None, args.formats.split(",")):
        rows += bench_format(args.data, fmt, args.size_gib, ms_py, py)
    if args.flatness:
        rows += flatness(args.data, py)
    if args.transforms:
        rows += transforms(args.data, args.size_gib, py)
    print_table(rows, args, ms_py)
    return 0


def bench_format(data: Path, fmt: str, size_gib: float, ms_py: str | None, py: str) -> list[dict]:
    from jaxreshard.api import save_strategy

    root = data / f"{size_gib:g}gib_{fmt}"
    src = root / "complete" / "rank_0" / f"checkpoint_0.{fmt}"
    params = llama_params(size_gib)
    if not src.exists():
        write_checkpoint(src, params, fmt)
    strategy = root / "strategy"
    if not strategy.exists():
        save_strategy(src, LAYOUT, strategy)
    dst_strategy = strategy / "merged_ckpt_strategy.ckpt"
    src_bytes = src.stat().st_size
    rows = []
    for cache in ("cold", "warm"):
        split, merged = root / f"split_{cache}", root / f"merged_{cache}"
        for d in (split, merged, root / "floor", root / "ms_split", root / "ms_merged"):
            shutil.rmtree(d, ignore_errors=True)
        # split: complete -> dp2mp4
        cmd = [py, "-m", "jaxreshard", "convert", "--src", str(src.parent.parent), "--dst", str(split),
               "--dst-strategy", str(dst_strategy), "-q"]
        split_wall, split_rss, split_bytes = run_step(cmd, cache, [src.parent.parent], split, DATA, REPEAT)
        copies = max(1, round(split_bytes / src_bytes))
        floor_wall, _, _ = run_step([py, "-c", FLOOR, str(src),
                                     *[str(root / "floor" / f"o{i}") for i in range(copies)]],
                                    cache, [src], root / "floor", DATA, REPEAT)
        ms_split = ms_step(ms_py, src.parent.parent, root / "ms_split", "-", str(dst_strategy), fmt, cache)
        rows.append(dict(step=f"{fmt} complete -> 8 ranks", cache=cache, wall=split_wall, rss=split_rss,
                         bytes=split_bytes + src_bytes, floor=floor_wall, ms=ms_split))
        shutil.rmtree(root / "floor")
        # merge: dp2mp4 -> complete
        cmd = [py, "-m", "jaxreshard", "convert", "--src", str(split), "--dst", str(merged),
               "--src-strategy", str(dst_strategy), "-q"]
        merge_wall, merge_rss, merge_bytes = run_step(cmd, cache, [split], merged, DATA, REPEAT)
        floor_wall, _, _ = run_step([py, "-c", FLOOR, str(src), str(root / "floor" / "o")], cache, [src],
                                    root / "floor",
                                    DATA, REPEAT)
        ms_merge = ms_step(ms_py, split, root / "ms_merged", str(dst_strategy), "-", fmt, cache)
        rows.append(dict(step=f"{fmt} 8 ranks -> complete", cache=cache, wall=merge_wall, rss=merge_rss,
                         bytes=2 * src_bytes, floor=floor_wall, ms=ms_merge))
        same = (merged / "rank_0" / f"checkpoint_0.{fmt}").read_bytes() == src.read_bytes() if fmt == "ckpt" else None
        rows[-1]["identical"] = same
        for d in (root / "floor", root / "ms_split", root / "ms_merged", merged):
            shutil.rmtree(d, ignore_errors=True)
        if cache == "cold":
            shutil.rmtree(split, ignore_errors=True)
    return rows


REPEAT = 3  # jaxreshard and floor steps: median of this many runs (the disk is noisy); MindSpore runs once


def run_step(cmd, cache, inputs, output, data: Path | None = None, repeat: int = 1) -> tuple[float, float, int]:
    """Median wall time and peak RSS of `repeat` runs, each from the same starting state."""
    walls, rsses = [], []
    for _ in range(repeat):
        shutil.rmtree(output, ignore_errors=True)  # every run starts without its output
        # Evict everything this benchmark wrote: MindSpore refuses to load a .ckpt larger than MemFree (page
        # cache not counted), and earlier steps' outputs would otherwise crowd the cache for every tool alike;
        # then let writeback of earlier steps finish so it does not bill the next one.
        drop_cache(*([data] if data is not None else inputs))
        os.sync()
        time.sleep(1)
        if cache == "warm":  # read the inputs once so they are in the page cache
            for root in inputs:
                for p in [root] if root.is_file() else root.rglob("*"):
                    if p.is_file():
                        with open(p, "rb") as f:
                            while f.read(64 << 20):
                                pass
        wall, rss = measure(cmd)
        walls.append(wall)
        rsses.append(rss)
    written = sum(p.stat().st_size for p in Path(output).rglob("*") if p.is_file())
    return sorted(walls)[len(walls) // 2], max(rsses), written


def ms_step(ms_py, src, dst, s_src, s_dst, fmt, cache) -> tuple[float, float] | None:
    if ms_py is None:
        return None
    wall, rss, _ = run_step([ms_py, "-c", MINDSPORE, str(src), str(dst), s_src, s_dst, fmt], cache, [Path(src)], dst,
                            DATA)
    return wall, rss


def flatness(data: Path, py: str) -> list[dict]:
    rows = []
    for size in (1.0, 4.0):
        root = data / f"{size:g}gib_safetensors"
        src = root / "complete" / "rank_0" / "checkpoint_0.safetensors"
        if not src.exists():
            write_checkpoint(src, llama_params(size), "safetensors")
        out = root / "flat_split"
        shutil.rmtree(out, ignore_errors=True)
        wall, rss, written = run_step([py, "-m", "jaxreshard", "convert", "--src", str(src), "--dst", str(out),
                                       "--dst-layout", str(LAYOUT), "-q"], "warm", [src], out)
        rows.append(dict(step=f"flatness: {size:g} GiB safetensors -> 8 ranks", cache="warm", wall=wall, rss=rss,
                         bytes=written + src.stat().st_size, floor=None, ms=None))
        shutil.rmtree(out, ignore_errors=True)
    return rows


EXPERTS, MOE_H, MOE_F = 8, 2048, 1408
EP_LAYOUT = """mesh: {ep: 4, mp: 2}
params:
  - {match: '.*experts\\.w[13]\\.kernel', spec: [ep, null, mp]}
  - {match: '.*experts\\.w2\\.kernel', spec: [ep, mp, null]}
  - {match: '.*', spec: []}
"""
STACK_RULES = """rules:
  - {from: '{p}.experts.{e}.{w}.weight', to: '{p}.experts.{w}.kernel', stack: e, axis: 0, transpose: [1, 0]}
"""


def moe_params(size_gib: float, stacked: bool) -> list[tuple[str, np.dtype, tuple[int, ...]]]:
    """Mixtral-like expert weights (bf16): per expert `[F, H]` / `[H, F]` PyTorch weights, or already stacked
    and transposed `[E, H, F]` / `[E, F, H]` kernels (the same bytes)."""
    bf16 = np.dtype(ml_dtypes.bfloat16)
    layers = max(1, round(size_gib * 1024 * MIB / (3 * EXPERTS * MOE_H * MOE_F * 2)))
    out = []
    for i in range(layers):
        p = f"model.layers.{i}.block_sparse_moe.experts"
        for w, shape in (("w1", (MOE_F, MOE_H)), ("w2", (MOE_H, MOE_F)), ("w3", (MOE_F, MOE_H))):
            if stacked:
                out.append((f"{p}.{w}.kernel", bf16, (EXPERTS, shape[1], shape[0])))
            else:
                out += [(f"{p}.{e}.{w}.weight", bf16, shape) for e in range(EXPERTS)]
    return out


def transforms(data: Path, size_gib: float, py: str) -> list[dict]:
    """Peak RSS of stacking + transposing per-expert tensors into an expert-parallel layout, next to a plain
    conversion of an already stacked checkpoint of the same bytes into the same layout."""
    root = data / f"{size_gib:g}gib_moe"
    root.mkdir(parents=True, exist_ok=True)
    (root / "ep.yaml").write_text(EP_LAYOUT)
    (root / "stack.yaml").write_text(STACK_RULES)
    rows = []
    for name, stacked, extra in (("plain: stacked [E, ...] -> ep4 x mp2", True, []),
                                 ("transform: per-expert -> stack + transpose -> ep4 x mp2", False,
                                  ["--transform", str(root / "stack.yaml")])):  # fmt: skip
        src = root / ("stacked.safetensors" if stacked else "experts.safetensors")
        if not src.exists():
            write_checkpoint(src, moe_params(size_gib, stacked), "safetensors")
        out = root / "out"
        wall, rss, written = run_step([py, "-m", "jaxreshard", "convert", "--src", str(src), "--dst", str(out),
                                       "--dst-layout", str(root / "ep.yaml"), "-q", *extra], "warm", [src], out)
        rows.append(dict(step=f"MoE {name}", cache="warm", wall=wall, rss=rss, bytes=written + src.stat().st_size,
                         floor=None, ms=None))
        shutil.rmtree(out, ignore_errors=True)
    return rows


def print_table(rows, args, ms_py) -> None:
    baseline = measure([sys.executable, "-c", "import jax; jax.devices()"])[1]
    lines = [
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, "
        f"{os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.0f} GiB RAM, "
        f"Python {platform.python_version()}; checkpoint {args.size_gib:g} GiB (largest tensor 250 MiB); "
        f"MindSpore: {'yes' if ms_py else 'not available'}; idle `import jax` process: {baseline:.0f} MiB RSS.",
        "",
        "| step | cache | jaxreshard s | GB/s (read+write) | x floor | floor s | MindSpore s | MindSpore / jaxreshard "
        "| peak RSS MiB | MindSpore RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ms = r["ms"]
        lines.append(
            f"| {r['step']} | {r['cache']} | {r['wall']:.2f} | {r['bytes'] / r['wall'] / 1e9:.2f} | "
            f"{(r['wall'] / r['floor']) if r['floor'] else float('nan'):.2f} | {r['floor'] or float('nan'):.2f} | "
            f"{ms[0] if ms else float('nan'):.1f} | {(ms[0] / r['wall']) if ms else float('nan'):.1f}x | "
            f"{r['rss']:.0f} | {ms[1] if ms else float('nan'):.0f} |"
        )
    text = "\n".join(lines)
    print(text)
    (args.data / "results.md").write_text(text + "\n")
    (args.data / "results.json").write_text(json.dumps(rows, indent=1, default=str))


if __name__ == "__main__":
    raise SystemExit(main())
