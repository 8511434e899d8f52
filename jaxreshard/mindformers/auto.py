"""Automatic conversion at load time (MindFormers' `auto_trans_ckpt`), for training and inference jobs.

Every process of the job calls `auto_convert` with the same arguments and its own rank. If the checkpoint
already has the job's layout nothing happens. Otherwise the destination ranks are cut into blocks, each
converted by one process while the others wait (see `scope.py` for who converts what):

- shared disk (default, MindFormers' behaviour): `transform_process_num` blocks over all destination ranks;
  process `i * world_size / n` converts block i into the one `output_dir` every node sees.
- `shared_disk=False`: node k (global ranks `[k * npu_num_per_node, (k + 1) * npu_num_per_node)`) converts
  exactly its own devices' destination ranks into its own `output_dir`, split among `transform_process_num`
  converters of that node; no process waits for another node.

Unlike MindFormers: waiting has a timeout, a converter's failure is raised on every process that waits for
it with the converter's own message, completion is marked atomically (a marker file renamed into place), nothing
the user owns is deleted, and a rerun reuses a completed conversion only after checking that every rank file
it wrote is still there and complete (`reuse.py`); otherwise it converts again and says why.
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

from .. import api, remote
from ..errors import ConfigError, FormatError, JaxreshardError
from ..formats.mindspore_strategy import read_strategy
from ..fsutil import check_file_prefix
from .compat import parse_bool
from .reuse import MANIFEST, Reuse, block_record
from .scope import Scope, default_npu_num_per_node, make_scope

log = logging.getLogger(__name__)

MARKERS = ".jaxreshard"  # beside the output folder: job.json (what is converted), <block>.done/.failed
STALE_FAILURE_GRACE_S = 30.0  # how long a failure marker older than a waiting process may take to be cleared
CLOCK_SKEW_S = 2.0  # between this host and a shared disk's file times

__all__ = ["auto_convert", "auto_convert_from_config", "default_npu_num_per_node", "matches"]


@remote.views(sources=("load_checkpoint",))
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
    npu_num_per_node: int | None = None,
    shared_disk: bool = True,
) -> Path:
    """Return the checkpoint this process should load: `load_checkpoint` itself when it already matches the
    destination layout/strategy, else the converted copy under `output_dir/<name>` (converted once), which
    holds this process's rank folder complete."""
    check_file_prefix(prefix)  # before any marker or output is written
    src = Path(load_checkpoint)
    rank_id = _env("RANK_ID", 0) if rank_id is None else rank_id
    world_size = _env("RANK_SIZE", 1) if world_size is None else world_size
    scope = make_scope(rank_id, world_size, transform_process_num, npu_num_per_node, shared_disk)
    if not src.exists():
        raise ConfigError(f"{scope.node_label}: source checkpoint {src} does not exist on this node; copy it "
                          "there (or put it on a disk every node sees) before starting the job")
    if matches(src, src_strategy_path_or_dir, dst_strategy, dst_layout):
        log.info("%s already has the job's layout; loading it as it is", src)
        return src
    out = Path(output_dir) / src.name.split(".")[0]
    markers = out.parent / f".{out.name}{MARKERS}"
    fingerprint = _fingerprint(src, src_strategy_path_or_dir, dst_strategy, dst_layout, prefix)
    reuse = Reuse(out, markers, fingerprint)
    if reuse.all_done(scope.block_names):
        return out
    if scope.converter and not reuse.block_done(scope.my_block):
        options = {"src_strategy": src_strategy_path_or_dir, "dst_strategy": dst_strategy, "dst_layout": dst_layout,
                   "prefix": prefix}
        _convert_block(scope, reuse, src, out, options)
    _wait(scope, reuse, timeout, poll)
    return out


