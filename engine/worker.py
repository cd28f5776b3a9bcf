"""The GPU worker: arq functions over one resident base model per process.

One process serves both queues. The interactive queue (photo checks, previews, draws) and the training
queue run as two arq workers on one event loop, sharing one ``WorkerContext``; the heavy work runs in
threads and takes ``ResidentBase.gpu_lock`` per denoising call or training step, so a preview never
waits behind a whole training run.

Workers are stateless with respect to the chat side: they read and write blobs, report progress to
Redis, and return plain dicts. They never raise to arq (its msgpack serializer cannot carry
exceptions): failures come back as ``engine.api.JobFailure``. Every job may run twice (arq is
at-least-once); each writes content-addressed blobs only, so a second run is harmless.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import io
import logging
import math
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
from arq import Worker, func
from arq.connections import ArqRedis, RedisSettings, create_pool
from redis.exceptions import RedisError
from PIL import Image, PngImagePlugin

from engine.api import (
    JOB_TRIES,
    erased_key,
    ASPECT_RATIOS,
    CROP_SOURCE_SIDE_KEY,
    JOB_QUEUES,
    QUEUE_INTERACTIVE,
    QUEUE_TRAINING,
    CheckPhotoRequest,
    CheckPhotoResult,
    DrawRequest,
    ErrorCode,
    ImagesResult,
    JobFailure,
    JobName,
    PreviewRequest,
    TrainingMethod,
    TrainRequest,
    TrainResult,
    deserialize_job,
    progress_key,
    serialize_job,
)
from engine.pipelines.base import ResidentBase, resident_dtype
from engine.errors import EngineError, PreviewUnavailable
from engine.erasure import sweep_erased_copies
from engine.faces.analyzer import FaceAnalyzer, FaceRecord, identity_embedding, mean_embedding
from engine.pipelines.instantid import pose_index, render_preview
from engine.pipelines.nsfw import NsfwChecker
from engine.presets import Preset, load_preset
from engine.progress import TrainingProgress
from engine.train.checkpoints import CheckpointStore
from engine.ranking import FaceRedraw, Ranking
from engine.render.detail import DETAIL_STRENGTH
from engine.render.renderer import (
    AdapterRef,
    EmbeddingRef,
    Personalisation,
    Renderer,
    RenderInputError,
    UnetWeightsRef,
    expand_me,
)
from engine.render.upscale import upscale
from engine.residency import OwnersInMemory, Residency, ResidentFirstWorker, adapter_id, log_residency
from engine.settings import EngineSettings
from engine.train.likeness import judge_by_faces
from engine.train.memory import GIB, MemoryPlan, NotEnoughGpuMemory, TrainingShape, check_fits, plan_training
from engine.train.methods import TrainingRun, UnknownTrainingMethod, memory_shape, train_personal_model
from engine.train.stages import TrainingInputError
from engine.upkeep import announce, renew_leases, serve_queue
from storage.blobs import BlobStore, BlobStoreSettings, open_blob_store
from storage.errors import BlobNotFound

_log = logging.getLogger(__name__)

_PROGRESS_TTL_S = 24 * 3600


class InvalidRequest(EngineError):
    """A job payload the worker cannot act on."""


class JobCancelled(EngineError):
    """Raised inside a job's thread at the next step after arq cancelled the job (its timeout)."""


