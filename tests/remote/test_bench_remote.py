"""tools/bench/remote.py's own parts, on the test server: its floors read every byte of every object once and
write the copies they say (to the bucket or to local files), and a failing step becomes a reported row, not a crash."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

MIB = 1 << 20
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def remote_bench():
    spec = importlib.util.spec_from_file_location("bench_remote", REPO / "tools" / "bench" / "remote.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    path, modules = list(sys.path), set(sys.modules)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path[:] = path  # the script puts the repository and tools/bench first on sys.path
        for name in ("bench", spec.name):
            if name not in modules:
                sys.modules.pop(name, None)


def test_floor_downloads_every_byte_and_uploads_the_copies(remote_bench, bucket, host_env):
    sizes = {"src/a.safetensors": 3 * MIB + 5, "src/sub/b.bin": 100, "src/empty": 0}
    for key, size in sizes.items():
        bucket.put(key, os.urandom(size))
    bucket.put("srcx/not-read", b"z" * 50)
    cmd = [sys.executable, "-c", remote_bench.FLOOR_TRANSFER, bucket.name, "src", "-", str(MIB), "4", "2"]
    wall, rss = remote_bench.measure(cmd, host_env())
    assert wall > 0 and rss > 0
    uploaded = bucket.sizes("floor")
    for copy in (0, 1):  # every range of every object under src/, once per copy, and nothing else
        mine = {k: v for k, v in uploaded.items() if k.startswith(f"floor/{copy}/")}
        assert sum(mine.values()) == sum(sizes.values())
        assert len(mine) == 4 + 1  # a: 4 ranges of <= 1 MiB; b: 1; the empty object: none
    assert len(uploaded) == 10


def test_floor_writes_local_copies_of_every_object(remote_bench, bucket, host_env, tmp_path):
    objects = {"src/a.safetensors": os.urandom(2 * MIB + 9), "src/sub/b.bin": os.urandom(100), "src/empty": b""}
    for key, data in objects.items():
        bucket.put(key, data)
    cmd = [sys.executable, "-c", remote_bench.FLOOR_TRANSFER, bucket.name, "src", str(tmp_path / "out"), str(MIB),
           "3", "2"]
    remote_bench.measure(cmd, host_env())
    written = {p.relative_to(tmp_path / "out").as_posix(): p.read_bytes()
               for p in (tmp_path / "out").rglob("*") if p.is_file()}
    assert written == {f"{copy}/{key}": data for copy in (0, 1) for key, data in objects.items()}
    assert bucket.keys("floor") == []  # nothing uploaded


def test_floor_refuses_a_prefix_with_nothing_under_it(remote_bench, bucket, host_env):
    with pytest.raises(RuntimeError, match="floor read 0 of 0 bytes under nothing/"):
        remote_bench.measure([sys.executable, "-c", remote_bench.FLOOR_TRANSFER, bucket.name, "nothing", "-",
                              "1024", "2", "0"], host_env())


def test_a_failing_step_is_a_row_with_its_last_line(remote_bench, host_env):
    cmd = [sys.executable, "-c", "import sys; print('progress'); print('jaxreshard: error: s3://b/x: boom'); "
                                 "sys.exit(2)"]
    row = remote_bench.step(remote_bench.Row("jaxreshard s3 -> s3"), cmd, host_env(), repeat=1)
    assert row.wall is None
    assert row.error == "jaxreshard: error: s3://b/x: boom (exit 2)"
