"""``[storage]``: which blob store, read from config.toml into `BlobStoreSettings`, bad values named."""

from __future__ import annotations

from pathlib import Path

import pytest

from avatarbooth.cli import main
from avatarbooth.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


def storage(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(f'[storage]\ndata_dir = "data"\n{text}\n')
    return path


def test_the_local_store_is_the_default() -> None:
    blobs = load_config(ROOT / "config.toml", env={}).blob_store
    assert blobs.kind == "local"
    assert blobs.local_dir == ROOT / "data" / "blobs"
    assert blobs.cache_bytes == 20 * 2**30


def test_s3_settings_reach_the_blob_store_settings(tmp_path: Path) -> None:
    path = storage(tmp_path, 'blob_store = "s3"\ns3_bucket = "avatarbooth-blobs"\ns3_prefix = "prod/eu"\n'
                             "blob_cache_gib = 1.5")
    blobs = load_config(path, env={}).blob_store
    assert (blobs.kind, blobs.s3_bucket, blobs.s3_prefix) == ("s3", "avatarbooth-blobs", "prod/eu")
    assert blobs.cache_bytes == int(1.5 * 2**30)
    assert blobs.cache_dir == tmp_path / "data" / "blob-cache"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('blob_store = "gcs"', r'blob_store must be "local" .* or "s3", got \'gcs\''),
        ('blob_store = "s3"', r'needs s3_bucket = "<an existing bucket>"; .*AWS_ENDPOINT_URL'),
        ('blob_store = "s3"\ns3_bucket = "Bad_Bucket"', r"\[storage\] S3 bucket name 'Bad_Bucket' is invalid; use 3-63"),
        ('blob_store = "s3"\ns3_bucket = "ok-bucket"\ns3_prefix = "a/../b"', r"\[storage\] S3 key prefix 'a/../b'"),
        ('blob_store = "s3"\ns3_bucket = 7', r"s3_bucket must be a string, got 7"),
        ('s3_bucket = "ok-bucket"', r'used only with blob_store = "s3": set it, or remove them'),
        ("blob_cache_gib = 0", r"blob_cache_gib must be a number of GiB above 0, got 0"),
        ('blob_cache_gib = "lots"', r"blob_cache_gib must be a number"),
        ("blob_cache_gib = true", r"blob_cache_gib must be a number"),
        ('blob_dir = "x"', r"\[storage\] unknown setting\(s\) \['blob_dir'\]; known: blob_cache_gib, blob_store"),
        ('endpoint_url = "http://minio:9000"', r"never go in config.toml; set AWS_ENDPOINT_URL in the environment"),
        ('aws_secret_access_key = "x"', r"set AWS_SECRET_ACCESS_KEY in the environment"),
        ('access_key_id = "x"', r"set AWS_ACCESS_KEY_ID in the environment"),
        ('region = "eu-west-1"', r"set AWS_DEFAULT_REGION in the environment"),
    ],
)
def test_bad_storage_settings_say_what_to_do(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        load_config(storage(tmp_path, text), env={})
    assert "http://minio" not in str(caught.value)  # a value that never belonged there is not repeated


def test_a_worker_with_a_missing_bucket_stops_at_once_naming_the_setting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], s3_env: dict[str, str], valkey_url: str
) -> None:
    path = storage(tmp_path, f'blob_store = "s3"\ns3_bucket = "no-such-bucket"\n[queue]\nredis_url = "{valkey_url}"\n'
                             '[engine]\npreset = "tiny"\nmodels_dir = "absent"')
    assert main(["worker", "--config", str(path)]) == 1  # the store is opened before any model loads
    err = capsys.readouterr().err
    assert "S3 bucket 'no-such-bucket' does not exist" in err and "set [storage] s3_bucket" in err
    assert s3_env["AWS_ENDPOINT_URL"] not in err and s3_env["AWS_SECRET_ACCESS_KEY"] not in err
