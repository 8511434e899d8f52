"""`jaxreshard verify`: equal checkpoints of any layout and format verify; every kind of difference is found
and named (parameter, rank file, element offset computed here independently); `convert --verify` commits
only verified outputs."""

from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

import jaxreshard
from jaxreshard.errors import LayoutError
from jaxreshard.formats import open_source
from jaxreshard.formats.manifest import MANIFEST_NAME
from jaxreshard.integrity import VerifyError
from jaxreshard.verify import verify

from .corpus.harness import run_cli
from .helpers import block_slices, rank_coords, tree

LAYOUTS = Path(__file__).parent.parent / "configs" / "layouts"
DP2MP4 = str(LAYOUTS / "llama_dp2mp4.yaml")
MP2PP4 = str(LAYOUTS / "llama_mp2pp4.yaml")
MS = Path(__file__).parent / "fixtures" / "mindspore"


@pytest.fixture(scope="module")
def ckpts(llama, tmp_path_factory):
    """The example checkpoint as complete, dp2mp4 ranks, mp2pp4 ranks and Hugging Face parts (each with the
    manifest conversions write), and the two rank outputs as another tool would have written them."""
    root = tmp_path_factory.mktemp("verify")
    jaxreshard.convert(llama, root / "dp2mp4", dst_layout=DP2MP4)
    jaxreshard.convert(llama, root / "pp", dst_layout=MP2PP4)
    jaxreshard.convert(llama, root / "hf", hf=True, max_file_size="500KB")
    return {"complete": llama, "dp2mp4": root / "dp2mp4", "pp": root / "pp", "hf": root / "hf",
            "foreign_dp2mp4": foreign(root / "dp2mp4", root / "foreign_dp2mp4"),
            "foreign_pp": foreign(root / "pp", root / "foreign_pp")}


def foreign(src: Path, dst: Path) -> Path:
    """A copy of a jaxreshard output that says nothing about its layout, as another tool's output: no manifest,
    and each rank file's `jaxreshard` metadata entry removed (header padded with spaces, as the safetensors
    format allows, so every data offset stays)."""
    shutil.copytree(src, dst)
    (dst / MANIFEST_NAME).unlink()
    for path in dst.rglob("*.safetensors"):
        raw = bytearray(path.read_bytes())
        n = struct.unpack("<Q", raw[:8])[0]
        header = json.loads(raw[8 : 8 + n])
        del header["__metadata__"]["jaxreshard"]
        raw[8 : 8 + n] = json.dumps(header, separators=(",", ":")).encode().ljust(n, b" ")
        path.write_bytes(bytes(raw))
    return dst