@dataclass
class WorkerContext:
    """Everything a job needs, loaded once per process (arq's ctx dict holds it under "app")."""

    settings: EngineSettings
    preset: Preset
    base: ResidentBase
    faces: FaceAnalyzer
    renderer: Renderer
    nsfw: NsfwChecker
    blobs: BlobStore
    redis: ArqRedis | None = None
    loop: asyncio.AbstractEventLoop | None = None
    gpu_bytes: int | None = None  # the GPU's memory, which training plans must fit; None on the CPU
    cancelled: dict[str, threading.Event] = field(default_factory=dict)  # job id → set when its time is up
    memory_plans: dict[TrainingShape, MemoryPlan] = field(default_factory=dict)  # estimated once per shape
    in_memory: OwnersInMemory = field(init=False)  # whose models the renderer holds, for /forget

    def __post_init__(self) -> None:
        self.in_memory = OwnersInMemory(self.renderer)

    @classmethod
    def load(cls, settings: EngineSettings) -> WorkerContext:
        """Load the preset's models (slow: seconds for tiny, a minute for SDXL). Call once. The blob
        store is opened first, so a wrong [storage] setting fails before the models load."""
        blobs = open_blob_store(settings.blob_store or BlobStoreSettings(local_dir=settings.blobs_dir))
        preset = load_preset(settings.preset, settings.models_dir)
        if settings.resolution is not None:
            preset = preset.at_resolution(settings.resolution)
        device = _pick_device(settings.device)
        base = ResidentBase.load(preset, device=device, dtype=resident_dtype(device.split(":", 1)[0], settings.dtype))
        faces = FaceAnalyzer(preset.face_models_dir, preset.face_checks)
        size = (preset.resolution, preset.resolution)
        renderer = Renderer.from_settings(base.text2img, base.gpu_lock, settings, size, preset.few_step_lora_path)
        nsfw = NsfwChecker.load(preset.safety_checker_dir, device)
        gpu_bytes = None
        if base.device.type == "cuda":
            import torch

            gpu_bytes = torch.cuda.get_device_properties(base.device).total_memory
        return cls(settings, preset, base, faces, renderer, nsfw, blobs, gpu_bytes=gpu_bytes)

    def check_cancelled(self, job_id: str) -> None:
        """Raise ``JobCancelled`` in the job's thread once arq has given up on it (every training step
        and denoising step calls this, so a timed-out job stops within one step)."""
        event = self.cancelled.get(job_id)
        if event is not None and event.is_set():
            raise JobCancelled(f"job {job_id} was cancelled (its time ran out); it stopped at a step boundary")

    def report(self, job_id: str, **fields: Any) -> None:
        """Publish progress from any thread; the chat side polls the hash. Never blocks the job."""
        if self.redis is None or self.loop is None:
            return
        mapping = {k: str(v) for k, v in fields.items() if v is not None}
        asyncio.run_coroutine_threadsafe(self._write_progress(job_id, mapping), self.loop)

    async def _write_progress(self, job_id: str, mapping: dict[str, str]) -> None:
        assert self.redis is not None
        key = progress_key(job_id)
        await self.redis.hset(key, mapping=mapping)  # type: ignore[arg-type]
        await self.redis.expire(key, _PROGRESS_TTL_S)


def _pick_device(configured: str) -> str:
    if configured != "auto":
        return configured
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# --- the jobs -------------------------------------------------------------------------------------


def do_check_photo(app: WorkerContext, request: CheckPhotoRequest) -> CheckPhotoResult:
    """Detect, check and embed one photo; on acceptance store its face record and training crop."""
    references = [FaceRecord.from_bytes(app.blobs.get(k)) for k in request.reference_embedding_keys]
    check = app.faces.check(app.blobs.get(request.photo_key), references)
    if not check.accepted or check.record is None or check.crop is None:
        refusal = str(check.refusal) if check.refusal is not None else None
        return CheckPhotoResult(
            accepted=False, refusal=refusal, faces_found=check.faces_found, similarity=check.similarity,
            face_px=check.face_px, needed_face_px=check.needed_face_px,
        )
    embedding_key = app.blobs.put(request.owner, "faces", check.record.to_bytes(), ".json")
    crop_png = _png_bytes(check.crop, text={CROP_SOURCE_SIDE_KEY: check.crop.info[CROP_SOURCE_SIDE_KEY]})
    crop_key = app.blobs.put(request.owner, "crops", crop_png, ".png")
    return CheckPhotoResult(
        accepted=True,
        embedding_key=embedding_key,
        crop_key=crop_key,
        faces_found=check.faces_found,
        similarity=check.similarity,
        apparent_gender=None if check.apparent_gender is None else str(check.apparent_gender),
    )


def do_preview(app: WorkerContext, request: PreviewRequest) -> ImagesResult:
    """InstantID images from the mean face embedding of the enrolled photos.

    Raises ``PreviewUnavailable`` on an SD1.5 preset (InstantID is SDXL-only), before reading anything.
    """
    return _preview(app, request, detail=False)  # a preview is for speed: no face-detail pass


def _preview(app: WorkerContext, request: PreviewRequest, *, detail: bool) -> ImagesResult:
    app.base.require_instantid()
    prompt = expand_me(request.prompt, "a", request.class_word)  # no personal token yet
    return _instantid_images(
        app, request, prompt, steps=app.settings.preview_steps, out_size=_output_size(app, request.aspect),
        detail=detail,
    )


