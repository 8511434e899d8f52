"""The README's "Object storage" example, run as written against the test S3 server (its bucket `ckpts` is this
test's bucket; the install and `export` lines are what the fixtures already did)."""

from __future__ import annotations

import shlex
from pathlib import Path

from jaxreshard.cli import main
from jaxreshard.formats.manifest import MANIFEST_NAME
from tests.test_readme_examples import readme_blocks


def readme_commands(section: str) -> list[list[str]]:
    (block,) = [b for b in readme_blocks() if b.section == section and b.lang == "bash"]
    lines = block.text.replace("\\\n", " ").splitlines()
    return [shlex.split(line, comments=True) for line in lines if line.startswith("jaxreshard ")]


def test_readme_object_storage_block_runs(llama, bucket, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(Path(__file__).resolve().parents[2] / "configs")
    bucket.upload(llama.parent, "llama/step-1000")
    commands = readme_commands("Object storage")
    assert [c[:2] for c in commands] == [["jaxreshard", "convert"]] * 2 + [["jaxreshard", "verify"]]
    for argv in commands:
        argv = [a.replace("s3://ckpts/", bucket.url() + "/") for a in argv[1:]]
        assert main(argv) == 0, argv
    assert (tmp_path / "merged" / MANIFEST_NAME).is_file()
    assert len([k for k in bucket.keys("llama/step-1000-dp2mp4") if k.endswith(".safetensors")]) == 8
    assert (tmp_path / "merged" / "rank_0" / "checkpoint_0.safetensors").read_bytes() == llama.read_bytes()
