"""Process supervision: the queue server, the worker process and the chat side, started and stopped
together. ``serve_chat`` is what ``demo``, ``chat`` and ``run`` share."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from redis.asyncio import Redis

from avatarbooth.config import AppConfig
from avatarbooth.valkey import EmbeddedValkey
from bot.jobs import JobClient
from bot.service import BotService
from engine.api import WORKER_KEY_PREFIX
from storage.blobs import LocalBlobStore
from storage.db import Database

_log = logging.getLogger(__name__)


class StartupError(Exception):
    """Something the chat side depends on did not start; the message says what and where to look."""


@dataclass
class Running:
    config: AppConfig
    service: BotService
    redis_url: str


@asynccontextmanager
async def serve_chat(
    config: AppConfig, *, start_worker: bool = True, status: IO[str] = sys.stderr
) -> AsyncIterator[Running]:
    """Start (embedded Valkey →) worker → database, blobs and service; stop them in reverse order."""
    async with AsyncExitStack() as stack:
        url = config.redis_url
        if url is None:
            valkey = stack.enter_context(EmbeddedValkey(config.valkey_dir))
            url = valkey.url
        config = config.with_redis_url(url)
        if start_worker:
            worker = stack.enter_context(WorkerProcess(config))
            print(f"starting the worker (preset {config.engine.preset}); its log: {worker.log_path}", file=status)
            await worker.wait_ready(url)
        db = await stack.enter_async_context(Database.open(config.database_path))
        jobs = await stack.enter_async_context(await JobClient.connect(url))
        blobs = LocalBlobStore(config.engine.blobs_dir)
        service = BotService(
            db, blobs, jobs, config.bot, preset_name=config.engine.preset, blocklist=config.blocklist
        )
        yield Running(config=config, service=service, redis_url=url)


class WorkerProcess:
    """``avatarbooth worker`` as a child process, logging to the data folder."""

    def __init__(self, config: AppConfig) -> None:
        self._config = config
        self.log_path = config.data_dir / "logs" / "worker.log"
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> WorkerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env["AVATARBOOTH_REDIS_URL"] = self._config.engine.redis_url
        env["AVATARBOOTH_DATA"] = str(self._config.data_dir)
        command = [sys.executable, "-m", "avatarbooth", "worker", "--preset", self._config.engine.preset]
        if self._config.config_path is not None:
            command += ["--config", str(self._config.config_path)]
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        return self

    async def wait_ready(self, redis_url: str, timeout_s: float = 600.0) -> None:
        """Wait until the worker has loaded its models; fail fast, with its last words, if it dies."""
        assert self._process is not None
        deadline = time.monotonic() + timeout_s
        redis = Redis.from_url(redis_url)
        try:
            while time.monotonic() < deadline:
                if self._process.poll() is not None:
                    raise StartupError(f"the worker stopped while starting:\n{self._log_tail()}")
                if await redis.keys(f"{WORKER_KEY_PREFIX}*:{self._process.pid}"):
                    return
                await asyncio.sleep(0.2)
        finally:
            await redis.aclose()
        raise StartupError(f"the worker did not become ready in {timeout_s:.0f} s; see {self.log_path}")

    def _log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return f"(no log at {self.log_path})"
        return "\n".join(text[-lines:])

    def __exit__(self, *exc: object) -> None:
        if self._process is None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process = None


def default_out_dir(config: AppConfig, name: str) -> Path:
    return config.data_dir / "out" / name
