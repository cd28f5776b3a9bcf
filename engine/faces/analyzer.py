"""Face checks for enrolment photos, on insightface's own model classes.

``FaceAnalyzer`` loads an antelopev2-style folder (an SCRFD detector, an ArcFace recognizer and, where
there is one, the gender/age model) with ``insightface.model_zoo.get_model``, so detection, NMS,
keypoints, alignment and the attribute crop are insightface's code. ``check`` turns one uploaded
photo into an accept/refuse decision, a ``FaceRecord`` (embedding, keypoints, box), a face-centred
training crop and the face's apparent gender (for the class word; never logged). The refusal order
is: no face, several prominent faces, face too small, too blurry, duplicate (the same photo again,
e.g. re-encoded), different person.

Two scales of one embedding are kept apart: cosines (same person, duplicates, ranking) use the unit
vector; InstantID takes the recognizer's raw vector (``identity_embedding``), because its Resampler
was trained on insightface's unnormalised ``embedding`` (norm ≈ 22 for antelopev2), and its first
layer's bias would drown a 22× smaller input with what every user shares.
"""

from __future__ import annotations

import io
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from insightface.app.common import Face
from insightface.model_zoo import get_model
from PIL import Image, ImageOps, UnidentifiedImageError

from engine.api import CROP_SOURCE_SIDE_KEY, ApparentGender, Refusal
from engine.errors import InvalidFaceRecord, UnreadableImage, WeightsMissing

_log = logging.getLogger(__name__)

DETECTOR_FILE = "scrfd_10g_bnkps.onnx"
RECOGNIZER_FILE = "glintr100.onnx"
GENDERAGE_FILE = "genderage.onnx"  # optional: without it the apparent gender is unknown
EMBEDDING_DIM = 512
_RECORD_VERSION = 2  # 2 added "norm"; version 1 records still load, without it
_READABLE_VERSIONS = (1, 2)
_BLUR_PROBE_PX = 128  # the face region is resized to this square before measuring sharpness


