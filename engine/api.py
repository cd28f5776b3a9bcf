"""The contract between the chat side and the GPU workers.

Importable without torch: the chat side (``bot/``) uses these names and types to enqueue jobs and read
their results; ``engine.worker`` implements them. Everything that crosses the queue is a plain dict of
strings, numbers and lists (msgpack), built from and parsed into the dataclasses below. Payloads carry
ids and blob keys, never image bytes or model weights.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Any, Self, TypeVar

import msgpack

QUEUE_INTERACTIVE = "avatarbooth:queue:interactive"
"""Short jobs a user is waiting on: photo checks, previews, draws."""
QUEUE_TRAINING = "avatarbooth:queue:training"
"""Long jobs: personal-model training."""

PROGRESS_KEY_PREFIX = "avatarbooth:progress:"
WORKER_KEY_PREFIX = "avatarbooth:worker:"
"""A worker sets ``WORKER_KEY_PREFIX + <host>:<pid>`` (with a short expiry, refreshed) once its
models are loaded, so a supervisor can tell a worker that is ready from one still loading."""


JOB_LEASE_S = 10
"""While a worker runs a job it keeps arq's in-progress key of the job alive for this long, renewed
every few seconds (arq itself sets it for the whole job timeout). A worker that dies lets it lapse
within this many seconds, and another worker (or the restarted one) takes the job again: it resumes
from its last checkpoint, under the same job id."""

JOB_TRIES = 3
"""How many times a job is started at most (a worker that died, a lost result) before it fails."""

ERASED_KEY_PREFIX = "avatarbooth:erased:"
"""``ERASED_KEY_PREFIX + <owner>`` is set by /forget: a worker neither starts a job of that owner nor
keeps what one wrote. (Owners are never reused, so the key names no person once the rows are gone.)"""


RESIDENT_KEY_PREFIX = "avatarbooth:resident:"
"""``RESIDENT_KEY_PREFIX + <host>:<pid>``: a JSON object of the personal models that worker holds in
memory, refreshed every quarter second with a short expiry; workers read each other's to route draws
(engine.residency)."""

CACHED_KEY_PREFIX = "avatarbooth:cached:"
"""``CACHED_KEY_PREFIX + <host>:<pid>``: a JSON list of the owners whose blobs that worker's local
cache holds copies of, or whose models it holds in memory, refreshed every second with a short expiry
(engine.erasure); /forget is done only once no worker lists the owner."""


def erased_key(owner: str) -> str:
    return ERASED_KEY_PREFIX + owner


def progress_key(job_id: str) -> str:
    """Redis key of the hash a worker writes a job's progress to (step, total, loss, eta_s, stage)."""
    return PROGRESS_KEY_PREFIX + job_id


def serialize_job(data: dict[str, Any]) -> bytes:
    """arq's job serializer on both sides: msgpack, never pickle (a queue must not execute code)."""
    packed: bytes = msgpack.packb(data, use_bin_type=True)
    return packed


def deserialize_job(data: bytes) -> dict[str, Any]:
    unpacked: dict[str, Any] = msgpack.unpackb(data, raw=False)
    return unpacked


def arq_job_id(kind: str, db_job_id: int) -> str:
    """The queue's job id for database job ``db_job_id``: re-enqueueing the same row is a no-op."""
    return f"{kind}-{db_job_id}"


class JobName(StrEnum):
    """Names of the worker functions, as registered with arq."""

    CHECK_PHOTO = "check_photo"
    PREVIEW = "preview"
    TRAIN = "train"
    DRAW = "draw"


JOB_QUEUES: dict[JobName, str] = {
    JobName.CHECK_PHOTO: QUEUE_INTERACTIVE,
    JobName.PREVIEW: QUEUE_INTERACTIVE,
    JobName.DRAW: QUEUE_INTERACTIVE,
    JobName.TRAIN: QUEUE_TRAINING,
}


class TrainingMethod(StrEnum):
    LORA = "lora"
    TEXTUAL_INVERSION = "ti"
    DREAMBOOTH = "dreambooth"


