"""`--resume`: a conversion killed with SIGKILL midway is finished by a rerun that keeps the rank files the
killed run completed (checked again) and writes the rest; the result equals an uninterrupted run's bytes."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from jaxreshard.cli import main
from jaxreshard.formats.manifest import MANIFEST_NAME, read_manifest
from jaxreshard.resume import JOURNAL

ROOT = Path(__file__).resolve().parents[1]
LAYOUT = ROOT / "configs" / "layouts" / "llama_dp2mp2pp2.yaml"

# the real CLI in a child process that SIGKILLs itself right after its `KILL_AFTER`-th rank file is complete
KILLER = textwrap.dedent("""
    import os, signal, sys
    import jaxreshard.run as run
    real, done = run.execute, [0]

    def execute(plan, dst_dir, make_writer, *, on_file=lambda r, x: None, **options):
        def on_file_then_die(rel, record):
            on_file(rel, record)
            done[0] += 1
            if done[0] == int(os.environ["KILL_AFTER"]):
                os.kill(os.getpid(), signal.SIGKILL)
        return real(plan, dst_dir, make_writer, on_file=on_file_then_die, **options)

    run.execute = execute
    from jaxreshard.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != MANIFEST_NAME}


def partials(dst: Path) -> list[Path]:
    return sorted(p for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}.partial-"))


def killed_run(src: Path, dst: Path, kill_after: int) -> Path:
    """Run a conversion that dies after `kill_after` complete rank files; returns its temporary folder."""
    env = {**os.environ, "KILL_AFTER": str(kill_after), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", KILLER, "convert", "--src", str(src), "--dst", str(dst),
                           "--dst-layout", str(LAYOUT), "-q"], env=env, cwd=ROOT, timeout=300, check=False)
    assert proc.returncode == -signal.SIGKILL
    assert not dst.exists()
    (tmp,) = partials(dst)
    return tmp


def journaled(tmp: Path) -> list[str]:
    return [json.loads(line)["file"] for line in (tmp / JOURNAL).read_text().splitlines()[1:]]


