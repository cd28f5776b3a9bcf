"""The face-detail pass: only the face's square changes, and the image kept is the better-scored one.

The tiny preset draws noise, in which no face is found, so these tests give the pass a real photo
(scikit-image's astronaut, which the tiny face models find) shrunk into a bigger canvas: her face is
then small against the preset's resolution, as a face in a full-body drawing is.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.api import CheckPhotoRequest, DrawRequest
from engine.faces.analyzer import FaceRecord, mean_embedding
from engine.ranking import Ranked, Ranking
from engine.render.detail import SKIP_ABOVE, face_region, redraw_face
from engine.settings import EngineSettings
from engine.worker import WorkerContext, _instantid_redraw, _store_ranked, do_check_photo
from tests.support import face_photo

OWNER = "u1"


def _canvas(noise: float = 0.0) -> Image.Image:
    """The astronaut at half size in a 320² canvas (her face ~25 × 31 px), with Gaussian noise of
    ``noise`` grey levels (a face drawn badly: the tiny recognizer scores it lower)."""
    photo = Image.open(io.BytesIO(face_photo(0))).convert("RGB").resize((256, 256))
    canvas = Image.new("RGB", (320, 320), (90, 110, 130))
    canvas.paste(photo, (30, 40))
    if noise:
        pixels = np.asarray(canvas).astype(np.float64)
        pixels += np.random.default_rng(0).normal(0, noise, pixels.shape)
        canvas = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    return canvas


@pytest.fixture(scope="module")
def app(tiny_preset_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerContext]:
    settings = EngineSettings(
        preset="tiny", models_dir=tiny_preset_dir.parent, blobs_dir=tmp_path_factory.mktemp("blobs"),
        redis_url="redis://unused",
    )
    yield WorkerContext.load(settings)


@pytest.fixture(scope="module")
def enrolled(app: WorkerContext) -> list[str]:
    keys: list[str] = []
    for n in range(3):
        photo = app.blobs.put(OWNER, "photos", face_photo(n), ".jpg")
        checked = do_check_photo(app, CheckPhotoRequest(f"check-{n}", OWNER, photo, keys))
        assert checked.accepted and checked.embedding_key
        keys.append(checked.embedding_key)
    return keys


def _target(app: WorkerContext, keys: list[str]) -> np.ndarray:
    return mean_embedding([FaceRecord.from_bytes(app.blobs.get(k)) for k in keys])


def test_the_redraw_changes_only_the_feathered_square_around_the_face() -> None:
    image = _canvas()
    face = (140.0, 90.0, 166.0, 122.0)
    region = face_region(image.size, face, 128)
    assert region is not None
    left, top, right, bottom = region.box
    assert right - left == bottom - top == 64  # twice the face's longer side
    assert left <= face[0] and top <= face[1] and right >= face[2] and bottom >= face[3]
    out = redraw_face(image, region, lambda crop: Image.new("RGB", crop.size, (255, 0, 0)), 128)

    before, after, mask = np.asarray(image), np.asarray(out), np.asarray(region.mask)
    outside = mask == 0
    assert np.array_equal(after[outside], before[outside])  # exactly: nothing outside is resampled
    assert mask[:top].max() == mask[bottom:].max() == mask[:, :left].max() == mask[:, right:].max() == 0
    core = mask == 255
    assert core.sum() >= (64 - 2 * 8) ** 2  # opaque from FEATHER of the side inwards
    assert np.abs(after[core].astype(int) - (255, 0, 0)).max() <= 2
    fading = (mask > 0) & (mask < 255)
    assert fading.any()  # a seam that fades, not a hard edge
    weight = mask[fading][:, None] / 255.0
    blended = before[fading] * (1 - weight) + np.array([255, 0, 0]) * weight
    assert np.abs(after[fading] - blended).max() <= 1.5  # the mask's weight, pixel by pixel


def test_a_face_drawn_near_full_resolution_gets_no_pass() -> None:
    big = (100.0, 100.0, 160.0, 160.0)  # 60 px: a 120-px square, more than SKIP_ABOVE of 128
    assert 120 >= SKIP_ABOVE * 128
    assert face_region((320, 320), big, 128) is None
    assert face_region((320, 320), big, 256) is not None
    assert face_region((320, 320), (5.0, 5.0, 5.0, 5.0), 128) is None  # an empty box
    assert face_region((320, 320), (5.0, 5.0, 6.0, 7.0), 128) is None  # a speck, not a face


def test_the_kept_image_is_the_better_scored_one(app: WorkerContext, enrolled: list[str]) -> None:
    target = _target(app, enrolled)
    ranking = Ranking(app.faces, app.nsfw, app.preset.resolution)
    clean, noisy = _canvas(), _canvas(noise=10)

    def redraw_from(source: Image.Image) -> Image.Image:
        """A redraw that puts ``source``'s face where the drawn one was."""
        face = app.faces.detect(np.asarray(noisy))[0]
        region = face_region(noisy.size, face.bbox, 128)
        assert region is not None
        return source.crop(region.box).resize((128, 128), Image.Resampling.LANCZOS)

    restored = ranking.rank([noisy], target, redraw=lambda crop, kps, box: redraw_from(clean))[0]
    spoiled = ranking.rank([clean], target, redraw=lambda crop, kps, box: redraw_from(_canvas(noise=20)))[0]

    assert restored.drawn_score is not None and restored.detailed_score is not None
    assert restored.detailed_score > restored.drawn_score  # the clean face looks more like her
    assert restored.score == restored.detailed_score and restored.image is not noisy
    assert spoiled.drawn_score is not None
    assert spoiled.detailed_score is None or spoiled.detailed_score < spoiled.drawn_score
    assert spoiled.score == spoiled.drawn_score and spoiled.image is clean
    assert ranking.rank([noisy], target)[0].drawn_score is None  # no redraw: no pass, nothing reported


