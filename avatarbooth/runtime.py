"""Process supervision: the queue server, the worker process and the chat side, started and stopped
together. ``serve_chat`` is what ``demo``, ``chat`` and ``run`` share.

The children (the embedded Valkey, the worker) are started through `avatarbooth.orphans`, so they die
with the chat process however it ends (SIGKILL too), and a `Supervisor` starts again whichever of
them dies on its own, with back-off. Work is not lost meanwhile: Valkey keeps an append-only file,
a dead worker's jobs are taken up again once their lease lapses (`engine.api.JOB_LEASE_S`), and the
chat side waits out a queue outage (`bot.jobs.JobClient`)."""

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
from typing import IO, Protocol

from redis.asyncio import Redis

from avatarbooth.config import AppConfig
from avatarbooth.orphans import guarded
from avatarbooth.valkey import EmbeddedValkey
from bot.jobs import JobClient
from bot.runner import JobRunner
from bot.service import BotService
from engine.api import WORKER_KEY_PREFIX
from storage.blobs import BlobStore, open_blob_store
from storage.db import Database
from storage.errors import StorageError

_log = logging.getLogger(__name__)


class StartupError(Exception):
    """Something the chat side depends on did not start; the message says what and where to look."""


@dataclass
class Running:
    config: AppConfig
    service: BotService
    database: Database  # for the adapters' inboxes (`bot.inbox`); the service has its own handle
    redis_url: str
    worker: WorkerProcess | None = None  # None: workers run elsewhere (start_worker=False)
    valkey: EmbeddedValkey | None = None  # None: an external Redis/Valkey


@asynccontextmanager
async def serve_chat(
    config: AppConfig, *, start_worker: bool = True, status: IO[str] = sys.stderr, serve_metrics: bool = False
) -> AsyncIterator[Running]:
    """Open the blob store, start (embedded Valkey →) worker → database, metrics and service; stop
    them in reverse order. ``serve_metrics`` (`avatarbooth run`): /metrics and /healthz where
    ``[metrics]`` says, and the worker started here serves its own at ``worker_port``; otherwise
    neither does."""
    async with AsyncExitStack() as stack:
        blobs = await asyncio.to_thread(_open_blobs, config)  # first: a bad [storage] fails before all else
        url = config.redis_url
        children: list[Child] = []
        valkey: EmbeddedValkey | None = None
        worker: WorkerProcess | None = None
        if url is None:
            valkey = stack.enter_context(EmbeddedValkey(config.valkey_dir))
            url = valkey.url
            children.append(valkey)
        config = config.with_redis_url(url)
        if start_worker:
            worker = stack.enter_context(WorkerProcess(config, metrics=serve_metrics))
            print(f"starting the worker (preset {config.engine.preset}); its log: {worker.log_path}", file=status)
            await worker.wait_ready(url)
            children.append(worker)
        if children:
            await stack.enter_async_context(Supervisor(children, status=status))
        db = await stack.enter_async_context(Database.open(config.database_path))
        jobs = await stack.enter_async_context(await JobClient.connect(url))
        observer = None
        if serve_metrics and config.metrics.port is not None:
            from avatarbooth.metrics import MetricsError, serving

            try:
                metrics = await stack.enter_async_context(
                    serving("chat", url, host=config.metrics.host, port=config.metrics.port, database=db)
                )
            except MetricsError as e:
                raise StartupError(str(e)) from e
            print(f"metrics at http://{config.metrics.host}:{metrics.port}/metrics", file=status)
            observer = metrics.jobs
        service = BotService(
            db,
            blobs,
            jobs,
            config.bot,
            preset_name=config.engine.preset,
            blocklist=config.blocklist,
            runner=JobRunner(db, blobs, jobs, config.bot, observer=observer),
        )
        settling = asyncio.create_task(_settle_erasures(service), name="avatarbooth-erasures")
        try:
            yield Running(
                config=config, service=service, database=db, redis_url=url, worker=worker, valkey=valkey
            )
        finally:
            settling.cancel()
            await asyncio.gather(settling, return_exceptions=True)


