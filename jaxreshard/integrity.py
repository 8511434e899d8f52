"""Checks of one checkpoint on its own, for `jaxreshard verify`: its files against its manifest (sizes,
SHA-256, nothing unlisted), its rank files against its layout (each rank holds exactly the parameters the
layout puts there, in blocks that tile every global shape), and its data-parallel replicas against each other.

A layout can be wrong in ways only the files show (a rank holding a parameter it should not, blocks of the
wrong shape) or only the data shows (two "replicas" holding different blocks), so each is checked here before
any data is trusted. Everything streams: one block (two for replicas) in memory at a time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .box import Box
from .coverage import check_exact_cover
from .errors import FormatError, JaxreshardError
from .formats import READERS, SourceCheckpoint
from .formats.base import FileHandles, TensorEntry, aligned_empty, read_box
from .formats.manifest import MANIFEST_NAME, Manifest, file_sha256
from .formats.safetensors_io import DTYPE_CODES, HF_INDEX
from .layout import COMPLETE, ParamLayout, unravel
from .manifests import ManifestLayout, layout_from_manifest
from .plan import LayoutLike, format_ranks, full_shape, merge_orders

COMPARE_CHUNK = 16 << 20  # bytes compared per step: bounds the temporary of `!=`
INDEX_FILES = (HF_INDEX, "param_name_map.json")  # checkpoint files that are not tensor files


class VerifyError(FormatError):
    """Two checkpoints (or two replicas) differ, or a checkpoint does not match its manifest."""


def check_files(root: Path, manifest: Manifest) -> int:
    """Every file the manifest lists exists with its size and SHA-256, and no checkpoint file is unlisted.
    Cheap checks (presence, sizes, unlisted files) come first, then the hashes; returns the bytes hashed."""
    where = root / MANIFEST_NAME
    for rel, record in sorted(manifest.files.items()):
        path = root / rel
        if path.is_symlink() or not path.is_file():
            raise VerifyError(f"{path}: listed in {where} but missing (or not a regular file)")
        size = path.stat().st_size
        if size != record.size:
            raise VerifyError(f"{path}: {size} bytes but {where} records {record.size}; the file was truncated "
                              "or rewritten after it was written")
    listed = set(manifest.files)
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if (path.suffix in READERS or path.name in INDEX_FILES) and not path.name.startswith(".") \
                and rel not in listed and path.is_file():
            raise VerifyError(f"{path}: a checkpoint file that {where} does not list; remove it or re-run the "
                              "conversion")
    hashed = 0
    for rel, record in sorted(manifest.files.items()):
        path = root / rel
        try:
            digest = file_sha256(path)
        except OSError as e:
            raise VerifyError(f"{path}: cannot read: {e.strerror}") from None
        hashed += record.size
        if digest != record.sha256:
            raise VerifyError(f"{path}: SHA-256 {digest[:16]}... differs from {record.sha256[:16]}... recorded in "
                              f"{where}; the file changed after it was written")
    return hashed


@dataclass(frozen=True)
class Structure:
    """A checkpoint checked against its layout: per parameter (in file order) its layout, global shape, dtype."""

    layouts: dict[str, ParamLayout]
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, np.dtype]
    ranks: tuple[int, ...]


def check_structure(
    source: SourceCheckpoint, layout: LayoutLike | None, *, ranks: Sequence[int] | None = None,
    manifest: Manifest | None = None,
) -> Structure:  # fmt: skip
    """Each rank file holds exactly the parameters `layout` puts on it, holders agree on block shape and dtype,
    the blocks tile each global shape exactly, and (with a manifest) shapes and dtypes are the recorded ones.
    `ranks`: the ranks expected to be present (default: all of the layout's)."""
    total = layout.num_ranks if layout is not None else 1
    want = sorted(set(ranks)) if ranks is not None else list(range(total))
    present = source.ranks
    if present != want:
        missing, extra = sorted(set(want) - set(present)), sorted(set(present) - set(want))
        what = f"rank folders {format_ranks(missing)} are missing" if missing else \
            f"it has rank folders {format_ranks(extra)} beyond the layout's {total} ranks"
        raise VerifyError(f"{source.path}: {what}; is the layout the one it was written with?")
    names = merge_orders([list(source.entries[r]) for r in present])
    if manifest is not None:
        _same_names(source.path, names, list(manifest.params), "the files", "its manifest")
    layouts = layout.resolve(names) if layout is not None else {p: COMPLETE for p in names}
    expected: dict[int, set[str]] = {r: set() for r in present}
    for name, pl in layouts.items():
        for r in pl.global_ranks():
            if r in expected:
                expected[r].add(name)
    for r in present:
        entries = source.entries[r]
        path = _rank_path(source, r)
        lacking = [p for p in names if p in expected[r] and p not in entries]
        if lacking:
            raise VerifyError(f"{path}: rank {r} lacks parameter {lacking[0]!r}, which the layout puts on it "
                              f"(stages {list(layouts[lacking[0]].stages)})")
        stray = [p for p in entries if p not in expected[r]]
        if stray:
            raise VerifyError(f"{path}: rank {r} holds parameter {stray[0]!r}, which the layout puts only on ranks "
                              f"{format_ranks(layouts[stray[0]].global_ranks()[:64])}; wrong layout or stray tensor")
    shapes, dtypes = {}, {}
    for name, pl in layouts.items():
        shape, dtype = full_shape(name, pl, source.entries)
        _check_cover(name, pl, shape)
        if manifest is not None:
            record = manifest.params[name]
            if shape != record.shape or DTYPE_CODES.get(dtype) != record.dtype:
                raise VerifyError(f"{source.path}: parameter {name!r} is {DTYPE_CODES.get(dtype)}{list(shape)} in "
                                  f"the files but {record.dtype}{list(record.shape)} in its manifest")
        shapes[name], dtypes[name] = shape, dtype
    return Structure(layouts, shapes, dtypes, tuple(present))


def _check_cover(name: str, layout: ParamLayout, shape: tuple[int, ...]) -> None:
    try:
        layout.check_shape(name, shape)
        boxes = {layout.box(shape, local) for local in range(layout.devices_per_stage)}
        check_exact_cover(name, Box.full(shape), list(boxes))
    except JaxreshardError as e:
        raise VerifyError(f"the blocks of parameter {name!r} do not tile its shape {list(shape)}: {e}") from None


def _same_names(where: Path, have: list[str], want: list[str], have_what: str, want_what: str) -> None:
    have_set, want_set = set(have), set(want)
    extra = [p for p in have if p not in want_set]
    if extra:
        raise VerifyError(f"{where}: parameter {extra[0]!r} is in {have_what} but not in {want_what}")
    missing = [p for p in want if p not in have_set]
    if missing:
        raise VerifyError(f"{where}: parameter {missing[0]!r} is in {want_what} but not in {have_what}")


def _rank_path(source: SourceCheckpoint, rank: int) -> Path:
    files = source.files.get(rank, ())
    return files[0] if len(files) == 1 else source.path


def read_entry(handles: FileHandles, entry: TensorEntry) -> np.ndarray:
    """A whole stored tensor (one rank's block), read once."""
    out = aligned_empty(entry.shape, entry.dtype)
    try:
        read_box(handles, entry, Box.full(entry.shape), out)
    except OSError as e:
        raise VerifyError(f"{entry.path}: parameter {entry.param!r}: cannot read: {e.strerror}") from None
    return out


def first_difference(a: np.ndarray, b: np.ndarray) -> int | None:
    """The flat element index of the first bitwise difference (NaNs compare by bits), or None."""
    x = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
    y = np.ascontiguousarray(b).reshape(-1).view(np.uint8)
    for lo in range(0, x.size, COMPARE_CHUNK):
        xs, ys = x[lo : lo + COMPARE_CHUNK], y[lo : lo + COMPARE_CHUNK]
        if not np.array_equal(xs, ys):
            return (lo + int(np.argmax(xs != ys))) // a.dtype.itemsize
    return None


def describe_difference(box: Box, index: int, got: np.ndarray, want: np.ndarray) -> str:
    """'element 5 of block [0:4, 0:8] (global index [0, 5]): 1.5 here, 2.0 there' for a message."""
    local = unravel(index, box.shape) if box.shape else []
    global_index = [s + i for s, i in zip(box.start, local)]
    return (f"element {index} of its block {box} (global index {global_index}) is "
            f"{got.reshape(-1)[index]} here but {want.reshape(-1)[index]}")


def check_replicas(source: SourceCheckpoint, structure: Structure, handles: FileHandles) -> int:
    """Blocks the layout says are identical on several ranks must hold the same bytes; returns the number of
    replica blocks compared. One parameter and two blocks in memory at a time."""
    compared = 0
    for name, pl in structure.layouts.items():
        shape, n = structure.shapes[name], pl.devices_per_stage
        cells: dict[tuple[int, ...], list[int]] = {}
        for r in pl.global_ranks():
            if r in source.entries:
                cells.setdefault(pl.block_coords(r % n, len(shape)), []).append(r)
        for holders in cells.values():
            if len(holders) < 2:
                continue
            first = read_entry(handles, source.entries[holders[0]][name])
            for r in holders[1:]:
                entry = source.entries[r][name]
                other = read_entry(handles, entry)
                index = first_difference(other, first)
                compared += 1
                if index is not None:
                    box = pl.box(shape, r % n)
                    raise VerifyError(
                        f"{entry.path}: parameter {name!r} on rank {r} should be a replica of rank {holders[0]} but "
                        f"{describe_difference(box, index, other, first)} on rank {holders[0]}; the layout is not "
                        "the one this checkpoint was saved with, or a replica is damaged"
                    )
    return compared


def manifest_layout(source: SourceCheckpoint, manifest: Manifest, where: str) -> ManifestLayout:
    """The manifest's layout (`manifests.layout_from_manifest`: each record checked, a hostile mesh refused
    before any rank is enumerated), once its rank count is known to match the rank folders present."""
    if manifest.num_ranks != len(source.entries) and (manifest.num_ranks > 1 or source.distributed):
        raise VerifyError(f"{where}: records {manifest.num_ranks} ranks but {source.path} has "
                          f"{len(source.entries)} rank file(s) ({format_ranks(source.ranks)})")
    return layout_from_manifest(manifest, where)


def params_summary(shapes: Mapping[str, tuple[int, ...]], dtypes: Mapping[str, np.dtype]) -> int:
    """Total logical bytes of the parameters (for summaries)."""
    return sum(int(np.prod(s, dtype=np.int64)) * dtypes[p].itemsize for p, s in shapes.items())
