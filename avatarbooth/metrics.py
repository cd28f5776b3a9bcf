"""Prometheus metrics and ``/healthz`` for `avatarbooth run` (the chat side) and `avatarbooth worker`.

Each process serves its own registry over HTTP (aiohttp, in its event loop) on the port
``[metrics]`` names (docs/operations.md lists every metric). What lives in Valkey or SQLite (queue
depth, workers alive, users enrolled) is read when Prometheus scrapes, so the numbers are never
older than the scrape; jobs are counted where the chat side finishes them, through
`bot.runner.JobObserver`, which `JobMetrics` implements. Labels are fixed, small sets (queue, job
kind, training method, outcome, GPU device): never a user id, a prompt or anything else of a user's.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Literal

from aiohttp import web
from arq.constants import in_progress_key_prefix
from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from redis.asyncio import Redis
from redis.exceptions import RedisError

from engine.api import QUEUE_INTERACTIVE, QUEUE_TRAINING, WORKER_KEY_PREFIX
from storage.db import Database
from storage.errors import StorageError

_log = logging.getLogger(__name__)

Role = Literal["chat", "worker"]
QUEUES = {"interactive": QUEUE_INTERACTIVE, "training": QUEUE_TRAINING}
"""The ``queue`` label's values and the arq queue (a sorted set in Valkey) each names."""
DURATION_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)
"""Seconds: photo checks take about a second, draws tens of seconds, training up to an hour or more."""
PROBE_TIMEOUT_S = 2.0
"""How long a scrape or a health check waits for Valkey (or SQLite) before it says it is down."""
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # the text format generate_latest writes


class MetricsError(Exception):
    """The metrics server could not start; the message says which setting to change."""


class JobMetrics:
    """Job durations and outcomes per kind and method: the chat side's `bot.runner.JobObserver`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ("kind", "method", "outcome")
        self._finished = Counter(
            "avatarbooth_jobs", "Jobs the chat side finished waiting on, by kind, method and outcome.",
            labels, registry=registry,
        )
        self._duration = Histogram(
            "avatarbooth_job_duration_seconds", "From submitting a job to its result (or failure), in seconds.",
            labels, buckets=DURATION_BUCKETS, registry=registry,
        )

    def job_finished(self, kind: str, method: str, outcome: str, seconds: float) -> None:
        self._finished.labels(kind, method, outcome).inc()
        self._duration.labels(kind, method, outcome).observe(seconds)


@dataclass
class Observed:
    """What one scrape read from Valkey and SQLite; None where it could not be read."""

    valkey_up: bool = False
    waiting: dict[str, int] = field(default_factory=dict)  # queue label -> jobs not yet started
    running: dict[str, int] = field(default_factory=dict)  # queue label -> jobs a worker holds
    workers_alive: int | None = None
    users_enrolled: int | None = None


class _ObservedCollector(Collector):
    """Yields the gauges of the latest `Observed` (set by the scrape handler just before)."""

    def __init__(self) -> None:
        self.latest = Observed()

    def collect(self) -> Iterator[Metric]:
        seen = self.latest
        yield GaugeMetricFamily(
            "avatarbooth_valkey_up", "1 when Valkey/Redis answered this scrape, else 0.", value=int(seen.valkey_up)
        )
        for name, values, help_text in (
            ("avatarbooth_queue_depth", seen.waiting, "Jobs waiting in the queue (not yet taken by a worker)."),
            ("avatarbooth_queue_running", seen.running, "Jobs of the queue a worker is running now."),
        ):
            family = GaugeMetricFamily(name, help_text, labels=["queue"])
            for queue, count in values.items():
                family.add_metric([queue], count)
            yield family
        if seen.workers_alive is not None:
            yield GaugeMetricFamily(
                "avatarbooth_workers_alive", "Workers whose heartbeat key is in Valkey (models loaded, serving).",
                value=seen.workers_alive,
            )
        if seen.users_enrolled is not None:
            yield GaugeMetricFamily(
                "avatarbooth_users_enrolled", "Users with at least one accepted photo or a personal model.",
                value=seen.users_enrolled,
            )


class GpuMemory(Collector):
    """CUDA memory this worker process holds, per visible device; no samples without CUDA.

    torch is imported on the first scrape, never by the chat side (which never registers this)."""

    def collect(self) -> Iterator[Metric]:
        import torch

        allocated = GaugeMetricFamily(
            "avatarbooth_gpu_memory_allocated_bytes", "GPU memory in use by tensors of this worker.", labels=["device"]
        )
        reserved = GaugeMetricFamily(
            "avatarbooth_gpu_memory_reserved_bytes", "GPU memory held by this worker's caching allocator.",
            labels=["device"],
        )
        if torch.cuda.is_available():
            for index in range(torch.cuda.device_count()):
                allocated.add_metric([f"cuda:{index}"], torch.cuda.memory_allocated(index))
                reserved.add_metric([f"cuda:{index}"], torch.cuda.memory_reserved(index))
        yield allocated
        yield reserved


class PersonalModelDraws(Collector):
    """A worker's draws with a personal model, by whether it was in memory already (engine.residency)."""

    def collect(self) -> Iterator[Metric]:
        from engine.residency import DRAWS

        held, loaded = DRAWS.counts()
        draws = CounterMetricFamily(
            "avatarbooth_personal_model_draws",
            "Draws with a LoRA or DreamBooth model, by whether this worker held it in memory already.",
            labels=["resident"],
        )
        draws.add_metric(["yes"], held)
        draws.add_metric(["no"], loaded)
        yield draws