def _convert_block(scope: Scope, reuse: Reuse, src: Path, out: Path, options: dict[str, Any]) -> None:
    """Convert this converter's block of destination ranks into `out`, then mark it done (or failed, with why)."""
    name = scope.my_block
    done, failed = reuse.markers / f"{name}.done", reuse.markers / f"{name}.failed"
    try:
        _claim(reuse, scope, out)
        if done.exists():
            log.info("automatic conversion: converting %s again: %s", name, reuse.why_not(name))
            done.unlink()
        job = api.plan_conversion(src, **options)
        ranks = scope.block_ranks(len(job.plan.ranks))
        files: tuple[Path, ...] = ()
        if ranks:
            files = api.convert(src, out, **options, ranks=ranks, overwrite=True).files
        _mark(done, json.dumps(block_record(reuse.fingerprint, out, files)))
        problem = reuse.why_not(name)
        if problem is not None:  # e.g. a stale manifest: converting again would not help, waiting would hang
            done.unlink()
            raise FormatError(f"{name}: the output fails its check right after conversion: {problem}; remove the "
                              f"stale {MANIFEST} (or the whole output folder {out}) and start again")
    except Exception as e:  # every waiting process must learn why, then this one fails too
        error = e
        if isinstance(e, OSError):  # the output folder cannot be written: the user's to fix, not a bug
            error = ConfigError(f"{scope.node_label}: automatic conversion cannot write {e.filename or out}: "
                                f"{e.strerror or e}; check output_dir")
        try:
            _mark(failed, json.dumps({"fingerprint": reuse.fingerprint, "error": f"{type(error).__name__}: {error}"}))
        except OSError:
            log.warning("could not write %s; the processes waiting for %s will time out", failed, name)
        if error is e:
            raise
        raise error from e


def matches(src: Path, src_strategy: Any, dst_strategy: Any, dst_layout: Any) -> bool:
    """True when the checkpoint already has the destination layout (no conversion needed)."""
    if dst_layout is not None:
        return False
    if src_strategy is None or dst_strategy is None:
        return src_strategy is None and dst_strategy is None
    a, b = read_strategy(Path(src_strategy)), read_strategy(Path(dst_strategy))
    return a.params == b.params and a.stage_device_num == b.stage_device_num and a.stage_num == b.stage_num


