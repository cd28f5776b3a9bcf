"""What the chat side says of the face-detail pass: both likeness scores, and which image was sent."""

from __future__ import annotations

from pathlib import Path

from bot import texts
from bot.jobs import JobClient
from bot.runner import JobRunner
from bot.settings import BotSettings
from engine.api import ImagesResult
from storage.blobs import LocalBlobStore, owner_for
from storage.db import Database


async def test_a_drawing_names_the_likeness_before_and_after_the_face_detail_pass(
    tmp_path: Path, valkey_url: str
) -> None:
    blobs = LocalBlobStore(tmp_path / "blobs")
    async with Database.open(tmp_path / "db.sqlite") as db:
        user = await db.get_or_create_user("console", "alice")
        owner = owner_for(user.id)
        keys = [blobs.put(owner, "images", bytes([n]) * 8, ".png") for n in range(3)]
        job = await db.create_job(user.id, "draw", "interactive", {"meta": {"prompt": "me"}})
        jobs = await JobClient.connect(valkey_url)
        try:
            runner = JobRunner(db, blobs, jobs, BotSettings())
            result = ImagesResult(
                image_keys=keys, scores=[0.61, 0.58, None], seed=1, prompt_used="me",
                drawn_scores=[0.52, 0.58, None], detailed_scores=[0.61, 0.40, None],
            )
            drawn = await runner.record_images(job, result)
        finally:
            await jobs.close()

    assert [image.detail for image in drawn.images] == [(0.52, 0.61), (0.58, 0.40), None]
    lines = [texts.image_line(n, image.score, image.detail) for n, image in enumerate(drawn.images, start=1)]
    assert lines == [
        "image 1: face similarity 0.61 (face detail: 0.52 -> 0.61, kept)",
        "image 2: face similarity 0.58 (face detail: 0.58 -> 0.40, not kept, the drawing looked more like you)",
        "image 3: no face found to compare",
    ]
    older = ImagesResult(image_keys=keys[:1], scores=[0.5], seed=1, prompt_used="me")  # a worker without the pass
    assert ImagesResult.from_dict(older.to_dict()).drawn_scores == []
