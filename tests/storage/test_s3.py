"""What only S3BlobStore has, on a real S3 server (moto's, over HTTP): erasure verified by listing,
multipart transfers, the bounded and verified local cache, prefixes, and errors that say what to set."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from avatarbooth.config import load_config
from avatarbooth.runtime import StartupError, serve_chat
from storage.blobs import BlobStoreSettings, LocalBlobStore, open_blob_store
from storage.cache import BlobCache
from storage.errors import BlobNotFound, InvalidBlobKey, StorageError
from storage.keys import checked_bucket, checked_prefix
from storage.s3 import MIB, S3BlobStore
from tests.s3server import ACCESS_KEY_ID, SECRET_ACCESS_KEY, bucket_name
from tests.support import free_port

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

PHOTO = os.urandom(100_000)


def names(client: S3Client, bucket: str, prefix: str = "") -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(item["Key"] for page in pages for item in page.get("Contents", []))


def test_delete_owner_leaves_nothing_of_the_owner_in_the_bucket(
    s3_store: S3BlobStore, s3_client: S3Client, s3_bucket: str
) -> None:
    for i in range(7):
        s3_store.put("u1", "photos", PHOTO + bytes([i]), ".jpg")
    s3_store.put_written("u1", "lora", ".safetensors", lambda f: f.write(b"weights"))
    s3_store.set_ref("u1", "checkpoints", "train-3", {"key": "x"})
    s3_store.path(s3_store.put("u1", "images", b"png", ".png"))
    assert s3_store.cache.owners() == ["u1"]
    theirs = s3_store.put("u2", "photos", PHOTO, ".jpg")
    # A writer that died mid-upload: no object, but its parts hold the owner's data.
    upload = s3_client.create_multipart_upload(Bucket=s3_bucket, Key=f"ab/u1/dreambooth/{'b' * 64}.safetensors")
    s3_client.upload_part(Bucket=s3_bucket, Key=upload["Key"], UploadId=upload["UploadId"], PartNumber=1, Body=b"part")

    assert s3_store.delete_owner("u1") == 9  # blobs only: the reference goes but is not counted

    assert names(s3_client, s3_bucket) == [f"ab/{theirs}"]
    assert s3_client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []
    assert s3_store.cache.owners() == []  # u2's photo was never opened by path: no copy
    assert s3_store.delete_owner("u1") == 0


def test_prefixes_keep_stores_in_one_bucket_apart(s3_bucket: str, s3_client: S3Client, tmp_path: Path) -> None:
    prod = S3BlobStore(s3_bucket, BlobCache(tmp_path / "a", MIB), prefix="/avatarbooth/prod/")
    test = S3BlobStore(s3_bucket, BlobCache(tmp_path / "b", MIB), prefix="avatarbooth/test")
    key = prod.put("u1", "photos", PHOTO, ".jpg")
    assert test.put("u1", "photos", PHOTO, ".jpg") == key  # a key names content, wherever it is stored

    assert test.delete_owner("u1") == 1
    assert prod.get(key) == PHOTO
    assert names(s3_client, s3_bucket) == [f"avatarbooth/prod/{key}"]


def test_a_key_means_the_same_content_in_both_stores(s3_store: S3BlobStore, tmp_path: Path) -> None:
    local = LocalBlobStore(tmp_path / "blobs")
    key = local.put("u1", "photos", PHOTO, ".jpg")
    assert s3_store.put("u1", "photos", PHOTO, ".jpg") == key
    assert s3_store.path(key).read_bytes() == local.path(key).read_bytes()


def test_a_blob_past_the_multipart_threshold_streams_in_parts_both_ways(
    s3_bucket: str, s3_client: S3Client, tmp_path: Path
) -> None:
    # S3's smallest part is 5 MiB: 11 MiB makes three parts.
    store = S3BlobStore(s3_bucket, BlobCache(tmp_path / "cache", 64 * MIB),
                        multipart_threshold=5 * MIB, multipart_chunksize=5 * MIB)
    chunks = [os.urandom(MIB) for _ in range(11)]

    def write(file: object) -> None:
        for chunk in chunks:
            file.write(chunk)  # type: ignore[attr-defined]

    key = store.put_written("u1", "dreambooth", ".safetensors", write)

    whole = b"".join(chunks)
    assert key == f"u1/dreambooth/{hashlib.sha256(whole).hexdigest()}.safetensors"
    assert s3_client.head_object(Bucket=s3_bucket, Key=key)["ETag"].strip('"').endswith("-3")  # 3 parts
    assert store.get(key) == whole
    assert store.path(key).read_bytes() == whole  # the writer's file became the cached copy
    # Another host, with an empty cache, fetches it in ranged parts and checks its hash.
    other = S3BlobStore(s3_bucket, BlobCache(tmp_path / "elsewhere", 64 * MIB),
                        multipart_threshold=5 * MIB, multipart_chunksize=5 * MIB)
    fetched = other.path(key)
    assert fetched.is_relative_to(tmp_path / "elsewhere") and fetched.read_bytes() == whole


def test_the_cache_stays_within_its_size_and_evicts_the_least_recently_used(
    s3_bucket: str, tmp_path: Path
) -> None:
    cache = BlobCache(tmp_path / "cache", 3 * len(PHOTO) + 100)
    store = S3BlobStore(s3_bucket, cache)
    keys = [store.put("u1", "photos", PHOTO + bytes([i]), ".jpg") for i in range(5)]

    first = store.path(keys[0])
    for key in keys[1:3]:
        store.path(key)
    assert store.path(keys[0]) == first  # used again: now the most recent
    for key in keys[3:]:
        store.path(key)
        assert cache.size() <= cache.max_bytes

    cached = sorted(p.relative_to(cache.root).as_posix() for p in cache.root.rglob("*") if p.is_file())
    assert cached == sorted([keys[0], keys[3], keys[4]])
    assert store.path(keys[1]).read_bytes() == PHOTO + bytes([1])  # an evicted blob is fetched again


def test_a_blob_bigger_than_the_cache_is_still_served(s3_bucket: str, tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    store = S3BlobStore(s3_bucket, BlobCache(tmp_path / "cache", 1000))
    small = store.put("u1", "photos", b"small", ".jpg")
    store.path(small)
    key = store.put("u1", "photos", PHOTO, ".jpg")

    assert store.path(key).read_bytes() == PHOTO
    assert not (store.cache.root / small).exists()
    assert "raise [storage] blob_cache_gib" in caplog.text


def test_a_damaged_cached_copy_is_found_by_its_hash_and_fetched_again(
    s3_store: S3BlobStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key = s3_store.put("u1", "lora", PHOTO, ".safetensors")
    copy = s3_store.path(key)
    copy.write_bytes(b"\0" * len(PHOTO))  # same size: only the hash tells

    assert s3_store.path(key).read_bytes() == PHOTO
    assert "cached copy of blob" in caplog.text

    # A process that never saw the file (a restarted worker) checks it before handing it out too.
    copy.write_bytes(b"\1" * len(PHOTO))
    restarted = S3BlobStore(s3_store.bucket, BlobCache(s3_store.cache.root, s3_store.cache.max_bytes), prefix="ab")
    assert restarted.path(key).read_bytes() == PHOTO


def test_an_object_whose_content_does_not_match_its_key_is_refused(
    s3_store: S3BlobStore, s3_client: S3Client, s3_bucket: str
) -> None:
    key = f"u1/lora/{hashlib.sha256(b'the real weights').hexdigest()}.safetensors"
    s3_client.put_object(Bucket=s3_bucket, Key=f"ab/{key}", Body=b"something else")

    with pytest.raises(StorageError, match="changed outside AvatarBooth"):
        s3_store.path(key)
    assert not any(p.is_file() for p in s3_store.cache.root.rglob("*"))


def test_no_endpoint_or_keys_reach_the_logs_even_at_debug(
    s3_store: S3BlobStore, s3_env: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    key = s3_store.put("u1", "photos", PHOTO, ".jpg")
    s3_store.path(key)
    s3_store.put_written("u1", "lora", ".safetensors", lambda f: f.write(b"w"))
    with pytest.raises(BlobNotFound):
        s3_store.get(f"u1/photos/{'0' * 64}.jpg")
    s3_store.delete_owner("u1")

    assert "deleted 2 blobs of u1" in caplog.text  # the capture works
    endpoint = s3_env["AWS_ENDPOINT_URL"].removeprefix("http://")
    for secret in (ACCESS_KEY_ID, SECRET_ACCESS_KEY, endpoint, endpoint.split(":")[1]):
        assert secret not in caplog.text


def test_a_missing_bucket_says_what_to_set(s3_env: dict[str, str], tmp_path: Path) -> None:
    store = S3BlobStore(bucket_name("missing"), BlobCache(tmp_path / "cache", MIB))

    with pytest.raises(StorageError, match=r"does not exist.*s3_bucket") as at_start:
        store.check()
    with pytest.raises(StorageError, match=r"does not exist.*s3_bucket"):
        store.put("u1", "photos", PHOTO, ".jpg")
    with pytest.raises(StorageError, match=r"does not exist.*s3_bucket"):
        store.put_written("u1", "lora", ".safetensors", lambda f: f.write(b"w"))
    assert store.bucket in str(at_start.value)


def test_the_configured_store_is_opened_and_its_bucket_checked(s3_bucket: str, tmp_path: Path) -> None:
    local = open_blob_store(BlobStoreSettings(local_dir=tmp_path / "blobs"))
    assert isinstance(local, LocalBlobStore) and local.root == tmp_path / "blobs"
    s3 = open_blob_store(BlobStoreSettings(local_dir=tmp_path / "blobs", kind="s3", s3_bucket=s3_bucket,
                                           s3_prefix="p", cache_bytes=MIB))
    assert isinstance(s3, S3BlobStore) and s3.prefix == "p/" and s3.cache.root == tmp_path / "blobs-cache"
    assert s3.cache.max_bytes == MIB
    with pytest.raises(StorageError, match="s3_bucket"):
        open_blob_store(BlobStoreSettings(local_dir=tmp_path / "blobs", kind="s3", s3_bucket=bucket_name()))


async def test_a_missing_bucket_stops_the_chat_side_before_anything_starts(
    s3_env: dict[str, str], tmp_path: Path
) -> None:
    path = tmp_path / "c.toml"
    path.write_text(f'[storage]\ndata_dir = "data"\nblob_store = "s3"\ns3_bucket = "{bucket_name()}"\n')
    config = load_config(path, preset="tiny", env={})
    with pytest.raises(StartupError, match=r"blob store cannot be used: S3 bucket .* s3_bucket"):
        async with serve_chat(config, start_worker=False):
            pass
    assert not (tmp_path / "data" / "valkey").exists()  # the queue server was never started


def test_an_unreachable_endpoint_names_the_variable_but_not_its_value(
    s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # fail at once rather than after back-offs
    store = S3BlobStore(bucket_name(), BlobCache(tmp_path / "cache", MIB))

    for attempt in (store.check, lambda: store.put("u1", "photos", PHOTO, ".jpg"),
                    lambda: store.put_written("u1", "lora", ".pt", lambda f: f.write(b"w"))):
        with pytest.raises(StorageError, match="AWS_ENDPOINT_URL") as caught:
            attempt()
        error: BaseException | None = caught.value
        while error is not None:  # the whole chain a traceback would show
            assert endpoint.split("//")[1] not in str(error)
            error = error.__cause__
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]


def test_missing_credentials_say_what_to_set(
    s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    store = S3BlobStore(bucket_name(), BlobCache(tmp_path / "cache", MIB))
    with pytest.raises(StorageError, match="set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"):
        store.check()


def test_a_malformed_endpoint_names_the_variable(
    s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "not a url")
    with pytest.raises(StorageError, match="AWS_ENDPOINT_URL is not a valid URL") as caught:
        S3BlobStore(bucket_name(), BlobCache(tmp_path / "cache", MIB))
    assert "not a url" not in str(caught.value)


@pytest.mark.parametrize("bucket", ["", "ab", "Upper", "under_score", "-lead", "trail-", "a..b", "x" * 64])
def test_bad_bucket_names_are_refused(bucket: str) -> None:
    with pytest.raises(InvalidBlobKey, match="bucket name"):
        checked_bucket(bucket)


def test_prefixes_are_normalized_and_checked() -> None:
    assert checked_prefix("") == "" and checked_prefix("/") == ""
    assert checked_prefix("avatarbooth") == "avatarbooth/"
    assert checked_prefix("/a/b.c/") == "a/b.c/"
    for bad in ("a/../b", "a//b", "./a", "a/ b", "a\\b", ".."):
        with pytest.raises(InvalidBlobKey, match="prefix"):
            checked_prefix(bad)
