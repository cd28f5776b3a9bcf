"""The platform-agnostic conversation: consent, enrolment, preview, training, drawing, erasure.

Adapters (console, Discord, Telegram) turn platform events into calls on `BotService` and its
`Reply` objects (`bot.replies`) back into messages; a `BotError` carries the message for a refused
command. Running a job (its row, the queue, the result) is `bot.runner.JobRunner`'s.

A user's states (derived from the database, never stored as such)::

    new ──/agree──▶ consented ──photo accepted──▶ enrolling (1 .. min_photos-1 accepted photos)
                                                      │ min_photos accepted (at most max_photos)
                                                      ▼
                                                    ready      /preview; /draw with InstantID
                                                      │ /train
                                                      ▼
                                                   training ──done──▶ trained   /draw with the newest model
                                                      ▲                  │ /train: the next version
                                                      └──────────────────┘
    A failed training goes back to where it came from (ready or trained); one training at a time.
    any state ──/forget──▶ new   (every row but the bare user row is erased, and every blob)

Before consent nothing is stored but the user row (platform and platform user id). A photo is kept
only once it passes the boundary checks (`bot.uploads`); a photo the worker refuses keeps its row
and reason (shown by /photos) but not its bytes. Every job is a database row first: its arq id is
derived from the row (`engine.api.arq_job_id`), so re-submitting after a restart is idempotent,
and `resume_pending` finishes what a restart interrupted.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bot import texts
from bot.class_words import check_class_word, class_word_for, known_gender
from bot.errors import (
    BotError,
    ConsentRequired,
    EmptyPrompt,
    ErasedMeanwhile,
    JobFailed,
    MethodNotEnabled,
    NotYourImage,
    NotEnoughPhotos,
    PackNeedsModel,
    PromptBlocked,
    PromptTooLong,
    QueueUnavailable,
    TooManyPhotos,
    TrainingAlreadyRunning,
    UnknownAspect,
    UnknownMethod,
)
from bot.jobs import JobClient
from bot.pack_maker import PackMaker, pack_key
from bot.packs import Pack, find_pack, load_packs
from bot.quota import DrawQuota
from bot.replies import ImageOut, Offer, Reply, ResumedWork, Unreceived, Upload, UserRef
from bot.runner import UNQUEUED, JobRunner, ProgressCallback
from bot.safety import PromptBlocklist
from bot.settings import AUTO_CLASS_WORD, BotSettings
from bot.styles import STYLES, apply_style
from bot.upscale import Upscaler
from bot.uploads import RefusedUpload, accept_upload
from engine.api import (
    ASPECT_RATIOS,
    DEFAULT_ASPECT,
    JOB_TRIES,
    CheckPhotoRequest,
    CheckPhotoResult,
    DrawRequest,
    ImagesResult,
    JobName,
    PreviewRequest,
    Refusal,
    TrainingMethod,
    TrainRequest,
    TrainResult,
    arq_job_id,
)
from storage.blobs import BlobStore, owner_for
from storage.db import (
    ACTIVE_JOB_STATES,
    Database,
    Erasure,
    GeneratedImage,
    Job,
    JobState,
    PersonalModel,
    Photo,
    PhotoStatus,
    User,
)
from storage.errors import StorageError

_log = logging.getLogger(__name__)


class BotService:
    """The conversation, over the database, the blob store and the job queue."""

    def __init__(
        self,
        db: Database,
        blobs: BlobStore,
        jobs: JobClient,
        settings: BotSettings,
        *,
        preset_name: str,
        clock: Callable[[], float] = time.time,
        blocklist: PromptBlocklist | None = None,
        runner: JobRunner | None = None,
        packs: Mapping[str, Pack] | None = None,
    ) -> None:
        self._db = db
        self._blocklist = blocklist if blocklist is not None else PromptBlocklist.default()
        self._blobs = blobs
        self._jobs = jobs
        self.settings = settings
        self._preset_name = preset_name
        self._quota = DrawQuota(db, settings, clock)
        self._runner = runner if runner is not None else JobRunner(db, blobs, jobs, settings)
        self._user_locks: dict[int, asyncio.Lock] = {}
        self.packs = packs if packs is not None else load_packs()
        note = texts.TINY_NOTE if preset_name == "tiny" else None
        self._packs = PackMaker(db, blobs, self._runner, self._quota, settings, note=note)
        self._upscales = Upscaler(db, self._runner, self._quota, note=note)

    # --- consent and help ---------------------------------------------------------------------

    async def start(self, user: UserRef) -> Reply:
        """The consent text. Creates the bare user row; nothing else is stored."""
        account = await self._account(user)
        if await self._db.has_consent(account.id):
            return Reply(f"{texts.CONSENT}\n\n{texts.ALREADY_CONSENTED}")
        return Reply(texts.CONSENT, offers=frozenset({Offer.CONSENT}))

    async def agree(self, user: UserRef) -> Reply:
        """Record consent to the current consent text."""
        account = await self._account(user)
        if await self._db.has_consent(account.id):
            return Reply(texts.ALREADY_CONSENTED)
        await self._db.record_consent(account.id, self.settings.consent_version)
        return Reply(
            texts.CONSENT_RECORDED.format(
                min_photos=self.settings.min_photos, max_photos=self.settings.max_photos
            )
        )

    async def help(self) -> Reply:
        return Reply(texts.HELP)

    # --- photos -------------------------------------------------------------------------------

    async def add_photos(
        self,
        user: UserRef,
        uploads: Sequence[Upload | Unreceived],
        on_progress: ProgressCallback | None = None,
    ) -> Reply:
        """Check and enrol selfies: one reply line per file, numbered in the order they were sent
        (those the platform did not give, `Unreceived`, with theirs), then where the user stands."""
        account = await self._consented(user)
        reply = Reply("")
        lines: list[str] = []
        async with self._lock(account.id):
            if len(await self._kept_photos(account.id)) >= self.settings.max_photos:
                raise TooManyPhotos(self.settings.max_photos)
            for index, upload in enumerate(uploads, start=1):
                label = texts.photo_label(index, upload.filename)
                if isinstance(upload, Unreceived):
                    lines.append(texts.photo_unreceived(label, upload.why))
                    continue
                try:
                    lines.append(await self._enrol(account, upload, label, reply, on_progress))
                except QueueUnavailable as exc:
                    lines.append(texts.photo_failed(label, exc.user_message))
                    break
        accepted = len(await self._db.list_photos(account.id, PhotoStatus.ACCEPTED))
        reply.add(*lines)
        reply.closing = texts.enrollment_standing(accepted, self.settings.min_photos, self.settings.max_photos)
        return reply

    async def photos(self, user: UserRef) -> Reply:
        """The user's photos and the outcome of each check (worker refusals with their reason)."""
        account = await self._consented(user)
        photos = await self._db.list_photos(account.id)
        if not photos:
            return Reply(
                texts.NO_PHOTOS.format(
                    min_photos=self.settings.min_photos, max_photos=self.settings.max_photos
                )
            )
        lines = [
            texts.photo_list_line(
                index,
                photo.status,
                texts.refusal(photo.refusal, self.settings) if photo.refusal else None,
            )
            for index, photo in enumerate(photos, start=1)
        ]
        accepted = sum(photo.status == PhotoStatus.ACCEPTED for photo in photos)
        standing = texts.enrollment_standing(
            accepted, self.settings.min_photos, self.settings.max_photos
        )
        return Reply("\n".join(["Your photos:", *lines, standing]))

    async def _enrol(
        self,
        account: User,
        upload: Upload,
        label: str,
        reply: Reply,
        on_progress: ProgressCallback | None,
    ) -> str:
        """Boundary checks, then store and send one photo to the worker; returns its reply line."""
        accepted = await asyncio.to_thread(accept_upload, upload.data, self.settings)
        if isinstance(accepted, RefusedUpload):
            _log.info("upload refused at the boundary: %s (%s)", accepted.refusal, accepted.detail)
            return texts.photo_refused(label, texts.refusal(accepted.refusal, self.settings))
        checked, data = accepted  # data: without EXIF, GPS or anything appended, whatever the platform
        kept = await self._kept_photos(account.id)
        if any(photo.sha256 == checked.sha256 for photo in kept):
            return texts.photo_refused(label, texts.refusal(Refusal.DUPLICATE, self.settings))
        if len(kept) >= self.settings.max_photos:
            return texts.photo_over_limit(label, self.settings.max_photos)
        owner = owner_for(account.id)
        key = await asyncio.to_thread(self._blobs.put, owner, "photos", data, checked.suffix)
        photo = await self._db.add_photo(account.id, key, checked.sha256)
        references = [p.embedding_key for p in kept if p.status == PhotoStatus.ACCEPTED and p.embedding_key]
        request = CheckPhotoRequest(UNQUEUED, owner, key, reference_embedding_keys=references)
        job = await self._runner.create(account, request, {"photo_id": photo.id, "label": label})
        reply.job_ids.append(arq_job_id(job.kind, job.id))
        return await self._finish_check(job, photo, label, on_progress)

    async def _finish_check(
        self, job: Job, photo: Photo, label: str, on_progress: ProgressCallback | None
    ) -> str:
        """Wait for a photo check and record it; a photo whose check failed is not kept."""
        try:
            result = await self._runner.run(job, CheckPhotoResult, on_progress)
            await self._runner.require_owned(job, [result.embedding_key, result.crop_key])
            if result.accepted and not (result.embedding_key and result.crop_key):
                raise await self._runner.fail(job, JobFailed.unreadable(texts.job_label(job.kind)))
        except (JobFailed, QueueUnavailable) as exc:
            await self._drop_photo(photo)
            if isinstance(exc, QueueUnavailable):
                raise
            return texts.photo_failed(label, exc.user_message)
        except ErasedMeanwhile as exc:
            return texts.photo_failed(label, exc.user_message)
        return await self._record_check(job, photo, result, label)

    async def _record_check(
        self, job: Job, photo: Photo, result: CheckPhotoResult, label: str
    ) -> str:
        if result.accepted:
            await self._db.set_photo_result(
                photo.id,
                PhotoStatus.ACCEPTED,
                embedding_key=result.embedding_key,
                crop_key=result.crop_key,
                apparent_gender=known_gender(result.apparent_gender),
            )
            line = texts.photo_accepted(label)
        else:
            reason = result.refusal or Refusal.NO_FACE
            await self._db.set_photo_result(photo.id, PhotoStatus.REFUSED, refusal=reason)
            # Nothing of a refused photo is kept but its row and reason.
            await asyncio.to_thread(self._blobs.delete, photo.blob_key)
            refused = texts.refusal(
                reason, self.settings, face_px=result.face_px, needed_face_px=result.needed_face_px
            )
            line = texts.photo_refused(label, refused)
        await self._db.update_job(job.id, state=JobState.DONE, progress=1.0, result=result.to_dict())
        return line

    async def _drop_photo(self, photo: Photo) -> None:
        await self._db.delete_photo(photo.id)
        await asyncio.to_thread(self._blobs.delete, photo.blob_key)

    async def _kept_photos(self, user_id: int) -> list[Photo]:
        """Accepted photos and those still being checked: what counts toward max_photos."""
        return [p for p in await self._db.list_photos(user_id) if p.status != PhotoStatus.REFUSED]

    # --- preview and draw -----------------------------------------------------------------------

    async def preview(
        self,
        user: UserRef,
        prompt: str | None = None,
        on_progress: ProgressCallback | None = None,
        *,
        style: str | None = None,
        aspect: str | None = None,
        fast: bool = False,
    ) -> Reply:
        """Zero-shot InstantID images from the enrolled photos, before any training.

        ``aspect`` is a width:height ratio from ``engine.api.ASPECT_RATIOS``; None: square. ``fast``
        asks for few-step mode; without it the worker's configured default draws.
        """
        words = self._check_prompt(prompt, required=False) or self.settings.default_preview_prompt
        text, negative = self._styled(words, style)
        shape = _aspect(aspect)
        account = await self._consented(user)
        request = PreviewRequest(
            UNQUEUED,
            owner_for(account.id),
            await self._enrolled_embeddings(account.id),
            text,
            negative_prompt=negative,
            seed=_new_seed(),
            num_images=self.settings.preview_num_images,
            class_word=await self._class_word(account.id),
            aspect=shape,
            fast=_fast(fast),
        )
        job = await self._quota.reserve(
            account.id,
            request.num_images,
            lambda: self._runner.create(account, request, {"prompt": text}),
        )
        return await self._finish_images(job, on_progress)

    async def draw(
        self,
        user: UserRef,
        prompt: str,
        on_progress: ProgressCallback | None = None,
        *,
        style: str | None = None,
        aspect: str | None = None,
        boost: bool = False,
        fast: bool = False,
    ) -> Reply:
        """Draw `prompt` (in a style preset, if named) from the user's newest model, or with InstantID
        until one exists.

        ``aspect`` is a width:height ratio from ``engine.api.ASPECT_RATIOS`` (None: square);
        ``boost`` adds InstantID on the enrolled faces to a LoRA model's draw (SDXL presets; ignored
        elsewhere); ``fast`` asks for few-step mode, as in `preview`.
        """
        text, negative = self._styled(self._check_prompt(prompt, required=True), style)
        shape = _aspect(aspect)
        account = await self._consented(user)
        model = await self._db.latest_model(account.id)
        options = _DrawOptions(aspect=shape, negative_prompt=negative, identity_boost=boost, fast=_fast(fast))
        return await self._draw(account, text, model, options, on_progress)

    async def pack(
        self, user: UserRef, name: str | None, on_progress: ProgressCallback | None = None
    ) -> Reply:
        """The avatar pack ``name`` from the user's newest model (see `bot.pack_maker`); no name:
        the list of packs."""
        if not (name or "").strip():
            return Reply(texts.packs_list([(p.name, p.title, p.count, p.description) for p in self.packs.values()]))
        pack = find_pack(self.packs, name or "")
        account = await self._consented(user)
        model = await self._db.latest_model(account.id)
        if model is None:
            raise PackNeedsModel()
        embeddings = [p.embedding_key for p in await self._accepted(account.id) if p.embedding_key]
        return await self._packs.start(account, pack, model, embeddings, on_progress)

    async def reroll(
        self, user: UserRef, image_id: int, on_progress: ProgressCallback | None = None
    ) -> Reply:
        """The prompt of one of the user's images again, from the same model, with a new seed."""
        account, image = await self._own_image(user, image_id)
        options = await self._redraw_of(image)
        return await self._draw(account, image.prompt, await self._model_of(image), options, on_progress)

    async def more_like(
        self, user: UserRef, image_id: int, on_progress: ProgressCallback | None = None
    ) -> Reply:
        """Variations of one of the user's images: same prompt and model, starting from that image."""
        account, image = await self._own_image(user, image_id)
        options = await self._redraw_of(image, variation_of=image.blob_key)
        return await self._draw(account, image.prompt, await self._model_of(image), options, on_progress)

    async def upscale(self, user: UserRef, image_id: int, on_progress: ProgressCallback | None = None) -> Reply:
        """One of the user's images at twice its size, sent as a file (see `bot.upscale`)."""
        account, image = await self._own_image(user, image_id)
        model, aspect, word = await self._model_of(image), await self._shape_of(image), await self._class_word(account.id)
        return await self._upscales.start(account, image, model, aspect=aspect, class_word=word, on_progress=on_progress)

    async def delete_image(self, user: UserRef, image_id: int) -> Reply:
        """Delete one of the user's images (its row, and its file unless another row shares it)."""
        account, image = await self._own_image(user, image_id)
        await self._db.delete_image(image.id)
        if await self._db.count_images_with_blob(account.id, image.blob_key) == 0:
            await asyncio.to_thread(self._blobs.delete, image.blob_key)
        return Reply(texts.IMAGE_DELETED)

    async def image_file(self, user: UserRef, image_id: int) -> Path:
        """The full-resolution file of one of the user's images."""
        _, image = await self._own_image(user, image_id)
        return await asyncio.to_thread(self._blobs.path, image.blob_key)

    async def check_image(self, user: UserRef, image_id: int) -> None:
        """NotYourImage unless the image is the user's: asked before a button opens "drawing…"."""
        await self._own_image(user, image_id)

    async def _own_image(self, user: UserRef, image_id: int) -> tuple[User, GeneratedImage]:
        """The image, if it exists and belongs to ``user``; else NotYourImage (never say which)."""
        account = await self._account(user)
        image = await self._db.get_image(image_id)
        if image is None or image.user_id != account.id:
            raise NotYourImage()
        return account, image

    async def _drawn_with(self, image: GeneratedImage) -> dict[str, Any]:
        """The request the image was drawn from; empty when its job is gone."""
        job = await self._db.get_job(image.job_id) if image.job_id is not None else None
        request = (job.payload or {}).get("request") if job is not None else None
        return request if isinstance(request, dict) else {}

    async def _shape_of(self, image: GeneratedImage) -> str:
        """The aspect ratio the image was drawn at, so a redraw keeps its shape."""
        return _shape_in(await self._drawn_with(image))

    async def _redraw_of(self, image: GeneratedImage, variation_of: str | None = None) -> _DrawOptions:
        """A redraw of the image keeps its shape and, when it was drawn fast, few-step mode."""
        drawn = await self._drawn_with(image)
        return _DrawOptions(aspect=_shape_in(drawn), variation_of=variation_of, fast=_fast(drawn.get("fast") is True))

    async def _model_of(self, image: GeneratedImage) -> PersonalModel | None:
        if image.model_id is None:
            return None
        return next((m for m in await self._db.list_models(image.user_id) if m.id == image.model_id), None)

    async def _draw(
        self,
        account: User,
        text: str,
        model: PersonalModel | None,
        options: _DrawOptions,
        on_progress: ProgressCallback | None,
    ) -> Reply:
        """Submit a draw from ``model`` (InstantID when None) and wait for its images."""
        if not await self._db.has_consent(account.id):
            raise ConsentRequired()
        if model is None:
            embeddings = await self._enrolled_embeddings(account.id)
        else:
            embeddings = [p.embedding_key for p in await self._accepted(account.id) if p.embedding_key]
        request = DrawRequest(
            UNQUEUED,
            owner_for(account.id),
            text,
            embeddings,
            class_word=await self._class_word(account.id),  # InstantID's; a model has its own
            seed=_new_seed(),
            num_images=self.settings.draw_num_images,
            aspect=options.aspect,
            negative_prompt=options.negative_prompt,
            variation_of=options.variation_of,
            identity_boost=options.identity_boost,
            fast=options.fast,
        )
        meta: dict[str, Any] = {"prompt": text}
        if model is not None:
            request = replace(
                request,
                adapter_key=model.blob_key,
                method=model.method,
                token=model.token,
                class_word=model.class_word,
            )
            meta |= {"model_id": model.id, "model_version": model.version, "method": model.method}
        job = await self._quota.reserve(
            account.id, request.num_images, lambda: self._runner.create(account, request, meta)
        )
        return await self._finish_images(job, on_progress)

    async def _finish_images(self, job: Job, on_progress: ProgressCallback | None) -> Reply:
        """Wait for a preview or draw, record its images, and say which model drew them."""
        result = await self._runner.run(job, ImagesResult, on_progress)
        drawn = await self._runner.record_images(job, result)
        lines = [_drawn_by(job.kind, _meta(job))]
        lines += [texts.image_line(index, image.score, image.detail) for index, image in enumerate(drawn.images, start=1)]
        if drawn.withheld:
            lines.append(texts.images_withheld(drawn.withheld))
        note = self._images_note(result)
        if note:
            lines.append(note)
        return Reply("\n".join(lines), drawn.images, [arq_job_id(job.kind, job.id)])

    def _images_note(self, result: ImagesResult) -> str | None:
        return texts.TINY_NOTE if self._preset_name == "tiny" else result.note

    def _check_prompt(self, prompt: str | None, *, required: bool) -> str:
        text = " ".join((prompt or "").split())
        if not text and required:
            raise EmptyPrompt()
        if len(text) > self.settings.max_prompt_chars:
            raise PromptTooLong(len(text), self.settings.max_prompt_chars)
        blocked = self._blocklist.check(text)
        if blocked is not None:  # refused before anything is queued or stored
            raise PromptBlocked(blocked)
        return text

    def _styled(self, text: str, style: str | None) -> tuple[str, str]:
        """The prompt wrapped in a style preset, and that style's negative prompt."""
        if style is None:
            return text, ""
        return apply_style(style, text)

    async def styles(self) -> Reply:
        """The style presets /preview and /draw accept."""
        return Reply(texts.styles_list([(s.name, s.title) for s in STYLES.values()]))

    async def _enrolled_embeddings(self, user_id: int) -> list[str]:
        """Face records of the accepted photos; refuses until there are enough of them."""
        accepted = await self._accepted(user_id)
        if len(accepted) < self.settings.min_photos:
            raise NotEnoughPhotos(len(accepted), self.settings.min_photos)
        return [p.embedding_key for p in accepted if p.embedding_key]

    async def _accepted(self, user_id: int) -> list[Photo]:
        return await self._db.list_photos(user_id, PhotoStatus.ACCEPTED)

    async def _class_word(self, user_id: int) -> str:
        """What "me" becomes for this user: the configured word, or with "auto" the photos' majority."""
        if self.settings.class_word != AUTO_CLASS_WORD:
            return self.settings.class_word
        return class_word_for([p.apparent_gender for p in await self._accepted(user_id)])

    # --- training -------------------------------------------------------------------------------

    async def train(
        self,
        user: UserRef,
        method: str | None = None,
        on_progress: ProgressCallback | None = None,
        *,
        class_word: str | None = None,
    ) -> Reply:
        """Train a personal model on the accepted photos; one training per user at a time.

        ``class_word`` (one of ``CLASS_WORD_CHOICES``) is what "me" in the model's prompts becomes;
        None: the configured word, or with "auto" the one the photos' apparent genders agree on.
        """
        chosen = self._check_method(method)
        named_word = check_class_word(class_word)
        account = await self._consented(user)
        async with self._lock(account.id):
            if await self._db.active_job(account.id, str(JobName.TRAIN)) is not None:
                raise TrainingAlreadyRunning()
            accepted = await self._accepted(account.id)
            if len(accepted) < self.settings.min_photos:
                raise NotEnoughPhotos(len(accepted), self.settings.min_photos)
            request = TrainRequest(
                UNQUEUED,
                owner_for(account.id),
                chosen,
                [p.crop_key for p in accepted if p.crop_key],
                self.settings.token,
                named_word or await self._class_word(account.id),
            )
            job = await self._runner.create(account, request, {"method": chosen})
        if on_progress is not None:
            await on_progress(texts.TRAINING_STARTED.format(method=chosen, count=len(accepted)))
        return await self._finish_training(job, on_progress)

    async def _finish_training(self, job: Job, on_progress: ProgressCallback | None) -> Reply:
        result = await self._runner.run(job, TrainResult, on_progress)
        await self._runner.require_owned(job, [result.adapter_key])
        model = await self._runner.saved(
            job,
            lambda: self._db.finish_training(
                job.id, result.method, result.base_preset, result.adapter_key, result.token,
                result.class_word, result.to_dict(),
            ),
        )
        lines = [texts.TRAINING_DONE.format(method=model.method, version=model.version)]
        if self._preset_name == "tiny":
            lines.append(texts.TINY_NOTE)
        return Reply("\n".join(lines), job_ids=[arq_job_id(job.kind, job.id)])

    def _check_method(self, method: str | None) -> str:
        chosen = (method or "").strip().lower() or self.settings.default_method
        known = [m.value for m in TrainingMethod]
        if chosen not in known:
            raise UnknownMethod(chosen, known)
        if chosen not in self.settings.enabled_methods:
            raise MethodNotEnabled(chosen, self.settings.enabled_methods)
        return chosen

    # --- status, forget, resume -----------------------------------------------------------------

    async def status(self, user: UserRef) -> Reply:
        """Photos, models (with versions) and running jobs."""
        account = await self._account(user)
        if not await self._db.has_consent(account.id):
            if await self.erasure_pending(user):
                return Reply(texts.FORGET_PENDING)
            return Reply(texts.STATUS_NOT_CONSENTED)
        photos = await self._db.list_photos(account.id)
        counts = {s: sum(p.status == s for p in photos) for s in PhotoStatus}
        models = await self._db.list_models(account.id)
        jobs = await self._db.list_jobs(account.id, states=ACTIVE_JOB_STATES)
        lines = [
            texts.status_photos(
                counts[PhotoStatus.ACCEPTED],
                counts[PhotoStatus.PENDING],
                counts[PhotoStatus.REFUSED],
                self.settings.min_photos,
            ),
            texts.status_models([(m.version, m.method, m.base_preset) for m in models]),
            texts.status_jobs([(texts.job_label(j.kind), j.state, j.progress) for j in jobs]),
        ]
        return Reply("\n".join(lines))

    async def forget(self, user: UserRef) -> Reply:
        """Erase every row of the user (the user row keeps no platform id), then every blob, queue
        entry and running job. The rows go at once, in one transaction; what cannot be removed yet
        (a job still stopping, an unwritable blob folder, an unreachable queue) stays a pending
        `Erasure` that `settle_erasures` finishes, and the reply says so."""
        account = await self._account(user)
        jobs = await self._db.list_jobs(account.id)
        had_data = await self._db.has_consent(account.id) or bool(jobs)
        erasure = await self._db.erase_user(account.id, [arq_job_id(j.kind, j.id) for j in jobs])
        removed = await self._settle(erasure)
        if removed is None:
            return Reply(texts.FORGET_PENDING)
        if not had_data and not removed:
            return Reply(texts.FORGOTTEN_NOTHING)
        return Reply(texts.FORGOTTEN.format(blobs=removed))

    async def erasure_pending(self, user: UserRef) -> bool:
        """Whether this person's /forget is still being completed."""
        return await self._db.erasure_pending_for(user.platform, user.platform_user_id)

    async def settle_erasures(self) -> int:
        """Try again to finish every pending erasure; returns how many are still pending."""
        left = 0
        for erasure in await self._db.pending_erasures():
            if await self._settle(erasure) is None:
                left += 1
        return left

    async def _settle(self, erasure: Erasure) -> int | None:
        """One attempt at finishing an erasure: the number of blobs removed once it is done, None
        while something is left (said in the log without any personal data)."""
        owner = owner_for(erasure.user_id)
        left: list[str] = []
        try:
            # Workers stop the owner's jobs and keep nothing they write from now on.
            await self._jobs.mark_erased(owner, JOB_TRIES * self._runner.timeout(JobName.TRAIN) + 3600)
            await self._jobs.abort(erasure.job_ids)
            await self._jobs.forget_jobs(erasure.job_ids)
            if await self._jobs.running(erasure.job_ids):
                left.append("a job still stopping")
        except QueueUnavailable:
            left.append("the queue unreachable")
        try:
            removed = await asyncio.to_thread(self._blobs.delete_owner, owner)
        except (OSError, StorageError) as exc:
            removed = 0
            left.append(f"blobs not deletable ({type(exc).__name__})")
        if not left:
            try:
                await self._jobs.forget_jobs(erasure.job_ids)  # results an aborted job left after it
                if await self._jobs.unsettled(erasure.job_ids):
                    left.append("queue entries")
                elif not await self._jobs.wait_uncached(owner):
                    left.append("copies in a worker's blob cache or memory")
                elif not await self._jobs.compact_log():
                    left.append("the queue's append-only file not rewritten")
            except QueueUnavailable:
                left.append("the queue unreachable")
        if left:
            _log.warning("erasure of user %d not finished yet: %s", erasure.user_id, ", ".join(left))
            return None
        await self._db.erasure_done(erasure.user_id)
        _log.info("erasure of user %d finished", erasure.user_id)
        return removed

    async def resume_pending(
        self, user: UserRef, on_progress: ProgressCallback | None = None
    ) -> Reply | None:
        """Finish the user's jobs a restart left queued or running; None when there were none.

        Job ids come from the rows, so re-submitting is a no-op for jobs the queue still holds and
        a re-run for jobs it lost; a result the worker already returned is recorded, not redone.
        """
        account = await self._account(user)
        stale = [
            job
            for job in await self._db.list_jobs(account.id, states=ACTIVE_JOB_STATES)
            if job.id not in self._runner.in_flight
        ]
        if not stale:
            return None
        reply = Reply(texts.RESUMED)
        packs: dict[str, list[Job]] = {}
        for job in stale:
            if (key := pack_key(job)) is not None:
                packs.setdefault(key, []).append(job)
            else:
                reply.add(await self._resume(job, reply, on_progress))
        for key in packs:  # with the images made before the restart, which are not made again
            whole = [job for job in await self._db.list_jobs(account.id) if pack_key(job) == key]
            made = await self._packs.finish(whole, on_progress)
            reply.add(*made.lines)
            reply.images.extend(made.images)
            reply.job_ids.extend(made.job_ids)
            reply.album = True
        return reply

    async def resume_all(
        self, deliver: Callable[[UserRef, Reply], Awaitable[None]] | None = None
    ) -> dict[UserRef, Reply]:
        """``resume_pending`` for every user with unfinished jobs (a restarted chat side calls this,
        in the background: it serves new commands meanwhile).

        Results are recorded for each user, and each user's reply goes to ``deliver`` as soon as
        their jobs are done (an adapter that can reach them sends it); all replies are returned too.
        Users are finished side by side, each on their own: one failure stops no other.
        """
        replies: dict[UserRef, Reply] = {}

        async def one(user_id: int) -> None:
            account = await self._db.get_user(user_id)
            if account is None:
                return
            user = UserRef(account.platform, account.platform_user_id)
            try:
                reply = await self.resume_pending(user)
            except BotError as e:
                _log.warning("resuming the jobs of user %d failed: %s", user_id, e)
                return
            if reply is not None:
                replies[user] = reply
                if deliver is not None:
                    await deliver(user, reply)

        await asyncio.gather(*(one(user_id) for user_id in await self._db.users_with_active_jobs()))
        return replies

    async def _resume(self, job: Job, reply: Reply, on_progress: ProgressCallback | None) -> str:
        """Finish one interrupted job; returns its reply line (images go into `reply`)."""
        reply.job_ids.append(arq_job_id(job.kind, job.id))
        try:
            if job.kind == JobName.CHECK_PHOTO:
                return await self._resume_check(job, on_progress)
            if job.kind == JobName.TRAIN:
                return (await self._finish_training(job, on_progress)).text
            if job.kind in (JobName.PREVIEW, JobName.DRAW):
                done = await self._finish_images(job, on_progress)
                reply.images.extend(done.images)
                return done.text
        except BotError as exc:
            return f"{texts.job_label(job.kind)}: {exc.user_message}"
        await self._db.update_job(job.id, state=JobState.FAILED, error=f"unknown job kind {job.kind!r}")
        return f"{job.kind}: {texts.job_failed(texts.job_label(job.kind), 'invalid_request')}"

    async def _resume_check(self, job: Job, on_progress: ProgressCallback | None) -> str:
        meta = _meta(job)
        photo_id = meta.get("photo_id")
        label = str(meta.get("label") or "photo")
        photo = next((p for p in await self._db.list_photos(job.user_id) if p.id == photo_id), None)
        if photo is None or photo.status != PhotoStatus.PENDING:
            await self._db.update_job(job.id, state=JobState.FAILED, error="the photo is gone")
            return texts.photo_failed(label, texts.ERASED_MEANWHILE)
        return await self._finish_check(job, photo, label, on_progress)

    # --- users ----------------------------------------------------------------------------------

    async def _account(self, user: UserRef) -> User:
        return await self._db.get_or_create_user(user.platform, user.platform_user_id)

    async def _consented(self, user: UserRef) -> User:
        account = await self._account(user)
        if not await self._db.has_consent(account.id):
            raise ConsentRequired()
        return account

    def _lock(self, user_id: int) -> asyncio.Lock:
        """Serialises a user's enrolment and training starts (limits are checked, then written)."""
        return self._user_locks.setdefault(user_id, asyncio.Lock())


