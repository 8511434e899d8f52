#!/usr/bin/env python3
"""Benchmark: the same conversion (one complete safetensors checkpoint -> 8 ranks, dp2 x mp4) from a local S3
server and from local disk, against plain transfers of the same bytes (the floors), in one run.

    python tools/bench/remote.py [--size-gib 1] [--data DIR] [--endpoint URL --bucket NAME]

Without --endpoint the server is moto (the test server, tests/remote/server.py) in this process on 127.0.0.1,
made to serve ranged GETs by copying only the range (`serve_ranges_in_place`); with --endpoint (a MinIO, say) the
credentials come from the standard AWS environment. Steps, each a fresh process with wall time and peak RSS from
`os.wait4` (tools/bench/bench.py's wrapper):

- floor, download: every source object read as concurrent ranged GETs (--range-mib each, --concurrency in
  flight, obstore), into memory and discarded;
- floor, download + upload: the same, each range also PUT back as many times as the conversion writes copies
  (the s3 -> s3 floor);
- floor, download + local write: the same, each range written (pwrite) into as many local files, fsynced (the
  s3 -> local floor);
- floor, local: read the source file once, write as many bytes as the conversion writes (bench.py's floor);
- jaxreshard convert s3 -> s3, s3 -> local and local -> local (`--dst-layout configs/layouts/llama_dp2mp4.yaml`);
  each output is compared file by file (SHA-256, manifest aside) with the local -> local output.

A jaxreshard step that fails is reported as failed (with its last line of output) and the run goes on. Prints a
Markdown table with each step's ratio to its floor, and writes results.md / results.json under --data.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # noqa: E402 - tools/bench/bench.py: checkpoint generation, the wait4 wrapper, the local floor

from tests.remote import server  # noqa: E402

MIB = 1 << 20
LAYOUT = REPO / "configs" / "layouts" / "llama_dp2mp4.yaml"
SRC_NAME = "model.safetensors"

FLOOR_TRANSFER = """
import os, sys
from concurrent.futures import ThreadPoolExecutor
import obstore
from obstore.store import S3Store
bucket, prefix, dest = sys.argv[1:4]
step, concurrency, copies = map(int, sys.argv[4:7])
store = S3Store(bucket, client_options={"allow_http": True})  # endpoint and credentials from the AWS environment
objects = [o for batch in obstore.list(store, prefix=prefix + "/") for o in batch]
files = {}  # dest a folder: each object written `copies` times under dest/<copy>/<key>
for i in range(copies if dest != "-" else 0):
    for o in objects:
        out = os.path.join(dest, str(i), o["path"])
        os.makedirs(os.path.dirname(out), exist_ok=True)
        files[i, o["path"]] = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
def one(path, start, end):
    data = obstore.get_range(store, path, start=start, end=end)
    for i in range(copies):  # each range written `copies` times: PUT back to the bucket, or into local files
        if dest == "-":
            obstore.put(store, f"floor/{i}/{path}/{start}", data)
        else:
            os.pwrite(files[i, path], data, start)
    return len(memoryview(data))
# Threads calling the blocking API: each call releases the GIL while the request is in flight. (obstore's *_async
# calls under asyncio.run abort the process at exit now and then, after the work is done: SIGABRT at finalizing.)
with ThreadPoolExecutor(concurrency) as pool:
    total = sum(pool.map(lambda r: one(*r), [(o["path"], s, min(s + step, o["size"]))
                                              for o in objects for s in range(0, o["size"], step)]))
for fd in files.values():  # durable, as jaxreshard's local outputs are
    os.fsync(fd)
    os.close(fd)
expected = sum(o["size"] for o in objects)
if not objects or total != expected:
    sys.exit(f"floor read {total} of {expected} bytes under {prefix}/")
