"""Blob store throughput: LocalBlobStore against S3BlobStore, in one run.

Stores 100 photo-sized blobs (200 KB each) and one adapter-sized blob (50 MB; ``--adapter-mb``
makes it smaller) in each store, then reads them back: ``get`` of every photo, and ``path`` of the
adapter as a worker opens it (for S3 once from an empty cache, fetched in ranged parts and checked
by its hash, then once more from the cache). The adapter is written with ``put_written``, the
streaming write checkpoints and DreamBooth weights use (multipart past 64 MiB on S3). Each S3 put
is two requests (HEAD: is that content stored already? then PUT); the local store fsyncs each file.

The S3 store talks to the S3 server that AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY
and AWS_DEFAULT_REGION point at when ``--bucket`` names an existing bucket there (objects go under
a fresh prefix, deleted afterwards); otherwise it starts moto's server on 127.0.0.1 (over HTTP, in
memory: it measures our code and the HTTP path, not a real disk or network).

    python bench/s3.py                     # against moto; one JSON object
    python bench/s3.py --adapter-mb 5      # a smaller adapter
    AWS_ENDPOINT_URL=... python bench/s3.py --bucket my-bucket
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from storage.blobs import BlobStore, LocalBlobStore  # noqa: E402
from storage.cache import BlobCache  # noqa: E402

PHOTOS = 100
PHOTO_BYTES = 200_000
MIB = 2**20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=int, default=PHOTOS, help="how many photo-sized blobs")
    parser.add_argument("--adapter-mb", type=float, default=50.0, help="size of the adapter-sized blob, MB")
    parser.add_argument("--bucket", help="an existing bucket on the AWS_* server (default: start moto's)")
    args = parser.parse_args()
    photos = [os.urandom(PHOTO_BYTES) for _ in range(args.photos)]
    adapter_bytes = int(args.adapter_mb * 1_000_000)
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="avatarbooth-bench-s3-")))
        s3, server = _s3_store(stack, work, args.bucket)
        results: dict[str, Any] = {
            "photos": len(photos),
            "photo_bytes": PHOTO_BYTES,
            "adapter_bytes": adapter_bytes,
            "s3_server": server,
            "local": measure(LocalBlobStore(work / "local"), photos, adapter_bytes),
            "s3": measure(s3, photos, adapter_bytes, fresh=lambda: _fresh_cache(s3, work)),
        }
        s3.delete_owner("u1")
    # How many times longer S3 takes for the transfers (`path` on the local store is a stat, no transfer).
    results["s3_slowdown"] = {
        step: round(results["s3"][f"{step}_s"] / results["local"][f"{step}_s"], 1)
        for step in ("photos_put", "photos_get", "adapter_put_written")
    }
    print(json.dumps(results, indent=2))
    return 0


def measure(store: BlobStore, photos: list[bytes], adapter_bytes: int,
            fresh: Callable[[], BlobStore] | None = None) -> dict[str, float]:
    """Seconds and MB/s of each step on one store; `fresh` gives the store with an empty cache."""
    timings: dict[str, float] = {}
    started = time.perf_counter()
    keys = [store.put("u1", "photos", photo, ".jpg") for photo in photos]
    _record(timings, "photos_put", time.perf_counter() - started, len(photos) * PHOTO_BYTES)

    started = time.perf_counter()
    for key, photo in zip(keys, photos, strict=True):
        if store.get(key) != photo:
            raise SystemExit(f"{key} came back different")
    _record(timings, "photos_get", time.perf_counter() - started, len(photos) * PHOTO_BYTES)

    started = time.perf_counter()
    key = store.put_written("u1", "lora", ".safetensors", lambda f: _write_adapter(f, adapter_bytes))
    _record(timings, "adapter_put_written", time.perf_counter() - started, adapter_bytes)

    reader = fresh() if fresh is not None else store
    started = time.perf_counter()
    path = reader.path(key)
    _record(timings, "adapter_path_first", time.perf_counter() - started, adapter_bytes)
    started = time.perf_counter()
    reader.path(key)
    _record(timings, "adapter_path_again", time.perf_counter() - started, adapter_bytes)
    if path.stat().st_size != adapter_bytes:
        raise SystemExit(f"{key}: the file at its path has the wrong size")
    return timings


def _record(timings: dict[str, float], name: str, seconds: float, size: int) -> None:
    timings[f"{name}_s"] = round(seconds, 4)
    if seconds > 0.001:  # below that nothing was transferred (a stat, a cache hit): no rate
        timings[f"{name}_mb_s"] = round(size / 1e6 / seconds, 1)


def _write_adapter(file: IO[bytes], size: int) -> None:
    """Random bytes in 1 MiB pieces, as torch.save or safetensors would stream them."""
    chunk = os.urandom(MIB)
    written = 0
    while written < size:
        piece = chunk[: min(MIB, size - written)]
        file.write(piece)
        written += len(piece)


def _s3_store(stack: ExitStack, work: Path, bucket: str | None) -> tuple[Any, str]:
    from storage.s3 import S3BlobStore

    cache = BlobCache(work / "cache", 4 * 2**30)
    if bucket:
        store = S3BlobStore(bucket, cache, prefix=f"bench-{uuid.uuid4().hex[:12]}")
        store.check()
        return store, "AWS_* environment"
    import boto3

    from tests.s3server import MotoServer, bucket_name

    server = stack.enter_context(MotoServer(work / "moto.log"))
    os.environ.update(server.env)
    name = bucket_name("bench")
    boto3.client("s3").create_bucket(Bucket=name)
    return S3BlobStore(name, cache), "moto (started by the benchmark, on 127.0.0.1)"


def _fresh_cache(store: Any, work: Path) -> BlobStore:
    """The same bucket with an empty cache: another host's first read."""
    from storage.s3 import S3BlobStore

    s3: S3BlobStore = store
    return S3BlobStore(s3.bucket, BlobCache(work / f"cache-{uuid.uuid4().hex[:8]}", 4 * 2**30), prefix=s3.prefix)


if __name__ == "__main__":
    raise SystemExit(main())