def do_draw(app: WorkerContext, request: DrawRequest) -> ImagesResult:
    """Render from the user's personal model, or fall back when there is none yet.

    The fallback is InstantID on SDXL presets, and the plain base drawing "a <class word>" on SD1.5.
    ``identity_boost`` with a LoRA on an SDXL preset draws through InstantID with the LoRA active;
    elsewhere (no model, another method, SD1.5, a variation) it is ignored and the draw goes on as usual.
    With ``upscale_of`` the request is an upscale of that image instead (`_upscale`).
    """
    if request.upscale_of is not None:
        return _upscale(app, request)
    size = _output_size(app, request.aspect)
    if request.adapter_key is None and request.variation_of is None and app.base.instantid is not None:
        fallback = PreviewRequest(
            job_id=request.job_id,
            owner=request.owner,
            embedding_keys=request.embedding_keys,
            prompt=request.prompt,
            negative_prompt=request.negative_prompt,
            seed=request.seed,
            num_images=request.num_images,
            class_word=request.class_word or "person",
            aspect=request.aspect,
            fast=request.fast,
        )
        return _preview(app, fallback, detail=True)
    personalisation = _personalisation(app, request)
    log_residency(app.renderer, request.job_id, request.adapter_key, request.method)
    if (
        request.identity_boost
        and isinstance(personalisation, AdapterRef)
        and request.variation_of is None
        and app.base.instantid is not None
    ):
        return _draw_boosted(app, request, personalisation, size)
    if personalisation is not None and request.token and request.class_word:
        prompt = expand_me(request.prompt, request.token, request.class_word)
    else:
        prompt = expand_me(request.prompt, "a", request.class_word or "person")
    variation_of = None
    if request.variation_of is not None:
        variation_of = Image.open(io.BytesIO(app.blobs.get(request.variation_of))).convert("RGB")
    app.report(request.job_id, stage="rendering")
    steps = app.settings.draw_steps or app.preset.inference_steps
    fast = _fast(app, request)

    def draw(start: Image.Image | None, strength: float, **options: Any) -> list[Image.Image]:
        return app.renderer.draw(
            prompt, adapter=personalisation, negative_prompt=request.negative_prompt, seed=request.seed,
            steps=steps, guidance=app.preset.guidance_scale, variation_of=start, strength=strength, fast=fast,
            **options,
        )

    images = draw(
        variation_of, request.variation_strength, num_images=request.num_images, size=size,
        on_step=lambda done, total: _step(app, request.job_id, done, total),
    )
    records = _records(app, request.embedding_keys) if request.embedding_keys else []
    redraw: FaceRedraw | None = None  # few-step mode is for speed: no face-detail pass
    if fast:
        pass
    elif isinstance(personalisation, AdapterRef) and app.base.instantid is not None and records:
        lora = personalisation
        redraw = _instantid_redraw(app, request, records, prompt, steps, lambda: app.renderer.lora_active(lora))
    else:  # TI and DreamBooth (InstantID is not wired to them) and SD1.5: the user's model alone
        res = app.preset.resolution
        redraw = lambda crop, _kps, _box: draw(  # noqa: E731
            crop, DETAIL_STRENGTH, size=(res, res), on_step=lambda *_: _detail_step(app, request.job_id)
        )[0]
    return _store_ranked(
        app, request.owner, images, records, request.seed, prompt, keep=request.keep, redraw=redraw
    )


def _upscale(app: WorkerContext, request: DrawRequest) -> ImagesResult:
    """The image ``upscale_of`` at twice its size, re-denoised lightly by the base with the user's
    model when the request names one (`engine.render.upscale`); NSFW-screened and scored like a draw."""
    assert request.upscale_of is not None
    personalisation = _personalisation(app, request)
    if personalisation is not None and request.token and request.class_word:
        prompt = expand_me(request.prompt, request.token, request.class_word)
    else:
        prompt = expand_me(request.prompt, "a", request.class_word or "person")
    app.report(request.job_id, stage="upscaling")
    with Image.open(io.BytesIO(app.blobs.get(request.upscale_of))) as source:
        image = upscale(
            app.renderer, source, resolution=app.preset.resolution, prompt=prompt, seed=request.seed,
            steps=app.settings.draw_steps or app.preset.inference_steps, guidance=app.preset.guidance_scale,
            adapter=personalisation, negative_prompt=request.negative_prompt,
            on_step=lambda done, total: _step(app, request.job_id, done, total),
        )
    records = _records(app, request.embedding_keys) if request.embedding_keys else []
    return _store_ranked(app, request.owner, [image], records, request.seed, prompt)


