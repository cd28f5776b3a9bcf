"""A face too small is answered with its size and the size needed (real service, Valkey and worker)."""

from __future__ import annotations

import io
import re
from collections.abc import AsyncIterator
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from skimage import data

from bot import texts
from bot.jobs import JobClient
from bot.service import BotService, Upload, UserRef
from bot.settings import BotSettings
from engine.api import Refusal
from storage.blobs import LocalBlobStore
from storage.db import Database
from tests.support import running_worker

ALICE = UserRef("console", "alice")


@pytest.fixture
async def service(tmp_path: Path, valkey_url: str, tiny_preset_dir: Path) -> AsyncIterator[BotService]:
    blobs_dir = tmp_path / "blobs"
    async with (
        Database.open(tmp_path / "avatarbooth.sqlite3") as db,
        await JobClient.connect(valkey_url, poll_delay=0.02) as jobs,
        running_worker(valkey_url, blobs_dir, tiny_preset_dir.parent),
    ):
        settings = BotSettings(interactive_timeout_s=30, training_timeout_s=60)
        yield BotService(db, LocalBlobStore(blobs_dir), jobs, settings, preset_name="tiny")


def small_face_photo() -> bytes:
    """Her head, 160 px square, on a 1000-px grey canvas: the face is under a tenth of the photo."""
    head = cv2.resize(data.astronaut()[40:220, 130:310], (160, 160), interpolation=cv2.INTER_AREA)
    image = np.full((1000, 1000, 3), 128, np.uint8)
    image[333:493, 500:660] = head
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG")
    return out.getvalue()


def test_the_measured_reason_names_both_sizes_and_what_to_send() -> None:
    reason = texts.refusal(Refusal.FACE_TOO_SMALL, BotSettings(), face_px=143, needed_face_px=205)
    assert "143 pixels" in reason and "at least 205" in reason
    assert "closer photo" in reason and "higher resolution" in reason
    # Without measurements (e.g. /photos, which keeps only the code) the reason still says what to do.
    plain = texts.refusal(Refusal.FACE_TOO_SMALL, BotSettings())
    assert "closer photo" in plain and "higher resolution" in plain


@pytest.mark.slow
async def test_a_small_face_is_refused_with_its_size_and_the_size_needed(service: BotService) -> None:
    await service.agree(ALICE)

    reply = await service.add_photos(ALICE, [Upload("far.png", small_face_photo())])

    line = reply.text.splitlines()[0]
    found = re.fullmatch(
        r"photo 1 \(far\.png\): refused, your face is (\d+) pixels across in the picture, and training "
        r"needs at least (\d+): send a closer photo .*, or one taken at a higher resolution\.",
        line,
    )
    assert found, line
    face_px, needed = int(found[1]), int(found[2])
    assert needed == 100  # the tiny preset's checks: a tenth of the photo's 1000-px shorter side
    assert 0 < face_px < needed