@pytest.fixture(scope="module")
def reference(llama, tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("ref") / "out"
    assert main(["convert", "--src", str(llama), "--dst", str(dst), "--dst-layout", str(LAYOUT), "-q"]) == 0
    return dst


def test_resume_after_sigkill_keeps_complete_files_and_equals_an_uninterrupted_run(tmp_path, llama, reference,
                                                                                  caplog):
    dst = tmp_path / "out"
    tmp = killed_run(llama, dst, kill_after=4)  # the first pipeline stage's 4 ranks are complete
    done = journaled(tmp)
    assert len(done) == 4
    kept = {f: (tmp / f).stat().st_ino for f in done}
    caplog.set_level("INFO")
    assert main(["convert", "--src", str(llama), "--dst", str(dst), "--dst-layout", str(LAYOUT), "--resume"]) == 0
    assert tree(dst) == tree(reference)
    assert {f: (dst / f).stat().st_ino for f in done} == kept  # the very files of the killed run, not rewritten
    assert "kept 4 of 8 rank files" in caplog.text
    assert read_manifest(dst).files == read_manifest(reference).files
    assert partials(dst) == []
    assert not (dst / JOURNAL).exists()


def test_a_damaged_journaled_file_is_written_again(tmp_path, llama, reference, caplog):
    dst = tmp_path / "out"
    tmp = killed_run(llama, dst, kill_after=4)
    victim = tmp / journaled(tmp)[0]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes: only the checksum can tell
    victim.write_bytes(bytes(data))
    caplog.set_level("INFO")
    assert main(["convert", "--src", str(llama), "--dst", str(dst), "--dst-layout", str(LAYOUT), "--resume"]) == 0
    assert tree(dst) == tree(reference)
    assert "is damaged; it is written again" in caplog.text
    assert "kept 3 of 8 rank files" in caplog.text


def test_resume_ignores_an_interrupted_run_of_another_conversion(tmp_path, llama, reference, caplog):
    dst = tmp_path / "out"
    killed_run(llama, dst, kill_after=4)
    caplog.set_level("INFO")
    other = ROOT / "configs" / "layouts" / "llama_dp8.yaml"
    assert main(["convert", "--src", str(llama), "--dst", str(dst), "--dst-layout", str(other), "--resume"]) == 0
    assert "no interrupted run of this conversion" in caplog.text
    assert len(list(dst.glob("rank_*"))) == 8


def test_resume_with_nothing_to_resume_converts_everything(tmp_path, llama, reference):
    dst = tmp_path / "out"
    assert main(["convert", "--src", str(llama), "--dst", str(dst), "--dst-layout", str(LAYOUT), "--resume"]) == 0
    assert tree(dst) == tree(reference)


def test_a_running_owner_is_never_robbed(tmp_path, llama, caplog):
    """A temporary folder of a live run (this process, by the pid in its name) is not adopted."""
    from jaxreshard import fsutil, resume
    from jaxreshard.api import output_of, plan_conversion

    dst = tmp_path / "out"
    killed_run(llama, dst, kill_after=4)
    (dead,) = partials(dst)
    live = fsutil.partial_dir(dst)
    os.rmdir(live)
    dead.rename(live)  # the same journaled files, now owned by a running process
    job = plan_conversion(llama, dst_layout=LAYOUT)
    caplog.set_level("INFO")
    assert resume.adopt(dst, resume.plan_key(job.plan, output_of(job)), job.plan) is None
    assert "no interrupted run of this conversion" in caplog.text
    assert len(journaled(live)) == 4


# the parent of a --process-num 2 run SIGKILLs itself once its first block of ranks is reported complete
KILL_PARENT = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from jaxreshard.api import output_of, plan_conversion
    from jaxreshard.run import run_plan

    def on_bytes(n, param=None):
        if n:  # a whole block's bytes: its worker has finished and journaled its files
            os.kill(os.getpid(), signal.SIGKILL)

    src, dst, layout = sys.argv[1:]
    job = plan_conversion(src, dst_layout=layout)
    run_plan(job.plan, Path(dst), output_of(job), overwrite=False, some_ranks=False, process_num=2,
             on_bytes=on_bytes)
""")


def test_resume_after_the_parent_of_worker_processes_is_killed(tmp_path, llama, caplog):
    flat = ROOT / "configs" / "layouts" / "llama_dp2mp4.yaml"
    reference = tmp_path / "ref"
    assert main(["convert", "--src", str(llama), "--dst", str(reference), "--dst-layout", str(flat), "-q"]) == 0
    dst = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", KILL_PARENT, str(llama), str(dst), str(flat)], env=env, cwd=ROOT,
                          timeout=300, check=False)
    assert proc.returncode == -signal.SIGKILL
    (tmp,) = partials(dst)
    assert len(journaled(tmp)) >= 4  # at least the finished block's four ranks
    caplog.set_level("INFO")
    assert main(["convert", "--src", str(llama), "--dst", str(dst), "--dst-layout", str(flat), "--resume",
                 "--process-num", "2"]) == 0
    assert tree(dst) == tree(reference)
    assert "rank files from" in caplog.text and "kept 0 of" not in caplog.text


# a single-process run of a flat layout (every rank file completes only at the end), SIGKILLed after its
# `KILL_AFTER`-th progress record (fsynced files + how far they are written), with records every 64 KiB
KILL_MIDWAY = textwrap.dedent("""
    import os, signal, sys
    import jaxreshard.execute as ex
    import jaxreshard.run as run
    ex.PROGRESS_BYTES = 64 << 10
    real, done = run.execute, [0]

    def execute(plan, dst_dir, make_writer, *, on_progress=None, **options):
        def record_then_die(skip, states):
            on_progress(skip, states)
            done[0] += 1
            if done[0] == int(os.environ["KILL_AFTER"]):
                os.kill(os.getpid(), signal.SIGKILL)
        return real(plan, dst_dir, make_writer, on_progress=record_then_die if on_progress else None, **options)

    run.execute = execute
    from jaxreshard.cli import main
    sys.exit(main(sys.argv[1:]))
""")
FLAT = ROOT / "configs" / "layouts" / "llama_dp2mp4.yaml"


@pytest.fixture(scope="module")
def flat_reference(llama, tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("flat") / "out"
    assert main(["convert", "--src", str(llama), "--dst", str(dst), "--dst-layout", str(FLAT), "-q"]) == 0
    return dst


def killed_midway(src: Path, dst: Path) -> Path:
    env = {**os.environ, "KILL_AFTER": "3", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", KILL_MIDWAY, "convert", "--src", str(src), "--dst", str(dst),
                           "--dst-layout", str(FLAT), "-q"], env=env, cwd=ROOT, timeout=300, check=False)
    assert proc.returncode == -signal.SIGKILL
    (tmp,) = partials(dst)
    return tmp


def test_a_single_process_run_is_continued_from_its_last_progress_record(tmp_path, llama, flat_reference, caplog):
    dst = tmp_path / "out"
    tmp = killed_midway(llama, dst)
    last = json.loads((tmp / JOURNAL).read_text().splitlines()[-1])
    assert 0 < last["progress"] < 40 and len(last["files"]) == 8  # stopped midway, nothing complete yet
    inodes = {f: (tmp / f).stat().st_ino for f in last["files"]}
    caplog.set_level("INFO")
    assert main(["convert", "--src", str(llama), "--dst", str(dst), "--dst-layout", str(FLAT), "--resume"]) == 0
    assert tree(dst) == tree(flat_reference)
    assert read_manifest(dst).files == read_manifest(flat_reference).files
    assert f"continuing 8 rank files after parameter {last['progress']} of" in caplog.text
    assert {f: (dst / f).stat().st_ino for f in inodes} == inodes  # continued in place, not rewritten


def test_a_damaged_partial_file_restarts_the_unfinished_ranks(tmp_path, llama, flat_reference, caplog):
    dst = tmp_path / "out"
    tmp = killed_midway(llama, dst)
    victim = tmp / "rank_5" / "checkpoint_5.safetensors"
    with open(victim, "r+b") as f:
        f.seek(200)
        byte = f.read(1)
        f.seek(200)
        f.write(bytes([byte[0] ^ 0x01]))
    caplog.set_level("INFO")
    assert main(["convert", "--src", str(llama), "--dst", str(dst), "--dst-layout", str(FLAT), "--resume"]) == 0
    assert tree(dst) == tree(flat_reference)
    assert "rank_5/checkpoint_5.safetensors of the interrupted run is damaged" in caplog.text
    assert "continuing" not in caplog.text


def test_adopted_files_survive_a_run_that_dies_before_using_them(tmp_path, llama, reference, caplog):
    """The folder holding adopted files carries its own journal: if the adopting run dies too (SIGKILLed right
    after adopting), the next --resume adopts them from there."""
    dst = tmp_path / "out"
    killed_run(llama, dst, kill_after=4)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", ADOPT_THEN_DIE, str(llama), str(dst), str(LAYOUT)], env=env,
                          cwd=ROOT, timeout=300, check=False, capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    held = json.loads(proc.stdout)
    assert len(held["files"]) == 4
    assert partials(dst) == [Path(held["dir"])]  # the first run's folder is gone, the dead adopter's is left
    assert sorted(journaled(Path(held["dir"]))) == held["files"]
    caplog.set_level("INFO")
    assert main(["convert", "--src", str(llama), "--dst", str(dst), "--dst-layout", str(LAYOUT), "--resume"]) == 0
    assert f"kept 4 of 8 rank files from {Path(held['dir']).name}" in caplog.text
    assert tree(dst) == tree(reference)
    assert partials(dst) == []


# a run that adopts an interrupted run's files (`resume.adopt`, as `convert --resume` does first), then is
# SIGKILLed before using them
ADOPT_THEN_DIE = textwrap.dedent("""
    import json, os, signal, sys
    from jaxreshard import resume
    from jaxreshard.api import output_of, plan_conversion

    src, dst, layout = sys.argv[1:]
    job = plan_conversion(src, dst_layout=layout)
    held = resume.adopt(dst, resume.plan_key(job.plan, output_of(job)), job.plan)
    print(json.dumps({"dir": str(held.dir), "files": sorted(held.files)}), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
""")