def _draw_boosted(
    app: WorkerContext, request: DrawRequest, adapter: AdapterRef, size: tuple[int, int]
) -> ImagesResult:
    """InstantID on the enrolled faces with the user's LoRA active on the shared UNet: the LoRA
    brings what training learned, the face embedding and keypoints pull the likeness further."""
    assert request.token and request.class_word  # _personalisation checked both
    prompt = expand_me(request.prompt, request.token, request.class_word)
    return _instantid_images(
        app, request, prompt,
        steps=app.settings.draw_steps or app.preset.inference_steps,
        out_size=size,
        while_locked=lambda: app.renderer.lora_active(adapter),
        detail=True,
    )


def _instantid_images(
    app: WorkerContext,
    request: PreviewRequest | DrawRequest,
    prompt: str,
    *,
    steps: int | None,
    out_size: tuple[int, int] | None,
    while_locked: Callable[[], AbstractContextManager[object]] | None = None,
    detail: bool = False,
) -> ImagesResult:
    """InstantID from the mean raw embedding of the request's enrolled faces, posed like the most
    frontal and largest of them (``pose_index``), the identity tokens masked to that face's region
    (``render_preview``), stored and ranked; with ``detail`` the faces get the face-detail pass,
    through InstantID too. In few-step mode (``_fast``) the distilled LoRA draws on top, with its steps
    and guidance, and there is no face-detail pass."""
    guidance = None
    if _fast(app, request):
        assert app.renderer.few_step is not None  # _fast checked it
        steps, guidance, detail = app.renderer.few_step.steps, app.renderer.few_step.guidance, False
        while_locked = functools.partial(_stacked, while_locked, functools.partial(
            app.renderer.few_step_active, app.base.require_instantid()
        ))
    records = _records(app, request.embedding_keys)
    pose = records[pose_index(records)]
    images = render_preview(
        app.base,
        identity_embedding(records),
        pose.kps,
        _image_size(pose),
        prompt=prompt,
        negative_prompt=request.negative_prompt,
        seed=request.seed,
        num_images=request.num_images,
        steps=steps,
        callback=lambda done, total: _step(app, request.job_id, done, total),
        out_size=out_size,
        while_locked=while_locked,
        bbox=pose.bbox,
        guidance=guidance,
    )
    keep = request.keep if isinstance(request, DrawRequest) else None
    redraw = _instantid_redraw(app, request, records, prompt, steps, while_locked) if detail else None
    return _store_ranked(app, request.owner, images, records, request.seed, prompt, keep=keep, redraw=redraw)



def _fast(app: WorkerContext, request: PreviewRequest | DrawRequest) -> bool:
    """Few-step mode for ``request``: its own choice, else ``[engine] few_step``; only where the
    preset's distilled LoRA is on disk (elsewhere the full path draws)."""
    wanted = app.settings.few_step if request.fast is None else request.fast
    return wanted and app.renderer.few_step is not None


@contextmanager
def _stacked(
    first: Callable[[], AbstractContextManager[object]] | None, second: Callable[[], AbstractContextManager[object]]
) -> Iterator[None]:
    """``first`` (e.g. the user's LoRA) entered, then ``second`` (the distilled LoRA) inside it."""
    with (first or nullcontext)(), second():
        yield


def _instantid_redraw(
    app: WorkerContext,
    request: PreviewRequest | DrawRequest,
    records: list[FaceRecord],
    prompt: str,
    steps: int | None,
    while_locked: Callable[[], AbstractContextManager[object]] | None,
) -> FaceRedraw:
    """The face-detail redraw through InstantID on the enrolled faces, posed by the face as drawn."""

    def redraw(crop: Image.Image, kps: np.ndarray, box: np.ndarray) -> Image.Image:
        return render_preview(
            app.base, identity_embedding(records), kps, crop.size, prompt=prompt,
            negative_prompt=request.negative_prompt, seed=request.seed, num_images=1, steps=steps,
            callback=lambda *_: _detail_step(app, request.job_id), out_size=crop.size,
            while_locked=while_locked, bbox=box.reshape(-1), init_image=crop, strength=DETAIL_STRENGTH,
        )[0].resize(crop.size)  # a 1024² square is drawn at 1016² (instantid_size)

    return redraw


