"""Self-describing outputs: the manifest every output gets, the `jaxreshard` metadata of distributed rank files,
the source metadata carried into every output file, and reading an output by its manifest."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import jaxreshard as jr
from jaxreshard.cli import main
from jaxreshard.formats.manifest import MANIFEST_NAME, read_manifest
from jaxreshard.merge import unify

LAYOUTS = Path(__file__).resolve().parents[1] / "configs" / "layouts"
MS = Path(__file__).resolve().parent / "fixtures" / "mindspore"


def header(path: Path) -> dict:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n])


def files_on_disk(root: Path) -> dict[str, tuple[int, str]]:
    """Every file but the manifest: (size, sha256), computed here with hashlib."""
    return {p.relative_to(root).as_posix(): (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != MANIFEST_NAME}


def recorded(root: Path) -> dict[str, tuple[int, str]]:
    manifest = read_manifest(root)
    assert manifest is not None
    return {f: (r.size, r.sha256) for f, r in manifest.files.items()}


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    """A complete file as transformers saves it: {"format": "pt"} metadata, tensors of several dtypes."""
    rng = np.random.default_rng(3)
    tensors = {
        "embed.weight": rng.standard_normal((16, 8)).astype(np.float32),
        "layers.0.w": rng.standard_normal((8, 12)).astype(np.float16),
        "layers.1.w": rng.standard_normal((8, 12)).astype(np.float16),
        "step": np.array([7], dtype=np.int64),
    }
    path = tmp_path_factory.mktemp("small") / "model.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path, tensors


@pytest.fixture(scope="module")
def mp4(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("layouts") / "mp4.yaml"
    path.write_text("mesh: {dp: 2, mp: 4}\nparams:\n  - match: 'embed.*|layers.*'\n    spec: [mp]\n")
    return path


def test_split_manifest_records_layout_source_and_every_file(tmp_path, small, mp4):
    src, _ = small
    out = tmp_path / "out"
    jr.convert(src, out, dst_layout=mp4)
    manifest = read_manifest(out)
    assert manifest.num_ranks == 8 and manifest.output_format == "safetensors"
    assert manifest.source == str(src.absolute())
    assert manifest.tool.startswith("jaxreshard")
    head = {k: v for k, v in header(src).items() if k != "__metadata__"}
    assert list(manifest.params) == sorted(head, key=lambda k: head[k]["data_offsets"])  # the file's order
    embed = manifest.params["embed.weight"]
    assert (embed.shape, embed.dtype, embed.mesh_axes, embed.spec, embed.stages) == \
        ((16, 8), "F32", (("dp", 2), ("mp", 4)), (("mp",),), (0,))  # fmt: skip
    assert manifest.params["step"].spec == () and manifest.params["step"].dtype == "I64"
    assert recorded(out) == files_on_disk(out)
    assert sorted(recorded(out)) == [f"rank_{r}/checkpoint_{r}.safetensors" for r in range(8)]


def test_rank_files_record_their_block_and_carry_the_source_metadata(tmp_path, small, mp4):
    src, _ = small
    out = tmp_path / "out"
    jr.convert(src, out, dst_layout=mp4)
    for rank in range(8):
        meta = header(out / f"rank_{rank}" / f"checkpoint_{rank}.safetensors")["__metadata__"]
        assert meta["format"] == "pt"
        info = json.loads(meta["jaxreshard"])
        assert (info["rank"], info["num_ranks"]) == (rank, 8)
        mp = rank % 4  # mesh (dp, mp) row-major
        assert info["params"]["embed.weight"] == {"shape": [16, 8], "start": [4 * mp, 0]}
        assert info["params"]["layers.0.w"] == {"shape": [8, 12], "start": [2 * mp, 0]}
        assert info["params"]["step"] == {"shape": [1], "start": [0]}


@pytest.mark.parametrize("layout", ["mp4", "dp2mp2pp2"])
def test_split_then_merge_returns_a_transformers_file_byte_for_byte(tmp_path, small, mp4, layout):
    src, _ = small
    lay = mp4 if layout == "mp4" else tmp_path / "pp.yaml"
    if layout != "mp4":
        lay.write_text("mesh: {dp: 2, mp: 2}\npipeline_stages: 2\nparams:\n  - match: 'layers\\.(\\d+)\\..*'\n"
                       "    spec: [mp]\n    stage: by_layer\n")
    jr.convert(src, tmp_path / "dist", dst_layout=lay)
    jr.convert(tmp_path / "dist", tmp_path / "back")  # no --src-layout: the manifest supplies it
    assert (tmp_path / "back" / "rank_0" / "checkpoint_0.safetensors").read_bytes() == src.read_bytes()
    assert "jaxreshard" not in header(tmp_path / "back" / "rank_0" / "checkpoint_0.safetensors")["__metadata__"]


def test_quickstart_example_round_trips_byte_for_byte(tmp_path, llama):
    jr.convert(llama, tmp_path / "dist", dst_layout=LAYOUTS / "llama_dp2mp4.yaml")
    jr.convert(tmp_path / "dist", tmp_path / "back")
    assert (tmp_path / "back" / "rank_0" / "checkpoint_0.safetensors").read_bytes() == Path(llama).read_bytes()


def test_hf_parts_carry_the_metadata_and_are_listed(tmp_path, small):
    src, _ = small
    out = tmp_path / "hf"
    jr.convert(src, out, hf=True, max_file_size="400B")
    parts = sorted(out.glob("model-*.safetensors"))
    assert len(parts) > 1
    assert all(header(p)["__metadata__"] == {"format": "pt"} for p in parts)
    assert recorded(out) == files_on_disk(out)
    assert read_manifest(out).output_format == "hf" and read_manifest(out).num_ranks == 1


def test_unify_gets_a_manifest_and_keeps_the_metadata(tmp_path, small, mp4):
    src, tensors = small
    jr.convert(src, tmp_path / "dist", dst_layout=mp4)
    out = tmp_path / "uni"
    unify(tmp_path / "dist", out)  # no src layout: from the manifest
    (part,) = out.glob("model-*.safetensors")
    assert header(part)["__metadata__"] == {"format": "pt"}
    got = load_file(str(part))
    assert sorted(got) == sorted(tensors)
    assert all(got[k].tobytes() == v.tobytes() for k, v in tensors.items())
    assert recorded(out) == files_on_disk(out)


def test_mindspore_flavoured_files_stay_as_mindspore_writes_them(tmp_path):
    out = tmp_path / "ms"
    assert main(["convert", "--src", str(MS / "ckpt" / "complete"), "--dst", str(out), "--dst-strategy",
                 str(MS / "strategy" / "dp2mp2.ckpt"), "--output-format", "safetensors", "-q"]) == 0
    for f in out.glob("rank_*/*.safetensors"):
        assert header(f)["__metadata__"] == {"format": "ms"}
    assert recorded(out) == files_on_disk(out)


def test_ckpt_output_is_listed_with_its_hashes(tmp_path, small, mp4):
    src, _ = small
    out = tmp_path / "ck"
    jr.convert(src, out, dst_layout=mp4, output_format="ckpt")
    assert recorded(out) == files_on_disk(out)
    assert read_manifest(out).output_format == "ckpt"


def test_process_num_reports_the_same_files(tmp_path, small, mp4):
    src, _ = small
    jr.convert(src, tmp_path / "one", dst_layout=mp4)
    jr.convert(src, tmp_path / "two", dst_layout=mp4, process_num=2)
    assert recorded(tmp_path / "two") == recorded(tmp_path / "one") == files_on_disk(tmp_path / "two")


def test_ranks_runs_fill_one_root_manifest(tmp_path, small, mp4):
    src, _ = small
    jr.convert(src, tmp_path / "full", dst_layout=mp4)
    jr.convert(src, tmp_path / "parts", dst_layout=mp4, ranks="4-7")
    assert sorted(recorded(tmp_path / "parts")) == [f"rank_{r}/checkpoint_{r}.safetensors" for r in range(4, 8)]
    jr.convert(src, tmp_path / "parts", dst_layout=mp4, ranks="0-3")
    assert recorded(tmp_path / "parts") == recorded(tmp_path / "full")
    assert read_manifest(tmp_path / "parts").params == read_manifest(tmp_path / "full").params
    jr.convert(src, tmp_path / "parts", dst_layout=mp4, ranks="2", overwrite=True)  # a rank written again
    assert recorded(tmp_path / "parts") == recorded(tmp_path / "full")


def test_before_commit_sees_the_complete_output_with_its_manifest(tmp_path, small, mp4):
    from jaxreshard.api import plan_conversion, write_job

    src, _ = small
    seen = {}

    def hook(tmp: Path) -> None:
        seen["files"] = files_on_disk(tmp)
        seen["manifest"] = recorded(tmp)
        assert not (tmp / ".jaxreshard.journal").exists()

    job = plan_conversion(src, dst_layout=mp4)
    write_job(job, tmp_path / "out", before_commit=hook)
    assert seen["files"] == seen["manifest"] == files_on_disk(tmp_path / "out")


def test_failing_before_commit_commits_nothing(tmp_path, small, mp4):
    from jaxreshard.api import plan_conversion, write_job
    from jaxreshard.errors import FormatError

    def hook(tmp: Path) -> None:
        raise FormatError("verification failed")

    with pytest.raises(FormatError):
        write_job(plan_conversion(small[0], dst_layout=mp4), tmp_path / "out", before_commit=hook)
    assert not (tmp_path / "out").exists()


def test_reading_by_the_manifest_equals_reading_with_the_layout(tmp_path, llama):
    jr.convert(llama, tmp_path / "dist", dst_layout=LAYOUTS / "llama_dp2mp2pp2.yaml")
    jr.convert(tmp_path / "dist", tmp_path / "a", dst_layout=LAYOUTS / "llama_dp8.yaml")
    jr.convert(tmp_path / "dist", tmp_path / "b", dst_layout=LAYOUTS / "llama_dp8.yaml",
               src_layout=LAYOUTS / "llama_dp2mp2pp2.yaml")
    assert files_on_disk(tmp_path / "a") == files_on_disk(tmp_path / "b")


def test_the_right_layout_under_other_axis_names_is_accepted(tmp_path, small, mp4):
    src, _ = small
    jr.convert(src, tmp_path / "dist", dst_layout=mp4)
    same = tmp_path / "same.yaml"  # same geometry, different axis names
    same.write_text("mesh: {data: 2, model: 4}\nparams:\n  - match: 'embed.*|layers.*'\n    spec: [model]\n")
    jr.convert(tmp_path / "dist", tmp_path / "back", src_layout=same)
    assert (tmp_path / "back" / "rank_0" / "checkpoint_0.safetensors").read_bytes() == src.read_bytes()


def test_inspect_shows_the_layout_the_manifest_records(tmp_path, small, mp4, capsys):
    src, _ = small
    jr.convert(src, tmp_path / "dist", dst_layout=mp4)
    assert main(["inspect", str(tmp_path / "dist")]) == 0
    out = capsys.readouterr().out
    assert "[0:4, 0:8] on ranks 0,4  [4:8, 0:8] on ranks 1,5" in out  # embed.weight [16, 8] split 4 ways


def test_a_hugging_face_folder_keeps_its_parts_metadata(tmp_path, small):
    """transformers writes {"format": "pt"} into every part; a merge or re-cut of the folder keeps it."""
    _, tensors = small
    hf = tmp_path / "hf_src"
    hf.mkdir()
    names = sorted(tensors)
    save_file({k: tensors[k] for k in names[:2]}, str(hf / "model-00001-of-00002.safetensors"),
              metadata={"format": "pt"})
    save_file({k: tensors[k] for k in names[2:]}, str(hf / "model-00002-of-00002.safetensors"),
              metadata={"format": "pt"})
    weight_map = {k: f"model-0000{1 + (i >= 2)}-of-00002.safetensors" for i, k in enumerate(names)}
    (hf / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    jr.convert(hf, tmp_path / "one")
    assert header(tmp_path / "one" / "rank_0" / "checkpoint_0.safetensors")["__metadata__"] == {"format": "pt"}
    jr.convert(hf, tmp_path / "recut", hf=True, max_file_size="300B")
    assert all(header(p)["__metadata__"] == {"format": "pt"} for p in (tmp_path / "recut").glob("model-*"))


def test_mindspore_pipeline_halves_fill_one_manifest(tmp_path):
    """Under MindSpore semantics each node's plan holds only its stage's parameters: the root manifest
    gathers both halves into what one full run records."""
    strategy = Path(__file__).resolve().parents[1] / "configs" / "strategies" / "fixture_dp2mp4pp2" / \
        "merged_ckpt_strategy.ckpt"  # fmt: skip
    src = MS / "ckpt" / "complete"
    jr.convert(src, tmp_path / "full", dst_strategy=strategy)
    jr.convert(src, tmp_path / "nodes", dst_strategy=strategy, ranks="8-15")
    jr.convert(src, tmp_path / "nodes", dst_strategy=strategy, ranks="0-7")
    full, nodes = read_manifest(tmp_path / "full"), read_manifest(tmp_path / "nodes")
    assert nodes.files == full.files and len(full.files) == 16
    assert nodes.params == full.params and nodes.num_ranks == full.num_ranks == 16
