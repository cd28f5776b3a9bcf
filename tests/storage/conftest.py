"""A real S3 server (moto's, over HTTP) for the blob store tests: one per test session, a bucket per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.s3server import MotoServer, bucket_name

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

    from storage.s3 import S3BlobStore

CACHE_BYTES = 64 * 2**20


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    with MotoServer(tmp_path_factory.mktemp("moto") / "moto.log") as server:
        yield server


@pytest.fixture
def s3_env(s3_server: MotoServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, str]:
    """The server's address and test keys in the standard AWS variables, and nothing of the
    developer's own AWS setup (profiles, ~/.aws files, instance metadata)."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    return s3_server.env


@pytest.fixture
def s3_client(s3_env: dict[str, str]) -> S3Client:
    """A plain boto3 client on the test server, to look at the bucket behind the store's back."""
    import boto3

    return boto3.client("s3")


@pytest.fixture
def s3_bucket(s3_client: S3Client) -> str:
    name = bucket_name()
    s3_client.create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_store(s3_bucket: str, tmp_path: Path) -> S3BlobStore:
    from storage.cache import BlobCache
    from storage.s3 import S3BlobStore

    return S3BlobStore(s3_bucket, BlobCache(tmp_path / "cache", CACHE_BYTES), prefix="ab/")