def _detail_step(app: WorkerContext, job_id: str) -> None:
    app.check_cancelled(job_id)
    app.report(job_id, stage="face detail")


def _step(app: WorkerContext, job_id: str, done: int, total: int) -> None:
    """After each denoising step: stop if the job was cancelled, else report the step."""
    app.check_cancelled(job_id)
    app.report(job_id, stage="rendering", step=done, total=total)


def aspect_size(aspect: str, resolution: int, multiple: int) -> tuple[int, int]:
    """(width, height) for ``aspect`` with about ``resolution``² pixels, each a multiple of ``multiple``.

    >>> aspect_size("3:4", 1024, 64)
    (896, 1152)
    """
    ratio = ASPECT_RATIOS.get(aspect)
    if ratio is None:
        raise InvalidRequest(f"unknown aspect ratio {aspect!r}; use one of {', '.join(ASPECT_RATIOS)}")
    width = resolution * math.sqrt(ratio[0] / ratio[1])
    height = resolution * resolution / width
    return _round_to(width, multiple), _round_to(height, multiple)


def _round_to(value: float, multiple: int) -> int:
    return max(multiple, round(value / multiple) * multiple)


def _output_size(app: WorkerContext, aspect: str) -> tuple[int, int]:
    # SDXL's and SD1.5's training buckets are multiples of 64; the tiny presets' 128 px needs finer steps.
    return aspect_size(aspect, app.preset.resolution, 8 if app.preset.is_tiny else 64)


def _personalisation(app: WorkerContext, request: DrawRequest) -> Personalisation | None:
    """The user's model as the renderer applies it: a LoRA, a learned word or UNet weights."""
    if request.adapter_key is None:
        return None
    if not request.token or not request.class_word:
        raise InvalidRequest("a personal model needs its token and class word")
    path = app.blobs.path(request.adapter_key)
    ref: Personalisation
    if request.method == TrainingMethod.LORA:
        ref = AdapterRef(adapter_id(request.adapter_key), path)
    elif request.method == TrainingMethod.TEXTUAL_INVERSION:
        ref = EmbeddingRef(request.token, path)
    elif request.method == TrainingMethod.DREAMBOOTH:
        ref = UnetWeightsRef(path)
    else:
        raise InvalidRequest(f"unknown model method {request.method!r}")
    app.in_memory.note(request.owner, request.adapter_key, ref)  # for /forget (engine.erasure)
    return ref


def do_train(app: WorkerContext, request: TrainRequest) -> TrainResult:
    """Train a personal model (LoRA, Textual Inversion or DreamBooth) and store its weights.

    Checkpoints go to the blob store under the job's id, so a killed job that arq runs again resumes
    from its newest checkpoint; they are cleared once the model itself is stored.
    """
    if request.method not in set(TrainingMethod):
        raise InvalidRequest(f"unknown training method {request.method!r}; use lora, ti or dreambooth")
    if not request.crop_keys:
        raise InvalidRequest("no training photos were given")
    # Each crop's info keeps its PNG's text, so its source side (CROP_SOURCE_SIDE_KEY) reaches training.
    crops = [Image.open(io.BytesIO(app.blobs.get(k))).convert("RGB") for k in request.crop_keys]
    checkpoints = CheckpointStore(app.blobs, request.owner, request.job_id)
    run = TrainingRun(
        pipe=app.base.text2img,
        lock=app.base.gpu_lock,
        preset=app.preset,
        checkpoints=checkpoints,
        class_image_cache=app.settings.models_dir / "cache" / "class-images",
        seed=request.seed,
        steps=request.steps or app.settings.train_steps,
        random_flip=app.settings.random_flip,
        train_text_encoder=app.settings.train_text_encoder,
        gradient_checkpointing=app.settings.gradient_checkpointing,
        dreambooth_optimizer=app.settings.dreambooth_optimizer,
        class_images=app.settings.class_images,
        likeness=judge_by_faces(app.faces, crops) if app.settings.keep_best_by_likeness else None,
    )

    check_memory(app, run, request.method)

    def on_progress(progress: TrainingProgress) -> None:
        app.check_cancelled(request.job_id)  # after every training step
        app.report(
            request.job_id,
            stage="training",
            step=progress.step,
            total=progress.total,
            loss=f"{progress.loss:.4f}",
            eta_s=f"{progress.eta_s:.0f}",
        )

    try:
        model = train_personal_model(
            run, request.method, crops, request.token, request.class_word, on_progress, request.owner
        )
        adapter_key = app.blobs.put_written(request.owner, "models", ".safetensors", model.write)
    except Exception:
        # A failure comes back as a result, which arq never runs again, and a new /train is a new job:
        # nothing will resume from these (a DreamBooth checkpoint is tens of GB). A killed worker
        # raises nothing here, and its checkpoints stay for the retry.
        checkpoints.clear()
        raise
    checkpoints.clear()
    return TrainResult(
        adapter_key=adapter_key,
        method=request.method,
        base_preset=app.preset.name,
        steps=model.steps,
        token=model.token,
        class_word=request.class_word,
        final_loss=model.final_loss,
    )


