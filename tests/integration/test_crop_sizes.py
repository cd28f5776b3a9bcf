"""A photo check's crop keeps its source size, and a training job conditions SDXL on it (tiny worker).

The crop is a square around the face resized to the preset's resolution; SDXL is told the square's
side in photo pixels as the image's original size. The size travels in the crop PNG's text, so the
job payloads stay blob keys.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.api import CROP_SOURCE_SIDE_KEY, CheckPhotoRequest, TrainingMethod, TrainRequest
from engine.faces.analyzer import FaceRecord
from engine.settings import EngineSettings
from engine.worker import WorkerContext, do_check_photo, do_train
from tests.support import face_photo

pytestmark = pytest.mark.slow
OWNER = "u1"


def test_checked_crops_carry_their_source_side_into_the_training_steps(
    tiny_preset_dir: Path, tmp_path: Path
) -> None:
    settings = EngineSettings(preset="tiny", models_dir=tiny_preset_dir.parent, blobs_dir=tmp_path / "blobs",
                              redis_url="redis://unused")
    app = WorkerContext.load(settings)
    resolution = app.preset.resolution
    crop_keys, sides = [], []
    for n in range(2):
        photo = app.blobs.put(OWNER, "photos", face_photo(n), ".jpg")
        checked = do_check_photo(app, CheckPhotoRequest(f"check-{n}", OWNER, photo, []))
        assert checked.accepted and checked.crop_key and checked.embedding_key, checked
        crop = Image.open(io.BytesIO(app.blobs.get(checked.crop_key)))
        record = FaceRecord.from_bytes(app.blobs.get(checked.embedding_key))
        side = int(crop.info[CROP_SOURCE_SIDE_KEY])
        face_side = float(np.max(record.bbox[2:] - record.bbox[:2]))
        # The square around the face (with margin) in photo pixels: more than the face, at most the photo.
        assert crop.size == (resolution, resolution)
        assert face_side < side <= min(record.image_size) and side != resolution
        crop_keys.append(checked.crop_key)
        sides.append(float(side))

    seen: list[torch.Tensor] = []
    unet = app.base.text2img.unet  # Textual Inversion trains through the resident UNet
    handle = unet.add_time_proj.register_forward_pre_hook(
        lambda _module, args: seen.append(args[0].detach().reshape(-1, 6).cpu().clone())
    )
    try:
        do_train(app, TrainRequest("train-1", OWNER, TrainingMethod.TEXTUAL_INVERSION, crop_keys, "sks",
                                   "person", steps=4))
    finally:
        handle.remove()

    assert seen, "training gave the UNet no time ids"
    rows = torch.cat(seen)
    assert set(rows[:, 0].tolist()) <= set(sides) and rows[:, 0].tolist() == rows[:, 1].tolist()
    assert rows[:, 2:].tolist() == [[0.0, 0.0, float(resolution), float(resolution)]] * rows.shape[0]
