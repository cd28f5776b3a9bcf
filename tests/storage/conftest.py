"""The S3 blob store under test, on the real S3 server of tests/conftest.py (a bucket per test)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from storage.s3 import S3BlobStore

CACHE_BYTES = 64 * 2**20


@pytest.fixture
def s3_store(s3_bucket: str, tmp_path: Path) -> S3BlobStore:
    from storage.cache import BlobCache
    from storage.s3 import S3BlobStore

    return S3BlobStore(s3_bucket, BlobCache(tmp_path / "cache", CACHE_BYTES), prefix="ab/")
