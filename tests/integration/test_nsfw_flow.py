"""Images the NSFW check flags never reach the user or the database: real worker, real checker code."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
import torch

from bot.jobs import JobClient
from bot.service import BotService, Upload, UserRef
from bot.settings import BotSettings
from engine.settings import EngineSettings
from engine.worker import WorkerContext, build_workers, connect_redis
from storage.blobs import LocalBlobStore
from storage.db import Database
from tests.support import face_photo

pytestmark = pytest.mark.slow
ALICE = UserRef(platform="test", platform_user_id="alice")


async def test_flagged_images_are_withheld_and_not_kept(
    tmp_path: Path, valkey_url: str, tiny_preset_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    blobs = LocalBlobStore(tmp_path / "blobs")
    settings = EngineSettings(
        preset="tiny", models_dir=tiny_preset_dir.parent, blobs_dir=blobs.root, redis_url=valkey_url
    )
    app = await asyncio.to_thread(WorkerContext.load, settings)
    redis = await connect_redis(valkey_url)
    app.redis, app.loop = redis, asyncio.get_running_loop()
    workers = build_workers(app, redis)
    serving = [asyncio.create_task(w.main()) for w in workers]
    try:
        async with Database.open(tmp_path / "db.sqlite3") as db, await JobClient.connect(valkey_url) as jobs:
            service = BotService(db, blobs, jobs, BotSettings(), preset_name="tiny")
            await service.agree(ALICE)
            await service.add_photos(ALICE, [Upload(f"{n}.jpg", face_photo(n)) for n in range(3)])

            shown = await service.draw(ALICE, "me in a garden")
            assert len(shown.images) == 2 and "withheld" not in shown.text

            with torch.no_grad():  # every concept cosine (>= -1) now exceeds its threshold
                app.nsfw.model.concept_embeds_weights.fill_(-2.0)
            withheld = await service.draw(ALICE, "me in a garden")

            assert withheld.images == []
            assert "2 images were withheld by the safety filter" in withheld.text
            images_on_disk = sorted((blobs.root / "u1" / "images").iterdir())
            assert images_on_disk == sorted(i.path for i in shown.images)
            assert len(await db.list_jobs(1)) == 5  # 3 checks, 2 draws: the second recorded as done
            started = [r.getMessage() for r in caplog.records if r.name == "arq.worker" and ":draw(" in r.getMessage()]
            assert len(started) == 2 and all("draw(…)" in line for line in started)
            assert "garden" not in caplog.text  # the prompt is personal data: never in a log
    finally:
        for task in serving:
            task.cancel()
        await asyncio.gather(*serving, return_exceptions=True)
        await redis.aclose()
