"""Bad inputs of `jaxreshard verify` and `convert --verify`: usage mistakes, checkpoints that differ, and
checkpoints that do not match their manifest or layout. Each is exit 2 with one line naming what differs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

import jaxreshard
from jaxreshard.formats.manifest import MANIFEST_NAME

from .harness import Case, corpus_test

MS = Path(__file__).parents[1] / "fixtures" / "mindspore"
W = np.arange(16, dtype=np.float32).reshape(4, 4)
B = np.arange(4, dtype=np.float32)


def _save(path: Path, tensors: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))


def _pair(a: dict[str, np.ndarray], b: dict[str, np.ndarray]):
    def setup(tmp: Path) -> None:
        _save(tmp / "a.safetensors", a)
        _save(tmp / "b" / "model.safetensors", b)

    return setup


def _flipped() -> dict[str, np.ndarray]:
    w = W.copy()
    w[1, 1] = -5.0  # element 5 of the block
    return {"w": w, "b": B}


def _dp2(tmp: Path, rank1: dict[str, np.ndarray] | None = None) -> None:
    """Two data-parallel replicas in rank folders, and the layout saying so."""
    _save(tmp / "dp" / "rank_0" / "checkpoint_0.safetensors", {"w": W, "b": B})
    _save(tmp / "dp" / "rank_1" / "checkpoint_1.safetensors", rank1 or {"w": W, "b": B})
    (tmp / "dp2.yaml").write_text("mesh: {dp: 2}\nparams:\n  - {match: '.*', spec: []}\n")


def _split(tmp: Path, rank1: dict[str, np.ndarray] | None = None) -> None:
    """`w` split in rows over mp 2, `b` replicated."""
    _save(tmp / "mp" / "rank_0" / "checkpoint_0.safetensors", {"w": W[:2], "b": B})
    _save(tmp / "mp" / "rank_1" / "checkpoint_1.safetensors", rank1 or {"w": W[2:], "b": B})
    (tmp / "mp2.yaml").write_text("mesh: {mp: 2}\nparams:\n  - {match: 'w', spec: [mp]}\n")


def _split_and_complete(tmp: Path) -> None:
    _split(tmp, {"w": W[:2], "b": B})  # rank 1 holds rank 0's rows: w[2:4] becomes w[0:2] when merged
    _save(tmp / "b" / "model.safetensors", {"w": W, "b": B})


def _split_and_one_rank_layout(tmp: Path) -> None:
    _split(tmp)
    (tmp / "dp2.yaml").write_text("mesh: {dp: 1}\n")


RANK0 = "rank_0/checkpoint_0.safetensors"  # where `convert` writes a complete checkpoint


def _with_manifest(damage=None, edit=None):
    """A complete checkpoint converted to `out` (`out/rank_0/...` and the manifest the conversion writes), then
    `damage(out)` / `edit(json)`."""

    def setup(tmp: Path) -> None:
        out = tmp / "out"
        _save(tmp / "a.safetensors", {"w": W, "b": B})
        jaxreshard.convert(tmp / "a.safetensors", out)
        if edit is not None:
            data = json.loads((out / MANIFEST_NAME).read_text())
            edit(data)
            (out / MANIFEST_NAME).write_text(json.dumps(data))
        if damage is not None:
            damage(out)

    return setup


def _truncate(out: Path) -> None:
    path = out / RANK0
    path.write_bytes(path.read_bytes()[:-4])


def _rewrite(out: Path) -> None:
    _save(out / RANK0, {"w": W + 1, "b": B})  # same size, other bytes


def _stray_rank(out: Path) -> None:
    _save(out / "rank_1" / "checkpoint_1.safetensors", {"w": W})


def _symlink(out: Path) -> None:
    real = out.parent / "elsewhere.safetensors"
    (out / RANK0).rename(real)
    (out / RANK0).symlink_to(real)


def _orbax(tmp: Path) -> None:
    (tmp / "orbax").mkdir()
    (tmp / "orbax" / "_CHECKPOINT_METADATA").write_text("{}")


V = ["verify"]
CASES = [
    Case("verify-nothing", V, 2, r"verify: give a checkpoint \(jaxreshard verify B\), or two to compare"),
    Case("verify-positional-and-dst", [*V, "{tmp}/x", "--dst", "{tmp}/y"], 2, r"positional argument or as --dst"),
    Case("verify-two-layouts-for-one", [*V, "{llama}", "--src-layout", "a.yaml", "--dst-layout", "b.yaml"], 2,
         r"one checkpoint takes one layout or strategy; got --src-layout, --dst-layout"),
    Case("verify-no-manifest", [*V, "{llama}"], 2, r"has no manifest \(jaxreshard.manifest.json\); give --src to "
         r"compare with"),
    Case("verify-src-missing", [*V, "--src", "{tmp}/nope", "--dst", "{llama}"], 2, r"nope: source checkpoint does "
         r"not exist"),
    Case("verify-distributed-without-layout", [*V, "--src", "{tmp}/dp", "--dst", "{llama}"], 2,
         r"dp: this is a distributed checkpoint \(2 rank folders\); pass the layout", _dp2),
    Case("verify-missing-param", [*V, "--src", "{tmp}/a.safetensors", "--dst", "{tmp}/b"], 2,
         r"b/model.safetensors: parameter 'b' of .*a.safetensors is missing \(1 missing\)",
         _pair({"w": W, "b": B}, {"w": W})),
    Case("verify-extra-param", [*V, "--src", "{tmp}/a.safetensors", "--dst", "{tmp}/b"], 2,
         r"b/model.safetensors: parameter 'c' is not in .*a.safetensors \(1 extra\)",
         _pair({"w": W}, {"w": W, "c": B})),
    Case("verify-shape-differs", [*V, "--src", "{tmp}/a.safetensors", "--dst", "{tmp}/b"], 2,
         r"parameter 'w' is float32\[2, 8\] but float32\[4, 4\] in", _pair({"w": W}, {"w": W.reshape(2, 8)})),
    Case("verify-dtype-differs", [*V, "--src", "{tmp}/a.safetensors", "--dst", "{tmp}/b"], 2,
         r"parameter 'w' is float64\[4, 4\] but float32\[4, 4\] in", _pair({"w": W}, {"w": W.astype(np.float64)})),
    Case("verify-value-differs", [*V, "--src", "{tmp}/a.safetensors", "--dst", "{tmp}/b"], 2,
         r"b/model.safetensors: parameter 'w' differs on destination rank 0: element 5 of its block \[0:4, 0:4\] "
         r"\(global index \[1, 1\]\) is -5.0 here but 5.0 in", _pair({"w": W, "b": B}, _flipped())),
    Case("verify-rank-block-differs", [*V, "--src", "{tmp}/mp", "--src-layout", "{tmp}/mp2.yaml", "--dst",
                                       "{tmp}/b"], 2,
         r"b/model.safetensors: parameter 'w' differs on destination rank 0: element 8 of its block \[0:4, 0:4\] "
         r"\(global index \[2, 0\]\) is 8.0 here but 0.0",
         _split_and_complete),
    Case("verify-replica-differs", [*V, "{tmp}/dp", "--src-layout", "{tmp}/dp2.yaml", "--check-replicas"], 2,
         r"rank_1/checkpoint_1.safetensors: parameter 'b' on rank 1 should be a replica of rank 0 but element 3 of "
         r"its block \[0:4\] \(global index \[3\]\) is 9.0 here but 3.0 on rank 0",
         lambda tmp: _dp2(tmp, {"w": W, "b": np.array([0, 1, 2, 9], np.float32)})),
    Case("verify-replica-differs-two-form", [*V, "--src", "{tmp}/dp", "--src-layout", "{tmp}/dp2.yaml", "--dst",
                                             "{tmp}/dp", "--dst-layout", "{tmp}/dp2.yaml", "--check-replicas"], 2,
         r"parameter 'w' on rank 1 should be a replica of rank 0",
         lambda tmp: _dp2(tmp, {"w": W.T.copy(), "b": B})),
    Case("verify-rank-lacks-param", [*V, "{tmp}/mp", "--src-layout", "{tmp}/mp2.yaml"], 2,
         r"rank_1/checkpoint_1.safetensors: rank 1 lacks parameter 'b', which the layout puts on it",
         lambda tmp: _split(tmp, {"w": W[2:]})),
    Case("verify-rank-block-shape", [*V, "{tmp}/mp", "--src-layout", "{tmp}/mp2.yaml"], 2,
         r"rank_1/checkpoint_1.safetensors: parameter 'w' on source rank 1 is float32\[1, 4\] but rank 0 has "
         r"float32\[2, 4\]", lambda tmp: _split(tmp, {"w": W[2:3], "b": B})),
    Case("verify-rank-folders-beyond-layout", [*V, "{tmp}/mp", "--src-layout", "{tmp}/dp2.yaml"], 2,
         r"mp: it has rank folders 1 beyond the layout's 1 ranks",
         _split_and_one_rank_layout),
    Case("verify-manifest-ok-is-exit-0", [*V, "{tmp}/out"], 0, "", _with_manifest()),
    Case("verify-manifest-truncated", [*V, "{tmp}/out"], 2,
         r"out/rank_0/checkpoint_0.safetensors: \d+ bytes but .*jaxreshard.manifest.json records \d+; "
         r"the file was truncated",
         _with_manifest(_truncate)),
    Case("verify-manifest-file-missing", [*V, "{tmp}/out"], 2,
         r"out/rank_0/checkpoint_0.safetensors: listed in .* but missing",
         _with_manifest(lambda out: (out / RANK0).unlink())),
    Case("verify-manifest-file-changed", [*V, "{tmp}/out"], 2,
         r"out/rank_0/checkpoint_0.safetensors: SHA-256 [0-9a-f]{16}\.\.\. differs from [0-9a-f]{16}\.\.\. recorded",
         _with_manifest(_rewrite)),
    Case("verify-manifest-unlisted-file", [*V, "{tmp}/out"], 2,
         r"out/rank_1/checkpoint_1.safetensors: a checkpoint file that .* does not list", _with_manifest(_stray_rank)),
    Case("verify-manifest-wrong-shape", [*V, "{tmp}/out"], 2,
         r"out: parameter 'w' is F32\[4, 4\] in the files but F32\[16\] in its manifest",
         _with_manifest(edit=lambda d: d["params"]["w"].update(shape=[16]))),
    Case("verify-manifest-param-not-in-files", [*V, "{tmp}/out"], 2,
         r"out: parameter 'c' is in its manifest but not in the files",
         _with_manifest(edit=lambda d: d["params"].update(c={"shape": [1], "dtype": "F32"}))),
    Case("verify-manifest-rank-count", [*V, "{tmp}/out"], 2,
         r"jaxreshard.manifest.json: records 4 ranks but .*out has 1 rank file\(s\) \(0\)",
         _with_manifest(edit=lambda d: d.update(num_ranks=4))),
    Case("verify-manifest-mesh-bomb", [*V, "{tmp}/out"], 2,
         r"parameter 'w' is laid out on 1099511627776 devices x stages \[0\], beyond the manifest's 1 ranks",
         _with_manifest(edit=lambda d: d["params"]["w"].update(mesh=[["a", 2**20], ["b", 2**20]]))),
    Case("verify-manifest-unknown-axis", [*V, "{tmp}/out"], 2,
         r"parameter 'w': mesh .* do not fit together \(unknown mesh axis 'mp'",
         _with_manifest(edit=lambda d: d["params"]["w"].update(mesh=[["dp", 1]], spec=[["mp"]]))),
    Case("verify-manifest-damaged", [*V, "{tmp}/out"], 2, r"damaged jaxreshard manifest",
         _with_manifest(damage=lambda out: (out / MANIFEST_NAME).write_text("{"))),
    Case("verify-orbax", [*V, "{tmp}/orbax"], 2, r"orbax: verify reads safetensors and .ckpt checkpoints, not orbax",
         _orbax),
    Case("verify-manifest-file-is-a-symlink", [*V, "{tmp}/out"], 2,
         r"out/rank_0/checkpoint_0.safetensors: listed in .* but missing \(or not a regular file\)",
         _with_manifest(_symlink)),
    Case("convert-verify-mindspore-by-stage", ["convert", "--src", f"{MS}/ckpt/dp1mp2pp2", "--src-strategy",
                                               f"{MS}/strategy/pp_stages/ckpt_strategy_rank_0.ckpt", "--dst",
                                               "{tmp}/o", "--dst-strategy", f"{MS}/strategy/dp2mp2.ckpt", "--verify"],
         2, r"--verify cannot check MindSpore's by-stage path"),
    Case("convert-verify-differing-replicas", ["convert", "--src", f"{MS}/inconsistent/src", "--src-strategy",
                                               f"{MS}/inconsistent/src_dp2mp2.ckpt", "--dst", "{tmp}/o",
                                               "--dst-strategy", f"{MS}/inconsistent/dst_mp4.ckpt", "--exact-replicas",
                                               "--verify", "-q"],
         2, r"--verify: nothing was written to .*/o: .*/o/rank_2/checkpoint_2.ckpt: parameter 'w' differs on "
         r"destination rank 2: element 0 of its block \[0:4, 2:3\] \(global index \[0, 2\]\) is 30.0 here but 10.0"),
    Case("convert-verify-multi-host", ["convert", "--src", "{llama}", "--dst", "{tmp}/o", "--verify",
                                       "--coordinator-address", "localhost:1", "--num-processes", "2",
                                       "--process-id", "0"], 2, r"--verify runs in one process"),
]

test_case = corpus_test(CASES)
