"""Faults injected between jaxreshard and the S3 server (tests/remote/proxy.py): throttling and 5xx answers are
retried and the output is the local run's, byte for byte; a fault that outlasts the retries is exit 2 with one line
naming the URL and leaves no manifest, no multipart upload and no lock behind; a connection cut mid-read is read
again; refused credentials never show a credential."""

from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import jaxreshard as jr
from jaxreshard.formats.manifest import MANIFEST_NAME
from jaxreshard.formats.safetensors_io import SafetensorsWriter
from jaxreshard.remote import urls
from tests.corpus.harness import run_cli
from tests.remote.test_convert_remote import tree

REPO = Path(__file__).resolve().parents[2]
DP2MP4 = str(REPO / "configs" / "layouts" / "llama_dp2mp4.yaml")
LOCK = ".jaxreshard.lock"
OBJECT_GET = r"/src/model\.safetensors$"  # a GET of the source object (not a listing: that has a query)
PART_PUT = r"partNumber="  # an UploadPart request (PUT ...?partNumber=N&uploadId=...)


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> Path:
    """A 24 MiB checkpoint: several 8 MiB blocks to read and multipart parts to upload, with an odd-sized tail."""
    path = tmp_path_factory.mktemp("big") / "model.safetensors"
    rng = np.random.default_rng(11)
    params = [("a.weight", np.dtype(ml_dtypes.bfloat16), (4096, 2304)), ("b.bias", np.dtype(np.float32), (1001,)),
              ("c.weight", np.dtype(np.float32), (1024, 1536))]
    writer = SafetensorsWriter(path, params)
    for name, dtype, shape in params:
        writer.write(name, rng.standard_normal(shape).astype(dtype))
    writer.close()
    return path


