"""The chat side's job client: idempotent enqueueing on arq, and waiting with progress.

Job ids come from database rows (``engine.api.arq_job_id``), so submitting the same job twice is a
no-op: arq refuses a second job with an id it already holds (queued, running, or with a kept result).
Results come back as the raw dicts the worker returned; `bot.service` parses them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from types import TracebackType
from typing import Any

from arq.connections import ArqRedis, RedisSettings, create_pool
from arq.constants import (
    abort_jobs_ss,
    in_progress_key_prefix,
    job_key_prefix,
    result_key_prefix,
    retry_key_prefix,
)
from arq.jobs import DeserializationError, ResultNotFound, SerializationError, deserialize_result
from redis.exceptions import RedisError, ResponseError

from bot import texts
from bot.errors import JobFailed, QueueUnavailable
from engine.api import (
    CACHED_KEY_PREFIX,
    JOB_QUEUES,
    CheckPhotoRequest,
    DrawRequest,
    JobName,
    PreviewRequest,
    TrainRequest,
    deserialize_job,
    erased_key,
    progress_key,
    serialize_job,
)

_log = logging.getLogger(__name__)

JobRequest = CheckPhotoRequest | PreviewRequest | TrainRequest | DrawRequest
ProgressFields = dict[str, str]
"""A worker's progress hash, decoded: step, total, loss, eta_s, stage (each optional)."""
ProgressSink = Callable[[ProgressFields], Awaitable[None]]
StateSink = Callable[[str], Awaitable[None]]
"""Told "running" when a worker holds the job (its lease is alive), "queued" when none does."""


def job_name_of(job_id: str) -> JobName:
    """The job name an arq job id starts with: ``"train-12"`` -> ``JobName.TRAIN``."""
    kind, _, number = job_id.rpartition("-")
    try:
        name = JobName(kind)
    except ValueError:
        raise ValueError(f"job id {job_id!r} does not look like '<job name>-<row id>'") from None
    if not number.isdigit():
        raise ValueError(f"job id {job_id!r} does not end with a database row id")
    return name