def test_the_real_pass_through_instantid_keeps_the_better_and_the_rest_of_the_image(
    app: WorkerContext, enrolled: list[str]
) -> None:
    target = _target(app, enrolled)
    records = [FaceRecord.from_bytes(app.blobs.get(k)) for k in enrolled]
    request = DrawRequest("detail-1", OWNER, "me as an astronaut", enrolled, seed=3)
    redraw = _instantid_redraw(app, request, records, "a person as an astronaut", 4, None)
    drawn = _canvas(noise=10)
    ranked: Ranked = Ranking(app.faces, app.nsfw, app.preset.resolution).rank([drawn], target, redraw=redraw)[0]

    assert ranked.drawn_score is not None  # the pass ran
    region = face_region(drawn.size, app.faces.detect(np.asarray(drawn))[0].bbox, 128)
    assert region is not None
    outside = np.asarray(region.mask) == 0
    assert np.array_equal(np.asarray(ranked.image)[outside], np.asarray(drawn)[outside])
    scores = [s for s in (ranked.drawn_score, ranked.detailed_score) if s is not None]
    assert ranked.score == max(scores)
    assert (ranked.image is drawn) == (ranked.score == ranked.drawn_score)


def test_the_worker_stores_the_pass_and_reports_both_scores_unless_switched_off(
    app: WorkerContext, enrolled: list[str]
) -> None:
    records = [FaceRecord.from_bytes(app.blobs.get(k)) for k in enrolled]
    clean = _canvas()

    def restore(crop: Image.Image, kps: np.ndarray, box: np.ndarray) -> Image.Image:
        region = face_region(clean.size, app.faces.detect(np.asarray(clean))[0].bbox, 128)
        assert region is not None
        return clean.crop(region.box).resize(crop.size, Image.Resampling.LANCZOS)

    on = _store_ranked(app, OWNER, [_canvas(noise=10)], records, 0, "p", redraw=restore)
    off_app = dataclasses.replace(app, settings=dataclasses.replace(app.settings, face_detail=False))
    off = _store_ranked(off_app, OWNER, [_canvas(noise=10)], records, 0, "p", redraw=restore)

    drawn, detailed = on.drawn_scores[0], on.detailed_scores[0]
    assert drawn is not None and detailed is not None and detailed > drawn
    assert on.scores == [detailed]
    assert off.drawn_scores == off.detailed_scores == [None] and off.scores == [drawn]
    stored_on = np.asarray(Image.open(io.BytesIO(app.blobs.get(on.image_keys[0]))))
    stored_off = np.asarray(Image.open(io.BytesIO(app.blobs.get(off.image_keys[0]))))
    assert np.array_equal(stored_off, np.asarray(_canvas(noise=10)))  # stored as drawn
    assert not np.array_equal(stored_on, stored_off)  # stored with the restored face
