#!/usr/bin/env python3
"""Smoke check on a machine with a GPU: `jaxreshard.load` straight into GPU shardings (from safetensors, a
MindSpore .ckpt + strategy, and orbax), and the CLI still converting on CPU devices next to a GPU backend.

    python tools/bench/gpu_smoke.py [OUT_DIR]

Prints one line per check and exits non-zero on the first mismatch. Not a test: CI has no GPU.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import jaxreshard as jr  # noqa: E402
from jaxreshard.box import Box  # noqa: E402
from jaxreshard.example import write_llama_checkpoint  # noqa: E402
from jaxreshard.formats import open_source  # noqa: E402
from jaxreshard.formats.base import FileHandles, aligned_empty, read_box  # noqa: E402


def full_values(src: Path) -> dict[str, np.ndarray]:
    out = {}
    with FileHandles() as handles:
        for name, entry in open_source(src).entries[0].items():
            buf = aligned_empty(entry.shape, entry.dtype)
            read_box(handles, entry, Box.full(entry.shape), buf)
            out[name] = buf
    return out


def check(label: str, arrays: dict, full: dict) -> None:
    for name, arr in arrays.items():
        for shard in arr.addressable_shards:
            assert shard.device.platform == "gpu", (label, name, shard.device)
            got = np.asarray(shard.data)
            if got.tobytes() != full[name][shard.index].tobytes():
                sys.exit(f"FAIL {label}: {name} differs on {shard.device}")
    print(f"ok  {label}: {len(arrays)} arrays on {sorted({d.platform for a in arrays.values() for d in a.devices()})}")


def main() -> int:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp())
    gpus = jax.devices("gpu")
    print(f"jax {jax.__version__}, devices: {gpus}")
    mesh = Mesh(np.array(gpus).reshape(len(gpus), 1), ("data", "model"))
    src = write_llama_checkpoint(out / "model.safetensors")
    full = full_values(src)
    names = [n for n in full if not n.startswith("train_state")]
    target = {n: NamedSharding(mesh, P("model") if full[n].ndim else P()) for n in names}
    start = time.perf_counter()
    check("safetensors -> GPU", jr.load(src, target, strict=False), full)
    print(f"    load took {time.perf_counter() - start:.2f} s")
    fix = REPO / "tests" / "fixtures" / "mindspore"
    ms_full = full_values(fix / "ckpt" / "complete")
    ms_target = {n: NamedSharding(mesh, P()) for n in ms_full if n not in ("global_step", "learning_rate")}
    check("MindSpore dp2mp4 .ckpt + strategy -> GPU",
          jr.load(fix / "ckpt" / "dp2mp4", ms_target, src_strategy=fix / "strategy" / "dp2mp4.ckpt", strict=False),
          ms_full)
    cli = [sys.executable, "-m", "jaxreshard", "convert", "--src", str(src), "-q"]
    for args in (["--dst", str(out / "split"), "--dst-layout", str(REPO / "configs/layouts/llama_dp2mp4.yaml")],
                 ["--dst", str(out / "orbax"), "--output-format", "orbax"]):
        done = subprocess.run(cli + args, cwd=REPO, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"FAIL convert {args}: {done.stderr[-2000:]}")
        print(f"ok  CLI convert {' '.join(args[2:]) or args[0]} next to a GPU backend")
    check("orbax -> GPU", jr.load(out / "orbax", target, strict=False), full)
    check("dp2mp4 safetensors + layout -> GPU",
          jr.load(out / "split", target, src_layout=REPO / "configs/layouts/llama_dp2mp4.yaml", strict=False), full)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