class JobClient:
    """Enqueue jobs for the workers and wait for their results over an arq `ArqRedis` pool."""

    def __init__(self, redis: ArqRedis, *, poll_delay: float = 0.25, outage_grace_s: float = 120.0) -> None:
        self._redis = redis
        self._poll_delay = poll_delay
        self._outage_grace_s = outage_grace_s
        self._waiters: set[_Waiter] = set()
        self._watcher: asyncio.Task[None] | None = None

    @classmethod
    async def connect(
        cls,
        redis_url: str,
        *,
        poll_delay: float = 0.25,
        conn_retries: int = 2,
        outage_grace_s: float = 120.0,
    ) -> JobClient:
        """Open a pool to the Redis/Valkey at `redis_url` with the contract's msgpack serializers."""
        settings = RedisSettings.from_dsn(redis_url)
        settings.conn_retries = conn_retries
        try:
            redis = await create_pool(
                settings, job_serializer=serialize_job, job_deserializer=deserialize_job
            )
        except (RedisError, OSError) as exc:
            raise QueueUnavailable(f"cannot connect to {settings.host}:{settings.port}: {exc}") from exc
        return cls(redis, poll_delay=poll_delay, outage_grace_s=outage_grace_s)

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
        await self._redis.aclose()

    async def __aenter__(self) -> JobClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def redis(self) -> ArqRedis:
        """The underlying pool (tests and the composition root use it to inspect queues)."""
        return self._redis

    async def submit(self, name: JobName, request: JobRequest, job_id: str) -> bool:
        """Enqueue `request` for worker function `name` under `job_id`.

        Returns False when arq already holds a job with this id (queued, running or finished):
        that is the idempotency the row-derived ids give, not an error.
        """
        if request.job_id != job_id:
            raise ValueError(f"request.job_id {request.job_id!r} differs from job_id {job_id!r}")
        try:
            job = await self._redis.enqueue_job(
                str(name), request.to_dict(), _job_id=job_id, _queue_name=JOB_QUEUES[name]
            )
        except (RedisError, OSError) as exc:
            raise QueueUnavailable(f"enqueue {job_id}: {exc}") from exc
        if job is None:
            _log.info("job %s already known to the queue; not enqueued again", job_id)
        return job is not None

    async def forget_jobs(self, job_ids: Iterable[str]) -> None:
        """Drop what the queue holds about these jobs: queued entries, kept results, progress.

        Used by /forget (results hold blob keys of the user) and so that a reused row id can never
        be answered with an old result. A job a worker is running right now still finishes.
        """
        ids = list(job_ids)
        if not ids:
            return
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for job_id in ids:
                    pipe.zrem(JOB_QUEUES[job_name_of(job_id)], job_id)
                    pipe.delete(
                        job_key_prefix + job_id,
                        result_key_prefix + job_id,
                        retry_key_prefix + job_id,
                        progress_key(job_id),
                    )
                await pipe.execute()
        except (RedisError, OSError) as exc:
            raise QueueUnavailable(f"forget jobs: {exc}") from exc

    async def abort(self, job_ids: Iterable[str]) -> None:
        """Ask the workers to stop these jobs (arq's abort: a running one is cancelled, and stops at
        its next step; a queued one is dropped when a worker would start it)."""
        ids = list(job_ids)
        if not ids:
            return
        now_ms = int(time.time() * 1000)
        try:
            await self._redis.zadd(abort_jobs_ss, {job_id: now_ms for job_id in ids})
        except (RedisError, OSError) as exc:
            raise QueueUnavailable(f"abort jobs: {exc}") from exc

    async def mark_erased(self, owner: str, ttl_s: float) -> None:
        """Tell the workers that ``owner`` was erased (``engine.api.erased_key``)."""
        try:
            await self._redis.set(erased_key(owner), "1", px=int(ttl_s * 1000))
        except (RedisError, OSError) as exc:
            raise QueueUnavailable(f"mark erased: {exc}") from exc

    async def wait_uncached(self, owner: str, timeout_s: float = 5.0) -> bool:
        """Whether no worker lists cached copies of ``owner``'s blobs, waiting up to ``timeout_s``
        for their sweeps to drop them (``engine.erasure``; call after `mark_erased`)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                keys = [key async for key in self._redis.scan_iter(match=CACHED_KEY_PREFIX + "*", count=100)]
                lists = await self._redis.mget(keys) if keys else []
            except (RedisError, OSError) as exc:
                raise QueueUnavailable(f"look up cached copies: {exc}") from exc
            if not any(owner in json.loads(value) for value in lists if value):
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.2)

    async def unsettled(self, job_ids: Iterable[str]) -> list[str]:
        """Those of the jobs a worker still runs, or whose kept result or entry is still stored."""

        def ask(pipe: Any, job_id: str) -> None:
            pipe.exists(in_progress_key_prefix + job_id, job_key_prefix + job_id, result_key_prefix + job_id)
            pipe.zscore(JOB_QUEUES[job_name_of(job_id)], job_id)

        answers = await self._ask_each(job_ids, ask, per_job=2)
        return [job_id for job_id, (stored, queued) in answers if stored or queued is not None]

    async def running(self, job_ids: Iterable[str]) -> list[str]:
        """Those of the jobs a worker holds right now (its lease is alive)."""
        answers = await self._ask_each(job_ids, lambda pipe, job_id: pipe.exists(in_progress_key_prefix + job_id))
        return [job_id for job_id, (held,) in answers if held]

    async def _ask_each(
        self, job_ids: Iterable[str], ask: Callable[[Any, str], Any], *, per_job: int = 1
    ) -> list[tuple[str, tuple[Any, ...]]]:
        """One pipeline round asking ``ask``'s ``per_job`` commands of every job; each job's replies."""
        ids = list(job_ids)
        if not ids:
            return []
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for job_id in ids:
                    ask(pipe, job_id)
                replies: list[Any] = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise QueueUnavailable(f"job states: {exc}") from exc
        return [(job_id, tuple(replies[n * per_job : (n + 1) * per_job])) for n, job_id in enumerate(ids)]

    async def compact_log(self, timeout_s: float = 60.0) -> bool:
        """Have a server with an append-only file rewrite it from what it holds now, so that deleted
        entries are gone from its disk too; wait for the rewrite. False when it did not finish (or
        the server refuses): the caller tries again later. True at once without an append-only file."""
        try:
            info: dict[str, Any] = await self._redis.info("persistence")
            if not int(info.get("aof_enabled", 0)):
                return True
            try:
                await self._redis.bgrewriteaof()  # type: ignore[no-untyped-call]
            except ResponseError:
                pass  # one is already running; the scheduled one below picks up what we deleted
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                await asyncio.sleep(0.1)
                info = await self._redis.info("persistence")
                busy = int(info.get("aof_rewrite_in_progress", 0)) or int(info.get("aof_rewrite_scheduled", 0))
                if not busy and str(info.get("aof_last_bgrewrite_status", "ok")) == "ok":
                    return True
        except (RedisError, OSError) as exc:
            _log.warning("the queue server's append-only file was not rewritten: %s", exc)
        return False

    async def read_progress(self, job_id: str) -> ProgressFields:
        """The job's progress hash as strings (empty until the worker reports)."""
        try:
            raw: dict[Any, Any] = await self._redis.hgetall(progress_key(job_id))  # type: ignore[misc]
        except (RedisError, OSError) as exc:
            raise QueueUnavailable(f"progress of {job_id}: {exc}") from exc
        return {_text(k): _text(v) for k, v in raw.items()}

    async def wait(
        self,
        job_id: str,
        *,
        timeout: float,
        on_progress: ProgressSink | None = None,
        on_state: StateSink | None = None,
    ) -> dict[str, Any]:
        """Wait for the job's result dict, forwarding each change of its progress hash and of
        whether a worker holds it.

        Raises `JobFailed` on timeout or an unreadable result, `JobLost` when the queue lost the
        job, and `QueueUnavailable` when Redis stayed unreachable for ``outage_grace_s`` (a shorter
        outage, such as a restarting Valkey, is waited out). A worker's `JobFailure` dict is
        returned like any result.
        """
        name = job_name_of(job_id)
        what = texts.job_label(name)
        waiter = _Waiter(job_id, JOB_QUEUES[name], wants_progress=on_progress is not None)
        self._waiters.add(waiter)
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.create_task(self._watch(), name="avatarbooth-job-watcher")
        last: ProgressFields = {}
        last_state: str | None = None
        try:
            async with asyncio.timeout(timeout):
                while True:
                    await waiter.changed.wait()
                    waiter.changed.clear()
                    if on_progress is not None and waiter.progress and waiter.progress != last:
                        last = waiter.progress
                        await on_progress(last)
                    if on_state is not None and waiter.state is not None and waiter.state != last_state:
                        last_state = waiter.state
                        await on_state(last_state)
                    if waiter.outcome.done():
                        result = waiter.outcome.result()
                        break
        except TimeoutError as exc:
            raise JobFailed.timed_out(what, timeout) from exc
        except ResultNotFound as exc:
            raise JobFailed.lost(what) from exc
        except (SerializationError, DeserializationError) as exc:
            # The worker raised instead of returning a JobFailure, or arq gave up on the job.
            raise JobFailed(texts.job_failed(what, "internal")) from exc
        finally:
            self._waiters.discard(waiter)
        if not isinstance(result, dict):
            raise JobFailed.unreadable(what)
        return result

    async def _watch(self) -> None:
        """One loop for every waiting job: each round is one MULTI/EXEC to Redis, however many
        jobs wait. (arq's own `Job.result` polls per job: with hundreds of users enrolling at
        once, those polls took most of the chat process's time; bench/telegram_load.py.)"""
        round_ = 0
        outage_since: float | None = None
        while self._waiters:
            waiters = list(self._waiters)
            # Whether a job is still queued or running is only asked every few rounds: it tells a
            # lost job (a flushed Redis, an expired entry) from a slow one, and /status whether a
            # worker holds it.
            ask_queue = round_ % _QUEUE_CHECK_ROUNDS == 0
            try:
                async with self._redis.pipeline(transaction=True) as pipe:
                    pipe.mget([result_key_prefix + w.job_id for w in waiters])
                    for w in waiters:
                        if w.wants_progress:
                            pipe.hgetall(progress_key(w.job_id))
                        if ask_queue:
                            pipe.zscore(w.queue, w.job_id)
                            pipe.exists(in_progress_key_prefix + w.job_id)
                    replies: list[Any] = await pipe.execute()
            except (RedisError, OSError) as exc:
                now = time.monotonic()
                outage_since = outage_since or now
                if now - outage_since >= self._outage_grace_s:
                    for w in waiters:
                        w.finish(exception=QueueUnavailable(f"waiting for {w.job_id}: {exc}"))
                    outage_since = None
                elif round_ % _QUEUE_CHECK_ROUNDS == 0:
                    _log.warning("the queue server is unreachable (%s); still waiting", type(exc).__name__)
                round_ += 1
                await asyncio.sleep(self._poll_delay * 4)
                continue
            except Exception as exc:  # a bug here must not leave every waiter to its timeout
                _log.exception("the job watcher failed")
                for w in waiters:
                    w.finish(exception=exc)
            else:
                outage_since = None
                answers = iter(replies[1:])
                for w, stored in zip(waiters, replies[0]):
                    progress = next(answers) if w.wants_progress else None
                    queued, held = (next(answers), next(answers)) if ask_queue else (True, None)
                    if progress:
                        w.report({_text(k): _text(v) for k, v in progress.items()})
                    if held is not None:
                        w.set_state("running" if held else "queued")
                    if stored:
                        w.finish(**_outcome(stored))
                    elif queued is None:
                        w.finish(exception=ResultNotFound(f"job {w.job_id} is neither queued nor done"))
            round_ += 1
            await asyncio.sleep(self._poll_delay)