"""


@dataclass
class Row:
    step: str
    wall: float | None = None  # None: failed
    rss: float | None = None
    read: int = 0  # bytes the step reads
    written: int = 0  # bytes the step writes
    floor: str = ""  # the row this one is compared with
    identical: str = "-"  # output equals the local -> local output
    error: str = ""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gib", type=float, default=1.0)
    ap.add_argument("--data", type=Path, default=REPO / "bench_data")
    ap.add_argument("--endpoint", help="an S3-compatible server to use instead of a moto server in this process")
    ap.add_argument("--bucket", default="jaxreshard-bench")
    ap.add_argument("--range-mib", type=int, default=8, help="floor: bytes per ranged GET")
    ap.add_argument("--concurrency", type=int, default=16, help="floor: ranged GETs in flight")
    ap.add_argument("--repeat", type=int, default=1, help="median of this many runs per step")
    ap.add_argument("--no-verify", action="store_true", help="skip comparing outputs with the local -> local one")
    args = ap.parse_args()
    root = args.data / f"remote_{args.size_gib:g}gib"
    src_dir = root / "src"
    if not (src_dir / SRC_NAME).exists():
        bench.write_checkpoint(src_dir / SRC_NAME, bench.llama_params(args.size_gib), "safetensors")
    moto = None
    if args.endpoint:
        endpoint, env = args.endpoint, {**os.environ, "AWS_ENDPOINT_URL": args.endpoint}
        bucket = existing_bucket(args.endpoint, args.bucket)
    else:
        server.serve_ranges_in_place()
        moto = server.MotoS3()
        endpoint, env = moto.endpoint, server.isolated_environ(moto.endpoint)
        bucket = server.new_bucket(endpoint, args.bucket)
    try:
        for prefix in ("src", "out", "floor"):
            delete_prefix(bucket, prefix)
        bucket.upload(src_dir, "src")
        rows = run_steps(args, root, src_dir, bucket, env)
    finally:
        for prefix in ("src", "out", "floor"):
            delete_prefix(bucket, prefix)
        if moto is not None:
            moto.stop()
    print_table(rows, args, endpoint if args.endpoint else "moto (in process, ranges served in place)", root)
    return 0 if all(r.wall is not None for r in rows) else 1


def run_steps(args, root: Path, src_dir: Path, bucket: server.Bucket, env: dict[str, str]) -> list[Row]:
    py, src_bytes = sys.executable, (src_dir / SRC_NAME).stat().st_size
    local_out, remote_local_out = root / "out_local", root / "out_from_s3"
    convert = [py, "-m", "jaxreshard", "convert", "--dst-layout", str(LAYOUT), "-q"]
    rows = []
    # local -> local first: its output is the reference, and its size tells the floors how much to write
    local = step(Row("jaxreshard local -> local", read=src_bytes, floor="floor: local read + write"),
                 [*convert, "--src", str(src_dir), "--dst", str(local_out)], env, args.repeat, lambda: clean(local_out))
    written = tree_bytes(local_out) if local.wall is not None else 2 * src_bytes  # dp2 x mp4: two copies
    local.written = written
    copies = max(1, round(written / src_bytes))
    floor = [py, "-c", FLOOR_TRANSFER, bucket.name, "src"]
    shape = [str(args.range_mib * MIB), str(args.concurrency)]
    floor_dl = step(Row("floor: parallel download", read=src_bytes), [*floor, "-", *shape, "0"], env, args.repeat)
    floor_tx = step(Row("floor: parallel download + upload", read=src_bytes, written=copies * src_bytes),
                    [*floor, "-", *shape, str(copies)], env, args.repeat, lambda: delete_prefix(bucket, "floor"))
    delete_prefix(bucket, "floor")
    floor_dw = step(Row("floor: parallel download + local write", read=src_bytes, written=copies * src_bytes),
                    [*floor, str(root / "floor"), *shape, str(copies)], env, args.repeat,
                    lambda: clean(root / "floor"))
    clean(root / "floor")
    floor_local = step(Row("floor: local read + write", read=src_bytes, written=copies * src_bytes),
                       [py, "-c", bench.FLOOR, str(src_dir / SRC_NAME),
                        *[str(root / "floor" / f"o{i}") for i in range(copies)]], env, args.repeat,
                       lambda: clean(root / "floor"))
    clean(root / "floor")
    s3_s3 = step(Row("jaxreshard s3 -> s3", read=src_bytes, written=written, floor="floor: parallel download + upload"),
                 [*convert, "--src", bucket.url("src"), "--dst", bucket.url("out")], env, args.repeat,
                 lambda: delete_prefix(bucket, "out"))
    if s3_s3.wall is not None and not args.no_verify and local.wall is not None:
        s3_s3.identical = same(local_out, s3_hashes(bucket, "out"))
    delete_prefix(bucket, "out")
    s3_local = step(Row("jaxreshard s3 -> local", read=src_bytes, written=written,
                        floor="floor: parallel download + local write"),
                    [*convert, "--src", bucket.url("src"), "--dst", str(remote_local_out)], env, args.repeat,
                    lambda: clean(remote_local_out))
    if s3_local.wall is not None and not args.no_verify and local.wall is not None:
        s3_local.identical = same(local_out, local_hashes(remote_local_out))
    clean(remote_local_out)
    clean(local_out)
    rows += [floor_dl, floor_tx, floor_dw, floor_local, s3_s3, s3_local, local]
    return rows


def step(row: Row, cmd: list[str], env: dict[str, str], repeat: int, before=None) -> Row:
    """Run `cmd` `repeat` times in fresh processes (after `before()` each time); the median wall and the highest
    peak RSS go into `row`, or the failure's last line into `row.error`."""
    walls, rsses = [], []
    for _ in range(repeat):
        if before is not None:
            before()
        try:
            wall, rss = measure(cmd, env)
        except RuntimeError as exc:
            row.error = str(exc)
            print(f"{row.step}: FAILED: {row.error}", file=sys.stderr)
            return row
        walls.append(wall)
        rsses.append(rss)
    row.wall, row.rss = sorted(walls)[len(walls) // 2], max(rsses)
    print(f"{row.step}: {row.wall:.2f} s, {row.rss:.0f} MiB", file=sys.stderr)
    return row


def measure(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall s, peak RSS MiB) of `cmd` in a fresh process under `env`, through bench.py's small wait4 wrapper (a
    child forked from this process would be charged this process's RSS, which holds the moto server's objects)."""
    proc = subprocess.run([sys.executable, "-S", "-c", bench.MEASURE_WAIT4, *cmd], env=env, capture_output=True)
    if proc.returncode != 0:
        lines = [ln.strip() for ln in proc.stderr.decode(errors="replace").splitlines() if ln.strip()]
        said = [ln for ln in lines if not ln.startswith("exit ")]  # the wrapper's own last line is "exit N"
        raise RuntimeError(f"{said[-1] if said else 'no output'} ({lines[-1] if lines else proc.returncode})")
    wall, rss_kib = json.loads(proc.stdout)
    return wall, rss_kib / 1024


def existing_bucket(endpoint: str, name: str) -> server.Bucket:
    """A bucket on a server of the user's, with boto3's own credential chain (the standard AWS environment)."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint)
    if name not in {b["Name"] for b in s3.list_buckets().get("Buckets", [])}:
        s3.create_bucket(Bucket=name)
    return server.Bucket(name, endpoint, s3)


