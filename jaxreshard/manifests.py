"""Self-describing outputs: the manifest of a plan, the `jaxreshard` metadata of rank files, the layout a
manifest records, and the root manifest that several `--ranks` runs fill together.

`formats/manifest.py` is the file format (pure data); this module maps it to and from plans and layouts.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from . import remote
from .caps import MAX_MESH_AXES, MAX_RANKS
from .composed import Composed
from .errors import ConfigError, FormatError
from .formats.manifest import FileRecord, Manifest, ParamRecord, read_manifest, write_manifest
from .formats.safetensors_io import DTYPE_CODES, HF_INDEX, read_safetensors_index
from .layout import COMPLETE, ParamLayout
from .plan import PerRankCopy, Plan, RankPlan
from .rulemap import ORDER_KEY

META_KEY = "jaxreshard"  # per-rank safetensors metadata: {"rank", "num_ranks", "params": {name: {shape, start}}}
NOT_CARRIED = (META_KEY, "remove_redundancy")  # source metadata that describes the source's own files only
HF_FORMATS = ("pt", "tf", "flax", "mlx")  # transformers refuses part files whose "format" names anything else


def layout_num_ranks(plan: Plan) -> int:
    """Ranks of the destination layout (the plan may hold only some of them, with `--ranks`)."""
    n = max((r.dst_rank + 1 for r in plan.ranks), default=1)
    for info in plan.params.values():
        layout = info.dst_layout
        n = max(n, (max(layout.stages, default=0) + 1) * layout.devices_per_stage)
    return n


def param_records(plan: Plan) -> dict[str, ParamRecord]:
    """Per parameter, its global shape, destination dtype code and layout, in output order."""
    out = {}
    for name, info in plan.params.items():
        layout = info.dst_layout
        code = DTYPE_CODES.get(info.dst_dtype, str(info.dst_dtype))
        out[name] = ParamRecord(info.shape, code, layout.mesh_axes, layout.spec, layout.stages)
    return out


def build_manifest(plan: Plan, source: str, output_format: str, files: Mapping[str, FileRecord]) -> Manifest:
    """The manifest of a (whole or partial) output of `plan`. Parameters copied per rank as they are
    (MindSpore pass-through) are listed under `extra.direct`: their recorded layout is not a geometry."""
    direct = [p for p, i in plan.params.items() if isinstance(i.source, PerRankCopy)]
    return Manifest(layout_num_ranks(plan), param_records(plan), dict(files), output_format, remote.display(source),
                    extra={"direct": direct} if direct else {})


def rank_metadata(plan: Plan, rank: RankPlan, num_ranks: int) -> dict[str, str]:
    """The `jaxreshard` key of a distributed rank file: its rank, the layout's rank count, and per tensor its
    global shape and the start of the block it holds (the block shape is the stored shape)."""
    if num_ranks <= 1:
        return {}
    params = {s.param: {"shape": list(plan.params[s.param].shape), "start": list(s.dst_box.start)}
              for s in rank.shards}
    return {META_KEY: json.dumps({"rank": rank.dst_rank, "num_ranks": num_ranks, "params": params},
                                 separators=(",", ":"))}


def source_metadata(source) -> dict[int, dict[str, str]]:
    """Per source rank, its safetensors metadata; for a Hugging Face folder, the entries all its parts share
    (read from the part headers, headers only)."""
    out = {r: dict(m) for r, m in source.metadata.items()}
    if source.suffix == ".safetensors" and Path(source.path).is_dir() and (Path(source.path) / HF_INDEX).is_file():
        for rank, files in source.files.items():
            parts = [read_safetensors_index(p)[1] for p in files]
            out[rank] = {k: v for k, v in parts[0].items() if all(m.get(k) == v for m in parts[1:])} if parts else {}
    return out


def carried_metadata(metadata: Mapping[int, Mapping[str, str]]) -> dict[str, str]:
    """The source `__metadata__` entries every output file carries: those all source files agree on, except
    the ones that describe the source files themselves (our per-rank key, MindSpore's remove_redundancy)."""
    ranks = list(metadata.values())
    if not ranks:
        return {}
    common = {k: v for k, v in ranks[0].items() if k not in NOT_CARRIED}
    return {k: v for k, v in common.items() if all(m.get(k) == v for m in ranks[1:])}


def with_order(metadata: Mapping[str, str], plan: Plan, source_names: list[str]) -> dict[str, str]:
    """The metadata a plan's files carry, with the source order (`rulemap.ORDER_KEY`): recorded when the plan
    joins tensors (stack, concat), so that `--reverse` writes them back in their original places; dropped when
    it splits them (the reversed files are the original ones); carried as it is otherwise (a reshard)."""
    users: dict[str, int] = {}
    joins = False
    for info in plan.params.values():
        if isinstance(info.source, Composed):
            names = {part.src_param for part in info.source.parts}
            joins = joins or len(names) > 1
            for name in names:
                users[name] = users.get(name, 0) + 1
    rest = {k: v for k, v in metadata.items() if k != ORDER_KEY}
    if joins:
        return {**rest, ORDER_KEY: json.dumps(source_names, separators=(",", ":"))}
    return rest if any(n > 1 for n in users.values()) else dict(metadata)


def hf_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    """Carried metadata fit for Hugging Face part files: a "format" transformers refuses (MindSpore's "ms")
    is left out, and a missing one is `pt` (what `save_pretrained` writes; `from_pretrained` refuses a file
    without it)."""
    kept = {k: v for k, v in metadata.items() if k != "format" or v in HF_FORMATS}
    return kept if "format" in kept else {"format": "pt", **kept}


@dataclass(frozen=True)
class ManifestLayout:
    """The layout a manifest records, as a `LayoutLike` (read or verify a jaxreshard output without being told
    its layout). Built only by `layout_from_manifest`, which checks every record first."""

    params: Mapping[str, ParamLayout]
    num_ranks: int
    where: str

    def resolve(self, params: Iterable[str]) -> dict[str, ParamLayout]:
        out = {}
        for name in params:
            layout = self.params.get(name)
            if layout is None:
                raise FormatError(f"{self.where}: parameter {name!r} is in the checkpoint files but not in their "
                                  "manifest; the files were changed after jaxreshard wrote them: pass the layout "
                                  "they were written with (--src-layout)")
            out[name] = layout
        return out


def layout_from_manifest(manifest: Manifest, where: str) -> ManifestLayout:
    """The layout of every parameter a manifest records. A damaged or hostile manifest is a FormatError before
    anything enumerates its ranks: a rank count over the cap, a record whose mesh and spec do not fit together,
    whose mesh x stages exceed the rank count (a mesh of 2^40 devices on 8 ranks), or whose spec does not
    divide its shape. A parameter copied per rank as it is (`direct`) is whole on every rank."""
    n = manifest.num_ranks
    if n > MAX_RANKS:
        raise FormatError(f"{where}: records {n} ranks, over the cap of {MAX_RANKS}; the manifest is damaged")
    direct = direct_params(manifest, where)
    params = {name: record_layout(name, record, n, where) for name, record in manifest.params.items()}
    copies = ParamLayout((("copies", n),), (), (0,)) if n > 1 else COMPLETE
    return ManifestLayout({name: copies if name in direct else p for name, p in params.items()}, n, where)


def direct_params(manifest: Manifest, where: str) -> set[str]:
    """The parameters a manifest lists under `extra.direct` (see `build_manifest`): MindSpore pass-through
    copies, whole on every rank, whose recorded layout is not their geometry."""
    names = manifest.extra.get("direct") or []
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise FormatError(f"{where}: 'extra.direct' must be a list of parameter names; the manifest is damaged")
    return set(names)


def record_layout(name: str, record: ParamRecord, num_ranks: int, where: str) -> ParamLayout:
    """One manifest record as a `ParamLayout`, checked (see `layout_from_manifest`)."""
    mesh, spec = [list(a) for a in record.mesh_axes], [list(d) for d in record.spec]
    problem = _mesh_problem(record)
    if problem:
        raise FormatError(f"{where}: parameter {name!r}: mesh {mesh} and spec {spec} do not fit together "
                          f"({problem}); the manifest is damaged")
    layout = ParamLayout(record.mesh_axes, record.spec, record.stages)
    stages = list(record.stages)
    if not stages or len(set(stages)) != len(stages):
        raise FormatError(f"{where}: parameter {name!r}: stages {stages} (none, or one named twice); the manifest "
                          "is damaged")
    devices = layout.devices_per_stage
    if devices * (max(stages) + 1) > num_ranks:
        raise FormatError(f"{where}: parameter {name!r} is laid out on {devices} devices x stages {stages}, beyond "
                          f"the manifest's {num_ranks} ranks; the manifest is damaged")
    shape = record.shape
    if len(spec) > len(shape) or any(n % k for n, k in zip(shape, layout.blocks_per_dim(len(shape)))):
        raise FormatError(f"{where}: parameter {name!r}: spec {spec} on mesh {mesh} does not divide its shape "
                          f"{list(shape)}; the manifest is damaged")
    return layout


def _mesh_problem(record: ParamRecord) -> str | None:
    """What is wrong with a record's mesh and spec (too many axes, an axis named twice, a spec axis not in the
    mesh or used twice), or None."""
    names = [a for a, _ in record.mesh_axes]
    used = [a for dim in record.spec for a in dim]
    if len(names) > MAX_MESH_AXES:
        return f"{len(names)} mesh axes, over the cap of {MAX_MESH_AXES}"
    if len(set(names)) != len(names):
        return "a mesh axis named twice"
    unknown = next((a for a in used if a not in set(names)), None)
    if unknown is not None:
        return f"unknown mesh axis {unknown!r} in the spec"
    if len(set(used)) != len(used):
        return "a mesh axis used twice in the spec"
    return None


def check_same_layout(old: Manifest, new: Manifest, where: Path) -> None:
    """Two `--ranks` runs of one destination must write one layout: ConfigError naming the first parameter
    whose record differs. (A run may record only the parameters its ranks hold: MindSpore plans of some
    pipeline stages.)"""
    if old.output_format != new.output_format:
        raise ConfigError(f"{where}: this run writes {new.output_format} files but the destination holds "
                          f"{old.output_format} files; two layouts cannot share one destination: choose another --dst")
    for name in new.params:
        a, b = old.params.get(name), new.params[name]
        if a is not None and a != b:
            raise ConfigError(f"{where}: parameter {name!r} is {_describe(b)} in this run but {_describe(a)} in the "
                              "ranks already written; two layouts cannot share one destination: choose another --dst")


def _describe(record: ParamRecord | None) -> str:
    if record is None:
        return "absent"
    return (f"{record.dtype}{list(record.shape)} spec {[list(d) for d in record.spec]} on mesh "
            f"{dict(record.mesh_axes)} stages {list(record.stages)}")


def merge_root_manifest(dst: Path, new: Manifest, folders: Iterable[str]) -> None:
    """Add a `--ranks` run's files to the manifest at `dst` (read-modify-write under `flock` on the
    destination directory itself, so concurrent nodes serialise without extra files). Records under the
    rank `folders` this run replaced are dropped first. An object-store destination's root manifest is merged
    the same way, then uploaded only if no other host changed it meanwhile (else merged again)."""
    if not remote.updated_root(dst, lambda: _merge_local(dst, new, folders)):
        _merge_local(dst, new, folders)


def _merge_local(dst: Path, new: Manifest, folders: Iterable[str]) -> None:
    fd = os.open(dst, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        old = read_manifest(dst)
        files = dict(new.files)
        if old is not None:
            check_same_layout(old, new, dst)
            prefixes = tuple(f"{f}/" for f in folders)
            kept = {f: r for f, r in old.files.items() if not f.startswith(prefixes) and f not in folders}
            files = {**kept, **new.files}
            params = {**old.params, **new.params}
            new = replace(new, params=params, num_ranks=max(old.num_ranks, new.num_ranks))
        write_manifest(dst, replace(new, files=files))
    finally:
        os.close(fd)  # releases the lock


def check_root_layout(dst: Path, new: Manifest) -> None:
    """Before a `--ranks` run writes anything: the destination's manifest (if any) must record this layout."""
    if Path(dst).is_dir():
        old = read_manifest(dst)
        if old is not None:
            check_same_layout(old, new, Path(dst))
