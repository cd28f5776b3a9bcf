"""Photo checks on insightface's real SCRFD and ArcFaceONNX code, running the tiny models on real photos."""

from __future__ import annotations

import json

import dataclasses
import io
from pathlib import Path

import cv2
import insightface
import numpy as np
import pytest
from PIL import Image
from skimage import data

from engine.api import (
    CROP_SOURCE_SIDE_KEY,
    ApparentGender,
    CheckPhotoResult,
    Refusal,
    deserialize_job,
    serialize_job,
)
from engine.errors import EngineError, InvalidFaceRecord, UnreadableImage, WeightsMissing
from engine.faces.analyzer import (
    FaceAnalyzer,
    FaceCheckSettings,
    FaceRecord,
    cosine,
    decode_photo,
    mean_embedding,
    training_crop,
)
from engine.tiny.faces import DETECTOR_FILE, RECOGNIZER_FILE, build_tiny_face_models
from tests.support import face_photo

T1_JPG = Path(insightface.__file__).parent / "data" / "images" / "t1.jpg"
ASTRONAUT_FACE = (175, 70, 270, 180)  # x1, y1, x2, y2 of her face in skimage's astronaut()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_face_models(tmp_path_factory.mktemp("antelopev2"))


@pytest.fixture(scope="module")
def analyzer(model_dir: Path) -> FaceAnalyzer:
    return FaceAnalyzer(model_dir, FaceCheckSettings())


def encode(rgb: np.ndarray, fmt: str = "PNG", **params: object) -> bytes:
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, format=fmt, **params)
    return out.getvalue()


