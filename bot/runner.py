"""Running one job for the conversation: its database row first, then the queue.

`JobRunner` creates a job's row, submits the request built from it (idempotently: the arq id is
derived from the row, `engine.api.arq_job_id`), waits with progress while keeping the row's state as
the queue sees it, parses the result, and records failures; a job the queue lost is submitted again,
unless /forget erased it meanwhile, and what a worker wrote for an erased user is deleted. It knows
nothing of the conversation: `bot.service` decides what to run and what to say.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from bot import texts
from bot.errors import BotError, ErasedMeanwhile, JobFailed, JobLost, QueueUnavailable, ResultNotSaved
from bot.jobs import JobClient, JobRequest, ProgressFields
from bot.replies import ImageOut
from bot.settings import BotSettings
from engine.api import (
    JOB_QUEUES,
    JOB_TRIES,
    CheckPhotoRequest,
    CheckPhotoResult,
    DrawRequest,
    ImagesResult,
    JobFailure,
    JobName,
    PreviewRequest,
    TrainingMethod,
    TrainRequest,
    TrainResult,
    arq_job_id,
    parse_result,
)
from storage.blobs import BlobStore, owner_for
from storage.db import Database, Job, JobState, User
from storage.errors import InvalidBlobKey, RecordNotFound, StorageError

_log = logging.getLogger(__name__)

ProgressCallback = Callable[[str], Awaitable[None]]
"""Receives already-formatted progress lines (see `bot.texts.progress`)."""

_RequestType = type[CheckPhotoRequest] | type[PreviewRequest] | type[TrainRequest] | type[DrawRequest]
_REQUEST_TYPES: dict[JobName, _RequestType] = {
    JobName.CHECK_PHOTO: CheckPhotoRequest,
    JobName.PREVIEW: PreviewRequest,
    JobName.TRAIN: TrainRequest,
    JobName.DRAW: DrawRequest,
}
@dataclass(frozen=True)
class Drawn:
    """A preview's or draw's images as recorded (best first), and how many were withheld."""

    images: list[ImageOut]
    withheld: int = 0


_NAME_OF: dict[_RequestType, JobName] = {kind: name for name, kind in _REQUEST_TYPES.items()}
UNQUEUED = ""
"""The job id of a request built before its row exists; `JobRunner.create` drops it and `run` gives
the row's (`engine.api.arq_job_id`)."""
Result = TypeVar("Result", CheckPhotoResult, TrainResult, ImagesResult)
_T = TypeVar("_T")
_SAVE_RETRIES_S = (0.2, 1.0, 3.0)
"""Waits between attempts to record a finished job (a busy or briefly failing database)."""


class JobObserver(Protocol):
    """Told how each job `JobRunner.run` waited on ended (the composition root's metrics).

    ``kind`` is a `JobName` value, ``method`` a `TrainingMethod` value or ``"none"``, ``outcome`` one
    of `OUTCOMES`: a fixed, small set each, never anything of the user's."""

    def job_finished(self, kind: str, method: str, outcome: str, seconds: float) -> None: ...


OUTCOMES = ("done", "failed", "timed_out", "lost", "queue_unavailable", "erased", "cancelled")