def _meta(job: Job) -> dict[str, Any]:
    meta = (job.payload or {}).get("meta", {})
    return meta if isinstance(meta, dict) else {}


def _drawn_by(kind: str, meta: dict[str, Any]) -> str:
    if kind == JobName.PREVIEW:
        return texts.PREVIEW_DONE
    if "model_version" in meta:
        return texts.DRAWN_BY_MODEL.format(method=meta.get("method"), version=meta["model_version"])
    return texts.DRAWN_BY_INSTANTID


def _aspect(aspect: str | None) -> str:
    """The aspect ratio the user asked for (square when none); refuses one the engine lacks."""
    if aspect is None:
        return DEFAULT_ASPECT
    if aspect.strip() not in ASPECT_RATIOS:
        raise UnknownAspect(aspect, list(ASPECT_RATIOS))
    return aspect.strip()


def _shape_in(request: Mapping[str, Any]) -> str:
    aspect = request.get("aspect")
    return aspect if isinstance(aspect, str) and aspect in ASPECT_RATIOS else DEFAULT_ASPECT


@dataclass(frozen=True)
class _DrawOptions:
    """How a draw differs from the plain one: its shape, style's negative prompt, a variation, the
    boost, few-step mode."""

    aspect: str = DEFAULT_ASPECT
    negative_prompt: str = ""
    variation_of: str | None = None  # blob key of the image "more like this" starts from
    identity_boost: bool = False
    fast: bool | None = None  # as DrawRequest.fast: None leaves it to the worker's default


def _fast(asked: bool) -> bool | None:
    """Few-step mode when the user asked for it; else the worker's configured default (None)."""
    return True if asked else None


def _new_seed() -> int:
    return secrets.randbelow(2**31)


__all__ = [
    "BotService",
    "ImageOut",
    "ProgressCallback",
    "Reply",
    "ResumedWork",
    "Upload",
    "UserRef",
]
