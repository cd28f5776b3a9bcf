"""Queue round trips through the real worker: arq over a real Valkey, the tiny preset's real models."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from bot.jobs import JobClient
from engine.api import (
    CheckPhotoRequest,
    CheckPhotoResult,
    DrawRequest,
    ErrorCode,
    ImagesResult,
    JobFailure,
    JobName,
    PreviewRequest,
    Refusal,
    TrainRequest,
    TrainResult,
    parse_result,
)
from storage.blobs import LocalBlobStore
from tests.support import face_photo, group_photo, running_worker

pytestmark = pytest.mark.slow
OWNER = "u1"


async def test_a_selfie_goes_from_check_to_preview_to_training_to_a_drawing(
    tmp_path: Path, valkey_url: str, tiny_preset_dir: Path
) -> None:
    blobs = LocalBlobStore(tmp_path / "blobs")
    async with running_worker(valkey_url, blobs.root, tiny_preset_dir.parent), await JobClient.connect(
        valkey_url
    ) as jobs:
        faces, crops = [], []
        for n in range(3):
            key = blobs.put(OWNER, "photos", face_photo(n), ".jpg")
            request = CheckPhotoRequest(f"check_photo-{n}", OWNER, key, reference_embedding_keys=faces)
            await jobs.submit(JobName.CHECK_PHOTO, request, request.job_id)
            checked = parse_result(await jobs.wait(request.job_id, timeout=60), CheckPhotoResult)
            assert isinstance(checked, CheckPhotoResult) and checked.accepted, checked
            assert checked.embedding_key and checked.crop_key
            assert checked.embedding_key.startswith(f"{OWNER}/faces/")
            if faces:  # the same person as the photos before it
                assert checked.similarity is not None and checked.similarity > 0.9
            faces.append(checked.embedding_key)
            crops.append(checked.crop_key)
        with Image.open(blobs.path(crops[0])) as crop:
            assert crop.size == (128, 128)

        preview = PreviewRequest("preview-1", OWNER, faces, "a portrait of me", seed=3, num_images=2)
        await jobs.submit(JobName.PREVIEW, preview, preview.job_id)
        previewed = parse_result(await jobs.wait(preview.job_id, timeout=60), ImagesResult)
        assert isinstance(previewed, ImagesResult)
        assert len(previewed.image_keys) == 2 and len(set(previewed.image_keys)) == 2
        assert previewed.prompt_used == "a portrait of a person"
        assert previewed.note and "noise" in previewed.note

        progress: list[dict[str, str]] = []

        async def record(fields: dict[str, str]) -> None:
            progress.append(dict(fields))

        train = TrainRequest("train-1", OWNER, "lora", crops, token="sks", class_word="person", steps=6)
        await jobs.submit(JobName.TRAIN, train, train.job_id)
        trained = parse_result(await jobs.wait(train.job_id, timeout=120, on_progress=record), TrainResult)
        assert isinstance(trained, TrainResult)
        assert trained.steps == 6 and trained.base_preset == "tiny"
        assert blobs.get(trained.adapter_key)[:8]  # the safetensors file is in the store
        assert progress and progress[-1].get("total") == "6"

        draw = DrawRequest(
            "draw-1", OWNER, "me as an astronaut", faces, adapter_key=trained.adapter_key,
            method="lora", token="sks", class_word="person", seed=3, num_images=1,
        )
        await jobs.submit(JobName.DRAW, draw, draw.job_id)
        drawn = parse_result(await jobs.wait(draw.job_id, timeout=60), ImagesResult)
        assert isinstance(drawn, ImagesResult)
        assert drawn.prompt_used == "sks person as an astronaut"
        base = DrawRequest("draw-2", OWNER, "me as an astronaut", faces, seed=3, num_images=1)
        await jobs.submit(JobName.DRAW, base, base.job_id)
        fallback = parse_result(await jobs.wait(base.job_id, timeout=60), ImagesResult)
        assert isinstance(fallback, ImagesResult)
        assert fallback.prompt_used == "a person as an astronaut"  # InstantID until a model exists
        assert blobs.get(drawn.image_keys[0]) != blobs.get(fallback.image_keys[0])


async def test_refusals_and_failures_come_back_as_results_not_exceptions(
    tmp_path: Path, valkey_url: str, tiny_preset_dir: Path
) -> None:
    blobs = LocalBlobStore(tmp_path / "blobs")
    async with running_worker(valkey_url, blobs.root, tiny_preset_dir.parent), await JobClient.connect(
        valkey_url
    ) as jobs:
        group = blobs.put(OWNER, "photos", group_photo(), ".jpg")
        await jobs.submit(JobName.CHECK_PHOTO, CheckPhotoRequest("check_photo-1", OWNER, group), "check_photo-1")
        refused = parse_result(await jobs.wait("check_photo-1", timeout=60), CheckPhotoResult)
        assert isinstance(refused, CheckPhotoResult)
        assert not refused.accepted and refused.refusal == Refusal.SEVERAL_FACES
        assert refused.embedding_key is None and not list((blobs.root / OWNER).glob("faces/*"))

        missing = CheckPhotoRequest("check_photo-2", OWNER, f"{OWNER}/photos/{'0' * 64}.jpg")
        await jobs.submit(JobName.CHECK_PHOTO, missing, missing.job_id)
        failed = parse_result(await jobs.wait(missing.job_id, timeout=60), CheckPhotoResult)
        assert isinstance(failed, JobFailure) and failed.code == ErrorCode.MISSING_BLOB

        # A job put on the queue by hand, drawing another user's face into this owner's folder:
        stolen = PreviewRequest("preview-7", "u2", [f"{OWNER}/faces/{'1' * 64}.json"], "me")
        await jobs.submit(JobName.PREVIEW, stolen, stolen.job_id)
        refused_owner = parse_result(await jobs.wait(stolen.job_id, timeout=60), ImagesResult)
        assert isinstance(refused_owner, JobFailure) and refused_owner.code == ErrorCode.INVALID_REQUEST
        assert "not the job owner's" in refused_owner.detail and not (blobs.root / "u2").exists()
        escape = CheckPhotoRequest("check_photo-8", OWNER, f"{OWNER}/../u2/photos/x.jpg")
        await jobs.submit(JobName.CHECK_PHOTO, escape, escape.job_id)
        escaped = parse_result(await jobs.wait(escape.job_id, timeout=60), CheckPhotoResult)
        assert isinstance(escaped, JobFailure) and escaped.code == ErrorCode.INVALID_REQUEST

        bad = TrainRequest("train-1", OWNER, "dreambooth", [], token="sks", class_word="person")
        await jobs.submit(JobName.TRAIN, bad, bad.job_id)
        unsupported = parse_result(await jobs.wait(bad.job_id, timeout=60), TrainResult)
        assert isinstance(unsupported, JobFailure) and unsupported.code == ErrorCode.INVALID_REQUEST


async def test_the_same_job_id_runs_once_and_a_second_run_writes_the_same_blobs(
    tmp_path: Path, valkey_url: str, tiny_preset_dir: Path
) -> None:
    blobs = LocalBlobStore(tmp_path / "blobs")
    photo = blobs.put(OWNER, "photos", face_photo(0), ".jpg")
    async with running_worker(valkey_url, blobs.root, tiny_preset_dir.parent), await JobClient.connect(
        valkey_url
    ) as jobs:
        request = CheckPhotoRequest("check_photo-9", OWNER, photo)
        assert await jobs.submit(JobName.CHECK_PHOTO, request, request.job_id) is True
        first = await jobs.wait(request.job_id, timeout=60)
        # Re-enqueueing the same row's job (e.g. after a restart) is a no-op with the same result.
        assert await jobs.submit(JobName.CHECK_PHOTO, request, request.job_id) is False
        assert await jobs.wait(request.job_id, timeout=60) == first
        # arq is at-least-once: running the job again under a new id stores nothing new.
        files_before = sorted(p for p in blobs.root.rglob("*") if p.is_file())
        again = CheckPhotoRequest("check_photo-10", OWNER, photo)
        await jobs.submit(JobName.CHECK_PHOTO, again, again.job_id)
        second = await jobs.wait(again.job_id, timeout=60)
        assert second["embedding_key"] == first["embedding_key"]
        assert second["crop_key"] == first["crop_key"]
        assert sorted(p for p in blobs.root.rglob("*") if p.is_file()) == files_before


def test_a_training_that_fails_leaves_no_checkpoint_behind(
    tmp_path: Path, tiny_preset_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import logging
    import threading
    from dataclasses import replace

    from engine.train.checkpoints import CheckpointStore
    from engine.settings import EngineSettings
    from engine.train.lora import train_lora
    from engine.train.methods import TrainingRun, lora_settings_for
    from engine.worker import WorkerContext, do_train
    from storage.errors import StorageError
    from tests.support import noise_crops, png

    settings = EngineSettings(preset="tiny", models_dir=tiny_preset_dir.parent, blobs_dir=tmp_path / "blobs",
                              redis_url="redis://unused", device="cpu")
    app = WorkerContext.load(settings)
    crops = noise_crops(2)
    keys = [app.blobs.put(OWNER, "crops", png(crop), ".png") for crop in crops]
    # An earlier attempt of the job, killed after its checkpoint at step 1 (what a worker crash leaves).
    store = CheckpointStore(app.blobs, OWNER, "train-9")
    run = TrainingRun(app.base.text2img, threading.Lock(), app.preset, store, tmp_path / "classes", seed=0)

    def killed(progress: object) -> None:
        raise KeyboardInterrupt("worker killed")

    with pytest.raises(KeyboardInterrupt):
        train_lora(app.base.text2img, app.base.gpu_lock, crops, "sks", "person",
                   replace(lora_settings_for(run), checkpoint_every=1, prior_loss_weight=0.0), killed,
                   checkpoints=store)
    assert store.load_latest() is not None
    (app.blobs.root / OWNER / "models").write_bytes(b"")  # a file where the models folder goes: storing fails
    caplog.set_level(logging.INFO, logger="engine.train.checkpoints")
    request = TrainRequest("train-9", OWNER, "lora", keys, token="sks", class_word="person")
    with pytest.raises(StorageError):
        do_train(app, request)  # resumes, trains, and cannot store the model
    assert any("resuming from step 1" in r.getMessage() for r in caplog.records)
    assert store.load_latest() is None
    assert list((app.blobs.root / OWNER / "checkpoints").iterdir()) == []


async def test_a_training_that_times_out_stops_at_its_next_step_and_never_runs_twice(
    tmp_path: Path, valkey_url: str, tiny_preset_dir: Path
) -> None:
    import asyncio

    from bot.errors import JobFailed
    from engine.api import progress_key
    from tests.support import noise_crops, png

    blobs = LocalBlobStore(tmp_path / "blobs")
    crops = [blobs.put(OWNER, "crops", png(crop), ".png") for crop in noise_crops(2)]
    request = TrainRequest("train-17", OWNER, "ti", crops, token="sks", class_word="person", steps=100_000)
    async with running_worker(valkey_url, blobs.root, tiny_preset_dir.parent, training_timeout_s=2), \
            await JobClient.connect(valkey_url) as jobs:
        await jobs.submit(JobName.TRAIN, request, request.job_id)
        with pytest.raises(JobFailed):  # arq's 2-second timeout
            await jobs.wait(request.job_id, timeout=60)
        steps = []
        for _ in range(3):  # a thread that trained on would keep writing its steps
            steps.append(await jobs.redis.hget(progress_key(request.job_id), "step"))
            await asyncio.sleep(0.7)
    assert steps[0] is not None and len(set(steps)) == 1, steps
    assert not list((blobs.root / OWNER).glob("models/*"))
