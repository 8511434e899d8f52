"""Automatic conversion at load time (MindFormers' `auto_trans_ckpt`), for training and inference jobs.

Every process of the job calls `auto_convert` with the same arguments and its own rank. If the checkpoint
already has the job's layout nothing happens. Otherwise the destination ranks are cut into
`transform_process_num` contiguous blocks; process `i * world_size / n` converts block i and the others wait.
Unlike MindFormers: waiting has a timeout, a converter's failure is raised on every process with the
converter's own message, completion is marked atomically (a marker file renamed into place), nothing the user
owns is deleted, and a rerun after a completed conversion reuses it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import ConfigError, JaxreshardError
from .fsutil import check_file_prefix

log = logging.getLogger(__name__)

MARKERS = ".jaxreshard"  # inside the output folder: job.json (what is converted), block_<i>.done/.failed


def auto_convert(
    load_checkpoint: str | Path,
    src_strategy_path_or_dir: str | Path | None,
    *,
    dst_strategy: str | Path | None = None,
    dst_layout: Any = None,
    output_dir: str | Path = "output/transformed_checkpoint",
    transform_process_num: int = 1,
    rank_id: int | None = None,
    world_size: int | None = None,
    prefix: str = "checkpoint_",
    timeout: float = 3600.0,
    poll: float = 0.5,
) -> Path:
    """Return the checkpoint this process should load: `load_checkpoint` itself when it already matches the
    destination layout/strategy, else the converted copy under `output_dir/<name>` (converted once)."""
    from . import api
    from .run import parse_ranks

    check_file_prefix(prefix)  # before any marker or output is written
    src = Path(load_checkpoint)
    rank_id = _env("RANK_ID", 0) if rank_id is None else rank_id
    world_size = _env("RANK_SIZE", 1) if world_size is None else world_size
    n = transform_process_num
    if n < 1 or world_size % n or not 0 <= rank_id < world_size:
        raise ConfigError(f"transform_process_num {n} must divide the {world_size} processes (rank {rank_id})")
    if matches(src, src_strategy_path_or_dir, dst_strategy, dst_layout):
        log.info("%s already has the job's layout; loading it as it is", src)
        return src
    out = Path(output_dir) / src.name.split(".")[0]
    markers = out.parent / f".{out.name}{MARKERS}"
    fingerprint = _fingerprint(src, src_strategy_path_or_dir, dst_strategy, dst_layout, prefix)
    converter = rank_id % (world_size // n) == 0
    block = rank_id // (world_size // n)
    if _done(markers, n, fingerprint):
        return out
    if converter:
        try:
            _claim(markers, fingerprint, out)
            job = api.plan_conversion(src, src_strategy=src_strategy_path_or_dir, dst_strategy=dst_strategy,
                                      dst_layout=dst_layout, prefix=prefix)
            total = len(job.plan.ranks)
            if total % n:
                raise ConfigError(f"transform_process_num {n} must divide the {total} destination ranks")
            size = total // n
            ranks = f"{block * size}-{block * size + size - 1}"
            api.convert(src, out, src_strategy=src_strategy_path_or_dir, dst_strategy=dst_strategy,
                        dst_layout=dst_layout, prefix=prefix, ranks=parse_ranks(ranks), overwrite=True)
        except Exception as e:  # every waiting process must learn why, then this one fails too
            _mark(markers / f"block_{block}.failed", f"{type(e).__name__}: {e}")
            raise
        _mark(markers / f"block_{block}.done", fingerprint)
    _wait(markers, n, fingerprint, timeout, poll)
    return out


def matches(src: Path, src_strategy: Any, dst_strategy: Any, dst_layout: Any) -> bool:
    """True when the checkpoint already has the destination layout (no conversion needed)."""
    if dst_layout is not None:
        return False
    if src_strategy is None or dst_strategy is None:
        return src_strategy is None and dst_strategy is None
    from .formats.mindspore_strategy import read_strategy

    a, b = read_strategy(Path(src_strategy)), read_strategy(Path(dst_strategy))
    return a.params == b.params and a.stage_device_num == b.stage_device_num and a.stage_num == b.stage_num


def _fingerprint(src: Path, *parts: Any) -> str:
    """What is converted: source files (names, sizes, mtimes), strategies' bytes, layout, prefix."""
    h = hashlib.sha256()
    for p in sorted(src.rglob("*")) if src.is_dir() else [src]:
        if p.is_file():
            st = p.stat()
            h.update(f"{p}:{st.st_size}:{st.st_mtime_ns}".encode())
    for part in parts:
        path = Path(part) if isinstance(part, (str, Path)) else None
        if path is not None and path.is_file():
            h.update(path.read_bytes())
        elif path is not None and path.is_dir():
            for f in sorted(path.iterdir()):
                h.update(f.name.encode() + f.read_bytes() if f.is_file() else b"")
        else:
            h.update(repr(part).encode())
    return h.hexdigest()