def astronaut_with_small_face(canvas: int, face_px: int) -> np.ndarray:
    """Her head, scaled to ``face_px`` square, on a plain grey canvas."""
    head = cv2.resize(data.astronaut()[40:220, 130:310], (face_px, face_px), interpolation=cv2.INTER_AREA)
    image = np.full((canvas, canvas, 3), 128, np.uint8)
    image[canvas // 3:canvas // 3 + face_px, canvas // 2:canvas // 2 + face_px] = head
    return image


def test_detect_finds_her_face_with_a_unit_embedding(analyzer: FaceAnalyzer) -> None:
    faces = analyzer.detect(data.astronaut())

    assert len(faces) == 1
    face = faces[0]
    cx, cy = (face.bbox[0] + face.bbox[2]) / 2, (face.bbox[1] + face.bbox[3]) / 2
    assert ASTRONAUT_FACE[0] < cx < ASTRONAUT_FACE[2] and ASTRONAUT_FACE[1] < cy < ASTRONAUT_FACE[3]
    assert face.kps.shape == (5, 2) and face.embedding.shape == (512,)
    assert face.embedding.dtype == np.float32
    assert abs(float(np.linalg.norm(face.embedding)) - 1.0) < 1e-5
    assert 10 < face.norm < 40  # the raw recognizer's scale, as antelopev2's (≈ 22), is kept beside it
    assert face.score >= analyzer.settings.det_threshold


def test_astronaut_is_accepted_with_a_training_crop(analyzer: FaceAnalyzer) -> None:
    check = analyzer.check(encode(data.astronaut()), references=[])

    assert (check.accepted, check.refusal, check.faces_found, check.similarity) == (True, None, 1, None)
    assert check.record is not None and check.crop is not None
    assert check.crop.size == (128, 128) and check.crop.mode == "RGB"
    assert check.record.image_size == (512, 512)
    restored = FaceRecord.from_bytes(check.record.to_bytes())
    for field in ("embedding", "kps", "bbox"):
        assert np.array_equal(getattr(restored, field), getattr(check.record, field))
    assert restored.image_size == check.record.image_size


def test_group_photo_is_refused_for_several_faces(analyzer: FaceAnalyzer) -> None:
    check = analyzer.check(T1_JPG.read_bytes(), references=[])

    # Its faces are also small for the photo: several_faces comes first in the refusal order.
    assert (check.accepted, check.refusal) == (False, Refusal.SEVERAL_FACES)
    assert check.faces_found >= 3
    assert check.record is None and check.crop is None


@pytest.mark.parametrize("colour", [(128, 128, 128), (40, 80, 200)])
def test_flat_image_has_no_face(analyzer: FaceAnalyzer, colour: tuple[int, int, int]) -> None:
    flat = np.tile(np.array(colour, np.uint8), (480, 640, 1))

    check = analyzer.check(encode(flat), references=[])

    assert (check.accepted, check.refusal, check.faces_found) == (False, Refusal.NO_FACE, 0)


def test_small_face_in_a_big_photo_is_too_small(analyzer: FaceAnalyzer) -> None:
    image = astronaut_with_small_face(canvas=1000, face_px=160)

    check = analyzer.check(encode(image), references=[])

    assert (check.faces_found, check.refusal) == (1, Refusal.FACE_TOO_SMALL)


def test_face_below_min_face_px_is_too_small(model_dir: Path) -> None:
    strict = FaceAnalyzer(model_dir, FaceCheckSettings(min_face_px=120))
    astronaut = encode(data.astronaut())

    assert strict.check(astronaut, references=[]).refusal == Refusal.FACE_TOO_SMALL


def test_blurred_face_is_too_blurry(analyzer: FaceAnalyzer) -> None:
    blurred = cv2.GaussianBlur(data.astronaut(), (0, 0), 4)

    check = analyzer.check(encode(blurred), references=[])

    assert (check.faces_found, check.refusal) == (1, Refusal.TOO_BLURRY)


def test_another_person_is_refused_and_the_same_one_accepted(analyzer: FaceAnalyzer) -> None:
    astronaut = data.astronaut()
    mine = analyzer.check(encode(astronaut), references=[]).record
    assert mine is not None
    someone_else = dataclasses.replace(mine, embedding=-mine.embedding)
    again = encode(astronaut, "JPEG", quality=85)

    other_shot = analyzer.check(face_photo(3), references=[]).record  # brighter, cropped: not a copy
    assert other_shot is not None

    refused = analyzer.check(again, references=[someone_else])
    accepted = analyzer.check(again, references=[other_shot, other_shot])

    assert (refused.accepted, refused.refusal) == (False, Refusal.DIFFERENT_PERSON)
    assert refused.similarity is not None and refused.similarity < -0.9
    assert refused.record is None and refused.crop is None
    assert (accepted.accepted, accepted.refusal) == (True, None)
    assert accepted.similarity is not None and accepted.similarity > 0.9


def test_exif_orientation_is_applied_and_metadata_dropped(analyzer: FaceAnalyzer) -> None:
    upright = Image.fromarray(data.astronaut())
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the stored pixels must be turned 90° clockwise to be upright
    exif[0x010F] = "AvatarBooth test camera"  # Make
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    out = io.BytesIO()
    stored.save(out, format="JPEG", quality=95, exif=exif)
    rotated_jpeg = out.getvalue()

    check = analyzer.check(rotated_jpeg, references=[])
    reference = analyzer.check(encode(data.astronaut(), "JPEG", quality=95), references=[])
    sideways = analyzer.detect(np.asarray(Image.open(io.BytesIO(rotated_jpeg)).convert("RGB")))

    assert check.accepted and reference.accepted
    assert check.record is not None and reference.record is not None and check.crop is not None
    assert check.record.image_size == (512, 512)
    assert np.abs(check.record.bbox - reference.record.bbox).max() < 4
    assert cosine(check.record.embedding, reference.record.embedding) > 0.95
    assert all(np.abs(face.bbox - reference.record.bbox).max() > 20 for face in sideways)
    # The crop keeps none of the photo's metadata, only its own source side (for SDXL's size conditioning).
    assert set(check.crop.info) == {CROP_SOURCE_SIDE_KEY} and len(check.crop.getexif()) == 0


def test_undecodable_bytes_raise_an_engine_error(analyzer: FaceAnalyzer) -> None:
    with pytest.raises(UnreadableImage) as raised:
        analyzer.check(b"definitely not an image", references=[])

    assert isinstance(raised.value, EngineError)
    with pytest.raises(UnreadableImage):
        decode_photo(encode(data.astronaut(), "JPEG")[:300])


def test_damaged_face_records_are_rejected(analyzer: FaceAnalyzer) -> None:
    record = analyzer.detect(data.astronaut())[0]
    good = FaceRecord(record.embedding, record.kps, record.bbox, (512, 512), norm=record.norm).to_bytes()

    loaded = FaceRecord.from_bytes(good)
    assert loaded.image_size == (512, 512) and loaded.norm == pytest.approx(record.norm)
    norm = f'"norm":{json.loads(good)["norm"]!r}'.encode()
    # A record written before the norm was kept (version 1) still loads, with the norm unknown.
    legacy = FaceRecord.from_bytes(good.replace(b'"version":2', b'"version":1').replace(b"," + norm, b""))
    assert legacy.norm is None and legacy.raw_embedding is None
    for damaged in (b"{", good.replace(b'"version":2', b'"version":9'), b'{"version":2}',
                    good.replace(b'"kps":[[', b'"kps":[[1.0],['),
                    good.replace(norm, b'"norm":-1.0'), good.replace(norm, b'"norm":"big"')):
        with pytest.raises(InvalidFaceRecord):
            FaceRecord.from_bytes(damaged)


def test_mean_embedding_is_unit_length_and_cosine_is_scale_free() -> None:
    rng = np.random.default_rng(0)
    records = [
        FaceRecord(rng.normal(size=512).astype(np.float32), np.zeros((5, 2), np.float32),
                   np.zeros(4, np.float32), (10, 10))
        for _ in range(3)
    ]
    mean = mean_embedding(records)

    assert mean.shape == (512,) and abs(float(np.linalg.norm(mean)) - 1.0) < 1e-5
    assert all(cosine(mean, r.embedding) > 0.3 for r in records)
    assert cosine(records[0].embedding, 5 * records[0].embedding) == pytest.approx(1.0)
    assert cosine(records[0].embedding, -records[0].embedding) == pytest.approx(-1.0)
    with pytest.raises(ValueError):
        mean_embedding([])


def test_training_crop_stays_inside_the_photo() -> None:
    # Pixel values encode their own coordinates, so the crop shows where it was taken from.
    ys, xs = np.mgrid[0:300, 0:400]
    image = np.stack([xs % 256, ys % 256, (xs // 256) * 100], axis=-1).astype(np.uint8)

    near_left = np.asarray(training_crop(image, np.array([5, 100, 45, 140]), size=120, context=1.0))
    too_big = np.asarray(training_crop(image, np.array([0, 0, 380, 300]), size=64, context=1.0))

    assert near_left.shape == (120, 120, 3) and too_big.shape == (64, 64, 3)
    assert near_left[60, 0, 0] < 3  # shifted right to start at x = 0 instead of padding
    assert near_left[0, 60, 1] == pytest.approx(60, abs=2)  # 3 × 40 px square, centred on y = 120


def test_missing_models_and_bad_settings_are_explained(tmp_path: Path) -> None:
    with pytest.raises(WeightsMissing, match="models pull"):
        FaceAnalyzer(tmp_path, FaceCheckSettings())
    with pytest.raises(ValueError, match="multiples of 32"):
        FaceCheckSettings(det_size=(640, 600))
    with pytest.raises(ValueError, match="prominent_face_ratio"):
        FaceCheckSettings(prominent_face_ratio=1.5)


def test_the_same_photo_again_is_refused_as_a_duplicate(analyzer: FaceAnalyzer) -> None:
    astronaut = data.astronaut()
    original = analyzer.check(encode(astronaut), references=[])
    other_shot = analyzer.check(face_photo(3), references=[])
    assert original.record is not None and other_shot.record is not None

    # Re-encoded as a JPEG: the photo's own record is among the references, next to another shot.
    again = analyzer.check(encode(astronaut, "JPEG", quality=70), references=[other_shot.record, original.record])
    different = analyzer.check(face_photo(4), references=[original.record])

    assert (again.accepted, again.refusal) == (False, Refusal.DUPLICATE)
    assert again.record is None and again.crop is None and again.faces_found == 1
    assert (different.accepted, different.refusal) == (True, None)


def test_the_duplicate_check_can_be_turned_off(model_dir: Path) -> None:
    lenient = FaceAnalyzer(model_dir, FaceCheckSettings(duplicate_threshold=1.01))
    photo = encode(data.astronaut())
    record = lenient.check(photo, references=[]).record
    assert record is not None

    assert lenient.check(photo, references=[record]).accepted
    with pytest.raises(ValueError, match="duplicate_threshold"):
        FaceCheckSettings(duplicate_threshold=0.3)


def test_the_tiny_presets_accept_mirrored_selfies(tiny_preset_dir: Path) -> None:
    from engine.presets import load_preset

    # The tiny recognizer scores a mirrored photo like a copy, so its presets keep the check off.
    preset = load_preset("tiny", tiny_preset_dir.parent)
    tiny = FaceAnalyzer(preset.face_models_dir, preset.face_checks)
    record = tiny.check(encode(data.astronaut()), references=[]).record
    assert record is not None

    mirrored = tiny.check(encode(data.astronaut()[:, ::-1].copy()), references=[record])

    assert (mirrored.accepted, mirrored.refusal) == (True, None)
    assert mirrored.similarity is not None and mirrored.similarity > 0.99


def test_the_check_reports_the_apparent_gender_of_the_accepted_face(analyzer: FaceAnalyzer) -> None:
    check = analyzer.check(encode(data.astronaut()), references=[])

    assert analyzer.reads_gender
    assert check.accepted and check.apparent_gender is ApparentGender.FEMALE
    group = decode_photo(T1_JPG.read_bytes())
    readings = {analyzer.apparent_gender(group, face) for face in analyzer.detect(group)}
    assert readings == {ApparentGender.FEMALE, ApparentGender.MALE}
    refused = analyzer.check(T1_JPG.read_bytes(), references=[])
    assert not refused.accepted and refused.apparent_gender is None  # only an accepted face is read


def test_without_a_gender_model_the_apparent_gender_is_unknown(model_dir: Path, tmp_path: Path) -> None:
    for name in (DETECTOR_FILE, RECOGNIZER_FILE):  # a folder as antelopev2 was pulled before genderage.onnx
        (tmp_path / name).write_bytes((model_dir / name).read_bytes())
    analyzer = FaceAnalyzer(tmp_path, FaceCheckSettings())

    check = analyzer.check(encode(data.astronaut()), references=[])

    assert not analyzer.reads_gender
    assert check.accepted and check.apparent_gender is None


def test_check_results_carry_the_apparent_gender_and_older_ones_still_load() -> None:
    result = CheckPhotoResult(True, embedding_key="k", crop_key="c", faces_found=1, apparent_gender="female")
    assert CheckPhotoResult.from_dict(deserialize_job(serialize_job(result.to_dict()))) == result
    older = {"accepted": True, "embedding_key": "k", "crop_key": "c", "faces_found": 1, "similarity": None}
    assert CheckPhotoResult.from_dict(deserialize_job(serialize_job(older))).apparent_gender is None


def test_a_16_bit_greyscale_png_decodes_as_its_8_bit_twin(analyzer: FaceAnalyzer) -> None:
    grey = Image.open(io.BytesIO(face_photo(0))).convert("L")
    deep = Image.fromarray(np.asarray(grey).astype(np.uint16) * 257)  # the same picture in 16 bits
    assert deep.mode == "I;16"
    eight, sixteen = io.BytesIO(), io.BytesIO()
    grey.save(eight, format="PNG")
    deep.save(sixteen, format="PNG")
    assert np.array_equal(decode_photo(sixteen.getvalue()), decode_photo(eight.getvalue()))
    assert analyzer.check(sixteen.getvalue(), []).faces_found == analyzer.check(eight.getvalue(), []).faces_found
