"""`unify`: merge distributed safetensors into complete weights, as Hugging Face or MindSpore part files.

Planned like any conversion (memory stays one parameter at a time, the output is committed atomically); this
module decides which parameters go out and how they are cut into part files.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures.process import BrokenProcessPool
from dataclasses import replace
from pathlib import Path

import numpy as np

from . import manifests, remote
from .errors import ConfigError, OutputError
from .execute import execute
from .formats import open_source, rank_dirs, source_from_files
from .formats.companions import copy_companions, find_companions
from .formats.manifest import FileRecord, file_sha256, write_manifest
from .formats.safetensors_io import SafetensorsWriter
from .formats.writers import OutputKind, PartsWriter, hf_part_split, ms_part_split, write_index
from .fsutil import atomic_output, check_destination
from .jobs import Job, read_paths
from .plan import make_plan, merge_orders
from .planners.native import native_layouts
from .planners.sides import LayoutArg
from .run import worker_pool
from .values import parse_size


def pick_by_suffix(source_dir: Path, file_suffix: str | None) -> dict[int, Path] | None:
    """Per rank folder, the one `*{suffix}.safetensors` (an ambiguous choice is an error listing candidates)."""
    if file_suffix is None:
        return None
    picked = {}
    for rank, rank_dir in sorted(rank_dirs(source_dir).items()):  # canonical names only: no two alias one rank
        found = sorted(p for p in rank_dir.glob(f"*{file_suffix}.safetensors") if p.is_file())
        if len(found) != 1:
            what = "no file matches" if not found else f"{len(found)} files match: {[p.name for p in found]}"
            raise ConfigError(f"{rank_dir}: --file-suffix {file_suffix!r}: {what}; pick a suffix that names one file")
        picked[rank] = found[0]
    return picked


def plan_unify(
    src: str | Path, *, src_layout: LayoutArg = None, src_strategy: str | Path | None = None,
    file_suffix: str | None = None, has_redundancy: bool | None = None,
    filter_out_param_prefix: Sequence[str] = (),
) -> Job:  # fmt: skip
    """Plan merging distributed safetensors into complete weights (filtered names never appear anywhere)."""
    picked = pick_by_suffix(Path(src), file_suffix)
    source = source_from_files(Path(src), picked) if picked is not None else open_source(src)
    if source.suffix != ".safetensors":
        raise ConfigError(f"{source.path}: unify merges safetensors; use convert for {source.suffix} checkpoints")
    flags = {r: m.get("remove_redundancy") for r, m in source.metadata.items()}
    deduped = {r for r, v in flags.items() if v == "True"}
    if deduped and has_redundancy:
        raise ConfigError(f"{source.path}: --has-redundancy true, but ranks {sorted(deduped)} were saved with "
                          "remove_redundancy (each parameter only on its owner rank); drop the flag")
    if has_redundancy is False and not deduped and any(v == "False" for v in flags.values()):
        raise ConfigError(f"{source.path}: --has-redundancy false, but the files say they were saved with "
                          "every copy (remove_redundancy False); drop the flag")
    kept = {r: {n: e for n, e in entries.items() if not n.startswith(tuple(filter_out_param_prefix))}
            for r, entries in source.entries.items()}
    names = merge_orders([list(kept[r]) for r in sorted(kept)])
    if not names:
        raise ConfigError(f"{source.path}: --filter-out-param-prefix {list(filter_out_param_prefix)} leaves no "
                          "parameter to write")
    src_l, _ = native_layouts(source, src_layout, src_strategy)
    strict = not (deduped or has_redundancy is False)
    plan = make_plan(kept, src_l, None, strict=strict)
    return Job(plan, replace(source, entries=kept), OutputKind("safetensors"))


def restrict(plan, names: set[str]):
    """The plan for some parameters only."""
    ranks = tuple(replace(r, shards=tuple(s for s in r.shards if s.param in names)) for r in plan.ranks)
    return replace(plan, params={p: i for p, i in plan.params.items() if p in names}, ranks=ranks)


def write_unified(
    job: Job, dst: Path, *, layout: str = "hf", max_file_bytes: int | None = 5 * 10**9, process_num: int = 1,
    overwrite: bool = False, hyper: Sequence[str] = (),
) -> list[Path]:  # fmt: skip
    """Write the complete checkpoint of `job` as part files + index (written last), `process_num` workers each
    writing a contiguous block of parts; any failed worker fails the whole command and nothing is committed.

    layout "hf": `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`; "ms": MindSpore's
    `part{i}.safetensors` + `param_name_map.json`, with the `hyper` parameters in `hyper_param.safetensors`.
    """
    plan, source = job.plan, job.source
    if source is None:
        raise ConfigError("unify writes rank files read from a source checkpoint; this job has none")
    (rank,) = plan.ranks
    everything = [(s.param, plan.params[s.param].dst_dtype, s.dst_box.shape) for s in rank.shards]
    params = [p for p in everything if p[0] not in hyper]
    parts = hf_part_split(params, max_file_bytes) if layout == "hf" else ms_part_split(params)
    groups, names, index_name = parts
    if process_num < 1:
        raise ConfigError(f"--process-num {process_num} must be at least 1")
    workers = min(process_num, len(groups))
    blocks = [list(range(len(groups)))[i::workers] for i in range(workers)]
    check_destination(dst, read_paths(source), overwrite=overwrite)
    carried = manifests.carried_metadata(manifests.source_metadata(source))
    metadata = manifests.hf_metadata(carried) if layout == "hf" else None
    with atomic_output(dst, overwrite=overwrite) as tmp:
        jobs = [(restrict(plan, {params[j][0] for i in b for j in groups[i]}), tmp, params, parts, set(b), metadata)
                for b in blocks]
        files: dict = {}
        if workers == 1:
            files.update(_write_parts(*jobs[0]))
        else:
            with worker_pool(workers) as pool:
                for future, block in zip([pool.submit(_write_parts, *j) for j in jobs], blocks):
                    try:
                        files.update(future.result())  # a failed worker fails the command; atomic_output removes all
                    except BrokenProcessPool:
                        raise OutputError(f"a --process-num worker died (killed, or out of memory?) while writing "
                                          f"part files {[names[i] for i in block][:4]}; nothing was committed") \
                            from None
        extra = [p for p in everything if p[0] in hyper]
        if extra:
            files.update(_write_hyper(restrict(plan, {p[0] for p in extra}), tmp, extra))
        weight_map = {params[j][0]: names[i] for i, g in enumerate(groups) for j in g}
        write_index(tmp / index_name, weight_map, sum(int(np.prod(p[2])) * np.dtype(p[1]).itemsize for p in params))
        files[index_name] = FileRecord((tmp / index_name).stat().st_size, file_sha256(tmp / index_name))
        files.update(copy_companions(find_companions(source.root), tmp))  # config.json, tokenizer files
        write_manifest(tmp, manifests.build_manifest(plan, str(Path(source.path).absolute()), layout, files))
    return sorted(dst.iterdir())


def _write_parts(plan, tmp: Path, params, parts, only: set[int], metadata=None) -> dict[str, FileRecord]:
    return execute(plan, tmp, lambda path, entries, rank: PartsWriter(tmp, params, parts, only, index=False,
                                                                      metadata=metadata))


def _write_hyper(plan, tmp: Path, params) -> dict[str, FileRecord]:
    return execute(plan, tmp, lambda path, entries, rank: SafetensorsWriter(tmp / "hyper_param.safetensors", params,
                                                                            {"format": "ms"}))


@remote.views(sources=("src",), destination="dst")
def unify(src: str | Path, dst: str | Path, *, max_file_size: str | int | None = "5GB", process_num: int = 1,
          overwrite: bool = False, **options) -> list[Path]:
    """Library form of `jaxreshard unify` (options as `plan_unify`); returns the files written."""
    job = plan_unify(src, **options)
    return write_unified(job, Path(dst), max_file_bytes=parse_size(max_file_size), process_num=process_num,
                         overwrite=overwrite)
