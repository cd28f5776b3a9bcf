"""The minimum face size follows the training crop: at 1024, a face must fill half the crop's pixels.

The SDXL preset trains on 1024² crops of the face with context around it; a face that would be
upscaled more than 2× to fill one trains blur. These tests run the real checks (insightface's code on
the tiny face models) with the SDXL preset's own settings on a real photo, resized.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image
from skimage import data

from engine.api import Refusal
from engine.faces.analyzer import FaceAnalyzer, FaceCheckSettings, decode_photo
from engine.presets import _sdxl
from engine.tiny.faces import build_tiny_face_models

SDXL_CHECKS = _sdxl(Path("unused")).face_checks


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_face_models(tmp_path_factory.mktemp("antelopev2"))


def astronaut(side: int) -> bytes:
    """scikit-image's astronaut (her face box ≈ 72 px on its shorter side at 512) resized to ``side`` square, as PNG."""
    out = io.BytesIO()
    Image.fromarray(data.astronaut()).resize((side, side), Image.Resampling.LANCZOS).save(out, format="PNG")
    return out.getvalue()


def test_the_sdxl_minimum_keeps_the_1024_crop_upscaled_at_most_twice() -> None:
    needed = SDXL_CHECKS.min_face_side(photo_short_side=1000)
    crop_side = needed * (1 + 2 * SDXL_CHECKS.crop_context)  # the crop's square, in photo pixels
    assert SDXL_CHECKS.crop_size / crop_side == pytest.approx(2.0)
    assert needed > SDXL_CHECKS.min_face_px == 112
    # The smaller presets keep their own floors: SD1.5's 512 crop needs no more than its 112 pixels.
    assert FaceCheckSettings(crop_size=512, min_face_px=112).min_face_side(1000) == 112
    assert FaceCheckSettings().min_face_side(512) == 64


def test_a_face_above_the_old_minimum_but_upscaled_over_twice_is_refused_with_its_size(model_dir: Path) -> None:
    photo = astronaut(1024)
    sdxl = FaceAnalyzer(model_dir, SDXL_CHECKS)
    (face,) = sdxl.detect(decode_photo(photo))
    assert SDXL_CHECKS.min_face_px < face.short_side < SDXL_CHECKS.min_face_side(1024)

    check = sdxl.check(photo, references=[])

    assert (check.accepted, check.refusal) == (False, Refusal.FACE_TOO_SMALL)
    assert (check.face_px, check.needed_face_px) == (int(face.short_side), 205)
    # The same photo with the upscale bound lifted (the old rule: 112 px) passes every check.
    lifted = FaceAnalyzer(model_dir, FaceCheckSettings(**{**vars(SDXL_CHECKS), "max_crop_upscale": 1e9}))
    assert lifted.check(photo, references=[]).accepted


def test_a_face_big_enough_for_the_1024_crop_is_accepted(model_dir: Path) -> None:
    check = FaceAnalyzer(model_dir, SDXL_CHECKS).check(astronaut(1600), references=[])

    assert (check.accepted, check.refusal, check.face_px, check.needed_face_px) == (True, None, None, None)
    assert check.crop is not None and check.crop.size == (1024, 1024)
