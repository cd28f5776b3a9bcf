"""The tiny antelopev2 stand-ins, loaded and run by insightface's own model_zoo classes."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import cv2
import insightface
import numpy as np
import onnxruntime
import pytest
from insightface.app.common import Face
from insightface.model_zoo import get_model
from insightface.model_zoo.arcface_onnx import ArcFaceONNX
from insightface.model_zoo.attribute import Attribute
from insightface.model_zoo.scrfd import SCRFD
from skimage import data

from engine.tiny.faces import DETECTOR_FILE, GENDERAGE_FILE, RECOGNIZER_FILE, build_tiny_face_models

T1_JPG = Path(insightface.__file__).parent / "data" / "images" / "t1.jpg"
ASTRONAUT_FACE = (175, 70, 270, 180)  # x1, y1, x2, y2 of her face in skimage's astronaut()
T1_FACES = (  # the six faces in insightface's t1.jpg, by hand
    (60, 265, 165, 385), (285, 150, 380, 265), (460, 270, 590, 400),
    (745, 330, 870, 460), (905, 60, 1010, 200), (1135, 270, 1230, 395),
)
CPU = ["CPUExecutionProvider"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_face_models(tmp_path_factory.mktemp("antelopev2"))


@pytest.fixture(scope="module")
def detector(model_dir: Path) -> Any:
    model = get_model(str(model_dir / DETECTOR_FILE), providers=CPU)
    model.prepare(-1, input_size=(640, 640), det_thresh=0.5)
    return model


@pytest.fixture(scope="module")
def recognizer(model_dir: Path) -> Any:
    model = get_model(str(model_dir / RECOGNIZER_FILE), providers=CPU)
    model.prepare(-1)
    return model


@pytest.fixture(scope="module")
def genderage(model_dir: Path) -> Any:
    model = get_model(str(model_dir / GENDERAGE_FILE), providers=CPU)
    model.prepare(-1)
    return model


def bgr(rgb: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(rgb[:, :, ::-1])


def matches(box: np.ndarray, face: tuple[int, int, int, int]) -> bool:
    """The box's centre lies in the hand-marked face and its size is within a factor 2 of it."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    ratio = np.sqrt((box[2] - box[0]) * (box[3] - box[1]) / ((face[2] - face[0]) * (face[3] - face[1])))
    return bool(face[0] <= cx <= face[2] and face[1] <= cy <= face[3] and 0.5 <= ratio <= 2.0)


def test_build_is_fast_and_deterministic(tmp_path: Path) -> None:
    started = time.perf_counter()
    first = build_tiny_face_models(tmp_path / "a")
    elapsed = time.perf_counter() - started
    second = build_tiny_face_models(tmp_path / "b")
    other_seed = build_tiny_face_models(tmp_path / "c", seed=1)

    assert elapsed < 2.0
    for name in (DETECTOR_FILE, RECOGNIZER_FILE, GENDERAGE_FILE):
        assert (first / name).read_bytes() == (second / name).read_bytes()
    for name in (RECOGNIZER_FILE, GENDERAGE_FILE):
        assert (first / name).read_bytes() != (other_seed / name).read_bytes()


def test_insightface_routes_them_to_its_scrfd_and_arcface(detector: Any, recognizer: Any) -> None:
    assert type(detector) is SCRFD
    assert (detector.fmc, detector._feat_stride_fpn, detector._num_anchors) == (3, [8, 16, 32], 2)
    assert detector.use_kps and not detector.batched
    assert type(recognizer) is ArcFaceONNX
    assert recognizer.input_size == (112, 112)
    assert (recognizer.input_mean, recognizer.input_std) == (127.5, 127.5)  # not read as mxnet