class JobRunner:
    """Creates, submits, awaits and records jobs over the database, the blob store and the queue."""

    def __init__(
        self, db: Database, blobs: BlobStore, jobs: JobClient, settings: BotSettings,
        *, observer: JobObserver | None = None,
    ) -> None:
        self._db = db
        self._blobs = blobs
        self._jobs = jobs
        self._settings = settings
        self._observer = observer
        self.in_flight: set[int] = set()  # database job ids this process is waiting on
        self._background: set[asyncio.Task[None]] = set()  # writes retried after their command ended

    async def create(self, account: User, request: JobRequest, meta: dict[str, Any]) -> Job:
        """A job row whose payload holds the request (less its job id, which the row gives: build
        the request with `UNQUEUED`) and the reply's context (``meta``)."""
        name = _NAME_OF[type(request)]
        fields = request.to_dict()
        del fields["job_id"]
        return await self._db.create_job(
            account.id, str(name), JOB_QUEUES[name], {"request": fields, "meta": meta}
        )

    async def run(
        self, job: Job, result_type: type[Result], on_progress: ProgressCallback | None
    ) -> Result:
        """Submit (idempotently), wait with progress, and parse the result of a job row; the
        observer, if any, is told how it ended and how long it took."""
        if self._observer is None:
            return await self._run(job, result_type, on_progress)
        started, outcome = time.monotonic(), "cancelled"
        try:
            result = await self._run(job, result_type, on_progress)
            outcome = "done"
            return result
        except BaseException as exc:
            outcome = _outcome_of(exc)
            raise
        finally:
            kind = job.kind if job.kind in {n.value for n in JobName} else "other"
            self._observer.job_finished(kind, _method_of(job), outcome, time.monotonic() - started)

    async def _run(
        self, job: Job, result_type: type[Result], on_progress: ProgressCallback | None
    ) -> Result:
        name = JobName(job.kind)
        queue_id = arq_job_id(job.kind, job.id)
        try:
            request = _request_for(job, queue_id)
        except (TypeError, ValueError) as exc:  # a row written by an incompatible version
            what = texts.job_label(job.kind)
            raise await self.fail(job, JobFailed(texts.job_failed(what, "invalid_request"))) from exc
        self.in_flight.add(job.id)
        try:
            for attempt in range(1, JOB_TRIES + 1):
                await self._jobs.submit(name, request, queue_id)
                await self._db.update_job(job.id, state=JobState.QUEUED, attempts_delta=1)
                try:
                    raw = await self._jobs.wait(
                        queue_id,
                        # A job a dead worker left is taken up again (engine.api.JOB_LEASE_S): as
                        # many times as arq tries it, each within the job timeout.
                        timeout=JOB_TRIES * self.timeout(name) + 60,
                        on_progress=self._progress_sink(job, on_progress),
                        on_state=self._state_sink(job),
                    )
                    break
                except JobLost:  # the queue server lost it (restarted without its data): again
                    # Unless /forget dropped it: submitting it again would put the user's data
                    # back on the queue after the erasure finished.
                    if attempt == JOB_TRIES or not await self.still_there(job):
                        raise
                    _log.warning("job %s was lost by the queue; submitting it again", queue_id)
        except RecordNotFound as exc:  # /forget erased the row in the meantime
            raise ErasedMeanwhile() from exc
        except (JobFailed, QueueUnavailable) as exc:
            if not await self.still_there(job):  # /forget aborted it: not a failure to report
                raise ErasedMeanwhile() from exc
            await self.fail(job, exc)
            raise
        finally:
            self.in_flight.discard(job.id)
        await self._check_not_erased(job, raw)
        return await self._parse(job, raw, result_type)

    async def record_images(self, job: Job, result: ImagesResult) -> Drawn:
        """A preview's or draw's images recorded as the user's, best first, and the job done.

        Withheld images (the NSFW check) are never shown: their black stand-ins are deleted unless a
        row already uses the same blob.
        """
        await self.require_owned(job, result.image_keys)
        meta = (job.payload or {}).get("meta") or {}
        prompt = str(meta.get("prompt", result.prompt_used))
        model_id = meta.get("model_id")
        flags = result.flagged or [False] * len(result.image_keys)
        scores = result.scores + [None] * (len(result.image_keys) - len(result.scores))
        for key in {key for key, flagged in zip(result.image_keys, flags) if flagged}:
            if await self._db.count_images_with_blob(job.user_id, key) == 0:
                await asyncio.to_thread(self._blobs.delete, key)
        shown = [(key, score) for key, score, flagged in zip(result.image_keys, scores, flags) if not flagged]
        rows = await self._db.finish_images(
            job.id, shown, prompt, result.seed, result.to_dict(),
            model_id=model_id if isinstance(model_id, int) else None,
        )
        detail = _detail_scores(result)
        images = [
            ImageOut(await asyncio.to_thread(self._blobs.path, row.blob_key), row.score, row.id, detail.get(row.blob_key))
            for row in rows
        ]
        return Drawn(images, withheld=len(result.image_keys) - len(shown))

    async def _parse(self, job: Job, raw: dict[str, Any], result_type: type[Result]) -> Result:
        what = texts.job_label(job.kind)
        try:
            parsed = parse_result(raw, result_type)
        except (TypeError, ValueError) as exc:
            raise await self.fail(job, JobFailed.unreadable(what)) from exc
        if isinstance(parsed, JobFailure):
            failure = JobFailed.from_failure(what, parsed)
            await self._db.update_job(
                job.id, state=JobState.FAILED, error=f"{parsed.code}: {parsed.detail}", result=raw
            )
            raise failure
        return parsed

    async def fail(self, job: Job, error: BotError) -> BotError:
        """Mark the job failed (if it still exists) and hand back the error to raise."""
        try:
            await self._db.update_job(job.id, state=JobState.FAILED, error=error.user_message)
        except RecordNotFound:
            pass
        return error

    async def still_there(self, job: Job) -> bool:
        """Whether the job's row still exists (and is this job's: not erased by /forget)."""
        current = await self._db.get_job(job.id)
        return current is not None and current.created_at == job.created_at and current.kind == job.kind

    async def _check_not_erased(self, job: Job, raw: dict[str, Any]) -> None:
        """If the user used /forget while the job ran, delete what the worker wrote and stop."""
        if await self.still_there(job):
            return
        for key in _blob_keys(raw):
            try:
                await asyncio.to_thread(self._blobs.delete, key)
            except InvalidBlobKey:
                _log.warning("job %s returned an invalid blob key %r", job.id, key)
        raise ErasedMeanwhile()

    async def require_owned(self, job: Job, keys: Iterable[str | None]) -> None:
        """A result may only name blobs of the job's own user."""
        prefix = owner_for(job.user_id) + "/"
        if any(key is not None and not key.startswith(prefix) for key in keys):
            raise await self.fail(job, JobFailed.unreadable(texts.job_label(job.kind)))

    def timeout(self, name: JobName) -> float:
        if name == JobName.TRAIN:
            return float(self._settings.training_timeout_s)
        return float(self._settings.interactive_timeout_s)

    def _state_sink(self, job: Job) -> Callable[[str], Awaitable[None]]:
        """Keep the row's state as the queue sees it: "running" only while a worker holds the job,
        so /status never says running for a worker that died."""

        async def sink(state: str) -> None:
            try:
                await self._db.update_job(job.id, state=state)
            except RecordNotFound:
                return  # erased meanwhile
            except StorageError as exc:  # a busy database: the next change is written instead
                _log.warning("job %d: state not written (%s)", job.id, type(exc).__name__)

        return sink

    async def saved(self, job: Job, write: Callable[[], Awaitable[_T]]) -> _T:
        """Record a finished job's result, trying again while the database is busy or failing; if
        it still fails, the job is marked failed (so nothing waits on it) and the user told."""
        for delay in _SAVE_RETRIES_S:
            try:
                return await write()
            except RecordNotFound as exc:
                raise ErasedMeanwhile() from exc
            except StorageError as exc:
                _log.warning("recording the result of job %d failed (%s); trying again", job.id, type(exc).__name__)
                await asyncio.sleep(delay)
        try:
            return await write()
        except RecordNotFound as exc:
            raise ErasedMeanwhile() from exc
        except StorageError as exc:
            _log.error("recording the result of job %d failed for good: %s", job.id, exc)
            if not await self._marked_failed(job):  # the database is still busy: keep at it
                task = asyncio.create_task(self._mark_failed_later(job))
                self._background.add(task)
                task.add_done_callback(self._background.discard)
            raise ResultNotSaved(texts.job_label(job.kind)) from exc

    async def _marked_failed(self, job: Job) -> bool:
        try:
            await self._db.update_job(job.id, state=JobState.FAILED, error="the result could not be saved")
        except RecordNotFound:
            return True
        except StorageError:
            return False
        return True

    async def _mark_failed_later(self, job: Job) -> None:
        """Until the row says failed: a job left "queued" or "running" would block /train for good."""
        while not await self._marked_failed(job):
            await asyncio.sleep(_SAVE_RETRIES_S[-1])

    def _progress_sink(
        self, job: Job, on_progress: ProgressCallback | None
    ) -> Callable[[ProgressFields], Awaitable[None]]:
        what = texts.job_label(job.kind)

        async def sink(fields: ProgressFields) -> None:
            line = texts.progress(what, fields)
            try:
                await self._db.update_job(job.id, progress=_fraction(fields), message=line)
            except RecordNotFound:
                return  # erased meanwhile: the result will be discarded
            except StorageError as exc:  # a busy database must not stop the job: /status lags a step
                _log.warning("job %d: progress not written (%s)", job.id, type(exc).__name__)
            if on_progress is not None:
                await on_progress(line)

        return sink