def check_memory(app: WorkerContext, run: TrainingRun, method: str) -> None:
    """Refuse, before any work, a method whose estimated peak does not fit this worker's GPU.

    Raises ``NotEnoughGpuMemory`` naming the config.toml setting to change; nothing is checked on the
    CPU (tiny models, and the host's memory is not what the estimate counts).
    """
    if app.gpu_bytes is None:
        return
    shape = memory_shape(run, method)
    plan = app.memory_plans.get(shape)
    if plan is None:
        plan = app.memory_plans[shape] = plan_training(app.base.modules(), shape, app.base.dtype)
        _log.info("%s training needs about %s of %.1f GiB", method, plan.describe(), app.gpu_bytes / GIB)
    check_fits(plan, app.gpu_bytes)


def _records(app: WorkerContext, keys: list[str]) -> list[FaceRecord]:
    if not keys:
        raise InvalidRequest("no enrolled face was given")
    return [FaceRecord.from_bytes(app.blobs.get(k)) for k in keys]


def _image_size(record: FaceRecord) -> tuple[int, int]:
    width, height = record.image_size
    return int(width), int(height)


def _store_ranked(
    app: WorkerContext,
    owner: str,
    images: list[Image.Image],
    records: list[FaceRecord],
    seed: int,
    prompt: str,
    *,
    keep: int | None = None,
    redraw: FaceRedraw | None = None,
) -> ImagesResult:
    """NSFW-screen, then best-of-N: rank by ArcFace cosine to the enrolled mean embedding, keep the
    best ``keep`` (all when None; the rest are never written), give each kept face the face-detail
    pass when ``redraw`` is given and the config has it on, and store them, best first.

    A flagged image is stored black (never its content) and ranked last with no score.
    """
    target = mean_embedding(records) if records else None
    ranking = Ranking(app.faces, app.nsfw, app.preset.resolution)
    ranked = ranking.rank(images, target, keep=keep, redraw=redraw if app.settings.face_detail else None)
    keys = [app.blobs.put(owner, "images", _png_bytes(item.image), ".png") for item in ranked]
    return ImagesResult(
        image_keys=keys,
        scores=[item.score for item in ranked],
        seed=seed,
        prompt_used=prompt,
        note=app.preset.note,
        flagged=[item.flagged for item in ranked],
        drawn_scores=[item.drawn_score for item in ranked],
        detailed_scores=[item.detailed_score for item in ranked],
    )


def _png_bytes(image: Image.Image, text: dict[str, str] | None = None) -> bytes:
    """``image`` as PNG, with ``text`` as its text chunks (nothing else of ``image.info`` is written)."""
    info = PngImagePlugin.PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value)
    out = io.BytesIO()
    image.save(out, format="PNG", pnginfo=info)
    return out.getvalue()


# --- arq glue -------------------------------------------------------------------------------------

_Req = TypeVar("_Req", CheckPhotoRequest, PreviewRequest, TrainRequest, DrawRequest)


