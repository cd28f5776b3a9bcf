"""The whole journey with ``[storage] blob_store = "s3"``: the chat side and a worker process (the
one `avatarbooth chat` starts) keep every blob in a real S3 server's bucket; local disk holds only the
bounded, verified copies of the blob cache; /forget leaves no object of the user, verified by listing,
and no cached copy on any worker host.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from redis.asyncio import Redis

from avatarbooth.config import load_config
from avatarbooth.runtime import Running, serve_chat
from bot import texts
from bot.jobs import JobClient
from bot.service import Upload, UserRef
from engine.api import CACHED_KEY_PREFIX, erased_key
from engine.erasure import sweep_once
from storage.blobs import BlobStoreSettings, open_blob_store
from storage.db import Database
from storage.keys import KEY_RE
from tests.support import face_photo

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

    from tests.s3server import MotoServer

ROOT = Path(__file__).resolve().parents[2]
ALICE = UserRef("console", "alice")
CACHE_GIB = 0.25


def objects(s3_client: S3Client, bucket: str, prefix: str) -> list[str]:
    pages = s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


@asynccontextmanager
async def s3_chat_side(tmp_path: Path, tiny_preset_dir: Path, bucket: str) -> AsyncIterator[tuple[Running, Database]]:
    config_path = tmp_path / "config.toml"
    config_path.write_text(
        f'[storage]\ndata_dir = "{tmp_path / "data"}"\nblob_store = "s3"\ns3_bucket = "{bucket}"\n'
        f's3_prefix = "bots/alpha"\nblob_cache_gib = {CACHE_GIB}\n'
        f'[engine]\npreset = "tiny"\nmodels_dir = "{tiny_preset_dir.parent}"\n[training]\nsteps = 20\n'
    )
    config = load_config(config_path, preset="tiny")
    async with serve_chat(config, status=io.StringIO()) as running, Database.open(config.database_path) as db:
        yield running, db


@pytest.mark.slow
async def test_the_journey_keeps_every_blob_in_the_bucket_and_forget_lists_none_left(
    tmp_path: Path, tiny_preset_dir: Path, s3_client: S3Client, s3_bucket: str
) -> None:
    data_dir = tmp_path / "data"
    async with s3_chat_side(tmp_path, tiny_preset_dir, s3_bucket) as (running, db):
        service = running.service
        await service.agree(ALICE)
        reply = await service.add_photos(ALICE, [Upload(f"selfie-{n}.jpg", face_photo(n)) for n in range(3)])
        assert reply.text.count(": accepted") == 3, reply.text
        assert (await service.preview(ALICE)).images
        assert "ready" in (await service.train(ALICE, "lora")).text
        drawn = await service.draw(ALICE, "me as an astronaut")
        assert drawn.images and "lora model v1" in drawn.text

        owner = f"u{(await db.get_or_create_user(ALICE.platform, ALICE.platform_user_id)).id}"
        stored = objects(s3_client, s3_bucket, f"bots/alpha/{owner}/")
        kinds = {name.split("/")[3] for name in stored}
        assert {"photos", "faces", "crops", "images", "models"} <= kinds, stored
        for image in drawn.images:  # what a chat adapter sends is a verified copy of a bucket object
            assert image.path.is_relative_to(data_dir / "blob-cache")
            assert f"bots/alpha/{image.path.relative_to(data_dir / 'blob-cache').as_posix()}" in stored

        # No blob folder on local disk: only the cache, within its bound, each copy in the bucket too.
        assert not (data_dir / "blobs").exists()
        copies = [p for p in (data_dir / "blob-cache").rglob("*") if p.is_file()]
        assert copies and sum(p.stat().st_size for p in copies) <= CACHE_GIB * 2**30
        for copy in copies:
            key = copy.relative_to(data_dir / "blob-cache").as_posix()
            assert KEY_RE.fullmatch(key) and f"bots/alpha/{key}" in stored, key

        reply = await service.forget(ALICE)
        assert reply.text.startswith(texts.FORGOTTEN.split("{", 1)[0]), reply.text
        assert objects(s3_client, s3_bucket, f"bots/alpha/{owner}/") == []
        assert not (data_dir / "blob-cache" / owner).exists()
        assert objects(s3_client, s3_bucket, "") == []  # nothing of anyone else was ever written


@pytest.mark.slow
def test_the_demo_on_s3_writes_every_blob_to_the_bucket_and_ends_with_it_empty(
    tmp_path: Path, tiny_preset_dir: Path, s3_server: MotoServer, s3_client: S3Client, s3_bucket: str
) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        f'[storage]\ndata_dir = "{tmp_path / "data"}"\nblob_store = "s3"\ns3_bucket = "{s3_bucket}"\n'
        f'[engine]\npreset = "tiny"\nmodels_dir = "{tiny_preset_dir.parent}"\n'
    )
    done = subprocess.run(  # the AWS variables of s3_env reach the demo and its worker through the environment
        [sys.executable, "-m", "avatarbooth", "demo", "--config", str(config), "--json"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["ok"] is True

    # The S3 server's own request log: every blob the journey made was written to the bucket ...
    written = re.findall(rf'"PUT /{s3_bucket}/(u\d+)/([a-z]+)/[0-9a-f]{{64}}\.[a-z]+ HTTP', s3_server.log_path.read_text())
    assert {kind for _, kind in written} >= {"photos", "faces", "crops", "images", "models"}, written
    # ... none to the data folder, and the demo's /forget left the bucket empty, verified by listing.
    assert not (tmp_path / "data" / "blobs").exists()
    assert objects(s3_client, s3_bucket, "") == []
    assert not any(p.is_file() for p in (tmp_path / "data" / "blob-cache").rglob("*"))


async def test_a_worker_drops_its_cached_copies_once_the_owner_is_erased_and_says_so(
    tmp_path: Path, s3_bucket: str, valkey_url: str
) -> None:
    """Two hosts' caches: the chat side erases the bucket; the worker's copies go with its sweep,
    and `wait_uncached` answers only once the worker's published list no longer names the owner."""
    worker_store = open_blob_store(BlobStoreSettings(
        local_dir=tmp_path / "w", kind="s3", s3_bucket=s3_bucket, cache_dir=tmp_path / "worker-cache", cache_bytes=2**26
    ))
    chat_store = open_blob_store(BlobStoreSettings(
        local_dir=tmp_path / "c", kind="s3", s3_bucket=s3_bucket, cache_dir=tmp_path / "chat-cache", cache_bytes=2**26
    ))
    kept = worker_store.put_written("u2", "models", ".safetensors", lambda f: f.write(b"bob's adapter"))
    erased = worker_store.put_written("u1", "models", ".safetensors", lambda f: f.write(b"alice's adapter"))
    assert worker_store.path(erased).read_bytes() == b"alice's adapter"  # the worker's cached copy

    redis = Redis.from_url(valkey_url)
    jobs = await JobClient.connect(valkey_url)
    key = f"{CACHED_KEY_PREFIX}worker-host:1"
    try:
        assert await sweep_once(worker_store, redis, key) == ["u1", "u2"]
        assert json.loads(await redis.get(key)) == ["u1", "u2"]
        chat_store.delete_owner("u1")  # the chat side's erasure reaches the bucket, not the worker's disk
        await jobs.mark_erased("u1", 60)
        started = time.monotonic()
        assert not await jobs.wait_uncached("u1", timeout_s=0.5)  # the worker has not swept yet
        assert time.monotonic() - started >= 0.5

        waiting = asyncio.create_task(jobs.wait_uncached("u1", timeout_s=10))
        await asyncio.sleep(0.3)
        assert await sweep_once(worker_store, redis, key) == ["u2"]
        assert await waiting
        assert not (tmp_path / "worker-cache" / "u1").exists()
        assert worker_store.path(kept).read_bytes() == b"bob's adapter"
        assert await redis.exists(erased_key("u1"))
    finally:
        await jobs.close()
        await redis.aclose()