def _outcome_of(exc: BaseException) -> str:
    """The `OUTCOMES` value of a job that `JobRunner.run` ended with ``exc``."""
    if isinstance(exc, JobLost):
        return "lost"
    if isinstance(exc, JobFailed):
        return "timed_out" if isinstance(exc.__cause__, TimeoutError) else "failed"
    if isinstance(exc, QueueUnavailable):
        return "queue_unavailable"
    if isinstance(exc, ErasedMeanwhile):
        return "erased"
    return "cancelled" if isinstance(exc, asyncio.CancelledError) else "failed"


def _method_of(job: Job) -> str:
    """The training method a job trains or draws with; "none" for the rest (never free text)."""
    request = (job.payload or {}).get("request")
    method = request.get("method") if isinstance(request, dict) else None
    return method if isinstance(method, str) and method in {m.value for m in TrainingMethod} else "none"


def _request_for(job: Job, queue_id: str) -> JobRequest:
    """Rebuild a job's request from its row: the stored fields plus the row-derived id."""
    fields = dict((job.payload or {}).get("request", {}))
    request: JobRequest = _REQUEST_TYPES[JobName(job.kind)].from_dict({**fields, "job_id": queue_id})
    return request


def _detail_scores(result: ImagesResult) -> dict[str, tuple[float, float]]:
    """Blob key → (likeness as drawn, after the face-detail pass), for the images the pass ran on."""
    pairs = zip(result.image_keys, result.drawn_scores, result.detailed_scores)  # empty from older workers
    return {key: (drawn, detailed) for key, drawn, detailed in pairs if drawn is not None and detailed is not None}


def _fraction(fields: ProgressFields) -> float | None:
    try:
        step, total = float(fields["step"]), float(fields["total"])
    except (KeyError, ValueError):
        return None
    return min(max(step / total, 0.0), 1.0) if total > 0 else None


def _blob_keys(raw: dict[str, Any]) -> list[str]:
    """Every blob key a worker result names (for discarding the results of an erased user)."""
    keys = [raw.get(name) for name in ("embedding_key", "crop_key", "adapter_key")]
    keys += list(raw.get("image_keys") or [])
    return [key for key in keys if isinstance(key, str)]