async def _run_job(
    ctx: dict[str, Any],
    request_type: type[_Req],
    payload: dict[str, Any],
    work: Callable[[WorkerContext, _Req], Any],
) -> dict[str, Any]:
    """Parse, run the blocking work in a thread, and turn every failure into a JobFailure dict."""
    app: WorkerContext = ctx["app"]
    try:
        request = request_type.from_dict(payload)
        _check_owned(request)
    except (TypeError, ValueError, InvalidRequest) as e:
        return _failure(ErrorCode.INVALID_REQUEST, str(e))
    if await _owner_erased(app, request.owner):
        return _failure(ErrorCode.ERASED, "the owner used /forget; the job was not run")
    try:
        out = await _outcome(app, request, work)
    finally:  # an aborted job too: /forget aborts the owner's running jobs
        erased = await _owner_erased(app, request.owner)
        if erased:
            await asyncio.to_thread(app.blobs.delete_owner, request.owner)
            _log.info("job %s: its owner was erased meanwhile; what it wrote is deleted", request.job_id)
    if erased:
        return _failure(ErrorCode.ERASED, "the owner used /forget meanwhile; nothing the job made was kept")
    return out


async def _outcome(
    app: WorkerContext, request: _Req, work: Callable[[WorkerContext, _Req], Any]
) -> dict[str, Any]:
    """The job's result dict, or a JobFailure dict for every failure the chat side can explain."""
    started = time.perf_counter()
    try:
        result = await _in_thread(app, request.job_id, lambda: work(app, request))
    except JobCancelled as e:
        return _failure(ErrorCode.INTERNAL, str(e))
    except BlobNotFound as e:
        return _failure(ErrorCode.MISSING_BLOB, str(e))
    except PreviewUnavailable as e:
        return _failure(ErrorCode.PREVIEW_UNAVAILABLE, str(e))
    except (InvalidRequest, TrainingInputError, RenderInputError, UnknownTrainingMethod) as e:
        return _failure(ErrorCode.INVALID_REQUEST, str(e))
    except NotEnoughGpuMemory as e:
        _log.warning("job %s refused: %s", request.job_id, e)  # the operator's to act on: it names the setting
        return _failure(ErrorCode.NOT_ENOUGH_GPU_MEMORY, str(e))
    except EngineError as e:
        return _failure(ErrorCode.MODEL_UNAVAILABLE, str(e))
    except Exception as e:  # a bug or a broken model: log it whole, tell the chat side briefly
        _log.exception("job %s failed", request.job_id)
        return _failure(ErrorCode.INTERNAL, f"{type(e).__name__}: {e}")
    _log.info("job %s done in %.2f s", request.job_id, time.perf_counter() - started)
    out: dict[str, Any] = result.to_dict()
    return out


async def _owner_erased(app: WorkerContext, owner: str) -> bool:
    """Whether /forget marked ``owner`` erased. An unreachable Redis counts as not erased: the chat
    side's erasure stays pending until no job of the owner runs, and then deletes the blobs itself."""
    if app.redis is None:
        return False
    try:
        return bool(await app.redis.exists(erased_key(owner)))
    except (RedisError, OSError):
        return False


async def _in_thread(app: WorkerContext, job_id: str, work: Callable[[], Any]) -> Any:
    """Run ``work`` in a thread. If arq cancels the job (its timeout), flag it, so that the thread stops
    at its next step, and wait for it: a retry of the job never starts while this copy still runs."""
    event = app.cancelled[job_id] = threading.Event()
    running = asyncio.ensure_future(asyncio.to_thread(work))
    try:
        return await asyncio.shield(running)
    except asyncio.CancelledError:
        event.set()
        _log.warning("job %s cancelled; waiting for its thread to stop at the next step", job_id)
        await asyncio.wait([running])
        if not running.cancelled():
            running.exception()  # retrieved: the JobCancelled it ends with is expected, not an error
        raise
    finally:
        if app.cancelled.get(job_id) is event:
            del app.cancelled[job_id]


def _check_owned(request: CheckPhotoRequest | PreviewRequest | TrainRequest | DrawRequest) -> None:
    """Refuse a request naming a blob of another owner: whoever can put a job on the queue must not
    be able to draw one user's face into another's folder. Blob keys start with their owner."""
    prefix = f"{request.owner}/"
    for field_ in dataclasses.fields(request):
        name, value = field_.name, getattr(request, field_.name)
        if not (name.endswith(("_key", "_keys")) or name in ("variation_of", "upscale_of")) or value is None:
            continue
        for key in value if isinstance(value, list) else [value]:
            if not isinstance(key, str) or not key.startswith(prefix) or "/../" in f"/{key}/":
                raise InvalidRequest(f"{name} names a blob that is not the job owner's")


def _failure(code: ErrorCode, detail: str) -> dict[str, Any]:
    return JobFailure(failed=True, code=code, detail=detail).to_dict()