def safetensors_offset(path: Path, param: str) -> tuple[int, list[int], str]:
    """(file offset of the tensor's first byte, shape, dtype code), parsed here from the header by hand."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    info = json.loads(raw[8 : 8 + n])[param]
    return 8 + n + info["data_offsets"][0], info["shape"], info["dtype"]


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("a, a_layout, b, b_layout", [
    ("complete", None, "dp2mp4", DP2MP4),
    ("dp2mp4", DP2MP4, "pp", MP2PP4),
    ("pp", MP2PP4, "complete", None),
    ("hf", None, "pp", MP2PP4),
    ("dp2mp4", DP2MP4, "hf", None),
])  # fmt: skip
def test_equal_checkpoints_verify(ckpts, a, a_layout, b, b_layout):
    argv = ["verify", "--src", str(ckpts[a]), "--dst", str(ckpts[b]), "--check-replicas"]
    argv += ["--src-layout", a_layout] if a_layout else []
    argv += ["--dst-layout", b_layout] if b_layout else []
    code, out, err = run_cli(argv)
    assert (code, err) == (0, "")
    assert out.startswith(f"verified: {ckpts[b]} matches {ckpts[a]}: 41 parameters, 1.75 MiB")


@pytest.mark.parametrize("a, a_strategy, b, b_strategy", [
    ("ckpt/complete", None, "ckpt/dp2mp2", "dp2mp2.ckpt"),
    ("ckpt/dp2mp2_opt", "dp2mp2_opt.ckpt", "ckpt/dp2mp2_opt__to__complete", None),
    ("ckpt/dp1mp2pp2", "dp1mp2pp2.ckpt", "st/complete", None),
    ("ckpt/dp2mp2_layout", "dp2mp2_layout.ckpt", "ckpt/dp4_opt", "dp4_opt.ckpt"),
])  # fmt: skip
def test_mindspore_checkpoints_verify(a, a_strategy, b, b_strategy):
    strategy = MS / "strategy"
    report = verify(MS / a, MS / b, src_strategy=a_strategy and strategy / a_strategy,
                    dst_strategy=b_strategy and strategy / b_strategy, check_replicas=True)
    complete = open_source(MS / "ckpt" / "complete").entries[0]  # the whole tensors, as MindSpore saved them
    assert (report.params, report.logical_bytes) == (len(complete), sum(e.nbytes for e in complete.values()))
    assert report.rank_files == (1 if b_strategy is None else 4)


def test_a_flipped_byte_is_found_with_its_rank_and_offset(ckpts, tmp_path):
    bad = copy(ckpts["dp2mp4"], tmp_path / "bad")
    param, rank, k = "model.layers.1.self_attn.o_proj.weight", 5, 1234
    path = bad / f"rank_{rank}" / f"checkpoint_{rank}.safetensors"
    offset, block_shape, dtype = safetensors_offset(path, param)
    assert dtype == "BF16"
    with open(path, "r+b") as f:  # flip the low byte of element k of the block
        f.seek(offset + 2 * k)
        byte = f.read(1)[0]
        f.seek(offset + 2 * k)
        f.write(bytes([byte ^ 0xFF]))
    full = [128, 128]  # o_proj is [128, 128], split by columns on mp
    cols = block_slices(full, [None, "mp"], {"dp": 2, "mp": 4}, rank_coords({"dp": 2, "mp": 4}, rank))
    assert block_shape == [128, 32] and cols[1].start == 32
    want_global = [k // 32, cols[1].start + k % 32]
    code, _, err = run_cli(["verify", "--src", str(ckpts["complete"]), "--dst", str(bad), "--dst-layout", DP2MP4])
    assert code == 2
    assert f"rank_{rank}/checkpoint_{rank}.safetensors: parameter '{param}' differs on destination rank {rank}: " \
           f"element {k} of its block [0:128, 32:64] (global index {want_global})" in err
    # alone, its manifest shows the file changed
    code, _, err = run_cli(["verify", str(bad)])
    assert code == 2 and f"rank_{rank}/checkpoint_{rank}.safetensors: SHA-256 " in err
    # without its manifest (as another tool's output), the same damage is seen as a replica (rank 1 holds the
    # same block) that differs
    (bad / MANIFEST_NAME).unlink()
    code, _, err = run_cli(["verify", str(bad), "--dst-layout", DP2MP4, "--check-replicas"])
    assert code == 2
    assert f"parameter '{param}' on rank {rank} should be a replica of rank 1 but element {k} " in err
    # without --check-replicas the single form cannot see it: every block has the right shape
    assert run_cli(["verify", str(bad), "--dst-layout", DP2MP4])[0] == 0


def test_a_flipped_byte_in_a_mindspore_rank_file(tmp_path):
    bad = copy(MS / "ckpt" / "dp2mp2", tmp_path / "bad")
    entry = open_source(bad).entries[3]["embedding.embedding_table"]  # float32 [32, 16]: rows 32:64 on ranks 1, 3
    k = 37
    path = entry.path
    data = bytearray(path.read_bytes())
    data[entry.segments[0][0] + 4 * k + 1] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(VerifyError, match=rf"rank_3/checkpoint_3.ckpt: parameter 'embedding.embedding_table' differs "
                                          rf"on destination rank 3: element {k} of its block \[32:64, 0:16\] "
                                          rf"\(global index \[{32 + k // 16}, {k % 16}\]\)"):
        verify(MS / "ckpt" / "complete", bad, dst_strategy=MS / "strategy" / "dp2mp2.ckpt")


def test_wrong_layouts_are_found(ckpts):
    """In an output that says nothing about its layout (another tool's), a wrong layout shows in the files or
    the data; in a jaxreshard output its manifest refuses it before any data is read."""
    dp8 = LAYOUTS / "llama_dp8.yaml"
    with pytest.raises(VerifyError, match=r"'model.embed_tokens.weight' is bfloat16\[512, 128\] but "
                                          r"bfloat16\[128, 128\]"):
        verify(ckpts["foreign_dp2mp4"], ckpts["complete"], src_layout=dp8)
    with pytest.raises(VerifyError, match=r"rank_1/checkpoint_1.safetensors: parameter '.*' on rank 1 should be a "
                                          r"replica of rank 0"):
        verify(ckpts["foreign_dp2mp4"], src_layout=dp8, check_replicas=True)
    # mp2pp4 puts layer 1 on stage 1 (ranks 2-3); dp2mp2pp2 on stage 0, whose ranks are 0-3
    with pytest.raises(VerifyError, match=r"pp/rank_0/checkpoint_0.safetensors: rank 0 lacks parameter "
                                          r"'model.layers.1.self_attn.q_proj.weight', which the layout puts on it"):
        verify(ckpts["foreign_pp"], src_layout=LAYOUTS / "llama_dp2mp2pp2.yaml")
    embed = r"parameter 'model.embed_tokens.weight' on rank 0: the given source layout makes it \[128, 128\]"
    for args in [(ckpts["dp2mp4"], ckpts["complete"]), (ckpts["dp2mp4"],)]:
        with pytest.raises(LayoutError, match=r"dp2mp4/jaxreshard.manifest.json: " + embed):
            verify(*args, src_layout=dp8, check_replicas=True)
    with pytest.raises(LayoutError, match=r"pp/jaxreshard.manifest.json: parameter '.*' on rank \d+: the given"):
        verify(ckpts["pp"], src_layout=LAYOUTS / "llama_dp2mp2pp2.yaml")


def test_missing_rank_folders(ckpts, tmp_path):
    for r in range(4):
        shutil.copytree(ckpts["dp2mp4"] / f"rank_{r}", tmp_path / "half" / f"rank_{r}")
    with pytest.raises(VerifyError, match=r"half: rank folders 4-7 are missing"):
        verify(tmp_path / "half", src_layout=DP2MP4)


def test_dtype_and_names_are_compared(ckpts, tmp_path):
    jaxreshard.convert(ckpts["complete"], tmp_path / "fp32", dtype="fp32")
    with pytest.raises(VerifyError, match=r"'model.embed_tokens.weight' is float32\[512, 128\] but "
                                          r"bfloat16\[512, 128\]"):
        verify(ckpts["complete"], tmp_path / "fp32")
    assert verify(ckpts["complete"], tmp_path / "fp32", dtype="fp32").params == 41  # convert --dtype's check
    with pytest.raises(VerifyError, match=r"parameter 'w' of .* is missing \(2 missing\)"):
        verify(MS / "inconsistent" / "src", MS / "ckpt" / "complete",
               src_strategy=MS / "inconsistent" / "src_dp2mp2.ckpt")


def test_check_replicas_finds_differing_mindspore_replicas():
    src, strategy = MS / "inconsistent" / "src", MS / "inconsistent" / "src_dp2mp2.ckpt"
    assert verify(src, src_strategy=strategy).params == 2  # shapes alone look right
    with pytest.raises(VerifyError, match=r"rank_2/checkpoint_2.ckpt: parameter 'w' on rank 2 should be a replica "
                                          r"of rank 0 but element 0 of its block \[0:4, 0:2\] "
                                          r"\(global index \[0, 0\]\) "
                                          r"is 20.0 here but 0.0 on rank 0"):
        verify(src, src_strategy=strategy, check_replicas=True)


# -- one checkpoint against its manifest


@pytest.fixture
def with_manifest(ckpts, tmp_path):
    return copy(ckpts["dp2mp4"], tmp_path / "out")  # with the manifest its conversion wrote


def test_a_checkpoint_matches_its_manifest(with_manifest, ckpts):
    code, out, err = run_cli(["verify", str(with_manifest)])
    assert (code, err) == (0, "")
    size = sum(p.stat().st_size for p in with_manifest.rglob("*.safetensors"))
    assert out.strip().endswith(f"41 parameters, 1.75 MiB, 8 rank file(s), {size / 2**20:.2f} MiB hashed")
    # the manifest supplies the layout of a distributed checkpoint in the two-checkpoint form too
    assert run_cli(["verify", "--src", str(with_manifest), "--dst", str(ckpts["pp"]), "--dst-layout", MP2PP4])[0] == 0


def _truncate(root: Path) -> str:
    path = root / "rank_3" / "checkpoint_3.safetensors"
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size - 1)
    return rf"rank_3/checkpoint_3.safetensors: {size - 1} bytes but .* records {size}"


def _missing(root: Path) -> str:
    (root / "rank_6" / "checkpoint_6.safetensors").unlink()
    return r"rank_6/checkpoint_6.safetensors: listed in .*jaxreshard.manifest.json but missing"


def _extra(root: Path) -> str:
    shutil.copy(root / "rank_0" / "checkpoint_0.safetensors", root / "rank_0" / "checkpoint_9.safetensors")
    return r"rank_0/checkpoint_9.safetensors: a checkpoint file that .* does not list"


def _flipped(root: Path) -> str:
    path = root / "rank_2" / "checkpoint_2.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    return r"rank_2/checkpoint_2.safetensors: SHA-256 [0-9a-f]{16}\.\.\. differs from [0-9a-f]{16}\.\.\. recorded"


def _wrong_sha(root: Path) -> str:
    manifest_path = root / "jaxreshard.manifest.json"
    data = json.loads(manifest_path.read_text())
    data["files"]["rank_7/checkpoint_7.safetensors"]["sha256"] = "0" * 64
    manifest_path.write_text(json.dumps(data))
    return r"rank_7/checkpoint_7.safetensors: SHA-256 .* differs from 0000000000000000\.\.\. recorded"


def _wrong_layout(root: Path) -> str:
    manifest_path = root / "jaxreshard.manifest.json"
    data = json.loads(manifest_path.read_text())
    data["params"]["model.norm.weight"]["stages"] = [1]  # a stage 1 the 8 ranks of dp2mp4 do not have
    manifest_path.write_text(json.dumps(data))
    return r"parameter 'model.norm.weight' is laid out on 8 devices x stages \[1\], beyond the manifest's 8 ranks"


def _wrong_shape(root: Path) -> str:
    manifest_path = root / "jaxreshard.manifest.json"
    data = json.loads(manifest_path.read_text())
    data["params"]["lm_head.weight"]["shape"] = [256, 128]
    manifest_path.write_text(json.dumps(data))
    return r"parameter 'lm_head.weight' is F16\[512, 128\] in the files but F16\[256, 128\] in its manifest"


def _wrong_spec(root: Path) -> str:
    manifest_path = root / "jaxreshard.manifest.json"
    data = json.loads(manifest_path.read_text())
    data["params"]["lm_head.weight"]["spec"] = []  # claims each rank holds it whole
    manifest_path.write_text(json.dumps(data))
    return r"parameter 'lm_head.weight' is F16\[128, 128\] in the files but F16\[512, 128\] in its manifest"


@pytest.mark.parametrize("damage", [_truncate, _missing, _extra, _flipped, _wrong_sha, _wrong_layout, _wrong_shape,
                                    _wrong_spec])
def test_damage_against_the_manifest_is_found(with_manifest, damage):
    message = damage(with_manifest)
    code, _, err = run_cli(["verify", str(with_manifest)])
    assert code == 2, err
    assert len(err.splitlines()) == 1
    assert re.search(message, err), err


def test_positional_and_job_file_forms(ckpts, tmp_path):
    code, out, _ = run_cli(["verify", str(ckpts["pp"]), "--src", str(ckpts["hf"]), "--dst-layout", MP2PP4])
    assert code == 0 and out.startswith(f"verified: {ckpts['pp']} matches {ckpts['hf']}")
    job = tmp_path / "job.yaml"
    job.write_text(f"task: verify\nsrc: {ckpts['dp2mp4']}\nsrc_layout: {DP2MP4}\ncheck_replicas: true\n")
    code, out, _ = run_cli(["--config", str(job)])  # one checkpoint, by its layout
    assert code == 0 and out.startswith(f"verified: {ckpts['dp2mp4']} matches the given layout and its manifest: "
                                        "41 parameters")
    assert out.rstrip().endswith("replica block(s) compared")


def test_no_manifest(ckpts):
    code, _, err = run_cli(["verify", str(ckpts["foreign_dp2mp4"])])
    assert code == 2 and "has no manifest (jaxreshard.manifest.json); give --src to compare with" in err


# -- convert --verify


def test_convert_verify_commits_a_verified_output(ckpts, tmp_path):
    code, _, err = run_cli(["convert", "-q", "--src", str(ckpts["pp"]), "--src-layout", MP2PP4, "--dst",
                            str(tmp_path / "out"), "--dst-layout", DP2MP4, "--verify"])
    assert code == 0, err
    assert tree(tmp_path / "out") == tree(ckpts["dp2mp4"])


@pytest.mark.parametrize("extra", [[], ["--ranks", "4-7"]])
def test_convert_verify_commits_nothing_when_a_byte_is_wrong(ckpts, tmp_path, monkeypatch, extra):
    from jaxreshard.formats import safetensors_io

    real_write = safetensors_io.SafetensorsWriter.write

    def corrupting_write(self, param, array):
        if param == "model.layers.0.mlp.down_proj.weight" and "checkpoint_6" in str(self.path):
            array = array.copy()
            array.reshape(-1).view(np.uint8)[3] ^= 0x40
        real_write(self, param, array)

    monkeypatch.setattr(safetensors_io.SafetensorsWriter, "write", corrupting_write)
    code, _, err = run_cli(["convert", "-q", "--src", str(ckpts["complete"]), "--dst", str(tmp_path / "out"),
                            "--dst-layout", DP2MP4, "--verify", *extra])
    assert code == 2
    out = tmp_path / "out"
    assert f"--verify: nothing was written to {out}: {out}/rank_6/checkpoint_6.safetensors: parameter " \
           "'model.layers.0.mlp.down_proj.weight' differs on destination rank 6: element 1 of its block" in err
    assert list(tmp_path.iterdir()) == []  # nothing committed, no temporary left
    with pytest.raises(VerifyError):
        jaxreshard.convert(ckpts["complete"], tmp_path / "lib", dst_layout=DP2MP4, verify=True)
    assert list(tmp_path.iterdir()) == []


# -- fresh outputs of every kind verify by their manifests alone (no layout or strategy given)


@pytest.fixture(scope="module")
def outputs(ckpts, tmp_path_factory):
    """name -> (output, the checkpoint it must equal, parameters, rank files), each written by the CLI."""
    root = tmp_path_factory.mktemp("kinds")
    llama, strategy = ckpts["complete"], MS / "strategy"

    def cli(*argv) -> Path:
        code, _, err = run_cli([str(a) for a in argv] + ["-q"])
        assert code == 0, err
        return Path(argv[argv.index("--dst") + 1])

    for ranks in ("4-7", "0-3"):  # one destination filled by two runs
        two = cli("convert", "--src", llama, "--dst", root / "two", "--dst-layout", DP2MP4, "--ranks", ranks)
    for ranks in ("2-3", "0-1"):  # MindSpore pipeline stages, last one first
        ms_two = cli("convert", "--src", MS / "ckpt" / "complete", "--dst", root / "ms_two", "--dst-strategy",
                     strategy / "dp1mp2pp2.ckpt", "--ranks", ranks)
    lora_src = root / "lora" / "model.safetensors"
    lora_src.parent.mkdir()
    rng = np.random.default_rng(0)
    save_file({"m.wq.base_layer.weight": rng.standard_normal((8, 8)).astype(np.float32),
               "m.wq.lora_A.weight": rng.standard_normal((2, 8)).astype(np.float32),
               "m.wq.lora_B.weight": rng.standard_normal((8, 2)).astype(np.float32),
               "m.norm.weight": np.ones(8, np.float32)}, str(lora_src))  # fmt: skip
    (root / "mp2.yaml").write_text("mesh: {mp: 2}\nparams:\n  - {match: 'm.wq.*', spec: [mp]}\n")
    lora = cli("merge-lora", "--src", lora_src, "--dst", root / "lora_out", "--lora-scaling", "0.5")
    ms_complete = MS / "ckpt" / "complete"
    return {
        "complete": (cli("convert", "--src", llama, "--dst", root / "complete"), llama, 41, 1),
        "hf": (ckpts["hf"], llama, 41, 1),
        "rank folders": (ckpts["dp2mp4"], llama, 41, 8),
        "pipeline": (ckpts["pp"], ckpts["dp2mp4"], 41, 8),
        "--ranks by two runs": (two, llama, 41, 8),
        "ckpt + strategy": (cli("convert", "--src", ms_complete, "--dst", root / "ms", "--dst-strategy",
                                strategy / "dp2mp2.ckpt"), ms_complete, 10, 4),
        "ckpt strategy to strategy": (cli("convert", "--src", MS / "ckpt" / "dp2mp2_opt", "--src-strategy",
                                          strategy / "dp2mp2_opt.ckpt", "--dst", root / "ms_opt", "--dst-strategy",
                                          strategy / "dp4_opt.ckpt"), ms_complete, 10, 4),
        "ckpt --ranks by two runs": (ms_two, ms_complete, 10, 4),
        "unify": (cli("unify", "--src", ckpts["dp2mp4"], "--dst", root / "unified", "--max-file-size", "700KB"),
                  ckpts["dp2mp4"], 41, 1),
        "merge-lora": (lora, None, 2, 1),
        "merge-lora ranks": (cli("merge-lora", "--src", lora_src, "--dst", root / "lora_mp2", "--lora-scaling", "0.5",
                                 "--dst-layout", root / "mp2.yaml"), lora, 2, 2),
    }


KINDS = ["complete", "hf", "rank folders", "pipeline", "--ranks by two runs", "ckpt + strategy",
         "ckpt strategy to strategy", "ckpt --ranks by two runs", "unify", "merge-lora", "merge-lora ranks"]


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_of_output_verifies_by_its_manifest(outputs, kind):
    out, reference, params, rank_files = outputs[kind]
    code, text, err = run_cli(["verify", str(out), "--check-replicas"])
    assert (code, err) == (0, "")
    assert text.startswith(f"verified: {out} matches its manifest: {params} parameters, ")
    assert f" {rank_files} rank file(s), " in text
    if reference is not None:  # the same tensors as what it was made from, read by the manifest's layout
        code, text, err = run_cli(["verify", "--src", str(reference), "--dst", str(out)])
        assert (code, err) == (0, "")
        assert text.startswith(f"verified: {out} matches {reference}: {params} parameters, ")


def test_a_pass_through_copy_is_compared_on_every_rank(outputs, tmp_path):
    """MindSpore's pass-through parameters (`global_step`) are copied whole to every rank; the manifest lists
    them as `direct`, read as a whole copy on each rank, so a wrong copy on any rank is found."""
    out, reference, _, _ = outputs["ckpt + strategy"]
    assert "global_step" in json.loads((out / MANIFEST_NAME).read_text())["extra"]["direct"]
    bad = copy(out, tmp_path / "bad")
    entry = open_source(bad).entries[3]["global_step"]  # int32 [1]
    data = bytearray(entry.path.read_bytes())
    data[entry.segments[0][0]] ^= 0x01
    entry.path.write_bytes(bytes(data))
    with pytest.raises(VerifyError, match=r"rank_3/checkpoint_3.ckpt: parameter 'global_step' differs on "
                                          r"destination rank 3: element 0 of its block \[0:1\]"):
        verify(reference, bad)
    with pytest.raises(VerifyError, match=r"rank_3/checkpoint_3.ckpt: SHA-256 "):
        verify(bad)