@pytest.fixture(scope="module")
def local_split(llama, tmp_path_factory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("local") / "split"
    jr.convert(llama, out, dst_layout=DP2MP4)
    return tree(out)


@pytest.fixture
def few_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Give up fast: one retry and a short total retry time (the defaults take minutes to give up)."""
    monkeypatch.setattr(urls, "MAX_RETRIES", 1)
    monkeypatch.setattr(urls, "RETRY_TIMEOUT", timedelta(seconds=5))


def error_line(code: int, err: str) -> str:
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("jaxreshard: error:")]
    assert len(lines) == 1, err
    return lines[0]


def assert_left_clean(bucket, prefix: str) -> None:
    """What a failed run must leave at `prefix`: no manifest, no multipart upload in progress, no lock."""
    keys = bucket.keys(prefix)
    assert f"{prefix}/{MANIFEST_NAME}" not in keys
    assert f"{prefix}/{LOCK}" not in keys
    assert bucket.multipart_uploads(prefix) == []


# --- transient faults: retried, output unchanged ----------------------------------------------------------------

@pytest.mark.parametrize("status, code", [(503, None), (500, None), (429, "SlowDown")])
def test_throttled_and_failing_reads_are_retried(llama, bucket, s3_proxy, tmp_path, local_split, status, code):
    bucket.upload(llama.parent, "src")
    gets = s3_proxy.fail(status, times=3, method="GET", path=OBJECT_GET, code=code)
    listing = s3_proxy.fail(status, times=1, method="GET", path=r"list-type=2", code=code)
    jr.convert(bucket.url("src"), tmp_path / "out", dst_layout=DP2MP4)
    assert tree(tmp_path / "out") == local_split
    assert gets.hits == 3 and listing.hits == 1
    faulted = [e for e in s3_proxy.log if e.fault == "status"]
    assert len(faulted) == 4 and all(e.status == status for e in faulted)


def test_failing_part_uploads_and_completion_are_retried(big, bucket, s3_proxy, tmp_path):
    parts = s3_proxy.fail(500, times=2, method="PUT", path=PART_PUT)
    slow = s3_proxy.fail(503, times=1, method="PUT", path=PART_PUT)
    start = s3_proxy.fail(503, times=1, method="POST", path=r"\?uploads")
    jr.convert(big, bucket.url("out"))
    assert bucket.get("out/rank_0/checkpoint_0.safetensors") == big.read_bytes()
    assert (parts.hits, slow.hits, start.hits) == (2, 1, 1)
    assert bucket.multipart_uploads() == []
    assert sorted(bucket.keys("out")) == [f"out/{MANIFEST_NAME}", "out/rank_0/checkpoint_0.safetensors"]


def test_a_throttled_manifest_put_is_retried(llama, bucket, s3_proxy, tmp_path, local_split):
    manifest = s3_proxy.fail(503, times=2, method="PUT", path=MANIFEST_NAME)
    jr.convert(llama, bucket.url("out"), dst_layout=DP2MP4)
    assert manifest.hits == 2
    bucket.download("out", tmp_path / "dl")
    assert tree(tmp_path / "dl") == local_split
    assert LOCK not in " ".join(bucket.keys())


# --- faults that outlast the retries: exit 2, one line naming the URL, nothing half-written left ----------------

def test_a_source_object_that_keeps_failing_is_exit_2_naming_it(llama, bucket, s3_proxy, tmp_path, few_retries):
    bucket.upload(llama.parent, "src")
    s3_proxy.fail(503, times=10_000, method="GET", path=OBJECT_GET)
    code, _, err = run_cli(["convert", "--src", bucket.url("src"), "--dst", str(tmp_path / "out"),
                            "--dst-layout", DP2MP4])
    line = error_line(code, err)
    assert bucket.url("src/model.safetensors") in line
    assert "HTTP 503" in line or "kept failing" in line
    assert not (tmp_path / "out").exists()


def test_part_uploads_that_keep_failing_leave_no_manifest_upload_or_lock(big, bucket, s3_proxy, few_retries):
    s3_proxy.fail(500, times=10_000, method="PUT", path=PART_PUT)
    code, _, err = run_cli(["convert", "--src", str(big), "--dst", bucket.url("out")])
    line = error_line(code, err)
    assert bucket.url("out/rank_0/checkpoint_0.safetensors") in line
    assert_left_clean(bucket, "out")
    assert bucket.keys("out") == []


def test_a_manifest_put_that_keeps_failing_leaves_the_output_incomplete(llama, bucket, s3_proxy, few_retries):
    s3_proxy.fail(503, times=10_000, method="PUT", path=MANIFEST_NAME)
    code, _, err = run_cli(["convert", "--src", str(llama), "--dst", bucket.url("out"), "--dst-layout", DP2MP4])
    line = error_line(code, err)
    assert bucket.url(f"out/{MANIFEST_NAME}") in line
    assert_left_clean(bucket, "out")
    assert len([k for k in bucket.keys("out") if "/rank_" in k]) == 8  # uploaded, but not complete
    s3_proxy.clear_faults()
    code, _, err = run_cli(["verify", bucket.url("out")])  # an output without its manifest is not complete
    assert code == 2, err
    code, _, err = run_cli(["convert", "--src", str(llama), "--dst", bucket.url("out"), "--dst-layout", DP2MP4])
    assert "pass --overwrite" in error_line(code, err)


def test_a_lock_put_that_keeps_failing_writes_nothing(llama, bucket, s3_proxy, few_retries):
    s3_proxy.fail(503, times=10_000, method="PUT", path=LOCK)
    code, _, err = run_cli(["convert", "--src", str(llama), "--dst", bucket.url("out")])
    line = error_line(code, err)
    assert bucket.url(f"out/{LOCK}") in line
    assert bucket.keys() == [] and bucket.multipart_uploads() == []


# --- connections lost mid-read ----------------------------------------------------------------------------------

@pytest.mark.parametrize("after_bytes", [0, 1000, 100_000])
def test_a_header_read_cut_mid_body_is_read_again(llama, bucket, s3_proxy, tmp_path, local_split, after_bytes):
    bucket.upload(llama.parent, "src")
    cut = s3_proxy.cut(after_bytes, times=1, path=OBJECT_GET)  # the first GET of the object: its header
    jr.convert(bucket.url("src"), tmp_path / "out", dst_layout=DP2MP4)
    assert cut.hits == 1
    assert tree(tmp_path / "out") == local_split


def test_block_reads_cut_mid_body_are_read_again(big, bucket, s3_proxy, tmp_path):
    bucket.upload(big.parent, "src")
    cut = s3_proxy.cut(3 << 20, times=3, path=OBJECT_GET)  # the header GET (1 MiB) passes whole; blocks are cut
    jr.convert(bucket.url("src"), tmp_path / "out")
    assert (tmp_path / "out" / "rank_0" / "checkpoint_0.safetensors").read_bytes() == big.read_bytes()
    assert cut.hits == 3
    assert [e.sent for e in s3_proxy.log if e.fault == "cut" and e.sent == 3 << 20]  # a block read was cut


# --- refused credentials and permissions ------------------------------------------------------------------------

SECRETS = {"AWS_ACCESS_KEY_ID": "AKIAJRTESTKEYID0042", "AWS_SECRET_ACCESS_KEY": "Shh-do-not-print-this-secret-9f2c",
           "AWS_SESSION_TOKEN": "SessionTokenNeverInLogs-77e1"}


@pytest.fixture
def recognisable_credentials(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    return SECRETS


def assert_no_credential(text: str) -> None:
    for name, value in SECRETS.items():
        assert value not in text, f"{name} leaked: {text}"


@pytest.mark.parametrize("code, wanted", [("InvalidAccessKeyId", "credentials|access denied"),
                                          ("SignatureDoesNotMatch", "credentials|access denied"),
                                          ("AccessDenied", "access denied")])
@pytest.mark.parametrize("side", ["src", "dst"])
def test_refused_credentials_are_one_line_naming_the_url_without_any_secret(
        llama, bucket, s3_proxy, tmp_path, recognisable_credentials, caplog, code, wanted, side, few_retries):
    import re

    bucket.upload(llama.parent, "src")
    s3_proxy.fail(403, times=10_000, code=code)
    caplog.set_level(logging.DEBUG)
    src, dst = (bucket.url("src"), str(tmp_path / "out")) if side == "src" else (str(llama), bucket.url("out"))
    exit_code, out, err = run_cli(["convert", "--src", src, "--dst", dst, "--dst-layout", DP2MP4])
    line = error_line(exit_code, err)
    assert re.search(wanted, line), line
    assert (src if side == "src" else dst) in line
    assert_no_credential(out + err + caplog.text)
    assert bucket.keys("out") == [] and bucket.multipart_uploads() == []


def test_the_secret_never_appears_even_when_the_run_succeeds(llama, bucket, s3_proxy, tmp_path,
                                                              recognisable_credentials, caplog):
    caplog.set_level(logging.DEBUG)
    code, out, err = run_cli(["convert", "--src", str(llama), "--dst", bucket.url("out"), "--dst-layout", DP2MP4])
    assert code == 0, err
    assert_no_credential(out + err + caplog.text + bucket.get(f"out/{MANIFEST_NAME}").decode())