async def check_photo(ctx: dict[str, Any], payload: dict[str, Any]) -> dict[str, Any]:
    return await _run_job(ctx, CheckPhotoRequest, payload, do_check_photo)


async def preview(ctx: dict[str, Any], payload: dict[str, Any]) -> dict[str, Any]:
    return await _run_job(ctx, PreviewRequest, payload, do_preview)


async def draw(ctx: dict[str, Any], payload: dict[str, Any]) -> dict[str, Any]:
    return await _run_job(ctx, DrawRequest, payload, do_draw)


async def train(ctx: dict[str, Any], payload: dict[str, Any]) -> dict[str, Any]:
    return await _run_job(ctx, TrainRequest, payload, do_train)


_FUNCTIONS: dict[JobName, Callable[[dict[str, Any], dict[str, Any]], Awaitable[dict[str, Any]]]] = {
    JobName.CHECK_PHOTO: check_photo,
    JobName.PREVIEW: preview,
    JobName.DRAW: draw,
    JobName.TRAIN: train,
}


def build_workers(app: WorkerContext, redis: ArqRedis, *, burst: bool = False) -> list[Worker]:
    """One arq worker per queue, sharing the context and the Redis pool."""
    settings = app.settings
    workers = []
    for queue, timeout, max_jobs in (
        (QUEUE_INTERACTIVE, settings.interactive_timeout_s, settings.max_jobs),
        # One training at a time per process: two would fight over the same GPU memory.
        (QUEUE_TRAINING, settings.training_timeout_s, 1),
    ):
        functions = [func(f, name=str(name)) for name, f in _FUNCTIONS.items() if JOB_QUEUES[name] == queue]
        workers.append(
            (ResidentFirstWorker if queue == QUEUE_INTERACTIVE else Worker)(
                functions=functions,
                queue_name=queue,
                redis_pool=redis,
                ctx={"app": app},
                burst=burst,
                handle_signals=False,
                max_jobs=max_jobs,
                job_timeout=timeout,
                keep_result=24 * 3600,
                poll_delay=0.1,
                max_tries=JOB_TRIES,
                allow_abort_jobs=True,  # /forget aborts the user's running jobs
                job_serializer=serialize_job,
                job_deserializer=deserialize_job,
                log_results=False,  # results carry prompts and photo checks' findings: personal data
            )
        )
    arq_log = logging.getLogger("arq.worker")
    if not any(isinstance(f, _WithoutJobArguments) for f in arq_log.filters):
        arq_log.addFilter(_WithoutJobArguments())
    return workers


class _WithoutJobArguments(logging.Filter):
    """Drops the payload from arq's "job started" line: it holds the user's prompt (personal data,
    which never reaches logs). The job id, function and timing stay; arq is pinned, and so is its format."""

    _STARTED = "%6.2fs → %s(%s)%s"  # arq 0.28 worker.run_job: delay, "job_id:function", arguments, extra

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == self._STARTED and isinstance(record.args, tuple) and len(record.args) == 4:
            delay, ref, _arguments, extra = record.args
            record.args = (delay, ref, "…", extra)
        return True


async def connect_redis(url: str) -> ArqRedis:
    return await create_pool(
        RedisSettings.from_dsn(url), job_serializer=serialize_job, job_deserializer=deserialize_job
    )


async def run_worker(settings: EngineSettings, *, burst: bool = False) -> None:
    """Load the models once, announce readiness, and serve both queues until cancelled."""
    app = await asyncio.to_thread(WorkerContext.load, settings)
    redis = await connect_redis(settings.redis_url)
    app.redis, app.loop = redis, asyncio.get_running_loop()
    workers = build_workers(app, redis, burst=burst)
    interactive = next(w for w in workers if isinstance(w, ResidentFirstWorker))
    interactive.residency = Residency(app.renderer, redis, settings.residency_wait_s, interactive.has_room)
    residency = asyncio.create_task(interactive.residency.publish_forever())
    heartbeat = asyncio.create_task(announce(redis))
    leases = asyncio.create_task(renew_leases(app.cancelled, redis))
    sweep = asyncio.create_task(sweep_erased_copies(app.blobs, redis, app.in_memory))
    try:
        await asyncio.gather(*(serve_queue(w, burst=burst) for w in workers))
    finally:
        for task in (heartbeat, leases, sweep, residency):
            task.cancel()
        for w in workers:
            await w.close()
        await redis.close()