def _claim(markers: Path, fingerprint: str, out: Path) -> None:
    """Record what this output holds; an output of another conversion is never overwritten."""
    markers.mkdir(parents=True, exist_ok=True)
    job = markers / "job.json"
    if job.exists():
        old = json.loads(job.read_text()).get("fingerprint")
        if old != fingerprint:
            raise ConfigError(f"{out} holds the conversion of another checkpoint or layout; remove it or choose "
                              "another output_dir")
        for stale in markers.glob("block_*.failed"):
            stale.unlink()  # our own marker of an earlier failed attempt at this same conversion
    elif out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} exists and was not written by jaxreshard's auto conversion; choose another output_dir")
    _mark(job, json.dumps({"fingerprint": fingerprint}))


def _mark(path: Path, text: str) -> None:
    """Write a marker atomically (temporary name, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _done(markers: Path, n: int, fingerprint: str) -> bool:
    return all((markers / f"block_{i}.done").is_file() and (markers / f"block_{i}.done").read_text() == fingerprint
               for i in range(n))


def _wait(markers: Path, n: int, fingerprint: str, timeout: float, poll: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        for failed in sorted(markers.glob("block_*.failed")):
            raise JaxreshardError(f"automatic conversion failed in the converter of {failed.stem}: "
                                  f"{failed.read_text()}")
        if _done(markers, n, fingerprint):
            return
        if time.monotonic() > deadline:
            raise JaxreshardError(f"automatic conversion did not finish within {timeout:.0f} s (markers in "
                                  f"{markers}); is every converting process running?")
        time.sleep(poll)


def _env(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value and value.isdigit() else default


def auto_convert_from_config(config: Mapping[str, Any], **overrides: Any) -> Path:
    """The seed's YAML keys: `load_checkpoint`, `src_strategy_path_or_dir`, `auto_trans_ckpt`,
    `transform_process_num`, `transform_by_rank` (accepted; every rank is written once), `use_parallel`
    (False: merge a distributed checkpoint into one complete file), plus `dst_strategy` or `dst_layout` and
    `output_dir` (default `output`, converted weights under `output/transformed_checkpoint`)."""
    cfg = {**config, **overrides}
    src = cfg["load_checkpoint"]
    if not cfg.get("auto_trans_ckpt", False):
        return Path(src)
    use_parallel = cfg.get("use_parallel", True)
    return auto_convert(
        src, cfg.get("src_strategy_path_or_dir") or None,
        dst_strategy=cfg.get("dst_strategy") if use_parallel else None,
        dst_layout=cfg.get("dst_layout") if use_parallel else None,
        output_dir=Path(cfg.get("output_dir", "output")) / "transformed_checkpoint",
        transform_process_num=int(cfg.get("transform_process_num", 1)),
        rank_id=cfg.get("rank_id"), world_size=cfg.get("world_size"), timeout=float(cfg.get("timeout", 3600)),
    )  # fmt: skip
