"""Reading a jaxreshard output: its manifest supplies the layout, and a given layout must agree with it.

A distributed source jaxreshard wrote carries its layout twice: in the root manifest (per parameter: global
shape, mesh, spec, stages) and in each rank file's `jaxreshard` metadata (per tensor: global shape and block
start). Without `--src-layout`/`--src-strategy` the manifest's layout is used; with one, every parameter's
global shape and every rank's block under the given layout are compared with what the files record, and a
disagreement is an error naming the parameter, rank and both shapes (a wrong layout would otherwise convert
"successfully" into wrong tensors). File sizes are compared with the manifest on every read (cheap); hashes
are `verify`'s job.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import FormatError, LayoutError
from .formats import SourceCheckpoint
from .formats.manifest import MANIFEST_NAME, Manifest, read_manifest
from .layout import ParamLayout
from .manifests import META_KEY, direct_params, layout_from_manifest
from .plan import LayoutLike

HINT = "pass the layout it was written with, or omit --src-layout/--src-strategy to use the layout its manifest records"
MANIFEST_HINT = "the manifest was damaged or edited: restore it, or pass the layout the files were written with"


def source_manifest(source: SourceCheckpoint) -> Manifest | None:
    """The manifest at the source's root (a folder), with every listed file's size checked against the disk."""
    root = Path(source.path)
    if not root.is_dir():
        return None
    manifest = read_manifest(root)
    if manifest is None:
        return None
    for rel, record in manifest.files.items():
        path = root / rel
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            continue  # a rank folder not copied here: the plan reports missing ranks it needs
        except OSError as e:
            raise FormatError(f"{path}: cannot read: {e.strerror}") from None
        if size != record.size:
            raise FormatError(f"{path}: {size} bytes but {root / MANIFEST_NAME} records {record.size}; the file was "
                              "truncated or replaced after it was written: "
                              "copy it again (jaxreshard verify checks all)")
    return manifest


def source_layout(source: SourceCheckpoint, given: LayoutLike | None) -> LayoutLike | None:
    """The layout to read `source` with: the given one once checked against what the files record, else (for a
    distributed jaxreshard output) the one its manifest records; None when neither exists."""
    manifest = source_manifest(source)
    if given is not None:
        check_given_layout(source, given, manifest)
        return given
    if manifest is not None and source.distributed:
        layout = layout_from_manifest(manifest, str(Path(source.path) / MANIFEST_NAME))
        # a damaged or edited manifest must not silently mis-read the files: they record their blocks too
        names = list(dict.fromkeys(p for entries in source.entries.values() for p in entries))
        _against_rank_files(source, layout.resolve(names), whose=f"the layout {MANIFEST_NAME} records",
                            hint=MANIFEST_HINT)
        return layout
    return None


def check_given_layout(source: SourceCheckpoint, given: LayoutLike, manifest: Manifest | None) -> None:
    """LayoutError at the first parameter/rank where `given` contradicts the manifest or a rank file's metadata."""
    if not source.distributed:
        return
    names = list(dict.fromkeys(p for entries in source.entries.values() for p in entries))
    resolved = given.resolve(names)
    if manifest is not None:
        _against_manifest(source, resolved, manifest)
    _against_rank_files(source, resolved)


def _against_rank_files(source: SourceCheckpoint, resolved: dict[str, ParamLayout], *,
                        whose: str = "the given source layout", hint: str = HINT) -> None:
    for rank in sorted(source.entries):
        raw = source.metadata.get(rank, {}).get(META_KEY)
        if raw is not None:
            _against_rank(source, rank, resolved, _rank_params(source, rank, raw), whose, hint)


