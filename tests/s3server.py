"""A real S3 server for tests and benchmarks: moto's standalone server, as a child process on
127.0.0.1 or a given address (HTTP, a free port). boto3 talks to it over real HTTP, as it would to AWS or MinIO."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from types import TracebackType

from avatarbooth.orphans import guarded
from tests.support import free_port

# Test credentials: moto accepts any; distinctive so a test can look for them in logs.
ACCESS_KEY_ID = "AKIATESTONLY7EXAMPLE"
SECRET_ACCESS_KEY = "test-only-secret-9f2c1e7a0b"
REGION = "us-east-1"


class MotoServer:
    """``with MotoServer(log) as server:`` runs ``moto_server`` until the block ends (and dies with
    this process however it ends); ``server.env`` is what a client needs in the environment."""

    def __init__(self, log_path: Path, *, host: str = "127.0.0.1", start_timeout_s: float = 60.0) -> None:
        self.log_path = log_path
        self.host = host
        self._timeout_s = start_timeout_s
        self._process: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY_ID,
            "AWS_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY,
            "AWS_DEFAULT_REGION": REGION,
        }

    def __enter__(self) -> MotoServer:
        self.port = free_port()
        command = [sys.executable, "-m", "moto.server", "-H", self.host, "-p", str(self.port)]
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(guarded(command), stdout=log, stderr=subprocess.STDOUT)
        try:
            self._wait_ready()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _wait_ready(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + self._timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"moto_server stopped while starting; see {self.log_path}")
            try:
                with urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=2):
                    return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.1)
        raise RuntimeError(f"moto_server did not answer in {self._timeout_s:.0f} s; see {self.log_path}")

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._process is None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process = None


def bucket_name(stem: str = "test") -> str:
    """A fresh, valid bucket name."""
    return f"{stem}-{uuid.uuid4().hex[:16]}"
