"""Conversions to and from object storage equal the same conversions on local disk, byte for byte, and an
object-store output is complete exactly when its manifest exists."""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import jaxreshard as jr
from jaxreshard.errors import OutputExistsError
from jaxreshard.formats.manifest import MANIFEST_NAME
from jaxreshard.formats.safetensors_io import SafetensorsWriter
from jaxreshard.remote.urls import RemoteError

REPO = Path(__file__).resolve().parents[2]
DP2MP4 = str(REPO / "configs" / "layouts" / "llama_dp2mp4.yaml")
MP8 = str(REPO / "configs" / "layouts" / "llama_mp8_gqa.yaml")


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` by relative name; the manifest without its run-specific fields."""
    out = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        if path.name == MANIFEST_NAME:
            manifest = json.loads(data)
            for field in ("created", "source"):
                manifest.pop(field)
            data = json.dumps(manifest, sort_keys=True).encode()
        out[str(path.relative_to(folder))] = data
    return out


def test_split_reshard_merge_through_s3_equal_local(llama, bucket, tmp_path):
    bucket.upload(llama.parent, "src")
    jr.convert(llama, tmp_path / "split", dst_layout=DP2MP4)
    jr.convert(tmp_path / "split", tmp_path / "mp8", dst_layout=MP8)
    jr.convert(tmp_path / "mp8", tmp_path / "merged")

    jr.convert(bucket.url("src"), bucket.url("split"), dst_layout=DP2MP4)  # s3 -> s3, split
    jr.convert(bucket.url("split"), bucket.url("mp8"), dst_layout=MP8)  # s3 -> s3, reshard (layout from manifest)
    jr.convert(bucket.url("mp8"), tmp_path / "merged_from_s3")  # s3 -> local, merge

    for name in ("split", "mp8"):
        bucket.download(name, tmp_path / f"dl_{name}")
        got = tree(tmp_path / f"dl_{name}")
        assert got == tree(tmp_path / name), name
    assert tree(tmp_path / "merged_from_s3") == tree(tmp_path / "merged")
    assert (tmp_path / "merged_from_s3" / "rank_0" / "checkpoint_0.safetensors").read_bytes() == llama.read_bytes()
    manifest = json.loads(bucket.get("mp8/" + MANIFEST_NAME))
    assert manifest["source"] == bucket.url("split")  # the URL, not the local view it was read through
    assert bucket.multipart_uploads() == []
    assert not [k for k in bucket.keys() if "lock" in k]


def test_local_to_s3_and_back_keeps_every_byte(llama, bucket, tmp_path):
    jr.convert(llama, bucket.url("out/split"), dst_layout=DP2MP4)  # local -> s3
    jr.verify(bucket.url("out/split"))  # against its own manifest, hashing the objects
    jr.verify(llama, bucket.url("out/split"))  # element by element against the source
    jr.convert(bucket.url("out/split"), tmp_path / "back")
    assert (tmp_path / "back" / "rank_0" / "checkpoint_0.safetensors").read_bytes() == llama.read_bytes()


def big_checkpoint(path: Path) -> Path:
    """A file bigger than several multipart parts (8 MiB), with an odd-sized tail."""
    rng = np.random.default_rng(7)
    params = [("a.weight", np.dtype(ml_dtypes.bfloat16), (4096, 2304)), ("b.bias", np.dtype(np.float32), (1001,)),
              ("c.weight", np.dtype(np.float32), (1024, 1536))]
    writer = SafetensorsWriter(path, params)
    for name, dtype, shape in params:
        writer.write(name, rng.standard_normal(shape).astype(dtype))
    writer.close()
    return path


def test_multipart_uploads_and_column_reads(bucket, tmp_path):
    src = big_checkpoint(tmp_path / "big" / "model.safetensors")
    layout = tmp_path / "cols.yaml"
    layout.write_text("mesh: {mp: 4}\nparams:\n  - {match: '.*weight', spec: [null, mp]}\n"
                      "  - {match: '.*', spec: []}\n")
    bucket.upload(src.parent, "big")
    jr.convert(bucket.url("big"), bucket.url("cols"), dst_layout=str(layout))
    jr.convert(src, tmp_path / "cols", dst_layout=str(layout))
    bucket.download("cols", tmp_path / "dl")
    assert tree(tmp_path / "dl") == tree(tmp_path / "cols")
    jr.convert(bucket.url("cols"), bucket.url("whole"))
    assert bucket.get("whole/rank_0/checkpoint_0.safetensors") == src.read_bytes()


def test_ckpt_records_are_indexed_remotely(llama, bucket, tmp_path):
    jr.convert(llama, tmp_path / "ms", dst_layout=DP2MP4, output_format="ckpt")
    bucket.upload(tmp_path / "ms", "ms")
    jr.convert(bucket.url("ms"), tmp_path / "from_s3", output_format="safetensors")
    jr.convert(tmp_path / "ms", tmp_path / "from_disk", output_format="safetensors")
    assert tree(tmp_path / "from_s3") == tree(tmp_path / "from_disk")


def test_an_existing_output_needs_overwrite_which_removes_what_the_new_one_lacks(llama, bucket, tmp_path):
    jr.convert(llama, bucket.url("o"), dst_layout=DP2MP4)
    rank_files = [k for k in bucket.keys("o") if "/rank_" in k]
    assert len(rank_files) == 8
    with pytest.raises(OutputExistsError, match=r"s3://.*/o: already holds an output; pass --overwrite"):
        jr.convert(llama, bucket.url("o"))
    jr.convert(llama, bucket.url("o"), overwrite=True, hf=True)  # a merge replaces the 8-rank split
    assert sorted(k.split("/", 1)[1] for k in bucket.keys("o")) == [MANIFEST_NAME, "model.safetensors"]


def test_a_prefix_without_manifest_is_incomplete(llama, bucket):
    bucket.put("half/rank_0/checkpoint_0.safetensors", b"x" * 10)
    with pytest.raises(OutputExistsError, match=r"1 objects but no jaxreshard.manifest.json"):
        jr.convert(llama, bucket.url("half"))


def test_one_writer_per_destination(llama, bucket):
    bucket.put("busy/.jaxreshard.lock", b"{}")
    with pytest.raises(RemoteError, match=r"s3://.*/busy: another jaxreshard run is writing it"):
        jr.convert(llama, bucket.url("busy"))
    assert bucket.keys("busy") == ["busy/.jaxreshard.lock"]  # the other run's lock is left alone


def test_load_from_s3_equals_load_from_disk(llama, bucket):
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    bucket.upload(llama.parent, "src")
    mesh = jax.make_mesh((8,), ("mp",))
    names = {"model.embed_tokens.weight": PartitionSpec(None, "mp"), "model.norm.weight": PartitionSpec()}
    target = {n: NamedSharding(mesh, spec) for n, spec in names.items()}
    local = jr.load(llama, target, strict=False)
    remote = jr.load(bucket.url("src"), target, strict=False)
    for name in names:
        assert remote[name].sharding == target[name]
        assert np.array_equal(np.asarray(remote[name]), np.asarray(local[name]))


def test_ranks_runs_share_an_s3_destination(llama, bucket, tmp_path):
    jr.convert(llama, tmp_path / "whole", dst_layout=DP2MP4)
    jr.convert(llama, bucket.url("shared"), dst_layout=DP2MP4, ranks="4-7")  # like a second node, first
    assert not [k for k in bucket.keys("shared") if "/rank_0/" in k]
    jr.convert(llama, bucket.url("shared"), dst_layout=DP2MP4, ranks="0-3")
    bucket.download("shared", tmp_path / "dl")
    assert tree(tmp_path / "dl") == tree(tmp_path / "whole")
    jr.verify(bucket.url("shared"))
    with pytest.raises(OutputExistsError, match=r"rank_2.* already exist; pass --overwrite"):
        jr.convert(llama, bucket.url("shared"), dst_layout=DP2MP4, ranks="2")
    jr.convert(llama, bucket.url("shared"), dst_layout=DP2MP4, ranks="2", overwrite=True)
    jr.verify(bucket.url("shared"))
    assert not [k for k in bucket.keys("shared") if "lock" in k]


def test_a_ranks_run_waits_for_no_one_but_refuses_overlapping_ranks(llama, bucket):
    bucket.put("busy/.jaxreshard.lock-otherhost-1-ab", json.dumps({"ranks": [3, 4], "group": None}).encode())
    jr.convert(llama, bucket.url("busy"), dst_layout=DP2MP4, ranks="0-2")  # disjoint: goes ahead
    with pytest.raises(RemoteError, match=r"lock object s3://.*/busy/.jaxreshard.lock-otherhost-1-ab exists"):
        jr.convert(llama, bucket.url("busy"), dst_layout=DP2MP4, ranks="4-5")
    with pytest.raises(RemoteError, match=r"lock object .*lock-otherhost-1-ab exists, for the whole output"):
        jr.convert(llama, bucket.url("busy"), dst_layout=DP2MP4, overwrite=True)


def test_worker_processes_read_an_s3_source_from_the_store(llama, bucket, tmp_path):
    """--workers 2 spawns processes: they must read the source's bytes from the store too, never the view's holes
    (the review found zeros in every rank file before the workers mounted their parent's views)."""
    bucket.upload(llama.parent, "src")
    jr.convert(llama, tmp_path / "local", dst_layout=DP2MP4)
    jr.convert(bucket.url("src"), tmp_path / "two", dst_layout=DP2MP4, process_num=2)
    assert tree(tmp_path / "two") == tree(tmp_path / "local")


def test_a_failed_run_removes_the_files_it_uploaded(llama, bucket, monkeypatch):
    """Rank files complete their uploads before the manifest; a run failing in between takes them back, so the
    prefix never holds rank files that a reader could take for an output."""
    from jaxreshard import run

    def broken(*args, **kwargs):
        raise OSError("the disk holding the manifest failed")

    monkeypatch.setattr(run, "write_manifest", broken)
    with pytest.raises(OSError, match="manifest failed"):
        jr.convert(llama, bucket.url("failed"), dst_layout=DP2MP4)
    assert bucket.keys("failed") == [] and bucket.multipart_uploads() == []


def test_views_of_killed_runs_are_removed(llama, bucket, tmp_path, monkeypatch):
    import subprocess
    import sys
    import tempfile

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)  # read TMPDIR again
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = tmp_path / f"jaxreshard-dst-{int(dead.stdout)}-abcd"
    (orphan / "out").mkdir(parents=True)
    (orphan / "out" / "spool.safetensors").write_bytes(b"x" * 100)
    jr.convert(llama, bucket.url("o"), dst_layout=DP2MP4)
    assert not orphan.exists()
    assert not list(tmp_path.glob("jaxreshard-*"))  # nor is anything of this run left


def test_a_folder_inside_an_output_being_written_is_refused(llama, bucket):
    jr.convert(llama, bucket.url("out"), dst_layout=DP2MP4)
    bucket.put("out/.jaxreshard.lock-otherhost-7-ab", b"{}")  # another host is rewriting some ranks
    with pytest.raises(RemoteError, match=r"out/rank_0: is being written .*out/\.jaxreshard\.lock-otherhost-7-ab"):
        jr.convert(bucket.url("out/rank_0"), bucket.url("copy"))


def test_log_lines_name_urls_not_views(llama, bucket, caplog):
    import logging

    from jaxreshard import remote

    @remote.views(sources=("src",))
    def probe(src):
        logging.getLogger("jaxreshard.probe").warning("%s: two candidates, using the last", src / "model.safetensors")
        return str(src)

    bucket.upload(llama.parent, "src")
    with caplog.at_level(logging.INFO, logger="jaxreshard"):
        view = probe(bucket.url("src"))
    assert "jaxreshard-src-" in view  # the function saw the local view...
    assert [r.getMessage() for r in caplog.records if r.name == "jaxreshard.probe"] == [
        f"{bucket.url('src')}/model.safetensors: two candidates, using the last"]  # ...its log names the URL


@pytest.mark.parametrize("same_namespace", [True, False])
def test_a_dead_runs_lock_is_removed_only_from_its_own_pid_namespace(llama, bucket, same_namespace):
    import os
    import socket
    import subprocess
    import sys

    from jaxreshard.remote.locks import _pid_namespace

    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    namespace = _pid_namespace() if same_namespace else -1  # another container with this host name
    bucket.put("o/.jaxreshard.lock", json.dumps({"host": socket.gethostname(), "pid": dead,
                                                 "pid_namespace": namespace}).encode())
    if same_namespace:
        jr.convert(llama, bucket.url("o"), dst_layout=DP2MP4)
        assert not [k for k in bucket.keys("o") if "lock" in k]
    else:
        with pytest.raises(RemoteError, match=r"another jaxreshard run is writing it"):
            jr.convert(llama, bucket.url("o"), dst_layout=DP2MP4)
    assert os.getpid() != dead