@dataclass(frozen=True)
class FaceCheckSettings:
    """Thresholds of the photo checks. The defaults suit the tiny preset (``engine.tiny.faces``, whose
    detector is tuned for a 640×640 input) and are a reasonable start for antelopev2."""

    det_size: tuple[int, int] = (640, 640)  # detector input (width, height), multiples of 32
    det_threshold: float = 0.5  # detector score a face needs
    min_face_px: int = 64  # the face box's shorter side, in photo pixels
    min_face_fraction: float = 0.1  # ... and as a fraction of the photo's shorter side
    blur_threshold: float = 20.0  # variance of the Laplacian on the grey face at 128×128
    prominent_face_ratio: float = 0.25  # another face this large (by area) next to the largest: refused
    same_person_threshold: float = 0.4  # cosine to the mean of the accepted photos' embeddings
    # Cosine to any one accepted photo at or above which the photo counts as that photo again
    # (re-encoded, resized, lightly edited): two separate shots of one person, even seconds apart,
    # differ in pose and light enough for ArcFace to score them clearly lower. Above 1: off.
    duplicate_threshold: float = 0.995
    crop_size: int = 128  # training crop side, in pixels (the preset's resolution)
    crop_context: float = 0.75  # margin around the face box on each side, in face-box sizes
    # The most the training crop may be enlarged: the crop's square is the face's side × (1 + 2 ×
    # crop_context) in photo pixels, resized to crop_size, so a face needs crop_size / (max_crop_upscale
    # × (1 + 2 × crop_context)) pixels (``min_face_side``): 205 for SDXL's 1024 crops. Beyond ~2× the
    # resampling only invents blur, and a model trained on it draws the person soft.
    max_crop_upscale: float = 2.0

    def min_face_side(self, photo_short_side: int) -> float:
        """The face box's shorter side, in photo pixels, a photo with that shorter side needs: the
        largest of ``min_face_px``, ``min_face_fraction`` of the photo and the ``max_crop_upscale`` bound."""
        upscale_bound = self.crop_size / (self.max_crop_upscale * (1 + 2 * self.crop_context))
        return max(float(self.min_face_px), self.min_face_fraction * photo_short_side, upscale_bound)

    def __post_init__(self) -> None:
        if len(self.det_size) != 2 or any(side <= 0 or side % 32 for side in self.det_size):
            raise ValueError(f"det_size must be two positive multiples of 32, got {self.det_size}")
        for name in ("det_threshold", "min_face_fraction", "prominent_face_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        if not -1.0 <= self.same_person_threshold <= 1.0:
            raise ValueError(f"same_person_threshold is a cosine, in [-1, 1]: {self.same_person_threshold}")
        if self.duplicate_threshold <= self.same_person_threshold:
            raise ValueError(
                f"duplicate_threshold ({self.duplicate_threshold}) must exceed same_person_threshold "
                f"({self.same_person_threshold})"
            )
        if self.crop_size < 16:
            raise ValueError(f"crop_size must be at least 16 pixels, got {self.crop_size}")
        if not self.max_crop_upscale > 0:
            raise ValueError(f"max_crop_upscale must be positive, got {self.max_crop_upscale}")
        for name in ("min_face_px", "blur_threshold", "crop_context"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")


@dataclass(frozen=True)
class DetectedFace:
    """One face in an image: box (x1, y1, x2, y2), five keypoints (5, 2), score, unit embedding and
    the raw embedding's norm (``embedding * norm`` is what the recognizer returned)."""

    bbox: np.ndarray
    kps: np.ndarray
    score: float
    embedding: np.ndarray
    norm: float

    @property
    def area(self) -> float:
        width, height = self.bbox[2:4] - self.bbox[0:2]
        return float(max(width, 0.0) * max(height, 0.0))

    @property
    def short_side(self) -> float:
        return float(min(self.bbox[2:4] - self.bbox[0:2]))


@dataclass(frozen=True)
class FaceRecord:
    """What the engine keeps of an accepted face: unit embedding, keypoints, box, photo size (w, h),
    and the recognizer's raw norm (None for records written before it was kept)."""

    embedding: np.ndarray  # float32 (512,), unit length
    kps: np.ndarray  # float32 (5, 2)
    bbox: np.ndarray  # float32 (4,)
    image_size: tuple[int, int]
    norm: float | None = None  # ‖raw embedding‖; embedding * norm is the recognizer's output

    @property
    def raw_embedding(self) -> np.ndarray | None:
        """The recognizer's own vector, the scale InstantID was trained on; None when unknown."""
        return None if self.norm is None else (self.embedding * np.float32(self.norm)).astype(np.float32)

    def to_bytes(self) -> bytes:
        """Engine-private JSON; float32 values survive the round trip exactly."""
        data = {
            "version": _RECORD_VERSION,
            "embedding": self.embedding.astype(np.float32).tolist(),
            "kps": self.kps.astype(np.float32).tolist(),
            "bbox": self.bbox.astype(np.float32).tolist(),
            "image_size": list(self.image_size),
            "norm": self.norm,
        }
        return json.dumps(data, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> FaceRecord:
        """Parse ``to_bytes`` output; raises ``InvalidFaceRecord`` on anything else."""
        try:
            raw = json.loads(data)
            if raw.get("version") not in _READABLE_VERSIONS:
                raise ValueError(f"unknown version {raw.get('version')!r}")
            norm = raw.get("norm")
            if norm is not None and not (isinstance(norm, (int, float)) and np.isfinite(norm) and norm > 0):
                raise ValueError(f"norm must be a positive number, got {norm!r}")
            record = cls(
                embedding=_float32(raw["embedding"], (EMBEDDING_DIM,)),
                kps=_float32(raw["kps"], (5, 2)),
                bbox=_float32(raw["bbox"], (4,)),
                image_size=(int(raw["image_size"][0]), int(raw["image_size"][1])),
                norm=None if norm is None else float(norm),
            )
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as error:
            raise InvalidFaceRecord(
                f"Damaged face record ({error}). Remove that photo and upload it again."
            ) from error
        return record


def _float32(values: Any, shape: tuple[int, ...]) -> np.ndarray:
    array = np.asarray(values, dtype=np.float32)
    if array.shape != shape or not np.all(np.isfinite(array)):
        raise ValueError(f"expected finite values of shape {shape}, got shape {array.shape}")
    return array


@dataclass(frozen=True)
class FaceCheck:
    """The outcome of ``FaceAnalyzer.check``; ``record`` and ``crop`` are set only when accepted."""

    accepted: bool
    refusal: Refusal | None
    record: FaceRecord | None
    crop: Image.Image | None
    faces_found: int
    similarity: float | None  # cosine to the mean of the references, when there were any
    apparent_gender: ApparentGender | None = None  # of the accepted face, when the preset has the model
    face_px: int | None = None  # face_too_small: the face box's shorter side, in photo pixels
    needed_face_px: int | None = None  # ... and what the checks need (FaceCheckSettings.min_face_side)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two vectors (0.0 when either is zero)."""
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    norms = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b / norms) if norms > 0 else 0.0


def mean_embedding(records: Sequence[FaceRecord]) -> np.ndarray:
    """Unit-length mean of the records' unit embeddings: the identity the photos share."""
    if not records:
        raise ValueError("mean_embedding needs at least one face record")
    return _unit(np.mean([_unit(r.embedding) for r in records], axis=0))


def identity_embedding(records: Sequence[FaceRecord]) -> np.ndarray:
    """Mean of the records' raw recognizer vectors: InstantID's face input (see the module docstring).

    A record from before the norm was kept takes the mean norm of those that have one; when none has,
    the unit mean is returned and a log line says the likeness suffers until the photos are re-added.
    """
    if not records:
        raise ValueError("identity_embedding needs at least one face record")
    known = [r.norm for r in records if r.norm is not None]
    if not known:
        _log.warning("face records lack the recognizer's scale (written before version 2); InstantID "
                     "gets unit embeddings until the photos are uploaded again")
        return mean_embedding(records)
    fallback = float(np.mean(known))
    raws = [r.embedding * np.float32(r.norm or fallback) for r in records]  # as raw_embedding, norm filled in
    return np.mean(raws, axis=0).astype(np.float32)


def _unit(vector: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(vector))
    return (vector / norm if norm > 0 else vector).astype(np.float32)


class FaceAnalyzer:
    """Face detection, embedding and the enrolment checks over insightface's model classes."""

    def __init__(self, model_dir: Path, settings: FaceCheckSettings | None = None, *,
                 providers: Sequence[str] = ("CPUExecutionProvider",)) -> None:
        self.settings = settings or FaceCheckSettings()
        self._detector, self._recognizer, self._genderage = _load_models(Path(model_dir), list(providers))
        # insightface's prepare(ctx_id < 0) forces the CPU provider: only do that on CPU.
        ctx_id = 0 if any(p != "CPUExecutionProvider" for p in providers) else -1
        self._detector.prepare(ctx_id, input_size=self.settings.det_size,
                               det_thresh=self.settings.det_threshold)
        self._recognizer.prepare(ctx_id)
        if self._genderage is not None:
            self._genderage.prepare(ctx_id)

    @property
    def reads_gender(self) -> bool:
        """Whether the folder had a gender/age model (antelopev2's ``genderage.onnx``)."""
        return self._genderage is not None

    def apparent_gender(self, image_rgb: np.ndarray, face: DetectedFace) -> ApparentGender | None:
        """The gender ``face`` appears to have, by insightface's attribute model; None without one.

        insightface's ``Attribute`` cuts its 96×96 input around the face box (not the aligned
        keypoints) and answers the argmax of the (female, male) scores; the age it also reads is
        dropped here, as nothing needs it.
        """
        if self._genderage is None:
            return None
        bgr = np.ascontiguousarray(image_rgb[:, :, ::-1])
        male, _age = self._genderage.get(bgr, Face(bbox=face.bbox, kps=face.kps, det_score=face.score))
        return ApparentGender.MALE if int(male) == 1 else ApparentGender.FEMALE

    def detect(self, image_rgb: np.ndarray) -> list[DetectedFace]:
        """All faces in an RGB (H, W, 3) uint8 image, largest first, each with its unit embedding."""
        bgr = np.ascontiguousarray(image_rgb[:, :, ::-1])
        boxes, keypoints = self._detector.detect(bgr, input_size=self.settings.det_size)
        faces = [self._embed(bgr, box, kps) for box, kps in zip(boxes, keypoints)]
        return sorted(faces, key=lambda face: face.area, reverse=True)

    def _embed(self, bgr: np.ndarray, box: np.ndarray, kps: np.ndarray) -> DetectedFace:
        face = Face(bbox=box[:4], kps=kps, det_score=float(box[4]))
        embedding = np.asarray(self._recognizer.get(bgr, face))  # aligned with norm_crop on the kps
        return DetectedFace(bbox=box[:4].astype(np.float32), kps=kps.astype(np.float32),
                            score=float(box[4]), embedding=_unit(embedding),
                            norm=float(np.linalg.norm(embedding.astype(np.float64))))

    def check(self, image_bytes: bytes, references: Sequence[FaceRecord]) -> FaceCheck:
        """Decide whether a photo can join the user's training set (see the module docstring)."""
        image = decode_photo(image_bytes)
        faces = self.detect(image)
        refusal = self._refusal(image, faces)
        if refusal is Refusal.FACE_TOO_SMALL:  # say by how much: the user can aim for a size
            needed = math.ceil(self.settings.min_face_side(min(image.shape[:2])))
            return FaceCheck(False, refusal, None, None, len(faces), None,
                             face_px=int(faces[0].short_side), needed_face_px=needed)
        if refusal is not None:
            return FaceCheck(False, refusal, None, None, len(faces), None)
        main = faces[0]
        similarity = cosine(main.embedding, mean_embedding(references)) if references else None
        closest = max((cosine(main.embedding, r.embedding) for r in references), default=None)
        if closest is not None and closest >= self.settings.duplicate_threshold:
            return FaceCheck(False, Refusal.DUPLICATE, None, None, len(faces), similarity)
        if similarity is not None and similarity < self.settings.same_person_threshold:
            return FaceCheck(False, Refusal.DIFFERENT_PERSON, None, None, len(faces), similarity)
        height, width = image.shape[:2]
        record = FaceRecord(main.embedding, main.kps, main.bbox, (width, height), norm=main.norm)
        crop = training_crop(image, main.bbox, self.settings.crop_size, self.settings.crop_context)
        gender = self.apparent_gender(image, main)
        return FaceCheck(True, None, record, crop, len(faces), similarity, apparent_gender=gender)

    def _refusal(self, image: np.ndarray, faces: list[DetectedFace]) -> Refusal | None:
        """The first image-only check that fails, in the documented order; None when all pass."""
        settings = self.settings
        if not faces:
            return Refusal.NO_FACE
        main = faces[0]
        if any(other.area >= settings.prominent_face_ratio * main.area for other in faces[1:]):
            return Refusal.SEVERAL_FACES
        if main.short_side < settings.min_face_side(min(image.shape[:2])):
            return Refusal.FACE_TOO_SMALL
        if face_sharpness(image, main.bbox) < settings.blur_threshold:
            return Refusal.TOO_BLURRY
        return None


def _load_models(model_dir: Path, providers: list[str]) -> tuple[Any, Any, Any | None]:
    """insightface's detector, recognizer and (when there is one) gender/age model from the folder:
    antelopev2's names, else the first found."""
    preferred = [model_dir / DETECTOR_FILE, model_dir / RECOGNIZER_FILE, model_dir / GENDERAGE_FILE]
    others = sorted(p for p in model_dir.glob("*.onnx") if p not in preferred)
    found: dict[str, Any] = {}
    for path in [p for p in preferred if p.is_file()] + others:
        model = get_model(str(path), providers=providers)
        task = getattr(model, "taskname", None)
        if task in ("detection", "recognition", "genderage") and task not in found:
            found[task] = model
            _log.debug("face %s model: %s", task, path)
    missing = [task for task in ("detection", "recognition") if task not in found]
    if missing:
        raise WeightsMissing(
            f"No face {' or '.join(missing)} model in {model_dir}. Run `avatarbooth models pull` "
            "for a real preset, or delete the tiny preset's folder so that it is rebuilt."
        )
    return found["detection"], found["recognition"], found.get("genderage")


def decode_photo(image_bytes: bytes) -> np.ndarray:
    """Decode with Pillow, apply the EXIF orientation, drop metadata: an RGB (H, W, 3) uint8 array."""
    try:
        with Image.open(io.BytesIO(image_bytes)) as opened:
            upright = ImageOps.exif_transpose(opened)
            return _rgb8(upright)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as error:
        raise UnreadableImage(
            f"The photo could not be decoded ({error}). Send it again as a JPEG or PNG file."
        ) from error


def _rgb8(image: Image.Image) -> np.ndarray:
    """An RGB uint8 array of ``image``. 16-bit greyscale (PNG's "I;16", or "I") is scaled down to
    8 bits: Pillow's own conversion clips every value above 255, which turns a face white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        wide = np.asarray(image, dtype=np.int64)
        grey = np.clip((wide + 128) // 257, 0, 255).astype(np.uint8)  # 0..65535 → 0..255, rounded
        return np.repeat(grey[:, :, None], 3, axis=2)
    return np.array(image.convert("RGB"), dtype=np.uint8)


def face_sharpness(image_rgb: np.ndarray, bbox: np.ndarray) -> float:
    """Variance of the Laplacian of the grey face region, resized to a fixed size (higher: sharper)."""
    height, width = image_rgb.shape[:2]
    x1, y1 = np.floor(np.clip(bbox[:2], 0, [width, height])).astype(int)
    x2, y2 = np.ceil(np.clip(bbox[2:4], 0, [width, height])).astype(int)
    if x2 - x1 < 2 or y2 - y1 < 2:
        return 0.0
    grey = cv2.cvtColor(np.ascontiguousarray(image_rgb[y1:y2, x1:x2]), cv2.COLOR_RGB2GRAY)
    probe = cv2.resize(grey, (_BLUR_PROBE_PX, _BLUR_PROBE_PX), interpolation=cv2.INTER_AREA)
    return float(cv2.Laplacian(probe, cv2.CV_64F).var())


def training_crop(image_rgb: np.ndarray, bbox: np.ndarray, size: int, context: float) -> Image.Image:
    """A face-centred square with ``context`` face sizes of margin, kept inside the photo, at ``size``.

    The square shrinks to fit the photo when it can while still holding the whole face; otherwise
    the missing border is filled by repeating the edge pixels. The crop's ``info`` (written into its
    PNG) holds under ``CROP_SOURCE_SIDE_KEY`` the square's side in photo pixels, at most the photo's
    shorter side: what SDXL training is told the image's original size was.
    """
    height, width = image_rgb.shape[:2]
    face_side = float(max(bbox[2] - bbox[0], bbox[3] - bbox[1]))
    side = int(round(max(min(face_side * (1 + 2 * context), width, height), face_side, 1.0)))
    left = _clamped_start((bbox[0] + bbox[2]) / 2 - side / 2, side, width)
    top = _clamped_start((bbox[1] + bbox[3]) / 2 - side / 2, side, height)
    pads = ((max(-top, 0), max(top + side - height, 0)), (max(-left, 0), max(left + side - width, 0)), (0, 0))
    if any(before or after for before, after in pads):
        image_rgb = np.pad(image_rgb, pads, mode="edge")
        top, left = top + pads[0][0], left + pads[1][0]
    square = image_rgb[top:top + side, left:left + side]
    crop = Image.fromarray(square).resize((size, size), Image.Resampling.LANCZOS)
    crop.info[CROP_SOURCE_SIDE_KEY] = str(min(side, width, height))  # edge padding adds no detail
    return crop


def _clamped_start(start: float, side: int, limit: int) -> int:
    """Where a span of ``side`` starting near ``start`` begins: inside [0, limit) when it fits there,
    otherwise covering all of it."""
    if side <= limit:
        return int(round(min(max(start, 0.0), limit - side)))
    return int(round(min(max(start, limit - side), 0.0)))
