"""`parse_url` / `is_url` on hostile and edge-case spellings: what is an object-store URL, what stays a local path,
and that every refusal is one line naming the URL without any credential written into it."""

from __future__ import annotations

from pathlib import Path

import pytest

from jaxreshard import remote
from jaxreshard.errors import ConfigError
from jaxreshard.remote.urls import Url, is_url, parse_url

SECRET = "SeCrEt-in-the-url-42"


@pytest.mark.parametrize("text, want", [
    ("s3://bucket/prefix", Url("s3", "bucket", "prefix")),
    ("gs://bucket/a/b/c", Url("gs", "bucket", "a/b/c")),
    ("s3://bucket", Url("s3", "bucket", "")),
    ("s3://bucket/", Url("s3", "bucket", "")),
    ("s3://bucket/prefix/", Url("s3", "bucket", "prefix")),
    ("s3://bucket/prefix///", Url("s3", "bucket", "prefix")),
    ("  s3://bucket/p  ", Url("s3", "bucket", "p")),  # pasted with blanks around it
    ("s3://my.bucket-1/p", Url("s3", "my.bucket-1", "p")),
    ("s3://bucket/model.safetensors", Url("s3", "bucket", "model.safetensors")),
    ("s3://bucket/a b/ü", Url("s3", "bucket", "a b/ü")),  # spaces and non-ASCII are legal key characters
])
def test_good_urls_parse_to_their_parts(text, want):
    got = parse_url(text)
    assert got == want
    assert is_url(text.strip())


def test_url_keys_and_children_are_plain_joins():
    url = parse_url("s3://bucket/out/run")
    assert url.key("rank_0/x.safetensors") == "out/run/rank_0/x.safetensors"
    assert url.child("rank_0") == "s3://bucket/out/run/rank_0"
    assert str(url) == "s3://bucket/out/run"
    top = parse_url("s3://bucket/")
    assert top.key("a") == "a" and str(top) == "s3://bucket"


@pytest.mark.parametrize("text", [
    "http://bucket/prefix", "https://s3.amazonaws.com/bucket/prefix", "file:///tmp/x", "az://container/p",
    "hf://org/model", "s3:bucket/prefix", "s3:/bucket/prefix", "dir/s3://bucket/x", "./s3://bucket",
    "/data/s3:backup/model.safetensors", "s3", "", "gs:", " gs ://b/p",
])
def test_other_schemes_and_local_paths_are_not_urls(text):
    assert not is_url(text)


def test_path_objects_are_never_urls():
    # Path("s3://b/p") collapses to "s3:/b/p": a local folder named "s3:", never the bucket
    assert not is_url(Path("s3://bucket/prefix"))
    assert not is_url(b"s3://bucket/prefix")
    assert not is_url(None)


def test_a_local_path_containing_s3_passes_through_the_views_untouched(tmp_path):
    odd = tmp_path / "s3:" / "bucket"
    odd.mkdir(parents=True)
    with remote.source_view(str(odd)) as view:
        assert view == str(odd)
    with remote.destination_view(str(odd), overwrite=False) as view:
        assert view == str(odd)
    assert [p.name for p in tmp_path.iterdir()] == ["s3:"]  # nothing made or removed beside it


def one_line_error(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse_url(text)
    message = str(info.value)
    assert "\n" not in message and "\r" not in message
    return message


@pytest.mark.parametrize("text", [
    f"s3://AKIDEXAMPLE:{SECRET}@bucket/prefix",
    f"s3://{SECRET}@bucket/prefix",
    f"gs://user:{SECRET}@bucket",
    "s3://bucket:9000/prefix",
    "s3://127.0.0.1:9000/bucket",
])
def test_credentials_or_ports_in_the_url_are_refused_without_echoing_them(text):
    message = one_line_error(text)
    assert "credentials or ports do not go into the URL" in message
    assert SECRET not in message and "AKIDEXAMPLE" not in message
    assert "AWS_ACCESS_KEY_ID" in message  # says where credentials go instead


@pytest.mark.parametrize("bucket", [
    "ab", "a", "Bucket", "UPPER", "-bucket", "bucket-", ".bucket", "bucket.", "buck et", "bück",
    "bucket\x00",
])
def test_bad_bucket_names_are_refused(bucket):
    message = one_line_error(f"s3://{bucket}/prefix")
    assert "bucket" in message


def test_a_bucket_name_ending_in_a_newline_is_refused():
    one_line_error("s3://bucket\n/prefix")


def test_a_trailing_control_character_is_refused_not_stripped():
    one_line_error("s3://bucket/a/b\x1f")


def test_an_empty_bucket_is_refused():
    message = one_line_error("s3:///prefix")
    assert "not a valid bucket name" in message


def test_an_s3_bucket_name_over_63_characters_is_refused():
    one_line_error("s3://" + "b" * 64 + "/prefix")


@pytest.mark.parametrize("prefix", [
    "a/../b", "..", "../x", "a/..", "a/./b", ".", "a//b", "a/\x01b", "a\\b", "a\tb", "a\x1fb",
])
def test_prefixes_with_dot_empty_or_control_parts_are_refused(prefix):
    message = one_line_error(f"s3://bucket/{prefix}")
    assert message.startswith("s3://bucket/") and "name the folder plainly" in message


def test_a_newline_inside_the_url_is_refused_in_one_line():
    message = one_line_error("s3://bucket/a\nb")
    assert "a\\nb" in message  # repr'd: the message stays one line


def test_an_uppercase_scheme_is_the_same_scheme():
    # is_url takes it for a URL (the scheme is compared lower-cased, as RFC 3986 says schemes are), and so does
    # parse_url; what follows the scheme keeps its case
    assert is_url("S3://bucket/Prefix")
    assert parse_url("S3://bucket/Prefix") == Url("s3", "bucket", "Prefix")


def test_a_refused_url_never_echoes_what_follows_the_scheme():
    line = one_line_error("S3://AKIAXXXX:SECRETYYY@Bucket/p")
    assert "AKIAXXXX" not in line and "SECRETYYY" not in line


def test_a_huge_url_is_refused_with_a_bounded_message():
    message = one_line_error("s3://bucket/" + "a/" * 5000 + "..")
    assert len(message) < 600


def test_non_strings_are_refused():
    assert "is not an object-store URL" in one_line_error(Path("s3://bucket/x"))  # type: ignore[arg-type]


def test_a_url_collapsed_by_pathlib_is_refused(llama, tmp_path, monkeypatch):
    import jaxreshard as jr

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="s3:"):
        jr.convert(llama, Path("s3://bucket/out"))
    assert not (tmp_path / "s3:").exists()