class Refusal(StrEnum):
    """Why a photo was not accepted. The chat side turns each code into a sentence (bot/texts.py)."""

    # Found by the chat side before anything is stored.
    NOT_AN_IMAGE = "not_an_image"
    TRUNCATED = "truncated"
    TOO_MANY_PIXELS = "too_many_pixels"
    TOO_FEW_PIXELS = "too_few_pixels"
    FILE_TOO_LARGE = "file_too_large"
    DUPLICATE = "duplicate"
    # Found by the worker's face checks.
    NO_FACE = "no_face"
    SEVERAL_FACES = "several_faces"
    FACE_TOO_SMALL = "face_too_small"
    TOO_BLURRY = "too_blurry"
    DIFFERENT_PERSON = "different_person"


class ApparentGender(StrEnum):
    """What insightface's gender model reads from a face (``CheckPhotoResult.apparent_gender``): a
    guess from appearance, used only to pick the class word a user's prompts are drawn with."""

    FEMALE = "female"
    MALE = "male"


class ErrorCode(StrEnum):
    """Why a job failed, as the worker reports it. Mapped to user-facing text by the chat side."""

    MISSING_BLOB = "missing_blob"
    INVALID_REQUEST = "invalid_request"
    MODEL_UNAVAILABLE = "model_unavailable"
    PREVIEW_UNAVAILABLE = "preview_unavailable"  # the base (SD1.5) has no zero-shot InstantID
    NOT_ENOUGH_GPU_MEMORY = "not_enough_gpu_memory"  # the method's estimated peak exceeds the worker's GPU
    ERASED = "erased"  # the owner used /forget: nothing the job made was kept
    INTERNAL = "internal"


ASPECT_RATIOS: Mapping[str, tuple[int, int]] = MappingProxyType(
    {
        "1:1": (1, 1),
        "3:4": (3, 4),
        "4:3": (4, 3),
        "2:3": (2, 3),
        "3:2": (3, 2),
        "9:16": (9, 16),
        "16:9": (16, 9),
    }
)
"""The aspect ratios (width:height) a preview or draw may ask for; the worker keeps about the
preset's pixel count and picks the size from the ratio."""
DEFAULT_ASPECT = "1:1"

_T = TypeVar("_T", bound="_Message")


@dataclass(frozen=True)
class _Message:
    """A dataclass that travels over the queue as a plain dict."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"{cls.__name__}: unexpected fields {sorted(unknown)}")
        return cls(**data)


@dataclass(frozen=True)
class CheckPhotoRequest(_Message):
    """Check one stored photo: detect the face, embed it, compare with the user's accepted photos.

    ``reference_embedding_keys`` are the face records of the photos already accepted for this user;
    the worker refuses the photo as ``different_person`` when it does not match them.
    On acceptance the worker writes two blobs under ``owner``: the face record and the training crop.
    """

    job_id: str
    owner: str
    photo_key: str
    reference_embedding_keys: list[str] = field(default_factory=list)


CROP_SOURCE_SIDE_KEY = "avatarbooth:source-side"
"""The PNG text key of a training crop (``CheckPhotoResult.crop_key``), and of the crop image's ``info``:
the side, in photo pixels, of the square the crop was cut from before it was resized. Training tells
SDXL this as the image's ``original_size``; crops written before it was kept train as if at full size."""


@dataclass(frozen=True)
class CheckPhotoResult(_Message):
    accepted: bool
    refusal: str | None = None  # a Refusal value when not accepted
    embedding_key: str | None = None  # face record: embedding, keypoints, box (engine-private format)
    crop_key: str | None = None  # face-centred square PNG at the training resolution (CROP_SOURCE_SIDE_KEY)
    faces_found: int = 0
    similarity: float | None = None  # cosine to the mean of the references, when there were any
    # an ApparentGender value for the accepted photo's face; None when the preset has no gender model
    apparent_gender: str | None = None
    # face_too_small: the face's size (its box's shorter side) and the size the checks need, in pixels
    face_px: int | None = None
    needed_face_px: int | None = None


