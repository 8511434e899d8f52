"""`jaxreshard unify` and the `tools/unified_safetensors.py` drop-in (issue 5, "Unify distributed safetensors").

The sources are the core's own split outputs (`jaxreshard convert` of a complete file) and the MindSpore
safetensors fixtures; every check compares against the complete checkpoint the split started from, byte for byte,
and reads the output files with an independent header parser plus `safetensors.safe_open`.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import ml_dtypes  # noqa: F401  (registers bfloat16 for safetensors.numpy)
import numpy as np
import pytest
import yaml
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from jaxreshard.cli import main
from jaxreshard.formats.manifest import MANIFEST_NAME

from .helpers import tree as tree_bytes  # every file but the manifest, by relative path

ROOT = Path(__file__).resolve().parents[1]
MS = ROOT / "tests" / "fixtures" / "mindspore"
ST_COMPLETE = MS / "st" / "complete" / "rank_0" / "checkpoint_0.safetensors"
ST_DP2MP2 = MS / "st" / "st_complete__to__dp2mp2"
DP2MP2_STRATEGY = MS / "strategy" / "dp2mp2.ckpt"
HF_INDEX = "model.safetensors.index.json"

# name -> (dtype, shape); every split dim is a multiple of 8
SPEC = {
    "embed.weight": (np.float32, (16, 8)),
    "layers.0.wq": (ml_dtypes.bfloat16, (8, 16)),
    "layers.1.wq": (np.float16, (8, 16)),
    "layers.0.wo": (np.float32, (16, 8)),
    "layers.1.wo": (ml_dtypes.bfloat16, (16, 8)),
    "layers.0.norm": (np.float32, (8,)),
    "layers.1.norm": (np.float16, (8,)),
    "head.weight": (np.float32, (16, 8)),
    "adam_m.layers.0.wq": (np.float32, (8, 16)),
    "adam_v.layers.0.wq": (np.float32, (8, 16)),
    "moment.head.weight": (np.float32, (16, 8)),
    "step": (np.int64, ()),
    "lr": (np.float32, ()),
}


def make_tensors(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for name, (dtype, shape) in SPEC.items():
        n = int(np.prod(shape))
        if np.dtype(dtype).kind == "i":
            out[name] = rng.integers(-(10**6), 10**6, size=shape).astype(dtype)
        else:
            out[name] = rng.standard_normal(n).astype(np.float32).astype(dtype).reshape(shape)
    return out


def _rules(row, col, vec, staged=False):
    st = {"stage": "by_layer"} if staged else {}
    return [
        {"match": r"embed\.weight", "spec": [row, None], **({"stage": 0} if staged else {})},
        {"match": r"(?:adam_[mv]\.)?layers\.(\d+)\.wq", "spec": [None, col], **st},
        {"match": r"layers\.(\d+)\.wo", "spec": [row, None], **st},
        {"match": r"layers\.(\d+)\.norm", "spec": [vec], **st},
        {"match": r"(?:moment\.)?head\.weight", "spec": [row, None], **({"stage": -1} if staged else {})},
        {"match": r".*", "spec": []},
    ]


LAYOUTS = {
    "dp2mp2": {"mesh": {"dp": 2, "mp": 2}, "params": _rules("mp", "mp", "mp")},
    "mp4_columns": {"mesh": {"mp": 4}, "params": _rules(None, "mp", None)},
    "dp2mp4": {"mesh": {"dp": 2, "mp": 4}, "params": _rules("mp", "mp", "mp")},
    "axes_list8": {"mesh": {"a": 2, "b": 4}, "params": _rules(["a", "b"], ["b", "a"], "b")},
    "dp2mp2pp2": {"mesh": {"dp": 2, "mp": 2}, "pipeline_stages": 2, "params": _rules("mp", "mp", "dp", True)},
}


def cli(*args) -> int:
    return main([str(a) for a in args])


def write_layout(tmp: Path, name: str) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(LAYOUTS[name], sort_keys=False))
    return path


def make_split(tmp: Path, layout: str, seed: int = 0, tag: str = "") -> tuple[Path, Path, dict[str, np.ndarray]]:
    """A complete file and its split (by the core) to `layout`: (split dir, layout yaml, complete tensors)."""
    tensors = make_tensors(seed)
    full = tmp / f"full{tag}_{seed}.safetensors"
    save_file(tensors, str(full))
    lay = write_layout(tmp, layout)
    dist = tmp / f"dist_{layout}{tag}_{seed}"
    assert cli("convert", "--src", full, "--dst", dist, "--dst-layout", lay) == 0
    ranks = sorted(p.name for p in dist.iterdir() if p.name != MANIFEST_NAME)
    assert ranks == sorted(f"rank_{r}" for r in range(len(list(dist.iterdir())) - 1))
    return dist, lay, tensors


def header(path: Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file (parsed by hand) and the offset its data starts at."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), 8 + n


def check_parts(out: Path, index_name: str, part_names: list[str] | None = None) -> dict[str, np.ndarray]:
    """Every part complete and readable, the index agrees with the headers; returns all tensors of the parts."""
    index = json.loads((out / index_name).read_text())
    assert set(index) >= {"metadata", "weight_map"}
    weight_map = index["weight_map"]
    files = sorted(set(weight_map.values()))
    if part_names is not None:
        assert files == sorted(part_names)
    tensors: dict[str, np.ndarray] = {}
    total = 0
    for fname in files:
        path = out / fname
        assert path.is_file(), f"index names {fname} but it is missing"
        head, start = header(path)
        names = {k for k in head if k != "__metadata__"}
        assert names == {k for k, v in weight_map.items() if v == fname}, fname
        end = max((v["data_offsets"][1] for k, v in head.items() if k != "__metadata__"), default=0)
        assert path.stat().st_size == start + end, f"{fname} is truncated or padded"
        for k in names:
            b, e = head[k]["data_offsets"]
            total += e - b
        with safe_open(str(path), "np") as f:
            assert set(f.keys()) == names
            for k in f.keys():
                assert k not in tensors
                tensors[k] = f.get_tensor(k)
    assert index["metadata"]["total_size"] == total
    return tensors


def check_hf(out: Path) -> dict[str, np.ndarray]:
    parts = sorted(p.name for p in out.glob("*.safetensors"))
    n = len(parts)
    assert parts == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert sorted(p.name for p in out.iterdir() if p.name != MANIFEST_NAME) == sorted(parts + [HF_INDEX])
    for part in parts:  # transformers refuses safetensors whose metadata names another framework
        assert header(out / part)[0].get("__metadata__", {}).get("format", "pt") == "pt", part
    return check_parts(out, HF_INDEX, parts)


def assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(want)
    for k, w in want.items():
        g = got[k]
        assert g.dtype == w.dtype, k
        assert g.shape == w.shape, k
        assert g.tobytes() == w.tobytes(), k




# ----------------------------------------------------------------------------------------------------------------
# the core's split outputs back to complete


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_unify_core_split_is_byte_identical(tmp_path, layout):
    dist, lay, tensors = make_split(tmp_path, layout)
    out = tmp_path / "out"
    assert cli("unify", "--src", dist, "--src-layout", lay, "--dst", out, "--max-file-size", "700B") == 0
    got = check_hf(out)
    assert len(list(out.glob("*.safetensors"))) >= 3
    assert_same(got, tensors)


def test_unify_default_size_is_one_file(tmp_path):
    dist, lay, tensors = make_split(tmp_path, "dp2mp2")
    out = tmp_path / "out"
    assert cli("unify", "--src", dist, "--src-layout", lay, "--dst", out) == 0
    assert sorted(p.name for p in out.iterdir() if p.name != MANIFEST_NAME) == ["model-00001-of-00001.safetensors",
                                                                                HF_INDEX]
    assert_same(check_hf(out), tensors)


def test_unify_part_sizes_respect_max_file_size(tmp_path):
    dist, lay, tensors = make_split(tmp_path, "dp2mp4")
    out = tmp_path / "out"
    limit = 1000
    assert cli("unify", "--src", dist, "--src-layout", lay, "--dst", out, "--max-file-size", str(limit)) == 0
    assert_same(check_hf(out), tensors)
    for part in out.glob("*.safetensors"):
        head, _ = header(part)
        sizes = [v["data_offsets"][1] - v["data_offsets"][0] for k, v in head.items() if k != "__metadata__"]
        assert sum(sizes) <= limit or len(sizes) == 1, part.name


# ----------------------------------------------------------------------------------------------------------------
# MindSpore safetensors fixtures


def test_unify_mindspore_fixture_dp2mp2(tmp_path):
    out = tmp_path / "out"
    assert cli("unify", "--src", ST_DP2MP2, "--src-strategy", DP2MP2_STRATEGY, "--dst", out,
               "--max-file-size", "2KB") == 0  # fmt: skip
    got = check_hf(out)
    assert len(list(out.glob("*.safetensors"))) >= 2
    assert_same(got, load_file(str(ST_COMPLETE)))


# ----------------------------------------------------------------------------------------------------------------
# filters


def _all_names(out: Path) -> set[str]:
    names = set()
    for p in out.rglob("*.safetensors"):
        names |= {k for k in header(p)[0] if k != "__metadata__"}
    return names


@pytest.mark.parametrize("prefixes", [["adam_"], ["adam_", "moment."]])
def test_unify_filter_out_prefixes(tmp_path, prefixes):
    dist, lay, tensors = make_split(tmp_path, "dp2mp2")
    out = tmp_path / "out"
    assert cli("unify", "--src", dist, "--src-layout", lay, "--dst", out, "--max-file-size", "700B",
               "--filter-out-param-prefix", *prefixes) == 0  # fmt: skip
    want = {k: v for k, v in tensors.items() if not k.startswith(tuple(prefixes))}
    assert len(want) < len(tensors)
    got = check_hf(out)
    assert_same(got, want)
    index = json.loads((out / HF_INDEX).read_text())
    for name in set(tensors) - set(want):
        assert name not in index["weight_map"]
        assert name not in _all_names(out)


def test_unify_mindspore_fixture_filtered(tmp_path):
    out = tmp_path / "out"
    assert cli("unify", "--src", ST_DP2MP2, "--src-strategy", DP2MP2_STRATEGY, "--dst", out,
               "--filter-out-param-prefix", "adam_") == 0  # fmt: skip
    want = {k: v for k, v in load_file(str(ST_COMPLETE)).items() if not k.startswith("adam_")}
    assert_same(check_hf(out), want)
    assert not any(n.startswith("adam_") for n in _all_names(out))


# ----------------------------------------------------------------------------------------------------------------
# file suffix selection


def _two_epochs(tmp: Path) -> tuple[Path, Path, dict, dict]:
    """rank folders holding `net_rank_<r>-1_1.safetensors` (seed 0) and `net_rank_<r>-2_2.safetensors` (seed 1)."""
    a, lay, ta = make_split(tmp, "dp2mp2", seed=0)
    b, _, tb = make_split(tmp, "dp2mp2", seed=1)
    src = tmp / "epochs"
    for r in range(4):
        (src / f"rank_{r}").mkdir(parents=True)
        for split, epoch in ((a, "1_1"), (b, "2_2")):
            shutil.copy(split / f"rank_{r}" / f"checkpoint_{r}.safetensors",
                        src / f"rank_{r}" / f"net_rank_{r}-{epoch}.safetensors")  # fmt: skip
    assert ta["embed.weight"].tobytes() != tb["embed.weight"].tobytes()
    return src, lay, ta, tb


def test_unify_file_suffix_picks_the_named_files(tmp_path):
    src, lay, ta, tb = _two_epochs(tmp_path)
    for suffix, want in (("1_1", ta), ("2_2", tb)):
        out = tmp_path / f"out_{suffix}"
        assert cli("unify", "--src", src, "--src-layout", lay, "--dst", out, "--file-suffix", suffix) == 0
        assert_same(check_hf(out), want)


def test_unify_ambiguous_suffix_lists_candidates(tmp_path, capsys):
    src, lay, ta, _ = _two_epochs(tmp_path)
    # "1_1" now also matches net_rank_2-21_1 (MindFormers silently takes the shortest name)
    shutil.copy(src / "rank_2" / "net_rank_2-1_1.safetensors", src / "rank_2" / "net_rank_2-21_1.safetensors")
    out = tmp_path / "out"
    capsys.readouterr()
    assert cli("unify", "--src", src, "--src-layout", lay, "--dst", out, "--file-suffix", "1_1") == 2
    err = capsys.readouterr().err
    assert "net_rank_2-1_1.safetensors" in err and "net_rank_2-21_1.safetensors" in err
    assert not out.exists()


def test_unify_suffix_matching_nothing(tmp_path, capsys):
    src, lay, _, _ = _two_epochs(tmp_path)
    out = tmp_path / "out"
    assert cli("unify", "--src", src, "--src-layout", lay, "--dst", out, "--file-suffix", "9_9") == 2
    assert "9_9" in capsys.readouterr().err
    assert not out.exists()


def test_unify_suffix_missing_in_one_rank(tmp_path):
    src, lay, _, _ = _two_epochs(tmp_path)
    (src / "rank_3" / "net_rank_3-2_2.safetensors").unlink()
    out = tmp_path / "out"
    assert cli("unify", "--src", src, "--src-layout", lay, "--dst", out, "--file-suffix", "2_2") == 2
    assert not out.exists()


# ----------------------------------------------------------------------------------------------------------------
# redundancy-removed sources


def _dedup(tmp: Path, drop_slice: bool = False) -> tuple[Path, Path, dict]:
    """A dp2 x mp2 split saved MindSpore-`remove_redundancy` style: each slice kept in one replica's file only.

    Mesh (dp, mp) row-major: rank = 2*dp + mp, so the replicas of a slice are ranks {m, 2+m} (mp-split tensors)
    or all four ranks (replicated tensors). Sorted names alternate between the first and the second replica;
    replicated tensors alternate between ranks 3 and 1 (never rank 0 alone)."""
    dist, lay, tensors = make_split(tmp, "dp2mp2", tag="_dedup")
    files = {r: dist / f"rank_{r}" / f"checkpoint_{r}.safetensors" for r in range(4)}
    data = {r: load_file(str(f)) for r, f in files.items()}
    replicated = {k for k in tensors if data[0][k].shape == tensors[k].shape}
    keep: dict[int, dict[str, np.ndarray]] = {r: {} for r in range(4)}
    for i, name in enumerate(sorted(tensors)):
        if name in replicated:
            owner = (3, 1)[i % 2]
            keep[owner][name] = data[owner][name]
            continue
        for m in (0, 1):
            owner = m if i % 2 == 0 else 2 + m
            if drop_slice and name == "head.weight" and m == 1:
                continue  # this slice is on no rank at all
            keep[owner][name] = data[owner][name]
    for r, f in files.items():
        save_file(keep[r], str(f), metadata={"format": "ms", "remove_redundancy": "True"})
    (dist / MANIFEST_NAME).unlink(missing_ok=True)  # rewritten as MindSpore would: no longer our output
    assert all(keep.values())
    return dist, lay, tensors


def test_unify_remove_redundancy_source(tmp_path):
    dist, lay, tensors = _dedup(tmp_path)
    out = tmp_path / "out"
    assert cli("unify", "--src", dist, "--src-layout", lay, "--dst", out, "--max-file-size", "700B") == 0
    assert_same(check_hf(out), tensors)
    out2 = tmp_path / "out2"  # the consistent flag is accepted
    assert cli("unify", "--src", dist, "--src-layout", lay, "--dst", out2, "--has-redundancy", "false") == 0
    assert_same(check_hf(out2), tensors)


def test_unify_remove_redundancy_contradicting_flag(tmp_path, capsys):
    dist, lay, _ = _dedup(tmp_path)
    out = tmp_path / "out"
    assert cli("unify", "--src", dist, "--src-layout", lay, "--dst", out, "--has-redundancy", "true") == 2
    assert "redundancy" in capsys.readouterr().err
    assert not out.exists()


def test_unify_remove_redundancy_missing_slice_is_an_error(tmp_path):
    dist, lay, _ = _dedup(tmp_path, drop_slice=True)
    out = tmp_path / "out"
    assert cli("unify", "--src", dist, "--src-layout", lay, "--dst", out) == 2
    assert not out.exists()


def test_unify_dedup_without_metadata_needs_the_flag(tmp_path):
    """Deduplicated files without `remove_redundancy` metadata: the missing replicas are an error unless
    `--has-redundancy false` says the files were saved deduplicated."""
    dist, lay, tensors = _dedup(tmp_path)
    for r in range(4):
        f = dist / f"rank_{r}" / f"checkpoint_{r}.safetensors"
        save_file(load_file(str(f)), str(f), metadata={"format": "ms"})
    (dist / MANIFEST_NAME).unlink(missing_ok=True)  # rewritten as MindSpore would: no longer our output
    assert cli("unify", "--src", dist, "--src-layout", lay, "--dst", tmp_path / "strict") == 2
    assert not (tmp_path / "strict").exists()
    out = tmp_path / "out"
    assert cli("unify", "--src", dist, "--src-layout", lay, "--dst", out, "--has-redundancy", "false") == 0
    assert_same(check_hf(out), tensors)


def test_unify_has_redundancy_false_on_full_copies(tmp_path, capsys):
    dist, lay, tensors = make_split(tmp_path, "dp2mp2")
    for r in range(4):
        f = dist / f"rank_{r}" / f"checkpoint_{r}.safetensors"
        save_file(load_file(str(f)), str(f), metadata={"format": "ms", "remove_redundancy": "False"})
    (dist / MANIFEST_NAME).unlink(missing_ok=True)  # rewritten as MindSpore would: no longer our output
    out = tmp_path / "out"
    assert cli("unify", "--src", dist, "--src-layout", lay, "--dst", out, "--has-redundancy", "false") == 2
    assert "redundancy" in capsys.readouterr().err
    assert not out.exists()
    ok = tmp_path / "ok"
    assert cli("unify", "--src", dist, "--src-layout", lay, "--dst", ok, "--has-redundancy", "true") == 0
    assert_same(check_hf(ok), tensors)


# ----------------------------------------------------------------------------------------------------------------
# several processes, failures


def test_unify_process_num_is_byte_identical(tmp_path):
    dist, lay, tensors = make_split(tmp_path, "dp2mp4")
    outs = {}
    for n in (1, 2, 3):
        out = tmp_path / f"out{n}"
        assert cli("unify", "--src", dist, "--src-layout", lay, "--dst", out, "--max-file-size", "600B",
                   "--process-num", n) == 0  # fmt: skip
        outs[n] = tree_bytes(out)
    assert len([k for k in outs[1] if k.endswith(".safetensors")]) >= 4
    assert outs[2] == outs[1]
    assert outs[3] == outs[1]
    assert_same(check_hf(tmp_path / "out3"), tensors)


def _truncate(files) -> None:
    """Keep each file's header, cut its data in half."""
    for f in files:
        _, start = header(f)
        raw = f.read_bytes()
        f.write_bytes(raw[: start + (len(raw) - start) // 2])


def _no_output(tmp: Path, name: str = "out") -> None:
    assert not (tmp / name).exists()
    assert not list(tmp.rglob(HF_INDEX))
    assert [p.name for p in tmp.iterdir() if p.name.startswith(f".{name}")] == []  # no partial dirs left


def test_unify_truncated_rank_file_fails_the_command(tmp_path):
    # mp slice 1 of dp2mp4 lives on ranks 1 and 5 only: truncating both leaves no good copy
    dist, lay, _ = make_split(tmp_path, "dp2mp4")
    _truncate([dist / f"rank_{r}" / f"checkpoint_{r}.safetensors" for r in (1, 5)])
    rc = cli("unify", "--src", dist, "--src-layout", lay, "--dst", tmp_path / "out", "--max-file-size", "600B",
             "--process-num", 3)  # fmt: skip
    assert rc == 2  # caught while planning (sizes against headers) or by a worker: either way the command fails
    _no_output(tmp_path)


@pytest.mark.parametrize("process_num", [1, 3])
def test_unify_failed_worker_fails_the_command(tmp_path, process_num):
    """Planned on good files, then the data goes bad: only the worker that reads it can notice."""
    from jaxreshard.errors import JaxreshardError
    from jaxreshard.merge import plan_unify, write_unified

    dist, lay, _ = make_split(tmp_path, "dp2mp4")
    job = plan_unify(dist, src_layout=str(lay))
    _truncate([dist / f"rank_{r}" / f"checkpoint_{r}.safetensors" for r in (1, 5)])
    with pytest.raises(JaxreshardError, match="truncated"):
        write_unified(job, tmp_path / "out", max_file_bytes=600, process_num=process_num)
    _no_output(tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# bad input


def test_unify_missing_rank_folder(tmp_path, capsys):
    dist, lay, _ = make_split(tmp_path, "dp2mp2")
    shutil.rmtree(dist / "rank_2")
    out = tmp_path / "out"
    assert cli("unify", "--src", dist, "--src-layout", lay, "--dst", out) == 2
    assert "2" in capsys.readouterr().err
    assert not out.exists()


def test_unify_distributed_without_layout(tmp_path, capsys):
    dist, _, _ = make_split(tmp_path, "dp2mp2")
    (dist / MANIFEST_NAME).unlink()  # as another tool writes it: nothing records the layout
    out = tmp_path / "out"
    assert cli("unify", "--src", dist, "--dst", out) == 2
    assert "--src-layout" in capsys.readouterr().err
    assert not out.exists()


def test_unify_existing_destination_needs_overwrite(tmp_path):
    dist, lay, tensors = make_split(tmp_path, "dp2mp2")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    before = tree_bytes(out)
    assert cli("unify", "--src", dist, "--src-layout", lay, "--dst", out) == 2
    assert tree_bytes(out) == before
    assert cli("unify", "--src", dist, "--src-layout", lay, "--dst", out, "--overwrite") == 0
    assert_same(check_hf(out), tensors)


def test_unify_bad_process_num(tmp_path):
    dist, lay, _ = make_split(tmp_path, "dp2mp2")
    assert cli("unify", "--src", dist, "--src-layout", lay, "--dst", tmp_path / "out", "--process-num", 0) == 2
    _no_output(tmp_path)


def test_unify_filter_leaving_nothing_is_an_error(tmp_path):
    """Filters that drop every parameter would write an empty 'complete' checkpoint: refuse instead."""
    out = tmp_path / "out"
    prefixes = ["adam_", "embedding.", "global_", "layer", "learning_", "norm."]
    assert cli("unify", "--src", ST_DP2MP2, "--src-strategy", DP2MP2_STRATEGY, "--dst", out,
               "--filter-out-param-prefix", *prefixes) == 2  # fmt: skip
    _no_output(tmp_path)


def test_unify_bad_has_redundancy_value(tmp_path):
    dist, lay, _ = make_split(tmp_path, "dp2mp2")
    out = tmp_path / "out"
    assert cli("unify", "--src", dist, "--src-layout", lay, "--dst", out, "--has-redundancy", "maybe") == 2
    assert not out.exists()


# ----------------------------------------------------------------------------------------------------------------
# the MindFormers drop-in


def _dropin(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "tools/unified_safetensors.py", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def _fixture_with_suffix(tmp: Path, suffix: str = "1_1") -> Path:
    src = tmp / "ms_src"
    for r in range(4):
        (src / f"rank_{r}").mkdir(parents=True)
        shutil.copy(ST_DP2MP2 / f"rank_{r}" / f"checkpoint_{r}.safetensors",
                    src / f"rank_{r}" / f"net_rank_{r}-{suffix}.safetensors")  # fmt: skip
    return src


def _check_ms_layout(unified: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(part tensors, hyper tensors) of a MindSpore unified folder, checking the name map against the headers."""
    assert (unified / "param_name_map.json").is_file()
    parts = sorted(p.name for p in unified.glob("part*.safetensors"))
    assert parts == [f"part{i}.safetensors" for i in range(len(parts))] and parts
    side_files = {"param_name_map.json", "hyper_param.safetensors"}
    assert set(p.name for p in unified.iterdir() if p.name != MANIFEST_NAME) <= set(parts) | side_files
    tensors = check_parts(unified, "param_name_map.json", parts)
    hyper = load_file(str(unified / "hyper_param.safetensors")) if (unified / "hyper_param.safetensors").exists() \
        else {}  # fmt: skip
    assert not set(tensors) & set(hyper)
    return tensors, hyper


def test_dropin_mindspore_fixture(tmp_path):
    src = _fixture_with_suffix(tmp_path)
    out = tmp_path / "out"
    r = _dropin("--src_strategy_dirs", DP2MP2_STRATEGY, "--mindspore_ckpt_dir", src, "--output_dir", out)
    assert r.returncode == 0, r.stderr
    unified = out / "1_1_ckpt_convert" / "unified_safe"
    tensors, hyper = _check_ms_layout(unified)
    complete = load_file(str(ST_COMPLETE))
    assert sorted(hyper) == ["global_step", "learning_rate"]
    assert_same({**tensors, **hyper}, complete)


def test_dropin_filter_never_leaks_into_hyper(tmp_path):
    src = _fixture_with_suffix(tmp_path)
    out = tmp_path / "out"
    r = _dropin("--src_strategy_dirs", DP2MP2_STRATEGY, "--mindspore_ckpt_dir", src, "--output_dir", out,
                "--filter_out_param_prefix", "adam_", "--max_process_num", "2")  # fmt: skip
    assert r.returncode == 0, r.stderr
    unified = out / "1_1_ckpt_convert" / "unified_safe"
    tensors, hyper = _check_ms_layout(unified)
    assert not any(k.startswith("adam_") for k in _all_names(unified))
    assert sorted(hyper) == ["global_step", "learning_rate"]
    want = {k: v for k, v in load_file(str(ST_COMPLETE)).items() if not k.startswith("adam_")}
    assert_same({**tensors, **hyper}, want)


def test_dropin_ambiguous_suffix_exits_2(tmp_path):
    src = _fixture_with_suffix(tmp_path)
    shutil.copy(src / "rank_1" / "net_rank_1-1_1.safetensors", src / "rank_1" / "net_rank_1-21_1.safetensors")
    out = tmp_path / "out"
    r = _dropin("--src_strategy_dirs", DP2MP2_STRATEGY, "--mindspore_ckpt_dir", src, "--output_dir", out)
    assert r.returncode == 2
    assert "net_rank_1-21_1.safetensors" in r.stderr
    assert not (out / "1_1_ckpt_convert" / "unified_safe").exists()


def test_dropin_filter_of_a_hyper_parameter(tmp_path):
    """A filtered parameter outside the strategy (global_step) must not reach hyper_param.safetensors either."""
    src = _fixture_with_suffix(tmp_path)
    out = tmp_path / "out"
    r = _dropin("--src_strategy_dirs", DP2MP2_STRATEGY, "--mindspore_ckpt_dir", src, "--output_dir", out,
                "--filter_out_param_prefix", "global_", "adam_v")  # fmt: skip
    assert r.returncode == 0, r.stderr
    unified = out / "1_1_ckpt_convert" / "unified_safe"
    tensors, hyper = _check_ms_layout(unified)
    assert sorted(hyper) == ["learning_rate"]
    names = _all_names(unified) | set(json.loads((unified / "param_name_map.json").read_text())["weight_map"])
    assert not any(k.startswith(("global_", "adam_v")) for k in names)
    want = {k: v for k, v in load_file(str(ST_COMPLETE)).items() if not k.startswith(("global_", "adam_v"))}
    assert_same({**tensors, **hyper}, want)


def test_dropin_suffix_none_takes_the_last_file(tmp_path):
    """--file_suffix None: per rank folder the last checkpoint (2_2 over 1_1); output under None_ckpt_convert."""
    src = _fixture_with_suffix(tmp_path, "2_2")
    complete = load_file(str(ST_COMPLETE))
    for r in range(4):  # an older epoch with other values
        f = src / f"rank_{r}" / f"net_rank_{r}-1_1.safetensors"
        old = load_file(str(src / f"rank_{r}" / f"net_rank_{r}-2_2.safetensors"))
        changed = {k: np.ascontiguousarray(np.asarray(v + 1, dtype=v.dtype)) for k, v in old.items()}
        save_file(changed, str(f), metadata={"format": "ms"})
    out = tmp_path / "out"
    r = _dropin("--src_strategy_dirs", DP2MP2_STRATEGY, "--mindspore_ckpt_dir", src, "--output_dir", out,
                "--file_suffix", "None")  # fmt: skip
    assert r.returncode == 0, r.stderr
    tensors, hyper = _check_ms_layout(out / "None_ckpt_convert" / "unified_safe")
    assert_same({**tensors, **hyper}, complete)


def test_dropin_pipeline_strategy_folder(tmp_path):
    """A pipeline source (split by the core to MindSpore's dp1mp2pp2 strategy) and a strategy *folder* of
    per-stage files, merged in memory: values equal the complete checkpoint, the folder is left untouched."""
    pp_dir = MS / "strategy" / "pp_stages"
    before = tree_bytes(pp_dir)
    dist = tmp_path / "pp"
    assert cli("convert", "--src", ST_COMPLETE, "--dst", dist, "--dst-strategy", MS / "strategy" / "dp1mp2pp2.ckpt",
               "--output-format", "safetensors") == 0  # fmt: skip
    src = tmp_path / "ms_src"
    for rank_dir in sorted(dist.glob("rank_*")):
        r = int(rank_dir.name.split("_")[1])
        (src / rank_dir.name).mkdir(parents=True)
        (f,) = rank_dir.glob("*.safetensors")
        shutil.copy(f, src / rank_dir.name / f"net_rank_{r}-1_1.safetensors")
    out = tmp_path / "out"
    r = _dropin("--src_strategy_dirs", pp_dir, "--mindspore_ckpt_dir", src, "--output_dir", out)
    assert r.returncode == 0, r.stderr
    tensors, hyper = _check_ms_layout(out / "1_1_ckpt_convert" / "unified_safe")
    assert_same({**tensors, **hyper}, load_file(str(ST_COMPLETE)))
    assert sorted(hyper) == ["global_step", "learning_rate"]
    assert tree_bytes(pp_dir) == before


def test_dropin_existing_output_is_left_alone(tmp_path):
    """MindFormers rmtree's <suffix>_ckpt_convert first; the drop-in refuses unless --overwrite."""
    src = _fixture_with_suffix(tmp_path)
    out = tmp_path / "out"
    args = ("--src_strategy_dirs", DP2MP2_STRATEGY, "--mindspore_ckpt_dir", src, "--output_dir", out)
    assert _dropin(*args).returncode == 0
    unified = out / "1_1_ckpt_convert" / "unified_safe"
    (unified / "note.txt").write_text("mine")
    before = tree_bytes(out)
    r = _dropin(*args)
    assert r.returncode == 2, r.stderr
    assert tree_bytes(out) == before
    r = _dropin(*args, "--overwrite")
    assert r.returncode == 0, r.stderr
    assert not (unified / "note.txt").exists()
    tensors, hyper = _check_ms_layout(unified)
    assert_same({**tensors, **hyper}, load_file(str(ST_COMPLETE)))
