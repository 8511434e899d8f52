"""The built-in example: generate a small Llama checkpoint, split it, reshard it, merge it, compare bytes.

Runs on a fresh machine with no files (`python -m jaxreshard --config configs/quickstart.yaml`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from . import api
from .box import Box
from .describe import human_bytes
from .errors import ConfigError, JaxreshardError
from .example import write_llama_checkpoint
from .formats import open_source
from .formats.base import FileHandles, aligned_empty, read_box

DEFAULT_LAYOUTS = ("configs/layouts/llama_dp2mp4.yaml", "configs/layouts/llama_dp2mp2pp2.yaml")


def run_quickstart(workdir: Path, layouts: Sequence[str] = DEFAULT_LAYOUTS, *, overwrite: bool = False,
                   progress: bool = True) -> None:
    """Write the example under `workdir`, convert it through `layouts` in order and back to one complete file,
    print each step, and raise unless the result holds the example's bytes."""
    layouts = list(layouts or DEFAULT_LAYOUTS)
    for layout in layouts:
        if not Path(layout).is_file():
            raise ConfigError(f"{layout}: layout file not found (run the quickstart from the repository root)")
    example = workdir / "example" / "model.safetensors"
    if example.exists() and not overwrite:
        raise ConfigError(f"{workdir}: already holds a quickstart run; pass --overwrite (or overwrite: true)")
    if example.exists():
        example.unlink()
    write_llama_checkpoint(example)
    print(f"example: {example} ({human_bytes(example.stat().st_size)}, Llama-shaped, bf16/f32/f16/int64/f64)")
    steps = []
    src, src_layout = example, None
    for i, layout in enumerate([*layouts, None]):
        name = f"{i + 1}_{Path(layout).stem}" if layout else f"{len(layouts) + 1}_complete"
        dst = workdir / name
        start = time.perf_counter()
        report = api.convert(
            src, dst, src_layout=src_layout, dst_layout=layout, overwrite=overwrite, progress=progress
        )
        steps.append((src_layout or "complete", layout or "complete", report, time.perf_counter() - start))
        src, src_layout = dst, layout
    for src_name, dst_name, report, seconds in steps:
        print(
            f"{Path(src_name).stem:>16} -> {Path(dst_name).stem:<16} {len(report.files)} file(s) "
            f"{human_bytes(report.stats.write_bytes):>10}  {seconds:.2f} s  -> {report.dst}"
        )
    merged = workdir / f"{len(layouts) + 1}_complete" / "rank_0" / "checkpoint_0.safetensors"
    _compare(example, merged)
    identical = example.read_bytes() == merged.read_bytes()
    print(f"check: every tensor of {merged} equals the example bit for bit; whole file identical: {identical}")


def _compare(a: Path, b: Path) -> None:
    """Raise unless both checkpoints hold the same parameters with identical bytes."""
    ea, eb = open_source(a).entries[0], open_source(b).entries[0]
    if list(ea) != list(eb):
        raise JaxreshardError(f"quickstart check failed: {b} has parameters {list(eb)[:5]}..., "
                              f"expected {list(ea)[:5]}...")
    with FileHandles() as handles:
        for param, entry in ea.items():
            other = eb[param]
            if (entry.dtype, entry.shape) != (other.dtype, other.shape):
                raise JaxreshardError(f"quickstart check failed: {param!r} changed dtype or shape")
            x, y = aligned_empty(entry.shape, entry.dtype), aligned_empty(other.shape, other.dtype)
            read_box(handles, entry, Box.full(entry.shape), x)
            read_box(handles, other, Box.full(other.shape), y)
            if x.tobytes() != y.tobytes():
                raise JaxreshardError(f"quickstart check failed: {param!r} differs after the round trip")