def test_detector_outputs_have_scrfd_shapes(model_dir: Path) -> None:
    session = onnxruntime.InferenceSession(str(model_dir / DETECTOR_FILE), providers=CPU)
    outputs = session.run(None, {"input.1": np.zeros((1, 3, 640, 320), np.float32)})

    cells = [(640 // s) * (320 // s) * 2 for s in (8, 16, 32)]
    expected = [(n, 1) for n in cells] + [(n, 4) for n in cells] + [(n, 10) for n in cells]
    assert [o.shape for o in outputs] == expected


def test_astronaut_has_exactly_her_face(detector: Any) -> None:
    boxes, kps = detector.detect(bgr(data.astronaut()))

    assert len(boxes) == 1
    assert matches(boxes[0], ASTRONAUT_FACE)
    x1, y1, x2, y2 = boxes[0][:4]
    assert kps.shape == (1, 5, 2)
    assert np.all((kps[0, :, 0] > x1) & (kps[0, :, 0] < x2) & (kps[0, :, 1] > y1) & (kps[0, :, 1] < y2))
    left_eye, right_eye, nose, left_mouth, right_mouth = kps[0]
    assert left_eye[0] < right_eye[0] and left_eye[1] < nose[1] < left_mouth[1]


def test_group_photo_has_several_faces_and_nothing_else(detector: Any) -> None:
    boxes, _ = detector.detect(cv2.imread(str(T1_JPG)))

    found = [face for face in T1_FACES if any(matches(box, face) for box in boxes)]
    assert len(found) >= 3
    assert all(any(matches(box, face) for face in T1_FACES) for box in boxes)


@pytest.mark.parametrize("name", ["grey", "blue", "page", "text"])
def test_images_without_skin_have_no_face(detector: Any, name: str) -> None:
    images = {
        "grey": np.full((480, 640, 3), 128, np.uint8),
        "blue": np.tile(np.array([40, 80, 200], np.uint8), (480, 640, 1)),
        "page": np.stack([data.page()] * 3, axis=-1),
        "text": np.stack([data.text()] * 3, axis=-1),
    }
    boxes, kps = detector.detect(bgr(images[name]))

    assert boxes.shape == (0, 5) and kps.shape == (0, 5, 2)


def test_embeddings_follow_the_aligned_crop(detector: Any, recognizer: Any) -> None:
    def embedding(image_bgr: np.ndarray) -> np.ndarray:
        boxes, kps = detector.detect(image_bgr)
        face = Face(bbox=boxes[0, :4], kps=kps[0], det_score=boxes[0, 4])
        vector = recognizer.get(image_bgr, face)
        return np.asarray(vector / np.linalg.norm(vector))

    astronaut = bgr(data.astronaut())
    reference = embedding(astronaut)
    resized = embedding(cv2.resize(astronaut, (800, 800)))
    mirrored = embedding(np.ascontiguousarray(astronaut[:, ::-1]))
    others = [embedding(cv2.imread(str(T1_JPG))[y1 - 60:y2 + 60, x1 - 60:x2 + 60])
              for x1, y1, x2, y2 in (T1_FACES[0], T1_FACES[3])]

    assert reference.shape == (512,)
    assert np.array_equal(reference, embedding(astronaut))
    assert reference @ resized > 0.9
    assert reference @ mirrored > 0.9
    assert all(reference @ other < 0.5 for other in others)


def test_insightface_routes_the_gender_model_to_its_attribute_class(genderage: Any, model_dir: Path) -> None:
    assert type(genderage) is Attribute and genderage.taskname == "genderage"
    assert genderage.input_size == (96, 96)
    session = onnxruntime.InferenceSession(str(model_dir / GENDERAGE_FILE), providers=CPU)
    (image,), (scores,) = session.get_inputs(), session.get_outputs()
    assert (image.name, image.shape[1:]) == ("data", [3, 96, 96])
    assert (scores.name, scores.shape[1:]) == ("fc1", [3])
    # A featureless crop gets the head's biases: non-zero, as a trained head's are.
    female, male, age = session.run(None, {"data": np.zeros((1, 3, 96, 96), np.float32)})[0][0]
    assert female > 0 > male and 0.2 < age < 0.5


def test_the_apparent_gender_follows_the_face_and_not_its_mirror_image(detector: Any, genderage: Any) -> None:
    def genders(image_bgr: np.ndarray) -> list[int]:
        boxes, kps = detector.detect(image_bgr, input_size=(640, 640))
        return [int(genderage.get(image_bgr, Face(bbox=b[:4], kps=k))[0]) for b, k in zip(boxes, kps)]

    astronaut = bgr(data.astronaut())
    assert genders(astronaut) == [0]  # insightface: 0 is female, 1 male
    assert genders(np.ascontiguousarray(astronaut[:, ::-1])) == [0]
    assert genders(astronaut) == [0]  # and the same again: deterministic
    group = genders(cv2.imread(str(T1_JPG)))
    assert set(group) == {0, 1}, group  # different faces can read differently
