"""The upscale button: one of the user's images at twice its size, redrawn lightly by its model.

`Upscaler.start` submits a `DrawRequest` with ``upscale_of``: the worker enlarges the image with
Lanczos and re-denoises it at low strength with the resident base and the model that drew it, in
tiles where it is large (`engine.render.upscale`); no upscaler weights are needed. An upscale counts as
one image against the hourly quota, is recorded as the user's image with the source's prompt and
model (so its own buttons draw, vary and upscale it again), and its reply asks to be sent as files
(`bot.replies.Reply.as_files`): a chat app would recompress a photo. An image is enlarged at most
`MAX_UPSCALES` times in a row.
"""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import replace
from pathlib import Path
from typing import Any

from PIL import Image

from bot import texts
from bot.errors import ConsentRequired, UpscaleLimit
from bot.quota import DrawQuota
from bot.replies import Reply
from bot.runner import UNQUEUED, Drawn, JobRunner, ProgressCallback
from engine.api import DrawRequest, ImagesResult, arq_job_id
from storage.blobs import owner_for
from storage.db import Database, GeneratedImage, PersonalModel, PhotoStatus, User

MAX_UPSCALES = 2
"""How often an image may be enlarged in a row: twice is 4× its drawn size (4096 px on SDXL), which
is also the most a worker makes (`engine.render.upscale.MAX_SCALE`)."""
UPSCALES_META = "upscales"
"""The key of an upscale job's meta: how many times the image it makes has been enlarged."""


class Upscaler:
    """Runs upscales for `bot.service.BotService` (which checks that the image is the user's)."""

    def __init__(self, db: Database, runner: JobRunner, quota: DrawQuota, *, note: str | None) -> None:
        self._db = db
        self._runner = runner
        self._quota = quota
        self._note = note  # said under every result (the tiny preset's noise)

    async def start(
        self,
        account: User,
        image: GeneratedImage,
        model: PersonalModel | None,
        *,
        aspect: str,
        class_word: str,
        on_progress: ProgressCallback | None,
    ) -> Reply:
        """Upscale ``image`` (the user's: checked by the caller) with ``model``, the one that drew it
        (None: the plain base); ``aspect`` and ``class_word`` are those it was drawn with."""
        if not await self._db.has_consent(account.id):
            raise ConsentRequired()
        source = await self._source_payload(image)
        done = _count(source.get("meta"))
        if done >= MAX_UPSCALES:
            raise UpscaleLimit(done)
        embeddings = [
            p.embedding_key for p in await self._db.list_photos(account.id, PhotoStatus.ACCEPTED) if p.embedding_key
        ]
        negative = (source.get("request") or {}).get("negative_prompt")
        request = DrawRequest(
            UNQUEUED,
            owner_for(account.id),
            image.prompt,
            embeddings,
            class_word=class_word,
            seed=secrets.randbelow(2**31),
            aspect=aspect,
            negative_prompt=negative if isinstance(negative, str) else "",
            upscale_of=image.blob_key,
        )
        meta: dict[str, Any] = {"prompt": image.prompt, UPSCALES_META: done + 1, "upscale_of": image.id}
        if model is not None:
            request = replace(
                request, adapter_key=model.blob_key, method=model.method, token=model.token, class_word=model.class_word
            )
            meta |= {"model_id": model.id, "model_version": model.version, "method": model.method}
        job = await self._quota.reserve(account.id, 1, lambda: self._runner.create(account, request, meta))
        result = await self._runner.run(job, ImagesResult, on_progress)
        drawn = await self._runner.record_images(job, result)
        reply = Reply(lines=await self._lines(drawn, done + 1), job_ids=[arq_job_id(job.kind, job.id)], as_files=True)
        reply.images.extend(drawn.images)
        note = self._note or result.note
        if note:
            reply.add(note)
        return reply

    async def _source_payload(self, image: GeneratedImage) -> dict[str, Any]:
        """The payload of the job that made ``image`` ({} when it is gone or was never recorded)."""
        job = await self._db.get_job(image.job_id) if image.job_id is not None else None
        payload = job.payload if job is not None else None
        return payload if isinstance(payload, dict) else {}

    async def _lines(self, drawn: Drawn, upscales: int) -> list[str]:
        lines = []
        for index, out in enumerate(drawn.images, start=1):
            width, height = await asyncio.to_thread(_size_of, out.path)
            lines += [texts.upscaled(width, height, upscales), texts.image_line(index, out.score, out.detail)]
        if drawn.withheld:
            lines.append(texts.images_withheld(drawn.withheld))
        return lines


def _count(meta: object) -> int:
    """How many times the image of a job with this meta has been enlarged (0: drawn as it is)."""
    count = meta.get(UPSCALES_META) if isinstance(meta, dict) else None
    return count if isinstance(count, int) and count > 0 else 0


def _size_of(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:  # the header only
        return image.size
