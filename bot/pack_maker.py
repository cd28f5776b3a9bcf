"""Making an avatar pack (``/pack``): one draw job per image, made one after another.

Every image of the pack gets its job row when the pack starts (the quota reserves the whole pack at
once), each row's meta naming the pack; the jobs then run one at a time, so the interactive worker
serves other users' draws between them and a restart finds the rest still queued. Each job renders
``pack_best_of`` images and keeps the best by likeness (`engine.api.DrawRequest.keep`). After a
restart, `finish` is handed the pack's rows again: images already made are read back, not made again.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bot import texts
from bot.errors import JobFailed, QueueUnavailable
from bot.packs import Pack
from bot.quota import DrawQuota
from bot.replies import ImageOut, Reply
from bot.runner import UNQUEUED, JobRunner, ProgressCallback
from bot.settings import BotSettings
from engine.api import DrawRequest, ImagesResult, arq_job_id
from storage.blobs import BlobStore, owner_for
from storage.db import ACTIVE_JOB_STATES, Database, Job, JobState, PersonalModel, User

PACK_META = "pack"
"""The key of a pack image's job meta: {"key", "name", "title", "index", "count", "subject", "best_of"}."""


@dataclass(frozen=True)
class _Item:
    job: Job
    index: int  # from 0
    subject: str  # how the reply names the image: its style's title, or its prompt


def pack_key(job: Job) -> str | None:
    """The pack a job's image belongs to, if any."""
    meta = (job.payload or {}).get("meta") or {}
    pack = meta.get(PACK_META) if isinstance(meta, dict) else None
    return str(pack["key"]) if isinstance(pack, dict) and "key" in pack else None


class PackMaker:
    def __init__(
        self,
        db: Database,
        blobs: BlobStore,
        runner: JobRunner,
        quota: DrawQuota,
        settings: BotSettings,
        *,
        note: str | None,
    ) -> None:
        self._db = db
        self._blobs = blobs
        self._runner = runner
        self._quota = quota
        self._settings = settings
        self._note = note  # e.g. that the tiny preset's images are noise

    async def start(
        self,
        account: User,
        pack: Pack,
        model: PersonalModel,
        embedding_keys: list[str],
        on_progress: ProgressCallback | None,
    ) -> Reply:
        """Reserve the pack in the quota, write a job row per image, then make them in turn."""
        key = secrets.token_hex(8)
        best_of = self._settings.pack_best_of

        def plan(index: int) -> tuple[DrawRequest, dict[str, Any]]:
            item = pack.prompt_for(index)
            prompt, negative = item.styled()
            request = DrawRequest(
                UNQUEUED, owner_for(account.id), prompt, embedding_keys,
                adapter_key=model.blob_key, method=model.method, token=model.token,
                class_word=model.class_word, negative_prompt=negative, seed=secrets.randbelow(2**31),
                num_images=best_of, keep=1, aspect=pack.aspect,
            )
            subject = item.subject()
            meta = {
                "prompt": prompt, "model_id": model.id, "model_version": model.version, "method": model.method,
                PACK_META: {
                    "key": key, "name": pack.name, "title": pack.title, "index": index,
                    "count": pack.count, "subject": subject, "best_of": best_of,
                },
            }
            return request, meta

        async def create_all() -> list[Job]:
            return [await self._runner.create(account, *plan(index)) for index in range(pack.count)]

        jobs = await self._quota.reserve(account.id, pack.count, create_all)
        return await self.finish(jobs, on_progress)

    async def finish(self, jobs: Sequence[Job], on_progress: ProgressCallback | None) -> Reply:
        """Make the pack's images not made yet, in order; one reply with every image of the pack."""
        items = sorted((_item(job) for job in jobs), key=lambda item: item.index)
        pack = (items[0].job.payload or {})["meta"][PACK_META]
        title, count = str(pack["title"]), int(pack["count"])
        active = [item.job.id for item in items if item.job.state in ACTIVE_JOB_STATES]
        self._runner.in_flight.update(active)  # not resumed by anyone else meanwhile
        images: list[ImageOut] = []
        lines: list[str] = []
        made_before = 0
        try:
            for position, item in enumerate(items):
                if item.job.state == JobState.DONE:
                    made_before += 1
                    lines += await self._made(item, images)
                    continue
                if item.job.state not in ACTIVE_JOB_STATES:
                    lines.append(texts.pack_image_failed(item.index + 1, item.subject, texts.PACK_IMAGE_LOST))
                    continue
                if on_progress is not None:
                    await on_progress(texts.pack_progress(title, position, count))
                try:
                    lines += await self._make(item, images, _step_progress(on_progress, title, position, count))
                except JobFailed as exc:
                    lines.append(texts.pack_image_failed(item.index + 1, item.subject, exc.user_message))
                except QueueUnavailable as exc:  # the rest would fail the same way: stop, say so
                    for rest in items[position + 1 :]:
                        if rest.job.state in ACTIVE_JOB_STATES:
                            await self._runner.fail(rest.job, exc)
                    lines.append(texts.pack_image_failed(item.index + 1, item.subject, exc.user_message))
                    break
        finally:
            self._runner.in_flight.difference_update(active)
        first = (items[0].job.payload or {})["meta"]
        head = texts.PACK_DONE.format(
            title=title, count=len(images), method=first.get("method"),
            version=first.get("model_version"), best_of=pack.get("best_of", 1),
        )
        body = [head, *lines]
        if made_before and made_before < len(items):
            body.append(texts.PACK_RESUMED_NOTE.format(done=made_before))
        if self._note:
            body.append(self._note)
        job_ids = [arq_job_id(item.job.kind, item.job.id) for item in items]
        return Reply(lines=body, images=images, job_ids=job_ids, album=True)

    async def _make(
        self, item: _Item, images: list[ImageOut], on_progress: ProgressCallback | None
    ) -> list[str]:
        result = await self._runner.run(item.job, ImagesResult, on_progress)
        drawn = await self._runner.record_images(item.job, result)
        images.extend(drawn.images)
        if not drawn.images:
            return [texts.pack_image_failed(item.index + 1, item.subject, texts.images_withheld(drawn.withheld))]
        return [texts.pack_image_line(item.index + 1, item.subject, drawn.images[0].score, drawn.images[0].detail)]

    async def _made(self, item: _Item, images: list[ImageOut]) -> list[str]:
        """An image made before a restart: read back from its row, not made again."""
        rows = await self._db.images_of_job(item.job.id)
        if not rows:  # deleted since, or withheld
            return [texts.pack_image_failed(item.index + 1, item.subject, texts.PACK_IMAGE_LOST)]
        for row in rows:
            images.append(ImageOut(await asyncio.to_thread(self._blobs.path, row.blob_key), row.score, row.id))
        return [texts.pack_image_line(item.index + 1, item.subject, rows[0].score)]


def _item(job: Job) -> _Item:
    pack = (job.payload or {})["meta"][PACK_META]
    return _Item(job, int(pack["index"]), str(pack["subject"]))


def _step_progress(
    on_progress: ProgressCallback | None, title: str, position: int, count: int
) -> ProgressCallback | None:
    """A job's own progress lines, as part of the pack's one progress message."""
    if on_progress is None:
        return None
    report = on_progress

    async def step(line: str) -> None:
        await report(texts.pack_progress(title, position, count, line))

    return step