def test_opening_the_store_drops_copies_of_owners_erased_while_the_host_was_down(
    tmp_path: Path, s3_bucket: str, s3_client: S3Client
) -> None:
    settings = BlobStoreSettings(local_dir=tmp_path / "b", kind="s3", s3_bucket=s3_bucket,
                                 cache_dir=tmp_path / "cache", cache_bytes=2**26)
    store = open_blob_store(settings)
    gone = store.put_written("u1", "models", ".safetensors", lambda f: f.write(b"alice"))
    kept = store.put_written("u2", "models", ".safetensors", lambda f: f.write(b"bob"))
    s3_client.delete_object(Bucket=s3_bucket, Key=gone)  # erased by another host meanwhile

    reopened = open_blob_store(settings)
    assert reopened.cached_owners() == ["u2"]
    assert not (tmp_path / "cache" / "u1").exists()
    assert reopened.path(kept).read_bytes() == b"bob"


def test_a_versioned_bucket_is_refused_at_opening_because_forget_could_not_erase_it(
    tmp_path: Path, s3_bucket: str, s3_client: S3Client
) -> None:
    from storage.errors import StorageError

    s3_client.put_bucket_versioning(Bucket=s3_bucket, VersioningConfiguration={"Status": "Enabled"})
    settings = BlobStoreSettings(local_dir=tmp_path / "b", kind="s3", s3_bucket=s3_bucket, cache_dir=tmp_path / "c")
    with pytest.raises(StorageError, match=r"has versioning enabled: .*/forget could not erase .*set \[storage\] s3_bucket"):
        open_blob_store(settings)