def _open_blobs(config: AppConfig) -> BlobStore:
    """The configured blob store; a bucket that cannot be used stops the start-up, saying why."""
    try:
        return open_blob_store(config.blob_store)
    except StorageError as e:
        raise StartupError(f"the blob store cannot be used: {e}") from e


ERASURE_RETRY_S = 2.0
"""How often pending erasures (`BotService.settle_erasures`) are tried again."""


async def _settle_erasures(service: BotService) -> None:
    """Finish, in the background, every /forget that could not be finished at once; also those a
    previous run left pending."""
    while True:
        try:
            await service.settle_erasures()
        except Exception:  # never let one failure stop erasures for good
            _log.exception("settling pending erasures failed; trying again")
        await asyncio.sleep(ERASURE_RETRY_S)


class Child(Protocol):
    """A process `Supervisor` keeps running."""

    @property
    def log_path(self) -> Path: ...

    def alive(self) -> bool: ...

    def restart(self) -> None: ...


class Supervisor:
    """Starts again each child that died (not one being stopped), waiting 0.5 s, 1 s, 2 s … up to
    30 s between attempts while it keeps dying; a child that ran a minute starts the count anew."""

    POLL_S = 0.5
    MAX_DELAY_S = 30.0
    STEADY_S = 60.0

    def __init__(self, children: list[Child], *, status: IO[str]) -> None:
        self._children = children
        self._status = status
        self._task: asyncio.Task[None] | None = None
        self.restarts = 0

    async def __aenter__(self) -> Supervisor:
        self._task = asyncio.create_task(self._watch(), name="avatarbooth-supervisor")
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    async def _watch(self) -> None:
        failures = {id(c): 0 for c in self._children}
        started = {id(c): time.monotonic() for c in self._children}
        while True:
            await asyncio.sleep(self.POLL_S)
            for child in self._children:
                if child.alive():
                    if time.monotonic() - started[id(child)] > self.STEADY_S:
                        failures[id(child)] = 0
                    continue
                delay = min(self.MAX_DELAY_S, 0.5 * 2 ** failures[id(child)])
                failures[id(child)] += 1
                name = type(child).__name__
                print(f"{_CHILD_NAMES.get(name, name)} stopped; starting it again in {delay:g} s "
                      f"(its log: {child.log_path})", file=self._status)
                await asyncio.sleep(delay)
                try:
                    child.restart()  # here, in the event loop's thread: see avatarbooth.orphans
                except (OSError, RuntimeError) as e:
                    print(f"{_CHILD_NAMES.get(name, name)} did not start again: {e}", file=self._status)
                    continue
                started[id(child)] = time.monotonic()
                self.restarts += 1


_CHILD_NAMES = {"WorkerProcess": "the worker", "EmbeddedValkey": "the embedded Valkey"}


class WorkerProcess:
    """``avatarbooth worker`` as a child process, logging to the data folder."""

    def __init__(self, config: AppConfig, *, metrics: bool = False) -> None:
        self._config = config
        self._metrics = metrics  # False: the child serves no metrics, whatever [metrics] worker_port says
        self.log_path = config.data_dir / "logs" / "worker.log"
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> WorkerProcess:
        self._launch()
        return self

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def restart(self) -> None:
        if self._process is not None:
            self._process.wait()
        self._launch()

    def _launch(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env["AVATARBOOTH_REDIS_URL"] = self._config.engine.redis_url
        env["AVATARBOOTH_DATA"] = str(self._config.data_dir)
        command = [sys.executable, "-m", "avatarbooth", "worker", "--preset", self._config.engine.preset]
        if self._config.config_path is not None:
            command += ["--config", str(self._config.config_path)]
        if not self._metrics:
            command += ["--metrics-port", "0"]
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(guarded(command), stdout=log, stderr=subprocess.STDOUT, env=env)

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