def _fingerprint(src: Path, *parts: Any) -> str:
    """What is converted: source files (names below the source, sizes, mtimes: the same for an object-store
    source's view on every node), strategies' bytes, layout, prefix."""
    h = hashlib.sha256()
    for p in sorted(src.rglob("*")) if src.is_dir() else [src]:
        if p.is_file():
            st = p.stat()
            h.update(f"{p.relative_to(src) if p != src else p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
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


def _claim(reuse: Reuse, scope: Scope, out: Path) -> None:
    """Record what this output holds; an output of another conversion is never overwritten (markers of one
    whose output is gone or never written are). Only this converter's own stale failure marker is removed
    (other nodes' converters may share the folder)."""
    markers = reuse.markers
    markers.mkdir(parents=True, exist_ok=True)
    job = markers / "job.json"
    empty = not out.exists() or not any(out.iterdir())
    if job.exists():
        if reuse.job_fingerprint() != reuse.fingerprint and not empty:
            raise ConfigError(f"{out} holds the conversion of another checkpoint or layout; remove it (and "
                              f"{markers}) or choose another output_dir")
    elif not empty:
        raise ConfigError(f"{out} exists and was not written by jaxreshard's auto conversion; choose another "
                          "output_dir")
    (markers / f"{scope.my_block}.failed").unlink(missing_ok=True)  # an earlier failed attempt at this block
    _mark(job, json.dumps({"fingerprint": reuse.fingerprint}))


def _mark(path: Path, text: str) -> None:
    """Write a marker atomically (temporary name, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _wait(scope: Scope, reuse: Reuse, timeout: float, poll: float) -> None:
    """Until every block this process needs is done and its files check out; a converter's failure, or the
    deadline, is raised here naming the block and its converter's rank."""
    started, deadline = time.time(), time.monotonic() + timeout
    first_seen: dict[str, float] = {}
    while True:
        for name in scope.block_names:
            _check_failure(scope, reuse, name, started, first_seen, deadline)
        if reuse.all_done(scope.block_names):
            return
        if time.monotonic() > deadline:
            missing = [n for n in scope.block_names if not reuse.block_done(n)]
            who = "; ".join(f"{n} (converter: rank {scope.converter_rank(n)}; {reuse.why_not(n)})" for n in missing)
            raise JaxreshardError(f"automatic conversion for {scope.node_label} did not finish within {timeout:.0f} "
                                  f"s: still waiting for {who} (markers in {reuse.markers}); is every converting "
                                  "process running? A converter that died leaves no marker")
        time.sleep(poll)


def _check_failure(scope: Scope, reuse: Reuse, name: str, started: float, first_seen: dict[str, float],
                   deadline: float) -> None:
    """Raise the failure a block's converter recorded. A marker written before this process started may be a
    previous attempt's, which a restarted converter clears when it claims the block: that one is raised only if
    it is still there after a grace period (a restarted job must not fail on its last run's error)."""
    found = reuse.failure(name)
    if found is None:
        first_seen.pop(name, None)
        return
    error, mtime = found
    now = time.monotonic()
    waited = now - first_seen.setdefault(name, now)
    if mtime < started - CLOCK_SKEW_S and waited < STALE_FAILURE_GRACE_S and now <= deadline:
        return
    raise JaxreshardError(f"automatic conversion failed in the converter of {name} (rank "
                          f"{scope.converter_rank(name)}, {scope.node_label}): {error}")


def _env(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value and value.isdigit() else default


def _int_key(cfg: Mapping[str, Any], key: str, default: Any) -> Any:
    value = cfg.get(key, default)
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    raise ConfigError(f"{key} must be a whole number, got {value!r}")


def _bool_key(cfg: Mapping[str, Any], key: str, default: bool) -> bool:
    value = cfg.get(key, default)
    try:
        return parse_bool(value) if isinstance(value, (bool, str)) else _bad_bool(value)
    except ValueError:
        raise ConfigError(f"{key} must be true or false, got {value!r}") from None


def _bad_bool(value: Any) -> bool:
    raise ValueError(value)


def auto_convert_from_config(config: Mapping[str, Any], **overrides: Any) -> Path:
    """The seed's YAML keys: `load_checkpoint`, `src_strategy_path_or_dir`, `auto_trans_ckpt`,
    `transform_process_num`, `transform_by_rank` (accepted; every rank is written once), `use_parallel`
    (False: merge a distributed checkpoint into one complete file), `npu_num_per_node`, `shared_disk`, plus
    `dst_strategy` or `dst_layout` and `output_dir` (default `output`, converted weights under
    `output/transformed_checkpoint`)."""
    cfg = {**config, **overrides}
    if "load_checkpoint" not in cfg:
        raise ConfigError("automatic conversion needs load_checkpoint (the checkpoint to load)")
    src = cfg["load_checkpoint"]
    if not _bool_key(cfg, "auto_trans_ckpt", False):
        return Path(src)
    use_parallel = _bool_key(cfg, "use_parallel", True)
    try:
        timeout = float(cfg.get("timeout", 3600))
    except (TypeError, ValueError):
        raise ConfigError(f"timeout must be a number of seconds, got {cfg.get('timeout')!r}") from None
    return auto_convert(
        src, cfg.get("src_strategy_path_or_dir") or None,
        dst_strategy=cfg.get("dst_strategy") if use_parallel else None,
        dst_layout=cfg.get("dst_layout") if use_parallel else None,
        output_dir=Path(cfg.get("output_dir", "output")) / "transformed_checkpoint",
        transform_process_num=_int_key(cfg, "transform_process_num", 1),
        rank_id=_int_key(cfg, "rank_id", None), world_size=_int_key(cfg, "world_size", None), timeout=timeout,
        npu_num_per_node=_int_key(cfg, "npu_num_per_node", None), shared_disk=_bool_key(cfg, "shared_disk", True),
    )  # fmt: skip
