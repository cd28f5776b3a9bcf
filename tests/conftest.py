"""Shared fixtures: an isolated environment, and the tiny preset built once per test session."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

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