_QUEUE_CHECK_ROUNDS = 8


class _Waiter:
    """One `JobClient.wait` call, as the watcher sees it."""

    def __init__(self, job_id: str, queue: str, *, wants_progress: bool) -> None:
        self.job_id = job_id
        self.queue = queue
        self.wants_progress = wants_progress
        self.progress: ProgressFields = {}
        self.state: str | None = None
        self.outcome: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.changed = asyncio.Event()

    def report(self, progress: ProgressFields) -> None:
        if progress != self.progress:
            self.progress = progress
            self.changed.set()

    def set_state(self, state: str) -> None:
        if state != self.state:
            self.state = state
            self.changed.set()

    def finish(self, *, result: Any = None, exception: BaseException | None = None) -> None:
        if self.outcome.done():
            return
        if exception is not None:
            self.outcome.set_exception(exception)
        else:
            self.outcome.set_result(result)
        self.changed.set()


def _outcome(stored: bytes) -> dict[str, Any]:
    """A kept arq result as `_Waiter.finish` arguments (arq's own reading of it, as in Job.result)."""
    try:
        info = deserialize_result(stored, deserializer=deserialize_job)
    except DeserializationError as exc:
        return {"exception": exc}
    if info.success:
        return {"result": info.result}
    if isinstance(info.result, Exception):
        return {"exception": info.result}
    return {"exception": SerializationError(repr(info.result))}  # e.g. the job was cancelled


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
