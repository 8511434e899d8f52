"""Fault injection: kills at named instants of a write and of its commit, concurrent runs, a full disk, a dead
worker; then the invariants: the destination is the old output or the new one (never missing, never half), a
rerun completes byte-identically, and no temporary is left after it (the rerun says which it removed).

Kills use the `JAXRESHARD_FAULT=<point>[@n][:SIGNAL]` hook (the process signals itself at a named point) and a
timed SIGKILL. Subprocesses are started together and awaited together, so the file costs a few seconds."""

from __future__ import annotations

import errno
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jaxreshard.cli import main
from jaxreshard.fsutil import FAULT_ENV, atomic_output

from .helpers import tree
from .test_dstlock import REPO, start_holder, stop

LAYOUT = "configs/layouts/llama_dp2mp4.yaml"
OLD_LAYOUT = "configs/layouts/llama_dp8.yaml"
ENV = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu",
       "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}

SCRIPT = """
import sys
from pathlib import Path
from jaxreshard import fsutil
if sys.argv[3] == "fallback":
    def unsupported(*args):
        raise fsutil._Unsupported
    fsutil._renameat2 = unsupported
with fsutil.atomic_output(Path(sys.argv[1]), overwrite=sys.argv[2] == "1") as tmp:
    for r in range(4):
        (tmp / f"rank_{r}").mkdir()
        (tmp / f"rank_{r}" / "f.bin").write_bytes(b"new%d" % r * 1000)
"""
NEW = {f"rank_{r}/f.bin": b"new%d" % r * 1000 for r in range(4)}
OLD = {"rank_0/old.bin": b"old" * 1000}


def temporaries(dst: Path) -> list[str]:
    return sorted(p.name for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}."))


