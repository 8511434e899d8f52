"""The two merge jobs of the seed: fold LoRA into base weights, and unify distributed safetensors.

Both are plans like any conversion (so memory stays one parameter at a time and the output is committed
atomically); this module only decides which parameters go out, under which names, with which folds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from . import manifests
from .api import Job, LayoutArg, native_layouts, read_paths
from .errors import ConfigError, FormatError, OutputError, PlanError
from .formats import open_source
from .formats.base import TensorEntry
from .formats.manifest import FileRecord, file_sha256, write_manifest
from .fsutil import check_destination, check_file_prefix
from .lora import OPTIMIZER_PREFIXES, base_name, find_pairs, fold_for, is_lora, read_scaling, strip_peft
from .plan import make_plan, merge_orders


def plan_merge_lora(
    src: str | Path, *, adapter: str | Path | None = None, src_layout: LayoutArg = None,
    src_strategy: str | Path | None = None, dst_layout: LayoutArg = None, dst_strategy: str | Path | None = None,
    lora_scaling: float | None = None, keep_optimizer_states: bool = False, fan_in_fan_out: bool = False,
    prefix: str = "checkpoint_", output_format: str | None = None,
) -> Job:  # fmt: skip
    """Plan the base model, laid out as asked, with every LoRA branch folded into its base weight."""
    check_file_prefix(prefix)
    source = open_source(src)
    adapter_path = Path(adapter) if adapter is not None else None
    adapter_entries: dict[str, TensorEntry] = {}
    if adapter_path is not None:
        file = adapter_path / "adapter_model.safetensors" if adapter_path.is_dir() else adapter_path
        adapter_entries = strip_peft(open_source(file).entries[0])
    scaling = read_scaling(lora_scaling, adapter_path)
    cfg = scaling.config or {}
    fan_in_fan_out = fan_in_fan_out or bool(cfg.get("fan_in_fan_out"))
    src_names = merge_orders([list(source.entries[r]) for r in sorted(source.entries)])
    weights = [n for n in src_names if not n.startswith(OPTIMIZER_PREFIXES)]  # adam_m.X.lora_a is no LoRA pair
    pairs = find_pairs(weights + [n for n in adapter_entries if n not in src_names])
    if not pairs:
        raise PlanError(f"{source.path}{' and ' + str(adapter_path) if adapter_path else ''}: no LoRA factors "
                        "(*.lora_A.weight, *.lora_a, *.mindpet_delta_lora_a) found")
    kept: dict[int, dict[str, TensorEntry]] = {}
    stored: dict[str, str] = {}  # output name -> name in the source (X.weight <- X.base_layer.weight)
    for rank, entries in source.entries.items():
        out: dict[str, TensorEntry] = {}
        for name, entry in entries.items():
            if is_lora(name) or any(name.startswith(p) and is_lora(name[len(p):]) for p in OPTIMIZER_PREFIXES):
                continue
            if not keep_optimizer_states and name.startswith(OPTIMIZER_PREFIXES):
                continue
            new = base_name(name)
            if new in out:
                raise FormatError(f"{entry.path}: both {new!r} and {name!r} are present; which is the base?")
            out[new] = entry
            stored[new] = name
        kept[rank] = out
    src_l, dst_l = native_layouts(source, src_layout, src_strategy, dst_layout, dst_strategy, renamed=stored)
    if src_l is not None:  # the source layout describes the stored names, the destination the output names
        src_l = _StoredNames(src_l, stored)
    fmt = output_format or source.suffix.lstrip(".")
    plan = make_plan(kept, src_l, dst_l, prefix=prefix, suffix="." + fmt)
    factors_in_src = {r: {n: e for n, e in entries.items() if is_lora(n)} for r, entries in source.entries.items()}
    src_factors = make_plan(factors_in_src, src_l, None) if any(factors_in_src.values()) else None
    adapter_factors = make_plan({0: {n: e for n, e in adapter_entries.items() if is_lora(n)}}, None, None) \
        if adapter_entries else None  # fmt: skip
    params = dict(plan.params)
    for module, pair in pairs.items():
        base = module + ".weight"
        if base not in params:
            raise PlanError(f"LoRA pair {pair.a!r} / {pair.b!r} has no base weight {base!r} (nor "
                            f"{module + '.base_layer.weight'!r}) in {source.path}")
        _check_float_base(base, params[base].src_dtype, pair)
        factors = adapter_factors if pair.a in adapter_entries else src_factors
        fold = fold_for(module, pair, params[base].shape, factors, scaling.for_module(module), fan_in_fan_out)
        params[base] = replace(params[base], transforms=(fold, *params[base].transforms))
    return Job(replace(plan, params=params), source, fmt, False)


def _check_float_base(base: str, dtype: np.dtype, pair) -> None:
    """W + s * B @ A is real-valued: stored into an integer or bool base it would wrap or truncate silently
    (100 + 40 in int8 is -116), and a quantized base needs its scales, which only the quantizer knows."""
    if dtype.kind in "iub" or dtype.name.startswith(("int", "uint")):
        raise PlanError(f"LoRA {pair.a!r} / {pair.b!r}: base weight {base!r} is {dtype.name}, not floating point; "
                        "merging into it would wrap or truncate; dequantize the base to a float type first")


class _StoredNames:
    """A source layout resolved over the names parameters have in the source files."""

    def __init__(self, inner, stored: dict[str, str]):
        self.inner, self.stored, self.num_ranks = inner, stored, inner.num_ranks

    def resolve(self, names):
        names = list(names)
        resolved = self.inner.resolve([self.stored.get(n, n) for n in names])
        return {n: resolved[self.stored.get(n, n)] for n in names}


def pick_by_suffix(source_dir: Path, file_suffix: str | None) -> dict[int, Path] | None:
    """Per rank folder, the one `*{suffix}.safetensors` (an ambiguous choice is an error listing candidates)."""
    if file_suffix is None:
        return None
    from .formats import rank_dirs

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
    from .formats import source_from_files

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
    return Job(plan, replace(source, entries=kept), "safetensors", False)


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
    from .formats.writers import hf_layout, ms_layout, write_index
    from .fsutil import atomic_output

    plan = job.plan
    (rank,) = plan.ranks
    everything = [(s.param, plan.params[s.param].dst_dtype, s.dst_box.shape) for s in rank.shards]
    params = [p for p in everything if p[0] not in hyper]
    parts = hf_layout(params, max_file_bytes) if layout == "hf" else ms_layout(params)
    groups, names, index_name = parts
    if process_num < 1:
        raise ConfigError(f"--process-num {process_num} must be at least 1")
    workers = min(process_num, len(groups))
    blocks = [list(range(len(groups)))[i::workers] for i in range(workers)]
    check_destination(dst, read_paths(job.source), overwrite=overwrite)
    metadata = manifests.hf_metadata(manifests.carried_metadata(manifests.source_metadata(job.source))) if layout == "hf" else None
    with atomic_output(dst, overwrite=overwrite) as tmp:
        jobs = [(restrict(plan, {params[j][0] for i in b for j in groups[i]}), tmp, params, parts, set(b), metadata)
                for b in blocks]
        files: dict = {}
        if workers == 1:
            files.update(_write_parts(*jobs[0]))
        else:
            from concurrent.futures.process import BrokenProcessPool

            from .run import worker_pool

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
        write_manifest(tmp, manifests.build_manifest(plan, str(Path(job.source.path).absolute()), layout, files))
    return sorted(dst.iterdir())


def _write_parts(plan, tmp: Path, params, parts, only: set[int], metadata=None) -> dict[str, FileRecord]:
    from .execute import execute
    from .formats.writers import PartsWriter

    return execute(plan, tmp, lambda path, entries, rank: PartsWriter(tmp, params, parts, only, index=False,
                                                                      metadata=metadata))


def _write_hyper(plan, tmp: Path, params) -> dict[str, FileRecord]:
    from .execute import execute
    from .formats.safetensors_io import SafetensorsWriter

    return execute(plan, tmp, lambda path, entries, rank: SafetensorsWriter(tmp / "hyper_param.safetensors", params,
                                                                            {"format": "ms"}))


def adapter_reads(adapter: str | Path | None) -> list[Path]:
    """The paths a merge reads from a separate adapter (its folder or file, weights, config): like the source's,
    they may not lie inside the destination, which `--overwrite` deletes."""
    if adapter is None:
        return []
    path = Path(adapter)
    folder = path if path.is_dir() else path.parent
    return [p for p in (path, folder / "adapter_model.safetensors", folder / "adapter_config.json") if p.exists()]


def merge_lora(src: str | Path, dst: str | Path, *, overwrite: bool = False, hf: bool = False,
               max_file_size: str | int | None = None, **options):
    """Library form of `jaxreshard merge-lora` (options as `plan_merge_lora`); returns the write report."""
    from .api import parse_size, write_job

    job = plan_merge_lora(src, **options)
    check_destination(Path(dst), adapter_reads(options.get("adapter")), overwrite=True)
    return write_job(job, Path(dst), overwrite=overwrite, hf=hf, max_file_bytes=parse_size(max_file_size))


def unify(src: str | Path, dst: str | Path, *, max_file_size: str | int | None = "5GB", process_num: int = 1,
          overwrite: bool = False, **options) -> list[Path]:
    """Library form of `jaxreshard unify` (options as `plan_unify`); returns the files written."""
    from .api import parse_size

    job = plan_unify(src, **options)
    return write_unified(job, Path(dst), max_file_bytes=parse_size(max_file_size), process_num=process_num,
                         overwrite=overwrite)
