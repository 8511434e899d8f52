"""`jaxreshard verify`: prove that a checkpoint is what it should be, without trusting the tool that wrote it.

- `verify(src, dst)`: the two checkpoints hold the same logical tensors (names, global shapes, dtypes, bytes),
  whatever their layouts and formats. The planner maps `src` onto `dst`'s layout; for each parameter the
  source regions of every distinct destination block are read once (`fill.fill_boxes`, as a conversion reads
  them) and compared with each destination rank file holding that block (replicas are separate files, each is
  compared). One parameter in memory at a time.
- `verify(ckpt)`: `ckpt` against its own manifest (every listed file present with its size and SHA-256, no
  unlisted checkpoint file) and its layout (each rank holds exactly its parameters, blocks tile every shape).
- `check_replicas`: also compare the data-parallel replicas within a checkpoint, for sources written by other
  tools, where a wrong layout can show only in the data.

A difference raises `VerifyError` naming the first differing parameter, rank file and element.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import remote
from .describe import human_bytes
from .errors import ConfigError
from .fill import fill_boxes
from .formats import SourceCheckpoint, open_source
from .formats.base import FileHandles, aligned_empty
from .formats.manifest import MANIFEST_NAME, read_manifest
from .formats.orbax_io import is_orbax
from .integrity import (
    Structure,
    VerifyError,
    check_files,
    check_structure,
    describe_difference,
    first_difference,
    manifest_layout,
    params_summary,
    read_entry,
)  # fmt: skip
from .integrity import check_replicas as check_replicas_of
from .plan import LayoutLike, Plan, ShardPlan, is_floating, make_plan, with_dtype
from .planners.native import native_layouts
from .values import parse_dtype

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VerifyReport:
    """What was checked, for the one-line summary."""

    path: Path  # the checkpoint checked (dst, or the only one)
    reference: str  # what it was checked against: the other checkpoint, or its manifest / layout
    params: int
    rank_files: int
    logical_bytes: int
    hashed_bytes: int = 0
    replicas: int = 0  # replica blocks compared

    def summary(self) -> str:
        text = (f"verified: {self.path} matches {self.reference}: {self.params} parameters, "
                f"{human_bytes(self.logical_bytes)}, {self.rank_files} rank file(s)")
        if self.hashed_bytes:
            text += f", {human_bytes(self.hashed_bytes)} hashed"
        if self.replicas:
            text += f", {self.replicas} replica block(s) compared"
        return text


@remote.views(sources=("src", "dst"))
def verify(
    src: str | Path,
    dst: str | Path | None = None,
    *,
    src_layout: Any = None,
    src_strategy: str | Path | None = None,
    dst_layout: Any = None,
    dst_strategy: str | Path | None = None,
    check_replicas: bool = False,
    dtype: str | None = None,
    ranks: Iterable[int] | None = None,
) -> VerifyReport:
    """Verify `dst` against `src` (both given), or `src` alone against its manifest and layout.

    Layouts are given like `convert`'s (YAML path, `Layout`, `(mesh, specs)`, or a MindSpore strategy); a
    distributed checkpoint given none takes the one its manifest records. `dtype`: `dst` was written with
    floating tensors cast to it (`convert --dtype`). `ranks`: `dst` holds only these ranks (`convert --ranks`).
    Raises `VerifyError` (a `FormatError`) at the first difference, other `JaxreshardError`s for bad input.
    """
    for path in (src, dst):
        if path is not None and is_orbax(Path(path)):
            raise ConfigError(f"{path}: verify reads safetensors and .ckpt checkpoints, not orbax ones; convert it "
                              "first (jaxreshard convert --src ORBAX --dst COMPLETE)")
    if dst is None:
        return verify_one(Path(src), src_layout, src_strategy, check_replicas=check_replicas)
    a, b = open_source(src), open_source(dst)
    a_layout = layout_of(a, src_layout, src_strategy)
    b_layout = layout_of(b, dst_layout, dst_strategy)
    a_struct = check_structure(a, a_layout)
    b_struct = check_structure(b, b_layout, ranks=None if ranks is None else list(ranks))
    _same_params(a, b, a_struct, b_struct)
    cast = parse_dtype(dtype)
    _same_shapes(a, b, a_struct, b_struct, cast)
    replicas = 0
    with FileHandles() as handles:
        if check_replicas:
            replicas = check_replicas_of(a, a_struct, handles)
        plan = make_plan(a.entries, a_layout, b_layout, dst_ranks=b_struct.ranks if ranks is not None else None)
        compare_data(with_dtype(plan, cast), a, b, handles)
    return VerifyReport(b.path, str(a.path), len(plan.params), len(b_struct.ranks),
                        params_summary(b_struct.shapes, b_struct.dtypes), replicas=replicas)


def layout_of(source: SourceCheckpoint, layout: Any, strategy: Any) -> LayoutLike | None:
    """The layout given for `source` (checked against what its files record), else the one its manifest records
    (`srccheck.source_layout`, as `convert` reads it), else complete; a distributed source with neither is a
    ConfigError naming the flags."""
    return native_layouts(source, layout, strategy)[0]


def verify_one(path: Path, layout: Any, strategy: Any, *, check_replicas: bool) -> VerifyReport:
    """One checkpoint against its manifest (files, layout, shapes) and, given, its layout and its replicas."""
    manifest = read_manifest(path) if path.is_dir() else None
    if manifest is None and layout is None and strategy is None:
        raise ConfigError(f"{path}: has no manifest ({MANIFEST_NAME}); give --src to compare with, or its layout "
                          "(--src-layout / --src-strategy) to check its rank files against it")
    hashed = check_files(path, manifest) if manifest is not None else 0
    source = open_source(path)
    if layout is not None or strategy is not None:
        lay = native_layouts(source, layout, strategy)[0]
        reference = "the given layout" + (" and its manifest" if manifest else "")
    else:
        lay = manifest_layout(source, manifest, str(path / MANIFEST_NAME))  # type: ignore[arg-type]
        reference = "its manifest"
    struct = check_structure(source, lay, manifest=manifest)
    replicas = 0
    if check_replicas:
        with FileHandles() as handles:
            replicas = check_replicas_of(source, struct, handles)
    return VerifyReport(path, reference, len(struct.layouts), len(struct.ranks),
                        params_summary(struct.shapes, struct.dtypes), hashed, replicas)


def _same_params(a: SourceCheckpoint, b: SourceCheckpoint, sa: Structure, sb: Structure) -> None:
    missing = [p for p in sa.layouts if p not in sb.layouts]
    if missing:
        raise VerifyError(f"{b.path}: parameter {missing[0]!r} of {a.path} is missing ({len(missing)} missing)")
    extra = [p for p in sb.layouts if p not in sa.layouts]
    if extra:
        raise VerifyError(f"{b.path}: parameter {extra[0]!r} is not in {a.path} ({len(extra)} extra)")


def _same_shapes(a: SourceCheckpoint, b: SourceCheckpoint, sa: Structure, sb: Structure, cast: Any) -> None:
    """Global shapes and dtypes agree (`cast`: floating tensors of `a` were written as this dtype)."""
    for name, shape in sa.shapes.items():
        want = cast if cast is not None and is_floating(sa.dtypes[name]) else sa.dtypes[name]
        if shape != sb.shapes[name] or want != sb.dtypes[name]:
            raise VerifyError(f"{b.path}: parameter {name!r} is {sb.dtypes[name]}{list(sb.shapes[name])} but "
                              f"{want}{list(shape)} in {a.path}")


def compare_data(plan: Plan, a: SourceCheckpoint, b: SourceCheckpoint, handles: FileHandles) -> None:
    """Per parameter: read `a`'s regions of each distinct destination block once, compare every holder in `b`."""
    users: dict[str, dict[ShardPlan, list[int]]] = {p: {} for p in plan.params}
    for rank in plan.ranks:
        for shard in rank.shards:
            users[shard.param].setdefault(shard, []).append(rank.dst_rank)
    for name, shards in users.items():
        info = plan.params[name]
        bufs = [(shard, aligned_empty(shard.dst_box.shape, info.src_dtype)) for shard in shards]
        try:
            fill_boxes(plan, bufs, handles)
        except OSError as e:
            raise VerifyError(f"{a.path}: parameter {name!r}: reading failed: {e}") from None
        for shard, buf in bufs:
            want = buf if info.dst_dtype == info.src_dtype else buf.astype(info.dst_dtype)
            for rank in shards[shard]:
                entry = b.entries[rank][name]
                got = read_entry(handles, entry)
                if got.shape != want.shape:  # cannot happen after the shape checks; never compare misaligned
                    raise VerifyError(f"{entry.path}: parameter {name!r} block {list(got.shape)}, wanted "
                                      f"{list(want.shape)}")
                index = first_difference(got, want)
                if index is not None:
                    raise VerifyError(
                        f"{entry.path}: parameter {name!r} differs on destination rank {rank}: "
                        f"{describe_difference(shard.dst_box, index, got, want)} in {a.path}"
                    )
        del bufs


__all__ = ["VerifyError", "VerifyReport", "verify"]