def spawn(argv: list[str], fault: str | None) -> subprocess.Popen:
    env = {**ENV, FAULT_ENV: fault} if fault else ENV
    return subprocess.Popen([sys.executable, *argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def rerun_removes_stale(caplog, argv: list[str]) -> str:
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert main(argv) == 0
    return caplog.text


# (name, fault, overwrite, mode, state after the kill: "old" / "new" / "absent", a stale temporary left?)
COMMIT_KILLS = [
    ("fresh-before-commit", "before-commit", False, "", "absent", True),
    ("locked", "locked", True, "", "old", False),
    ("before-commit", "before-commit", True, "", "old", True),
    ("between-swap-and-removal", "commit-swapped", True, "", "new", True),
    ("before-commit-term", "before-commit:TERM", True, "", "old", True),  # plain script: TERM kills
    ("fallback-between-renames", "commit-moved-old", True, "fallback", "absent", True),
]


def test_kills_during_the_commit_leave_old_or_new(tmp_path, caplog):
    """`atomic_output` in a small script killed at each step of its commit (no JAX: fast)."""
    procs = {}
    for name, fault, overwrite, mode, _, _ in COMMIT_KILLS:
        dst = tmp_path / name / "out"
        dst.parent.mkdir()
        if overwrite:
            (dst / "rank_0").mkdir(parents=True)
            (dst / "rank_0" / "old.bin").write_bytes(OLD["rank_0/old.bin"])
        procs[name] = spawn(["-c", SCRIPT, str(dst), "1" if overwrite else "0", mode or "-"], fault)
    for proc in procs.values():  # every pipe closed before anything is asserted
        proc.communicate(timeout=60)
    for name, _fault, _overwrite, mode, state, stale in COMMIT_KILLS:
        proc = procs[name]
        dst = tmp_path / name / "out"
        assert proc.returncode in (-signal.SIGKILL, -signal.SIGTERM), (name, proc.returncode)
        assert (tree(dst) if dst.exists() else None) == {"old": OLD, "new": NEW, "absent": None}[state], name
        assert bool([t for t in temporaries(dst) if ".lock" not in t]) == stale, (name, temporaries(dst))
        if mode == "fallback":  # the documented gap of the two-step fallback: the old output waits next to it
            (old,) = [p for p in dst.parent.iterdir() if ".out.old-" in p.name]
            assert tree(old) == OLD
            continue
        left = [t for t in temporaries(dst) if ".lock" not in t]
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            with atomic_output(dst, overwrite=True) as tmp:
                for path, data in NEW.items():
                    (tmp / path).parent.mkdir(exist_ok=True)
                    (tmp / path).write_bytes(data)
        assert tree(dst) == NEW
        assert temporaries(dst) == [], name
        assert all(t in caplog.text for t in left) and ("removed" in caplog.text) == bool(left), name


def _args(src: Path, dst: Path, *extra: str) -> list[str]:
    return ["convert", "-q", "--src", str(src), "--dst", str(dst), "--dst-layout", LAYOUT, *extra]


@pytest.fixture(scope="module")
def reference(llama, tmp_path_factory) -> dict[str, bytes]:
    """The uninterrupted conversion every rerun must reproduce byte for byte."""
    dst = tmp_path_factory.mktemp("ref") / "out"
    assert main(_args(llama, dst)) == 0
    return tree(dst)


def _old_output(llama: Path, dst: Path) -> dict[str, bytes]:
    assert main(["convert", "-q", "--src", str(llama), "--dst", str(dst), "--dst-layout", OLD_LAYOUT]) == 0
    return tree(dst)


def test_kills_of_a_real_conversion(llama, reference, tmp_path, caplog):
    """`python -m jaxreshard convert` killed mid-write, mid-commit, by SIGTERM, and at a random instant."""
    cases = {  # name: (fault, --overwrite of an old output?, extra args)
        "term-mid-write": ("param-written@3:TERM", False, []),
        "kill-after-some-files": ("file-closed@3", True, []),
        "kill-between-swap-and-removal": ("commit-swapped", True, []),
        "kill-after-two-rank-folders": ("folder-committed@2", False, ["--ranks", "0-3"]),
        "kill-at-a-random-instant": (None, True, []),
        "term-before-the-swap": ("before-commit:TERM", True, []),
    }
    old, procs = {}, {}
    for name, (fault, overwrite, extra) in cases.items():
        dst = tmp_path / name / "out"
        dst.parent.mkdir()
        old[name] = _old_output(llama, dst) if overwrite else None
        argv = ["-m", "jaxreshard", *_args(llama, dst, *extra), *(["--overwrite"] if overwrite else [])]
        procs[name] = spawn(argv, fault)
    random_dst = tmp_path / "kill-at-a-random-instant" / "out"
    deadline = time.monotonic() + 60
    while not any(".partial-" in t for t in temporaries(random_dst)) and procs["kill-at-a-random-instant"].poll() \
            is None and time.monotonic() < deadline:
        time.sleep(0.01)
    procs["kill-at-a-random-instant"].kill()
    results = {name: (proc.communicate(timeout=120), proc.returncode) for name, proc in procs.items()}

    (_, err), code = results["term-mid-write"]
    assert code == 143 and err.strip() == "jaxreshard: interrupted by SIGTERM; this run's temporary files were removed"
    assert not (tmp_path / "term-mid-write" / "out").exists() and temporaries(tmp_path / "term-mid-write" / "out") == []
    assert results["kill-after-some-files"][1] == -signal.SIGKILL
    assert tree(tmp_path / "kill-after-some-files" / "out") == old["kill-after-some-files"]
    assert tree(tmp_path / "kill-between-swap-and-removal" / "out") == reference
    ranks_dst = tmp_path / "kill-after-two-rank-folders" / "out"
    assert tree(ranks_dst) == {k: v for k, v in reference.items() if k.split("/")[0] in ("rank_0", "rank_1")}
    assert tree(random_dst) in (old["kill-at-a-random-instant"], reference)
    (_, err), code = results["term-before-the-swap"]
    assert code == 143 and "interrupted by SIGTERM" in err
    assert tree(tmp_path / "term-before-the-swap" / "out") == old["term-before-the-swap"]
    assert temporaries(tmp_path / "term-before-the-swap" / "out") == []

    for name, (_fault, _overwrite, extra) in cases.items():
        dst = tmp_path / name / "out"
        stale = [t for t in temporaries(dst) if ".partial-" in t or ".old-" in t]
        ranks = ["--ranks", "2-3"] if extra else []  # the killed --ranks run committed rank_0 and rank_1
        log = rerun_removes_stale(caplog, _args(llama, dst, *ranks, "--overwrite"))
        if extra:
            assert main(_args(llama, dst, "--ranks", "4-7")) == 0
        assert tree(dst) == reference, name
        assert temporaries(dst) == [], name
        assert all(t in log for t in stale) and ("removed" in log) == bool(stale), (name, stale, log)


def test_real_runs_at_once_on_one_destination(llama, reference, tmp_path):
    """Two whole runs on one destination: one wins, the other exits 2 (never both 0, never a mixed output);
    two disjoint --ranks runs: both succeed and together make the whole output."""
    same, shared = tmp_path / "same" / "out", tmp_path / "shared" / "out"
    procs = [spawn(["-m", "jaxreshard", *_args(llama, same)], None) for _ in range(2)]
    procs += [spawn(["-m", "jaxreshard", *_args(llama, shared, "--ranks", r)], None) for r in ("0-3", "4-7")]
    results = [(proc.communicate(timeout=120), proc.returncode) for proc in procs]
    (_, err0), code0 = results[0]
    (_, err1), code1 = results[1]
    assert sorted([code0, code1]) == [0, 2], (err0, err1)
    loser = err1 if code1 else err0
    assert loser.startswith("jaxreshard: error:") and ("is writing this destination" in loser
                                                       or "already exists and is not empty" in loser), loser
    assert tree(same) == reference and temporaries(same) == []
    assert [code for _, code in results[2:]] == [0, 0], results[2:]
    assert tree(shared) == reference and temporaries(shared) == []


def test_a_second_run_on_a_held_destination_exits_2_naming_the_holder(llama, reference, tmp_path, capsys):
    dst = tmp_path / "out"
    holder = start_holder(dst.resolve())
    try:
        assert main(_args(llama, dst)) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("jaxreshard: error:") and f"process {holder.pid}" in err and str(dst) in err
        assert not dst.exists()
    finally:
        stop(holder)


def test_disjoint_ranks_runs_share_a_destination(llama, reference, tmp_path, capsys):
    dst = tmp_path / "out"
    holder = start_holder(dst, "0,1,2,3")  # another node writing ranks 0-3 of the same destination
    try:
        assert main(_args(llama, dst, "--ranks", "4-7")) == 0
        assert main(_args(llama, dst, "--ranks", "3-4", "--overwrite")) == 2
        assert f"process {holder.pid}" in capsys.readouterr().err
    finally:
        stop(holder)
    assert main(_args(llama, dst, "--ranks", "0-3")) == 0
    assert tree(dst) == reference


def test_a_full_disk_is_a_write_error_naming_the_file(llama, tmp_path, monkeypatch, capsys):
    from jaxreshard.formats import safetensors_io

    def full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(safetensors_io.os, "pwritev", full)  # formats.base.pwrite_all writes with pwritev
    dst = tmp_path / "out"
    assert main(_args(llama, dst)) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("jaxreshard: error: writing rank_0/checkpoint_0.safetensors failed: No space left on device; "
                   "free space (or quota) or choose another destination")
    assert not dst.exists() and temporaries(dst) == []


def test_a_dead_worker_fails_the_run_naming_its_ranks(llama, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(FAULT_ENV, "param-written")  # each worker kills itself after its first parameter
    dst = tmp_path / "out"
    assert main(_args(llama, dst, "--process-num", "2")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("jaxreshard: error: a --process-num worker died") and "ranks 0-3" in err, err
    assert "nothing was committed" in err
    assert not dst.exists() and temporaries(dst) == []
    unified = tmp_path / "unified"
    assert main(["unify", "--src", str(llama), "--dst", str(unified), "--max-file-size", "200KB",
                 "--process-num", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("jaxreshard: error: a --process-num worker died") and "part files ['model-0000" in err, err
    assert not unified.exists() and temporaries(unified) == []


def test_a_full_disk_under_an_orbax_output_is_a_write_error(llama, tmp_path, monkeypatch, capsys):
    """orbax (tensorstore) reports ENOSPC as a ValueError; it was a traceback (exit 1)."""
    import logging

    import orbax.checkpoint.experimental.v1 as ocp

    def full(path, *args, **kwargs):
        raise ValueError(f'RESOURCE_EXHAUSTED: Failed writing: "{path}/d/0": No space left on device '
                         "[os_error_code='28']")

    monkeypatch.setattr(ocp.partial, "save", full)
    dst = tmp_path / "out"
    assert main(["convert", "-q", "--src", str(llama), "--dst", str(dst), "--output-format", "orbax"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"jaxreshard: error: writing the orbax checkpoint {tmp_path}/.out.partial-") and \
        err.endswith("No space left on device [os_error_code='28']; free space (or quota) or choose another "
                     "destination") and "\n" not in err, err
    assert not dst.exists() and temporaries(dst) == []
    assert logging.getLogger("absl").level != logging.CRITICAL  # its threads' own logging is quiet only meanwhile


def _marked(marker: str) -> dict[int, str]:
    """pid -> state of every process whose environment holds `marker` (Linux /proc)."""
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "environ").read_bytes():
                    out[int(entry.name)] = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
    return out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /proc are Linux's")
def test_workers_die_with_their_parent(llama, tmp_path):
    """Workers stop themselves mid-write; SIGKILL of the parent must take them down (nobody else would)."""
    marker = f"JAXRESHARD_TEST_MARK={tmp_path.name}"
    env = {**ENV, FAULT_ENV: "param-written:STOP", marker.split("=")[0]: marker.split("=")[1]}
    proc = subprocess.Popen([sys.executable, "-m", "jaxreshard", *_args(llama, tmp_path / "out", "--process-num",
                                                                           "2")], env=env)
    try:
        deadline = time.monotonic() + 60
        while list(_marked(marker).values()).count("T") != 2:  # (the other marked ones: parent, resource tracker)
            assert time.monotonic() < deadline and proc.poll() is None, "the workers never reached their stop"
            time.sleep(0.02)
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 10
        while _marked(marker) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _marked(marker) == {}, "workers outlived their parent"
    finally:
        for pid in _marked(marker):
            os.kill(pid, signal.SIGKILL)


_IDLE_STUCK = """
import os, signal
from jaxreshard.run import worker_pool
with worker_pool(2) as pool:
    assert [pool.submit(abs, -i).result() for i in range(4)] == [0, 1, 2, 3]
    for pid in list(pool._processes):
        os.kill(pid, signal.SIGSTOP)  # idle workers that cannot take their stop message (as when one died
                                      # holding the task queue's lock)
print("stopped")
"""


def test_the_pool_ends_without_its_idle_workers_taking_a_stop_message():
    """Regression: a worker killed while idle, during the pool's shutdown, left the parent waiting forever
    (the shutdown handed each worker a stop message through the queue whose lock the dead worker held)."""
    done = subprocess.run([sys.executable, "-c", _IDLE_STUCK], env=ENV, capture_output=True, text=True, timeout=30,
                          check=False)
    assert (done.returncode, done.stdout.strip()) == (0, "stopped"), done.stderr
