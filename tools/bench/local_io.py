#!/usr/bin/env python3
"""Benchmark: the local I/O engine against the read-once-write-once floor, on one local disk.

    python tools/bench/local_io.py [--size-gib 2] [--data DIR] [--trees NAME=PATH,...] [--repeat 3]

A safetensors checkpoint (bench.py's Llama-like shapes) is split into 8 ranks (dp2 x mp4, column and row
blocks) and merged back, cold cache and warm. The floor of each step is `cat SRC | tee OUT...` followed by
`sync OUT...`: the source read once and as many bytes written (and made durable) as the step writes, with
coreutils, one request at a time. `--trees` runs the same steps with jaxreshard imported from other source
trees (e.g. `main=/tmp/main,new=.`: before and after a change, back to back). Wall time and peak RSS come
from `os.wait4` of a fresh process (bench.py's `measure`); cold steps evict only files this script made.
Prints a Markdown table (and writes DIR/local_io.md).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # noqa: E402 - tools/bench/bench.py, beside this file

REPO = bench.REPO


def floor_cmd(src: Path, outs: list[Path]) -> list[str]:
    """`cat` the source once into `tee` writing every output, then `sync` them (fsync each)."""
    quoted = " ".join(f"'{o}'" for o in outs)
    script = f"mkdir -p '{outs[0].parent}' && cat '{src}' | tee {quoted} > /dev/null && sync {quoted}"
    return ["sh", "-c", script]


def steps(root: Path, py: str) -> list[tuple[str, list[str], list[Path], Path, Path]]:
    """(name, command, inputs, output folder, complete file): split complete -> 8 ranks, then merge back."""
    src = root / "complete" / "rank_0" / "checkpoint_0.safetensors"
    split, merged = root / "split", root / "merged"
    return [
        ("complete -> 8 ranks (dp2 x mp4)", [py, "-m", "jaxreshard", "convert", "--src", str(src), "--dst",
                                             str(split), "--dst-layout", str(bench.LAYOUT), "-q"],
         [src], split, src),
        ("8 ranks -> complete", [py, "-m", "jaxreshard", "convert", "--src", str(split), "--dst", str(merged), "-q"],
         [split], merged, src),
    ]  # fmt: skip


def run_case(root: Path, tree: Path, cache: str, repeat: int, py: str) -> list[dict]:
    """Both steps with jaxreshard from `tree`, each next to its floor. The split's output stays for the merge."""
    os.environ["PYTHONPATH"] = str(tree)
    rows = []
    for name, cmd, inputs, out, src in steps(root, py):
        wall, rss, written = bench.run_step(cmd, cache, inputs, out, root, repeat)
        read = sum(p.stat().st_size for i in inputs for p in ([i] if i.is_file() else i.rglob("*")) if p.is_file())
        copies = max(1, round(written / src.stat().st_size))
        floor_outs = [root / "floor" / f"o{i}" for i in range(copies)]
        floor_wall, floor_rss, _ = bench.run_step(floor_cmd(src, floor_outs), cache, [src], root / "floor", root,
                                                  repeat)
        shutil.rmtree(root / "floor", ignore_errors=True)
        rows.append(dict(step=name, cache=cache, tree=tree.name, wall=wall, rss=rss, bytes=read + written,
                         floor=floor_wall, floor_rss=floor_rss, copies=copies))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gib", type=float, default=2.0)
    ap.add_argument("--data", type=Path, default=REPO / "bench_data")
    ap.add_argument("--trees", default=f"this={REPO}", help="NAME=PATH,... source trees to import jaxreshard from")
    ap.add_argument("--repeat", type=int, default=3, help="runs per step; the median wall time is reported")
    ap.add_argument("--caches", default="cold,warm")
    args = ap.parse_args()
    args.data = args.data.resolve()
    args.data.mkdir(parents=True, exist_ok=True)
    os.chdir(args.data)  # `python -m jaxreshard` imports from the working folder first: never a source tree's
    root = args.data / f"{args.size_gib:g}gib_local_io"
    src = root / "complete" / "rank_0" / "checkpoint_0.safetensors"
    if not src.exists():
        bench.write_checkpoint(src, bench.llama_params(args.size_gib), "safetensors")
    trees = [(name, Path(path).resolve()) for name, path in (t.split("=", 1) for t in args.trees.split(","))]
    rows = []
    for cache in args.caches.split(","):
        for name, tree in trees:  # back to back, so the trees see the same machine state
            for row in run_case(root, tree, cache, args.repeat, sys.executable):
                rows.append({**row, "tree": name})
            for d in (root / "split", root / "merged"):
                shutil.rmtree(d, ignore_errors=True)
    print_table(rows, args)
    return 0


def print_table(rows: list[dict], args) -> None:
    lines = [
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, "
        f"{os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.0f} GiB RAM, Python "
        f"{platform.python_version()}; safetensors checkpoint {args.size_gib:g} GiB; median of {args.repeat} runs; "
        "floor: `cat SRC | tee OUT... && sync OUT...`.",
        "",
        "| step | cache | tree | jaxreshard s | floor s | x floor | GB/s (read+write) | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['step']} | {r['cache']} | {r['tree']} | {r['wall']:.2f} | {r['floor']:.2f} | "
                     f"{r['wall'] / r['floor']:.2f} | {r['bytes'] / r['wall'] / 1e9:.2f} | {r['rss']:.0f} |")
    text = "\n".join(lines)
    print(text)
    args.data.mkdir(parents=True, exist_ok=True)
    (args.data / "local_io.md").write_text(text + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