def _implied_shape(layout: ParamLayout, stored: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(s * k for s, k in zip(stored, layout.blocks_per_dim(len(stored))))


def _against_manifest(source: SourceCheckpoint, resolved: dict[str, ParamLayout], manifest: Manifest) -> None:
    where = Path(source.path) / MANIFEST_NAME
    recorded_layouts = layout_from_manifest(manifest, str(where)).params  # a damaged record is reported as such
    direct = direct_params(manifest, str(where))
    for name, layout in resolved.items():
        record = manifest.params.get(name)
        if record is None or name in direct or recorded_layouts[name] == layout:
            continue
        holders = [r for r in layout.global_ranks() if name in source.entries.get(r, {})]
        if not holders:
            continue  # the plan reports a layout that puts a parameter on ranks not holding it
        stored = source.entries[holders[0]][name].shape
        implied = _implied_shape(layout, stored)
        if implied != record.shape:
            raise LayoutError(f"{where}: parameter {name!r} on rank {holders[0]}: the given source layout makes it "
                              f"{list(implied)} (blocks of {list(stored)}) "
                              f"but the checkpoint records {list(record.shape)}; "
                              + HINT)
        if len(layout.spec) > len(record.shape):
            continue  # check_shape reports it
        recorded = recorded_layouts[name]
        mine, theirs = set(layout.global_ranks()), set(recorded.global_ranks())
        for rank in sorted(mine | theirs):
            if rank not in source.entries:
                continue
            a = layout.box(record.shape, rank % layout.devices_per_stage) if rank in mine else None
            b = recorded.box(record.shape, rank % recorded.devices_per_stage) if rank in theirs else None
            if a != b:
                raise LayoutError(f"{where}: parameter {name!r} on rank {rank}: the given source layout puts "
                                  f"{_box(a)} of {list(record.shape)} there "
                                  f"but the checkpoint holds {_box(b)}; " + HINT)


def _box(box) -> str:
    if box is None:
        return "no block"
    return f"block {list(box.shape)} at {list(box.start)}"


MAX_DIMS = 64


def _rank_params(source: SourceCheckpoint, rank: int, raw: str) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """Parse one rank file's `jaxreshard` metadata: {param: (global shape, block start)}, checked for sense."""
    path = source.files[rank][0]
    try:
        data = json.loads(raw)
        out = {}
        for name, item in dict(data["params"]).items():
            shape, start = tuple(item["shape"]), tuple(item["start"])
            if len(shape) > MAX_DIMS or len(shape) != len(start) or not all(
                    isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in shape + start):
                raise ValueError(f"parameter {name!r}: bad shape/start")
            out[str(name)] = (shape, start)
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        raise FormatError(f"{path}: damaged '{META_KEY}' metadata ({type(e).__name__}: {e}); the file was changed "
                          "after jaxreshard wrote it") from None
    for name, (shape, start) in out.items():
        entry = source.entries[rank].get(name)
        if entry is not None and any(a + s > g for a, s, g in zip(start, entry.shape, shape)):
            raise FormatError(f"{path}: parameter {name!r}: its block {list(entry.shape)} at {list(start)} "
                              "does not fit "
                              f"the recorded global shape {list(shape)}; the file is damaged")
    return out


def _against_rank(source: SourceCheckpoint, rank: int, resolved: dict[str, ParamLayout],
                  recorded: dict[str, tuple[tuple[int, ...], tuple[int, ...]]], whose: str, hint: str) -> None:
    path = source.files[rank][0]
    for name, (shape, start) in recorded.items():
        entry, layout = source.entries[rank].get(name), resolved.get(name)
        if entry is None or layout is None:
            continue
        if rank not in layout.global_ranks():
            raise LayoutError(f"{path}: parameter {name!r} on rank {rank}: {whose} puts no block of "
                              f"it on this rank but the file holds block {list(entry.shape)} at {list(start)} of "
                              f"{list(shape)}; " + hint)
        implied = _implied_shape(layout, entry.shape)
        box = layout.box(shape, rank % layout.devices_per_stage) if implied == shape else None
        if box is None or box.start != start:
            got = f"{list(implied)}" + (f" with its block at {list(box.start)}" if box is not None else "")
            raise LayoutError(f"{path}: parameter {name!r} on rank {rank}: {whose} makes it {got} "
                              f"but the file records {list(shape)} with its block {list(entry.shape)} at "
                              f"{list(start)}; " + hint)