class MetricsServer:
    """``/metrics`` and ``/healthz`` of one process, on ``host:port`` (0: any free port)."""

    def __init__(
        self, role: Role, redis_url: str, *, host: str, port: int, database: Database | None = None
    ) -> None:
        self.role = role
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self._observed = _ObservedCollector()
        self.registry.register(self._observed)
        if role == "worker":
            self.registry.register(GpuMemory())
            self.registry.register(PersonalModelDraws())
        self.jobs = JobMetrics(self.registry) if role == "chat" else None
        self._redis = Redis.from_url(redis_url, socket_timeout=PROBE_TIMEOUT_S, socket_connect_timeout=PROBE_TIMEOUT_S)
        self._database = database
        self._host, self._port = host, port
        self._runner: web.AppRunner | None = None

    @property
    def port(self) -> int:
        """The port listened on (the one chosen when constructed with 0)."""
        assert self._runner is not None, "the server is not started"
        return int(self._runner.addresses[0][1])

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        try:
            await web.TCPSite(self._runner, self._host, self._port).start()
        except OSError as e:
            await self.close()
            setting = "port" if self.role == "chat" else "worker_port (or --metrics-port)"
            raise MetricsError(
                f"cannot serve metrics on {self._host}:{self._port} ({e.strerror or e}): "
                f"set another [metrics] {setting} in config.toml, or 0 for none"
            ) from e
        _log.info("metrics at http://%s:%d/metrics, health at /healthz", self._host, self.port)

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self._redis.aclose()

    async def health(self) -> str | None:
        """None when healthy, else a short reason: Valkey does not answer PING, or (chat side) no
        worker has a heartbeat key."""
        try:
            async with asyncio.timeout(PROBE_TIMEOUT_S):
                await self._redis.ping()
                if self.role == "chat" and not await _count_workers(self._redis, stop_at=1):
                    return f"no worker heartbeat: no {WORKER_KEY_PREFIX}* key in Valkey"
        except (RedisError, OSError, TimeoutError) as e:
            return f"Valkey does not answer PING ({type(e).__name__})"
        return None

    async def observe(self) -> Observed:
        """Read the queues, the workers' heartbeats and (chat side) the enrolled users now."""
        seen = Observed()
        try:
            async with asyncio.timeout(PROBE_TIMEOUT_S):
                for name, key in QUEUES.items():
                    seen.waiting[name], seen.running[name] = await _queue_counts(self._redis, key)
                seen.workers_alive = await _count_workers(self._redis)
                seen.valkey_up = True
        except (RedisError, OSError, TimeoutError) as e:
            _log.debug("metrics: Valkey did not answer (%s)", type(e).__name__)
            seen.waiting, seen.running, seen.workers_alive = {}, {}, None
        if self._database is not None:
            try:
                async with asyncio.timeout(PROBE_TIMEOUT_S):
                    seen.users_enrolled = await self._database.count_enrolled_users()
            except (StorageError, TimeoutError) as e:
                _log.warning("metrics: users enrolled not read (%s)", type(e).__name__)
        return seen

    async def _metrics(self, request: web.Request) -> web.Response:
        self._observed.latest = await self.observe()
        return web.Response(body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE})

    async def _healthz(self, request: web.Request) -> web.Response:
        reason = await self.health()
        if reason is None:
            return web.Response(text="ok\n")
        return web.Response(status=503, text=reason + "\n")


@asynccontextmanager
async def serving(
    role: Role, redis_url: str, *, host: str, port: int, database: Database | None = None
) -> AsyncIterator[MetricsServer]:
    """A started `MetricsServer`, closed on exit."""
    server = MetricsServer(role, redis_url, host=host, port=port, database=database)
    await server.start()
    try:
        yield server
    finally:
        await server.close()


async def _queue_counts(redis: Redis, queue_key: str) -> tuple[int, int]:
    """(waiting, running) of one arq queue: its sorted set holds a job until it finishes, and a job
    a worker holds has an in-progress key."""
    job_ids = await redis.zrange(queue_key, 0, -1)
    if not job_ids:
        return 0, 0
    async with redis.pipeline(transaction=False) as pipe:
        for job_id in job_ids:
            pipe.exists(in_progress_key_prefix + job_id.decode())
        running = sum(int(bool(found)) for found in await pipe.execute())
    return len(job_ids) - running, running


async def _count_workers(redis: Redis, *, stop_at: int | None = None) -> int:
    count = 0
    async for _key in redis.scan_iter(match=WORKER_KEY_PREFIX + "*", count=100):
        count += 1
        if stop_at is not None and count >= stop_at:
            break
    return count
