"""Shared fixtures: an isolated environment, the tiny preset built once per test session, and real
Valkey and S3 servers."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

    from tests.s3server import MotoServer

# No test may reach a model hub or write into the user's caches.
_SANDBOX = Path(tempfile.mkdtemp(prefix="avatarbooth-tests-"))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HOME"] = str(_SANDBOX / "hf")
os.environ["XDG_CACHE_HOME"] = str(_SANDBOX / "cache")
os.environ["INSIGHTFACE_HOME"] = str(_SANDBOX / "insightface")
if os.environ.get("PYTEST_XDIST_WORKER"):  # one CPU thread per test worker (and its subprocesses): no oversubscription
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tiny_preset_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The tiny preset's model folder, built once for the whole test session."""
    from engine.tiny.models import build_tiny_preset

    yield build_tiny_preset(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture
def valkey_url(tmp_path: Path) -> Iterator[str]:
    """A real Valkey server (the embedded one the CLI uses), private to one test."""
    from avatarbooth.valkey import EmbeddedValkey

    with EmbeddedValkey(tmp_path / "valkey") as server:
        yield server.url



@pytest.fixture(scope="session")
def tiny_sd15_preset_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The tiny SD1.5 preset's model folder (``tiny-sd15``), built once for the whole test session."""
    from engine.tiny.models import build_tiny_sd15_preset

    yield build_tiny_sd15_preset(tmp_path_factory.mktemp("models") / "tiny-sd15")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """A real S3 server (moto's, over HTTP on 127.0.0.1), one per test process."""
    from tests.s3server import MotoServer

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
    from tests.s3server import bucket_name

    name = bucket_name()
    s3_client.create_bucket(Bucket=name)
    return name