def delete_prefix(bucket: server.Bucket, prefix: str) -> None:
    """Delete every object and unfinished multipart upload under `prefix/` (only this benchmark's prefixes)."""
    for up in bucket.multipart_uploads(prefix + "/"):
        bucket.s3.abort_multipart_upload(Bucket=bucket.name, Key=up["Key"], UploadId=up["UploadId"])
    keys = bucket.keys(prefix)
    for i in range(0, len(keys), 1000):
        bucket.s3.delete_objects(Bucket=bucket.name, Delete={"Objects": [{"Key": k} for k in keys[i:i + 1000]]})


def clean(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def manifest_name() -> str:
    from jaxreshard.formats.manifest import MANIFEST_NAME

    return MANIFEST_NAME


def local_hashes(root: Path) -> dict[str, str]:
    """{relative path: SHA-256} of every file under `root` but the manifest (it records times and sources)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != manifest_name():
            h = hashlib.sha256()
            with open(p, "rb") as f:
                while chunk := f.read(8 * MIB):
                    h.update(chunk)
            out[p.relative_to(root).as_posix()] = h.hexdigest()
    return out


def s3_hashes(bucket: server.Bucket, prefix: str) -> dict[str, str]:
    out = {}
    for key in bucket.keys(prefix):
        rel = key[len(prefix) + 1:]
        if rel.rsplit("/", 1)[-1] == manifest_name():
            continue
        h = hashlib.sha256()
        for chunk in bucket.s3.get_object(Bucket=bucket.name, Key=key)["Body"].iter_chunks(8 * MIB):
            h.update(chunk)
        out[rel] = h.hexdigest()
    return out


def same(reference: Path, hashes: dict[str, str]) -> str:
    ref = local_hashes(reference)
    if ref == hashes:
        return "yes"
    differ = sorted(set(ref) ^ set(hashes) | {k for k in set(ref) & set(hashes) if ref[k] != hashes[k]})
    return f"NO ({', '.join(differ[:3])})"


def print_table(rows: list[Row], args, server_desc: str, root: Path) -> None:
    by_name = {r.step: r for r in rows}
    lines = [
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, "
        f"{os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.0f} GiB RAM, "
        f"Python {platform.python_version()}; checkpoint {args.size_gib:g} GiB safetensors -> dp2 x mp4 (8 ranks); "
        f"server: {server_desc}; floor: {args.range_mib} MiB ranges, {args.concurrency} in flight; "
        f"median of {args.repeat}.",
        "",
        "| step | wall s | GB/s (read+write) | x floor | floor | peak RSS MiB | identical |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        floor = by_name.get(r.floor)
        ratio = (f"{r.wall / floor.wall:.2f}" if r.wall is not None and floor is not None and floor.wall
                 else "-")
        if r.wall is None:
            lines.append(f"| {r.step} | FAILED: {r.error.replace('|', '/')[:160]} | | | {r.floor or '-'} | | |")
            continue
        lines.append(f"| {r.step} | {r.wall:.2f} | {(r.read + r.written) / r.wall / 1e9:.2f} | {ratio} | "
                     f"{r.floor or '-'} | {r.rss:.0f} | {r.identical} |")
    text = "\n".join(lines)
    print(text)
    root.mkdir(parents=True, exist_ok=True)
    (root / "results.md").write_text(text + "\n")
    (root / "results.json").write_text(json.dumps([asdict(r) for r in rows], indent=1))


if __name__ == "__main__":
    raise SystemExit(main())
