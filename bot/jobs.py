"""The chat side's job client: idempotent enqueueing on arq, and waiting with progress.

Job ids come from database rows (``engine.api.arq_job_id``), so submitting the same job twice is a
no-op: arq refuses a second job with an id it already holds (queued, running, or with a kept result).
Results come back as the raw dicts the worker returned; `bot.service` parses them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from types import TracebackType
from typing import Any

from arq.connections import ArqRedis, RedisSettings, create_pool
from arq.constants import job_key_prefix, result_key_prefix, retry_key_prefix
from arq.jobs import DeserializationError, ResultNotFound, SerializationError, deserialize_result
from redis.exceptions import RedisError

from bot import texts
from bot.errors import JobFailed, QueueUnavailable
from engine.api import (
    JOB_QUEUES,
    CheckPhotoRequest,
    DrawRequest,
    JobName,
    PreviewRequest,
    TrainRequest,
    deserialize_job,
    progress_key,
    serialize_job,
)

_log = logging.getLogger(__name__)

JobRequest = CheckPhotoRequest | PreviewRequest | TrainRequest | DrawRequest
ProgressFields = dict[str, str]
"""A worker's progress hash, decoded: step, total, loss, eta_s, stage (each optional)."""
ProgressSink = Callable[[ProgressFields], Awaitable[None]]


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

    def __init__(self, redis: ArqRedis, *, poll_delay: float = 0.25) -> None:
        self._redis = redis
        self._poll_delay = poll_delay
        self._waiters: set[_Waiter] = set()
        self._watcher: asyncio.Task[None] | None = None

    @classmethod
    async def connect(
        cls, redis_url: str, *, poll_delay: float = 0.25, conn_retries: int = 2
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
        return cls(redis, poll_delay=poll_delay)

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

    async def read_progress(self, job_id: str) -> ProgressFields:
        """The job's progress hash as strings (empty until the worker reports)."""
        try:
            raw: dict[Any, Any] = await self._redis.hgetall(progress_key(job_id))  # type: ignore[misc]
        except (RedisError, OSError) as exc:
            raise QueueUnavailable(f"progress of {job_id}: {exc}") from exc
        return {_text(k): _text(v) for k, v in raw.items()}

    async def wait(
        self, job_id: str, *, timeout: float, on_progress: ProgressSink | None = None
    ) -> dict[str, Any]:
        """Wait for the job's result dict, forwarding each change of its progress hash.

        Raises `JobFailed` on timeout, a lost job or an unreadable result, and `QueueUnavailable`
        when Redis cannot be reached. A worker's `JobFailure` dict is returned like any result.
        """
        name = job_name_of(job_id)
        what = texts.job_label(name)
        waiter = _Waiter(job_id, JOB_QUEUES[name], wants_progress=on_progress is not None)
        self._waiters.add(waiter)
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.create_task(self._watch(), name="avatarbooth-job-watcher")
        last: ProgressFields = {}
        try:
            async with asyncio.timeout(timeout):
                while True:
                    await waiter.changed.wait()
                    waiter.changed.clear()
                    if on_progress is not None and waiter.progress and waiter.progress != last:
                        last = waiter.progress
                        await on_progress(last)
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
        while self._waiters:
            waiters = list(self._waiters)
            # Whether a job is still queued or running is only asked every few rounds: it only
            # tells a lost job (a flushed Redis, an expired entry) from a slow one.
            ask_queue = round_ % _QUEUE_CHECK_ROUNDS == 0
            try:
                async with self._redis.pipeline(transaction=True) as pipe:
                    pipe.mget([result_key_prefix + w.job_id for w in waiters])
                    for w in waiters:
                        if w.wants_progress:
                            pipe.hgetall(progress_key(w.job_id))
                        if ask_queue:
                            pipe.zscore(w.queue, w.job_id)
                    replies: list[Any] = await pipe.execute()
            except (RedisError, OSError) as exc:
                for w in waiters:
                    w.finish(exception=QueueUnavailable(f"waiting for {w.job_id}: {exc}"))
            except Exception as exc:  # a bug here must not leave every waiter to its timeout
                _log.exception("the job watcher failed")
                for w in waiters:
                    w.finish(exception=exc)
            else:
                answers = iter(replies[1:])
                for w, stored in zip(waiters, replies[0]):
                    progress = next(answers) if w.wants_progress else None
                    queued = next(answers) if ask_queue else True
                    if progress:
                        w.report({_text(k): _text(v) for k, v in progress.items()})
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
        self.outcome: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.changed = asyncio.Event()

    def report(self, progress: ProgressFields) -> None:
        if progress != self.progress:
            self.progress = progress
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