@dataclass(frozen=True)
class PreviewRequest(_Message):
    """Zero-shot InstantID images from the mean face embedding of the enrolled photos."""

    job_id: str
    owner: str
    embedding_keys: list[str]
    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    num_images: int = 1
    class_word: str = "person"  # what "me" in the prompt becomes (there is no personal token yet)
    aspect: str = DEFAULT_ASPECT  # a key of ASPECT_RATIOS
    # Few-step mode (the preset's distilled LoRA, e.g. 8 steps, no CFG): True, False, or None for the
    # worker's default ([engine] few_step). Where the preset has no distilled weights, the full path draws.
    fast: bool | None = None


@dataclass(frozen=True)
class TrainRequest(_Message):
    """Train a personal model on the user's training crops."""

    job_id: str
    owner: str
    method: str  # a TrainingMethod value
    crop_keys: list[str]
    token: str  # the rare token that will stand for the user, e.g. "sks"
    class_word: str  # e.g. "person"
    steps: int | None = None  # None: the preset's default
    seed: int = 0


@dataclass(frozen=True)
class TrainResult(_Message):
    adapter_key: str  # blob key of the trained weights
    method: str
    base_preset: str
    steps: int
    token: str
    class_word: str
    final_loss: float | None = None


@dataclass(frozen=True)
class DrawRequest(_Message):
    """Render a prompt for one user, from their personal model when ``adapter_key`` is set.

    With no adapter, the worker falls back to InstantID on ``embedding_keys``. ``prompt`` still holds
    the user's words; the worker replaces "me" with ``token`` + ``class_word``. ``identity_boost``
    adds InstantID on ``embedding_keys`` to a LoRA model's draw (SDXL presets).
    """

    job_id: str
    owner: str
    prompt: str
    embedding_keys: list[str]
    adapter_key: str | None = None
    method: str | None = None
    token: str | None = None
    class_word: str | None = None
    negative_prompt: str = ""
    seed: int = 0
    num_images: int = 1
    variation_of: str | None = None  # blob key of an earlier image to vary ("more like this")
    variation_strength: float = 0.6  # 0 keeps that image, 1 redraws it entirely
    aspect: str = DEFAULT_ASPECT  # a key of ASPECT_RATIOS
    # With a LoRA model on an SDXL preset: draw through InstantID with the LoRA active, so the
    # face embedding pulls the likeness further. Ignored where that is not possible.
    identity_boost: bool = False
    # Best-of-N: render ``num_images``, keep (store and return) only the best ``keep`` by likeness.
    keep: int | None = None
    # Blob key of an earlier image to upscale 2× (the upscale button), re-denoised lightly with the
    # prompt, model and negative prompt given; one image, so num_images, keep, aspect, the variation
    # and the boost are ignored.
    upscale_of: str | None = None
    fast: bool | None = None  # few-step mode, as PreviewRequest.fast; ignored by the upscale


@dataclass(frozen=True)
class ImagesResult(_Message):
    """Images written to the blob store, best first, with their face similarity to the enrolled set."""

    image_keys: list[str]
    scores: list[float | None]  # cosine to the enrolled mean; None where no face was found
    seed: int
    prompt_used: str
    note: str | None = None  # e.g. that the tiny preset's images are noise
    flagged: list[bool] = field(default_factory=list)  # per image: withheld by the NSFW check
    # Per image, where the face-detail pass ran (else None): the likeness of the image as drawn, and of
    # the pass's result. ``scores`` holds the better of the two: that image is the one stored.
    drawn_scores: list[float | None] = field(default_factory=list)
    detailed_scores: list[float | None] = field(default_factory=list)


@dataclass(frozen=True)
class JobFailure(_Message):
    """What a worker returns instead of raising: arq's msgpack serializer cannot carry exceptions."""

    failed: bool
    code: str  # an ErrorCode value
    detail: str


def parse_result(data: dict[str, Any], kind: type[_T]) -> _T | JobFailure:
    """Read a worker's return value as either the expected result type or a ``JobFailure``."""
    if data.get("failed"):
        return JobFailure.from_dict(data)
    return kind.from_dict(data)
